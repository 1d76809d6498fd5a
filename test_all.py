"""
nanoseek tests: every fast path against its reference, and the invariants the math promises. CPU, seconds.

    python -m pytest -q test_all.py
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mla import MLA, LatentCache, cache_values_per_token, latent_attention, precompute_rope
from model import Model, ModelConfig
from moe import FFN, MoE, balance_loss, experts_reference, max_vio


def assert_close(name, got, want, atol):
    diff = (got.float() - want.float()).abs().max().item()
    print(f"{name}: max abs diff {diff:.2e}")
    assert diff <= atol, f"{name}: max abs diff {diff:.2e} > {atol:.0e}"


def tiny_config(**kw):
    args = dict(vocab_size=101, block_size=64, n_layer=3, n_embd=64, n_head=4, q_lora_rank=0, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_dense_layers=1, dense_inter_dim=96,
                n_experts=8, top_k=2, n_shared=1, moe_inter_dim=16)
    args.update(kw)
    return ModelConfig(**args)


# -----------------------------------------------------------------------------
# MLA


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_absorbed_equals_naive_attention(q_lora_rank):
    torch.manual_seed(0)
    cfg = tiny_config(q_lora_rank=q_lora_rank)
    attn = MLA(cfg)
    for p in attn.parameters():  # norms off their init of 1 too
        torch.nn.init.normal_(p, 0.0, 0.2)
    cos, sin = precompute_rope(cfg, 16)
    x = torch.randn(2, 16, cfg.n_embd)
    attn.attn_impl = "naive"
    naive = attn(x, cos, sin)
    attn.attn_impl = "absorb"
    absorbed = attn(x, cos, sin)
    assert_close("absorbed vs naive", absorbed, naive, 1e-5)


def test_latent_attention_is_mqa_over_latents():
    """Absorbed attention is multi-query attention whose key is [c_kv ; k_pe] and value c_kv: check the
    reference against F.scaled_dot_product_attention with exactly that key and value."""
    torch.manual_seed(0)
    B, T, H, C, R = 2, 7, 3, 10, 4
    q, kv = torch.randn(B, T, H, C + R), torch.randn(B, T, C + R)
    got = latent_attention(q, kv, 0, 0.3, C)
    k = kv[:, None].expand(B, H, T, C + R)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k, k[..., :C], is_causal=True, scale=0.3)
    assert_close("latent attention vs SDPA", got, want.transpose(1, 2), 1e-5)


@pytest.mark.parametrize("attn_impl", ["auto", "naive", "absorb"])
def test_incremental_decoding_matches_full_forward(attn_impl):
    torch.manual_seed(0)
    model = Model(tiny_config(q_lora_rank=24, attn_impl=attn_impl)).eval()
    idx = torch.randint(0, 101, (2, 24))
    full, _ = model(idx)
    cache = model.new_cache(2, 24)
    chunks = [model(idx[:, :9], cache=cache)[0]]  # prefill 9, then a 3-token chunk, then one at a time
    chunks.append(model(idx[:, 9:12], cache=cache, start_pos=9)[0])
    chunks += [model(idx[:, t:t + 1], cache=cache, start_pos=t)[0] for t in range(12, 24)]
    assert_close(f"cached decoding ({attn_impl}) vs full forward", torch.cat(chunks, dim=1), full, 1e-4)


def test_cache_holds_only_latents():
    cfg = tiny_config()
    cache = LatentCache(cfg, batch=3, max_len=20, dtype=torch.bfloat16)
    assert cache.nbytes() == cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 20 * 3 * 2
    mla, mha = cache_values_per_token(cfg)
    assert (mla, mha) == (cfg.n_layer * 24, cfg.n_layer * 2 * 4 * 12)


def test_cache_ratio_matches_reference():
    # DeepSeek-V2 (REFERENCE.md section 1): 512 + 64 = 576 values per token per layer vs 2 * 128 * 128 for MHA
    v2 = ModelConfig(n_layer=1, n_embd=5120, n_head=128, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128)
    assert cache_values_per_token(v2) == (576, 32768)
    # the GPU "small" reference config: 256 + 32 = 288 vs 2 * 12 * 64 = 1536 per layer, 5.33x smaller
    mla, mha = cache_values_per_token(ModelConfig())
    assert (mla, mha) == (12 * 288, 12 * 1536)
    assert math.isclose(mha / mla, 16 / 3)


def test_yarn_changes_only_long_wavelengths_and_scale():
    base = ModelConfig(qk_rope_head_dim=64)
    yarn = ModelConfig(qk_rope_head_dim=64, rope_factor=40, rope_original_max_len=4096, rope_mscale=1.0,
                       rope_mscale_all_dim=1.0)
    cos0, sin0 = precompute_rope(base, 4096)
    cos1, sin1 = precompute_rope(yarn, 4096)
    assert torch.allclose(cos0[:, :4], cos1[:, :4]) and torch.allclose(sin0[:, :4], sin1[:, :4])  # fast dims kept
    assert not torch.allclose(cos0[:, -1], cos1[:, -1])  # slow dims interpolated
    mscale = 0.1 * math.log(40) + 1
    assert math.isclose(yarn.softmax_scale, base.softmax_scale * mscale ** 2)


# -----------------------------------------------------------------------------
# DeepSeekMoE


def moe_layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoE(tiny_config(**kw))
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer


def per_token_reference(x, ids, weights, w1, w2, w3):
    out = torch.zeros_like(x)
    for t, k in itertools.product(range(x.shape[0]), range(ids.shape[1])):
        e = ids[t, k]
        out[t] += weights[t, k] * (w2[e] @ (F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
    return out


def test_sorted_dispatch_equals_per_token_loop():
    torch.manual_seed(0)
    E, N, K, d, I = 6, 13, 2, 8, 5
    w1, w3, w2 = torch.randn(E, I, d), torch.randn(E, I, d), torch.randn(E, d, I)
    x = torch.randn(N, d)
    ids = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])  # expert E-1 gets no tokens
    weights = torch.rand(N, K)
    assert_close("sorted dispatch vs per-token loop", experts_reference(x, ids, weights, w1, w2, w3),
                 per_token_reference(x, ids, weights, w1, w2, w3), 1e-5)


def test_fused_shared_experts_equal_sum_of_separate():
    torch.manual_seed(0)
    d, H = 16, 8
    a, b = FFN(d, H), FFN(d, H)
    fused = FFN(d, 2 * H)
    with torch.no_grad():
        fused.w1.weight.copy_(torch.cat([a.w1.weight, b.w1.weight]))
        fused.w3.weight.copy_(torch.cat([a.w3.weight, b.w3.weight]))
        fused.w2.weight.copy_(torch.cat([a.w2.weight, b.w2.weight], dim=1))
    x = torch.randn(5, d)
    assert_close("fused shared experts", fused(x), a(x) + b(x), 1e-6)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_bias_chooses_but_never_weights(score_func):
    layer = moe_layer(score_func=score_func, norm_topk=True, route_scale=2.5)
    x = torch.randn(32, 64)
    ids0, w0, scores = layer.route(x)
    # gate weights are the unbiased scores of the chosen experts, normalized, times route_scale
    want = scores.gather(1, ids0) / scores.gather(1, ids0).sum(-1, keepdim=True) * 2.5
    assert_close("gate weights from unbiased scores", w0, want, 1e-6)
    layer.expert_bias[3] = 10.0  # now expert 3 wins every token
    ids1, w1, scores1 = layer.route(x)
    assert (ids1 == 3).any(dim=1).all() and not (ids0 == 3).all()
    assert torch.equal(scores1, scores)  # the bias never enters the scores ...
    want1 = scores.gather(1, ids1) / scores.gather(1, ids1).sum(-1, keepdim=True) * 2.5
    assert_close("gate weights ignore the bias", w1, want1, 1e-6)  # ... nor the weights
    layer.expert_bias.fill_(-7.0)  # a uniform shift changes nothing
    ids2, w2, _ = layer.route(x)
    assert torch.equal(ids2, ids0) and torch.equal(w2, w0)


def test_gradients_reach_router_and_experts_not_bias():
    layer = moe_layer()
    assert not layer.expert_bias.requires_grad
    assert all(p is not layer.expert_bias for p in layer.parameters())
    assert "expert_bias" in layer.state_dict()  # saved with the model
    layer(torch.randn(2, 8, 64)).square().sum().backward()
    for name in ("gate.weight", "experts.w1", "experts.w2", "experts.w3", "shared_experts.w1.weight"):
        assert layer.get_parameter(name).grad.abs().sum() > 0, name
    assert layer.expert_bias.grad is None


def test_group_limited_routing_stays_in_top_groups():
    for score_func in ("sigmoid", "softmax"):
        layer = moe_layer(n_experts=16, top_k=4, n_group=4, topk_group=2, score_func=score_func)
        layer.expert_bias.normal_(0, 1)
        x = torch.randn(200, 64)
        ids, _, scores = layer.route(x)
        groups_used = (ids // 4).sort(dim=1).values
        n_used = (groups_used[:, 1:] != groups_used[:, :-1]).sum(dim=1) + 1
        assert (n_used <= 2).all()
        # and those groups are the best two by the group score (top-2 sum of s + b for sigmoid, max for softmax)
        choice = (scores + layer.expert_bias).view(200, 4, 4)
        gs = choice.topk(2, -1).values.sum(-1) if score_func == "sigmoid" else choice.amax(-1)
        best = gs.topk(2, dim=1).indices
        assert all(set(g.tolist()) <= set(b.tolist()) for g, b in zip(groups_used, best))


def test_group_mask_is_minus_inf_not_zero():
    # all s + b negative: a group masked to 0 would beat every kept expert
    layer = moe_layer(n_experts=8, top_k=2, n_group=4, topk_group=1)
    layer.expert_bias.fill_(-5.0)
    layer.expert_bias[:2] = -1.0  # group 0 is the best group for every token
    ids, _, _ = layer.route(torch.randn(50, 64))
    assert (ids < 2).all()


def test_update_bias_is_the_sign_rule():
    layer = moe_layer()
    counts = torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5])
    layer.tokens_per_expert.copy_(counts)
    used = layer.update_bias(0.01)
    step = 0.01 * torch.sign(counts.mean() - counts)
    assert torch.equal(used, counts)
    assert_close("bias update", layer.expert_bias, step - step.mean(), 1e-7)
    assert layer.tokens_per_expert.sum() == 0  # counts reset


def test_counts_only_training_forward_passes():
    layer = moe_layer()
    x = torch.randn(2, 8, 64)
    layer.eval()
    layer(x)
    assert layer.tokens_per_expert.sum() == 0
    layer.train()
    layer(x)
    layer(x)
    assert layer.tokens_per_expert.sum() == 2 * 16 * 2  # two passes, 16 tokens, top-2


def test_bias_update_balances_a_skewed_router():
    layer = moe_layer(n_experts=16, top_k=2)
    layer.requires_grad_(False)
    with torch.no_grad():  # skew: tokens share a direction that experts 0..3 favour
        layer.gate.weight[:4] += 0.2
    torch.manual_seed(1)
    data = torch.randn(8, 256, 64) + 0.3
    for step in range(200):
        layer(data[step % 8][None])
        used = layer.update_bias(0.0 if step == 0 else 0.003)
        if step == 0:
            start = max_vio(used).item()
    tail = torch.zeros(16)
    for step in range(8):  # MaxVio over the last 8 batches, bias frozen
        layer(data[step][None])
        tail += layer.update_bias(0.0)
    print(f"MaxVio: {start:.2f} -> {max_vio(tail).item():.2f}")
    assert start > 2.0 and max_vio(tail).item() < 0.3


def test_balance_loss_known_values():
    E, K, T = 4, 2, 8
    probs = torch.full((1, T, E), 1 / E)
    ids = torch.tensor([[0, 1], [2, 3]] * (T // 2))[None]  # perfectly balanced
    assert math.isclose(balance_loss(probs, ids, E).item(), 1.0, rel_tol=1e-6)
    skew_ids = torch.tensor([[0, 1]] * T)[None]
    skew_probs = torch.tensor([0.5, 0.5, 0.0, 0.0]).expand(1, T, E)
    assert math.isclose(balance_loss(skew_probs, skew_ids, E).item(), 2.0, rel_tol=1e-6)  # f = (2,2,0,0)
    # sequence-wise vs batch: two sequences skewed in opposite directions are balanced as a batch
    both_ids = torch.cat([skew_ids, torch.tensor([[2, 3]] * T)[None]])
    both_probs = torch.cat([skew_probs, skew_probs.flip(-1)])
    assert math.isclose(balance_loss(both_probs, both_ids, E).item(), 2.0, rel_tol=1e-6)
    assert math.isclose(balance_loss(both_probs.reshape(1, 2 * T, E), both_ids.reshape(1, 2 * T, K), E).item(),
                        1.0, rel_tol=1e-6)


def test_balance_losses_enter_the_model_loss():
    torch.manual_seed(0)
    idx = torch.randint(0, 101, (2, 16))
    losses = {}
    for name, kw in {"none": {}, "aux": {"aux_alpha": 0.1}, "seq": {"seq_aux_alpha": 0.1}}.items():
        torch.manual_seed(0)
        losses[name] = Model(tiny_config(**kw))(idx, idx)[1].item()
    # the balance loss is about alpha * 1 per MoE layer (2 layers) when routing is near uniform
    assert 0.1 < losses["aux"] - losses["none"] < 0.4
    assert 0.1 < losses["seq"] - losses["none"] < 0.4


def test_max_vio():
    assert max_vio(torch.tensor([4, 4, 4, 4])).item() == 0
    assert math.isclose(max_vio(torch.tensor([8, 0, 4, 4])).item(), 1.0)


# -----------------------------------------------------------------------------
# the model


def test_param_counts_match_formula():
    cfg = tiny_config(q_lora_rank=24)
    model = Model(cfg)
    d, V, H = 64, 101, 4
    attn = (d * 24 + 24 + 24 * H * 16          # wq_a, q_norm, wq_b (qk_head_dim 16)
            + d * (16 + 8) + 16                 # wkv_a, kv_norm
            + 16 * H * (8 + 12) + H * 12 * d)   # wkv_b, wo
    dense = 3 * d * 96
    expert = 3 * d * 16
    moe = d * 8 + 8 * expert + 1 * expert       # router, 8 routed, 1 shared (fused)
    norms = 2 * d
    total = V * d * 2 + d + 3 * (attn + norms) + dense + 2 * moe
    assert model.num_params() == total
    assert model.num_params(active=True) == total - 2 * (8 - 2) * expert
    tied = Model(tiny_config(q_lora_rank=24, tie_embeddings=True))
    assert tied.num_params() == total - V * d


def test_small_reference_config_counts(monkeypatch):
    monkeypatch.setattr(Model, "reset_parameters", lambda self: None)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = Model(ModelConfig())  # REFERENCE.md section 4 ("small"), GPT-2 vocabulary
        dense = Model(ModelConfig(n_dense_layers=12))
    print(f"small: {model.num_params() / 1e6:.1f}M total, {model.num_params(active=True) / 1e6:.1f}M active")
    # active routed + shared hidden = (6 + 2) * 384 = 3072 = the dense baseline's 4 * 768
    router = 11 * 768 * 64
    assert model.num_params(active=True) == dense.num_params() + router


def test_invalid_config_is_one_clear_line():
    for kw, words in [({"top_k": 9}, "top_k"), ({"n_group": 3}, "divisible"), ({"n_group": 2, "topk_group": 3}, "topk_group"),
                      ({"score_func": "relu"}, "score_func")]:
        with pytest.raises(ValueError, match=words):
            tiny_config(**kw)


def test_tiny_model_learns_a_batch():
    torch.manual_seed(0)
    model = Model(tiny_config())
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 101, (4, 32))
    first = None
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_biases(1e-3)
        first = first or loss.item()
    print(f"loss {first:.3f} -> {loss.item():.3f}")
    assert loss.item() < 0.3 * first


def test_optimizer_groups():
    model = Model(tiny_config())
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_generate_with_cache_equals_without():
    torch.manual_seed(0)
    model = Model(tiny_config(q_lora_rank=24))
    prompt = torch.randint(0, 101, (2, 5))
    with_cache = model.generate(prompt, 40, temperature=0)
    without = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert all(m.tokens_per_expert.sum() == 0 for m in model.moe_layers())  # generation never counts
