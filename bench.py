"""
Benchmarks: speed, measured side by side in one run. gpu_kernels.py's Triton paths against the PyTorch code they
replace, decoding with the latent cache against a multi-head attention cache, the MoE training step against its
dense baseline, checkpoint loading, CPU training on a busy machine. Prints markdown tables (the GPU's name first)
and writes every number to json_path. Every section but load and threads needs a CUDA GPU. The training studies,
which measure loss rather than speed (load balancing, multi-token prediction, the DeepSeekMoE claims), are study.py.

    python bench.py                                  # moe, mla, decode, train at the default sizes
    python bench.py --sections=decode                # tokens/s: latent cache vs MHA cache vs none, graph vs eager
    python bench.py --sections=moe,mla --moe_tokens="(16384,)"
    python bench.py --sections=load                  # from_pretrained time and memory (CPU is fine)
    python bench.py --sections=threads               # CPU training tokens/s on a busy machine: our threads vs torch's
    python bench.py --sections=train,profile --compile=True   # the MoE training step vs dense, and its kernels
    python bench.py --sections=train --compile=True --train_config=config/study_gpu.py --train_vocab=8192 \
        --train_batch=64 --train_seq=512            # the same at the claims study's size
    python bench.py --sections=train,profile --compile=True --train_vocab=2048 --train_batch=32
                                                     # the step train.py config/train_small.py takes on data/shakespeare
    python bench.py --sections=tune                  # time tile variants of the Triton kernels on this GPU

Sections:
  moe    the "small" config's routed experts (64 experts, top-6, 768 -> 384 SwiGLU) at several token counts,
         forward and forward + backward: gpu_kernels.fused_moe (with the working copies a training forward hands
         it: W13, W1's and W3's rows interleaved, one dot in the up projection) vs moe.experts_reference
         (per-expert loop) vs torch._grouped_mm (its permutation timed too) vs a dense SwiGLU of the same active
         FLOPs (hidden 6 * 384); with moe_layouts, other (experts, top_k, width) layouts against their dense SwiGLU, as CUDA-graph replays
  mla    one decoding step (one query token) against a long latent cache: gpu_kernels.mla_decode vs
         mla.latent_attention (the PyTorch absorbed path) vs the naive path (K and V materialized, SDPA), as ms and
         GB/s of cache read against the GPU's peak bandwidth (and a measured device copy)
  decode the small config at random bf16 weights through generate.generate_stream (greedy): decode tokens/s, ms
         and kernels per step, prefill ms, cache MiB and peak memory for the latent cache, a standard per-head K/V
         cache of the same model (mla.MHACache: same function, bigger cache) and no cache, each with and without
         the CUDA graph; the bandwidth a batch-1 step reaches; latent vs MHA at decode_long; and the largest batch
         that decodes at decode_context in decode_budget_gib GiB, for each cache, with its tokens/s
  decode_profile  the torch profiler over replays of the compiled, captured batch-1 decoding step: kernels per
         step, GPU busy time and the kernels that take it
  train  a whole training step (forward, backward, clip, AdamW, bias update) of train_config's MoE model (the
         small config) vs its dense twin of equal active FLOPs (every FFN a SwiGLU of hidden 3072), as tokens/s
         and MFU; --train_config=config/study_gpu.py --train_vocab=8192 --train_batch=64 --train_seq=512 times
         the claims study's DeepSeekMoE arm against its dense arm
  load     hf.from_pretrained of a DeepSeek-V2-Lite-shaped checkpoint cut to load_layers layers (bf16, written
           by save_pretrained into load_dir first): seconds, and peak anonymous memory next to the model's bytes
           (Linux; runs without a GPU)
  threads  train.py on the CPU (data/shakespeare from prepare.py) while threads_busy other processes spin: tokens/s
           at the thread count train.py picks against torch's default of one per core (runs without a GPU)
  tune     per-kernel search over candidate gpu_kernels.MOE_TILES entries (train_config's experts, train_batch x
           train_seq tokens) and MLA_TILES entries; prints the fastest
  profile  the top GPU kernels of fused_moe and of a training step of each model (torch profiler; run it last or
           alone: the profiler slows later launches in the same process), the fused_moe kernels with their
           TFLOP/s, then the two steps' kernels by family (KERNEL_GROUPS) side by side
decode_profile, load, threads, tune and profile are not in the default `sections`. Timing: warm-up calls, then CUDA
events around each repeat (or around CUDA-graph replays where a column says so), the median reported.
"""
import dataclasses
import functools
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

import hf
import gpu_kernels
from configurator import configure, read_config_file, settings_of
from generate import CapturedStep, decode_step, generate_stream, new_cache
from logs import read_log, run_sections, table
from mla import MLA, MHACache, cache_values_per_token, latent_attention
from model import DTYPES, Model, ModelConfig, cast_weights, clipped_step
from moe import experts_reference
from system import machine_name, peak_bandwidth, peak_flops

# -----------------------------------------------------------------------------
# settings (configurator.py: --key=value)
sections = "moe,mla,decode,train"  # comma-separated: moe, mla, decode, decode_profile, train, load, threads, tune,
                                  # profile
json_path = "out/bench.json"     # every measured number
moe_tokens = (8192, 16384, 65536)  # tokens through one MoE layer (batch x sequence)
moe_layouts = ()                 # more (experts, top_k, expert width) for the moe section: fused_moe vs a dense
                                 # SwiGLU of the same FLOPs, at each moe_tokens, e.g. "((16, 2, 1536),)"
mla_shapes = ((64, 4096, 12, 256, 32), (128, 8192, 12, 256, 32), (64, 8192, 16, 512, 64))  # (batch, context,
                                 # heads, kv_lora_rank, qk_rope_head_dim): the small config, then V2-Lite's layout
train_config = "config/train_small.py"  # the train and profile sections' MoE model; its dense twin is the same
                                 # config with every block dense (n_dense_layers = n_layer), dense_inter_dim wide
train_vocab = 50304              # the models' vocabulary (GPT-2's; config/study_gpu.py's data/claims has 8192)
train_batch = 16                 # sequences per micro-batch
train_accum = 1                  # micro-batches per optimizer step (train.py's gradient_accumulation_steps)
train_seq = 1024                 # tokens per sequence (the small config's block_size)
train_moments = ""               # AdamW's moments, "float32" or "bfloat16"; "": train_config's moments_dtype
train_steps = 10                 # timed steps (after train_warmup)
train_warmup = 3
compile = False                  # torch.compile the models of the train section
profile_rows = 25                # profile: how many of each training step's kernels to list (the families sum them all)
decode_cases = ((1, 64, 128), (128, 960, 64))  # (batch, prompt, new tokens) through generate.generate_stream
decode_long = (64, 4096)         # (batch, context): latent vs MHA cache at a long context
decode_context = 8192            # the context of the largest-batch comparison
decode_budget_gib = 40           # ... in this much GPU memory
load_dir = "out/v2lite_cut"      # the load section's checkpoint (made once, ~2 GB per layer)
load_layers = 8                  # DeepSeek-V2-Lite has 27
threads_iters = 60               # threads: train.py iterations per run (the CPU default model on data/shakespeare)
threads_busy = ""                # threads: other processes kept busy, comma-separated; "" = 0 and half the cores
reps = 20                        # timed repeats per measurement (the per-expert loop gets fewer)
seed = 0
settings = settings_of(globals())
SMALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "train_small.py")
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
gpu = machine_name(device)
peak = peak_flops(device)
peak_bw = peak_bandwidth(device)
results = dict(gpu=gpu, torch=torch.__version__, triton=getattr(gpu_kernels.triton, "__version__", None), peak_flops=peak,
               peak_bw=peak_bw)
copy_bw = float("nan")  # measured in main()


def small_config(path=SMALL, vocab_size=50304, **overrides):
    """The model of config/train_small.py (the GPU "small" reference; or of the config file at path) with GPT-2's
    vocabulary (or vocab_size), and overrides."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = {k: v for k, v in read_config_file(path).items() if k in names}
    return ModelConfig(**{"vocab_size": vocab_size, **cfg, **overrides})


def train_models():
    """{label: ModelConfig}: train_config's MoE model and its dense twin, at train_seq tokens per sequence."""
    moe = small_config(train_config, train_vocab, block_size=train_seq)
    dense = dataclasses.replace(moe, n_dense_layers=moe.n_layer)
    shape = f"{moe.n_shared} shared + top-{moe.top_k} of {moe.n_experts} x {moe.moe_inter_dim}"
    return {f"MoE ({shape})": moe, f"dense twin (SwiGLU {moe.dense_inter_dim})": dense}


def timeit(fn, reps=reps, warmup=3, inner=1):
    """Median ms of fn() over reps repeats (each of `inner` back-to-back calls between two CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) / inner for s, e in events)
    return times[len(times) // 2]


def timeit_graph(fn, reps=reps, inner=10):
    """Median ms per call of fn captured `inner` times in a CUDA graph: GPU time without the launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return timeit(graph.replay, reps=reps) / inner


def copy_bandwidth():
    """Measured device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.empty(2 ** 29, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# -----------------------------------------------------------------------------
# MoE layer


def grouped_mm_experts(x, topk_ids, topk_weights, w1, w2, w3):
    """The routed experts through torch._grouped_mm (cuBLAS/CUTLASS grouped GEMMs), permutation in PyTorch."""
    K = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    token_of_pair = order // K
    offs = torch.bincount(flat, minlength=w1.shape[0]).cumsum(0).to(torch.int32)
    xs = x[token_of_pair]
    h1 = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
    h3 = torch._grouped_mm(xs, w3.transpose(-2, -1), offs=offs)
    ys = torch._grouped_mm(F.silu(h1) * h3, w2.transpose(-2, -1), offs=offs)
    ys = ys * topk_weights.flatten()[order].unsqueeze(-1).to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)


def moe_inputs(N, cfg, dtype=torch.bfloat16):
    E, K, d, I = cfg.n_experts, cfg.top_k, cfg.n_embd, cfg.moe_inter_dim
    x = torch.randn(N, d, device=device, dtype=dtype, requires_grad=True)
    scores = torch.randn(N, E, device=device).sigmoid()  # a fresh router: near-uniform load
    topk_ids = scores.topk(K, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    topk_weights = (topk_weights / topk_weights.sum(-1, keepdim=True)).requires_grad_()
    w = lambda *shape: (torch.randn(*shape, device=device) * 0.02).to(dtype).requires_grad_()
    return x, topk_ids, topk_weights, w(E, I, d), w(E, d, I), w(E, I, d), torch.randn(N, d, device=device, dtype=dtype)


def working_copies(w1, w2, w3):
    """The bf16 working copies a training forward hands fused_moe (moe.Experts): W13, W1's and W3's rows
    interleaved, and W2."""
    return gpu_kernels.w13_of(w1, w3), w2.detach().bfloat16().contiguous()


def bench_moe():
    cfg = small_config()
    E, K, d, I = cfg.n_experts, cfg.top_k, cfg.n_embd, cfg.moe_inter_dim
    print(f"\n## MoE layer: {E} experts, top-{K}, SwiGLU {d} -> {I} per expert, bf16 (forward + backward: grads of x, "
          f"gate weights and all expert weights)\n")
    rows, out = [], []
    for N in moe_tokens:
        x, ids, gates, w1, w2, w3, dy = moe_inputs(N, cfg)
        copies = working_copies(w1, w2, w3)
        wd1 = (torch.randn(K * I, d, device=device) * 0.02).bfloat16().requires_grad_()
        wd3 = (torch.randn(K * I, d, device=device) * 0.02).bfloat16().requires_grad_()
        wd2 = (torch.randn(d, K * I, device=device) * 0.02).bfloat16().requires_grad_()
        methods = {
            "triton fused_moe": (lambda: gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3, copies),
                                 [x, gates, w1, w2, w3]),
            "moe.py reference (per-expert loop)": (lambda: experts_reference(x, ids, gates, w1, w2, w3),
                                                   [x, gates, w1, w2, w3]),
        }
        if hasattr(torch, "_grouped_mm"):
            methods["torch._grouped_mm + permutation"] = (lambda: grouped_mm_experts(x, ids, gates, w1, w2, w3),
                                                          [x, gates, w1, w2, w3])
        methods[f"dense SwiGLU {d} -> {K * I} (same FLOPs)"] = (
            lambda: F.linear(F.silu(F.linear(x, wd1)) * F.linear(x, wd3), wd2), [x, wd1, wd2, wd3])
        with torch.no_grad():
            y_ref = experts_reference(x, ids, gates, w1, w2, w3).float()
        flops_fwd = 3 * 2 * N * K * d * I  # three matmuls of the (token, expert) pairs
        for name, (fwd, params) in methods.items():
            n_reps = 5 if "reference" in name else reps
            with torch.no_grad():
                y = fwd()
                diff = "" if name.startswith("dense") else f"{((y.float() - y_ref).abs().max() / y_ref.abs().max()).item():.1e}"
                ms_f = timeit(fwd, reps=n_reps)
            fb = lambda: torch.autograd.grad(fwd(), params, dy)
            ms_fb = timeit(fb, reps=n_reps)
            ms_graph = None
            if name.startswith(("triton", "dense")):  # the others sync with the host (bincount, .tolist())
                try:
                    ms_graph = timeit_graph(fb, inner=3)
                except Exception as e:
                    print(f"{name}: no CUDA-graph timing ({type(e).__name__}: {str(e)[:100]})")
            rec = dict(tokens=N, method=name, fwd_ms=ms_f, fwd_bwd_ms=ms_fb, fwd_tflops=flops_fwd / ms_f / 1e9,
                       fwd_bwd_tflops=3 * flops_fwd / ms_fb / 1e9, fwd_bwd_graph_ms=ms_graph,
                       rel_diff_vs_reference=diff)
            out.append(rec)
            rows.append([N, name, f"{ms_f:.3f}", f"{ms_fb:.3f}", f"{rec['fwd_bwd_tflops']:.0f}",
                         f"{ms_graph:.3f}" if ms_graph else "-", diff])
        del x, ids, gates, w1, w2, w3, dy, wd1, wd2, wd3, methods, y_ref
        torch.cuda.empty_cache()
    print(table(["tokens", "method", "fwd ms", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd ms, CUDA graph (GPU only)",
                 "max rel diff of y"], rows))
    if moe_layouts:
        print(f"\n## Other expert layouts: fused_moe vs a dense SwiGLU {d} -> top_k x width (same FLOPs), "
              f"forward + backward, CUDA graph\n")
    lay_rows = []
    for (E, K, I), N in itertools.product(moe_layouts, moe_tokens):
        x, ids, gates, w1, w2, w3, dy = moe_inputs(N, small_config(n_experts=E, top_k=K, moe_inter_dim=I))
        copies = working_copies(w1, w2, w3)
        wd = [(torch.randn(*shape, device=device) * 0.02).bfloat16().requires_grad_()
              for shape in ((K * I, d), (d, K * I), (K * I, d))]
        fused = lambda: torch.autograd.grad(gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3, copies),
                                            [x, gates, w1, w2, w3], dy)
        dense = lambda: torch.autograd.grad(F.linear(F.silu(F.linear(x, wd[0])) * F.linear(x, wd[2]), wd[1]),
                                            [x, *wd], dy)
        ms_fused, ms_dense = timeit_graph(fused, inner=3), timeit_graph(dense, inner=3)
        flops = 3 * 3 * 2 * N * K * d * I
        results.setdefault("moe_layouts", []).append(dict(tokens=N, experts=E, top_k=K, expert_width=I,
                                                           fused_fwd_bwd_graph_ms=ms_fused, dense_fwd_bwd_graph_ms=ms_dense))
        lay_rows.append([N, f"{E} x {I}, top-{K}", f"{ms_fused:.3f}", f"{flops / ms_fused / 1e9:.0f}",
                         f"{ms_dense:.3f}", f"{flops / ms_dense / 1e9:.0f}", f"{ms_fused / ms_dense:.2f}x"])
        del x, ids, gates, w1, w2, w3, dy, wd
    if lay_rows:
        print(table(["tokens", "experts", "fused_moe ms", "TFLOP/s", "dense ms", "TFLOP/s", "fused / dense"], lay_rows))
    for N in moe_tokens:  # the targets: >= 5x the reference, >= torch._grouped_mm with its permutation
        t = {r["method"]: r["fwd_bwd_ms"] for r in out if r["tokens"] == N}
        tri = t["triton fused_moe"]
        line = f"{N} tokens: fused_moe fwd+bwd is {t['moe.py reference (per-expert loop)'] / tri:.1f}x the reference"
        if "torch._grouped_mm + permutation" in t:
            line += f", {t['torch._grouped_mm + permutation'] / tri:.2f}x torch._grouped_mm"
        print(line)
    results["moe"] = out


# -----------------------------------------------------------------------------
# MLA decode


def bench_mla():
    print("\n## MLA decode: one query token per sequence against a latent cache, bf16, timed as CUDA-graph replays "
          "(GPU time, no launch overhead). GB/s = bytes of the cache slice read (+ q, out) / time; the naive path "
          "moves more (it materializes K and V)\n")
    rows, out = [], []
    for B, S, H, C, R in mla_shapes:
        D = 64 if C <= 256 else 128  # qk_nope_head_dim = v_head_dim: the small config's 64, V2-Lite's 128
        cfg = ModelConfig(n_head=H, kv_lora_rank=C, qk_rope_head_dim=R, qk_nope_head_dim=D, v_head_dim=D,
                          n_embd=H * D, block_size=S)
        attn = MLA(cfg).to(device, torch.bfloat16)
        cache = torch.randn(B, S + 64, C + R, device=device, dtype=torch.bfloat16)
        latents = cache[:, :S]  # the strided slice mla.py passes
        start_pos = S - 1
        q = torch.randn(B, 1, H, C + R, device=device, dtype=torch.bfloat16)
        q_nope = torch.randn(B, 1, H, D, device=device, dtype=torch.bfloat16)
        q_pe = torch.randn(B, 1, H, R, device=device, dtype=torch.bfloat16)
        scale = cfg.softmax_scale
        want = latent_attention(q, latents, start_pos, scale, C).float()
        got = gpu_kernels.mla_decode(q, latents, start_pos, scale, C).float()
        diff = ((got - want).abs().max() / want.abs().max()).item()
        nbytes = B * S * (C + R) * 2 + B * H * (2 * C + R) * 2

        def absorb(use):
            attn.use_kernels = use
            return attn._absorb(q_nope, q_pe, latents, start_pos)

        methods = {
            "triton mla_decode (attention core)": lambda: gpu_kernels.mla_decode(q, latents, start_pos, scale, C),
            "mla.latent_attention (PyTorch absorbed core)": lambda: latent_attention(q, latents, start_pos, scale, C),
            "MLA._absorb with kernel (+ W_uk, W_uv)": lambda: absorb(True),
            "MLA._absorb PyTorch (+ W_uk, W_uv)": lambda: absorb(False),
            "MLA._naive (K, V materialized + SDPA)": lambda: attn._naive(q_nope, q_pe, latents, start_pos),
        }
        with torch.no_grad():
            for name, fn in methods.items():
                ms = timeit_graph(fn)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rec = dict(batch=B, context=S, heads=H, kv_lora_rank=C, rope=R, method=name, ms=ms, gb_s=gbs,
                           frac_peak=gbs * 1e9 / peak_bw if peak_bw else None, frac_copy=gbs * 1e9 / copy_bw,
                           rel_diff_kernel_vs_reference=diff)
                out.append(rec)
                rows.append([f"{B}x{S}, {H} heads, {C}+{R}", name, f"{ms:.3f}", f"{gbs:.0f}",
                             f"{100 * rec['frac_peak']:.0f}%" if peak_bw else "-", f"{100 * rec['frac_copy']:.0f}%"])
        print(f"{B}x{S} {H} heads {C}+{R}: kernel vs reference max rel diff {diff:.1e}")
        del attn, cache, latents, q, q_nope, q_pe
        torch.cuda.empty_cache()
    print(table(["batch x context, layout", "method", "ms", "GB/s", "% of peak HBM", "% of measured copy"], rows))
    results["mla"] = out


# -----------------------------------------------------------------------------
# decoding: the latent cache against a standard multi-head attention cache and no cache, same model and weights


def make_cache(model, kind, batch, max_len):
    """A cache of one kind for generate_stream and decode_step: the latent cache or the MHA baseline."""
    p = model.embed.weight
    if kind == "latent":
        return new_cache(model, batch, max_len)
    return MHACache(model.config, batch, max_len, p.device, p.dtype)


def kernel_launches(fn):
    """GPU kernels one call of fn launches (torch profiler): what a CUDA graph of it replays as nodes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.key.startswith(("Memcpy", "Memset", "cudaGraph")))


@torch.no_grad()
def decode_rate(model, kind, batch, prompt, new, graph, compile=False, reps=2):
    """Greedy generation through generate_stream: (decode tokens/s after the first token, ms per step,
    ms to the first token (prefill, and the graph's capture), peak GiB, cache bytes), the best of reps runs."""
    idx = torch.randint(model.config.vocab_size, (batch, prompt), device=device)
    best = None
    for _ in range(reps):
        cache = make_cache(model, kind, batch, prompt + new) if kind != "none" else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        steps = generate_stream(model, idx, new, temperature=0, use_cache=kind != "none", cuda_graph=graph,
                                compile=compile, cache=cache)
        next(steps)  # the prefill and the capture (no cache: the first full forward)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in steps:  # no sync inside: the loop queues work as fast as the host can
            pass
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        run = (batch * (new - 1) / (t2 - t1), 1e3 * (t2 - t1) / (new - 1), 1e3 * (t1 - t0),
               torch.cuda.max_memory_allocated() / 2**30, cache.nbytes() if cache is not None else 0)
        best = run if best is None or run[0] > best[0] else best
        del cache, steps
    return best


@torch.no_grad()
def long_context_rate(model, kind, batch, context, new=32, compile=False):
    """Decode steps at a long context without a long prefill: the cache is filled with random rows up to
    `context` (their values do not change the work of a step), then `new` graph-replayed steps from there.
    Returns (tokens/s, ms per step, peak GiB, cache bytes)."""
    cache = make_cache(model, kind, batch, context + new)
    for t in ([cache.kv] if kind == "latent" else [cache.k, cache.v]):
        t.normal_()
    step = functools.partial(decode_step, model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    decode = torch.compile(step, dynamic=False) if compile else step
    replay = CapturedStep(lambda tokens, p: decode(tokens, p, cache),
                          torch.zeros(batch, 1, dtype=torch.long, device=device),
                          torch.tensor(context, device=device))  # every step at the last position: the same work
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new):
        tokens = replay(tokens).argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    nbytes = cache.nbytes()
    del replay, cache
    torch.cuda.empty_cache()
    return batch * new / seconds, 1e3 * seconds / new, peak, nbytes


def max_batch(model, kind, context, budget_gib):
    """The largest batch whose decoding at `context` fits in budget_gib of GPU memory: the peak is linear in the
    batch (weights + batch x (cache + activations)), so two small measured runs give the line, and a run at the
    predicted batch checks it (stepping down while it does not fit)."""
    (_, _, p8, _), (_, _, p16, _) = (long_context_rate(model, kind, b, context, new=2) for b in (8, 16))
    per_seq = (p16 - p8) / 8
    batch = int((budget_gib - (p8 - 8 * per_seq)) / per_seq)
    while batch > 1:
        try:
            rate = long_context_rate(model, kind, batch, context)
            if rate[2] <= budget_gib:
                return batch, rate
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
        batch = int(batch * 0.97)
    raise SystemExit(f"decode: not even batch 1 fits {budget_gib} GiB at context {context}")


def bench_decode():
    """Batch-1 and batch-128 tokens/s, latent vs MHA at decode_long, the largest batch in decode_budget_gib at
    decode_context, launches per step, the bandwidth a batch-1 step reaches (README, "Decoding")."""
    cfg = small_config(block_size=decode_context + 64)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cast_weights(Model(cfg), torch.bfloat16).eval()  # as sample.py runs it: the router stays fp32
    elt = 2
    mla_vals, _ = cache_values_per_token(cfg)
    mha_vals = cfg.n_layer * cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim)
    rows = []
    print(f"\n## Decoding: the small config at random weights, bf16, greedy; cache bytes per token: latent "
          f"{mla_vals * elt:,}, MHA (this model's per-head K and V) {mha_vals * elt:,}\n")
    modes = {"graph + compile": (True, True), "graph": (True, False), "eager": (False, False)}
    for batch, prompt, new in decode_cases:
        for kind, mode in [(k, m) for k in ("latent", "mha") for m in modes] + [("none", "eager")]:
            n = new if kind != "none" else min(new, 16)
            tok_s, ms, first_ms, peak_gib, nbytes = decode_rate(model, kind, batch, prompt, n, *modes[mode])
            rows.append(dict(batch=batch, context=f"{prompt} + {n}", cache=kind, mode=mode, tok_s=tok_s,
                             ms_per_step=ms, first_ms=first_ms, peak_gib=peak_gib, cache_mib=nbytes / 2**20))
            print(f"batch {batch} prompt {prompt} new {n} {kind} {mode}: {tok_s:,.0f} tok/s", file=sys.stderr)
    # launches per decode step (eager; a graph replays the same kernels as nodes) and batch-1 bandwidth
    launches = {}
    for kind in ("latent", "mha"):
        cache = make_cache(model, kind, 1, 128)
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        decode_step(model, tok, 64, cache)
        launches[kind] = kernel_launches(lambda: decode_step(model, tok, 64, cache))
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - model.embed.weight.nbytes
    idle = cfg.n_moe_layers * (cfg.n_experts - cfg.top_k) * 3 * cfg.n_embd * cfg.moe_inter_dim * elt
    step_bytes = weights - idle  # what a batch-1 step must read: every weight but the experts it does not use
    b1 = max((r for r in rows if r["batch"] == 1 and r["cache"] == "latent"), key=lambda r: r["tok_s"])
    b1_bw = (step_bytes + mla_vals * elt * 192) / (b1["ms_per_step"] * 1e-3)
    for r in rows:
        r["launches"] = launches.get(r["cache"], "")
    print(table(["batch", "prompt + new", "cache", "decoding", "decode tok/s", "ms / step", "kernels / step (eager)",
                 "ms to first token", "cache MiB", "peak GiB"],
                [[r["batch"], r["context"], r["cache"], r["mode"], f"{r['tok_s']:,.0f}", f"{r['ms_per_step']:.2f}",
                  r["launches"], f"{r['first_ms']:.0f}", f"{r['cache_mib']:,.1f}", f"{r['peak_gib']:.2f}"]
                 for r in rows]))
    print(f"\nfastest batch-1 step (latent, {b1['mode']}): reads {step_bytes / 1e6:.0f} MB of weights (all but the "
          f"{cfg.n_experts - cfg.top_k} unused experts per MoE layer) + its cache in {b1['ms_per_step']:.3f} ms: "
          f"{b1_bw / 1e9:,.0f} GB/s, {100 * b1_bw / copy_bw:.0f}% of the measured device copy"
          + (f", {100 * b1_bw / peak_bw:.0f}% of the datasheet peak" if peak_bw else ""))
    long = {(kind, mode): long_context_rate(model, kind, *decode_long, compile=modes[mode][1])
            for mode in ("graph + compile", "graph") for kind in ("latent", "mha")}
    print(f"\n{decode_long[0]} x {decode_long[1]} context, random cache rows (their values do not change the work):")
    for mode in ("graph + compile", "graph"):
        lat, mha = long[("latent", mode)], long[("mha", mode)]
        print(f"  {mode}: latent {lat[0]:,.0f} tok/s ({lat[1]:.2f} ms/step, cache {lat[3] / 2**30:.2f} GiB), MHA "
              f"{mha[0]:,.0f} tok/s ({mha[1]:.2f} ms/step, cache {mha[3] / 2**30:.2f} GiB): latent {lat[0] / mha[0]:.2f}x")
    fit = {kind: max_batch(model, kind, decode_context, decode_budget_gib) for kind in ("latent", "mha")}
    print(table(["cache", f"largest batch at {decode_context} context in {decode_budget_gib} GiB", "decode tok/s",
                 "ms / step", "peak GiB"],
                [[k, b, f"{r[0]:,.0f}", f"{r[1]:.2f}", f"{r[2]:.2f}"] for k, (b, r) in fit.items()]))
    print(f"latent / MHA: {fit['latent'][0] / fit['mha'][0]:.2f}x the batch, "
          f"{fit['latent'][1][0] / fit['mha'][1][0]:.2f}x the tokens/s")
    results["decode"] = dict(rows=rows, launches=launches, step_bytes=step_bytes, batch1_bandwidth=b1_bw,
                             long={" ".join(k): dict(zip(["tok_s", "ms", "peak_gib", "cache_bytes"], v))
                                   for k, v in long.items()},
                             max_batch={k: dict(batch=b, tok_s=r[0], ms=r[1], peak_gib=r[2]) for k, (b, r) in fit.items()})


@torch.no_grad()
def bench_decode_profile(context=64, reps=10):
    """Where a batch-1 decoding step's time goes: the torch profiler over replays of the compiled, captured step
    of the small config (bf16, random weights): kernels per step, GPU busy time, the kernels that take it."""
    from torch.profiler import ProfilerActivity, profile
    cfg = small_config(block_size=4 * context)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cast_weights(Model(cfg), torch.bfloat16).eval()
    cache = new_cache(model, 1, 4 * context)
    compiled = torch.compile(functools.partial(decode_step, model), dynamic=False)
    step = CapturedStep(lambda t, p: compiled(t, p, cache), torch.zeros(1, 1, dtype=torch.long, device=device),
                        torch.tensor(context, device=device))
    tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
    for _ in range(3):
        step(tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        step(tokens)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step(tokens)
        torch.cuda.synchronize()
    launched = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in launched) / reps
    by_name = {}
    for e in launched:
        n, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, us + e.device_time)
    print(f"\n## A batch-1 decoding step, compiled and captured: {ms:.3f} ms per replay (unprofiled), "
          f"{len(launched) / reps:.0f} kernels, GPU busy {busy:.0f} us per step (profiled)\n")
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:20]
    print(table(["kernel", "per step", "us each", "us per step"],
                [[k[:70], f"{n / reps:.0f}", f"{us / n:.1f}", f"{us / reps:.0f}"] for k, (n, us) in top]))
    results["decode_profile"] = dict(ms=ms, kernels=len(launched) / reps, busy_us=busy,
                                     top={k: dict(count=n / reps, us=us / n) for k, (n, us) in top})


# -----------------------------------------------------------------------------
# training step


def moments_dtype():
    """The train section's AdamW moments: train_moments, or train_config's moments_dtype (train.py's default,
    float32, where it sets none)."""
    return train_moments or read_config_file(train_config).get("moments_dtype", "float32")


def make_train_step(cfg):
    """One optimizer step as train.py takes it: forward and backward of train_accum micro-batches under bf16 autocast,
    clip, gpu_kernels.AdamW, the aux-loss-free bias update. Random tokens. Returns (step, the model)."""
    torch.manual_seed(seed)
    raw = Model(cfg).to(device)
    model = torch.compile(raw) if compile else raw
    opt = raw.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cuda", DTYPES[moments_dtype()])
    data = torch.randint(cfg.vocab_size, (train_accum, train_batch, train_seq + 1), device=device)

    def step():
        for micro in data:  # after the first, backward adds each gradient into .grad, as in train.py
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(micro[:, :-1], micro[:, 1:])
            (loss / train_accum).backward()
        clipped_step(opt, raw.parameters(), 1.0)
        opt.zero_grad(set_to_none=True)
        raw.update_biases(1e-3)

    return step, raw


def bench_train():
    print(f"\n## Training step, {train_config}: {train_accum} x batch {train_batch} x {train_seq} tokens, bf16 "
          f"autocast, gpu_kernels.AdamW ({moments_dtype()} moments){', torch.compile' if compile else ''}\n")
    (moe_name, moe), (dense_name, dense) = train_models().items()
    variants = {f"{moe_name}, Triton kernels": moe}
    if not compile:  # the reference syncs with the host at every layer (.tolist()): compiling it gains nothing
        variants[f"{moe_name}, PyTorch reference"] = dataclasses.replace(moe, use_kernels=False)
    variants[dense_name] = dense
    rows, out = [], []
    for name, cfg in variants.items():
        step, raw = make_train_step(cfg)
        n = train_steps if "reference" not in name else max(3, train_steps // 3)
        ms = timeit(step, reps=n, warmup=train_warmup)
        tok_s = train_accum * train_batch * train_seq / (ms * 1e-3)
        fpt = raw.flops_per_token(train_seq)
        mfu = fpt * tok_s / peak if peak else None
        rec = dict(model=name, ms=ms, tokens_per_s=tok_s, mfu=mfu, flops_per_token=fpt,
                   params=raw.num_params(), active_params=raw.num_params(active=True),
                   max_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
        out.append(rec)
        rows.append([name, f"{rec['params'] / 1e6:.0f}M / {rec['active_params'] / 1e6:.0f}M", f"{ms:.1f}",
                     f"{tok_s:,.0f}", f"{100 * mfu:.1f}%" if mfu else "-"])
        del raw, step
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(table(["model", "params / active", "ms / step", "tokens/s", "MFU"], rows))
    t = {r["model"]: r["ms"] for r in out}
    print(f"MoE (Triton) step / dense step: {t[f'{moe_name}, Triton kernels'] / t[dense_name]:.2f}x")
    results["train"] = out


# -----------------------------------------------------------------------------
# tile search


def kernel_ms(fn, n=5):
    """GPU time per call of each Triton kernel that fn launches (torch profiler; CPU overhead excluded)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return {e.key: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / n / 1e3
            for e in prof.key_averages() if e.key.startswith(("_moe", "_mla"))}


def bench_tune():
    """Per-kernel tile search over train_config's routed experts at a micro-batch of tokens: for each BLOCK_M, run
    fused_moe with the i-th candidate of every kernel at once and read each kernel's own GPU time from the profiler;
    keep the fastest candidate per kernel."""
    cfg, N = small_config(train_config, train_vocab), train_batch * train_seq
    x, ids, gates, w1, w2, w3, dy = moe_inputs(N, cfg)
    params = [x, gates, w1, w2, w3]
    mm = lambda m, n, k, w, s: dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
    wg = lambda p, q, k, w, s: dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_K=k, num_warps=w, num_stages=s)
    sw = lambda r, c, w: dict(BLOCK_R=r, BLOCK_C=c, num_warps=w)
    cands = {  # kernel key: (profiler name, pass, candidates); the first of each is the current default
        "up": ("_moe_up_kernel", "fwd", [mm(128, 64, 64, 8, 3), mm(128, 64, 64, 4, 3), mm(128, 64, 64, 4, 4),
                                         mm(64, 128, 64, 4, 3), mm(128, 64, 64, 8, 4), mm(128, 128, 32, 8, 4),
                                         mm(128, 128, 64, 8, 3)]),
        "down": ("_moe_mm_kernel", "fwd", [mm(128, 128, 64, 8, 3), mm(128, 128, 64, 4, 4), mm(128, 256, 32, 8, 4),
                                           mm(64, 256, 64, 8, 3), mm(128, 256, 64, 8, 3), mm(128, 256, 128, 8, 2)]),
        "down_bwd": ("_moe_down_bwd_kernel", "bwd", [mm(128, 128, 64, 8, 3), mm(128, 64, 64, 4, 3),
                                                     mm(128, 64, 64, 4, 4), mm(128, 128, 64, 8, 4),
                                                     mm(64, 128, 64, 4, 3), mm(128, 128, 32, 8, 4)]),
        "swiglu_bwd": ("_moe_swiglu_bwd_kernel", "bwd", [sw(16, 128, 4), sw(32, 128, 4), sw(64, 128, 8),
                                                         sw(32, 256, 8), sw(64, 64, 4), sw(16, 256, 4)]),
        "dx": ("_moe_mm_kernel", "bwd", [mm(128, 256, 64, 8, 3), mm(128, 128, 64, 8, 4), mm(128, 256, 32, 8, 4),
                                         mm(64, 256, 64, 8, 3), mm(128, 128, 64, 4, 4), mm(128, 128, 128, 8, 3)]),
        "wgrad": ("_moe_wgrad_kernel", "bwd", [wg(128, 128, 32, 8, 4), wg(128, 128, 64, 8, 4), wg(128, 256, 64, 8, 3),
                                               wg(256, 128, 64, 8, 3), wg(128, 128, 64, 8, 3), wg(128, 64, 64, 4, 4)]),
    }
    copies = working_copies(w1, w2, w3)
    fwd = lambda: gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3, copies)
    log, best = [], {}
    print(f"\n## Tile search, fused_moe at {N} tokens: GPU ms per kernel (wgrad: its three launches)")
    for i in range(max(len(c) for _, _, c in cands.values())):
        gpu_kernels.MOE_TILES.update({k: c[i % len(c)] for k, (_, _, c) in cands.items()})
        try:
            f = kernel_ms(fwd)
            y = fwd()
            b = kernel_ms(lambda: torch.autograd.grad(y, params, dy, retain_graph=True))
        except Exception as e:  # a tile that needs more shared memory than there is, say
            print(f"  candidate {i}: failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        times = {k: (f if p == "fwd" else b).get(name, float("inf")) for k, (name, p, _) in cands.items()}
        print(f"  candidate {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
        for k, (_, _, c) in cands.items():
            log.append(dict(key=k, tiles=c[i % len(c)], ms=times[k]))
            if times[k] < best.get(k, (float("inf"),))[0]:
                best[k] = (times[k], c[i % len(c)])
    gpu_kernels.MOE_TILES.update({k: best[k][1] for k in cands})
    ms = timeit(lambda: torch.autograd.grad(fwd(), params, dy))
    print(f"kernel sum {sum(v[0] for v in best.values()):.3f} ms; fwd+bwd with the best: {ms:.3f} ms\n"
          f"MOE_TILES = {gpu_kernels.MOE_TILES}")
    del x, ids, gates, w1, w2, w3, dy, params
    mla_log, mla_best = [], {}
    default = dict(gpu_kernels.MLA_TILES)
    for B, S, H, C, R in mla_shapes[1:]:
        q = torch.randn(B, 1, H, C + R, device=device, dtype=torch.bfloat16)
        kv = torch.randn(B, S, C + R, device=device, dtype=torch.bfloat16)
        nbytes = B * S * (C + R) * 2
        for bn, w, s, pps in itertools.product((32, 64), (4, 8), (2, 3), (2, 4)):
            gpu_kernels.MLA_TILES.update(BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=pps)
            try:
                ms = timeit_graph(lambda: gpu_kernels.mla_decode(q, kv, S - 1, 0.1, C))
            except Exception as e:
                print(f"  failed: {type(e).__name__}: {str(e)[:100]}")
                continue
            mla_log.append(dict(shape=(B, S, H, C, R), tiles=dict(gpu_kernels.MLA_TILES), ms=ms,
                                gb_s=nbytes / (ms * 1e-3) / 1e9))
        rows = sorted((r for r in mla_log if r["shape"] == (B, S, H, C, R)), key=lambda r: r["ms"])
        print(f"MLA decode {B}x{S} {H} heads {C}+{R}, fastest: " + "; ".join(
            f"{r['tiles']} {r['ms']:.3f} ms {r['gb_s']:.0f} GB/s" for r in rows[:3]))
        mla_best[(B, S, H, C, R)] = rows[0]["tiles"] if rows else default
    gpu_kernels.MLA_TILES.update(default)
    results["tune"] = dict(moe=log, moe_best=dict(gpu_kernels.MOE_TILES), mla=mla_log,
                           mla_best={str(k): v for k, v in mla_best.items()})


# A training step's GPU kernels by family, matched by name (lower case; the first group that matches takes it)
KERNEL_GROUPS = [
    ("routed experts: fused_moe's GEMMs", ("_moe_up", "_moe_mm", "_moe_down_bwd", "_moe_swiglu_bwd", "_moe_wgrad")),
    ("routing: sort, alignment, top-k", ("_moe_align", "radixsort", "radix_sort", "topk")),
    ("cuBLAS GEMMs: projections, dense FFNs, shared experts, head", ("nvjet", "gemm", "cutlass", "splitkreduce")),
    ("attention: cuDNN SDPA", ("sdpa", "flash", "cudnn", "fmha")),
    ("AdamW and the clip's norm", ("multi_tensor_apply", "_adamw")),
]
OTHER_KERNELS = "the rest: Inductor's fused elementwise, norms, casts, loss"


def kernel_groups(gpu):
    """{group: ms} from {kernel name: ms}, in KERNEL_GROUPS' order, OTHER_KERNELS last."""
    out = dict.fromkeys([g for g, _ in KERNEL_GROUPS] + [OTHER_KERNELS], 0.0)
    for name, ms in gpu.items():
        low = name.lower()
        out[next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), OTHER_KERNELS)] += ms
    return out


def compiled_kernels(fn):
    """The variants of a Triton kernel compiled so far in this process, loaded (n_regs and n_spills are read then).
    torch.compile compiles the kernels it traces on its own: only eager launches show here."""
    found = []
    for cache in fn.device_caches.values():  # per device: (kernels by their specialization, ...)
        for k in cache[0].values():
            k._init_handles()
            found.append(k)
    return found


def bench_profile():
    """Where the time goes: the top GPU kernels of fused_moe forward + backward (train_config's routed experts, a
    micro-batch of tokens), and of one training step of the MoE model and of its dense twin (torch profiler, 3
    iterations each), then the two steps' kernels by family, side by side."""
    from torch.profiler import ProfilerActivity, profile

    def show(title, fn, n=3, rows=18, flops=None):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        gpu = {e.key: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / n / 1e3
               for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}  # kernels only
        # Optimizer.step#... is the annotated range around the optimizer's kernels, listed with them: not summed
        gpu = sorted(((k, v) for k, v in gpu.items() if v > 0 and not k.startswith("Optimizer.")), key=lambda kv: -kv[1])
        print(f"\n### {title}: {wall:.2f} ms wall per iteration (profiled), GPU kernels {sum(v for _, v in gpu):.2f} ms")
        flops = flops or {}
        print(table(["kernel / op (self GPU time)", "ms per iteration", "TFLOP/s"],
                    [(k[:90], f"{v:.3f}", f"{flops[k] / v / 1e9:.0f}" if k in flops else "") for k, v in gpu[:rows]]))
        return dict(gpu)

    cfg, N = small_config(train_config, train_vocab), train_batch * train_seq
    x, ids, gates, w1, w2, w3, dy = moe_inputs(N, cfg)
    params = [x, gates, w1, w2, w3]
    def moe_flops(gemm):  # per kernel, from one (pairs x d x I) matmul's FLOPs: up holds W1 and W3; mm the down
        # projection and dx (two matmuls); wgrad dW2 and [dW1 ; dW3]
        return dict(_moe_up_kernel=2 * gemm, _moe_mm_kernel=3 * gemm, _moe_down_bwd_kernel=gemm,
                    _moe_wgrad_kernel=3 * gemm)

    copies = working_copies(w1, w2, w3)
    show(f"fused_moe fwd+bwd, {N} tokens",
         lambda: torch.autograd.grad(gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3, copies), params, dy),
         flops=moe_flops(2 * N * cfg.top_k * cfg.n_embd * cfg.moe_inter_dim))
    print("\nfused_moe's kernels as compiled so far (a thread's registers, bytes spilled: what limits the tiles)\n")
    print(table(["kernel", "num_warps", "registers", "spilled bytes", "shared KiB"], [
        (name, k.metadata.num_warps, k.n_regs, k.n_spills, f"{k.metadata.shared / 1024:.0f}")
        for name in ("_moe_up_kernel", "_moe_mm_kernel", "_moe_down_bwd_kernel", "_moe_swiglu_bwd_kernel",
                     "_moe_wgrad_kernel")
        for k in compiled_kernels(getattr(gpu_kernels, name))]))
    del x, ids, gates, w1, w2, w3, dy, params
    steps = {}
    for name, cfg in train_models().items():
        step, _ = make_train_step(cfg)
        n_moe = cfg.n_layer - cfg.n_dense_layers
        gemm = 2 * train_accum * train_batch * train_seq * cfg.top_k * cfg.n_embd * cfg.moe_inter_dim * n_moe
        steps[name] = kernel_groups(show(f"training step, {name}", step, rows=profile_rows, flops=moe_flops(gemm)))
        del step
        torch.cuda.empty_cache()
    (moe_name, moe), (dense_name, dense) = steps.items()
    print("\n### The two steps' GPU kernels by family, ms per step\n")
    print(table(["kernels", moe_name, dense_name, "difference"],
                [(g, f"{moe[g]:.2f}", f"{dense[g]:.2f}", f"{moe[g] - dense[g]:+.2f}") for g in moe]
                + [("all", f"{sum(moe.values()):.2f}", f"{sum(dense.values()):.2f}",
                    f"{sum(moe.values()) - sum(dense.values()):+.2f}")]))
    results["profile"] = dict(step_kernel_groups_ms=steps)


# -----------------------------------------------------------------------------
# loading a DeepSeek-format checkpoint: time and memory


def make_checkpoint(cfg, path):
    with torch.device("meta"):
        m = Model(cfg)
    m.to(torch.bfloat16).to_empty(device="cpu")  # allocated in bf16: no float32 copy of a big model
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.02, 0.02)
        for layer in m.moe_layers():
            layer.expert_bias.zero_()
    hf.save_pretrained(m, path, max_shard_size=2 * 2**30)


def bench_threads():
    """train.py's CPU default model on data/shakespeare, --device=cpu, with other processes spinning on the machine:
    tokens/s at the thread count train.py picks (--threads=0) against torch's own default (one per core)."""
    import re
    import subprocess
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    physical = len({open(f"/sys/devices/system/cpu/cpu{c}/topology/core_cpus_list").read() for c in
                    os.sched_getaffinity(0)})
    busy_counts = [int(b) for b in threads_busy.split(",")] if threads_busy else [0, max(1, physical // 2)]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for n_busy in busy_counts:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_busy)]
            try:
                time.sleep(1)  # the spinners are running before train.py measures the load
                for threads in (0, torch.get_num_threads()):
                    log = os.path.join(out, "log.jsonl")
                    if os.path.exists(log):
                        os.remove(log)
                    done = subprocess.run(
                        [sys.executable, os.path.join(here, "train.py"), "--device=cpu", f"--max_iters={threads_iters}",
                         f"--eval_interval={threads_iters}", "--eval_iters=1", "--plot=False", f"--out_dir={out}",
                         "--overwrite", f"--threads={threads}"], capture_output=True, text=True, cwd=here)
                    if done.returncode:
                        raise SystemExit(f"bench.py: train.py failed: {done.stderr.strip().splitlines()[-1]}")
                    picked = re.search(r"threads: (\d+) \((.*?);", done.stdout)
                    recs = read_log(log)
                    tok_s = [r["tok_s"] for r in recs if r["kind"] == "train"][1:]  # the first window warms up
                    rows.append(dict(busy=n_busy, threads_setting=threads, threads=int(picked[1]), why=picked[2],
                                     tok_s=sorted(tok_s)[len(tok_s) // 2]))
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    results["threads"] = dict(physical_cores=physical, rows=rows)
    print(f"\n## CPU threads: train.py's default model, {physical} physical cores, {threads_iters} iters per run\n")
    print(table(["other processes spinning", "--threads", "threads used (why)", "median tokens/s"],
                [[r["busy"], r["threads_setting"] or "0 (choose)", f"{r['threads']} ({r['why']})", f"{r['tok_s']:,.0f}"]
                 for r in rows]))


def bench_load():
    import re
    import threading
    # DeepSeek-V2-Lite's config.json (softmax routing, 64 experts top-6 + 2 shared, no query compression)
    cfg = ModelConfig(vocab_size=102400, block_size=4096, n_layer=load_layers, n_embd=2048, n_head=16, q_lora_rank=0,
                      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_dense_layers=1,
                      dense_inter_dim=10944, n_experts=64, top_k=6, n_shared=2, moe_inter_dim=1408,
                      score_func="softmax", norm_topk=False)
    if not os.path.exists(os.path.join(load_dir, "config.json")):  # made in a child: our memory stays untouched
        import multiprocessing
        t0 = time.time()
        child = multiprocessing.get_context("fork").Process(target=make_checkpoint, args=(cfg, load_dir))
        child.start()
        child.join()
        assert child.exitcode == 0, f"writing {load_dir} failed"
        print(f"wrote {load_dir} in {time.time() - t0:.0f} s")
    files = [f for f in os.listdir(load_dir) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(load_dir, f)) for f in files)
    peak, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def watch():  # /proc/self/status every 20 ms: anonymous memory (ours) and file pages (the mmapped safetensors)
        while not done.is_set():
            status = open("/proc/self/status").read()
            for k in peak:
                peak[k] = max(peak[k], int(re.search(k + r":\s+(\d+)", status)[1]) * 1024)
            time.sleep(0.02)

    base = int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024
    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.time()
    model = hf.from_pretrained(load_dir, dtype=torch.bfloat16)
    seconds = time.time() - t0
    done.set()
    watcher.join()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = dict(params=model.num_params(), files_gb=size / 1e9, model_gb=nbytes / 1e9, seconds=seconds,
               peak_anon_gb=(peak["RssAnon"] - base) / 1e9, peak_file_gb=peak["RssFile"] / 1e9)
    results["load"] = row
    print(f"\n## hf.from_pretrained: DeepSeek-V2-Lite shapes, {load_layers} layers, bf16, {len(files)} shards\n")
    print(table(["params", "safetensors GB", "model GB", "load s", "peak anonymous memory GB (above start)",
                 "peak mmapped file pages GB"],
                [[f"{row['params'] / 1e9:.2f}B", f"{row['files_gb']:.2f}", f"{row['model_gb']:.2f}",
                  f"{row['seconds']:.1f}", f"{row['peak_anon_gb']:.2f}", f"{row['peak_file_gb']:.2f}"]]))


# -----------------------------------------------------------------------------

SECTIONS = dict(moe=bench_moe, mla=bench_mla, decode=bench_decode, decode_profile=bench_decode_profile,
                train=bench_train, load=bench_load, tune=bench_tune, profile=bench_profile, threads=bench_threads)


def main(argv):
    global copy_bw
    configure(settings, argv)
    globals().update(settings)
    names = [s.strip() for s in sections.split(",")]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        study = [n for n in unknown if n in ("balance", "mtp", "arch", "specialize", "tradeoff")]
        raise SystemExit(f"bench.py: no section {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}"
                         + (f" (the training studies are python study.py --sections={','.join(study)})" if study else ""))
    if moments_dtype() not in ("float32", "bfloat16"):
        raise SystemExit(f"bench.py: moments {moments_dtype()!r} (--train_moments or {train_config}'s "
                         "moments_dtype): use float32 or bfloat16")
    if not cuda and set(names) - {"load", "threads"}:
        raise SystemExit(f"bench.py --sections={sections} needs a CUDA GPU (only load and threads run without one)")
    results["settings"] = settings
    torch.manual_seed(seed)
    print(f"GPU: {gpu} | torch {torch.__version__} | triton {results['triton']}")
    if cuda:
        copy_bw = results["copy_bw"] = copy_bandwidth()
        print(f"peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s (datasheet) | HBM peak "
              f"{peak_bw / 1e9 if peak_bw else float('nan'):.0f} GB/s (datasheet), device copy {copy_bw / 1e9:.0f} GB/s "
              "(measured)")
    run_sections(SECTIONS, names, results, json_path)


if __name__ == "__main__":
    main(sys.argv[1:])
