"""
DeepSeek / Hugging Face checkpoints in and out: a folder of config.json + *.safetensors in the layout of DeepSeek's
releases and of transformers' DeepseekV2/V3ForCausalLM, converted to and from nanoseek's Model.

    import hf
    model = hf.from_pretrained("path/to/DeepSeek-V2-Lite", dtype=torch.bfloat16, device="cuda")
    hf.save_pretrained(model, "out/hf")          # AutoModelForCausalLM.from_pretrained("out/hf") loads it

Nothing is downloaded: the folder must be on disk. What nanoseek cannot run fails in one line naming the key.
train.py's own checkpoints (ckpt.pt) are read here too (read_checkpoint), with the same care: shapes are checked on
the meta device before any memory is taken.
"""
import dataclasses
import glob
import json
import os
import re

import torch

from data import data_dir, read_valid_meta, tokenizer_identity
from errors import MiB, atomic_write, check_regular, error_text, fail, read_file, read_json
from model import Model, ModelConfig

# -----------------------------------------------------------------------------
# The layout
#
# A DeepSeek-V2 / V2-Lite / V3 folder, and what transformers' DeepseekV2/V3ForCausalLM.save_pretrained writes, is
# config.json + *.safetensors (one file, or shards listed in model.safetensors.index.json) with tensor names
#   model.embed_tokens, model.norm, lm_head, model.layers.{i}.{input_layernorm, post_attention_layernorm}
#   model.layers.{i}.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}, .{kv_a_proj_with_mqa, kv_a_layernorm,
#       kv_b_proj, o_proj}
#   model.layers.{i}.mlp.{gate_proj, up_proj, down_proj}                                         dense layers
#   model.layers.{i}.mlp.{gate, gate.e_score_correction_bias, experts.{j}.*, shared_experts.*}   MoE layers
# Names are renamed one dotted piece at a time (HF_NAMES). What else differs is converted here:
#   - routed experts: one tensor per expert there, one row of our stacked w1/w2/w3 here (transformers 5's fused
#     experts.gate_up_proj also loads). Shared experts: one fused MLP on both sides (separate ones load as slices).
#   - RoPE: DeepSeek's weights rotate interleaved pairs, as mla.py does (V2's complex RoPE, V3 rope_interleave=true).
#     A V3 folder with rope_interleave=false pairs (x_i, x_{i+R/2}): its RoPE rows are reordered on load.
#   - FP8 (V3 as released): float8 e4m3 weights with one inverse scale per 128x128 block (weight_scale_inv).
#   - routing: V3 = sigmoid + noaux_tc (group score: sum of its top-2 of s + b, the bias e_score_correction_bias).
#     V2 = softmax + greedy, or group_limited_greedy (group score: its max); no bias. DeepSeek's V2 gate scales by
#     routed_scaling_factor only when it does not renormalize (norm_topk_prob), V3's always: V2 maps to
#     (norm_topk=True, route_scale=1) or (norm_topk=False, route_scale=factor).
#   - the router weight and the expert bias stay float32 whatever dtype the rest loads in (as transformers keeps them).
#   - V3's multi-token-prediction module k (num_nextn_predict_layers of them) is model.layers.{num_hidden_layers + k}:
#     enorm, hnorm, eh_proj, shared_head.norm, a decoder layer, and copies of embed_tokens and shared_head.head (the
#     model's own, shared: not loaded, written back on save). Here it is mtp.{k}: enorm, hnorm, eh_proj, norm, block.

HF_NAMES = {  # one dotted piece of a transformers / DeepSeek tensor name -> ours
    "embed_tokens": "embed", "lm_head": "head", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn": "attn", "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
    "mlp": "ffn", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "e_score_correction_bias": "expert_bias",
}
OURS_TO_HF = {v: k for k, v in HF_NAMES.items()}

HF_DEFAULTS = {  # transformers' values for keys a config.json leaves out (or sets to null)
    "deepseek_v2": dict(n_shared_experts=2, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=False,
                        routed_scaling_factor=1.0, max_position_embeddings=2048, scoring_func="softmax",
                        topk_method="greedy"),
    "deepseek_v3": dict(n_shared_experts=1, first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True,
                        routed_scaling_factor=2.5, max_position_embeddings=4096, scoring_func="sigmoid",
                        topk_method="noaux_tc", rope_interleave=True),
}
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


MTP_OWN = ("enorm", "hnorm", "eh_proj")  # an MTP module's own pieces; the rest of its layer is a block or shared


def hf_to_ours(name, n_layer=None):
    """'model.layers.3.mlp.experts.5.gate_proj.weight' -> 'layers.3.ffn.experts.5.w1.weight'; with n_layer, a layer
    past it is an MTP module: 'model.layers.{n_layer}.self_attn.q_proj.weight' -> 'mtp.0.block.attn.wq.weight'.
    The MTP layer's copies of the embedding and the head map to None (shared with the model)."""
    name = ".".join(HF_NAMES.get(p, p) for p in name.removeprefix("model.").split("."))
    name = name.replace("gate.expert_bias", "expert_bias")
    m = re.fullmatch(r"layers\.(\d+)\.(.*)", name)
    if n_layer is None or not m or int(m[1]) < n_layer:
        return name
    k, rest = int(m[1]) - n_layer, m[2]
    if rest in ("embed.weight", "shared_head.head.weight"):
        return None
    if rest == "shared_head.norm.weight":
        return f"mtp.{k}.norm.weight"
    return f"mtp.{k}.{rest}" if rest.startswith(MTP_OWN) else f"mtp.{k}.block.{rest}"


def ours_to_hf(name, n_layer=None):
    m = re.fullmatch(r"mtp\.(\d+)\.(block\.)?(.*)", name)
    if m:  # MTP module k -> layer n_layer + k
        rest = "shared_head.norm.weight" if m[3] == "norm.weight" and not m[2] else m[3]
        name = f"layers.{n_layer + int(m[1])}.{rest}"
    name = ".".join(OURS_TO_HF.get(p, p) for p in name.split(".")).replace("e_score", "gate.e_score")
    return name if name.startswith("lm_head") else "model." + name


def fp8_dequant(w, scale_inv, block=(128, 128), dtype=torch.float32):
    """float8 weight (out, in) times its inverse scale per 128x128 block, scale_inv (ceil(out/128), ceil(in/128))
    -> dtype (out, in). Scaled in place one row of blocks at a time: no full-size float32 temporaries."""
    out = w.to(dtype)  # exact: every e4m3 value is a bfloat16 value
    row_scales = scale_inv.float().repeat_interleave(block[1], dim=1)[:, :w.shape[1]]  # (ceil(out/128), in)
    for i, s in enumerate(row_scales):
        out[i * block[0]:(i + 1) * block[0]].mul_(s)  # computed in float32, rounded once to dtype
    return out


def config_from_hf(hf_config, **overrides):
    """transformers DeepSeek-V2/V3 config.json (a dict) -> ModelConfig. What we cannot run fails in one line."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"unsupported checkpoint: {what}")
    kind = hf_config.get("model_type")
    need(kind in HF_DEFAULTS, f"model_type {kind!r} (nanoseek loads deepseek_v2 and deepseek_v3)")
    c = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, moe_layer_freq=1,
             q_lora_rank=1536, **HF_DEFAULTS[kind])
    c.update({k: v for k, v in hf_config.items() if v is not None or k == "q_lora_rank"})  # q_lora_rank null = no compression
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    moe = bool(c.get("n_routed_experts"))
    required += ["moe_intermediate_size", "num_experts_per_tok"] if moe else []
    need(all(k in c for k in required), f"config.json lacks {[k for k in required if k not in c]}")
    for key, want in [("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("moe_layer_freq", 1),
                      ("pretraining_tp", 1)]:
        need(c.get(key, want) == want, f"{key}={c.get(key)!r} (nanoseek supports {want!r})")
    score, method = c["scoring_func"], c["topk_method"]
    v3_ok = kind == "deepseek_v3" and (score, method) == ("sigmoid", "noaux_tc")
    v2_ok = kind == "deepseek_v2" and score == "softmax" and method in ("greedy", "group_limited_greedy")
    need(not moe or v3_ok or v2_ok, f"{kind} routing scoring_func={score!r} topk_method={method!r}")
    quant = c.get("quantization_config")
    need(quant is None or quant.get("quant_method") == "fp8", f"quantization_config {quant}")
    for key in ("rope_theta", "routed_scaling_factor", "rms_norm_eps", "max_position_embeddings"):
        need(type(c[key]) in (int, float), f"{key} must be a number, got {c[key]!r}")
    for key in ("rope_parameters", "rope_scaling"):
        need(isinstance(c.get(key) or {}, dict), f"{key} must be an object (or null), got {c.get(key)!r}")
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", c["rope_theta"])
    if rope.get("truncate", True) is True:
        rope.pop("truncate", None)
    extra = sorted(set(rope) - set(YARN_KEYS) if rope_type == "yarn" else rope)
    need(rope_type in ("default", "yarn") and not extra, f"RoPE {rope_type!r} with keys {extra}")
    factor, orig_len = 1.0, rope.get("original_max_position_embeddings") or c["max_position_embeddings"]
    if rope_type == "yarn":  # factor null: transformers derives it from the two lengths
        factor = rope.get("factor") or c["max_position_embeddings"] / orig_len
    top_k = c["num_experts_per_tok"] if moe else 1  # 0 is refused by ModelConfig, never taken as top-1
    norm, scale = bool(c["norm_topk_prob"]), float(c["routed_scaling_factor"])
    if kind == "deepseek_v2":  # DeepSeek's V2 gate: renormalize (top_k > 1) OR scale, never both
        norm = norm and top_k > 1
        scale = 1.0 if norm else scale
        if norm:
            print("note: DeepSeek-V2 norm_topk_prob=true: renormalizing as DeepSeek's code does "
                  "(transformers' DeepseekV2 ignores this flag)")
    grouped = kind == "deepseek_v3" or method == "group_limited_greedy"
    n_layer = c["num_hidden_layers"]
    args = dict(
        vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"], n_layer=n_layer,
        n_embd=c["hidden_size"], n_head=c["num_attention_heads"], q_lora_rank=c["q_lora_rank"] or 0,
        kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"], rope_theta=float(theta),
        rope_factor=float(factor), rope_original_max_len=orig_len, rope_beta_fast=rope.get("beta_fast") or 32.0,
        rope_beta_slow=rope.get("beta_slow") or 1.0, rope_mscale=rope.get("mscale") or 0.0,
        rope_mscale_all_dim=rope.get("mscale_all_dim") or 0.0,
        n_dense_layers=min(c["first_k_dense_replace"], n_layer) if moe else n_layer,
        dense_inter_dim=c["intermediate_size"], n_experts=c.get("n_routed_experts") or 1, top_k=top_k,
        n_shared=c["n_shared_experts"] or 0, moe_inter_dim=c.get("moe_intermediate_size") or 1,
        score_func=score if moe else "sigmoid", n_group=c["n_group"] if grouped else 1,
        topk_group=c["topk_group"] if grouped else 1, norm_topk=norm, route_scale=scale,
        tie_embeddings=bool(c["tie_word_embeddings"]), norm_eps=c["rms_norm_eps"],
        mtp_depth=c.get("num_nextn_predict_layers") or 0)
    args.update(overrides)
    return ModelConfig(**args)


def config_to_hf(cfg, dtype):
    """ModelConfig -> config.json for transformers: DeepseekV3 (sigmoid routing) or DeepseekV2 (softmax routing)."""
    v3 = cfg.score_func == "sigmoid"
    hf_config = dict(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        model_type="deepseek_v3" if v3 else "deepseek_v2", vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size, num_hidden_layers=cfg.n_layer, hidden_size=cfg.n_embd,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, q_lora_rank=cfg.q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, first_k_dense_replace=cfg.n_dense_layers, intermediate_size=cfg.dense_inter_dim,
        moe_layer_freq=1, n_routed_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
        n_shared_experts=cfg.n_shared, moe_intermediate_size=cfg.moe_inter_dim, scoring_func=cfg.score_func,
        topk_method="noaux_tc" if v3 else "greedy" if cfg.n_group == 1 else "group_limited_greedy",
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk,
        routed_scaling_factor=cfg.route_scale, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, rope_theta=cfg.rope_theta, rope_scaling=None,
        bos_token_id=None, eos_token_id=None, num_nextn_predict_layers=cfg.mtp_depth, torch_dtype=str(dtype).removeprefix("torch."))
    if v3:
        hf_config["rope_interleave"] = True  # our layout, DeepSeek's
    if cfg.rope_factor > 1:
        hf_config["rope_scaling"] = dict(type="yarn", factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                                  beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, mscale=cfg.rope_mscale,
                                  mscale_all_dim=cfg.rope_mscale_all_dim)
    return hf_config


def _pieces(name, t, cfg):
    """A checkpoint tensor under our name -> [(our parameter, index into it, values)]; t=None: just the names."""
    m = re.fullmatch(r"((?:layers\.\d+|mtp\.\d+\.block)\.ffn\.experts)\.(\d+)\.(w[123])\.weight", name)
    if m:  # one routed expert: a row of our stacked tensor
        return [(f"{m[1]}.{m[3]}", int(m[2]), t)]
    m = re.fullmatch(r"((?:layers\.\d+|mtp\.\d+\.block)\.ffn\.shared_experts)\.(\d+)\.(w[123])\.weight", name)
    if m:  # shared experts stored one by one: slices of our fused one's hidden dim
        hidden = slice(int(m[2]) * cfg.moe_inter_dim, (int(m[2]) + 1) * cfg.moe_inter_dim)
        return [(f"{m[1]}.{m[3]}.weight", (slice(None), hidden) if m[3] == "w2" else hidden, t)]
    if name.endswith("experts.gate_up_proj"):  # transformers 5's fused layout: (E, 2 * moe_inter_dim, n_embd)
        w1, w3 = t.chunk(2, dim=1) if t is not None else (None, None)
        return [(name[:-12] + "w1", ..., w1), (name[:-12] + "w3", ..., w3)]
    return [(name, ..., t)]


def _interleave_rope_rows(name, t, cfg):
    """rope_interleave=false checkpoints pair RoPE dims (x_i, x_{i + R/2}); mla.py pairs (x_2i, x_2i+1)."""
    R, D = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    perm = torch.arange(R).view(2, R // 2).t().flatten()  # our row 2i <- their i, 2i+1 <- their i + R/2
    if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
        t = t.view(cfg.n_head, cfg.qk_head_dim, -1)
        return torch.cat([t[:, :D], t[:, D:][:, perm]], dim=1).flatten(0, 1)
    if name.endswith("attn.wkv_a.weight"):
        return torch.cat([t[:cfg.kv_lora_rank], t[cfg.kv_lora_rank:][perm]])
    return t


def from_pretrained(path, dtype=torch.float32, device="cpu", **overrides):
    """Load a DeepSeek-V2 / V2-Lite / V3 folder (config.json + *.safetensors, FP8 or not) as a Model in eval mode.
    overrides: ModelConfig fields to change, e.g. block_size=4096, attn_impl="absorb". Streams one tensor at a time
    into a model allocated once (on the meta device first, so shapes are checked before any memory is taken), so
    memory stays near one copy of the model (plus one tensor).

    A folder it cannot load raises ValueError (one line) or OSError: whatever a crafted or damaged folder makes
    the reading code raise (a value of the wrong type, a missing key, a safetensors error) is turned into one."""
    from safetensors import SafetensorError
    try:
        return _from_pretrained(path, dtype, device, overrides)
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, OverflowError, SafetensorError) as e:
        raise ValueError(f"cannot read the checkpoint in {path} ({error_text(e)})") from e


def _from_pretrained(path, dtype, device, overrides):
    from safetensors import safe_open
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hf_config = read_json(os.path.join(path, "config.json"), 16 * MiB, "config.json")
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path}/config.json is not a JSON object")
    cfg = config_from_hf(hf_config, **overrides)
    # only the files the index names, or the one model.safetensors: a stray zz_old.safetensors is never read
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        file_of = read_json(index, 256 * MiB, "safetensors index").get("weight_map")
        if not isinstance(file_of, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v == os.path.basename(v) and v.endswith(".safetensors")
                for k, v in file_of.items()):
            raise ValueError(f"{index}: its weight_map must map tensor names to *.safetensors files in {path}")
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        check_regular(os.path.join(path, "model.safetensors"), "safetensors file")
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            file_of = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for fn in set(file_of.values()):
        check_regular(os.path.join(path, fn), "safetensors file")  # a FIFO would hang safe_open
    layers = {int(m[1]) for name in file_of if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    mtp_present = sum(1 for i in layers if i >= cfg.n_layer)
    if cfg.mtp_depth > mtp_present and "mtp_depth" not in overrides:  # transformers saves none of its MTP layers
        print(f"note: config.json names {cfg.mtp_depth} multi-token-prediction layer(s), the folder holds "
              f"{mtp_present}: loading {mtp_present}")
        cfg = dataclasses.replace(cfg, mtp_depth=mtp_present)
    # which tensors go where, checked before reading any data
    with torch.device("meta"):
        model = Model(cfg)
    loadable = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if "expert_bias" in n}
    skipped, plan, unknown = 0, {}, []
    for name in file_of:
        ours = hf_to_ours(name, cfg.n_layer)
        if name.endswith(("_scale_inv", "rotary_emb.inv_freq")) or (cfg.tie_embeddings and ours == "head.weight"):
            continue
        if ours is None:  # the MTP layer's copies of the shared embedding and head
            skipped += 1
        elif ours.startswith("mtp.") and int(ours.split(".")[1]) >= cfg.mtp_depth:  # modules past mtp_depth
            skipped += 1
        elif all(p in loadable and (not isinstance(i, int) or i < len(loadable[p])) for p, i, _ in _pieces(ours, None, cfg)):
            plan[name] = ours
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unsupported checkpoint: {len(unknown)} tensors nanoseek has no place for: {unknown[:8]}")
    # allocate once, in the requested dtype; the router and the expert bias stay float32
    model.to(dtype)
    for m in model.moe_layers():
        m.gate.float()
        m.expert_bias = m.expert_bias.float()
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty makes new parameters: tie them again
        model.head.weight = model.embed.weight
    model.fill_buffers()
    for m in model.moe_layers():
        m.expert_bias.zero_()  # V2 has none
    params = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in loadable}
    filled = {p: 0 for p in params}
    handles = {fn: safe_open(os.path.join(path, fn), "pt") for fn in set(file_of.values())}
    block = tuple((hf_config.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    rope_halves = hf_config.get("model_type") == "deepseek_v3" and hf_config.get("rope_interleave", True) is False
    with torch.no_grad():
        for name, ours in plan.items():
            t = handles[file_of[name]].get_tensor(name)
            if not t.is_floating_point():
                raise ValueError(f"unsupported checkpoint: {name} is stored as {t.dtype}, not as floating-point weights")
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale = name + "_scale_inv"
                if scale not in file_of:
                    raise ValueError(f"unsupported checkpoint: FP8 tensor {name} has no {scale}")
                t = fp8_dequant(t, handles[file_of[scale]].get_tensor(scale), block, dtype)
            if rope_halves:
                t = _interleave_rope_rows(ours, t, cfg)
            for target, idx, values in _pieces(ours, t, cfg):
                dst = params[target][idx]
                if dst.shape != values.shape:
                    raise ValueError(f"unsupported checkpoint: {name} has shape {tuple(values.shape)}, "
                                     f"config.json says {tuple(dst.shape)}")
                dst.copy_(values)
                filled[target] += values.numel()
    missing = [n for n, p in params.items() if filled[n] != p.numel() and not n.endswith("expert_bias")]
    if missing:
        raise ValueError(f"incomplete checkpoint: {len(missing)} of our tensors not (fully) loaded: {missing[:8]}")
    check_finite(params, path)
    if skipped:
        print(f"skipped {skipped} tensors of the multi-token-prediction layers (copies of the shared embedding and "
              "head, or modules past mtp_depth)")
    return model.eval()


def save_pretrained(model, path, max_shard_size=5 * 2**30):
    """Write config.json + safetensors that transformers' AutoModelForCausalLM loads (DeepSeek-V3 layout, or V2 for
    softmax routing). Shards above max_shard_size bytes, with model.safetensors.index.json. Each file is written
    whole or not at all (errors.atomic_write)."""
    from safetensors.torch import save
    cfg = model.config
    if cfg.score_func == "softmax":  # transformers' DeepseekV2 gate has no bias and never renormalizes
        if cfg.n_moe_layers and cfg.norm_topk:
            raise ValueError("cannot save: softmax routing with norm_topk=True has no transformers equivalent")
        if any(m.expert_bias.abs().max() > 0 for m in model.moe_layers()):
            raise ValueError("cannot save: softmax routing with a nonzero expert_bias has no DeepSeek-V2 equivalent")
    tensors = {}
    for name, t in model.state_dict().items():
        if (cfg.tie_embeddings and name == "head.weight") or (cfg.score_func == "softmax" and name.endswith("expert_bias")):
            continue
        m = re.fullmatch(r"((?:layers\.\d+|mtp\.\d+\.block)\.ffn\.experts)\.(w[123])", name)
        if m:  # our stacked experts -> one tensor per expert
            tensors.update({ours_to_hf(f"{m[1]}.{j}.{m[2]}.weight", cfg.n_layer): w for j, w in enumerate(t)})
        else:
            tensors[ours_to_hf(name, cfg.n_layer)] = t
    for k in range(cfg.mtp_depth):  # V3's layout gives each MTP layer its own copy of the embedding and the head
        tensors[f"model.layers.{cfg.n_layer + k}.embed_tokens.weight"] = model.embed.weight.detach().clone()
        tensors[f"model.layers.{cfg.n_layer + k}.shared_head.head.weight"] = model.head.weight.detach().clone()
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    os.makedirs(path, exist_ok=True)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fn, names in zip(files, shards):  # one shard in CPU memory at a time (and its bytes, once)
        with atomic_write(os.path.join(path, fn)) as f:
            f.write(save({n: tensors[n].detach().cpu().contiguous() for n in names}, metadata={"format": "pt"}))
    index = os.path.join(path, "model.safetensors.index.json")
    if len(shards) > 1:
        weight_map = {n: fn for fn, names in zip(files, shards) for n in names}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_write(index) as f:
            f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode())
    elif os.path.lexists(index):
        os.remove(index)  # an earlier sharded export's: it would win over the new model.safetensors
    with atomic_write(os.path.join(path, "config.json")) as f:
        f.write(json.dumps(config_to_hf(cfg, model.embed.weight.dtype), indent=2).encode())
    for fn in os.listdir(path):  # an earlier export's weight files that this one does not have (ours by their name)
        if fn not in files and re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", fn):
            os.remove(os.path.join(path, fn))


# -----------------------------------------------------------------------------
# train.py's checkpoints (out_dir/ckpt.pt): model, optimizer, model_args, config, iter_num, best_val_loss, the data


def read_checkpoint(path):
    """train.py's ckpt.pt, checked before anything is built from it: a dict with its keys, model_args a valid
    ModelConfig, and its tensors exactly the names, shapes and kinds (floating point or not) of that model, compared
    on the meta device (a crafted n_embd=60000 costs nothing). -> (ckpt, ModelConfig); ValueError (one line) if not.
    torch.load runs with weights_only=True: a pickle in the file can run no code."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if not os.path.isdir(path):
        check_regular(path, "checkpoint")  # torch.load would wait on a FIFO forever
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zero-byte, truncated, random, a folder: whatever torch.load makes of it
        raise ValueError(f"{path} is not a readable checkpoint ({error_text(e)})") from e
    fields_ok = isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and \
        isinstance(ckpt.get("model_args"), dict) and isinstance(ckpt.get("config"), dict) and \
        type(ckpt.get("iter_num")) is int and ckpt["iter_num"] >= 0 and \
        type(ckpt.get("best_val_loss", 0.0)) in (float, int) and isinstance(ckpt.get("run"), (str, type(None))) and \
        all(isinstance(k, str) and torch.is_tensor(v) and v.layout is torch.strided and not v.is_meta
            for k, v in ckpt["model"].items()) and \
        ("data" not in ckpt or (isinstance(ckpt["data"], dict) and isinstance(ckpt["data"].get("dir"), str) and
                                isinstance(ckpt["data"].get("tokenizer"), dict)))
    if not fields_ok:
        raise ValueError(f"{path} is not a checkpoint train.py wrote (its model, model_args, config or iter_num "
                         "is missing or of the wrong type, or a tensor is sparse or on the meta device)")
    try:
        cfg = ModelConfig(**ckpt["model_args"])
    except TypeError as e:  # a field ModelConfig does not have
        raise ValueError(f"{path}: its model_args are not a nanoseek config ({e})") from e
    except ValueError as e:
        raise ValueError(f"{path}: its model_args are an {e}") from e
    with torch.device("meta"):
        want = Model(cfg).state_dict()
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # saved from a compiled model
    for name in sorted(want.keys() | state.keys()):
        w, t = want.get(name), state.get(name)
        if w is None or t is None or w.shape != t.shape or w.is_floating_point() != t.is_floating_point():
            have = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            expect = "no such tensor" if w is None else f"{tuple(w.shape)} {w.dtype}"
            raise ValueError(f"{path} does not match its own model_args: {name} is {have}, model_args make "
                             f"{expect} (a damaged or hand-edited checkpoint)")
    check_finite(state, path)
    ckpt["model"] = state
    return ckpt, cfg


def check_finite(tensors, path):
    """ValueError naming the first floating-point tensor holding NaN or inf: such a model would print garbage."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: {name} holds NaN or inf values (a diverged or damaged model): use an earlier "
                             "checkpoint")


def checkpoints_near(out_dir, limit=6):
    """'' or '; ...' naming the train.py checkpoints one or two folders below out_dir, or, where there are none and
    out_dir is relative, in the repository's out/ (relative paths are the current folder's), for a "no checkpoint"
    line."""
    def below(root):
        found = [os.path.dirname(p) for pattern in ("*/ckpt.pt", "*/*/ckpt.pt")
                 for p in sorted(glob.glob(os.path.join(glob.escape(root), pattern)))]
        return found[:limit] + (["..."] if len(found) > limit else [])
    parent = os.path.dirname(out_dir.rstrip("/")) or "."
    found = below(out_dir) or [d for d in below(parent) if d != "..."][:limit]
    if found:
        return f"; checkpoints there: {', '.join(found)} (--out_dir=DIR)"
    repo_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    if not os.path.isabs(out_dir) and os.path.abspath(out_dir) != repo_out and \
            os.path.isfile(os.path.join(repo_out, "ckpt.pt")):
        return (f"; relative paths are the current folder's, and the repository's {repo_out} has one: run from "
                f"{os.path.dirname(repo_out)} or give --out_dir={repo_out}")
    return ""


def checkpoint_data_dir(ckpt):
    """The data folder a checkpoint was trained on: the absolute path train.py records; if that folder is gone
    (the project moved), or for a checkpoint from before it recorded one, its dataset and data_root settings,
    relative to the current folder."""
    recorded = ckpt.get("data", {}).get("dir")
    if recorded and os.path.isdir(recorded):
        return recorded
    cfg = ckpt["config"]
    dataset, root = cfg.get("dataset"), cfg.get("data_root", "data")
    if isinstance(dataset, str) and isinstance(root, str):
        return os.path.abspath(data_dir(dataset, root))
    return recorded or "(no data folder recorded)"


def check_checkpoint_tokenizer(ckpt, folder):
    """ValueError unless folder's tokenizer is the one the checkpoint's token ids were trained on (when the
    checkpoint records it): a dataset prepared again with another tokenizer would decode them into nonsense."""
    recorded = ckpt.get("data", {}).get("tokenizer")
    if recorded is None:
        return
    current = tokenizer_identity(folder, read_valid_meta(folder))
    if current != recorded:
        def show(t):
            return f"{t.get('kind')} vocab {t.get('vocab_size')} sha1 {str(t.get('sha1'))[:10]}"
        raise ValueError(f"the tokenizer in {folder} ({show(current)}) is not the one the checkpoint was trained "
                         f"with ({show(recorded)}): prepare.py has rebuilt it since; use the data it was trained on")


# -----------------------------------------------------------------------------
# tokenizers next to a checkpoint folder


def load_tokenizer(path):
    """A checkpoint folder's tokenizer -> (encode, decode, eot id): prepare.py's (meta.json + its file, as
    copy_tokenizer leaves them), or a Hugging Face tokenizer.json read by transformers (local files only)."""
    if os.path.exists(os.path.join(path, "meta.json")):
        from data import load_tokenizer as load_prepared
        return load_prepared(path)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            fail(f"the tokenizer.json in {path} is read with transformers: pip install transformers")
        try:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if os.path.exists(os.path.join(path, name)):
                    check_regular(os.path.join(path, name), "tokenizer file")  # transformers would wait on a FIFO
            # trust_remote_code=False: a tokenizer_config.json's auto_map can name Python code in the folder;
            # it is refused instead of run (or asked about on stdin)
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # whatever transformers makes of a damaged tokenizer.json or tokenizer_config.json
            fail(f"cannot read the tokenizer in {path} ({error_text(e)})")
        eot = tok.eos_token_id if tok.eos_token_id is not None else 0
        # encode adds what the tokenizer's template adds (DeepSeek: BOS); decode leaves such special tokens out
        return tok.encode, (lambda ids: tok.decode(ids, skip_special_tokens=True)), eot
    fail(f"no tokenizer in {path}: it needs tokenizer.json, or meta.json + the tokenizer file that python "
         "prepare.py writes")


def copy_tokenizer(src, dst):
    """Copy the tokenizer files of a data folder or a checkpoint folder next to an exported checkpoint."""
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "meta.json"]
    if os.path.exists(os.path.join(src, "meta.json")):
        names.append(read_valid_meta(src)["tokenizer"]["file"])  # prepare.py's tokenizer file
    for name in names:
        if os.path.exists(os.path.join(src, name)) and os.path.abspath(src) != os.path.abspath(dst):
            raw = read_file(os.path.join(src, name), 256 * MiB, "tokenizer file")
            with atomic_write(os.path.join(dst, name)) as out:
                out.write(raw)
