"""
DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeekMoE, arXiv 2401.06066; DeepSeek-V3 section 2.1.2;
Wang et al., arXiv 2408.15664). Also the SwiGLU FFN used for the dense layers and the shared experts.

    h' = u + sum_{i<=N_s} FFN_shared_i(u) + sum_{i<=N_r} g_i FFN_routed_i(u)          (V3 eq. 12)
    s_i = sigmoid(u . e_i)   (V3, score_func="sigmoid")   or   softmax_i(u . e_i)   (V2, "softmax")
    chosen = top-K_r of (s_i + b_i)          the bias b only CHOOSES experts          (V3 eq. 16)
    g_i = s_i / sum_{chosen} s_j * route_scale  for chosen i (the normalization when norm_topk)

b (`expert_bias`) is a buffer: no gradient, no weight decay. After each optimizer step the trainer calls
update_bias(gamma) with the tokens each expert received during that step: b_i += gamma * sign(mean(c) - c_i).
Overloaded experts get chosen less, idle ones more, and no auxiliary loss pulls on the language-model gradient.
The V3 sequence-wise balance loss and the classic batch aux loss are here too, for ablations, and what measures
the routing: MaxVio (Wang et al. eq. 6), the routing recorder, and the mutual information between the kind of
input and the expert chosen.
"""
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpu_kernels


class FFN(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers, and the fused shared experts."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def experts_reference(x, topk_ids, topk_weights, w1, w2, w3):
    """sum_k topk_weights[t, k] * SwiGLU_{topk_ids[t, k]}(x[t]): sort (token, expert) pairs by expert, run each
    expert once on its contiguous slice, scatter the weighted rows back. Experts with no tokens are skipped.

    x (N, d); topk_ids, topk_weights (N, K); w1, w3 (E, I, d); w2 (E, d, I). Returns (N, d).
    """
    N, K = topk_ids.shape
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)  # pair order grouped by expert
    token_of_pair = order // K
    counts = torch.bincount(flat_ids, minlength=w1.shape[0]).tolist()  # one host sync per layer
    xs = x[token_of_pair]  # (N*K, d), rows grouped by expert
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = xs[start:start + n]
        outs.append((F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())) @ w2[e].t())
        start += n
    ys = torch.cat(outs) * topk_weights.flatten()[order].unsqueeze(-1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)


class Experts(nn.Module):
    """N_r fine-grained routed SwiGLU experts, weights stacked so one grouped GEMM can run them all.

    Working copies: in training under bf16 autocast on the kernels, fused_moe reads bf16 copies of the three fp32
    weights (the non-persistent buffers w13_bf16, w2_bf16) instead of casting all of them at every micro-batch, a
    read of 4 bytes and a write of 2 per expert weight (README, "Training step"). w13_bf16 (E, 2I, d) holds W1's
    and W3's rows interleaved (W1_e[0], W3_e[0], W1_e[1], ...), so that the up projection multiplies by both in
    one dot; weight_copies() gives each weight its part of them, a view. gpu_kernels.AdamW
    writes the copies as it writes the weights (Model.configure_optimizers hands it Model.expert_copies), so they
    are cast only where a weight changed another way: refresh_copies(), which Model.forward calls in training,
    recasts them when a weight's version (which every torch in-place op bumps: load_state_dict, torch's optimizer
    step, an edit under no_grad) or storage is not the one they were cast from. An edit through .data bumps no
    version: call drop_copies() after one. eval() drops them, freeing their memory."""

    COPIES = ("w13_bf16", "w2_bf16")

    def __init__(self, n_experts, dim, inter_dim, use_kernels=True):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate, like nn.Linear: (out, in)
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up
        self.use_kernels = use_kernels
        for name in self.COPIES:
            self.register_buffer(name, None, persistent=False)
        self.copied_from = None  # (version, address) of each weight the copies were cast from

    def on_kernels(self, x):
        """Take the Triton paths (the experts, and the router's top-k) for this input?"""
        return self.use_kernels and gpu_kernels.usable(x)

    def weights(self):
        return self.w1, self.w2, self.w3

    def copies(self):
        """(w13_bf16, w2_bf16), what fused_moe reads, or None where there are none."""
        return None if self.w13_bf16 is None else tuple(getattr(self, name) for name in self.COPIES)

    def weight_copies(self):
        """((w1, its copy), (w2, ...), (w3, ...)): each weight with the part of the copies that holds its bf16 cast
        (W1's and W3's every other row of w13_bf16), or () where there are none."""
        if self.w13_bf16 is None:
            return ()
        c1, c3 = gpu_kernels.w13_parts(self.w13_bf16)
        return (self.w1, c1), (self.w2, self.w2_bf16), (self.w3, c3)

    def drop_copies(self):
        for name in self.COPIES:
            setattr(self, name, None)
        self.copied_from = None

    @torch.no_grad()
    def refresh_copies(self):
        """Make the working copies bf16 casts of the weights as they are now (fp32 plain tensors only: not bf16
        weights, not FSDP's sharded DTensors), casting only where they were made from another version."""
        if not all(type(w.data) is torch.Tensor and w.dtype == torch.float32 for w in self.weights()):
            self.drop_copies()
            return
        now = tuple((w._version, w.data_ptr()) for w in self.weights())
        if self.copies() is not None and now == self.copied_from:
            return
        E, I, d = self.w1.shape
        for name, shape in zip(self.COPIES, ((E, 2 * I, d), self.w2.shape)):
            c = getattr(self, name)
            if c is None or c.shape != shape or c.device != self.w1.device:
                setattr(self, name, torch.empty(shape, dtype=torch.bfloat16, device=self.w1.device))
        for w, c in self.weight_copies():
            c.copy_(w)
        self.copied_from = now

    def train(self, mode=True):
        if not mode:
            self.drop_copies()
        return super().train(mode)

    def forward(self, x, topk_ids, topk_weights):
        if self.on_kernels(x):
            copies = self.copies() if self.training else None  # fused_moe ignores them outside bf16 autocast
            return gpu_kernels.fused_moe(x, topk_ids, topk_weights, self.w1, self.w2, self.w3, copies)
        return experts_reference(x, topk_ids, topk_weights, self.w1, self.w2, self.w3)


def balance_loss(probs, topk_ids, n_experts):
    """sum_i f_i P_i per group of tokens, averaged over groups (V3 eqs. 17-20; DeepSeekMoE eqs. 12-14).

    probs (G, T, E): affinities normalized over experts (s_i,t / sum_j s_j,t); topk_ids (G, T, K).
    f_i = E / (K T) * #tokens choosing i (no gradient),  P_i = mean_t probs_i,t.
    G = batch size gives V3's sequence-wise loss; G = 1 over all tokens gives the classic batch aux loss.
    """
    G, T, K = topk_ids.shape
    counts = torch.zeros(G, n_experts, device=probs.device).scatter_add_(
        1, topk_ids.flatten(1), torch.ones(G, T * K, device=probs.device))
    f = counts * n_experts / (K * T)
    P = probs.mean(dim=1)
    return (f * P).sum(dim=1).mean()


def max_vio(counts):
    """MaxVio = (max_i c_i - mean_i c_i) / mean_i c_i (Wang et al. eq. 6); 0 is perfect balance."""
    counts = counts.float()
    return (counts.max() - counts.mean()) / counts.mean().clamp(min=1e-9)


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.score_func, self.norm_topk, self.route_scale = cfg.score_func, cfg.norm_topk, cfg.route_scale
        self.seq_aux_alpha, self.aux_alpha = cfg.seq_aux_alpha, cfg.aux_alpha
        self.gate = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)  # router: one centroid e_i per expert
        self.experts = Experts(cfg.n_experts, cfg.n_embd, cfg.moe_inter_dim, cfg.use_kernels)
        # N_s shared experts of hidden H are one SwiGLU of hidden N_s * H (same function, one matmul each)
        self.shared_experts = FFN(cfg.n_embd, cfg.n_shared * cfg.moe_inter_dim) if cfg.n_shared > 0 else None
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))  # b: saved, never trained by gradients
        # tokens routed to each expert by training forward passes since the last update_bias()
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts), persistent=False)
        self.aux_loss = None  # balance losses of the last forward, collected by the model
        self.on_route = None  # recording_routes(): called with each forward's (topk_ids, topk_weights)

    def route(self, x):
        """x (N, d) -> topk_ids (N, K), topk_weights (N, K) float32, scores (N, E) float32 (unbiased)."""
        # router in fp32 as transformers (and DeepSeek's HF code) run it, so a bf16 model picks the same experts
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias  # V3 eq. 16: the bias only chooses, it never weights
        if self.n_group > 1:  # group-limited routing: keep the best topk_group groups of experts
            groups = choice.view(x.shape[0], self.n_group, -1)
            if self.score_func == "sigmoid":  # V3: a group scores the sum of its two best experts
                group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
            else:  # V2: its best expert
                group_scores = groups.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            # -inf, not 0: with a negative s + b a zero-masked expert could still win
            choice = groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        if self.experts.on_kernels(x):
            topk_ids = gpu_kernels.router_topk(choice, self.top_k)  # one launch; torch.topk sorts
        else:
            topk_ids = choice.topk(self.top_k, dim=-1).indices
        topk_weights = scores.gather(1, topk_ids)
        if self.norm_topk:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, topk_weights * self.route_scale, scores

    def forward(self, x):
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        topk_ids, topk_weights, scores = self.route(flat)
        if self.on_route is not None:
            self.on_route(topk_ids, topk_weights)
        if self.training:  # count only training forward passes: the trainer's bias update reads these
            # a compare and a column sum: bincount on CUDA syncs with the host once per layer, and index_add_'s
            # atomics, all into n_experts counters, serialize (README, "Training step")
            experts = torch.arange(self.n_experts, device=topk_ids.device)
            self.tokens_per_expert += (topk_ids.reshape(-1, 1) == experts).sum(0)
        self.aux_loss = None
        if self.training and (self.seq_aux_alpha > 0 or self.aux_alpha > 0):
            probs = scores / scores.sum(dim=-1, keepdim=True)  # a no-op for softmax, normalizes sigmoid
            loss = 0.0
            if self.seq_aux_alpha > 0:  # per sequence (V3 eq. 17)
                loss = loss + self.seq_aux_alpha * balance_loss(probs.view(B, T, -1), topk_ids.view(B, T, -1), self.n_experts)
            if self.aux_alpha > 0:  # over the whole batch (DeepSeekMoE eq. 12)
                loss = loss + self.aux_alpha * balance_loss(probs[None], topk_ids[None], self.n_experts)
            self.aux_loss = loss
        y = self.experts(flat, topk_ids, topk_weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, d)

    @torch.no_grad()
    def update_bias(self, gamma, counts=None):
        """b_i += gamma * sign(mean(c) - c_i) (Wang et al. Algorithm 1; V3 section 2.1.2), then reset the counts.

        Call once per optimizer step, after all micro-batches; under DDP pass the all-reduced counts so every
        rank keeps identical biases. The bias is recentered to zero mean afterwards: adding a constant to every
        b_i changes no selection (top-k and group top-k are shift-invariant), and it keeps b from drifting.
        Returns the counts used.
        """
        c = (self.tokens_per_expert if counts is None else counts).float().clone()
        self.expert_bias += gamma * torch.sign(c.mean() - c)
        self.expert_bias -= self.expert_bias.mean()
        self.tokens_per_expert.zero_()
        return c


# -----------------------------------------------------------------------------
# measuring the routing


@contextmanager
def recording_routes(layers, keep):
    """with recording_routes(moe_layers, keep): ...  -- every forward pass of layers[i] inside the block calls
    keep(i, topk_ids (N, K), topk_weights (N, K)) with the choices it acts on (N = batch x positions, row-major).
    The one routing recorder: train.py's evaluation counts with it, sample.py --show_routing and study.py's
    specialization record with it. Run the model eagerly (not compiled) while it records."""
    for i, m in enumerate(layers):
        m.on_route = lambda ids, weights, i=i: keep(i, ids, weights)
    try:
        yield
    finally:
        for m in layers:
            m.on_route = None


def routing_counts(choices, domain, n_domains, n_experts):
    """(domains, experts) counts: each of a token's top-k choices (choices (N, K)) one (domain, expert) pair."""
    pairs = np.repeat(domain.astype(np.int64), choices.shape[1]) * n_experts + choices.reshape(-1)
    return np.bincount(pairs, minlength=n_domains * n_experts).reshape(n_domains, n_experts)


def mutual_information(counts):
    """I(domain; expert) in bits of a (domains, experts) table of counts: sum p(d, e) log2 p(d, e) / (p(d) p(e)).
    0 when the choice ignores the domain; H(domain) when each domain has experts of its own."""
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / outer[nz])).sum())
