"""
Sample from a trained nanoseek model, decoding with MLA's latent KV cache (DeepSeek-V2 section 2.1).

    python sample.py                                       # out/ckpt.pt: 3 samples of 500 tokens, one batch
    python sample.py --start="ROMEO:" --num_samples=1 --max_new_tokens=200 --temperature=0.8 --top_p=0.95
    python sample.py --start=FILE:prompt.txt --seed=7
    python sample.py --init_from=path/to/hf_folder         # a DeepSeek-V2/V3-format checkpoint folder
    python sample.py --save_pretrained=out/hf              # export out/ckpt.pt for transformers, then exit
    python sample.py --no_cache                            # recompute the whole sequence every step, to compare
    python sample.py --show_routing --routing_layer=6      # the routed experts of every token in one MoE layer
    python sample.py --bench                               # tokens/s: latent cache vs MHA cache vs none (GPU)

Decoding: the prompt goes through the model once (naive MLA: K and V materialized from the latents, one SDPA)
and fills a preallocated cache that holds [c_kv ; k_pe] per token per layer and nothing else; then each new token
attends to it with absorbed MLA (W_uk folded into the query, W_uv applied after the weighted sum of latents).
All num_samples samples decode together, one row of the batch each, in one cache: the cache is
kv_lora_rank + qk_rope_head_dim values per token per layer, so a batch fits where a multi-head cache would not.
The first sample is streamed to stdout as it is generated, the others follow when the batch is done; the counts,
tokens/s and cache bytes (next to a standard multi-head attention cache of the same model) go to stderr.
When the cache is full (block_size), the last half of the context is prefilled again and decoding goes on.
Weights run in --dtype (bf16 on a GPU: half the bytes per decoded token); the router, the expert biases and the
RoPE tables stay fp32. --bench times the latent cache against a per-head K/V cache of the same model and no cache.
"""
import json
import os
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

from configurator import configure
from mla import apply_rope, cache_values_per_token
from model import Model, ModelConfig, sample_next

# -----------------------------------------------------------------------------
# settings: defaults, overridden by config files and --key=value (configurator.py)
init_from = "resume"  # "resume": out_dir/ckpt.pt from train.py; or a DeepSeek / Hugging Face folder (config.json +
                      # *.safetensors + a tokenizer: tokenizer.json, or prepare.py's meta.json and tokenizer file)
out_dir = "out"  # where train.py wrote ckpt.pt
start = "\n"  # the prompt; "FILE:path" reads it from a file; "" starts from <|endoftext|>
num_samples = 3  # samples, all generated together as one batch
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
top_k = 200  # sample among the k most likely tokens only; None or 0 = all
top_p = 1.0  # nucleus sampling: the smallest set of tokens with this much mass; 1.0 = off
seed = 1337  # the same seed gives the same samples
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda", "cuda:1", "mps"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or "float16"
compile = False  # torch.compile the model's forward (prefill and the decode step)
use_kernels = True  # kernels.py's Triton paths where they apply; False: plain PyTorch (overrides the checkpoint)
no_cache = False  # recompute the whole sequence every step instead of decoding against the latent cache
show_routing = False  # print the routed experts of every token of the first sample in one MoE layer
routing_layer = None  # the layer --show_routing shows; None = the middle MoE layer
save_pretrained = ""  # a folder: write the loaded model there in the Hugging Face DeepSeek layout (+ tokenizer), exit
bench = False  # time latent cache vs MHA cache vs no cache on the random-weight "small" config; prints a table
_settings = {k: v for k, v in globals().items()
             if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}

# -----------------------------------------------------------------------------
# loading


def load_model(init_from, out_dir, device, use_kernels=True, dtype=torch.float32):
    """-> (model in eval mode on device, encode(str) -> list[int], decode(list[int]) -> str, eot token id).

    "resume": out_dir/ckpt.pt from train.py and the tokenizer of the data folder it was trained on.
    A folder: Model.from_pretrained straight into dtype on device (a big checkpoint never exists in float32), and the
    folder's tokenizer (see load_folder_tokenizer).
    use_kernels overrides the checkpoint's setting (False: plain PyTorch everywhere).
    """
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.exists(path):
            raise SystemExit(f"no checkpoint in {out_dir.rstrip('/')}/: run python train.py first")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = Model(ModelConfig(**{**ckpt["model_args"], "use_kernels": use_kernels}))
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # saved from a compiled model
        model.load_state_dict(state)
        from prepare import load_tokenizer
        dataset, data_root = ckpt["config"]["dataset"], ckpt["config"].get("data_root", "data")
        data_dir = dataset if "/" in dataset or os.sep in dataset else os.path.join(data_root, dataset)  # as load_data
        encode, decode, eot = load_tokenizer(data_dir)
        return model.to(device).eval(), encode, decode, eot
    if not os.path.isfile(os.path.join(init_from, "config.json")):
        raise SystemExit(f"--init_from={init_from!r} is neither 'resume' (loads {out_dir}/ckpt.pt) nor a folder with "
                         "config.json + *.safetensors")
    try:
        model = Model.from_pretrained(init_from, dtype=dtype, device=device, use_kernels=use_kernels)
    except (ValueError, OSError) as e:
        raise SystemExit(f"cannot load {init_from}: {e}")
    return (model, *load_folder_tokenizer(init_from))


def load_folder_tokenizer(path):
    """A checkpoint folder's tokenizer: prepare.py's (meta.json + its file, as --save_pretrained writes them), or a
    Hugging Face tokenizer.json read by transformers (local files only)."""
    if os.path.exists(os.path.join(path, "meta.json")):
        from prepare import load_tokenizer
        return load_tokenizer(path)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eot = tok.eos_token_id if tok.eos_token_id is not None else 0
        # encode adds what the tokenizer's template adds (DeepSeek: BOS); decode leaves such special tokens out
        return tok.encode, (lambda ids: tok.decode(ids, skip_special_tokens=True)), eot
    raise SystemExit(f"no tokenizer in {path}: it needs tokenizer.json, or meta.json + the tokenizer file that "
                     "python prepare.py writes")


def export(model, init_from, out_dir, path):
    """--save_pretrained: the model in the transformers DeepSeek layout, and the tokenizer files next to it."""
    import shutil
    model.save_pretrained(path)
    if init_from == "resume":
        cfg = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)["config"]
        dataset, data_root = cfg["dataset"], cfg.get("data_root", "data")
        src = dataset if "/" in dataset or os.sep in dataset else os.path.join(data_root, dataset)
    else:
        src = init_from
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "meta.json"]
    if os.path.exists(os.path.join(src, "meta.json")):
        with open(os.path.join(src, "meta.json")) as f:
            names.append(json.load(f)["tokenizer"]["file"])  # prepare.py's tokenizer file
    for name in names:
        if os.path.exists(os.path.join(src, name)) and os.path.abspath(src) != os.path.abspath(path):
            shutil.copy(os.path.join(src, name), path)
    print(f"wrote {path}: config.json, safetensors and the tokenizer; load it with "
          f"python sample.py --init_from={path} or transformers' AutoModelForCausalLM.from_pretrained", file=sys.stderr)


def cast_weights(model, dtype):
    """Parameters to dtype for inference (no per-step casts, half the bytes read per token in bf16). The router,
    the expert biases and the RoPE tables stay float32: routing compares s + b at full precision, as in training."""
    router = {id(m.gate.weight) for m in model.moe_layers()}  # fp32 as well, as Model.from_pretrained keeps it
    for p in model.parameters():
        if id(p) not in router:
            p.data = p.data.to(dtype)
    return model


def read_prompt(start, encode, eot, block_size):
    """The prompt's token ids, at most block_size of them (the last ones, with a warning)."""
    text = start
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"cannot read the prompt file {path}: {getattr(e, 'strerror', None) or e}")
    ids = encode(text) if text else []
    if not ids:
        ids = [eot]  # an empty prompt starts a new document
    if len(ids) > block_size:
        print(f"warning: the prompt has {len(ids)} tokens, more than the model's context of {block_size}; "
              f"keeping the last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


# -----------------------------------------------------------------------------
# the baseline cache: the same model with a standard multi-head attention cache (--bench and the tests)


class MHACache:
    """Per-head keys and values of every layer, materialized once per token, as a model without MLA caches them.
    k: (n_layer, B, max_len, n_head, qk_head_dim), v: (n_layer, B, max_len, n_head, v_head_dim)."""

    def __init__(self, cfg, batch, max_len, device=None, dtype=torch.float32):
        self.k = torch.zeros(cfg.n_layer, batch, max_len, cfg.n_head, cfg.qk_head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(cfg.n_layer, batch, max_len, cfg.n_head, cfg.v_head_dim, device=device, dtype=dtype)

    def nbytes(self):
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


def mha_attention(attn, x, cos, sin, k_cache, v_cache, start_pos):
    """What MLA computes, the pre-MLA way: the new tokens' per-head K and V are built from their latents and
    appended to a K/V cache, then ordinary attention over it. Same function as MLA.forward, bigger cache."""
    B, T, _ = x.shape
    H, C, R, D = attn.n_head, attn.kv_lora_rank, attn.qk_rope_head_dim, attn.qk_nope_head_dim
    assert T == 1 or start_pos == 0, "several new tokens only at the start (prefill)"
    q = attn.wq(x) if attn.q_lora_rank == 0 else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q_nope, q_pe = q.view(B, T, H, attn.qk_head_dim).split([D, R], dim=-1)
    q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)  # (B, T, H, qk_head_dim)
    c_kv, k_pe = attn.wkv_a(x).split([C, R], dim=-1)
    k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).expand(B, T, H, R)  # the shared RoPE key, copied per head
    k_nope, v = attn.wkv_b(attn.kv_norm(c_kv)).view(B, T, H, D + attn.v_head_dim).split([D, attn.v_head_dim], dim=-1)
    end = start_pos + T
    k_cache[:B, start_pos:end] = torch.cat([k_nope, k_pe], dim=-1)
    v_cache[:B, start_pos:end] = v
    k, v = k_cache[:B, :end].transpose(1, 2), v_cache[:B, :end].transpose(1, 2)  # (B, H, S, dim)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=T > 1, scale=attn.softmax_scale)
    return out.transpose(1, 2).flatten(2)  # (B, T, H * v_head_dim)


def mha_forward(model, idx, cache, start_pos):
    """Model.forward with an MHACache in place of the latent cache; returns logits (B, T, vocab)."""
    T = idx.shape[1]
    cos, sin = model.rope_cos[start_pos:start_pos + T], model.rope_sin[start_pos:start_pos + T]
    x = model.embed(idx)
    for i, layer in enumerate(model.layers):
        x = x + layer.attn.wo(mha_attention(layer.attn, layer.attn_norm(x), cos, sin, cache.k[i], cache.v[i], start_pos))
        x = x + layer.ffn(layer.ffn_norm(x))
    return model.head(model.norm(x))


# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, cache="latent", generator=None,
             forward=None, info=None):
    """Yield the next (B, 1) tokens one step at a time, for the batch of prompts idx (B, T).

    cache="latent": prefill the prompts once into a LatentCache ([c_kv ; k_pe] per token per layer, nothing else),
                    then feed one token per step; MLA attends to the cache absorbed (attn_impl "auto").
    cache="mha":    the same, with a standard per-head K/V cache (MHACache): the baseline.
    cache="none":   recompute the whole sequence (its last block_size tokens) every step, as nanoGPT does.
    A full cache (block_size) is refilled with the last half of the context at positions 0.. and decoding goes on.
    forward: a compiled model to call instead of model; info: a dict that receives the cache and its nbytes.
    """
    forward = forward or model
    B, T = idx.shape
    block_size = model.config.block_size
    seq = idx
    if cache == "none":
        for _ in range(max_new_tokens):
            nxt = sample_next(forward(seq[:, -block_size:])[0][:, -1], temperature, top_k, top_p, generator)
            yield nxt
            seq = torch.cat([seq, nxt], dim=1)
        return
    max_len = min(T + max_new_tokens, block_size)
    p = model.embed.weight
    # each step returns the last position's logits (B, vocab) as a copy, so the prefill's (B, T, vocab) is freed
    if cache == "latent":
        kv = model.new_cache(B, max_len)  # in the weights' dtype

        def step(tokens, pos):
            return forward(tokens, cache=kv, start_pos=pos)[0][:, -1].clone()
    elif cache == "mha":
        kv = MHACache(model.config, B, max_len, p.device, p.dtype)

        def step(tokens, pos):
            return mha_forward(model, tokens, kv, pos)[:, -1].clone()
    else:
        raise ValueError(f"cache must be latent, mha or none, got {cache!r}")
    if info is not None:
        info.update(cache=kv, cache_bytes=kv.nbytes(), cache_len=max_len)
    logits, pos = step(seq, 0), T  # prefill
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if i == max_new_tokens - 1:
            break
        seq = torch.cat([seq, nxt], dim=1)
        if pos == max_len:  # cache full: keep the last half of the context, at positions 0.. (RoPE is absolute)
            keep = max(block_size // 2, 1)
            logits, pos = step(seq[:, -keep:], 0), keep
        else:
            logits, pos = step(nxt, pos), pos + 1


# -----------------------------------------------------------------------------
# routing: the experts each token went to, recorded from the forward passes of the generation itself


class RoutingRecorder:
    """Wraps one MoE layer's route() so the decisions the forward pass acts on are kept, for batch row 0.

    Call 0 of a generation is the prompt (all its rows are new); every later call adds exactly one new position,
    the last row (the token fed back; with no cache or after a refill the earlier rows were routed before)."""

    def __init__(self, moe, batch):
        self.moe, self.ids, self.weights = moe, [], []
        route = moe.route

        def recording_route(x):
            topk_ids, topk_weights, scores = route(x)
            ids = topk_ids.view(batch, -1, topk_ids.shape[-1])[0]  # (T, K) of row 0
            weights = topk_weights.view(batch, -1, topk_ids.shape[-1])[0]
            new = slice(None) if not self.ids else slice(-1, None)
            self.ids.append(ids[new].cpu())
            self.weights.append(weights[new].float().cpu())
            return topk_ids, topk_weights, scores
        moe.route = recording_route  # an instance attribute shadows the method

    def close(self):
        del self.moe.route
        return torch.cat(self.ids), torch.cat(self.weights)  # (positions, K) each


def token_kind(text):
    s = text.strip()
    if not s:
        return "space"
    if not any(c.isalnum() for c in s):
        return "punct"
    if any(c.isdigit() for c in s):
        return "number"
    return "Capital" if s[0].isupper() else "word"


def print_routing(layer_id, moe, tokens, ids, weights, decode, n_prompt):
    """One line per token (its routed experts, best first, with gate weights), then one line per expert: how many
    tokens it served, the ones it served most, and the kind of token it is most over-represented in."""
    texts = [decode([t]) for t in tokens]
    print(f"\nrouting in layer {layer_id} (top-{moe.top_k} of {moe.n_experts} routed experts), sample 1: "
          f"{len(tokens)} tokens ({n_prompt} prompt, {len(tokens) - n_prompt} generated; the last token was never fed)")
    print(" pos  token           routed experts (gate weight)")
    for p, (text, row, w) in enumerate(zip(texts, ids.tolist(), weights.tolist())):
        mark = "|" if p == n_prompt else " "  # where generation starts
        print(f"{p:4d}{mark} {repr(text):15.15s} " + "  ".join(f"{e:3d} ({g:.2f})" for e, g in zip(row, w)))
    kinds = [token_kind(t) for t in texts]
    base = Counter(kinds)
    served = [Counter() for _ in range(moe.n_experts)]
    kinds_of = [Counter() for _ in range(moe.n_experts)]
    for p, row in enumerate(ids.tolist()):
        for e in row:
            served[e][texts[p]] += 1
            kinds_of[e][kinds[p]] += 1
    print(f"\nper expert (tokens of this sample: {', '.join(f'{k} {n / len(tokens):.0%}' for k, n in base.most_common())})")
    print("expert tokens  most over-represented kind   most served tokens")
    for e in sorted(range(moe.n_experts), key=lambda e: -sum(served[e].values())):
        n = sum(served[e].values())
        if n == 0:
            print(f"{e:6d} {0:6d}")
            continue
        kind = max(kinds_of[e], key=lambda k: (kinds_of[e][k] / n) / (base[k] / len(tokens)))
        share = f"{kind} {kinds_of[e][kind] / n:.0%} (vs {base[kind] / len(tokens):.0%})"
        top = "  ".join(f"{t!r} {c}" for t, c in served[e].most_common(6))
        print(f"{e:6d} {n:6d}  {share:27s} {top}")


# -----------------------------------------------------------------------------
# benchmark: the latent cache against a standard MHA cache and no cache, same model, same weights


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_bench(cfg, cases, device, dtype, seed=1337, repeats=2):
    """Decode tokens/s, memory and cache bytes of one random-weight model for each case (batch, prompt length, new
    tokens, new tokens without a cache) and each cache kind, greedy. Returns the rows; prints a markdown table."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cast_weights(Model(cfg), dtype).eval()
    on_cuda = str(device).startswith("cuda")
    rows = []
    for batch, prompt_len, new, new_no_cache in cases:
        idx = torch.randint(cfg.vocab_size, (batch, prompt_len), device=device)
        for kind in ("latent", "mha", "none"):
            n = new if kind != "none" else new_no_cache
            list(generate(model, idx, 2, temperature=0, cache=kind))  # warm-up
            runs = []
            for _ in range(repeats):
                info = {}
                if on_cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                steps = generate(model, idx, n, temperature=0, cache=kind, info=info)
                out = [next(steps)]  # the prefill (without a cache: the first full forward)
                sync(device)
                t1 = time.perf_counter()
                prefill_peak = torch.cuda.max_memory_allocated(device) if on_cuda else 0
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                out += list(steps)  # n - 1 decode steps; no sync inside but the MoE's own
                sync(device)
                t2 = time.perf_counter()
                decode_peak = torch.cuda.max_memory_allocated(device) if on_cuda else 0
                runs.append((batch * (n - 1) / (t2 - t1), 1000 * (t2 - t1) / (n - 1), 1000 * (t1 - t0),
                             decode_peak / 2**30, prefill_peak / 2**30))
            best = max(runs)
            cache_bytes = info.get("cache_bytes", 0)
            rows.append(dict(batch=batch, prompt=prompt_len, new=n, cache=kind, rates=[r[0] for r in runs],
                             ms_per_step=best[1], prefill_ms=best[2], decode_peak_gib=best[3], prefill_peak_gib=best[4],
                             bytes_per_token=cache_bytes // (batch * info["cache_len"]) if cache_bytes else 0,
                             cache_mib=cache_bytes / 2**20))
            print(f"batch {batch} prompt {prompt_len} new {n} {kind}: " + " / ".join(f"{r[0]:,.0f}" for r in runs)
                  + " tok/s", file=sys.stderr)
    name = torch.cuda.get_device_name(device) if on_cuda else "CPU"
    print(f"\n{name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')} weights, "
          f"use_kernels={cfg.use_kernels}, random weights: n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, "
          f"n_head {cfg.n_head}, kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim {cfg.qk_rope_head_dim}, "
          f"{cfg.n_experts} experts top-{cfg.top_k} + {cfg.n_shared} shared, block_size {cfg.block_size}. Greedy; "
          f"decode tok/s = batch x (new - 1) / time after the first token, {repeats} runs; the other columns from the "
          f"faster run; peak = max_memory_allocated during decode / during prefill")
    print("\n| batch | prompt + new | cache | cache bytes/token | cache MiB | decode tok/s (runs) | ms/step | prefill ms "
          "| peak GiB decode / prefill |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['prompt']} + {r['new']} | {r['cache']} | {r['bytes_per_token']:,} | "
              f"{r['cache_mib']:,.1f} | " + " / ".join(f"{x:,.0f}" for x in r["rates"])
              + f" | {r['ms_per_step']:.1f} | {r['prefill_ms']:.0f} | {r['decode_peak_gib']:.2f} / {r['prefill_peak_gib']:.2f} |")
    mla, mha = cache_values_per_token(cfg)
    kv_heads = cfg.n_layer * cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim)
    elt = torch.empty(0, dtype=dtype).element_size()
    print(f"\ncache values per token over all layers: latent {mla} ({mla * elt:,} bytes); the MHA cache above, this "
          f"model's per-head K ({cfg.qk_head_dim}) and V ({cfg.v_head_dim}), {kv_heads} ({kv_heads * elt:,} bytes); "
          f"a standard MHA of {cfg.n_head} heads x {cfg.v_head_dim}, {mha} ({mha * elt:,} bytes)")
    return rows


# -----------------------------------------------------------------------------


def main(argv=None):
    settings = configure(dict(_settings), sys.argv[1:] if argv is None else argv)
    globals().update(settings)  # every setting, so a second main() in one process starts from the defaults again
    print(" ".join(f"{k}={v!r}" for k, v in settings.items()), file=sys.stderr)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={device} but no CUDA GPU is visible: pass --device=cpu")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if ptdtype is None:
        raise SystemExit(f"--dtype={dtype} is not one of float32, bfloat16, float16")
    torch.manual_seed(seed)
    if bench:  # the GPU "small" config (ModelConfig's defaults) at random weights
        cases = [(1, 64, 128, 128), (1, 960, 64, 64), (128, 960, 64, 8)]
        return run_bench(ModelConfig(use_kernels=use_kernels), cases, device, ptdtype, seed)

    model, encode, decode, eot = load_model(init_from, out_dir, device, use_kernels,
                                            torch.float32 if save_pretrained else ptdtype)
    if save_pretrained:
        return export(model, init_from, out_dir, save_pretrained)
    cast_weights(model, ptdtype)
    cfg = model.config
    if compile and show_routing:
        print("note: --show_routing runs uncompiled (it wraps a layer's route())", file=sys.stderr)
    forward = torch.compile(model, dynamic=True) if compile and not show_routing else model
    prompt = read_prompt(start, encode, eot, cfg.block_size)
    idx = torch.tensor(prompt, dtype=torch.long, device=device)[None].repeat(num_samples, 1)
    generator = torch.Generator(device).manual_seed(seed)
    recorder = None
    if show_routing:
        moe_ids = list(range(cfg.n_dense_layers, cfg.n_layer))
        layer_id = moe_ids[len(moe_ids) // 2] if routing_layer is None else routing_layer
        if layer_id not in moe_ids:
            raise SystemExit(f"--routing_layer={routing_layer} is not an MoE layer: pick one of "
                             f"{moe_ids[0]}..{moe_ids[-1]}" if moe_ids else "this model has no MoE layer")
        recorder = RoutingRecorder(model.layers[layer_id].ffn, num_samples)

    # the first sample is streamed as it comes; text is printed only up to its last complete character
    info, new, first = {}, [], list(prompt)
    shown = decode(first)
    print(shown, end="", flush=True)
    sync(device)
    t0 = t_first = time.perf_counter()
    steps = generate(model, idx, max_new_tokens, temperature, top_k or None, top_p, "none" if no_cache else "latent",
                     generator, forward, info)
    for nxt in steps:
        if not new:
            sync(device)
            t_first = time.perf_counter()
        new.append(nxt)
        first.append(int(nxt[0, 0]))  # the one sync per step that streaming needs
        text = decode(first)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its next token
            print(text[len(shown):], end="", flush=True)
            shown = text
    sync(device)
    seconds = time.perf_counter() - t0
    out = torch.cat([idx] + new, dim=1).tolist()
    print(decode(out[0])[len(shown):])
    for row in out[1:]:
        print("---------------")
        print(decode(row))
    print("---------------")

    if recorder is not None:
        ids, weights = recorder.close()
        print_routing(layer_id, model.layers[layer_id].ffn, out[0][:len(ids)], ids, weights, decode, len(prompt))

    n_new = len(new) * num_samples
    decode_rate = num_samples * (len(new) - 1) / max(seconds - (t_first - t0), 1e-9) if len(new) > 1 else 0.0
    print(f"prompt {len(prompt)} tokens x {num_samples} samples, generated {len(new)} x {num_samples} = {n_new} tokens "
          f"in {seconds:.2f} s: {n_new / seconds:,.1f} tokens/s ({decode_rate:,.1f} tokens/s after the first, "
          f"which took {1000 * (t_first - t0):.0f} ms){', no cache' if no_cache else ''}", file=sys.stderr)
    mla, mha = cache_values_per_token(cfg)
    elt = ptdtype.itemsize
    positions = num_samples * min(len(prompt) + max_new_tokens, cfg.block_size)
    mha_bytes = mha * positions * elt
    if no_cache:
        print(f"cache: none (recomputed every step); the latent cache would be {mla * positions * elt:,} bytes, "
              f"a standard multi-head attention cache {mha_bytes:,} bytes", file=sys.stderr)
    else:
        print(f"cache: {info['cache_bytes']:,} bytes of latents [c_kv ; k_pe] ({mla} values per token over "
              f"{cfg.n_layer} layers, {dtype}); a standard multi-head attention cache of the same model "
              f"({cfg.n_layer} layers x 2 x {cfg.n_head} heads x {cfg.v_head_dim}) would need {mha_bytes:,} bytes, "
              f"{mha_bytes / info['cache_bytes']:.1f}x as much", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
