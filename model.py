"""
The nanoseek model: a DeepSeek-V2/V3-style decoder. Config, blocks, multi-token prediction, the model.

    embed -> n_layer x [ x + MLA(RMSNorm(x)) ; x + FFN(RMSNorm(x)) ] -> RMSNorm -> head

The first n_dense_layers blocks use a dense SwiGLU FFN, the rest DeepSeekMoE (moe.py). Attention is Multi-head
Latent Attention (mla.py). Field names follow DeepSeek / Hugging Face transformers (README, "The config");
hf.py reads and writes DeepSeek checkpoint folders; generate.py decodes with the latent cache.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpu_kernels
from mla import MLA, precompute_rope, yarn_mscale
from moe import FFN, MoE

MAX_PARAMS = 2e12  # ModelConfig.validate: beyond DeepSeek-V3 (671B) with room to spare; refuses absurd sizes
MAX_LAYERS = 10_000
MAX_BLOCK_SIZE = 1 << 24
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
@dataclass
class ModelConfig:
    # defaults: the CPU model `python train.py` trains in a few minutes; config/train_small.py is the GPU "small"
    vocab_size: int = 2048           # tokens (prepare.py's default BPE); train.py takes the data's
    block_size: int = 64             # longest sequence (RoPE tables and the generation limit)
    n_layer: int = 4                 # blocks (num_hidden_layers)
    n_embd: int = 128                # model width (hidden_size)
    n_head: int = 4                  # attention heads (num_attention_heads)
    # --- MLA (DeepSeek-V2 section 2.1)
    q_lora_rank: int = 0             # query latent width; 0 = plain query projection (V2-Lite), V3 uses 1536
    kv_lora_rank: int = 32           # KV latent width d_c: the cache holds this + qk_rope_head_dim per token
    qk_nope_head_dim: int = 32       # per-head query/key dims without position (from the latent)
    qk_rope_head_dim: int = 16       # per-head query dims with RoPE; the RoPE key is one, shared by all heads
    v_head_dim: int = 32             # per-head value dim
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
    dense_inter_dim: int = 384       # dense FFN hidden size (intermediate_size); here (top_k + n_shared) * moe_inter_dim,
                                     # the MoE layers' active FFN width
    n_experts: int = 8               # routed experts (n_routed_experts)
    top_k: int = 2                   # routed experts per token (num_experts_per_tok)
    n_shared: int = 1                # shared experts, always on; fused into one SwiGLU (n_shared_experts)
    moe_inter_dim: int = 128         # hidden size of each expert (moe_intermediate_size)
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
    use_kernels: bool = True         # use gpu_kernels.py's Triton paths where they apply (CUDA + Triton); False = PyTorch
    # --- multi-token prediction (DeepSeek-V3 section 2.2)
    mtp_depth: int = 0               # D: MTP modules, module k predicts the token k + 1 ahead; 0 = off (V3: 1)
    mtp_loss_weight: float = 0.3     # lambda: the loss adds lambda * mean over depths of their cross-entropies

    def __post_init__(self):
        self.validate()  # first: the derived values below assume sane fields
        # derived values live here, nowhere else
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1 and self.rope_mscale_all_dim:
            self.softmax_scale *= yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) ** 2
        if self.norm_topk is None:
            self.norm_topk = self.score_func == "sigmoid"
        self.mtp_moe = self.n_layer > self.n_dense_layers  # MTP blocks are MoE when the model has MoE layers
        self.n_moe_layers = max(self.n_layer - self.n_dense_layers, 0) + (self.mtp_depth if self.mtp_moe else 0)

    def validate(self):
        """One clear line for a config that cannot work, before any tensor is made: every field of its type, every
        size in range, and the whole model under MAX_PARAMS, so a crafted config.json or checkpoint cannot make
        nanoseek allocate without end (even on the meta device, n_layer modules are real Python objects)."""
        def check(ok, msg):
            if not ok:
                raise ValueError(f"invalid config: {msg}")
        for f in fields(self):
            v = getattr(self, f.name)
            ok = type(v) is f.type or (f.type is float and type(v) is int) or (f.name == "norm_topk" and v is None)
            check(ok, f"{f.name} must be {f.type.__name__}, got {v!r}")
            if f.type is float:
                check(math.isfinite(v), f"{f.name} must be finite, got {v!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "rope_original_max_len", "dense_inter_dim", "n_experts", "top_k",
                     "moe_inter_dim", "n_group", "topk_group"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("q_lora_rank", "n_dense_layers", "n_shared", "seq_aux_alpha", "aux_alpha", "init_std",
                     "rope_mscale", "rope_mscale_all_dim", "mtp_depth", "mtp_loss_weight"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "rope_factor", "rope_beta_fast", "rope_beta_slow", "route_scale", "norm_eps"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check(self.n_layer <= MAX_LAYERS, f"n_layer ({self.n_layer}) is over {MAX_LAYERS}")
        check(self.block_size <= MAX_BLOCK_SIZE, f"block_size ({self.block_size}) is over {MAX_BLOCK_SIZE}")
        check(self.mtp_depth <= self.n_layer, f"mtp_depth ({self.mtp_depth}) is over n_layer ({self.n_layer})")
        check(self.score_func in ("sigmoid", "softmax"), f"score_func must be sigmoid or softmax, got {self.score_func!r}")
        check(self.attn_impl in ("auto", "naive", "absorb"), f"attn_impl must be auto, naive or absorb, got {self.attn_impl!r}")
        check(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")
        check(0 <= self.n_dense_layers <= self.n_layer, f"n_dense_layers ({self.n_dense_layers}) must be in 0..n_layer ({self.n_layer})")
        if self.n_layer > self.n_dense_layers:  # MoE layers
            check(1 <= self.top_k <= self.n_experts, f"top_k ({self.top_k}) must be in 1..n_experts ({self.n_experts})")
            check(self.n_group >= 1 and self.n_experts % self.n_group == 0,
                  f"n_experts ({self.n_experts}) must be divisible by n_group ({self.n_group})")
            check(1 <= self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be in 1..n_group ({self.n_group})")
            per_group = self.n_experts // self.n_group
            check(self.top_k <= self.topk_group * per_group,
                  f"top_k ({self.top_k}) exceeds the {self.topk_group * per_group} experts in topk_group groups")
            check(self.n_group == 1 or self.score_func == "softmax" or per_group >= 2,
                  "sigmoid group routing scores a group by its best two experts: need >= 2 experts per group")
        n_params = self.approx_params()
        check(n_params <= MAX_PARAMS, f"about {n_params:.2g} parameters, over the {MAX_PARAMS:.0e} nanoseek accepts")

    def approx_params(self):
        """The parameter count from the sizes alone (matrices only: norms and biases are a rounding error)."""
        d, H, qk = self.n_embd, self.n_head, self.qk_nope_head_dim + self.qk_rope_head_dim
        q = d * self.q_lora_rank + self.q_lora_rank * H * qk if self.q_lora_rank else d * H * qk
        attn = q + d * (self.kv_lora_rank + self.qk_rope_head_dim) + \
            self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim) + H * self.v_head_dim * d
        moe = 3 * d * self.moe_inter_dim * (self.n_experts + self.n_shared) + d * self.n_experts
        ffn = self.n_dense_layers * 3 * d * self.dense_inter_dim + (self.n_layer - self.n_dense_layers) * moe
        mtp = self.mtp_depth * (2 * d * d + attn + (moe if self.n_layer > self.n_dense_layers else 3 * d * self.dense_inter_dim))
        return self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.n_layer * attn + ffn + mtp

    def activation_floats(self):
        """Values one token keeps for the backward pass, roughly: per block its norms, projections, latents and
        attention output, and its FFN's hidden values (MoE: each routed expert's copy of the token and SwiGLU
        hidden, the shared experts', the router's scores); then the logits, their softmax and its gradient."""
        d, H = self.n_embd, self.n_head
        attn = 4 * d + H * 2 * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim) + \
            2 * (self.kv_lora_rank + self.q_lora_rank)
        moe = self.top_k * (2 * d + 3 * self.moe_inter_dim) + 3 * self.n_shared * self.moe_inter_dim + 3 * self.n_experts
        n_moe = self.n_layer - self.n_dense_layers
        blocks = self.n_layer * attn + self.n_dense_layers * 3 * self.dense_inter_dim + n_moe * moe
        return blocks * (1 + self.mtp_depth / self.n_layer) + 3 * self.vocab_size * (1 + self.mtp_depth)


class Block(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else FFN(cfg.n_embd, cfg.dense_inter_dim)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos)
        x = x + self.ffn(self.ffn_norm(x))
        return x


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3 section 2.2): h'_i = M_k [RMSNorm(Emb(t_(i+k))) ; RMSNorm(h_i)]
    (eq. 21; the embedding first, as the released weights expect), then one transformer block (eq. 22); its output,
    through its own RMSNorm and the model's shared head, predicts t_(i+k+1) (eq. 23)."""

    def __init__(self, cfg):
        super().__init__()
        self.enorm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.hnorm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)  # M_k
        self.block = Block(cfg, moe=cfg.mtp_moe)
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)  # the output head's norm (shared_head.norm)

    def forward(self, h, emb, cos, sin, cache=None, start_pos=0):
        """h (B, T, n_embd): the previous depth's states at positions start_pos..; emb: the embeddings of the
        tokens k ahead of them. Returns this depth's states (B, T, n_embd), before self.norm."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, cache, start_pos)


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layer)])
        self.mtp = nn.ModuleList([MTPModule(cfg) for _ in range(cfg.mtp_depth)])
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

    @torch.no_grad()
    def fill_buffers(self):
        """The buffers no state dict holds, for a model built on the meta device and then allocated (to_empty, by
        hf.from_pretrained and parallel.sharded_model): the RoPE tables, float32 whatever the weights' dtype, and
        the MoE layers' token counts."""
        cos, sin = precompute_rope(self.config, self.config.block_size)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        for m in self.moe_layers():
            m.tokens_per_expert.zero_()

    def moe_layers(self):
        blocks = list(self.layers) + [m.block for m in self.mtp]  # the MTP blocks balance like any other
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def rope(self, T, start_pos=0):
        """The RoPE rows (cos, sin) of positions start_pos..start_pos+T-1 (start_pos an int or a 0-d tensor)."""
        if isinstance(start_pos, torch.Tensor):  # a captured decoding step: rows picked on the device
            positions = start_pos + torch.arange(T, device=self.rope_cos.device)
            return self.rope_cos[positions], self.rope_sin[positions]
        if start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than block_size {self.config.block_size}")
        return self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]

    def hidden(self, idx, cache=None, start_pos=0):
        """The last block's output (B, T, n_embd), before the final norm: h^0 of the MTP modules."""
        cos, sin = self.rope(idx.shape[1], start_pos)
        x = self.embed(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layer(i), start_pos)
        return x

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        """idx (B, T) token ids at positions start_pos.. (an int, or a 0-d device tensor: see generate.CapturedStep);
        returns (logits (B, T, vocab), loss or None). loss = cross-entropy (targets == -1 ignored) + the enabled
        balance losses of the MoE layers + in training, with mtp_depth > 0, the MTP loss (V3 eq. 25)."""
        if self.training:
            self.refresh_expert_copies()
        h = self.hidden(idx, cache, start_pos)
        logits, loss = self.head_and_loss(h, targets)
        if targets is not None:
            if self.mtp:
                self.mtp_loss, self.mtp_accuracy = self.mtp_losses(h, targets)
                if self.training:  # eval reports the main head's loss alone, comparable with mtp_depth = 0
                    loss = loss + self.config.mtp_loss_weight * self.mtp_loss.mean()
            for m in self.moe_layers():
                if m.aux_loss is not None:
                    loss = loss + m.aux_loss
        return logits, loss

    def head_and_loss(self, h, targets=None):
        """The final norm, the head and the main cross-entropy (targets == -1 ignored): (logits, loss or None).
        One method, so train.py --compile_blocks compiles it as one region: the head's output, its float32 upcast
        and the log-softmax fused, instead of the float32 logits written and read again by each eager op."""
        logits = self.head(self.norm(h))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def mtp_losses(self, h, targets):
        """Cross-entropy and top-1 accuracy of each MTP depth, (D,) each (V3 eqs. 21-24). targets[:, i] is token
        i + 1, so depth k at position i reads the embedding of t_(i+k) = targets[:, i+k-1] and predicts
        t_(i+k+1) = targets[:, i+k], for the T - k positions where both exist."""
        T = h.shape[1]
        inputs = targets.clamp(min=0)  # an ignored (-1) target is never a prediction; as an input, any id will do
        losses, accuracy = [], []
        for k, module in enumerate(self.mtp, start=1):
            cos, sin = self.rope(T - k)
            h = module(h[:, :T - k], self.embed(inputs[:, k - 1:T - 1]), cos, sin)
            logits = self.head(module.norm(h)).float()
            want = targets[:, k:]
            losses.append(F.cross_entropy(logits.flatten(0, 1), want.flatten(), ignore_index=-1))
            counted = want != -1
            accuracy.append(((logits.argmax(-1) == want) & counted).sum() / counted.sum().clamp(min=1))
        return torch.stack(losses), torch.stack(accuracy).detach()

    @torch.compiler.disable  # eager: it reads version counters, which a compiled graph cannot guard on
    def refresh_expert_copies(self):
        """The routed experts' bf16 working copies (moe.Experts), current for a training forward under bf16
        autocast on the kernels; dropped elsewhere."""
        amp_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        for m in self.moe_layers():
            if amp_bf16 and m.experts.on_kernels(m.experts.w1):
                m.experts.refresh_copies()
            else:
                m.experts.drop_copies()

    def expert_copies(self):
        """{id(weight): its bf16 working copy} of every routed expert weight that has one: what
        gpu_kernels.AdamW writes as it steps the weights (configure_optimizers)."""
        return {id(w): c for m in self.moe_layers() for w, c in m.experts.weight_copies()}

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

    # -------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, moments_dtype=torch.float32):
        """AdamW; weight decay on matrices (linear, expert and embedding weights) only, not on norm weights.
        The expert bias is a buffer, so neither the optimizer nor weight decay ever sees it. moments_dtype: of the
        two moments (bf16 as DeepSeek-V3 §3.3.3 keeps them; the weights and gradients stay fp32)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"  # on CUDA with Triton, the step is gpu_kernels.AdamW's; without, torch's fused one
        return gpu_kernels.AdamW(groups, lr=learning_rate, betas=betas, fused=fused, moments_dtype=moments_dtype,
                                 copies=self.expert_copies)

    @torch.no_grad()
    def update_biases(self, gamma, counts=None):
        """Aux-loss-free balancing step for every MoE layer; counts: optional (n_moe_layers, n_experts) tensor
        (e.g. all-reduced across ranks). Returns the counts used, (n_moe_layers, n_experts)."""
        layers = self.moe_layers()
        used = [m.update_bias(gamma, None if counts is None else counts[i]) for i, m in enumerate(layers)]
        return torch.stack(used) if used else torch.zeros(0)


@torch.no_grad()
def clipped_step(optimizer, params, max_norm):
    """optimizer.step() with the gradients' global L2 norm clipped to max_norm (0: not clipped), as
    torch.nn.utils.clip_grad_norm_ and then the step. gpu_kernels.AdamW, or torch's fused AdamW, on plain tensors takes
    the clip as its grad_scale, the divisor GradScaler hands fused optimizers: the kernel divides each gradient as it
    reads it (torch's also writes it back divided), so the separate pass that rescaled every gradient, a read and a
    write of 4 bytes per parameter, is gone; the MoE model has 4-6x the dense model's parameters, by vocabulary
    (README, "Training step"). Elsewhere (foreach, DTensor gradients under FSDP2) it is clip_grad_norm_ then step. No
    host sync."""
    params = [p for p in params if p.grad is not None]
    if max_norm <= 0:
        optimizer.step()
        return
    takes_scale = isinstance(optimizer, gpu_kernels.AdamW) or optimizer.defaults.get("fused")
    if not (takes_scale and all(type(p.grad) is torch.Tensor for p in params)):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the step divides by its inverse
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = None


def cast_weights(model, dtype):
    """Parameters to dtype for inference (no per-step casts, half the bytes read per token in bf16). The router,
    the expert biases and the RoPE tables stay float32: routing compares s + b at full precision, as in training."""
    router = {id(m.gate.weight) for m in model.moe_layers()}  # fp32 as well, as hf.from_pretrained keeps it
    for p in model.parameters():
        if id(p) not in router:
            p.data = p.data.to(dtype)
    return model
