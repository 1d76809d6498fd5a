"""
Optional Triton fast paths for nanoseek. The PyTorch code in mla.py / moe.py is the spec and the fallback;
the model calls in only through usable(x), and everything here is skipped where Triton does not import.

    fused_moe(x, topk_ids, topk_weights, w1, w2, w3)   routed SwiGLU experts, forward and backward
                                                        (spec: moe.experts_reference; DeepSeekMoE, V3 eq. 12)
    mla_decode(q, kv, start_pos, softmax_scale, C)     absorbed MLA attention over the latent cache
                                                        (spec: mla.latent_attention; DeepSeek-V2 section 2.1)
    router_topk(choice, k)                             the router's top-k expert ids (spec: torch.topk)
    AdamW(params, ...)                                 torch.optim.AdamW whose CUDA step is one Triton launch
                                                        per param group (spec: torch.optim.AdamW itself)

Fused MoE (the scheme of vLLM's fused_moe and ScatterMoE): sort the N*K (token, expert) pairs by expert, pad each
expert's run of rows to a multiple of the tile height BLOCK_M (padding rows point past the last pair and are
masked), so every tile of rows belongs to one expert. The GEMMs that read x or dy gather their rows by index in
the prologue instead of running a separate permutation pass, the first multiplies by the gate weight, and the last
writes each pair's row in token order, so the K rows of a token are summed by one .sum(1). The two gathering
kernels of a training step also write the rows they gathered in the sorted layout (xs, dys), so the weight
gradients are plain GEMMs over each expert's contiguous rows: gathering inside the weight-gradient kernel cost
it more than the copies cost the kernels that write them (README, "Training step"). No host syncs: the padded
length is bounded by N*K + E*(BLOCK_M-1), and tiles past the real end exit at once.

    forward   h1, h3 = x[tok] W1_e^T, x[tok] W3_e^T        _moe_up_kernel (SwiGLU and the gate in the epilogue:
              ga = g silu(h1) h3                            saves h1, h3, ga and the gathered rows xs = x[tok])
              out[pair] = ga W2_e^T                         _moe_mm_kernel
    backward  da = dy[tok] W2_e                             _moe_down_bwd_kernel (saves dys = dy[tok])
              dg = da . a ; dh1, dh3 = SwiGLU backward      _moe_swiglu_bwd_kernel
              dW2_e = sum dys^T (g a) ; [dW1_e ; dW3_e] = sum [dh1 ; dh3]^T xs   _moe_wgrad_kernel
              dx[pair] = dh1 W1_e + dh3 W3_e                 _moe_mm_kernel

TMA (Hopper on; the flag TMA turns it off): tiles that lie in order in memory come through host-side tensor
descriptors, built at each launch where _tma_desc accepts the tensor: W1, W3 in the up projection, a in
_moe_mm_kernel (not per pair; for dx only when BLOCK_K divides I), both sides of the weight gradients. Rows
gathered by token (x, dy) and the other weight tiles stay pointer loads.

AdamW: the step streams each parameter, its gradient and its two moments once, in fp32 (Loshchilov & Hutter's
decoupled weight decay, Adam's bias corrections from the step count on the device, the clip as a divisor of the
gradient): 28 bytes per parameter, 20 with the moments stored in bf16 (moments_dtype, DeepSeek-V3 §3.3.3). torch's
fused AdamW also writes every gradient back after dividing it by the clip (32 bytes), and the MoE model has 4-6x
the dense model's parameters, by vocabulary (README, "Training step"). It also writes the routed experts' bf16
working copies (moe.Experts) with their weights, 2 bytes more each, so that no forward casts the expert weights.

MLA decode (flash-decoding): each program takes one sequence, a tile of its (query token, head) rows and one
split of the keys; it reads every latent row [c_kv ; k_pe] once for all heads (MQA), keeps an online softmax in
fp32, and writes a partial output and its log-sum-exp. A second kernel combines the splits.
"""
import itertools
import math
import os
import types
import warnings

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the kernels below are still defined (as plain functions), never launched: usable() is False
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)
try:  # host-side TMA descriptors (Triton 3.4 on); without them every tile is read by pointer
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
TMA = True  # the fused MoE kernels read their contiguous tiles through TMA descriptors where _tma_desc allows
_warned = False


def usable(x):
    """Take the Triton path for this tensor? On CUDA with Triton importable. CPU tests run the kernels directly
    under TRITON_INTERPRET=1; the model's switch is ModelConfig.use_kernels."""
    global _warned
    if x.is_cuda and not HAS_TRITON and not _warned:
        warnings.warn("gpu_kernels.py: Triton is not importable, using the (much slower) PyTorch reference paths")
        _warned = True
    return HAS_TRITON and x.is_cuda


def _precision(dtype):
    """fp32 dots follow torch's own switch: TF32 only where torch would use it for a matmul too (bf16 ignores it)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _tma_desc(t, block):
    """A TMA descriptor of the 2-D tensor t for tiles of shape block, or None where the kernel reads t by pointer:
    TMA off, no host-side descriptors in this Triton, a GPU before Hopper (sm_90), or t laid out as TMA refuses
    (its address and every stride but the last a multiple of 16 bytes, its rows contiguous). A descriptor load
    zero-fills past t's edges, as the pointer loads' masks do. The CPU interpreter emulates descriptors, so the CPU
    tests take this path too. Built afresh at every launch, never cached: torch.compile traces from_tensor itself.
    Under torch.compile a tensor has no address yet (and Dynamo traces neither data_ptr() arithmetic nor
    storage_offset() there): the tensors passed here are then fresh buffers, which the allocator aligns, or the
    weights, and the compiled code's from_tensor asserts the address when it rebuilds the descriptor at run time."""
    if not TMA or TensorDescriptor is None or (t.is_cuda and torch.cuda.get_device_properties(t.device).major < 9):
        return None
    if not torch.compiler.is_compiling() and t.data_ptr() % 16:
        return None
    if t.stride(-1) != 1 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
        return None
    return TensorDescriptor.from_tensor(t, block)


def _tma_args(tensors, blocks, allowed=True):
    """A launch's arguments for tensors that its kernel reads all through TMA or all by pointer (one constexpr
    switch): (None for each pointer, the descriptors, True) where allowed and _tma_desc gives every tensor one, else
    (the tensors, None for each descriptor, False). A tensor read through a descriptor gets None in its pointer
    slot, so no launch passes one tensor twice (test_no_launch_passes_one_tensor_twice)."""
    none = [None] * len(tensors)
    descs = [_tma_desc(t, block) for t, block in zip(tensors, blocks)] if allowed else none
    if allowed and all(d is not None for d in descs):
        return none, descs, True
    return list(tensors), none, False


# Triton's CPU interpreter (3.9) multiplies bf16 operands of tl.dot as raw bit patterns; upcast there only.
UPCAST_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)

# -------------------------------------------------------------------------
# Fused MoE kernels. Rows r of the padded, expert-sorted layout: sorted_pair[r] is the pair index
# p = token * K + k (n_pairs for padding), block_expert[r // BLOCK_M] the tile's expert (-1: past the end).

@triton.jit
def _moe_align_kernel(sorted_e_ptr, order_ptr, counts_ptr, sorted_pair_ptr, block_expert_ptr, pad_ptr, n_pairs,
                      n_blocks, E, ALIGN_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr):
    """From the stably sorted expert ids and each expert's count: each expert's run of rows padded to ALIGN_M, the
    padded row of every pair (sorted_pair), the expert of every block of ALIGN_M rows, pad_start / pad_end. Every
    program takes the E runs from the counts (a cumulative sum), then places BLOCK pairs and BLOCK blocks."""
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    lo = tl.cumsum(counts, axis=0) - counts  # each expert's first position in sorted_e
    is_expert = e < E
    padded = tl.where(is_expert, (counts + ALIGN_M - 1) // ALIGN_M * ALIGN_M, 0)
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    if pid == 0:
        tl.store(pad_ptr + e, pad_start, mask=is_expert)
        tl.store(pad_ptr + E + e, pad_end, mask=is_expert)
    i = pid * BLOCK + tl.arange(0, BLOCK)  # sorted positions -> padded rows
    i_ok = i < n_pairs
    ei = tl.load(sorted_e_ptr + i, mask=i_ok, other=0)
    shift = tl.sum(tl.where(ei[:, None] == e[None, :], (pad_start - lo)[None, :], 0), axis=1)  # (pad_start - first)[ei]
    tl.store(sorted_pair_ptr + i + shift, tl.load(order_ptr + i, mask=i_ok, other=0), mask=i_ok)
    b = pid * BLOCK + tl.arange(0, BLOCK)  # blocks of rows -> their expert: the count of runs ending at or before
    start = b * ALIGN_M
    owner = tl.sum(((pad_end[None, :] <= start[:, None]) & is_expert[None, :]).to(tl.int32), axis=1)
    tl.store(block_expert_ptr + b, tl.where(owner < E, owner, -1), mask=b < n_blocks)

@triton.jit
def _topk_kernel(x_ptr, ids_ptr, N, E, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """The router's choice (V3 eq. 16): the K largest of each of BLOCK_T rows of x (N, E), largest first, ties to
    the lower column. A row's E scores fit one tile, so it is K passes of a max and the lowest untaken column that
    holds it. NaN ranks above everything, as in torch.topk; a taken column never comes back, even when every
    score left is -inf (the experts that group-limited routing drops)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    live = (rows[:, None] < N) & (cols[None, :] < E)  # untaken real columns
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=live, other=float("-inf"))
    x = tl.where(x != x, float("inf"), x)
    for k in tl.static_range(K):
        best = tl.max(tl.where(live, x, float("-inf")), axis=1)
        pick = tl.min(tl.where(live & (x == best[:, None]), cols[None, :], BLOCK_E), axis=1)
        tl.store(ids_ptr + rows * K + k, pick.to(tl.int64), mask=rows < N)
        live = live & (cols[None, :] != pick[:, None])

@triton.jit
def _save_rows(src_ptrs, dst_ptrs, valid, D, pid_n, n_tiles, BLOCK_K: tl.constexpr):
    """Copy this program's share of its row tile's gathered rows into the sorted layout (zeros in padding rows):
    chunk c of BLOCK_K columns goes to program c % n_tiles of the row tile's n_tiles, so the copy is spread over all
    of them. It runs after the main loop and reads the rows again, from L2: in the loop it kept the up-projection's
    pipelined loads waiting (README, "Training step"), and storing the very tile that feeds tl.dot made Triton 3.6
    miscompile the dot on an H200 (the stored rows right, the products wrong)."""
    offs = tl.arange(0, BLOCK_K)
    for k in range(pid_n * BLOCK_K, D, n_tiles * BLOCK_K):
        ok = (offs < D - k)[None, :]
        cols = k + offs[None, :]
        tl.store(dst_ptrs + cols, tl.load(src_ptrs + cols, mask=valid[:, None] & ok, other=0.0), mask=ok)

@triton.jit
def _tile(n_cols, sorted_pair_ptr, block_expert_ptr, n_pairs, top_k, ALIGN_M: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, PER_PAIR: tl.constexpr):
    """This program's tile (BLOCK_M rows x BLOCK_N of n_cols output columns): its expert (-1: past the end), the
    buffer rows of its lanes, their pairs (n_pairs: none), which are real, their tokens, its columns.
    Sorted layout: rows pid_m * BLOCK_M.., pairs from sorted_pair, the expert of the block holding the tile.
    PER_PAIR (a few pairs, no backward: decoding): tile m is pair m alone, in lane 0 and buffer row m, its expert
    read straight from the flat topk_ids passed as block_expert_ptr: no sort, no alignment pass."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    pid_m, pid_n = pid // n_tiles, pid % n_tiles
    lane = tl.arange(0, BLOCK_M)
    if PER_PAIR:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int32)
        rows = (pid_m + lane * 0).to(tl.int64)
        pair = tl.where(lane == 0, pid_m, n_pairs)
    else:
        expert = tl.load(block_expert_ptr + pid_m * BLOCK_M // ALIGN_M)  # BLOCK_M divides ALIGN_M: one expert
        rows = (pid_m * BLOCK_M + lane).to(tl.int64)
        pair = tl.load(sorted_pair_ptr + rows)
    tok = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, rows, pair, pair < n_pairs, tok, offs_n


@triton.jit
def _w_tile(w_ptr, w_desc, w_off, w_mask, w_row, k, W_DESC: tl.constexpr):
    """The up projection's W^T tile (BLOCK_K, BLOCK_N; W13: 2 BLOCK_N): by pointer (w_ptr + w_off under w_mask), or
    through w_desc over the (E*I, d) view of W (W13: (E*2I, d)): its rows from w_row, BLOCK_K columns from k,
    transposed for the dot."""
    if W_DESC:
        wt = tl.trans(w_desc.load([w_row, k]))
    else:
        wt = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
    return wt

@triton.jit
def _moe_up_kernel(x_ptr, w1_ptr, w3_ptr, w1_desc, w3_desc, gate_ptr, h_ptr, ga_ptr, xs_ptr, sorted_pair_ptr,
                   block_expert_ptr, n_pairs, top_k, D, I, stride_x, stride_we, stride_wn, stride_h, stride_ga,
                   ALIGN_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PER_PAIR: tl.constexpr, SAVE_X: tl.constexpr, W_DESC: tl.constexpr, W13: tl.constexpr,
                   PRECISION: tl.constexpr):
    """h1 = x[tok] W1_e^T, h3 = x[tok] W3_e^T (one tile of I each), a = silu(h1) * h3. h: (rows, 2I) = [h1, h3].
    ga = g a, the pair's gate applied here (V3 eq. 12: g_i FFN_i(u), and the down projection is linear): it is
    the down projection's input, and the backward's dW2 reads it as it stands. SAVE_X: the row tile's programs
    also store the rows they gather, xs = x[tok] in the sorted layout (zeros in padding rows), for the weight
    gradients, which then read both sides in order, without a gather. W_DESC: W1 and W3 come through the TMA
    descriptors w1_desc, w3_desc (w1_ptr, w3_ptr None), unmasked: a tile's rows past I are the next expert's
    (zeros past the last), and they only make output columns >= I, which are never stored; columns past d are
    zeros at the tensor's edge. The x rows are gathered by token, by pointer. W13: w1 is W13, W1 and W3 with their
    rows interleaved (W1_e[0], W3_e[0], W1_e[1], ...: moe.Experts' working copy, (E, 2I, d)), w3 unused: one dot
    of x with 2 BLOCK_N rows of it per k-step, split into h1 and h3 after the loop, where two dots each read the x
    tile from shared memory."""
    expert, rows, pair, valid, tok, offs_n = _tile(I, sorted_pair_ptr, block_expert_ptr, n_pairs, top_k, ALIGN_M,
                                                   BLOCK_M, BLOCK_N, PER_PAIR)
    if expert < 0:
        return
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_x + offs_k[None, :]  # gather: the prologue permutes
    pid_n = tl.program_id(0) % tl.cdiv(I, BLOCK_N)
    if W13:  # the tile's 2 BLOCK_N rows of W13_e: h1's and h3's columns of this tile, interleaved
        offs_w = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        w_off = expert.to(tl.int64) * stride_we + offs_w[None, :] * stride_wn + offs_k[:, None]  # (BK, 2 BN)
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            k_ok = offs_k < D - k
            xt = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & (offs_w[None, :] < 2 * I)
            acc = _dot(xt, _w_tile(w1_ptr, w1_desc, w_off, w_mask, expert * 2 * I + pid_n * 2 * BLOCK_N, k, W_DESC),
                       acc, PRECISION)
            x_ptrs += BLOCK_K
            w_off += BLOCK_K
        acc1, acc3 = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    else:
        w_off = expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # W^T tile (BK, BN)
        w_row = expert * I + pid_n * BLOCK_N  # the tile's first row of W_e, as (E*I, d)
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            k_ok = offs_k < D - k
            xt = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & (offs_n[None, :] < I)
            acc1 = _dot(xt, _w_tile(w1_ptr, w1_desc, w_off, w_mask, w_row, k, W_DESC), acc1, PRECISION)
            acc3 = _dot(xt, _w_tile(w3_ptr, w3_desc, w_off, w_mask, w_row, k, W_DESC), acc3, PRECISION)
            x_ptrs += BLOCK_K
            w_off += BLOCK_K
    ga = acc1 * tl.sigmoid(acc1) * acc3 * tl.load(gate_ptr + pair, mask=valid, other=0.0)[:, None]
    n_ok = (offs_n < I)[None, :]  # padding rows get zeros (x and g loaded as 0): dW2 reads ga's whole run
    if PER_PAIR:  # the padding lanes share row m with lane 0: they write nothing
        n_ok = n_ok & valid[:, None]
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_n[None, :]
    tl.store(h_ptrs, acc1.to(h_ptr.dtype.element_ty), mask=n_ok)
    tl.store(h_ptrs + I, acc3.to(h_ptr.dtype.element_ty), mask=n_ok)
    tl.store(ga_ptr + rows[:, None] * stride_ga + offs_n[None, :], ga.to(ga_ptr.dtype.element_ty), mask=n_ok)
    if SAVE_X:
        n_tiles = tl.cdiv(I, BLOCK_N)
        _save_rows(x_ptr + tok[:, None] * stride_x, xs_ptr + rows[:, None] * D, valid, D, tl.program_id(0) % n_tiles,
                   n_tiles, BLOCK_K)

@triton.jit
def _mm_loop(acc, a_ptr, a_desc, a_off, a_row, a_col, w_ptrs, K, offs_k, n_ok, stride_wk, A_DESC: tl.constexpr,
             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a[tile rows, a_col : a_col + K] @ W (K rows from w_ptrs). a by pointer (a_ptr + a_off, masked at K),
    or through a_desc from row a_row, unmasked: its columns past K must be past a's edge, zero-filled there."""
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        if A_DESC:
            at = a_desc.load([a_row, a_col + k])
        else:
            at = tl.load(a_ptr + a_off, mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(at, wt, acc, PRECISION)
        a_off += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return acc

@triton.jit
def _moe_mm_kernel(a_ptr, a_desc, w_ptr, w2nd_ptr, out_ptr, sorted_pair_ptr, block_expert_ptr,
                   n_pairs, K, N, stride_a, stride_we, stride_wk, stride_wn, stride_out, TWO: tl.constexpr,
                   ALIGN_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PER_PAIR: tl.constexpr, A_DESC: tl.constexpr, PRECISION: tl.constexpr):
    """out[pair] = a[rows] @ W_e (one tile of N), a in the sorted layout, out scattered to
    pair (token-major) order. TWO: a holds 2K columns and W_e is w_ptr for the first K, w2nd_ptr for the rest
    (dx = dh1 W1 + dh3 W3). W_e[k, n] sits at expert * stride_we + k * stride_wk + n * stride_wn.
    A_DESC: a's tiles come through the TMA descriptor a_desc (a_ptr None), never with PER_PAIR (a row per pair,
    not a tile of contiguous rows) and with TWO only when BLOCK_K divides K: the first K columns' last tile would
    read the second K's first columns, which no zero fill masks."""
    expert, rows, pair, valid, _, offs_n = _tile(N, sorted_pair_ptr, block_expert_ptr, n_pairs, 1, ALIGN_M, BLOCK_M,
                                                 BLOCK_N, PER_PAIR)
    if expert < 0:
        return
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    a_off = rows[:, None] * stride_a + offs_k[None, :]
    a_row = tl.program_id(0) // tl.cdiv(N, BLOCK_N) * BLOCK_M  # the tile's first row, as _tile numbers them
    w_off = expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _mm_loop(acc, a_ptr, a_desc, a_off, a_row, 0, w_ptr + w_off, K, offs_k, n_ok, stride_wk, A_DESC, BLOCK_K,
                   PRECISION)
    if TWO:
        acc = _mm_loop(acc, a_ptr, a_desc, a_off + K, a_row, K, w2nd_ptr + w_off, K, offs_k, n_ok, stride_wk, A_DESC,
                       BLOCK_K, PRECISION)
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])

@triton.jit
def _moe_down_bwd_kernel(dy_ptr, w2_ptr, da_ptr, dys_ptr, sorted_pair_ptr, block_expert_ptr, n_pairs, top_k, D, I,
                         stride_dy, stride_we, stride_wd,
                         ALIGN_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Backward through the down projection, one tile of BLOCK_N columns of I: da_raw = dy[tok] W2_e, stored in the
    sorted layout (zeros in padding rows) for _moe_swiglu_bwd_kernel. The row tile's programs also store the dy rows
    they gather, dys = dy[tok] in the sorted layout (zeros in padding rows), for dW2 = dys^T (g a) with the
    forward's g a. The SwiGLU backward is a kernel of its own: in this one's epilogue it held the tile's h1, h3 and
    temporaries beside the accumulator, and the registers spilled (README, "Training step")."""
    expert, rows, pair, valid, tok, offs_n = _tile(I, sorted_pair_ptr, block_expert_ptr, n_pairs, top_k, ALIGN_M,
                                                   BLOCK_M, BLOCK_N, False)
    if expert < 0:
        return
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < I
    dy_ptrs = dy_ptr + tok[:, None] * stride_dy + offs_k[None, :]  # gather dy by token
    w_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k
        dyt = tl.load(dy_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(dyt, tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, PRECISION)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wd
    tl.store(da_ptr + rows[:, None] * I + offs_n[None, :], acc.to(da_ptr.dtype.element_ty), mask=n_ok[None, :])
    n_tiles = tl.cdiv(I, BLOCK_N)
    _save_rows(dy_ptr + tok[:, None] * stride_dy, dys_ptr + rows[:, None] * D, valid, D, tl.program_id(0) % n_tiles,
               n_tiles, BLOCK_K)

@triton.jit
def _moe_swiglu_bwd_kernel(da_ptr, h_ptr, gate_ptr, dh_ptr, dg_ptr, sorted_pair_ptr, n_pairs, I,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The SwiGLU backward over BLOCK_R sorted rows, all I columns in chunks of BLOCK_C: with da_raw from
    _moe_down_bwd_kernel, a = silu(h1) h3 recomputed from h, and g the pair's gate,
    dg = da_raw . a (one per pair: dL/dg = dy . (a W2^T));  da = g da_raw;  dh1 = da h3 silu'(h1), dh3 = da silu(h1).
    Padding rows write zeros (g is 0 there), so every row of dh is defined for the weight gradients."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    pair = tl.load(sorted_pair_ptr + rows)
    valid = pair < n_pairs
    g = tl.load(gate_ptr + pair, mask=valid, other=0.0)
    dg = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c in range(0, I, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        ok = (cols < I)[None, :]
        da_raw = tl.load(da_ptr + rows[:, None] * I + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        h_ptrs = h_ptr + rows[:, None] * (2 * I) + cols[None, :]
        h1 = tl.load(h_ptrs, mask=valid[:, None] & ok, other=0.0).to(tl.float32)
        h3 = tl.load(h_ptrs + I, mask=valid[:, None] & ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(h1)
        silu = h1 * sig
        dg += tl.sum(da_raw * silu * h3, axis=1)
        da = da_raw * g[:, None]
        dh_ptrs = dh_ptr + rows[:, None] * (2 * I) + cols[None, :]
        tl.store(dh_ptrs + I, (da * silu).to(dh_ptr.dtype.element_ty), mask=ok)  # dh3 = da silu(h1)
        dh1 = da * h3 * sig * (1.0 + h1 * (1.0 - sig))  # silu'(h) = sig(h) (1 + h (1 - sig(h)))
        tl.store(dh_ptrs, dh1.to(dh_ptr.dtype.element_ty), mask=ok)
    tl.store(dg_ptr + pair, dg, mask=valid)

@triton.jit
def _moe_wgrad_kernel(l_ptr, r_ptr, l_desc, r_desc, out_ptr, out2_ptr, pad_start_ptr, pad_end_ptr, P, P1, Q, stride_l,
                      stride_r, stride_oe, stride_op, SPLIT: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DESC: tl.constexpr, PRECISION: tl.constexpr):
    """G[e] (P, Q) = sum over expert e's rows of L[row]^T R[row], both sides in the sorted layout (x and dy were
    stored there by the kernels that gathered them), padding rows zero on both: a plain grouped GEMM over each
    expert's run of rows, which starts and ends on a multiple of BLOCK_K. SPLIT: rows p < P1 of G go to out[e],
    the rest to out2[e] at p - P1: dW1 and dW3 are the two halves of one GEMM dh^T xs with dh = [dh1 ; dh3], so
    each program keeps one accumulator (two, one per weight, spilled registers at 128 x 128 tiles). Without SPLIT
    (dW2) out2_ptr is None and there is no second store in the code at all: torch.compile reads which arguments a
    kernel stores to from its code and copies each separately, so one tensor passed as both out_ptr and out2_ptr
    came back as the copy the kernel never wrote (uninitialized dW2 in every compiled step). An expert with no
    tokens writes zeros. The grid is (tiles, experts), tiles first, so the programs of one expert run side by side
    and its rows are read from memory once and from L2 after: experts first spread every wave over all of them.
    DESC: both sides come through TMA descriptors (l_ptr, r_ptr None); P and Q are the full widths of L and R
    (SPLIT's P too), so the zero fill past their edges is the pointer loads' mask."""
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    n_tiles = tl.cdiv(Q, BLOCK_Q)
    pid_p, pid_q = pid // n_tiles, pid % n_tiles
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok, q_ok = offs_p < P, offs_q < Q
    lo = tl.load(pad_start_ptr + expert)
    hi = tl.load(pad_end_ptr + expert)
    rows = (lo + tl.arange(0, BLOCK_K)).to(tl.int64)
    l_off = rows[:, None] * stride_l + offs_p[None, :]
    r_off = rows[:, None] * stride_r + offs_q[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for row in range(lo, hi, BLOCK_K):
        if DESC:
            lt = l_desc.load([row, pid_p * BLOCK_P])
            rt = r_desc.load([row, pid_q * BLOCK_Q])
        else:
            lt = tl.load(l_ptr + l_off, mask=p_ok[None, :], other=0.0)
            rt = tl.load(r_ptr + r_off, mask=q_ok[None, :], other=0.0)
        acc = _dot(tl.trans(lt), rt, acc, PRECISION)
        l_off += BLOCK_K * stride_l
        r_off += BLOCK_K * stride_r
    if SPLIT:
        first = offs_p < P1
        out_p = tl.where(first, offs_p, offs_p - P1)
        out_off = expert.to(tl.int64) * stride_oe + out_p[:, None] * stride_op + offs_q[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=(first & p_ok)[:, None] & q_ok[None, :])
        tl.store(out2_ptr + out_off, acc.to(out2_ptr.dtype.element_ty), mask=(~first & p_ok)[:, None] & q_ok[None, :])
    else:
        out_off = expert.to(tl.int64) * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])

# -------------------------------------------------------------------------
# AdamW kernel

@triton.jit
def _address(at, ALIGNED: tl.constexpr, BF16: tl.constexpr = False):
    """The fp32 (BF16: bf16) pointer stored at `at`; ALIGNED: said to be 16-byte aligned (AdamW.step checks), as a
    pointer read from memory is otherwise taken as aligned to its element's size only."""
    if BF16:
        p = tl.load(at).to(tl.pointer_type(tl.bfloat16))
    else:
        p = tl.load(at).to(tl.pointer_type(tl.float32))
    return tl.multiple_of(p, 16) if ALIGNED else p

@triton.jit
def _round_bf16(x):
    """fp32 x to the nearest bf16, ties to even, NaN kept: as torch's .bfloat16() and the GPU's cast round (Triton's
    interpreter truncates a cast, which would bias the moments toward zero in the CPU tests)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))

@triton.jit
def _adamw_kernel(table_ptr, n_tensors, n_search, scale_ptr, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
                  weight_decay, SCALE: tl.constexpr, ALIGNED: tl.constexpr, BF16_MOMENTS: tl.constexpr,
                  COPY: tl.constexpr, BLOCK: tl.constexpr):
    """One AdamW step over BLOCK elements of one of a param group's fp32 tensors, as torch.optim.AdamW (fused)
    takes it: the gradient divided by *scale_ptr (SCALE: the clip, model.clipped_step), decoupled weight decay, the
    two moments, the bias corrections 1 - beta^t from the tensor's step t already counted on the device
    (beta^t = 2^(t log2 beta)). The gradient is read, never written. BF16_MOMENTS: the moments are stored in bf16
    (DeepSeek-V3 §3.3.3), loaded into fp32, updated and used in fp32, and rounded to bf16 only as they are stored.
    All the group's tensors in one launch (a launch per tensor left the GPU waiting on Python's launch cost: 167 of
    them in the small MoE model): table is (10, n_tensors) int64, per tensor its first program, its size, the
    addresses of the parameter, gradient, exp_avg, exp_avg_sq, step and bf16 working copy, and the copy's row
    length and row stride (its rows of the parameter's last dimension may lie apart: W1's and W3's rows interleaved
    in moe.Experts' W13); each program finds its
    tensor by a binary search over the first programs. ALIGNED: every address a multiple of 16 bytes and every size
    a multiple of 16 (all the models' tensors are), said so, so that the loads and stores are 16-byte vectors:
    without it they went one element at a time, as the compiler cannot see the alignment of an address or a mask
    bound read from memory. COPY: every tensor of the launch has a bf16 working copy (the routed experts' weights,
    moe.Experts), written here with the new weights, rounded to nearest even as torch's cast rounds: the forward
    reads it instead of casting every expert weight at every micro-batch."""
    pid = tl.program_id(0)
    lo = pid * 0
    hi = lo + n_tensors - 1
    for _ in range(n_search):  # the last tensor whose first program is at or before this one
        mid = (lo + hi + 1) // 2
        here = tl.load(table_ptr + mid) <= pid
        lo, hi = tl.where(here, mid, lo), tl.where(here, hi, mid - 1)
    column = table_ptr + lo
    offs = (pid - tl.load(column)) * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(column + n_tensors)
    ok = offs < (tl.multiple_of(n, 16) if ALIGNED else n)
    p_ptr = _address(column + 2 * n_tensors, ALIGNED)
    g_ptr = _address(column + 3 * n_tensors, ALIGNED)
    m_ptr = _address(column + 4 * n_tensors, ALIGNED, BF16_MOMENTS)
    v_ptr = _address(column + 5 * n_tensors, ALIGNED, BF16_MOMENTS)
    step_ptr = _address(column + 6 * n_tensors, ALIGNED)
    t = tl.load(step_ptr)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    if SCALE:
        g = g / tl.load(scale_ptr)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0)
    m = beta1 * tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32) + (1.0 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
    p = p - lr * weight_decay * p
    step_size = lr / (1.0 - tl.exp2(t * log2_beta1))
    p = p - step_size * m / (tl.sqrt(v) / tl.sqrt(1.0 - tl.exp2(t * log2_beta2)) + eps)
    tl.store(p_ptr + offs, p, mask=ok)
    if COPY:
        row, row_stride = tl.load(column + 8 * n_tensors), tl.load(column + 9 * n_tensors)
        at = offs + offs // row * (row_stride - row)  # element offs of the parameter's copy
        if ALIGNED:  # row and row_stride multiples of 16 too: runs of 16 elements stay in one row
            at = tl.max_contiguous(tl.multiple_of(at, 16), 16)
        tl.store(_address(column + 7 * n_tensors, ALIGNED, True) + at, _round_bf16(p), mask=ok)
    if BF16_MOMENTS:
        m, v = _round_bf16(m), _round_bf16(v)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)

# -------------------------------------------------------------------------
# MLA decode kernels

@triton.jit
def _mla_decode_kernel(q_ptr, kv_ptr, o_ptr, lse_ptr, pos_ptr, M, H, chunk, scale_log2,
                       stride_qb, stride_qm, stride_kvb, stride_kvs, stride_ob, stride_os, stride_om,
                       stride_lb, stride_ls, C: tl.constexpr, R: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_R: tl.constexpr, FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One (sequence, tile of query rows, split of keys): online softmax over keys [lo, hi), the latents
    read once for all heads. Row m is query token m // H, head m % H; it sees keys s <= start_pos + m // H.
    start_pos is read from pos_ptr (device memory), so a captured CUDA graph replays at any position; a split
    that starts past the last key writes an empty result (lse = -inf), which the combine weighs 0."""
    b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    start_pos = tl.load(pos_ptr)
    end = start_pos + M // H  # one past the last key any query row sees
    last_key = start_pos + offs_m // H
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok, r_ok = offs_c < C, offs_r < R
    q_ptrs = q_ptr + b * stride_qb + offs_m[:, None] * stride_qm
    q_c = tl.load(q_ptrs + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    q_r = tl.load(q_ptrs + C + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    if FP32:
        q_c, q_r = q_c.to(tl.float32), q_r.to(tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, end)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: a row with no visible key stays NaN-free
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for s in range(lo, hi, BLOCK_N):
        keys = s + offs_n
        n_ok = keys < hi
        kv_ptrs = kv_ptr + b * stride_kvb + keys.to(tl.int64)[:, None] * stride_kvs
        k_c = tl.load(kv_ptrs + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)  # c_kv: key and value
        k_r = tl.load(kv_ptrs + C + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # k_pe
        if FP32:
            k_c, k_r = k_c.to(tl.float32), k_r.to(tl.float32)
        scores = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        scores = _dot(q_c, tl.trans(k_c), scores, PRECISION)
        scores = _dot(q_r, tl.trans(k_r), scores, PRECISION) * scale_log2
        visible = n_ok[None, :] & (keys[None, :] <= last_key[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(k_c.dtype), k_c, acc * alpha[:, None], PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # base 2
    o_ptrs = o_ptr + b * stride_ob + split * stride_os + offs_m[:, None] * stride_om + offs_c[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + split * stride_ls + offs_m, lse, mask=m_ok)

@triton.jit
def _mla_combine_kernel(o_ptr, lse_ptr, out_ptr, n_splits, M, stride_ob, stride_os, stride_om,
                        stride_lb, stride_ls, stride_outb, stride_outm, C: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, m] = sum_split exp2(lse_split - lse) o_split: the splits' softmaxes merged exactly."""
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    s_ok = offs_s < n_splits
    lse = tl.load(lse_ptr + b * stride_lb + offs_s * stride_ls + m, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 always holds key 0, so the max is finite
    w = w / tl.sum(w, axis=0)
    o = tl.load(o_ptr + b * stride_ob + offs_s[:, None] * stride_os + m * stride_om + offs_c[None, :],
                mask=s_ok[:, None] & (offs_c < C)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], axis=0)
    tl.store(out_ptr + b * stride_outb + m * stride_outm + offs_c, out.to(out_ptr.dtype.element_ty),
             mask=offs_c < C)


# -----------------------------------------------------------------------------
# Fused MoE: routing metadata, the autograd Function, the entry point

# Tiles. ALIGN_M: every expert's run of rows is padded to a multiple of it; each kernel takes tiles of BLOCK_M rows
# (a divisor of ALIGN_M, so a tile never straddles two experts). MOE_TILES: training-sized batches, the values
# `python bench.py --sections=tune` picked. SMALL_TILES: a few (token, expert) pairs per expert (decoding), where
# 128-row tiles would be nearly all padding: 16-row tiles, narrow N tiles so enough programs stream the weights.
# The interpreter gets small ones so the CPU tests cross several tiles, experts and splits.
MOE_TILES = dict(ALIGN_M=128,
                 up=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
                 down=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                 down_bwd=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                 swiglu_bwd=dict(BLOCK_R=16, BLOCK_C=128, num_warps=4),
                 dx=dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
                 wgrad=dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=32, num_warps=8, num_stages=4))
_SMALL = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
SMALL_TILES = dict(ALIGN_M=16, up=_SMALL, down=_SMALL, down_bwd=_SMALL, dx=_SMALL,
                   swiglu_bwd=dict(BLOCK_R=16, BLOCK_C=128, num_warps=4),
                   wgrad=dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_K=16, num_warps=4, num_stages=3))
SMALL_PAIRS = 4096  # up to this many (token, expert) pairs take SMALL_TILES
INTERPRET_TILES = dict(ALIGN_M=32, up=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
                       down=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), down_bwd=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
                       dx=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32), wgrad=dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_K=16),
                       swiglu_bwd=dict(BLOCK_R=16, BLOCK_C=32))


def moe_align(topk_ids, n_experts, align_m):
    """Sort the (token, expert) pairs by expert and pad each expert's rows to a multiple of align_m, on device.

    Returns sorted_pair (n_blocks * align_m,) int32: the pair p = token * K + k at each padded row (N*K for
    padding); block_expert (n_blocks,) int32: the expert of each block of align_m rows (-1 past the end);
    pad_start, pad_end (E,) int32: each expert's rows. n_blocks = cdiv(N*K, align_m) + min(E, N*K) bounds the
    padded length (at most N*K experts get a pair, each adds under align_m rows of padding), so nothing waits for
    the GPU; one sort, a count and one small kernel."""
    n_pairs = topk_ids.numel()
    flat = topk_ids.flatten()
    # each expert's pairs, by a compare and a column sum (a reduction under torch.compile): the kernel reads the
    # runs from them rather than searching the sorted ids, which took each of its programs ~2 log2(N K)
    # dependent loads (README, "Training step"); bincount would sync with the host, index_add_'s atomics serialize
    counts = (flat[:, None] == torch.arange(n_experts, device=flat.device)).sum(0, dtype=torch.int32)
    # the narrowest key that holds an expert id: a radix sort makes a pass per 8 bits of its key's type, so up to
    # 256 experts (DeepSeek-V3's count) take one pass where int32 took four. Stable: tokens ascend in each run.
    key = torch.uint8 if n_experts <= 256 else torch.int16 if n_experts <= 2 ** 15 else torch.int32
    sorted_e, order = flat.to(key).sort(stable=True)
    n_blocks = triton.cdiv(n_pairs, align_m) + min(n_experts, n_pairs)
    sorted_pair = torch.full((n_blocks * align_m,), n_pairs, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=topk_ids.device)
    pad = torch.empty(2, n_experts, dtype=torch.int32, device=topk_ids.device)
    BLOCK_E = triton.next_power_of_2(n_experts)
    BLOCK = max(16, 8192 // BLOCK_E)  # the (BLOCK, BLOCK_E) one-hot tiles stay small
    _moe_align_kernel[(triton.cdiv(max(n_pairs, n_blocks), BLOCK),)](
        sorted_e, order, counts, sorted_pair, block_expert, pad, n_pairs=n_pairs, n_blocks=n_blocks, E=n_experts,
        ALIGN_M=align_m, BLOCK_E=BLOCK_E, BLOCK=BLOCK,
        **({"num_warps": 8} if topk_ids.is_cuda else {}))
    return sorted_pair, block_expert, pad[0], pad[1]


def router_topk(choice, k):
    """The indices (N, k) int64 of each row's k largest entries of choice (N, E), largest first: torch.topk(choice,
    k).indices (ties, which torch leaves unspecified, to the lower index) in one launch, without torch's sort
    (what that cost the training step: README, "Training step")."""
    N, E = choice.shape
    ids = torch.empty(N, k, dtype=torch.int64, device=choice.device)
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T = min(max(1, 4096 // BLOCK_E), triton.next_power_of_2(N))  # decoding: a row or a few, one small tile
    _topk_kernel[(triton.cdiv(N, BLOCK_T),)](choice.detach().float().contiguous(), ids, N, E, K=k, BLOCK_T=BLOCK_T,
                                            BLOCK_E=BLOCK_E)
    return ids


def _launch_mm(a, w, out, sorted_pair, block_expert, n_pairs, K, N, w_strides, tiles, prec, w2nd=None, per_pair=False):
    """out[pair] = a[rows] @ W_e; with w2nd, a's 2K columns go through w then w2nd (dx = dh1 W1 + dh3 W3).
    a through a TMA descriptor where _moe_mm_kernel may take one (A_DESC) and _tma_desc gives one."""
    t = tiles["dx" if w2nd is not None else "down"]
    m_tiles = n_pairs if per_pair else sorted_pair.numel() // t["BLOCK_M"]
    grid = (m_tiles * triton.cdiv(N, t["BLOCK_N"]),)
    stride_we, stride_wk, stride_wn = w_strides
    # per pair: a row per pair, no tile of rows; w2nd: see A_DESC
    (a_arg,), (a_desc,), a_tma = _tma_args([a], [[t["BLOCK_M"], t["BLOCK_K"]]],
                                           allowed=not per_pair and (w2nd is None or K % t["BLOCK_K"] == 0))
    _moe_mm_kernel[grid](a_arg, a_desc, w, w2nd, out, sorted_pair,  # w2nd None: not TWO
                         block_expert, n_pairs=n_pairs, K=K, N=N, stride_a=a.stride(0), stride_we=stride_we,
                         stride_wk=stride_wk, stride_wn=stride_wn, stride_out=out.stride(0), TWO=w2nd is not None,
                         ALIGN_M=tiles["ALIGN_M"], PER_PAIR=per_pair, A_DESC=a_tma, PRECISION=prec, **t)


def _launch_wgrad(left, right, out, pad_start, pad_end, tiles, prec, out2=None):
    """out[e] = sum over expert e's rows of left^T right, both in the sorted layout; with out2, left holds the rows
    of both: the first out.shape[1] columns of left go to out, the rest to out2."""
    t = tiles["wgrad"]
    assert tiles["ALIGN_M"] % t["BLOCK_K"] == 0, "each expert's rows must be whole BLOCK_K steps"
    E, P1, Q = out.shape
    P = P1 + (out2.shape[1] if out2 is not None else 0)
    grid = (triton.cdiv(P, t["BLOCK_P"]) * triton.cdiv(Q, t["BLOCK_Q"]), E)
    ptrs, descs, tma = _tma_args([left, right], [[t["BLOCK_K"], t["BLOCK_P"]], [t["BLOCK_K"], t["BLOCK_Q"]]])
    _moe_wgrad_kernel[grid](*ptrs, *descs, out, out2, pad_start, pad_end, P=P, P1=P1, Q=Q,
                            stride_l=left.stride(0), stride_r=right.stride(0), stride_oe=out.stride(0),
                            stride_op=out.stride(1), SPLIT=out2 is not None, DESC=tma, PRECISION=prec, **t)


class _FusedMoE(torch.autograd.Function):
    """x (N, d), topk_ids (N, K), topk_weights (N, K) fp32, w1, w3 (E, I, d), w2 (E, d, I); the matmuls run in
    `dtype` (x and the weights are cast inside, so no cast sits in the autograd graph; c13, c2: the weights already
    in `dtype`, W1 and W3 as W13 (rows interleaved, (E, 2I, d)), or None). Returns (N, d) in x's dtype; the
    gradients come out in each input's own dtype (fp32 parameters get fp32 gradients straight from the kernels'
    fp32 accumulators, with no bf16 round trip)."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w1, w2, w3, c13, c2, dtype, per_pair, save_x):
        N, D = x.shape
        K = topk_ids.shape[1]
        E, I, _ = w1.shape
        n_pairs = N * K
        tiles, prec = _tiles(x, n_pairs), _precision(dtype)
        xc = x.to(dtype).contiguous()
        w13 = c13 is not None
        if w13:  # the working copies: no cast; W1 and W3 as strided views of W13 for the backward's dx
            (w1c, w3c), w2c = w13_parts(c13), c2
        else:
            w1c, w2c, w3c = (w.to(dtype).contiguous() for w in (w1, w2, w3))
        if per_pair:  # no sort: tile m is pair m, its expert read from the flat topk_ids (see _tile)
            sorted_pair, block_expert = None, topk_ids.contiguous().view(-1)
            rows = m_tiles = n_pairs
        else:
            sorted_pair, block_expert, pad_start, pad_end = moe_align(topk_ids, E, tiles["ALIGN_M"])
            rows = sorted_pair.numel()
            m_tiles = rows // tiles["up"]["BLOCK_M"]
        gate = topk_weights.detach().float().contiguous().view(-1)  # (N*K,), pair order
        h = torch.empty(rows, 2 * I, device=x.device, dtype=dtype)  # [h1 ; h3] per sorted row, saved
        ga = torch.empty(rows, I, device=x.device, dtype=dtype)  # g silu(h1) h3: the down projection's input, saved
        xs = torch.empty(rows, D, device=x.device, dtype=dtype) if save_x else None  # x[tok], sorted: for dW1, dW3
        t = tiles["up"]
        grid = (m_tiles * triton.cdiv(I, t["BLOCK_N"]),)
        # W1, W3 (or W13) through TMA: each expert's (I, d) (or (2I, d)) rows one after another, as one matrix
        if w13:
            (w_ptr,), (w_desc,), w_tma = _tma_args([c13.view(E * 2 * I, D)], [[2 * t["BLOCK_N"], t["BLOCK_K"]]])
            w_ptrs, w_descs, w_strides = [w_ptr, None], [w_desc, None], c13.stride()[:2]
        else:
            w_ptrs, w_descs, w_tma = _tma_args([w1c.view(E * I, D), w3c.view(E * I, D)],
                                               [[t["BLOCK_N"], t["BLOCK_K"]]] * 2)
            w_strides = w1c.stride()[:2]
        _moe_up_kernel[grid](xc, *w_ptrs, *w_descs, gate, h, ga, xs, sorted_pair, block_expert, n_pairs, K, D,
                             I, xc.stride(0), *w_strides, h.stride(0), ga.stride(0),
                             ALIGN_M=tiles["ALIGN_M"], PER_PAIR=per_pair, SAVE_X=save_x, W_DESC=w_tma, W13=w13,
                             PRECISION=prec, **t)
        out = torch.empty(n_pairs, D, device=x.device, dtype=dtype)  # (g a) W2_e: g * expert output, one row per pair
        # W2_e is (d, I): element [k over I, n over d] at k * 1 + n * I
        _launch_mm(ga, w2c, out, sorted_pair, block_expert, n_pairs, K=I, N=D,
                   w_strides=(w2c.stride(0), 1, w2c.stride(1)), tiles=tiles, prec=prec, per_pair=per_pair)
        if save_x:
            ctx.save_for_backward(xs, w1c, w2c, w3c, gate, h, ga, sorted_pair, block_expert, pad_start, pad_end)
        ctx.n_tokens = N
        ctx.top_k, ctx.dtypes = K, (x.dtype, topk_weights.dtype, w1.dtype, w2.dtype, w3.dtype)
        return out.view(N, K, D).sum(dim=1, dtype=x.dtype)  # the K experts of each token; fp32 sum

    @staticmethod
    def backward(ctx, dy):
        xs, w1, w2, w3, gate, h, ga, sorted_pair, block_expert, pad_start, pad_end = ctx.saved_tensors
        K, (x_dtype, g_dtype, w1_dtype, w2_dtype, w3_dtype) = ctx.top_k, ctx.dtypes
        N, D = ctx.n_tokens, xs.shape[1]
        E, I, _ = w1.shape
        n_pairs = N * K
        tiles, prec = _tiles(xs, n_pairs), _precision(xs.dtype)
        dy = dy.to(xs.dtype).contiguous()
        rows = sorted_pair.numel()
        t = tiles["down_bwd"]
        da = torch.empty(rows, I, device=xs.device, dtype=xs.dtype)  # dy[tok] W2_e, sorted
        dys = torch.empty(rows, D, device=xs.device, dtype=xs.dtype)  # dy[tok], sorted: for dW2
        _moe_down_bwd_kernel[(rows // t["BLOCK_M"] * triton.cdiv(I, t["BLOCK_N"]),)](
            dy, w2, da, dys, sorted_pair, block_expert, n_pairs, K, D, I, dy.stride(0), w2.stride(0), w2.stride(1),
            ALIGN_M=tiles["ALIGN_M"], PRECISION=prec, **t)
        dh = torch.empty(rows, 2 * I, device=xs.device, dtype=xs.dtype)
        dg_pair = torch.empty(n_pairs, device=xs.device, dtype=torch.float32)
        t = tiles["swiglu_bwd"]
        _moe_swiglu_bwd_kernel[(rows // t["BLOCK_R"],)](da, h, gate, dh, dg_pair, sorted_pair, n_pairs, I, **t)
        dx = dw1 = dw2 = dw3 = dg = None
        if ctx.needs_input_grad[0]:
            dx_pair = torch.empty(n_pairs, D, device=xs.device, dtype=xs.dtype)
            # W1_e is (I, d): element [k over I, n over d] at k * d + n
            _launch_mm(dh, w1, dx_pair, sorted_pair, block_expert, n_pairs, K=I, N=D,
                       w_strides=(w1.stride(0), w1.stride(1), 1), tiles=tiles, prec=prec, w2nd=w3)
            dx = dx_pair.view(N, K, D).sum(dim=1, dtype=x_dtype)
        if ctx.needs_input_grad[2]:
            dg = dg_pair.view(N, K).to(g_dtype)
        if ctx.needs_input_grad[4]:  # dW2_e = sum dy[tok]^T (g a), g a as the forward stored it
            dw2 = torch.empty(w2.shape, device=xs.device, dtype=w2_dtype)
            _launch_wgrad(dys, ga, dw2, pad_start, pad_end, tiles, prec)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[5]:  # dW1_e, dW3_e = sum dh1^T x[tok], sum dh3^T x[tok]
            dw1 = torch.empty(w1.shape, device=xs.device, dtype=w1_dtype)
            dw3 = torch.empty(w3.shape, device=xs.device, dtype=w3_dtype)
            _launch_wgrad(dh, xs, dw1, pad_start, pad_end, tiles, prec, out2=dw3)
        return dx, None, dg, dw1, dw2, dw3, None, None, None, None, None


def _tiles(x, n_pairs):
    if not x.is_cuda:
        return INTERPRET_TILES
    return SMALL_TILES if n_pairs <= SMALL_PAIRS else MOE_TILES


def w13_of(w1, w3, dtype=torch.bfloat16):
    """W13 (E, 2I, d): the rows of w1 and w3 (E, I, d) interleaved, W1_e[0], W3_e[0], W1_e[1], ..., in dtype, as
    fused_moe's copies take them (moe.Experts keeps one, which gpu_kernels.AdamW writes)."""
    return torch.stack((w1.detach(), w3.detach()), dim=2).flatten(1, 2).to(dtype).contiguous()


def w13_parts(w13):
    """(W1, W3) of W13 (E, 2I, d), each (E, I, d): views of its every other row, w13_of's inverse."""
    E, I2, d = w13.shape
    rows = w13.view(E, I2 // 2, 2, d)
    return rows[:, :, 0], rows[:, :, 1]


# No torch.compiler.disable here: torch.compile traces the autograd.Function and the Triton launches, so a compiled
# model does not break its graph at every MoE layer (README, "Training step").
def fused_moe(x, topk_ids, topk_weights, w1, w2, w3, copies=None):
    """Same contract as moe.experts_reference: sum_k topk_weights[t, k] * SwiGLU_{topk_ids[t, k]}(x[t]).

    x (N, d); topk_ids int64 (N, K); topk_weights fp32 (N, K), may require grad; w1, w3 (E, I, d); w2 (E, d, I).
    Returns (N, d) in x's dtype. The matmuls run in x's dtype, or in the autocast dtype where autocast is on (as
    nn.Linear's would), with fp32 accumulation. Without gradients and with no more (token, expert) pairs than
    experts (decoding), each pair is its own tile: no sort and no alignment pass, three launches in all.
    copies: (W13, w2) already in that dtype, contiguous (moe.Experts' working copies), W13 (E, 2I, d) holding the
    rows of w1 and w3 interleaved (W1_e[0], W3_e[0], W1_e[1], ...), read instead of a cast of the weights; the
    gradients still go to w1, w2, w3 in their own dtype. Ignored where the dtype or a shape differs."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, w1, w2, w3))
    per_pair = not needs_grad and topk_ids.numel() <= w1.shape[0]  # at most one pair per expert on average
    E, I, D = w1.shape
    if copies is None or not all(c.dtype == dtype and c.shape == shape and c.is_contiguous()
                                 for c, shape in zip(copies, ((E, 2 * I, D), w2.shape))):
        copies = (None, None)
    return _FusedMoE.apply(x, topk_ids, topk_weights, w1, w2, w3, *copies, dtype, per_pair, needs_grad)


# -----------------------------------------------------------------------------
# MLA decode entry point


# BLOCK_N keys per step (halved until num_stages of them fit in shared memory); programs_per_sm and min_keys set
# the split count: about programs_per_sm programs per SM, but no split shorter than min_keys keys.
MLA_TILES = dict(BLOCK_N=64, num_warps=4, num_stages=2, programs_per_sm=2, min_keys=256)
_SMS = {}


def _num_sms(device):
    if device.type != "cuda":
        return 4
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


@torch.compiler.disable  # Inductor miscompiles this kernel's dots; captured CUDA graphs replay it either way
def mla_decode(q, kv, start_pos, softmax_scale, kv_lora_rank, n_splits=None):
    """Same contract as mla.latent_attention: q (B, T, H, C + R) absorbed queries at positions start_pos..;
    kv (B, S, C + R) latents (a strided slice of the cache is fine), S >= start_pos + T. Returns (B, T, H, C).

    start_pos: an int, or a one-element integer tensor on q's device. With a tensor nothing about the launch
    depends on its value (the grid and the splits follow S, the kernel reads the position from memory): the call
    can be captured in a CUDA graph once and replayed at every decoding step.
    Split-KV (flash-decoding): the keys are cut into n_splits chunks so that B * splits programs fill the GPU
    even at batch 1; n_splits=None picks it (tests force it)."""
    B, T, H, CR = q.shape
    C, R = kv_lora_rank, CR - kv_lora_rank
    if isinstance(start_pos, torch.Tensor):
        pos, end = start_pos.reshape(1), kv.shape[1]  # end: the most keys any step can see
    else:
        pos, end = torch.full((1,), start_pos, dtype=torch.int64, device=q.device), start_pos + T
    M = T * H  # query rows: (token, head)
    q = q.contiguous().view(B, M, CR)
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    fp32 = not (q.dtype == kv.dtype and q.dtype in (torch.bfloat16, torch.float16))
    BLOCK_M = max(16, min(64, triton.next_power_of_2(M)))
    BLOCK_C, BLOCK_R = triton.next_power_of_2(C), max(16, triton.next_power_of_2(R))
    row_bytes = (BLOCK_C + BLOCK_R) * (4 if fp32 else 2)
    BLOCK_N, stages = (MLA_TILES["BLOCK_N"], MLA_TILES["num_stages"]) if q.is_cuda else (16, 1)  # CPU: several steps
    while BLOCK_N > 16 and BLOCK_N * row_bytes * stages > 96 * 1024:  # the pipeline's key tiles in shared memory
        BLOCK_N //= 2
    m_tiles = triton.cdiv(M, BLOCK_M)
    if n_splits is None:
        n_splits = max(1, min(triton.cdiv(MLA_TILES["programs_per_sm"] * _num_sms(q.device), B * m_tiles),
                              triton.cdiv(end, MLA_TILES["min_keys"])))
    chunk = triton.cdiv(triton.cdiv(end, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(end, chunk)
    out = torch.empty(B, M, C, device=q.device, dtype=q.dtype)
    # one split writes the output itself; several write fp32 partial outputs that the combine kernel merges
    o_part = out[:, None] if n_splits == 1 else torch.empty(B, n_splits, M, C, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, n_splits, M, device=q.device, dtype=torch.float32)
    extra = dict(num_warps=MLA_TILES["num_warps"], num_stages=stages) if q.is_cuda else {}
    _mla_decode_kernel[(B, m_tiles, n_splits)](
        q, kv, o_part, lse, pos, M=M, H=H, chunk=chunk, scale_log2=softmax_scale * math.log2(math.e),
        stride_qb=q.stride(0), stride_qm=q.stride(1), stride_kvb=kv.stride(0), stride_kvs=kv.stride(1),
        stride_ob=o_part.stride(0), stride_os=o_part.stride(1), stride_om=o_part.stride(2), stride_lb=lse.stride(0),
        stride_ls=lse.stride(1), C=C, R=R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R,
        FP32=fp32, PRECISION=_precision(torch.float32 if fp32 else q.dtype), **extra)
    if n_splits == 1:
        return out.view(B, T, H, C)
    _mla_combine_kernel[(B, M)](o_part, lse, out, n_splits=n_splits, M=M, stride_ob=o_part.stride(0),
                                stride_os=o_part.stride(1), stride_om=o_part.stride(2), stride_lb=lse.stride(0),
                                stride_ls=lse.stride(1), stride_outb=out.stride(0), stride_outm=out.stride(1), C=C,
                                BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_C=BLOCK_C)
    return out.view(B, T, H, C)


# -----------------------------------------------------------------------------
# AdamW

ADAMW_TILES = dict(BLOCK=2048, num_warps=8)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, with its arguments, state and state_dict, whose step is one _adamw_kernel launch per
    param group where every parameter with a gradient is a plain fp32 CUDA tensor (on the CPU too with
    kernel=True: Triton's interpreter, for the tests); anywhere else, and for amsgrad, maximize, capturable,
    differentiable or a tensor lr, it is torch's own step. grad_scale, when set to a one-element tensor
    (model.clipped_step sets it to the clip's divisor), divides every gradient first, on either path.
    copies: None, or a function returning {id(parameter): its bf16 working copy} (Model.expert_copies: the routed
    experts' weights, moe.Experts); after every step each copy holds its parameter rounded to bf16, written by the
    kernel as it writes the parameter (2 bytes more per parameter instead of a 6-byte cast at every forward), or
    cast after torch's step."""

    def __init__(self, params, kernel=None, moments_dtype=torch.float32, copies=None, **kwargs):
        if moments_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moments_dtype must be torch.float32 or torch.bfloat16, not {moments_dtype}")
        super().__init__(params, **kwargs)
        self.kernel = kernel  # None: wherever usable(); True: always
        self.moments_dtype = moments_dtype  # of an fp32 parameter's exp_avg and exp_avg_sq, on either path
        self.copies = copies
        self.grad_scale = None

    def _copies(self, groups):
        """[(p, its bf16 copy)] for the parameters about to be stepped that have a copy, each checked to be one: bf16,
        of p's shape, its rows (p's last dimension) contiguous, one row stride apart (a contiguous tensor, or a
        view of every other row of one, as moe.Experts' W13 gives for W1 and W3)."""
        copies = self.copies() if self.copies is not None else {}
        pairs = [(p, copies[id(p)]) for _, params in groups for p in params if id(p) in copies]
        for p, c in pairs:
            rows_apart = c.dim() < 2 or all(c.stride(i) == c.stride(i + 1) * c.shape[i + 1] for i in range(c.dim() - 2))
            if not (c.dtype == torch.bfloat16 and c.shape == p.shape and c.device == p.device
                    and (c.is_contiguous() or c.stride(-1) == 1 and rows_apart)):
                raise ValueError(f"AdamW copies: a {c.dtype} {tuple(c.shape)} copy for a {tuple(p.shape)} parameter "
                                 f"on {p.device}: a working copy must be bf16, of its parameter's shape, its rows "
                                 f"contiguous and one stride apart")
        return pairs

    @torch.no_grad()
    def step(self, closure=None):
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        tensors = [t for _, params in groups for p in params for t in (p, p.grad)]
        plain = all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.is_contiguous()
                    for t in tensors)
        options = any(g[k] for g, _ in groups for k in ("amsgrad", "maximize", "capturable", "differentiable"))
        tensor_lr = any(isinstance(g["lr"], torch.Tensor) for g, _ in groups)
        here = all(usable(t) for t in tensors) if self.kernel is None else self.kernel
        copies = self._copies(groups)
        if not (HAS_TRITON and plain and here) or options or tensor_lr:
            self._hold_moments(float32=True)  # torch's step keeps them in the parameter's dtype
            try:
                return self._torch_step(closure)
            finally:
                self._hold_moments()
                for p, c in copies:
                    c.copy_(p)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = []
        for _, params in groups:
            for p in params:
                state = self.state[p]
                if not state:  # as torch's fused AdamW lays it out: the step count on the parameter's device
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                steps.append(state["step"])
        self._hold_moments()
        if steps:
            torch._foreach_add_(steps, 1.0)
        # the copy's address, row length and row stride; a contiguous copy is one row, its offsets not remapped
        copy_at = {id(p): [c.data_ptr(), max(1, c.numel()), max(1, c.numel())] if c.is_contiguous()
                   else [c.data_ptr(), c.shape[-1], c.stride(-2)] for p, c in copies}
        for group, params in groups:
            # size, 6 addresses (the copy's 0 where there is none), the copy's row length and row stride
            columns = [[p.numel()] + [t.data_ptr() for t in self._tensors(p)] + copy_at.get(id(p), [0, 16, 16])
                       for p in params]
            kinds = [(all(c % 16 == 0 for c in column), column[6] != 0) for column in columns]
            for kind in sorted(set(kinds)):  # a launch per (aligned, with a copy) kind present
                self._launch(group, [c for c, k in zip(columns, kinds) if k == kind], *kind, params[0].device)
        return loss

    def _hold_moments(self, float32=False):
        """Each fp32 parameter's moments in moments_dtype (float32: in fp32, for torch's step), converted where they
        are not: once after a load or a step on the other path, a dtype check per tensor otherwise."""
        dtype = torch.float32 if float32 else self.moments_dtype
        for p, state in self.state.items():
            for k in ("exp_avg", "exp_avg_sq") if p.dtype == torch.float32 else ():
                t = state.get(k)
                if torch.is_tensor(t) and t.dtype != dtype:
                    state[k] = t.to(dtype)

    def load_state_dict(self, state_dict):
        """torch's, then the loaded state in the layout the kernel reads through raw addresses: a step count kept
        on the host (by a non-fused step) or moments in another dtype or layout go to the parameter's device,
        contiguous, the step in fp32 and the moments in moments_dtype, once here rather than checked at every step
        (torch's load casts the moments to the parameter's dtype: bf16 ones saved come back exactly)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for k in ("step", "exp_avg", "exp_avg_sq") if p.dtype == torch.float32 else ():
                t = state.get(k)
                dtype = torch.float32 if k == "step" else self.moments_dtype
                if torch.is_tensor(t) and (t.device != p.device or t.dtype != dtype or not t.is_contiguous()):
                    state[k] = t.to(p.device, dtype).contiguous()

    def _tensors(self, p):
        s = self.state[p]
        return p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"]

    def _launch(self, group, columns, aligned, copy, device):
        """One _adamw_kernel launch over the tensors of columns (each: size, then the parameter's, gradient's,
        moments', step's and copy's addresses, the copy's row length and row stride), with their table; copy: every
        one of them has a copy."""
        BLOCK = ADAMW_TILES["BLOCK"]
        blocks = [(c[0] + BLOCK - 1) // BLOCK for c in columns]
        first = list(itertools.accumulate(blocks, initial=0))
        table = torch.tensor([first[:-1]] + [list(row) for row in zip(*columns)], dtype=torch.int64)
        cuda = device.type == "cuda"
        if cuda:  # pinned: the copy waits for nothing queued before it
            table = table.pin_memory().to(device, non_blocking=True)
        beta1, beta2 = group["betas"]
        _adamw_kernel[(first[-1],)](
            table, len(columns), len(columns).bit_length(), self.grad_scale, lr=group["lr"], beta1=beta1,
            beta2=beta2, log2_beta1=math.log2(beta1), log2_beta2=math.log2(beta2), eps=group["eps"],
            weight_decay=group["weight_decay"], SCALE=self.grad_scale is not None, ALIGNED=aligned,
            BF16_MOMENTS=self.moments_dtype == torch.bfloat16, COPY=copy, BLOCK=BLOCK,
            **({"num_warps": ADAMW_TILES["num_warps"]} if cuda else {}))

    def _torch_step(self, closure):
        if self.grad_scale is not None and not self.defaults.get("fused"):  # only the fused step takes a divisor
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_div_(grads, self.grad_scale)
            scale, self.grad_scale = self.grad_scale, None
            try:
                return super().step(closure)
            finally:
                self.grad_scale = scale
        return super().step(closure)
