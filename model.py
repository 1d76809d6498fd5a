"""
The nanoseek model: a DeepSeek-V2/V3-style decoder. Config, blocks, model, and generation with the latent cache.

    embed -> n_layer x [ x + MLA(RMSNorm(x)) ; x + FFN(RMSNorm(x)) ] -> RMSNorm -> head

The first n_dense_layers blocks use a dense SwiGLU FFN, the rest DeepSeekMoE (moe.py). Attention is Multi-head
Latent Attention (mla.py). Field names follow DeepSeek / Hugging Face transformers (README, "The config");
hf.py reads and writes DeepSeek checkpoint folders.

Generation (Model.generate_stream): the prompt is prefilled once (naive MLA), then each new token attends to the
latent cache (absorbed MLA). On a GPU the decoding step is captured once in a CUDA graph and replayed: the step is
hundreds of small kernels whose launches, not the GPU, would otherwise set the speed (README, "Decoding").
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from mla import MLA, LatentCache, precompute_rope, yarn_mscale
from moe import FFN, MoE

MAX_PARAMS = 2e12  # ModelConfig.validate: beyond DeepSeek-V3 (671B) with room to spare; refuses absurd sizes
MAX_LAYERS = 10_000
MAX_BLOCK_SIZE = 1 << 24
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense bf16 tensor-core peak (datasheets, no sparsity) per GPU, for MFU; the first name found in the device's wins
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
              "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}


def peak_flops(device):
    """Dense bf16 peak of this CUDA device from PEAK_FLOPS, or None (CPU, or a GPU not in the table)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
    use_kernels: bool = True         # use kernels.py's Triton paths where they apply (CUDA + Triton); False = PyTorch
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
        # the parameter count from the sizes alone (matrices only: norms and biases are a rounding error)
        d, H, qk = self.n_embd, self.n_head, self.qk_nope_head_dim + self.qk_rope_head_dim
        q = d * self.q_lora_rank + self.q_lora_rank * H * qk if self.q_lora_rank else d * H * qk
        attn = q + d * (self.kv_lora_rank + self.qk_rope_head_dim) + \
            self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim) + H * self.v_head_dim * d
        moe = 3 * d * self.moe_inter_dim * (self.n_experts + self.n_shared) + d * self.n_experts
        ffn = self.n_dense_layers * 3 * d * self.dense_inter_dim + (self.n_layer - self.n_dense_layers) * moe
        mtp = self.mtp_depth * (2 * d * d + attn + (moe if self.n_layer > self.n_dense_layers else 3 * d * self.dense_inter_dim))
        n_params = self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.n_layer * attn + ffn + mtp
        check(n_params <= MAX_PARAMS, f"about {n_params:.2g} parameters, over the {MAX_PARAMS:.0e} nanoseek accepts")


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
            x = layer(x, cos, sin, None if cache is None else cache.kv[i], start_pos)
        return x

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        """idx (B, T) token ids at positions start_pos.. (an int, or a 0-d device tensor: see CUDAGraph);
        returns (logits (B, T, vocab), loss or None). loss = cross-entropy (targets == -1 ignored) + the enabled
        balance losses of the MoE layers + in training, with mtp_depth > 0, the MTP loss (V3 eq. 25)."""
        h = self.hidden(idx, cache, start_pos)
        logits = self.head(self.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
            if self.mtp:
                self.mtp_loss, self.mtp_accuracy = self.mtp_losses(h, targets)
                if self.training:  # eval reports the main head's loss alone, comparable with mtp_depth = 0
                    loss = loss + self.config.mtp_loss_weight * self.mtp_loss.mean()
            for m in self.moe_layers():
                if m.aux_loss is not None:
                    loss = loss + m.aux_loss
        return logits, loss

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
    # generation

    def new_cache(self, batch, max_len, device=None, dtype=None, mtp=False):
        """A LatentCache of the model's layers, and of its MTP blocks after them with mtp=True (speculation)."""
        p = self.embed.weight
        n = self.config.n_layer + (self.config.mtp_depth if mtp else 0)
        return LatentCache(self.config, batch, max_len, device or p.device, dtype or p.dtype, n_layer=n)

    def decode_step(self, tokens, pos, cache):
        """tokens (B, T) at positions pos.. (an int, or a 0-d device tensor when captured) -> the last position's
        logits (B, vocab) in float32, the cache updated. The one step generate_stream runs, prefill and decode."""
        return self(tokens, cache=cache, start_pos=pos)[0][:, -1].float()

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                        use_cache=True, cuda_graph=False, compile=False, cache=None, step=None, speculative=False,
                        stats=None):
        """Yield the next (B, 1) tokens one step at a time for the batch of prompts idx (B, T). Call in eval mode.

        use_cache: prefill the prompts once into a LatentCache ([c_kv ; k_pe] per token per layer, nothing else),
            then feed one token per step (absorbed MLA). A full cache (block_size) is refilled with the last half of
            the context at positions 0.. and decoding goes on. Without: recompute the whole sequence (its last
            block_size tokens) every step, as nanoGPT does.
        cuda_graph: capture the decoding step once in a CUDA graph and replay it every step (CUDAGraph; the
            prefill stays eager). The same math as the eager path (the same tokens in fp32), launched by the GPU.
            On a CPU it runs the same static, position-on-device step without capture.
        compile: with cuda_graph, torch.compile the decoding step before the capture: Inductor fuses its small
            elementwise kernels (norms, RoPE, router), so the graph replays fewer, fuller kernels.
        cache, step: another cache and its step(tokens, pos, cache) -> logits (B, vocab) (bench.py's MHA cache);
            default: a LatentCache of the model's dtype and Model.decode_step.
        speculative: draft with the first MTP module and verify with the model (speculate(); with cuda_graph its
            three steps are captured); stats: a dict that receives its counts of drafts and accepted drafts.
        """
        if speculative:
            yield from self.speculate(idx, max_new_tokens, temperature, top_k, top_p, generator, stats, cuda_graph)
            return
        B, T = idx.shape
        block_size = self.config.block_size
        if not use_cache:
            seq = idx
            for _ in range(max_new_tokens):
                nxt = sample_next(self(seq[:, -block_size:])[0][:, -1], temperature, top_k, top_p, generator)
                yield nxt
                seq = torch.cat([seq, nxt], dim=1)
            return
        max_len = min(T + max_new_tokens, block_size)
        cache = self.new_cache(B, max_len) if cache is None else cache
        step = step or self.decode_step
        logits, pos = step(idx, 0, cache), T  # prefill
        graph = None
        if cuda_graph and max_new_tokens > 1:  # captured before the first token, so the steps after it are all replays
            decode = torch.compile(step, dynamic=False) if compile else step

            def advance(tokens, p):  # one step at position p (a device tensor), which the graph then advances
                logits = decode(tokens, p, cache)
                p += 1
                return logits
            graph = CUDAGraph(advance, torch.zeros(B, 1, dtype=torch.long, device=idx.device),
                              torch.tensor(pos, device=idx.device))
        new = []  # the generated tokens, kept for a refill
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            yield nxt
            if i == max_new_tokens - 1:
                break
            new.append(nxt)
            if pos == max_len:  # cache full: keep the last half of the context, at positions 0.. (RoPE is absolute)
                keep = max(block_size // 2, 1)
                logits, pos = step(torch.cat([idx] + new, dim=1)[:, -keep:], 0, cache), keep
                if graph is not None:
                    graph.inputs[1].fill_(pos)
                continue
            logits = graph(nxt) if graph is not None else step(nxt, pos, cache)
            pos += 1

    @torch.no_grad()
    def speculate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stats=None,
                  cuda_graph=False):
        """Self-speculative decoding with the first MTP module (DeepSeek-V3 section 2.2 uses it so): it drafts the
        token after next, and one forward pass of the model over [token, draft] both checks the draft and gives
        the token after it. A draft d is accepted with probability min(1, p(d) / q(d)) (p: the model's filtered
        distribution, q: the draft's), else the token is drawn from max(0, p - q) normalized: the tokens have
        exactly the distribution of plain sampling (greedy: the draft is accepted when it is the argmax). A step
        emits two tokens when every row of the batch accepts, else one (the rows keep one shared position).
        With cuda_graph the three steps (verify two tokens; draft after two, or after one) are each captured
        once and replayed, the position in a device tensor; the host reads one flag per step (all accepted?).
        Yields (B, 1) tokens like generate_stream; stats gets {"drafts": n, "accepted": n}."""
        if not self.mtp:
            raise ValueError("speculative decoding needs an MTP module: train with --mtp_depth=1")
        B, T = idx.shape
        if T + max_new_tokens + 1 > self.config.block_size:
            raise ValueError(f"speculative decoding keeps the whole context: prompt ({T}) + max_new_tokens "
                             f"({max_new_tokens}) + 1 must fit block_size {self.config.block_size}")
        stats = {} if stats is None else stats
        stats.update(drafts=0, accepted=0)
        mtp, mtp_cache = self.mtp[0], self.config.n_layer
        cache = self.new_cache(B, T + max_new_tokens + 1, mtp=True)

        def probs(logits):  # (..., V) -> sample_next's distributions, (..., V)
            return sample_probs(logits.float().flatten(0, -2), temperature, top_k, top_p).view(logits.shape)

        def verify(tokens, pos):  # the model over tokens at pos..: its states and next-token logits
            h = self.hidden(tokens, cache, pos)
            return h, self.head(self.norm(h))

        def draft_logits(h, tokens, pos):  # MTP over pos.. (h: the model's states there; tokens: one ahead of them)
            cos, sin = self.rope(h.shape[1], pos)
            g = mtp(h, self.embed(tokens), cos, sin, cache.kv[mtp_cache], pos)
            return self.head(mtp.norm(g[:, -1]))  # the token two ahead of the last position

        steps = {}  # captured on first use: "verify", "draft 2", "draft 1"

        def run(name, fn, *args):
            if not cuda_graph:
                return fn(*args)
            if name not in steps:
                steps[name] = CUDAGraph(fn, *args)
            return steps[name](*args)

        def draft(q_logits):
            q = probs(q_logits)
            return torch.multinomial(q, 1, generator=generator), q

        h = self.hidden(idx, cache)  # prefill
        tok = sample_next(self.head(self.norm(h[:, -1])).float(), temperature, top_k, top_p, generator)
        yield tok
        d, q = draft(draft_logits(h, torch.cat([idx[:, 1:], tok], dim=1), 0))
        pos = torch.tensor(T, device=idx.device) if cuda_graph else T
        emitted = 1
        while emitted < max_new_tokens:
            h, logits = run("verify", verify, torch.cat([tok, d], dim=1), pos)  # tok at pos, the draft at pos + 1
            p = probs(logits)  # (B, 2, V)
            p_d, q_d = p[:, 0].gather(1, d), q.gather(1, d)
            accept = torch.rand(B, 1, device=idx.device, generator=generator) * q_d < p_d  # P = min(1, p/q)
            stats["drafts"] += B
            n_accepted = int(accept.sum())  # the one sync of a step
            stats["accepted"] += n_accepted
            if n_accepted == B:
                bonus = torch.multinomial(p[:, 1], 1, generator=generator)
                yield d
                emitted += 1
                if emitted < max_new_tokens:
                    yield bonus
                    emitted += 1
                d, q = draft(run("draft 2", draft_logits, h, torch.cat([d, bonus], dim=1), pos))
                tok, pos = bonus, pos + 2
            else:
                residual = (p[:, 0] - q).clamp(min=0)
                residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, 0])
                tok = torch.where(accept, d, torch.multinomial(residual, 1, generator=generator))
                yield tok
                emitted += 1
                # the draft's row in the cache is rewritten by the next step
                d, q = draft(run("draft 1", draft_logits, h[:, :1], tok, pos))
                pos = pos + 1

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, **kwargs):
        """nanoGPT's generate: returns idx (B, T) followed by max_new_tokens sampled tokens (kwargs: generate_stream's)."""
        was_training = self.training
        self.eval()  # generation never counts tokens for the bias update
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, **kwargs))
        self.train(was_training)
        return torch.cat([idx] + new, dim=1)


class CUDAGraph:
    """fn(*inputs) captured once in a CUDA graph on static copies of its tensor inputs, then replayed: the GPU
    launches the call's kernels itself, back to back, so the host's cost is one replay. A call copies its
    arguments into the first static inputs (the others keep their values, e.g. a position that the captured fn
    advances itself) and returns the static outputs, which the next replay overwrites. A position passed as a 0-d
    device tensor leaves nothing on the host to change between replays: the RoPE rows, the cache rows written and
    the keys attended to are all picked on the device. On a CPU fn runs as it is (the tests' check of the same
    static computation)."""

    def __init__(self, fn, *inputs):
        self.fn, self.inputs, self.graph = fn, [x.clone() for x in inputs], None
        if self.inputs[0].is_cuda:
            side = torch.cuda.Stream(self.inputs[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, lazy inits, cuBLAS handles
                for _ in range(2):  # on the real inputs: the cache rows it writes are the ones the call will write
                    fn(*[x.clone() for x in self.inputs])
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn(*self.inputs)

    def __call__(self, *args):
        for static, x in zip(self.inputs, args):
            static.copy_(x)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.outputs


def sample_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> the distribution sample_next draws from (B, V): tempered, top-k and top-p filtered.
    temperature 0 (any below 1e-5) or top_k 1 puts all the mass on the argmax; top_k None or 0 keeps every token,
    top_p None or 1 is off."""
    if not (temperature >= 0 and (top_k is None or top_k >= 0) and (top_p is None or 0 < top_p <= 1)):
        raise ValueError(f"sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, "
                         f"{top_p}")
    # below 1e-5 sampling is greedy in effect, and far smaller temperatures overflow the logits to inf (then NaN)
    if temperature < 1e-5 or top_k == 1:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> (B, 1) drawn from sample_probs; greedy (argmax) where that is one-hot."""
    if 0 <= temperature < 1e-5 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(sample_probs(logits, temperature, top_k, top_p), 1, generator=generator)
