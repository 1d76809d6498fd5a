"""
Multi-head Latent Attention (MLA), DeepSeek-V2 section 2.1 (also used unchanged by DeepSeek-V3).

Not cross-layer attention: every layer has its own attention. What is "latent" is the key/value cache.
Keys and values are rebuilt from one low-rank latent per token, c_kv (kv_lora_rank wide), plus one small RoPE
key k_pe shared by all heads, so the cache holds (kv_lora_rank + qk_rope_head_dim) values per token per layer
instead of 2 * n_head * head_dim.

    c_q   = RMSNorm(W_dq h)                      (q_lora_rank > 0; else q = W_q h)
    [q_nope ; q_pe]_i = (W_uq c_q)_i              per head
    [c_kv ; k_pe]     = W_dkv h                   one Linear: wkv_a
    c_kv  = RMSNorm(c_kv)
    [k_nope ; v]_i    = (W_ukv c_kv)_i            wkv_b
    score = (q_nope_i . k_nope_i + RoPE(q_pe_i) . RoPE(k_pe)) * softmax_scale

Two ways to compute the same thing, one switch (`attn_impl`):
  naive   materialize K and V from the latents and call F.scaled_dot_product_attention (training, prefill)
  absorb  fold W_uk into the query and W_uv after the weighted sum, and attend directly over the cached
          latents [c_kv ; k_pe]: multi-query attention with one (kv_lora_rank + qk_rope_head_dim)-wide key
          whose first kv_lora_rank entries are also the value (decoding).

The cache: LatentCache holds [c_kv ; k_pe] per token per layer and nothing else. MHACache holds what a model
without MLA would cache, per-head K and V, computed by this module's own projections: the baseline of the README's
latent-vs-MHA decoding numbers.

RoPE layout: interleaved pairs (x0,x1),(x2,x3)... exactly as DeepSeek's released weights expect, so checkpoints
load without permuting rows. Names follow DeepSeek-V3 inference/model.py (wq_a, wkv_a, kv_norm, wkv_b, wo).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpu_kernels

# -----------------------------------------------------------------------------
# RoPE (decoupled: applied to q_pe and k_pe only), with optional YaRN context extension


def yarn_mscale(factor, mscale=1.0):
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def precompute_rope(cfg, seq_len):
    """cos, sin tables of shape (seq_len, qk_rope_head_dim // 2) for the interleaved-pair rotation.

    With cfg.rope_factor > 1 the frequencies are YaRN-interpolated: dimensions that rotate fewer than beta_slow
    times over the original context are divided by the factor, those that rotate more than beta_fast times keep
    their frequency, and a linear ramp blends the ones in between (YaRN, Peng et al. 2023; DeepSeek-V2 App. B).
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    attn_factor = 1.0
    if cfg.rope_factor > 1:
        def correction_dim(n_rot):  # the dimension index that rotates n_rot times over the original context
            return dim * math.log(cfg.rope_original_max_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / cfg.rope_factor * ramp + inv_freq * (1 - ramp)
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            attn_factor = yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
        else:
            attn_factor = yarn_mscale(cfg.rope_factor)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return (angles.cos() * attn_factor).float(), (angles.sin() * attn_factor).float()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs of the last dim: (x0 + i x1) (cos + i sin). x (B, T, H, R); cos, sin (T, R/2).
    Two forms of the same rotation: eager, complex numbers as DeepSeek's code does it (three kernels, where the
    real-valued form takes nine); under torch.compile the real-valued form, which Inductor fuses into one kernel
    (it generates no code for complex operators and would fall back to eager kernels for them)."""
    if torch.compiler.is_compiling():
        return rotate_pairs(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, T, H, R/2)
    rotated = pairs * torch.complex(cos, sin)[:, None, :]
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def rotate_pairs(x, cos, sin):
    """apply_rope without complex numbers: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), in float32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, R/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


def latent_norm(norm, x):
    """norm(x) computed in the norm weight's dtype, returned in x's. Under autocast x comes out of a Linear in bf16
    while the weight is fp32; given both, RMSNorm leaves its fused kernel for a slower composite (with a warning).
    Upcasting x first computes the same fp32 result in the fused kernel."""
    return norm(x.to(norm.weight.dtype)).to(x.dtype)


# -----------------------------------------------------------------------------
# The latent cache


class LatentCache:
    """Decoding cache of every layer: [c_kv ; k_pe] per token, nothing else.

    kv: (n_layer, batch, max_len, kv_lora_rank + qk_rope_head_dim). One contiguous buffer so the decode kernel
    reads each token's 576-style row in one go; layer i uses kv[i].
    """

    def __init__(self, cfg, batch, max_len, device=None, dtype=torch.float32, n_layer=None):
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv = torch.zeros(n_layer or cfg.n_layer, batch, max_len, width, device=device, dtype=dtype)

    def layer(self, i):
        return self.kv[i]

    def nbytes(self):
        return self.kv.numel() * self.kv.element_size()


class MHACache:
    """The baseline the latent cache is measured against: per-head keys and values of every layer, materialized
    once per token, as a model without MLA caches them (same function, bigger cache; bench.py's decode section).
    k: (n_layer, B, max_len, n_head, qk_head_dim), v: (n_layer, B, max_len, n_head, v_head_dim)."""

    def __init__(self, cfg, batch, max_len, device=None, dtype=torch.float32):
        self.k = torch.zeros(cfg.n_layer, batch, max_len, cfg.n_head, cfg.qk_head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(cfg.n_layer, batch, max_len, cfg.n_head, cfg.v_head_dim, device=device, dtype=dtype)

    def layer(self, i):
        return self.k[i], self.v[i]

    def nbytes(self):
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


def cache_values_per_token(cfg):
    """Values cached per token over all layers: (MLA, standard multi-head attention with the same heads)."""
    mla = cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    mha = cfg.n_layer * 2 * cfg.n_head * cfg.v_head_dim  # a K and a V per head (DeepSeek-V2 Table 1)
    return mla, mha


# -----------------------------------------------------------------------------
# Absorbed attention over the latent cache (the spec for gpu_kernels.mla_decode)


def latent_attention(q, kv, start_pos, softmax_scale, kv_lora_rank):
    """Attention of absorbed queries over latent keys; returns the latent-space output.

    q:  (B, T, H, C + R)  [W_uk^T q_nope ; q_pe] per head, query t sits at position start_pos + t
    kv: (B, S, C + R)     cached [c_kv ; k_pe], S >= start_pos + T (rows past that are ignored)
    start_pos: an int, or a 0-d tensor (a captured decoding step: all S rows are read, the later ones masked)
    returns (B, T, H, C): sum_s softmax(q . kv_s) c_kv_s, causal.
    """
    T = q.shape[1]
    if not isinstance(start_pos, torch.Tensor):
        kv = kv[:, :start_pos + T]
    scores = torch.einsum("bthc,bsc->bhts", q.float(), kv.float()) * softmax_scale
    if T > 1 or isinstance(start_pos, torch.Tensor):  # query t may see keys s <= start_pos + t
        keys = torch.arange(kv.shape[1], device=q.device)
        future = keys[None, :] > (start_pos + torch.arange(T, device=q.device))[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhts,bsc->bthc", probs, kv[..., :kv_lora_rank].float())
    return out.to(q.dtype)


# -----------------------------------------------------------------------------


class MLA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.attn_impl = cfg.attn_impl  # "naive" | "absorb" | "auto" (naive for a fresh sequence, absorb when decoding)
        self.use_kernels = cfg.use_kernels
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.n_embd, cfg.n_head * self.qk_head_dim, bias=False)
        else:  # query compression (V2 eq. 12-13): down to q_lora_rank, normalize, up to all heads
            self.wq_a = nn.Linear(cfg.n_embd, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)  # latent norms: 1e-6 whatever norm_eps (DeepSeek, HF)
            self.wq_b = nn.Linear(self.q_lora_rank, cfg.n_head * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.n_embd, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)  # W_dkv and W_kr
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(self.kv_lora_rank, cfg.n_head * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_head * self.v_head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        """x (B, T, n_embd) at positions start_pos..start_pos+T-1; cos, sin (T, R/2) for those positions.
        cache: this layer's (B, max_len, C + R) slice of a LatentCache, its (k, v) of an MHACache, or None
        (training: attend over x only).
        start_pos: an int, or a 0-d device tensor (a decoding step captured in a CUDA graph: the cache row is
        written and read by position on the device, and nothing on the host depends on its value)."""
        B, T, _ = x.shape
        H, C, R, D = self.n_head, self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(latent_norm(self.q_norm, self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, H, self.qk_head_dim).split([D, R], dim=-1)  # (B, T, H, D), (B, T, H, R)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = self.wkv_a(x).split([C, R], dim=-1)  # (B, T, C), (B, T, R)
        c_kv = latent_norm(self.kv_norm, c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # one RoPE key shared by all heads
        if isinstance(cache, tuple):  # an MHACache layer: per-head K and V cached instead of the latents
            return self.wo(self._mha(q_nope, q_pe, c_kv, k_pe, *cache, start_pos).flatten(2))
        latents = torch.cat([c_kv, k_pe], dim=-1)  # (B, T, C + R): all that is ever cached
        on_device = isinstance(start_pos, torch.Tensor)
        if cache is not None:
            if on_device:
                cache[:B].index_copy_(1, start_pos + torch.arange(T, device=x.device), latents)
                latents = cache[:B]  # every row; the ones past the position are masked
            else:
                cache[:B, start_pos:start_pos + T] = latents
                latents = cache[:B, :start_pos + T]
        impl = self.attn_impl
        if impl == "auto":
            impl = "absorb" if on_device or start_pos > 0 else "naive"
        if impl == "naive":
            out = self._naive(q_nope, q_pe, latents, start_pos)
        else:
            out = self._absorb(q_nope, q_pe, latents, start_pos)
        return self.wo(out.flatten(2))

    def _naive(self, q_nope, q_pe, latents, start_pos):
        """Materialize per-head K and V from the latents, then ordinary attention."""
        B, T, H, _ = q_nope.shape
        S = latents.shape[1]
        c_kv, k_pe = latents.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_nope, v = self.wkv_b(c_kv).view(B, S, H, -1).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, dim)
        if not isinstance(start_pos, torch.Tensor) and start_pos == 0 and S == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # queries sit at start_pos.., keys at 0..: the causal mask is offset
            mask = torch.arange(S, device=q.device)[None, :] <= (start_pos + torch.arange(T, device=q.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2)  # (B, T, H, v_head_dim)

    def _absorb(self, q_nope, q_pe, latents, start_pos):
        """q_nope . (W_uk c) = (W_uk^T q_nope) . c  and  W_uv (sum_s p_s c_s): never materialize K or V."""
        wkv_b = self.wkv_b.weight.view(self.n_head, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = wkv_b.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, D, C), (H, V, C)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, C)
        q = torch.cat([q_latent, q_pe], dim=-1)  # (B, T, H, C + R)
        if self.use_kernels and gpu_kernels.usable(q):
            o_latent = gpu_kernels.mla_decode(q, latents, start_pos, self.softmax_scale, self.kv_lora_rank)
        else:
            o_latent = latent_attention(q, latents, start_pos, self.softmax_scale, self.kv_lora_rank)
        return torch.einsum("bthc,hvc->bthv", o_latent, w_uv)  # (B, T, H, v_head_dim)

    def _mha(self, q_nope, q_pe, c_kv, k_pe, k_cache, v_cache, start_pos):
        """What MLA computes, the pre-MLA way: the new tokens' per-head K and V, built from their latents (wkv_b),
        are appended to a K/V cache, then ordinary attention over it. start_pos: an int (several new tokens only
        at the start, the prefill) or a 0-d device tensor (every cache row read, the later ones masked)."""
        B, T, H, D = q_nope.shape
        R = self.qk_rope_head_dim
        k_nope, v = self.wkv_b(c_kv).view(B, T, H, D + self.v_head_dim).split([D, self.v_head_dim], dim=-1)
        k_new = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, R)], dim=-1)  # the RoPE key copied per head
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, qk_head_dim)
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(T, device=q.device)
            k_cache[:B].index_copy_(1, positions, k_new)
            v_cache[:B].index_copy_(1, positions, v)
            mask = torch.arange(k_cache.shape[1], device=q.device)[None, :] <= positions[:, None]
            k, v = k_cache[:B].transpose(1, 2), v_cache[:B].transpose(1, 2)  # (B, H, S, dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        else:
            if T > 1 and start_pos > 0:
                raise ValueError("the MHA cache takes several new tokens only at the start (prefill)")
            end = start_pos + T
            k_cache[:B, start_pos:end], v_cache[:B, start_pos:end] = k_new, v
            k, v = k_cache[:B, :end].transpose(1, 2), v_cache[:B, :end].transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.softmax_scale)
        return out.transpose(1, 2)  # (B, T, H, v_head_dim)
