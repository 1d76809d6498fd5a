"""
The nanoseek model: a DeepSeek-V2/V3-style decoder. Config, blocks, model, generation with the latent cache.

    embed -> n_layer x [ x + MLA(RMSNorm(x)) ; x + FFN(RMSNorm(x)) ] -> RMSNorm -> head

The first n_dense_layers blocks use a dense SwiGLU FFN, the rest DeepSeekMoE (moe.py). Attention is Multi-head
Latent Attention (mla.py). Field names follow DeepSeek / Hugging Face transformers (REFERENCE.md section 3).
"""
import math
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
