"""
The nanoseek model: a DeepSeek-V2/V3-style decoder. Config, blocks, model, generation with the latent cache.

    embed -> n_layer x [ x + MLA(RMSNorm(x)) ; x + FFN(RMSNorm(x)) ] -> RMSNorm -> head

The first n_dense_layers blocks use a dense SwiGLU FFN, the rest DeepSeekMoE (moe.py). Attention is Multi-head
Latent Attention (mla.py). Field names follow DeepSeek / Hugging Face transformers (REFERENCE.md section 3).
Model.from_pretrained(path) / model.save_pretrained(path) read and write DeepSeek-V2/V3 checkpoint folders in the
Hugging Face layout (the last section of this file).
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mla import MLA, LatentCache, precompute_rope, yarn_mscale
from moe import FFN, MoE, max_vio


@dataclass
class ModelConfig:
    # defaults: the GPU "small" reference config (REFERENCE.md section 4), ~GPT-2-small active compute
    vocab_size: int = 50304          # tokens; set from the data's meta.json by train.py
    block_size: int = 1024           # longest sequence (RoPE tables and the generation limit)
    n_layer: int = 12                # blocks (num_hidden_layers)
    n_embd: int = 768                # model width (hidden_size)
    n_head: int = 12                 # attention heads (num_attention_heads)
    # --- MLA (DeepSeek-V2 section 2.1)
    q_lora_rank: int = 0             # query latent width; 0 = plain query projection (V2-Lite), V3 uses 1536
    kv_lora_rank: int = 256          # KV latent width d_c: the cache holds this + qk_rope_head_dim per token
    qk_nope_head_dim: int = 64       # per-head query/key dims without position (from the latent)
    qk_rope_head_dim: int = 32       # per-head query dims with RoPE; the RoPE key is one, shared by all heads
    v_head_dim: int = 64             # per-head value dim
    rope_theta: float = 10000.0      # RoPE base
    rope_factor: float = 1.0         # YaRN context extension factor; 1 = off
    rope_original_max_len: int = 4096  # YaRN: context the model was trained at (original_max_position_embeddings)
    rope_beta_fast: float = 32.0     # YaRN: dims rotating more than this often over that context keep their freq
    rope_beta_slow: float = 1.0      # YaRN: dims rotating less than this are fully interpolated
    rope_mscale: float = 1.0         # YaRN mscale (scales cos/sin, relative to rope_mscale_all_dim)
    rope_mscale_all_dim: float = 0.0  # YaRN mscale_all_dim: softmax_scale *= (0.1 * this * ln(factor) + 1)^2
    attn_impl: str = "auto"          # "naive" (materialize K,V), "absorb" (attend over latents), "auto": naive
                                     # for a fresh sequence, absorb when decoding against the cache
    # --- FFN / DeepSeekMoE
    n_dense_layers: int = 1          # first blocks with a dense FFN (first_k_dense_replace)
    dense_inter_dim: int = 3072      # dense FFN hidden size (intermediate_size)
    n_experts: int = 64              # routed experts (n_routed_experts)
    top_k: int = 6                   # routed experts per token (num_experts_per_tok)
    n_shared: int = 2                # shared experts, always on; fused into one SwiGLU (n_shared_experts)
    moe_inter_dim: int = 384         # hidden size of each expert (moe_intermediate_size)
    score_func: str = "sigmoid"      # router affinity: "sigmoid" (V3) or "softmax" (V2)
    n_group: int = 1                 # expert groups for group-limited routing; 1 = off
    topk_group: int = 1              # groups kept per token
    norm_topk: bool = None           # renormalize gate weights over the chosen experts; None = on for sigmoid
    route_scale: float = 1.0         # gate weights times this (routed_scaling_factor; V3 2.5)
    seq_aux_alpha: float = 0.0       # V3 sequence-wise balance loss weight (V3 used 1e-4); 0 = off
    aux_alpha: float = 0.0           # classic batch auxiliary balance loss weight (for ablations); 0 = off
    # --- the rest
    tie_embeddings: bool = False     # share the token embedding with the LM head (DeepSeek does not)
    norm_eps: float = 1e-6           # RMSNorm epsilon
    init_std: float = 0.02           # std of the normal init of every weight matrix
    use_kernels: bool = True         # use kernels.py's Triton paths where they apply (CUDA + Triton); False = PyTorch

    def __post_init__(self):
        # derived values live here, nowhere else
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1 and self.rope_mscale_all_dim:
            self.softmax_scale *= yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) ** 2
        if self.norm_topk is None:
            self.norm_topk = self.score_func == "sigmoid"
        self.n_moe_layers = max(self.n_layer - self.n_dense_layers, 0)
        self.validate()

    def validate(self):
        """One clear line for a config that cannot work, before any tensor is made."""
        def check(ok, msg):
            if not ok:
                raise ValueError(f"invalid config: {msg}")
        check(self.score_func in ("sigmoid", "softmax"), f"score_func must be sigmoid or softmax, got {self.score_func!r}")
        check(self.attn_impl in ("auto", "naive", "absorb"), f"attn_impl must be auto, naive or absorb, got {self.attn_impl!r}")
        check(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")
        check(0 <= self.n_dense_layers <= self.n_layer, f"n_dense_layers ({self.n_dense_layers}) must be in 0..n_layer ({self.n_layer})")
        if self.n_moe_layers > 0:
            check(1 <= self.top_k <= self.n_experts, f"top_k ({self.top_k}) must be in 1..n_experts ({self.n_experts})")
            check(self.n_group >= 1 and self.n_experts % self.n_group == 0,
                  f"n_experts ({self.n_experts}) must be divisible by n_group ({self.n_group})")
            check(1 <= self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be in 1..n_group ({self.n_group})")
            per_group = self.n_experts // self.n_group
            check(self.top_k <= self.topk_group * per_group,
                  f"top_k ({self.top_k}) exceeds the {self.topk_group * per_group} experts in topk_group groups")
            check(self.n_group == 1 or self.score_func == "softmax" or per_group >= 2,
                  "sigmoid group routing scores a group by its best two experts: need >= 2 experts per group")


class Block(nn.Module):
    def __init__(self, cfg, layer_id):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ffn = FFN(cfg.n_embd, cfg.dense_inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos)
        x = x + self.ffn(self.ffn_norm(x))
        return x


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = precompute_rope(cfg, cfg.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Init: every weight matrix N(0, init_std) as GPT-2 / DeepSeek do; the projections that write into the
        residual stream (attention wo, FFN and expert w2) scaled by 1/sqrt(2 n_layer) so the residual's variance
        stays O(1) with depth (GPT-2); norms at 1; expert bias at 0 (every expert starts equally likely)."""
        std, resid_std = self.config.init_std, self.config.init_std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for m in self.moe_layers():
            m.expert_bias.zero_()
            m.tokens_per_expert.zero_()

    def moe_layers(self):
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        """idx (B, T) token ids at positions start_pos..; returns (logits (B, T, vocab), loss or None).
        loss = cross-entropy (targets == -1 ignored) + the enabled balance losses of the MoE layers."""
        B, T = idx.shape
        if start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than block_size {self.config.block_size}")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.embed(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.kv[i], start_pos)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
            for m in self.moe_layers():
                if m.aux_loss is not None:
                    loss = loss + m.aux_loss
        return logits, loss

    # -------------------------------------------------------------------------
    # counting

    def num_params(self, active=False):
        """Parameters in the model; with active=True, those one token uses: all but the (n_experts - top_k)
        routed experts it does not go to, in every MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        cfg = self.config
        per_expert = 3 * cfg.n_embd * cfg.moe_inter_dim
        return total - cfg.n_moe_layers * (cfg.n_experts - cfg.top_k) * per_expert

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM / nanoGPT style: 6 * active matmul params plus
        the attention scores and weighted sum, 6 * n_layer * n_head * (qk_head_dim + v_head_dim) * T."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(active=True)
        if not cfg.tie_embeddings:
            n -= self.embed.weight.numel()  # a lookup, not a matmul
        return 6 * n + 6 * cfg.n_layer * cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim) * T

    def max_vio(self):
        """MaxVio of the tokens counted since the last bias update, averaged over MoE layers (without resetting)."""
        layers = self.moe_layers()
        return sum(max_vio(m.tokens_per_expert).item() for m in layers) / max(len(layers), 1)

    # -------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices (linear, expert and embedding weights) only, not on norm weights.
        The expert bias is a buffer, so neither the optimizer nor weight decay ever sees it."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @torch.no_grad()
    def update_biases(self, gamma, counts=None):
        """Aux-loss-free balancing step for every MoE layer; counts: optional (n_moe_layers, n_experts) tensor
        (e.g. all-reduced across ranks). Returns the counts used, (n_moe_layers, n_experts)."""
        layers = self.moe_layers()
        used = [m.update_bias(gamma, None if counts is None else counts[i]) for i, m in enumerate(layers)]
        return torch.stack(used) if used else torch.zeros(0)

    # -------------------------------------------------------------------------
    # DeepSeek / Hugging Face checkpoints (the code is in the last section of this file)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", **overrides):
        """Load a DeepSeek-V2 / V2-Lite / V3 folder (config.json + *.safetensors, FP8 or not) in eval mode.
        overrides: ModelConfig fields to change, e.g. block_size=4096, attn_impl="absorb"."""
        return load_pretrained(path, dtype, device, **overrides)

    def save_pretrained(self, path, max_shard_size=5 * 2**30):
        """Write config.json + safetensors that transformers' AutoModelForCausalLM loads (DeepSeek-V3 layout, or V2
        for softmax routing)."""
        save_pretrained(self, path, max_shard_size)

    # -------------------------------------------------------------------------
    # generation

    def new_cache(self, batch, max_len, device=None, dtype=None):
        p = self.embed.weight
        return LatentCache(self.config, batch, max_len, device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                        generator=None):
        """Yield (B, 1) next tokens one step at a time. With use_cache: prefill the prompt once, then feed one
        token per step against the latent cache (absorbed attention). Without: recompute the whole sequence."""
        B, T = idx.shape
        if use_cache:
            if T + max_new_tokens > self.config.block_size:
                raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                                 f"{self.config.block_size}")
            cache = self.new_cache(B, T + max_new_tokens)
            logits, _ = self(idx, cache=cache, start_pos=0)
            pos = T
            for _ in range(max_new_tokens):
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
                yield nxt
                if pos == T + max_new_tokens - 1:
                    break
                logits, _ = self(nxt, cache=cache, start_pos=pos)
                pos += 1
        else:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.block_size:])
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
                yield nxt
                idx = torch.cat([idx, nxt], dim=1)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None):
        """nanoGPT's generate: returns idx (B, T) followed by max_new_tokens sampled tokens."""
        was_training = self.training
        self.eval()  # generation never counts tokens for the bias update
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator))
        self.train(was_training)
        return torch.cat([idx] + new, dim=1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> (B, 1). temperature 0 (or top_k 1) is greedy."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# -----------------------------------------------------------------------------
# DeepSeek / Hugging Face checkpoints: Model.from_pretrained(path), model.save_pretrained(path)
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
#   - V3's multi-token-prediction layer (model.layers.{num_hidden_layers}) is skipped.

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


def hf_to_ours(name):
    """'model.layers.3.mlp.experts.5.gate_proj.weight' -> 'layers.3.ffn.experts.5.w1.weight'"""
    name = ".".join(HF_NAMES.get(p, p) for p in name.removeprefix("model.").split("."))
    return name.replace("gate.expert_bias", "expert_bias")


def ours_to_hf(name):
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


def config_from_hf(hf, **overrides):
    """transformers DeepSeek-V2/V3 config.json (a dict) -> ModelConfig. What we cannot run fails in one line."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"unsupported checkpoint: {what}")
    kind = hf.get("model_type")
    need(kind in HF_DEFAULTS, f"model_type {kind!r} (nanoseek loads deepseek_v2 and deepseek_v3)")
    c = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, moe_layer_freq=1,
             q_lora_rank=1536, **HF_DEFAULTS[kind])
    c.update({k: v for k, v in hf.items() if v is not None or k == "q_lora_rank"})  # q_lora_rank null = no compression
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
    top_k = c.get("num_experts_per_tok") or 1
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
        tie_embeddings=bool(c["tie_word_embeddings"]), norm_eps=c["rms_norm_eps"])
    args.update(overrides)
    return ModelConfig(**args)


def config_to_hf(cfg, dtype):
    """ModelConfig -> config.json for transformers: DeepseekV3 (sigmoid routing) or DeepseekV2 (softmax routing)."""
    v3 = cfg.score_func == "sigmoid"
    hf = dict(
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
        bos_token_id=None, eos_token_id=None, num_nextn_predict_layers=0, torch_dtype=str(dtype).removeprefix("torch."))
    if v3:
        hf["rope_interleave"] = True  # our layout, DeepSeek's
    if cfg.rope_factor > 1:
        hf["rope_scaling"] = dict(type="yarn", factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                                  beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, mscale=cfg.rope_mscale,
                                  mscale_all_dim=cfg.rope_mscale_all_dim)
    return hf


def _pieces(name, t, cfg):
    """A checkpoint tensor under our name -> [(our parameter, index into it, values)]; t=None: just the names."""
    m = re.fullmatch(r"(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight", name)
    if m:  # one routed expert: a row of our stacked tensor
        return [(f"{m[1]}.{m[3]}", int(m[2]), t)]
    m = re.fullmatch(r"(layers\.\d+\.ffn\.shared_experts)\.(\d+)\.(w[123])\.weight", name)
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


def load_pretrained(path, dtype=torch.float32, device="cpu", **overrides):
    """See Model.from_pretrained. Streams one tensor at a time into a model allocated once, so memory stays near one
    copy of the model (plus one tensor)."""
    from safetensors import safe_open
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf, **overrides)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            file_of = json.load(f)["weight_map"]
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        file_of = {}
        for fn in files:
            with safe_open(os.path.join(path, fn), "pt") as f:
                file_of.update({k: fn for k in f.keys()})
    # which tensors go where, checked before reading any data
    with torch.device("meta"):
        model = Model(cfg)
    loadable = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if "expert_bias" in n}
    skipped, plan, unknown = 0, {}, []
    for name in file_of:
        ours = hf_to_ours(name)
        layer = re.match(r"layers\.(\d+)\.", ours)
        if name.endswith(("_scale_inv", "rotary_emb.inv_freq")) or (cfg.tie_embeddings and ours == "head.weight"):
            continue
        if layer and int(layer[1]) >= cfg.n_layer:  # V3's multi-token-prediction module
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
    model.rope_cos, model.rope_sin = (t.to(device) for t in precompute_rope(cfg, cfg.block_size))
    for m in model.moe_layers():
        m.expert_bias.zero_()  # V2 has none
        m.tokens_per_expert.zero_()
    params = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in loadable}
    filled = {p: 0 for p in params}
    handles = {fn: safe_open(os.path.join(path, fn), "pt") for fn in set(file_of.values())}
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    rope_halves = hf.get("model_type") == "deepseek_v3" and hf.get("rope_interleave", True) is False
    with torch.no_grad():
        for name, ours in plan.items():
            t = handles[file_of[name]].get_tensor(name)
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
    if skipped:
        print(f"skipped {skipped} tensors of layers >= num_hidden_layers (multi-token prediction)")
    return model.eval()


def save_pretrained(model, path, max_shard_size=5 * 2**30):
    """See Model.save_pretrained. Shards above max_shard_size bytes, with model.safetensors.index.json."""
    from safetensors.torch import save_file
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
        m = re.fullmatch(r"(layers\.\d+\.ffn\.experts)\.(w[123])", name)
        if m:  # our stacked experts -> one tensor per expert
            tensors.update({ours_to_hf(f"{m[1]}.{j}.{m[2]}.weight"): w for j, w in enumerate(t)})
        else:
            tensors[ours_to_hf(name)] = t
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
    for fn, names in zip(files, shards):  # one shard in CPU memory at a time
        save_file({n: tensors[n].detach().cpu().contiguous() for n in names}, os.path.join(path, fn),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {n: fn for fn, names in zip(files, shards) for n in names}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, model.embed.weight.dtype), f, indent=2)
