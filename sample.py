"""
Sample from a trained nanoseek model, decoding with MLA's latent KV cache (DeepSeek-V2 section 2.1).

    python sample.py                                       # out/ckpt.pt: 3 samples of 500 tokens, one batch
    python sample.py --start="ROMEO:" --num_samples=1 --max_new_tokens=200 --temperature=0.8 --top_p=0.95
    python sample.py --start=FILE:prompt.txt --seed=7
    python sample.py --init_from=path/to/hf_folder         # a DeepSeek-V2/V3-format checkpoint folder
    python sample.py --save_pretrained=out/hf              # export out/ckpt.pt for transformers, then exit
    python sample.py --no_cache                            # recompute the whole sequence every step, to compare
    python sample.py --compile                             # GPU: compile the captured decoding step (fewer kernels)
    python sample.py --cuda_graph=False                    # GPU: decode eagerly, one launch per kernel
    python sample.py --show_routing --routing_layer=6      # the routed experts of every token in one MoE layer
    python sample.py --speculative=False                   # an MTP model: decode without drafting, to compare

This file is the command line around generate.generate_stream (generate.py): the prompt goes through the model once and
fills a preallocated cache that holds [c_kv ; k_pe] per token per layer and nothing else, then each new token
attends to it with absorbed MLA. On a GPU the decoding step runs as one CUDA graph replay. All num_samples samples
decode together, one row of the batch each. The first sample is streamed to stdout as it is generated, the others
follow when the batch is done; the counts, tokens/s and cache bytes (next to a standard multi-head attention cache
of the same model) go to stderr. Weights run in --dtype (bf16 on a GPU); the router, the expert biases and the
RoPE tables stay fp32. The decode benchmark (latent cache vs MHA cache vs none) is `python bench.py --sections=decode`.
"""
import os
import sys
import time
from collections import Counter

from errors import quiet_exits

quiet_exits()  # before the slow imports: a Ctrl-C during them, | head or > /dev/full is one line or none
import torch

import hf
from data import load_tokenizer
from errors import error_text, fail, read_file
from configurator import a_device, at_least, between, configure, one_of, settings_of
import gpu_kernels
from generate import generate_stream, new_cache
from mla import cache_values_per_token
from model import DTYPES, Model, ModelConfig, cast_weights
from moe import recording_routes
from system import memory_problem, pick_threads

# -----------------------------------------------------------------------------
# settings: defaults, overridden by config files and --key=value (configurator.py)
init_from = "resume"  # "resume": out_dir/ckpt.pt from train.py; or a DeepSeek / Hugging Face folder (config.json +
                      # *.safetensors + a tokenizer: tokenizer.json, or prepare.py's meta.json and tokenizer file)
out_dir = "out"  # where train.py wrote ckpt.pt
start = "\n"  # the prompt; "FILE:path" reads it from a file; "" starts from <|endoftext|>
num_samples = 3  # samples, all generated together as one batch
max_new_tokens = 500  # tokens generated per sample
temperature = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy (so is anything below 1e-5)
top_k = 200  # sample among the k most likely tokens only; 0 = all
top_p = 1.0  # nucleus sampling: the smallest set of tokens with this much mass, in (0, 1]; 1.0 = off
seed = 1337  # the same seed gives the same samples
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda", "cuda:1", "mps"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or "float16"
use_kernels = True  # gpu_kernels.py's Triton paths where they apply; False: plain PyTorch (overrides the checkpoint)
cuda_graph = True  # on CUDA with use_kernels: capture the decoding step once in a CUDA graph and replay it
compile = False  # with the CUDA graph: torch.compile the decoding step first (fewer kernels; ~20 s to compile)
no_cache = False  # recompute the whole sequence every step instead of decoding against the latent cache
show_routing = False  # print the routed experts of every token of the first sample in one MoE layer (eager decoding)
routing_layer = None  # the layer --show_routing shows; None = the middle MoE layer
speculative = None  # draft with the MTP module, verify with the model (exact); None = on when the model has one
threads = 0  # CPU: torch threads; 0 = OMP_NUM_THREADS if set, else one per physical core left free by other work
save_pretrained = ""  # a folder: write the loaded model there in the Hugging Face DeepSeek layout (+ tokenizer), exit
_settings = settings_of(globals())
_types = {"routing_layer": int, "speculative": bool}  # the settings whose default is None
_domains = {  # the values a setting may take, checked for config files and the command line alike
    "temperature": ("a number >= 0 (0: greedy)", lambda v: v >= 0), "top_p": ("in (0, 1] (1: off)", lambda v: 0 < v <= 1),
    "top_k": at_least(0), "num_samples": at_least(1), "max_new_tokens": at_least(1), "seed": between(0, 2**63 - 1),
    "device": a_device(), "dtype": one_of(*DTYPES), "routing_layer": at_least(0), "threads": at_least(0),
}

# -----------------------------------------------------------------------------
# loading


def load_model(init_from, out_dir, device, use_kernels=True, dtype=torch.float32):
    """-> (model in eval mode on device, encode(str) -> list[int], decode(list[int]) -> str, eot token id, the
    folder the tokenizer came from).

    "resume": out_dir/ckpt.pt from train.py and the tokenizer of the data folder it was trained on.
    A folder: hf.from_pretrained straight into dtype on device (a big checkpoint never exists in float32), and the
    folder's tokenizer (hf.load_tokenizer).
    use_kernels overrides the checkpoint's setting (False: plain PyTorch everywhere).
    """
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        if not os.path.exists(path):
            fail(f"no checkpoint in {out_dir.rstrip('/')}/: run python train.py first{hf.checkpoints_near(out_dir)}")
        try:
            ckpt, _ = hf.read_checkpoint(path)
        except ValueError as e:
            fail(f"{e}: point --out_dir at a good checkpoint, or train again")
        model = Model(ModelConfig(**{**ckpt["model_args"], "use_kernels": use_kernels}))
        model.load_state_dict(ckpt["model"])
        # the data the checkpoint recorded (absolute), whatever the current folder; its tokenizer must be the same
        tokenizer_dir = hf.checkpoint_data_dir(ckpt)
        encode, decode, eot = load_tokenizer(tokenizer_dir)
        try:
            hf.check_checkpoint_tokenizer(ckpt, tokenizer_dir)
        except ValueError as e:
            fail(e)
        return model.to(device).eval(), encode, decode, eot, tokenizer_dir
    if not os.path.isfile(os.path.join(init_from, "config.json")):
        fail(f"--init_from={init_from!r} is neither 'resume' (loads {out_dir}/ckpt.pt) nor a folder with "
             "config.json + *.safetensors")
    try:
        model = hf.from_pretrained(init_from, dtype=dtype, device=device, use_kernels=use_kernels)
    except (ValueError, OSError) as e:
        fail(f"cannot load {init_from}: {error_text(e) if isinstance(e, OSError) else e}")
    return (model, *hf.load_tokenizer(init_from), init_from)


def read_prompt(start, encode, eot, block_size):
    """The prompt's token ids, at most block_size of them (the last ones, with a warning)."""
    text = start
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:  # a plain file of at most 64 MiB: a FIFO or /dev/zero is refused, not waited on
            text = read_file(path, 64 << 20, "prompt file").decode("utf-8")
        except (OSError, ValueError) as e:
            fail(f"cannot read the prompt file {path}: {getattr(e, 'strerror', None) or e}")
    try:
        ids = encode(text) if text else []
    except ValueError as e:  # a char vocabulary meets a character it does not have
        fail(f"cannot encode the prompt: {e}; use only characters of the training text")
    if not ids:
        ids = [eot]  # an empty prompt starts a new document
    if len(ids) > block_size:
        print(f"warning: the prompt has {len(ids)} tokens, more than the model's context of {block_size}; "
              f"keeping the last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


# -----------------------------------------------------------------------------
# routing: the experts each token went to, recorded from the forward passes of the generation itself (moe.py's
# recording_routes)


def first_sample_routes(routes, batch):
    """keep(i, topk_ids, topk_weights) for moe.recording_routes that appends to routes the (ids, weights) of batch
    row 0's new positions. Pass 0 of a generation is the prompt (all its rows are new); every later pass adds one
    new position, the last row (the token fed back; with no cache or after a refill the earlier rows were routed
    before)."""
    def keep(_, ids, weights):
        ids, weights = (t.view(batch, -1, t.shape[-1])[0] for t in (ids, weights))  # (T, K) of row 0
        new = slice(None) if not routes else slice(-1, None)
        routes.append((ids[new].cpu(), weights[new].float().cpu()))
    return keep


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
    print(" pos  token           routed experts (gate weight); a | after pos marks the first generated token")
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


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------


def check_settings():
    """What the domains (configure) cannot say alone, one line each, before anything is loaded."""
    if init_from == "resume" and not out_dir:
        fail("--out_dir is empty: name the folder train.py wrote ckpt.pt into, e.g. --out_dir=out")
    if save_pretrained and os.path.exists(save_pretrained) and not os.path.isdir(save_pretrained):
        fail(f"--save_pretrained={save_pretrained} is a file: give a folder to write the checkpoint into")


def main(argv=None):
    settings = dict(_settings)
    configure(settings, sys.argv[1:] if argv is None else argv, _types, _domains)
    globals().update(settings)  # every setting, so a second main() in one process starts from the defaults again
    check_settings()
    if device == "cpu":  # as train.py picks them (README, "Threads"), once: the decoding loop is short
        n_threads, threads_why, _ = pick_threads(threads)
        torch.set_num_threads(n_threads)
    ptdtype = DTYPES[dtype]
    torch.manual_seed(seed)
    model, encode, decode, eot, tokenizer_dir = load_model(init_from, out_dir, device, use_kernels,
                                                           torch.float32 if save_pretrained else ptdtype)
    if save_pretrained:
        try:
            hf.save_pretrained(model, save_pretrained)
            hf.copy_tokenizer(tokenizer_dir, save_pretrained)
        except OSError as e:
            fail(f"cannot write {save_pretrained} ({error_text(e)}): pick a folder you can write")
        except ValueError as e:  # a model transformers cannot express
            fail(e)
        print(f"wrote {save_pretrained}: config.json, safetensors and the tokenizer; load it with python sample.py "
              f"--init_from={save_pretrained} or transformers' AutoModelForCausalLM.from_pretrained", file=sys.stderr)
        return
    cast_weights(model, ptdtype)
    cfg = model.config
    speculate = bool(cfg.mtp_depth) if speculative is None else speculative
    if speculate and not cfg.mtp_depth:
        fail("--speculative needs a model with an MTP module (train with --mtp_depth=1)")
    if speculate and (no_cache or show_routing):
        fail("--speculative decodes with the latent cache: drop --no_cache and --show_routing, or pass --speculative=False")
    graph = cuda_graph and device.startswith("cuda") and use_kernels and not no_cache and not show_routing
    if cuda_graph and device.startswith("cuda") and show_routing:
        print("note: --show_routing decodes eagerly (it records each step's routing on the host)", file=sys.stderr)
    prompt = read_prompt(start, encode, eot, cfg.block_size)
    # memory, before the cache and the batch are allocated: the latent cache (or, without one, a forward pass of
    # the whole batch), and the logits of every row
    positions = num_samples * min(len(prompt) + max_new_tokens, cfg.block_size)
    problem = memory_problem(device, {
        "weights": cfg.approx_params() * ptdtype.itemsize,
        "cache and activations": positions * (cache_values_per_token(cfg)[0] * ptdtype.itemsize +
                                              (cfg.activation_floats() * 4 if no_cache else 0)),
        "logits": num_samples * cfg.vocab_size * 4 * 4}, "ask for fewer --num_samples or --max_new_tokens")
    if problem:
        fail(problem)
    idx = torch.tensor(prompt, dtype=torch.long, device=device)[None].repeat(num_samples, 1)
    generator = torch.Generator(device).manual_seed(seed)
    routes = []  # --show_routing: (topk_ids, topk_weights) of sample 1's new positions, per forward pass
    if show_routing:
        moe_ids = list(range(cfg.n_dense_layers, cfg.n_layer))
        layer_id = moe_ids[len(moe_ids) // 2] if routing_layer is None else routing_layer
        if layer_id not in moe_ids:
            fail(f"--routing_layer={routing_layer} is not an MoE layer: pick one of {moe_ids[0]}..{moe_ids[-1]}"
                 if moe_ids else "this model has no MoE layer")

    print(" ".join(f"{k}={v!r}" for k, v in settings.items()), file=sys.stderr)  # all checked: what runs
    # the two switches say what may run; what does depends on the device (both are for CUDA)
    kernels_on = use_kernels and gpu_kernels.usable(idx)
    effect = "Triton kernels" if kernels_on else "PyTorch paths (" + (
        "use_kernels=False)" if not use_kernels else "the kernels need CUDA and Triton)")
    decoding = "CUDA graph" if graph else "eager decoding" + (
        " (the CUDA graph needs CUDA, use_kernels and the cache)" if cuda_graph and not show_routing else "")
    print(f"in effect: {effect}, {decoding}" + (f"; threads: {n_threads} ({threads_why}; --threads=N or "
          "OMP_NUM_THREADS=N fixes it)" if device == "cpu" else ""), file=sys.stderr)

    # the first sample is streamed as it comes; text is printed only up to its last complete character
    new, first = [], list(prompt)
    shown = decode(first)
    print(shown, end="", flush=True)
    cache = None if no_cache or speculate else \
        new_cache(model, num_samples, min(len(prompt) + max_new_tokens, cfg.block_size))
    if speculate and speculative is None and len(prompt) + max_new_tokens + 1 > cfg.block_size:
        print(f"note: decoding without speculation: it keeps the whole context, and prompt ({len(prompt)}) + "
              f"max_new_tokens ({max_new_tokens}) + 1 exceeds block_size {cfg.block_size}", file=sys.stderr)
        speculate = False
        cache = new_cache(model, num_samples, min(len(prompt) + max_new_tokens, cfg.block_size))
    if speculate and len(prompt) + max_new_tokens + 1 > cfg.block_size:
        fail(f"--speculative keeps the whole context: prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + 1 "
             f"must fit block_size {cfg.block_size}; ask for fewer tokens or pass --speculative=False")
    stats = {}
    sync(device)
    t0 = t_first = time.perf_counter()
    steps = generate_stream(model, idx, max_new_tokens, temperature, top_k or None, top_p, generator,
                            use_cache=not no_cache, cuda_graph=graph, compile=compile and graph, cache=cache,
                            speculative=speculate, stats=stats)
    shown_layer = [model.layers[layer_id].ffn] if show_routing else []
    slowest, t_last = (0.0, 0), t0  # the longest wait for a token after the first (a refill, a kernel compiled late)
    with recording_routes(shown_layer, first_sample_routes(routes, num_samples)):
        for nxt in steps:
            if not new:
                sync(device)
                t_first = time.perf_counter()
            new.append(nxt)
            first.append(int(nxt[0, 0]))  # the one sync per step that streaming needs
            now = time.perf_counter()
            if len(new) > 1:
                slowest = max(slowest, (now - t_last, len(new)))
            t_last = now
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

    if show_routing:
        ids, weights = (torch.cat(t) for t in zip(*routes))  # (positions, K) each
        print_routing(layer_id, model.layers[layer_id].ffn, out[0][:len(ids)], ids, weights, decode, len(prompt))

    n_new = len(new) * num_samples
    decode_rate = num_samples * (len(new) - 1) / max(seconds - (t_first - t0), 1e-9) if len(new) > 1 else 0.0
    print(f"prompt {len(prompt)} tokens x {num_samples} samples, generated {len(new)} x {num_samples} = {n_new} tokens "
          f"in {seconds:.2f} s: {n_new / seconds:,.1f} tokens/s ({decode_rate:,.1f} tokens/s after the first, "
          f"which took {1000 * (t_first - t0):.0f} ms"
          f"{f'; the slowest after it, token {slowest[1]}, {1000 * slowest[0]:.1f} ms' if len(new) > 1 else ''})"
          f"{', no cache' if no_cache else ''}"
          f"{', CUDA graph' if graph else ''}{' of the compiled step' if graph and compile else ''}", file=sys.stderr)
    if speculate:
        print(f"speculative decoding with the MTP module: {stats['accepted']:,} of {stats['drafts']:,} drafts accepted "
              f"({stats['accepted'] / max(stats['drafts'], 1):.1%}); --speculative=False decodes plainly, to compare",
              file=sys.stderr)
    mla, mha = cache_values_per_token(cfg)
    elt = ptdtype.itemsize
    positions = num_samples * min(len(prompt) + max_new_tokens, cfg.block_size)
    mha_bytes = mha * positions * elt
    if no_cache:
        print(f"cache: none (recomputed every step); the latent cache would be {mla * positions * elt:,} bytes, "
              f"a standard multi-head attention cache {mha_bytes:,} bytes", file=sys.stderr)
    elif cache is not None:
        print(f"cache: {cache.nbytes():,} bytes of latents [c_kv ; k_pe] ({mla} values per token over "
              f"{cfg.n_layer} layers, {dtype}); a standard multi-head attention cache of the same model "
              f"({cfg.n_layer} layers x 2 x {cfg.n_head} heads x {cfg.v_head_dim}) would need {mha_bytes:,} bytes, "
              f"{mha_bytes / cache.nbytes():.1f}x as much", file=sys.stderr)
    return out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted")
