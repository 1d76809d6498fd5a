"""
nanoseek tests: every fast path against its reference, and the invariants the math promises. CPU, seconds.

    python -m pytest -q test_all.py
"""
import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare
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


# -----------------------------------------------------------------------------
# prepare.py


HERE = os.path.dirname(os.path.abspath(__file__))


def numbered_text(n_lines, seed=0):
    """Distinct lines (so a line can only have come from one place), with Unicode and odd whitespace."""
    rng = np.random.default_rng(seed)
    words = ["thou", "art", "more", "lovely", "and", "temperate", "café", "naïve", "Straße", "東京", "🙂", "ǅ",
             "e\u0301", "עברית", "\t", "  "]
    lines = []
    for i in range(n_lines):
        body = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
        lines.append(f"{i:05d} {body}" + ("  " if i % 7 == 0 else ""))
        if i % 11 == 0:
            lines.append("")  # paragraph breaks
    return "\n".join(lines) + "\n"


def run(tmp_path, *args):
    return prepare.main([f"--data_root={tmp_path / 'data'}", *args])


def split_texts(data):
    return data.decode(data.train.tolist()), data.decode(data.val.tolist())


def interleaves(original, a, b):
    """True when original is exactly a and b cut into whole lines and merged back in order."""
    i = j = 0
    for line in original.splitlines(keepends=True):
        if a.startswith(line, i):
            i += len(line)
        elif b.startswith(line, j):
            j += len(line)
        else:
            return False
    return i == len(a) and j == len(b)


# -----------------------------------------------------------------------------
# tokenizer round trips


def test_bpe_roundtrip_shakespeare_unicode_whitespace(tmp_path):
    plays = [f for f in prepare.shakespeare_files() if f.endswith(("macbeth.md", "the-tempest.md"))]
    corpus = tmp_path / "plays"
    corpus.mkdir()
    for f in plays:
        with open(f, encoding="utf-8") as src:
            text = prepare.markdown_play_to_text(src.read())
        (corpus / (os.path.basename(f) + ".txt")).write_text(text, encoding="utf-8")
    out = run(tmp_path, f"--input={corpus}", "--vocab_size=600")
    encode, decode, eot = prepare.load_tokenizer(out)
    assert eot == 599 and json.load(open(os.path.join(out, "meta.json")))["vocab_size"] == 600
    samples = [
        "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n",
        "MACBETH:\nIs this a dagger which I see before me,\nThe handle toward my hand? Come, let me clutch thee.\n",
        "café naïve Straße 東京 🙂👩‍👩‍👧 e\u0301 ǅ עברית \U0001f600 \x00 \x7f",
        "  leading\ttabs\t\tand  double  spaces  \n\n\n\r\n\r\ttrailing \u00a0nbsp\u2028sep\u3000 ",
        "", " ", "\n", "<|endoftext|> is plain text inside the corpus",
    ]
    for s in samples:
        ids = encode(s)
        assert decode(ids) == s, s
        assert all(0 <= i < 600 for i in ids)
    assert encode("a<|endoftext|>b").count(eot) == 1  # prompts may use the special token on purpose
    assert len(encode(samples[1])) < len(samples[1].encode()) / 2  # it learned English merges


def test_char_tokenizer_roundtrip_and_unknown_char(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(numbered_text(300), encoding="utf-8")
    out = run(tmp_path, f"--input={src}", "--tokenizer=char")
    assert out.endswith("c_char")  # the default name says which tokenizer made it
    data = prepare.load_data(out)
    chars = sorted(set(src.read_text(encoding="utf-8")))
    assert data.vocab_size == len(chars) + 1 and data.eot_token == len(chars)
    s = "".join(reversed(chars))
    assert data.decode(data.encode(s)) == s
    with pytest.raises(ValueError, match="not in this char vocabulary"):
        data.encode("Z§")


# -----------------------------------------------------------------------------
# bins, meta, split


def test_bins_decode_to_split_text_and_split_is_deterministic(tmp_path):
    text = numbered_text(2000)
    src = tmp_path / "input.txt"
    src.write_text(text, encoding="utf-8")
    out = run(tmp_path, f"--input={src}", "--vocab_size=400", "--val_fraction=0.1")
    data = prepare.load_data("input", data_root=str(tmp_path / "data"))
    meta = data.meta
    for split in ("train", "val"):
        size = os.path.getsize(os.path.join(out, f"{split}.bin"))
        assert size == meta["tokens"][split] * np.dtype(meta["dtype"]).itemsize == len(getattr(data, split)) * 2
    assert meta["dtype"] == "uint16" and data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    train, val = split_texts(data)
    # one document, so exactly one end-of-text, at the end of whichever split holds the last piece
    assert (train + val).count(prepare.EOT) == 1
    train, val = train.replace(prepare.EOT, ""), val.replace(prepare.EOT, "")
    assert interleaves(text, train, val)
    assert 0.07 < len(val.encode()) / len(text.encode()) < 0.13
    assert meta["bytes"]["val"] == len(val.encode()) and meta["chars"]["train"] == len(train)
    # same arguments into another folder: identical bytes
    out2 = prepare.main([f"--data_root={tmp_path / 'again'}", f"--input={src}", "--vocab_size=400"])
    for f in ("train.bin", "val.bin", "tokenizer.tiktoken"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(out2, f), "rb").read()


def test_folder_input_splits_by_whole_documents(tmp_path):
    corpus = tmp_path / "books"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / ".git" / "x.txt").write_text("hidden, skipped\n")
    (corpus / "skip.bin").write_bytes(b"\x00\x01 not text")
    docs = {}
    for k in range(300):  # documents smaller than a piece (val_fraction * total / 20 bytes) stay whole
        rel = f"sub/doc{k:03d}.md" if k % 3 else f"doc{k:03d}.txt"
        docs[rel] = f"document {k}\n" + numbered_text(2, seed=k)
        (corpus / rel).write_text(docs[rel], encoding="utf-8")
    out = run(tmp_path, f"--input={corpus}", "--vocab_size=300", "--val_fraction=0.2")
    assert out == str(tmp_path / "data" / "books")
    data = prepare.load_data(out)
    train, val = split_texts(data)
    assert train.endswith(prepare.EOT) and val.endswith(prepare.EOT)
    got = train.split(prepare.EOT)[:-1] + val.split(prepare.EOT)[:-1]
    assert sorted(got) == sorted(docs.values())  # every document whole, once, and nothing else
    in_order = [docs[k] for k in sorted(docs, key=lambda r: os.path.join(str(corpus), r))]
    assert train.split(prepare.EOT)[:-1] == [d for d in in_order if d in train]  # corpus order kept
    assert data.meta["documents"] == 300 and 45 <= val.count(prepare.EOT) <= 75


def test_pieces_cover_the_file_and_never_split_a_character():
    import io
    for text in ["東京🙂é" * 50, numbered_text(30), "a\n\nb" * 40 + "\n"]:
        raw = text.encode()
        for piece_bytes in (1, 2, 3, 5, 64, 10_000):
            pieces = list(prepare.read_pieces(io.BytesIO(raw), piece_bytes))
            assert b"".join(pieces) == raw and all(pieces)
            assert all(len(p) <= max(piece_bytes, 1) + 3 for p in pieces)
            for p in pieces:
                p.decode("utf-8")  # strict: raises if a piece cut a character in two


def test_up_to_date_force_and_changed_input(tmp_path, capsys):
    src = tmp_path / "t.txt"
    src.write_text(numbered_text(400), encoding="utf-8")
    out = run(tmp_path, f"--input={src}", "--vocab_size=300")
    stamp = os.stat(os.path.join(out, "train.bin")).st_mtime_ns
    capsys.readouterr()
    run(tmp_path, f"--input={src}", "--vocab_size=300")
    assert "up to date" in capsys.readouterr().out
    assert os.stat(os.path.join(out, "train.bin")).st_mtime_ns == stamp
    run(tmp_path, f"--input={src}", "--vocab_size=320")  # other arguments: rebuilt
    assert "up to date" not in capsys.readouterr().out and prepare.load_data(out).vocab_size == 320
    run(tmp_path, f"--input={src}", "--vocab_size=320", "--force")
    assert "wrote" in capsys.readouterr().out
    src.write_text(numbered_text(500), encoding="utf-8")  # changed input: rebuilt
    run(tmp_path, f"--input={src}", "--vocab_size=320")
    assert "wrote" in capsys.readouterr().out


def test_interrupted_run_leaves_previous_data_and_no_tmp(tmp_path, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text(numbered_text(300), encoding="utf-8")
    out = run(tmp_path, f"--input={src}", "--vocab_size=300")
    before = prepare.load_data(out).train.tolist()

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "save_tiktoken_file", interrupt)  # after the bins are written, before renames
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, f"--input={src}", "--vocab_size=300", "--force")
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.tiktoken", "train.bin", "val.bin"]
    assert prepare.load_data(out).train.tolist() == before
    with pytest.raises(KeyboardInterrupt):  # into a fresh folder: nothing at all is left
        prepare.main([f"--data_root={tmp_path / 'fresh'}", f"--input={src}", "--vocab_size=300"])
    assert not os.path.exists(tmp_path / "fresh")


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    src = tmp_path / "wide.txt"
    src.write_text("\n".join("".join(chars[i:i + 60]) for i in range(0, len(chars), 60)) + "\n", encoding="utf-8")
    data = prepare.load_data(run(tmp_path, f"--input={src}", "--tokenizer=char"))
    assert data.vocab_size > 65536 and data.meta["dtype"] == "uint32" and data.train.dtype == np.uint32
    assert data.train.max() >= 65536


# -----------------------------------------------------------------------------
# bad input: one clear line, nothing left behind


@pytest.mark.parametrize("make, args, message", [
    (None, ["--input={tmp}/missing.txt"], "does not exist"),
    ("empty", ["--input={tmp}/empty.txt"], "is empty"),
    ("nodocs", ["--input={tmp}/nodocs"], "no *.txt or *.md files"),
    ("ok", ["--input={tmp}/ok.txt", "--vocab_size=100"], "too small"),
    ("ok", ["--input={tmp}/ok.txt", "--vocab_size=20480000"], "too large"),
    ("ok", ["--input={tmp}/ok.txt", "--val_fraction=0"], "--val_fraction"),
    ("ok", ["--input={tmp}/ok.txt", "--tokenizer=char", "--vocab_size=500"], "only applies to --tokenizer=bpe"),
    ("ok", ["--input={tmp}/ok.txt", "--name=../escape"], "plain folder name"),
    ("tiny", ["--input={tmp}/tiny.txt"], "split came out empty"),
])
def test_bad_inputs_fail_with_one_clear_line(tmp_path, make, args, message):
    if make == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
    elif make == "nodocs":
        (tmp_path / "nodocs").mkdir()
        (tmp_path / "nodocs" / "x.csv").write_text("a,b\n")
    elif make == "ok":
        (tmp_path / "ok.txt").write_text(numbered_text(100))
    elif make == "tiny":
        (tmp_path / "tiny.txt").write_text("x")  # one byte cannot be split in two
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *[a.format(tmp=tmp_path) for a in args])
    msg = str(e.value.code)
    assert message in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "data")  # nothing half-written


def test_vocab_larger_than_the_text_supports_warns(tmp_path, capsys):
    src = tmp_path / "small.txt"
    src.write_text(numbered_text(60))
    data = prepare.load_data(run(tmp_path, f"--input={src}", "--vocab_size=50000"))
    assert "only supports" in capsys.readouterr().err
    assert 257 <= data.vocab_size < 50000 and data.eot_token == data.vocab_size - 1
    assert data.train.max() < data.vocab_size


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path, capsys):
    lines = numbered_text(200).encode().splitlines(keepends=True)
    src = tmp_path / "bad.txt"
    bad = b"".join(lines[:50]) + b"\xff\xfe" + b"".join(lines[50:150]) + b"caf\xc3(\n" + b"".join(lines[150:])
    src.write_bytes(bad)
    # 2 + 1 invalid bytes (a lone 0xc3 is the start of a 2-byte sequence, cut short)
    data = prepare.load_data(run(tmp_path, f"--input={src}", "--vocab_size=300"))
    err = capsys.readouterr().err
    assert re.search(r"replaced 3 bytes of invalid UTF-8", err), err
    train, val = split_texts(data)
    assert (train + val).count("\ufffd") == 3


def test_gpt2_without_cached_files_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    import tiktoken.registry
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget a gpt2 loaded earlier in this process
    (tmp_path / "ok.txt").write_text(numbered_text(100))
    with pytest.raises(SystemExit, match="needs tiktoken's GPT-2 files"):
        run(tmp_path, f"--input={tmp_path / 'ok.txt'}", "--tokenizer=gpt2")
    assert not os.path.exists(tmp_path / "data")


def test_gpt2_kind_is_saved_and_loads_without_the_cache(tmp_path, monkeypatch):
    # the real GPT-2 files need a network we do not have: stand in a tiny byte-level encoding named gpt2
    import tiktoken
    fake = tiktoken.Encoding(name="gpt2", pat_str=r"\s+|\S+", mergeable_ranks={bytes([b]): b for b in range(256)},
                             special_tokens={prepare.EOT: 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    (tmp_path / "ok.txt").write_text(numbered_text(100), encoding="utf-8")
    out = run(tmp_path, f"--input={tmp_path / 'ok.txt'}", "--tokenizer=gpt2")
    monkeypatch.undo()
    data = prepare.load_data(out)
    assert out.endswith("ok_gpt2") and data.meta["tokenizer"]["kind"] == "gpt2"
    assert data.vocab_size == 257 and data.eot_token == 256
    train, val = split_texts(data)
    train, val = train.replace(prepare.EOT, ""), val.replace(prepare.EOT, "")
    assert interleaves((tmp_path / "ok.txt").read_text(encoding="utf-8"), train, val)


def test_load_data_missing_says_run_prepare(tmp_path):
    with pytest.raises(SystemExit) as e:
        prepare.load_data("nope", data_root=str(tmp_path / "data"))
    assert str(e.value) == f"no data in {tmp_path / 'data' / 'nope'}: run python prepare.py first"


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), f"--input={tmp_path}/nothing.txt",
                        f"--data_root={tmp_path}/data"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("--input=") and len(r.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# the default corpus


def test_shakespeare_conversion_is_plain_text_with_speakers():
    files = prepare.shakespeare_files()
    assert len(files) == 38
    total = 0
    for f in files:
        with open(f, encoding="utf-8") as src:
            md = src.read()
        text = prepare.markdown_play_to_text(md)
        total += len(text)
        for marker in ("*", "_", "\n#", "\\", " \n", "\t", "[ ]", "[]", "\0"):  # no Markdown markup left
            assert marker not in text, (f, marker)
        assert not text.startswith("#")
        speakers_md = set(s.strip() for s in re.findall(r"^\*\*([^*\n]+)\*\*[ \t]*$", md, re.M))
        speakers_txt = set(re.findall(r"^([^\n\[][^\n]*):\n", text, re.M))
        assert speakers_md <= speakers_txt, (f, speakers_md - speakers_txt)
        assert "\n\n\n" not in text and text.endswith("\n") and not text.endswith("\n\n")
    assert 4_500_000 < total < 5_500_000
    with open([f for f in files if f.endswith("macbeth.md")][0], encoding="utf-8") as src:
        macbeth = prepare.markdown_play_to_text(src.read())
    assert macbeth.startswith("Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n"
                              "[Thunder and lightning. Enter three Witches]\n\n"
                              "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n")
    # a speech resumed after a stage direction gets its speaker again
    assert "[Exit Sergeant, attended]\n\nDUNCAN:\nWho comes here?\n\n" in macbeth
