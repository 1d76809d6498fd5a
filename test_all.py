"""
nanoseek tests: every fast path against its reference, and the invariants the math promises. CPU, seconds.

    python -m pytest -q test_all.py
    TRITON_INTERPRET=0 python -m pytest -q test_all.py -k gpu     # the kernel tests at real sizes, on a CUDA GPU
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # train.py and sample.py take it as their thread count: the same bits
os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: the kernel tests run interpreted on CPU

import ast
import contextlib
import copy
import dataclasses
import errno
import functools
import io
import importlib.util
import itertools
import json
import math
import pathlib
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import types
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import configurator
import corpus
import data as data_py  # "data" is the tests' usual name for a loaded dataset
import errors
import hf  # the tests that compare with transformers import it themselves: nothing else needs the HF stack
import gpu_kernels
import math_problems
import prepare
import sample
from generate import generate, generate_stream, new_cache, sample_probs
from mla import MLA, LatentCache, MHACache, cache_values_per_token, latent_attention, precompute_rope
from model import Model, ModelConfig, cast_weights, clipped_step
from moe import (FFN, Experts, MoE, balance_loss, experts_reference, max_vio, mutual_information, recording_routes,
                 routing_counts)


def assert_close(name, got, want, atol):
    diff = (got.float() - want.float()).abs().max().item()
    print(f"{name}: max abs diff {diff:.2e}")
    assert diff <= atol, f"{name}: max abs diff {diff:.2e} > {atol:.0e}"


def small_config(**kw):
    """The GPU "small" reference model (config/train_small.py) with GPT-2's vocabulary, as bench.py builds it."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = configurator.read_config_file(os.path.join(HERE, "config", "train_small.py"))
    return ModelConfig(**{"vocab_size": 50304, **{k: v for k, v in cfg.items() if k in names}, **kw})


def tiny_config(**kw):
    args = dict(vocab_size=101, block_size=64, n_layer=3, n_embd=64, n_head=4, q_lora_rank=0, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_dense_layers=1, dense_inter_dim=96,
                n_experts=8, top_k=2, n_shared=1, moe_inter_dim=16)
    args.update(kw)
    return ModelConfig(**args)


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
    plays = [f for f in corpus.shakespeare_files() if f.endswith(("macbeth.md", "the-tempest.md"))]
    plays_dir = tmp_path / "plays"
    plays_dir.mkdir()
    for f in plays:
        with open(f, encoding="utf-8") as src:
            text = corpus.markdown_play_to_text(src.read())
        (plays_dir / (os.path.basename(f) + ".txt")).write_text(text, encoding="utf-8")
    out = run(tmp_path, f"--input={plays_dir}", "--vocab_size=600")
    encode, decode, eot = data_py.load_tokenizer(out)
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
    data = data_py.load_data(out)
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
    data = data_py.load_data("input", data_root=str(tmp_path / "data"))
    meta = data.meta
    for split in ("train", "val"):
        size = os.path.getsize(os.path.join(out, f"{split}.bin"))
        assert size == meta["tokens"][split] * np.dtype(meta["dtype"]).itemsize == len(getattr(data, split)) * 2
    assert meta["dtype"] == "uint16" and data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    train, val = split_texts(data)
    # one document, so exactly one end-of-text, at the end of whichever split holds the last piece
    assert (train + val).count(data_py.EOT) == 1
    train, val = train.replace(data_py.EOT, ""), val.replace(data_py.EOT, "")
    assert interleaves(text, train, val)
    assert 0.07 < len(val.encode()) / len(text.encode()) < 0.13
    assert meta["bytes"]["val"] == len(val.encode()) and meta["chars"]["train"] == len(train)
    # same arguments into another folder: identical bytes
    out2 = prepare.main([f"--data_root={tmp_path / 'again'}", f"--input={src}", "--vocab_size=400"])
    for f in ("train.bin", "val.bin", "tokenizer.tiktoken"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(out2, f), "rb").read()


def test_folder_input_splits_by_whole_documents(tmp_path):
    books = tmp_path / "books"
    (books / "sub").mkdir(parents=True)
    (books / ".git").mkdir()
    (books / ".git" / "x.txt").write_text("hidden, skipped\n")
    (books / "skip.bin").write_bytes(b"\x00\x01 not text")
    docs = {}
    for k in range(300):  # documents smaller than a piece (val_fraction * total / 20 bytes) stay whole
        rel = f"sub/doc{k:03d}.md" if k % 3 else f"doc{k:03d}.txt"
        docs[rel] = f"document {k}\n" + numbered_text(2, seed=k)
        (books / rel).write_text(docs[rel], encoding="utf-8")
    out = run(tmp_path, f"--input={books}", "--vocab_size=300", "--val_fraction=0.2")
    assert out == str(tmp_path / "data" / "books")
    data = data_py.load_data(out)
    train, val = split_texts(data)
    assert train.endswith(data_py.EOT) and val.endswith(data_py.EOT)
    got = train.split(data_py.EOT)[:-1] + val.split(data_py.EOT)[:-1]
    assert sorted(got) == sorted(docs.values())  # every document whole, once, and nothing else
    in_order = [docs[k] for k in sorted(docs, key=lambda r: os.path.join(str(books), r))]
    assert train.split(data_py.EOT)[:-1] == [d for d in in_order if d in train]  # corpus order kept
    assert data.meta["documents"] == 300 and 45 <= val.count(data_py.EOT) <= 75


def test_pieces_cover_the_file_and_never_split_a_character():
    import io
    for text in ["東京🙂é" * 50, numbered_text(30), "a\n\nb" * 40 + "\n"]:
        raw = text.encode()
        for piece_bytes in (1, 2, 3, 5, 64, 10_000):
            pieces = list(corpus.read_pieces(io.BytesIO(raw), piece_bytes))
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
    assert "up to date" not in capsys.readouterr().out and data_py.load_data(out).vocab_size == 320
    run(tmp_path, f"--input={src}", "--vocab_size=320", "--force")
    assert "wrote" in capsys.readouterr().out
    src.write_text(numbered_text(500), encoding="utf-8")  # changed input: rebuilt
    run(tmp_path, f"--input={src}", "--vocab_size=320")
    assert "wrote" in capsys.readouterr().out


def test_interrupted_run_leaves_previous_data_and_no_tmp(tmp_path, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text(numbered_text(300), encoding="utf-8")
    out = run(tmp_path, f"--input={src}", "--vocab_size=300")
    before = data_py.load_data(out).train.tolist()

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "save_tiktoken_file", interrupt)  # after the bins are written, before renames
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, f"--input={src}", "--vocab_size=300", "--force")
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.tiktoken", "train.bin", "val.bin"]
    assert data_py.load_data(out).train.tolist() == before
    with pytest.raises(KeyboardInterrupt):  # into a fresh folder: nothing at all is left
        prepare.main([f"--data_root={tmp_path / 'fresh'}", f"--input={src}", "--vocab_size=300"])
    assert not os.path.exists(tmp_path / "fresh")


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    src = tmp_path / "wide.txt"
    src.write_text("\n".join("".join(chars[i:i + 60]) for i in range(0, len(chars), 60)) + "\n", encoding="utf-8")
    data = data_py.load_data(run(tmp_path, f"--input={src}", "--tokenizer=char"))
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
    data = data_py.load_data(run(tmp_path, f"--input={src}", "--vocab_size=50000"))
    assert "only supports" in capsys.readouterr().err
    assert 257 <= data.vocab_size < 50000 and data.eot_token == data.vocab_size - 1
    assert data.train.max() < data.vocab_size


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path, capsys):
    lines = numbered_text(200).encode().splitlines(keepends=True)
    src = tmp_path / "bad.txt"
    bad = b"".join(lines[:50]) + b"\xff\xfe" + b"".join(lines[50:150]) + b"caf\xc3(\n" + b"".join(lines[150:])
    src.write_bytes(bad)
    # 2 + 1 invalid bytes (a lone 0xc3 is the start of a 2-byte sequence, cut short)
    data = data_py.load_data(run(tmp_path, f"--input={src}", "--vocab_size=300"))
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
                             special_tokens={data_py.EOT: 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    (tmp_path / "ok.txt").write_text(numbered_text(100), encoding="utf-8")
    out = run(tmp_path, f"--input={tmp_path / 'ok.txt'}", "--tokenizer=gpt2")
    monkeypatch.undo()
    data = data_py.load_data(out)
    assert out.endswith("ok_gpt2") and data.meta["tokenizer"]["kind"] == "gpt2"
    assert data.vocab_size == 257 and data.eot_token == 256
    train, val = split_texts(data)
    train, val = train.replace(data_py.EOT, ""), val.replace(data_py.EOT, "")
    assert interleaves((tmp_path / "ok.txt").read_text(encoding="utf-8"), train, val)


def test_load_data_missing_says_run_prepare(tmp_path):
    with pytest.raises(SystemExit) as e:
        data_py.load_data("nope", data_root=str(tmp_path / "data"))
    assert str(e.value) == f"no data in {tmp_path / 'data' / 'nope'}: run python prepare.py first"


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), f"--input={tmp_path}/nothing.txt",
                        f"--data_root={tmp_path}/data"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("--input=") and len(r.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# the default corpus


def test_shakespeare_conversion_is_plain_text_with_speakers():
    files = corpus.shakespeare_files()
    assert len(files) == 38
    total = 0
    for f in files:
        with open(f, encoding="utf-8") as src:
            md = src.read()
        text = corpus.markdown_play_to_text(md)
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
        macbeth = corpus.markdown_play_to_text(src.read())
    assert macbeth.startswith("Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n"
                              "[Thunder and lightning. Enter three Witches]\n\n"
                              "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n")
    # a speech resumed after a stage direction gets its speaker again
    assert "[Exit Sergeant, attended]\n\nDUNCAN:\nWho comes here?\n\n" in macbeth


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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rope_real_form_equals_complex_form(dtype, tol):
    """The two forms of apply_rope: the real-valued rotation (training under torch.compile) against the complex
    multiply (eager), and both against the rotation written out in float64; a (T, R/2) table over (B, T, H, R)."""
    from mla import apply_rope, rotate_pairs
    torch.manual_seed(0)
    cfg = tiny_config()
    cos, sin = precompute_rope(cfg, 11)
    x = torch.randn(2, 11, 3, cfg.qk_rope_head_dim).to(dtype)
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]
    c, s = cos.double()[:, None], sin.double()[:, None]
    want = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    eager, real = apply_rope(x, cos, sin), rotate_pairs(x, cos, sin)
    assert eager.dtype == real.dtype == dtype
    assert_close("RoPE complex form vs float64", eager, want, tol)
    assert_close("RoPE real form vs float64", real, want, tol)
    assert_close("RoPE real vs complex form", real, eager, tol)


def test_latent_norm_under_autocast_is_the_fp32_norm():
    """bf16 activations and an fp32 weight (autocast): the fused fp32 RMSNorm rounded once, with no
    dtype-mismatch warning; a bf16 model's norm stays in bf16."""
    import warnings
    from mla import latent_norm
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x = torch.randn(5, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns "Mismatch dtype between input and weight"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = latent_norm(norm, x)
    assert got.dtype == torch.bfloat16
    assert_close("latent_norm vs fp32 norm", got, norm(x.float()).bfloat16(), 0.0)
    norm16 = torch.nn.RMSNorm(16, eps=1e-6).bfloat16()
    assert latent_norm(norm16, x).dtype == torch.bfloat16


@pytest.mark.parametrize("attn_impl", ["auto", "naive", "absorb"])
def test_incremental_decoding_matches_full_forward(attn_impl):
    torch.manual_seed(0)
    model = Model(tiny_config(q_lora_rank=24, attn_impl=attn_impl)).eval()
    idx = torch.randint(0, 101, (2, 24))
    full, _ = model(idx)
    cache = LatentCache(model.config, 2, 24)
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
    # DeepSeek-V2 section 2.1: 512 + 64 = 576 values per token per layer vs 2 * 128 * 128 for MHA
    v2 = ModelConfig(n_layer=1, n_embd=5120, n_head=128, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128)
    assert cache_values_per_token(v2) == (576, 32768)
    # the GPU "small" reference config: 256 + 32 = 288 vs 2 * 12 * 64 = 1536 per layer, 5.33x smaller
    mla, mha = cache_values_per_token(small_config())
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
    routed = []
    layer.on_route = lambda ids, _: routed.append(ids)
    layer(x)
    layer(x)
    assert layer.tokens_per_expert.sum() == 2 * 16 * 2  # two passes, 16 tokens, top-2
    # each expert's count is the pairs routed to it, over both passes
    expect = torch.bincount(torch.cat(routed).flatten(), minlength=layer.n_experts).float()
    assert torch.equal(layer.tokens_per_expert, expect) and expect.count_nonzero() > 1


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
# gpu_kernels.py against its PyTorch references: Triton's interpreter on CPU (TRITON_INTERPRET=1), real sizes on a GPU



needs_triton = pytest.mark.skipif(not gpu_kernels.HAS_TRITON, reason="Triton does not import here")


def interpreted(test):
    """The CPU twin of a kernel test, under Triton's interpreter. The interpreter computes a tile's masked-off lanes
    too, with NumPy, on whatever the padding holds: its RuntimeWarnings about NaN or overflow there are expected
    (the masked stores drop those lanes, and the test compares every value that was stored), so they are silenced
    for these tests and for warnings from the interpreter's own module only."""
    test = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")(test)
    return pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                              reason="CPU tests need TRITON_INTERPRET=1 set before triton is imported")(test)


needs_cuda = pytest.mark.skipif(not (gpu_kernels.HAS_TRITON and torch.cuda.is_available()
                                     and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs CUDA and Triton compiling for it (run without TRITON_INTERPRET=1)")


def rel_err(name, got, want):
    """max |got - want| / max |want|, printed; NaN never passes."""
    diff = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    print(f"{name}: max abs diff {diff:.2e} (max |ref| {scale:.2e})")
    return diff / max(scale, 1e-30)


def moe_inputs(N, K, E, d, I, dtype, device, empty_expert=None, seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    scores = torch.randn(N, E, generator=g)
    if empty_expert is not None:
        scores[:, empty_expert] = -1e9  # never chosen: the kernels must leave its gradients at zero
    topk_ids = scores.topk(K, dim=-1).indices
    topk_weights = torch.rand(N, K, generator=g) + 0.1
    w1 = torch.randn(E, I, d, generator=g) / d ** 0.5
    w2 = torch.randn(E, d, I, generator=g) / I ** 0.5
    w3 = torch.randn(E, I, d, generator=g) / d ** 0.5
    dy = torch.randn(N, d, generator=g)
    cast = lambda t, dt=dtype: t.to(device=device, dtype=dt).requires_grad_()
    w_dtype = w_dtype or dtype
    return (cast(x), topk_ids.to(device), topk_weights.to(device).requires_grad_(), cast(w1, w_dtype),
            cast(w2, w_dtype), cast(w3, w_dtype), dy.to(device=device, dtype=dtype))


def check_fused_moe(N, K, E, d, I, dtype, device, tol, empty_expert=None, w_dtype=None, fn=None):
    """fused_moe's output and all five gradients against autograd through experts_reference in float64.
    w_dtype=float32 with bf16 x is the autocast case: fp32 parameters cast inside, fp32 gradients out. fn: what
    calls fused_moe (torch.compile of it, say)."""
    x, ids, gates, w1, w2, w3, dy = moe_inputs(N, K, E, d, I, dtype, device, empty_expert, w_dtype=w_dtype)
    args = [x, gates, w1, w2, w3]
    y = (fn or gpu_kernels.fused_moe)(x, ids, gates, w1, w2, w3)
    grads = torch.autograd.grad(y, args, dy)
    ref_args = [t.detach().double().requires_grad_() for t in args]  # float64 reference
    rx, rg, rw1, rw2, rw3 = ref_args
    y_ref = experts_reference(rx, ids, rg, rw1, rw2, rw3)
    grads_ref = torch.autograd.grad(y_ref, ref_args, dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_err("fused_moe forward", y, y_ref) < tol
    for name, g, gr, arg in zip(["dx", "d topk_weights", "dw1", "dw2", "dw3"], grads, grads_ref, args):
        assert g.shape == gr.shape and g.dtype == arg.dtype
        assert rel_err(f"fused_moe {name}", g, gr) < tol
    if empty_expert is not None:
        for name, g in zip(["dw1", "dw2", "dw3"], grads[2:]):
            assert g[empty_expert].abs().max().item() == 0.0, f"{name} of the empty expert is not zero"


@needs_triton
@interpreted
@pytest.mark.parametrize("tma", [True, False])
def test_fused_moe_per_pair_interpreted(tma, monkeypatch):
    """Decoding: no gradients and no more pairs than experts take the per-pair tiles (no sort); two tokens that share
    an expert, a token's K experts summed, against the float64 reference. tma: W1, W3 through TMA descriptors or
    by pointer (the down projection's rows are per pair: always by pointer)."""
    monkeypatch.setattr(gpu_kernels, "TMA", tma)
    x, ids, gates, w1, w2, w3, _ = moe_inputs(4, 2, 8, 40, 40, torch.float32, "cpu", None)
    ids = torch.tensor([[3, 5], [5, 0], [7, 3], [1, 2]])
    with torch.no_grad():
        got = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3)
        want = experts_reference(x.double(), ids, *(t.double() for t in (gates, w1, w2, w3)))
    assert rel_err("fused_moe per pair", got, want) < 1e-5


def test_everything_runs_where_triton_does_not_import():
    """gpu_kernels.py defines its kernels without Triton and usable() sends every caller to the PyTorch paths."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, gpu_kernels, model, generate\n"
            "assert not gpu_kernels.HAS_TRITON and not gpu_kernels.usable(torch.zeros(1))\n"
            "m = model.Model(model.ModelConfig()).eval()\n"
            "print(generate.generate(m, torch.zeros(1, 3, dtype=torch.long), 4, temperature=0).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 0 and r.stdout.strip() == "torch.Size([1, 7])", r.stderr


@needs_triton
@interpreted
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("dtype,w_dtype,tol", [(torch.float32, None, 1e-5), (torch.bfloat16, torch.float32, 3e-2)])
def test_fused_moe_interpreted(dtype, w_dtype, tol, tma, monkeypatch):
    """N*K = 74 pairs: not a multiple of the 32-row tile; expert 3 gets no token; d = I = 40 span two 32-wide
    tiles with a masked edge. bf16 x with fp32 weights is the autocast case; its tolerance is loose because the
    interpreter truncates fp32 -> bf16 instead of rounding (the GPU twin below is tighter). tma: the tiles that
    allow it through TMA descriptors (the interpreter emulates them), or every tile by pointer."""
    monkeypatch.setattr(gpu_kernels, "TMA", tma)
    check_fused_moe(N=37, K=2, E=5, d=40, I=40, dtype=dtype, device="cpu", tol=tol, empty_expert=3, w_dtype=w_dtype)


def record_tma_descs(monkeypatch):
    """The list that every gpu_kernels._tma_desc call from now on appends its answer to (None: by pointer)."""
    calls, make = [], gpu_kernels._tma_desc

    def tma_desc(t, block):
        calls.append(make(t, block))
        return calls[-1]

    monkeypatch.setattr(gpu_kernels, "_tma_desc", tma_desc)
    return calls


@needs_triton
@interpreted
@pytest.mark.parametrize("N,K,E,d,I,empty_expert", [
    (37, 2, 5, 40, 40, 3),  # d, I not multiples of the 32-wide tiles: W1's tiles reach into the next expert's rows
    (50, 3, 6, 72, 64, 0),  # I a multiple of BLOCK_K: dx's 2I-wide rows through TMA too; the first expert empty
])
def test_fused_moe_tma_equals_pointer_loads_interpreted(N, K, E, d, I, empty_expert, monkeypatch):
    """TMA descriptors change where the tiles come from, not what is in them: the output and all five gradients are
    bitwise those of the pointer loads, with bf16 x and fp32 weights (the autocast case; the interpreter multiplies
    bf16 tiles as fp32 copies). In fp32 the up projection's transposed W tile goes to NumPy's matmul as a transposed
    view, which it sums in another order than the pointer path's contiguous tile: there, agreement to rounding."""
    calls = record_tma_descs(monkeypatch)

    def run(tma, dtype, w_dtype):
        monkeypatch.setattr(gpu_kernels, "TMA", tma)
        x, ids, gates, w1, w2, w3, dy = moe_inputs(N, K, E, d, I, dtype, "cpu", empty_expert, w_dtype=w_dtype)
        y = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3)
        return [y, *torch.autograd.grad(y, [x, gates, w1, w2, w3], dy)]

    names = ["output", "dx", "d topk_weights", "dw1", "dw2", "dw3"]
    for dtype, w_dtype in [(torch.bfloat16, torch.float32), (torch.float32, None)]:
        pointer = run(False, dtype, w_dtype)
        calls.clear()
        through_tma = run(True, dtype, w_dtype)
        assert calls and all(c is not None for c in calls), "TMA on, yet some tile was read by pointer"
        for name, a, b in zip(names, through_tma, pointer):
            if dtype == torch.bfloat16:
                assert torch.equal(a, b), f"{name}: TMA differs from the pointer loads"
            else:
                assert rel_err(f"{name}, TMA vs pointer loads", a, b) < 1e-6


@needs_triton
@pytest.mark.skipif(gpu_kernels.TensorDescriptor is None, reason="this Triton has no host-side TensorDescriptor")
def test_tma_desc_only_where_tma_can_read(monkeypatch):
    """_tma_desc gives a descriptor for a 16-byte aligned row-major tensor and None (the pointer path) for one at an
    address off by 4 bytes, with rows not a multiple of 16 bytes apart or not contiguous, or with TMA off."""
    buf = torch.zeros(4096)
    desc = gpu_kernels._tma_desc(buf[:1024].view(32, 32), [16, 32])
    assert isinstance(desc, gpu_kernels.TensorDescriptor) and desc.block_shape == [16, 32]
    assert gpu_kernels._tma_desc(buf[1:1025].view(32, 32), [16, 32]) is None
    assert gpu_kernels._tma_desc(buf[:30 * 36].view(30, 36).bfloat16(), [16, 32]) is None  # 72-byte rows
    assert gpu_kernels._tma_desc(buf[:1024].view(32, 32).t(), [16, 32]) is None
    monkeypatch.setattr(gpu_kernels, "TMA", False)
    assert gpu_kernels._tma_desc(buf[:1024].view(32, 32), [16, 32]) is None


KERNELS = ["_moe_align_kernel", "_moe_up_kernel", "_moe_mm_kernel", "_moe_down_bwd_kernel", "_moe_swiglu_bwd_kernel",
           "_moe_wgrad_kernel",
           "_mla_decode_kernel", "_mla_combine_kernel"]


@needs_triton
@interpreted
@pytest.mark.parametrize("tma", [True, False])
def test_no_launch_passes_one_tensor_twice(tma, monkeypatch):
    """torch.compile copies each tensor a Triton kernel stores to and writes the copies back one by one: a tensor
    passed in two argument slots (say out_ptr and an out2_ptr the kernel only stores to under a mask) comes back
    as the copy the kernel never wrote. That was dW2 of every compiled MoE step. So no launch of gpu_kernels.py, in
    fused_moe (forward, backward, per pair) and mla_decode, gets two arguments that share memory (views of one
    buffer side by side, like pad_start and pad_end, are two tensors); unused slots get None. A TMA descriptor
    counts as the tensor it reads (Inductor passes its base tensor on): a launch that reads a tensor through one
    gets None in that tensor's pointer slot."""
    monkeypatch.setattr(gpu_kernels, "TMA", tma)
    launches, descriptors = [], []

    def tensor(v):  # the tensor an argument reads or writes, if any
        if gpu_kernels.TensorDescriptor is not None and isinstance(v, gpu_kernels.TensorDescriptor):
            descriptors.append(v)
            return v.base
        return v if isinstance(v, torch.Tensor) else None

    class Recorder:  # kernel[grid](...) as Triton's JITFunction takes it, noting each launch's tensor arguments
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tensors = [(k, tensor(v)) for k, v in [*enumerate(args), *kwargs.items()]]
                launches.append((self.name, [(k, t) for k, t in tensors if t is not None]))
                return self.fn[grid](*args, **kwargs)
            return launch

    for name in KERNELS:
        monkeypatch.setattr(gpu_kernels, name, Recorder(name, getattr(gpu_kernels, name)))
    x, ids, gates, w1, w2, w3, dy = moe_inputs(37, 2, 5, 40, 40, torch.float32, "cpu", 3)
    y = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3)
    torch.autograd.grad(y, [x, gates, w1, w2, w3], dy)
    with torch.no_grad():  # decoding: the per-pair tiles
        gpu_kernels.fused_moe(x[:2], ids[:2], gates[:2], w1, w2, w3)
    cache = torch.randn(2, 80, 48)
    gpu_kernels.mla_decode(torch.randn(2, 1, 3, 48), cache[:, :70], 69, 0.1, 40, n_splits=2)
    assert {name for name, _ in launches} == set(KERNELS), launches
    assert bool(descriptors) == tma
    def span(t):  # the bytes a tensor's elements lie in
        end = t.data_ptr() + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        return t.data_ptr(), end

    for name, tensors in launches:
        spans = sorted((span(t), k) for k, t in tensors if t.numel())
        for ((_, end), k), ((start, _), k2) in zip(spans, spans[1:]):
            assert end <= start, f"{name}: arguments {k} and {k2} share memory"


@needs_triton
@interpreted
@pytest.mark.parametrize("E", [6, 300])  # sorted on uint8 keys; on int16 keys past 256 experts
def test_moe_align_interpreted(E):
    """Every pair sits in exactly one padded row, inside its expert's run, the pairs of a run in ascending order
    (the sort is stable); tiles carry the right expert."""
    torch.manual_seed(0)
    bm = 32
    ids = torch.cat([torch.randint(0, 5, (29, 3)), torch.tensor([[E - 2, 0, E - 2]])])  # expert E - 1 empty
    sorted_pair, block_expert, pad_start, pad_end = gpu_kernels.moe_align(ids, E, bm)
    real = sorted_pair[sorted_pair < ids.numel()].long()
    assert real.sort().values.tolist() == list(range(ids.numel()))
    rows = torch.nonzero(sorted_pair < ids.numel()).flatten()
    experts = ids.flatten()[sorted_pair[rows].long()]
    assert (block_expert[rows // bm].long() == experts).all()
    assert ((pad_start[experts] <= rows) & (rows < pad_end[experts])).all()
    assert ((pad_end - pad_start) % bm == 0).all() and pad_end[E - 1] == pad_start[E - 1]
    for e in experts.unique().tolist():
        run = sorted_pair[pad_start[e]:pad_end[e]]
        run = run[run < ids.numel()]
        assert (run[1:] > run[:-1]).all() and len(run) == (ids == e).sum()


def check_mla_decode(B, S, T, H, C, R, start_pos, dtype, device, tol, n_splits=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(B + 1, S + 5, C + R, generator=g).to(device=device, dtype=dtype)
    kv = cache[:B, :start_pos + T]  # a strided view of a larger buffer, as mla.py passes it
    q = torch.randn(B, T, H, C + R, generator=g).to(device=device, dtype=dtype)
    scale = (C + R) ** -0.5 * 2
    got = gpu_kernels.mla_decode(q, kv, start_pos, scale, C, n_splits=n_splits)
    want = latent_attention(q.double(), kv.double(), start_pos, scale, C)
    assert got.shape == (B, T, H, C) and got.dtype == q.dtype
    assert rel_err(f"mla_decode T={T} start_pos={start_pos} splits={n_splits}", got, want) < tol
    # the graph-safe form: the whole cache (rows past the position hold other values), the position on the device
    pos = torch.tensor(start_pos, device=device)
    full = cache[:B]
    got = gpu_kernels.mla_decode(q, full, pos, scale, C, n_splits=n_splits)
    assert rel_err(f"mla_decode, position on the device, T={T}", got, want) < tol
    assert rel_err("latent_attention, position on the device", latent_attention(q.double(), full.double(), pos, scale, C),
                   want) < 1e-6  # latent_attention computes in float32


@needs_triton
@interpreted
@pytest.mark.parametrize("T,start_pos,n_splits,dtype,tol", [
    (1, 150, 3, torch.float32, 1e-5),   # one query token, keys in 3 splits, the last one partial
    (3, 100, 4, torch.float32, 1e-5),   # small query length: causal inside the new tokens
    (1, 70, None, torch.bfloat16, 2e-2),
])
def test_mla_decode_interpreted(T, start_pos, n_splits, dtype, tol):
    """C = 40, R = 8: neither a power of two (masked); 3 heads; the cache slice is non-contiguous."""
    check_mla_decode(B=2, S=start_pos + T, T=T, H=3, C=40, R=8, start_pos=start_pos, dtype=dtype, device="cpu",
                     tol=tol, n_splits=n_splits)


def check_adamw(shapes, device, kernel):
    """gpu_kernels.AdamW against torch.optim.AdamW (the non-fused, per-tensor step: the plainest reference) over three
    steps: two groups (weight decay on, off), odd sizes (masked tails, several programs), new gradients each step,
    a grad_scale divisor on the last two as model.clipped_step sets it, a parameter without a gradient at step 2.
    The gradients are read, never written; the state is torch's (a torch AdamW loads it and takes the same step)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in params]
    groups = lambda ps: [{"params": ps[:-1], "weight_decay": 0.1}, {"params": ps[-1:], "weight_decay": 0.0}]
    opt = gpu_kernels.AdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, kernel=kernel)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(3):
        grads = [torch.randn(s, generator=g).to(device) for s in shapes]
        scale = None if step == 0 else torch.tensor(2.5, device=device)
        for i, (p, r, grad) in enumerate(zip(params, ref, grads)):
            p.grad = None if step == 1 and i == 0 else grad.clone()
            r.grad = None if p.grad is None else grad / (2.5 if scale is not None else 1.0)
        opt.grad_scale = scale
        opt.step()
        opt.grad_scale = None
        ref_opt.step()
        for i, (p, r, grad) in enumerate(zip(params, ref, grads)):
            if p.grad is not None:
                assert torch.equal(p.grad, grad), "the step wrote the gradient"
            assert rel_err(f"AdamW step {step}, param {i}", p.detach(), r.detach()) < 1e-6
    state = opt.state_dict()
    assert all(torch.equal(state["state"][i]["step"].cpu(), torch.tensor(3.0 if i else 2.0)) for i in range(len(shapes)))
    again = torch.optim.AdamW(groups([p.detach().clone().requires_grad_() for p in params]), foreach=False)
    again.load_state_dict(state)
    # and back: torch's non-fused state (its step counts on the host) into gpu_kernels.AdamW, which moves them
    back = gpu_kernels.AdamW(groups([r.detach().clone().requires_grad_() for r in ref]), kernel=kernel)
    back.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # its own tensors: ref_opt steps on
    assert all(s["step"].device == p.device for p, s in back.state.items())
    resumed = lambda opt: opt.param_groups[0]["params"] + opt.param_groups[1]["params"]
    for a, b, r in zip(resumed(again), resumed(back), ref):
        r.grad = a.grad = b.grad = torch.ones_like(r)
    again.step()
    back.step()
    ref_opt.step()
    for a, b, r in zip(resumed(again), resumed(back), ref):
        assert rel_err("AdamW step 3 after a state_dict round trip", a.detach(), r.detach()) < 1e-6
        assert rel_err("AdamW step 3 resumed from torch's state", b.detach(), r.detach()) < 1e-6


@needs_triton
@interpreted
def test_adamw_interpreted():
    check_adamw([(37, 129), (16, 80), (5000,), (3, 7), (4112,), (48,)], "cpu", kernel=True)  # aligned or not


def check_router_topk(device):
    """gpu_kernels.router_topk against torch.topk: the same experts, largest first, for expert counts that are and are not
    powers of two; ties (scores from a few values, as a bias of whole steps of gamma can make) go to the lower
    index, as a stable descending sort puts them; columns at -inf (dropped groups) come only after every finite
    one, and a row with fewer finite scores than K still gets K distinct experts; NaN ranks first, as in torch."""
    g = torch.Generator().manual_seed(0)
    for N, E, K in [(1, 64, 6), (37, 62, 6), (300, 8, 2), (5, 160, 6), (70, 256, 8), (9, 16, 1), (4, 64, 64)]:
        x = torch.randn(N, E, generator=g)
        got = gpu_kernels.router_topk(x.to(device), K).cpu()
        want = x.topk(K, dim=-1)
        assert got.dtype == torch.int64 and got.shape == (N, K)
        assert torch.equal(got, want.indices), (N, E, K)
        ties = torch.randint(0, 3, (N, E), generator=g).float()
        stable = ties.sort(dim=-1, descending=True, stable=True).indices[:, :K]
        assert torch.equal(gpu_kernels.router_topk(ties.to(device), K).cpu(), stable), ("ties", N, E, K)
    x = torch.randn(6, 64, generator=g)
    x[:, 8:] = float("-inf")  # 8 finite scores a row
    got = gpu_kernels.router_topk(x.to(device), 10).cpu()
    assert torch.equal(got[:, :8], x.topk(8, dim=-1).indices)
    assert torch.equal(got[:, 8:], torch.tensor([[8, 9]] * 6))  # then the lowest untaken -inf columns, once each
    x[2, 40] = float("nan")
    assert gpu_kernels.router_topk(x.to(device), 1)[2, 0].item() == 40


@needs_triton
@interpreted
def test_router_topk_interpreted():
    check_router_topk("cpu")


# -----------------------------------------------------------------------------
# GPU twins at realistic sizes (bf16); skipped on CPU


@needs_cuda
@pytest.mark.parametrize("N,w_dtype", [(8192, None), (4099, torch.float32)])
def test_fused_moe_gpu(N, w_dtype):
    check_fused_moe(N=N, K=6, E=64, d=768, I=384, dtype=torch.bfloat16, device="cuda", tol=1e-2, empty_expert=7,
                    w_dtype=w_dtype)


@needs_cuda
@pytest.mark.parametrize("tma", [True, False])
def test_fused_moe_with_copies_gpu(tma, monkeypatch):
    """The path training takes: the working copies, W13 through one dot in the up projection (by TMA or by pointer),
    at the small config's sizes, against the float64 reference; and the same output as without the copies."""
    monkeypatch.setattr(gpu_kernels, "TMA", tma)
    with_copies = lambda x, ids, g, w1, w2, w3: gpu_kernels.fused_moe(x, ids, g, w1, w2, w3,
                                                                       (gpu_kernels.w13_of(w1, w3), w2.detach()))
    check_fused_moe(N=8192, K=6, E=64, d=768, I=384, dtype=torch.bfloat16, device="cuda", tol=1e-2, empty_expert=7,
                    fn=with_copies)
    x, ids, gates, w1, w2, w3, _ = moe_inputs(8192, 6, 64, 768, 384, torch.bfloat16, "cuda", None)
    with torch.no_grad():
        a, b = with_copies(x, ids, gates, w1, w2, w3), gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3)
    assert rel_err("W13 vs two dots", a, b) < 1e-3


@needs_cuda
def test_fused_moe_takes_tma_on_hopper_gpu(monkeypatch):
    """On sm_90 and later every tile that may come through a TMA descriptor does, at the real sizes (the GPU twins
    above would pass just as well on the pointer path)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper (sm_90) or later")
    calls = record_tma_descs(monkeypatch)
    check_fused_moe(N=4096, K=6, E=64, d=768, I=384, dtype=torch.bfloat16, device="cuda", tol=1e-2, empty_expert=7)
    assert len(calls) == 8 and all(c is not None for c in calls), calls  # W1, W3, down's a, dx's a, 2 x 2 wgrad


@needs_cuda
@pytest.mark.parametrize("N", [8192, 700])
def test_fused_moe_pointer_loads_gpu(N, monkeypatch):
    """gpu_kernels.TMA off: every tile by pointer, the path of GPUs before Hopper and of tensors TMA cannot read, which
    on an H100 / H200 no other test takes (MOE_TILES at 8192 tokens, SMALL_TILES at 700)."""
    monkeypatch.setattr(gpu_kernels, "TMA", False)
    check_fused_moe(N=N, K=6, E=64, d=768, I=384, dtype=torch.bfloat16, device="cuda", tol=1e-2, empty_expert=7)


@needs_cuda
@pytest.mark.parametrize("N", [1, 3, 64, 700])
def test_fused_moe_decode_sizes_gpu(N):
    """A few (token, expert) pairs: SMALL_TILES and the tight padded-length bound."""
    check_fused_moe(N=N, K=6, E=64, d=768, I=384, dtype=torch.bfloat16, device="cuda", tol=1e-2, w_dtype=None)


@needs_cuda
@pytest.mark.parametrize("N", [1, 10])
def test_fused_moe_per_pair_gpu(N):
    """Decoding sizes without gradients: one tile per pair (6 and 60 pairs, 64 experts)."""
    x, ids, gates, w1, w2, w3, _ = moe_inputs(N, 6, 64, 768, 384, torch.bfloat16, "cuda", None)
    with torch.no_grad():
        got = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3)
        want = experts_reference(x.double(), ids, *(t.double() for t in (gates, w1, w2, w3)))
    assert rel_err(f"fused_moe per pair, N={N}", got, want) < 1e-2


@needs_cuda
@pytest.mark.parametrize("I", [384, 192])
def test_fused_moe_compiled_gpu(I):
    """fused_moe inside torch.compile, output and all five gradients, against the float64 reference: the kernels'
    launches traced by Inductor (which copies every tensor a kernel stores to) give what they give eagerly.
    I = 192 puts the [dW1 ; dW3] split inside a 128-row tile."""
    check_fused_moe(N=4096, K=6, E=64, d=768, I=I, dtype=torch.bfloat16, device="cuda", tol=1e-2, empty_expert=5,
                    w_dtype=torch.float32, fn=torch.compile(gpu_kernels.fused_moe))


@needs_cuda
def test_compiled_training_step_matches_eager_gpu():
    """One training step of a small MoE model (kernels on, fp32 weights), what train.py --compile runs: the compiled
    step under bf16 autocast is no further from the fp32 eager step than the eager step under bf16 autocast is, in
    the loss and in every parameter's gradient. A gradient the compiled step leaves unwritten (as dW2 once was, an
    aliased kernel argument) is ~100% off; bf16's own rounding moves a small one by a few percent either way."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=3, n_embd=256, n_head=4, kv_lora_rank=64, dense_inter_dim=512, n_experts=16, top_k=4,
                      n_shared=1, moe_inter_dim=128, block_size=256, vocab_size=512)
    model = Model(cfg).cuda()
    idx = torch.randint(0, 512, (8, 256), device="cuda")
    results = []
    for step, amp in ((model, False), (model, True), (torch.compile(model), True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            _, loss = step(idx, idx)
        loss.backward()
        results.append((loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    (ref_loss, ref), (eager_loss, eager), (comp_loss, comp) = results
    assert abs(comp_loss - ref_loss) <= 2 * abs(eager_loss - ref_loss) + 1e-2, (ref_loss, eager_loss, comp_loss)
    assert ref.keys() == eager.keys() == comp.keys()

    def rel(a, b):  # relative to the whole gradient's norm
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    for n in ref:
        assert rel(comp[n], ref[n]) <= 3 * rel(eager[n], ref[n]) + 1e-2, (n, rel(comp[n], ref[n]), rel(eager[n], ref[n]))


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_training_with_expert_copies_matches_casts_gpu(compiled, monkeypatch):
    """Three optimizer steps of a small MoE model as train.py takes them (bf16 autocast, two micro-batches, the clip,
    gpu_kernels.AdamW, the bias update), with the experts' working copies (the forward reads the bf16 copies the
    optimizer wrote) and without (the forward casts the weights): the same bf16 weights either way, so the same
    losses and parameters, bit for bit eagerly; compiled, the same losses to within Inductor's roundings (its
    fusions differ between the two graphs, and Adam turns a last-bit change of a tiny gradient into a change of up
    to lr in its weight, so the parameters are compared eagerly only). After each step every copy is its weight's
    bf16 rounding; eval() frees them and the next training forward recasts. The forward reads the copies as they are
    at each call: zeroing the W2 copies (the weights untouched, so nothing recasts) changes the loss, and dropping
    them (recast at the next forward) brings it back."""
    def train(copies):
        if not copies:
            drop = torch.compiler.disable(lambda self: [m.experts.drop_copies() for m in self.moe_layers()])
            monkeypatch.setattr(Model, "refresh_expert_copies", drop)
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=3, n_embd=256, n_head=4, kv_lora_rank=64, dense_inter_dim=512, n_experts=16,
                          top_k=4, n_shared=1, moe_inter_dim=128, block_size=128, vocab_size=512)
        raw = Model(cfg).cuda()
        model = torch.compile(raw) if compiled else raw
        opt = raw.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda", torch.bfloat16)
        data = torch.randint(0, 512, (3, 2, 8, 129), generator=torch.Generator().manual_seed(1)).cuda()
        losses = []
        for step, micro_batches in enumerate(data):
            if step == 2:
                raw.eval()
                assert raw.expert_copies() == {}
                raw.train()
            for micro in micro_batches:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(micro[:, :-1], micro[:, 1:])
                (loss / 2).backward()
                losses.append(loss.item())
            clipped_step(opt, raw.parameters(), 1.0)
            opt.zero_grad(set_to_none=True)
            raw.update_biases(1e-3)
            held = raw.expert_copies()
            assert len(held) == (3 * 2 if copies else 0)
            if copies:
                for m in raw.moe_layers():
                    for w in m.experts.weights():
                        assert torch.equal(held[id(w)], w.detach().bfloat16())
        monkeypatch.undo()
        if copies:
            def loss_now():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(data[0, 0, :, :-1], data[0, 0, :, 1:])[1].item()
            fresh = loss_now()
            for m in raw.moe_layers():
                m.experts.w2_bf16.zero_()
            assert abs(loss_now() - fresh) > 1e-3, "the forward did not read the copies"
            for m in raw.moe_layers():
                m.experts.drop_copies()
            assert abs(loss_now() - fresh) < 1e-3
        return losses, {n: p.detach().clone() for n, p in raw.named_parameters()}

    (loss_c, params_c), (loss_p, params_p) = train(True), train(False)
    if not compiled:
        assert loss_c == loss_p
        assert all(torch.equal(params_c[n], params_p[n]) for n in params_p)
    else:
        assert max(abs(a - b) for a, b in zip(loss_c, loss_p)) < 1e-2, (loss_c, loss_p)


def check_adamw_bf16_moments(shapes, device, kernel):
    """gpu_kernels.AdamW with moments_dtype=bf16 (DeepSeek-V3 §3.3.3) against its spec: torch.optim.AdamW's per-tensor
    fp32 step whose two moments are rounded to bf16 after every step (the step itself uses them unrounded). Three
    steps, a grad_scale on the last two, each from the same state: the reference takes the weights and moments the
    step before left, so that a moment whose fp32 value the two compute a few roundings apart (torch's lerp against
    the kernel's fused multiply-adds) and which lands on the other side of a bf16 tie (~1e-4 of them on an H200)
    cannot carry into the next step. The rounding is to nearest: a truncation leaves half the moments one bf16
    step off. The moments are held in bf16 between steps, saved and loaded so; an fp32 optimizer that loads them holds
    them in fp32."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = gpu_kernels.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, kernel=kernel,
                        moments_dtype=torch.bfloat16)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(3):
        scale = None if step == 0 else torch.tensor(2.5, device=device)
        for p, r in zip(params, ref):
            grad = torch.randn(p.shape, generator=g).to(device)
            p.grad, r.grad = grad, grad / (1.0 if scale is None else 2.5)
        opt.grad_scale = scale
        opt.step()
        opt.grad_scale = None
        ref_opt.step()
        for i, (p, r) in enumerate(zip(params, ref)):
            assert rel_err(f"bf16-moment AdamW step {step}, param {i}", p.detach(), r.detach()) < 1e-6
            r.data.copy_(p.data)
            for k in ("exp_avg", "exp_avg_sq"):
                got, want = opt.state[p][k], ref_opt.state[r][k].bfloat16()
                assert got.dtype == torch.bfloat16
                assert (got != want).float().mean().item() < 1e-3, (k, step, i)
                assert rel_err(f"{k} after step {step}, param {i}", got.float(), want.float()) < 1e-2
                ref_opt.state[r][k].copy_(got)
    state = copy.deepcopy(opt.state_dict())
    assert all(s[k].dtype == torch.bfloat16 for s in state["state"].values() for k in ("exp_avg", "exp_avg_sq"))
    low = gpu_kernels.AdamW([p.detach().clone().requires_grad_() for p in params], moments_dtype=torch.bfloat16)
    low.load_state_dict(state)
    full = gpu_kernels.AdamW([p.detach().clone().requires_grad_() for p in params])
    full.load_state_dict(state)
    for i, p in enumerate(params):
        for k in ("exp_avg", "exp_avg_sq"):
            lp, fp = low.param_groups[0]["params"][i], full.param_groups[0]["params"][i]
            assert low.state[lp][k].dtype == torch.bfloat16 and torch.equal(low.state[lp][k], opt.state[p][k])
            assert full.state[fp][k].dtype == torch.float32 and torch.equal(full.state[fp][k], opt.state[p][k].float())


def test_adamw_bf16_moments_torch_step():
    """The bf16 moments on torch's own step (gpu_kernels.AdamW off the Triton path: the CPU, FSDP's DTensors)."""
    check_adamw_bf16_moments([(37, 129), (5000,), (48,)], "cpu", kernel=False)


@needs_triton
@interpreted
def test_adamw_bf16_moments_interpreted():
    check_adamw_bf16_moments([(37, 129), (16, 80), (5000,), (3, 7), (48,)], "cpu", kernel=True)  # aligned or not


@needs_cuda
def test_adamw_bf16_moments_gpu():
    check_adamw_bf16_moments([(64, 384, 768), (768,), (1000003,)], "cuda", kernel=None)


def check_adamw_copies(device, kernel):
    """gpu_kernels.AdamW's bf16 working copies: after each step a parameter with a copy has its copy equal to its
    own bf16 rounding, bit for bit (on the kernel, which writes it, and on torch's step, after which it is cast),
    and the parameters step exactly as they do without copies; a parameter without a copy is untouched by them.
    Sizes aligned and not; a parameter with a copy but no gradient keeps both. Two parameters' copies are the even
    and the odd rows of one buffer (moe.Experts' W13), one of them with rows of a length no multiple of 16; the
    buffer's every element is then written."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 40, 24), (37, 129), (5000,), (48,), (3, 8, 32), (3, 8, 32), (5, 7, 20), (5, 7, 20)]
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    plain = [p.detach().clone().requires_grad_() for p in params]
    copies = {id(p): torch.zeros(p.shape, dtype=torch.bfloat16, device=device) for p in params[:3]}
    for i in (4, 6):
        E, I, d = shapes[i]
        rows = torch.full((E, 2 * I, d), float("nan"), dtype=torch.bfloat16, device=device).view(E, I, 2, d)
        copies[id(params[i])], copies[id(params[i + 1])] = rows[:, :, 0], rows[:, :, 1]
    opt = gpu_kernels.AdamW(params, lr=1e-2, weight_decay=0.1, kernel=kernel, copies=lambda: copies)
    ref = gpu_kernels.AdamW(plain, lr=1e-2, weight_decay=0.1, kernel=kernel)
    for step in range(3):
        for i, (p, q) in enumerate(zip(params, plain)):
            p.grad = None if step == 1 and i == 1 else torch.randn(p.shape, generator=g).to(device)
            q.grad = None if p.grad is None else p.grad.clone()
        before = copies[id(params[1])].clone()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, plain)):
            assert torch.equal(p, q), (step, i)
            if id(p) in copies:
                want = before if step == 1 and i == 1 else p.detach().bfloat16()
                assert torch.equal(copies[id(p)], want), (step, i)
    for i in (4, 6):
        assert not copies[id(params[i])]._base.isnan().any(), "an element of the interleaved buffer was not written"
    for wrong in (torch.zeros(3, device=device), torch.zeros(4, 24, 40, dtype=torch.bfloat16, device=device).transpose(1, 2)):
        bad = gpu_kernels.AdamW(params, kernel=kernel, copies=lambda: {id(params[0]): wrong})
        with pytest.raises(ValueError, match="working copy must be bf16"):
            bad.step()


def test_adamw_copies_torch_step():
    check_adamw_copies("cpu", kernel=False)


@needs_triton
@interpreted
def test_adamw_copies_interpreted():
    check_adamw_copies("cpu", kernel=True)


def test_expert_copies_follow_the_weights():
    """moe.Experts' working copies are the weights' bf16 casts whenever refresh_copies() returns: cast once, not
    again while the weights are unchanged (as after gpu_kernels.AdamW's kernel, which bumps no version), again after
    anything torch changes them with (an in-place edit, load_state_dict, torch's optimizer step, a move); none for
    bf16 weights, none after eval(). W13 holds W1's and W3's rows interleaved. Model.expert_copies hands each
    weight's part of them to the optimizer by weight."""
    torch.manual_seed(0)
    experts = Experts(4, 16, 8)
    for w in experts.weights():
        torch.nn.init.normal_(w)

    def fresh():
        return all(torch.equal(c, w.detach().bfloat16()) for w, c in experts.weight_copies())

    assert experts.copies() is None and experts.weight_copies() == ()
    experts.refresh_copies()
    assert fresh() and all(c.dtype == torch.bfloat16 and c.is_contiguous() for c in experts.copies())
    w13 = experts.w13_bf16
    assert w13.shape == (4, 16, 16) and torch.equal(w13[:, 0], experts.w1[:, 0].detach().bfloat16())
    assert torch.equal(w13[:, 1], experts.w3[:, 0].detach().bfloat16())
    assert torch.equal(w13[:, 15], experts.w3[:, 7].detach().bfloat16())
    held = experts.copies()
    experts.w2_bf16.zero_()  # a stand-in for a copy the optimizer wrote: unchanged weights, so not recast
    experts.refresh_copies()
    assert experts.w2_bf16.abs().max() == 0 and experts.copies()[0] is held[0]
    with torch.no_grad():
        experts.w2.mul_(2.0)
    experts.refresh_copies()
    assert fresh() and experts.copies()[1] is held[1]  # recast in place
    experts.load_state_dict({k: v * 3 for k, v in experts.state_dict().items()})
    experts.refresh_copies()
    assert fresh()
    assert not any(k.endswith("_bf16") for k in experts.state_dict())  # never saved
    for w in experts.weights():
        w.grad = torch.randn_like(w)
    torch.optim.AdamW(experts.parameters(), lr=0.1).step()
    experts.refresh_copies()
    assert fresh()
    experts.eval()
    assert experts.copies() is None
    experts.train()
    experts.to(torch.bfloat16)
    experts.refresh_copies()
    assert experts.copies() is None
    model = Model(ModelConfig(n_layer=3, n_dense_layers=1, mtp_depth=1))
    layers = model.moe_layers()
    assert model.expert_copies() == {}
    layers[0].experts.refresh_copies()
    layers[2].experts.refresh_copies()  # the MTP block's
    got = model.expert_copies()
    assert len(got) == 6 and all(got[id(w)].data_ptr() == c.data_ptr() and got[id(w)].stride() == c.stride()
                                 for m in (layers[0], layers[2]) for w, c in m.experts.weight_copies())
    model.train()
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert model.expert_copies() == {}  # on the CPU (no kernels, no bf16 autocast) the forward drops them


@needs_triton
@interpreted
@pytest.mark.parametrize("tma", [True, False])
def test_fused_moe_reads_the_copies_interpreted(tma, monkeypatch):
    """fused_moe with working copies computes with the copies, not a cast of the weights (copies of 2 W2 give the
    output of 2 W2, and so on for W1 and W3 in W13's interleaved rows, forward and dx), and sends the weights'
    gradients to the fp32 weights; copies equal to the cast give the cast's output and gradients bit for bit (the
    up projection's one dot over W13 against its two dots over W1 and W3). Copies of another dtype than the matmuls'
    are ignored. tma: W13 through a TMA descriptor, or by pointer."""
    monkeypatch.setattr(gpu_kernels, "TMA", tma)
    x, ids, gates, w1, w2, w3, dy = moe_inputs(70, 2, 4, 32, 48, torch.bfloat16, "cpu", w_dtype=torch.float32)
    w13 = gpu_kernels.w13_of  # rows interleaved
    cast = (w13(w1, w3), w2.detach().bfloat16())
    args = [x, gates, w1, w2, w3]
    want = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3)
    want_grads = torch.autograd.grad(want, args, dy)
    got = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3, copies=cast)
    got_grads = torch.autograd.grad(got, args, dy)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got_grads, want_grads))
    for copies, weights in [((cast[0], cast[1] * 2), (w1, w2 * 2, w3)),  # W2, W1 and W3 each read from the copies
                            ((w13(w1 * 2, w3), cast[1]), (w1 * 2, w2, w3)), ((w13(w1, -w3), cast[1]), (w1, w2, -w3))]:
        y = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3, copies=copies)
        want_y = gpu_kernels.fused_moe(x, ids, gates, *(w.detach() for w in weights))
        assert torch.equal(y, want_y)
        dx, dx_want = (torch.autograd.grad(y_, x, dy)[0] for y_ in (y, want_y))
        assert torch.equal(dx, dx_want)  # dx reads W1 and W3 from W13's rows as well
    ignored = gpu_kernels.fused_moe(x, ids, gates, w1, w2, w3, copies=tuple(c.half() * 2 for c in cast))
    assert torch.equal(ignored, want)


@needs_cuda
def test_adamw_gpu():
    """The Triton step on its own (kernel=None: usable() picks it on CUDA) at sizes of the small config's."""
    check_adamw([(64, 384, 768), (50304, 768), (768,), (1000003,)], "cuda", kernel=None)


@needs_cuda
def test_router_topk_gpu():
    check_router_topk("cuda")


@needs_cuda
def test_fused_moe_fp32_gpu():
    check_fused_moe(N=1000, K=6, E=64, d=768, I=384, dtype=torch.float32, device="cuda", tol=1e-4, empty_expert=0)


@needs_cuda
def test_moe_layer_autocast_gpu():
    """moe.MoE under bf16 autocast (fp32 parameters), kernels on vs off, each against the same layer in fp32: the
    kernels are no further from the fp32 result than PyTorch's own bf16 path (both round to bf16, in other orders)."""
    torch.manual_seed(0)
    layer = MoE(small_config()).cuda()
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    x = torch.randn(4, 1024, 768, device="cuda")
    outs = []
    for use, amp in ((True, True), (False, True), (False, False)):
        layer.experts.use_kernels = use
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = layer(x)
        y.float().pow(2).sum().backward()
        outs.append([y.float()] + [p.grad.clone() for p in layer.experts.parameters()])
    for name, fused, torch_bf16, fp32 in zip(["y", "dw1", "dw2", "dw3"], *outs):
        err_fused = rel_err(f"{name}: kernels (bf16) vs fp32", fused, fp32)
        err_torch = rel_err(f"{name}: PyTorch (bf16) vs fp32", torch_bf16, fp32)
        assert err_fused <= 1.5 * err_torch + 1e-3, (name, err_fused, err_torch)


@needs_cuda
@pytest.mark.parametrize("B,S,T,H,C,R", [(8, 4000, 1, 12, 256, 32), (4, 3000, 4, 16, 512, 64), (2, 777, 1, 128, 512, 64)])
def test_mla_decode_gpu(B, S, T, H, C, R):
    check_mla_decode(B, S, T, H, C, R, start_pos=S - T, dtype=torch.bfloat16, device="cuda", tol=2e-2)

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
        model = Model(small_config())  # config/train_small.py, GPT-2 vocabulary
        dense = Model(small_config(n_dense_layers=12))
    from configurator import read_config_file
    dense_file = read_config_file(os.path.join(HERE, "config", "train_small_dense.py"))
    small_file = read_config_file(os.path.join(HERE, "config", "train_small.py"))
    assert dense_file == {**small_file, "out_dir": "out-small-dense", "n_dense_layers": 12}  # the twin differs in that
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


@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0])
@pytest.mark.parametrize("kind", ["torch fused", "gpu_kernels.AdamW, Triton", "gpu_kernels.AdamW, torch's step"])
def test_clipped_step_matches_clip_then_step(max_norm, kind):
    """model.clipped_step with a fused AdamW or gpu_kernels.AdamW (the clip as the step's grad_scale; the Triton kernel
    interpreted on the CPU) takes the step that clip_grad_norm_ then a plain step takes: clipping (0.05), a norm
    under the limit (1e6: no change), clipping off. eps = 1 makes Adam's step follow the gradient's size
    (eps >> sqrt(v)), so an ignored clip would show."""
    if kind.endswith("Triton") and not (gpu_kernels.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the Triton step on the CPU needs Triton's interpreter (TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    model = Model(tiny_config())
    idx = torch.randint(0, 101, (2, 16))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.get_total_norm(list(grads.values())).item()
    assert 0.05 < norm < 1e6

    def step(fused, clip):
        m = copy.deepcopy(model)
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
        args = dict(lr=1e-2, eps=1.0, weight_decay=0.1)
        if not fused:
            opt = torch.optim.AdamW(m.parameters(), **args)
        elif kind == "torch fused":
            opt = torch.optim.AdamW(m.parameters(), fused=True, **args)
        else:
            opt = gpu_kernels.AdamW(m.parameters(), kernel=kind.endswith("Triton"), **args)
        if fused:
            clipped_step(opt, m.parameters(), clip)
            assert getattr(opt, "grad_scale", None) is None  # nothing left over for a later step
        else:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
        return {n: p.detach() for n, p in m.named_parameters()}

    got, want, unclipped = step(True, max_norm), step(False, max_norm), step(False, 0.0)
    for n in grads:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-8), n
    differs = any(not torch.allclose(want[n], unclipped[n], rtol=1e-3, atol=1e-7) for n in grads)
    assert differs == (max_norm == 0.05)  # the clip changed the step exactly where it should


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
    with_cache = generate(model, prompt, 40, temperature=0)
    without = generate(model, prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert all(m.tokens_per_expert.sum() == 0 for m in model.moe_layers())  # generation never counts


# -----------------------------------------------------------------------------
# DeepSeek / Hugging Face checkpoints: parity with transformers, save_pretrained, FP8



HF_TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
            max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8)

# name: (transformers class, its config on top of HF_TINY, random expert bias)
HF_CONFIGS = {
    "v3 sigmoid, group-limited, q_lora, norm_topk, bias": (
        "DeepseekV3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5), True),
    "v3 no norm_topk, no q compression, rms_eps 1.0, tied": (
        "DeepseekV3", dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5,
                           rms_norm_eps=1.0, tie_word_embeddings=True), True),  # big: latent norms keep 1e-6
    "v3 rope_interleave=false, YaRN": (
        "DeepseekV3", dict(q_lora_rank=24, n_group=2, topk_group=1, rope_interleave=False, rope_parameters=YARN), True),
    "v2 softmax greedy, no q compression": (
        "DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.0), False),
    "v2 softmax group_limited_greedy, q_lora, scale 2, YaRN": (
        "DeepseekV2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                           routed_scaling_factor=2.0, rope_parameters=YARN), False),
}

GENERATE = ["v3 sigmoid, group-limited, q_lora, norm_topk, bias", "v2 softmax group_limited_greedy, q_lora, scale 2, YaRN"]


def hf_model(kind, extra, bias):
    """A random transformers DeepseekV2/V3ForCausalLM, every weight (norms and expert bias too) off its init."""
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, kind + "Config")(**(HF_TINY | extra))
    config._attn_implementation = "eager"  # torch 2.13 CPU SDPA takes ~0.1 s per one-token decode step here
    m = getattr(transformers, kind + "ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.15)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias") and bias:
                b.uniform_(-0.1, 0.1)
    return m


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    kind, extra, bias = HF_CONFIGS[request.param]
    m = hf_model(kind, extra, bias)
    path = str(tmp_path_factory.mktemp("hf"))
    m.save_pretrained(path)
    return request.param, m, path


def test_from_pretrained_matches_transformers_logits(hf_checkpoint):
    name, ref, path = hf_checkpoint
    idx = torch.randint(0, HF_TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits
    for impl in ("naive", "absorb"):
        model = hf.from_pretrained(path, attn_impl=impl)
        assert_close(f"{name} [{impl}] logits vs transformers", model(idx)[0], want, 1e-4)


@pytest.mark.parametrize("name", GENERATE)  # one V3 and one V2 config: transformers' generate is slow on CPU
def test_greedy_generation_matches_transformers(name, tmp_path):
    ref = hf_model(*HF_CONFIGS[name])
    ref.save_pretrained(tmp_path)
    path = str(tmp_path)
    idx = torch.randint(0, HF_TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2))
    want = ref.generate(idx, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(idx))
    got = generate(hf.from_pretrained(path), idx, 20, temperature=0)  # naive prefill, absorbed decode, latent cache
    print(f"{name}: {got[0, 7:].tolist()}")
    assert torch.equal(got, want), f"{name}: greedy tokens differ\n ours {got.tolist()}\n hf   {want.tolist()}"


def test_v2_routing_semantics_map_onto_ours(tmp_path):
    """DeepSeek's V2 gate scales by routed_scaling_factor only when it does not renormalize; V3's always does."""
    base = dict(HF_TINY, model_type="deepseek_v2", q_lora_rank=None, routed_scaling_factor=16.0)
    for norm, want in [(False, (False, 16.0)), (True, (True, 1.0))]:
        cfg = hf.config_from_hf(base | dict(norm_topk_prob=norm))
        assert (cfg.norm_topk, cfg.route_scale, cfg.score_func) == (*want, "softmax")
    cfg = hf.config_from_hf(dict(HF_TINY, model_type="deepseek_v3", q_lora_rank=None, n_group=2, topk_group=1))
    assert (cfg.norm_topk, cfg.route_scale, cfg.score_func) == (True, 2.5, "sigmoid")


# -----------------------------------------------------------------------------
# save_pretrained -> transformers


def ours_tiny(**kw):
    args = dict(vocab_size=101, block_size=64, n_layer=3, n_embd=64, n_head=4, q_lora_rank=24, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_dense_layers=1, dense_inter_dim=96,
                n_experts=8, top_k=2, n_shared=2, moe_inter_dim=16, n_group=2, topk_group=1, route_scale=2.0)
    torch.manual_seed(0)
    model = Model(ModelConfig(**(args | kw))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.15)
        if model.config.score_func == "sigmoid":
            for m in model.moe_layers():
                m.expert_bias.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("kw", [
    dict(),  # sigmoid -> DeepseekV3, group-limited, expert bias, one file
    dict(q_lora_rank=0, tie_embeddings=True, norm_topk=False, rope_factor=4.0, rope_original_max_len=16,
         rope_mscale=1.0, rope_mscale_all_dim=0.707),  # tied, YaRN
    dict(score_func="softmax", n_group=4, topk_group=2, route_scale=1.0, norm_eps=1e-5),  # -> DeepseekV2
], ids=["v3", "v3-tied-yarn", "v2"])
def test_save_pretrained_loads_in_transformers(kw, tmp_path):
    model = ours_tiny(**kw)
    hf.save_pretrained(model, tmp_path, max_shard_size=40_000)  # several shards + index
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, 101, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(idx)[0]
        assert_close(f"save_pretrained {kw} -> transformers logits", ref(idx).logits, want, 1e-4)
    again = hf.from_pretrained(tmp_path)
    assert_close("save -> from_pretrained logits", again(idx)[0], want, 1e-6)


def test_softmax_with_expert_bias_refuses_to_save(tmp_path):
    model = ours_tiny(score_func="softmax", n_group=1, topk_group=1)
    model.moe_layers()[0].expert_bias[0] = 0.5
    with pytest.raises(ValueError, match="expert_bias"):
        hf.save_pretrained(model, tmp_path)


# -----------------------------------------------------------------------------
# FP8 (DeepSeek-V3's release format) and what must fail clearly


def block_amax(w, block=128):
    """(out, in) -> (ceil(out/128), ceil(in/128)): the largest |w| of each 128x128 block."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:w.shape[0], :w.shape[1]] = w.float().abs()
    return padded.view(rows, block, cols, block).amax(dim=(1, 3))


def test_fp8_checkpoint_dequantizes_to_the_bf16_weights(tmp_path):
    """A synthetic DeepSeek-V3-style FP8 folder (e4m3 weights, 128x128 block scales, partial edge blocks) loads
    to within e4m3 rounding of the bf16 weights it was made from. Blocks get magnitudes 1e-2 .. 1e1, so a block
    scale applied to the wrong block cannot pass."""
    from safetensors.torch import load_file, save_file
    model = ours_tiny(n_embd=160, dense_inter_dim=300, moe_inter_dim=136, q_lora_rank=144).to(torch.bfloat16)
    quantized = lambda name: name.endswith(".weight") and "norm" not in name and not name.endswith(
        ("embed_tokens.weight", "lm_head.weight", "gate.weight"))  # what DeepSeek-V3 ships in FP8
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                r = torch.arange(p.shape[-2])[:, None] // 128 * 3 + torch.arange(p.shape[-1]) // 128
                p.mul_(10.0 ** (r % 4 - 2))
    hf.save_pretrained(model, tmp_path / "bf16")
    tensors, fp8 = load_file(tmp_path / "bf16" / "model.safetensors"), {}
    for name, w in tensors.items():
        if quantized(name):
            scale = block_amax(w) / 448.0  # e4m3's largest value
            expand = scale.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
            fp8[name], fp8[name + "_scale_inv"] = (w.float() / expand).to(torch.float8_e4m3fn), scale
        else:
            fp8[name] = w
    os.makedirs(tmp_path / "fp8")
    save_file(fp8, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=[128, 128])
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    loaded = dict(hf.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).named_parameters())
    worst, n_fp8 = 0.0, 0
    for name, w in tensors.items():
        if not quantized(name):
            continue
        got = loaded[hf.hf_to_ours(name)] if ".experts." not in name else None
        if got is None:  # model.layers.{i}.mlp.experts.{j}.{proj}.weight: row j of our stacked tensor
            parts = hf.hf_to_ours(name).split(".")
            got = loaded[".".join(parts[:4] + parts[5:6])][int(parts[4])]
        amax = block_amax(w).repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
        # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal steps of 2^-9 of the scale; then bf16 (2^-8)
        bound = w.float().abs() * (2**-4 + 2**-8) + 2**-10 * amax / 448 * 1.01
        err = (got.float() - w.float()).abs()
        worst, n_fp8 = max(worst, (err / bound).max().item()), n_fp8 + 1
        assert (err <= bound).all(), f"{name}: FP8 dequantization error beyond e4m3 rounding"
    print(f"fp8 round trip over {n_fp8} tensors: worst error / e4m3 bound = {worst:.2f}")


def test_unsupported_checkpoints_fail_in_one_clear_line(tmp_path):
    hf.save_pretrained(ours_tiny(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in [("hidden_act", "gelu", "hidden_act='gelu'"),
                                ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "RoPE 'dynamic'"),
                                ("topk_method", "group_limited_greedy", "topk_method")]:
        (tmp_path / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(ValueError, match=message) as e:
            hf.from_pretrained(tmp_path)
        assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_routed_experts": 4}))
    with pytest.raises(ValueError, match="tensors nanoseek has no place for"):
        hf.from_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# train.py: exact resume, configurator, balancing, checkpoints, fine-tuning from a folder


TRAIN = os.path.join(HERE, "train.py")
TRAIN_TINY = ["--n_layer=3", "--n_embd=32", "--n_head=2", "--kv_lora_rank=16", "--qk_nope_head_dim=8",
        "--qk_rope_head_dim=8", "--v_head_dim=8", "--dense_inter_dim=64", "--n_experts=8", "--top_k=2", "--n_shared=1",
        "--moe_inter_dim=16", "--block_size=32", "--batch_size=8", "--eval_iters=2", "--log_interval=2",
        "--warmup_iters=2", "--learning_rate=3e-3", "--device=cpu", "--plot=False", "--threads=1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine their barriers stall for whole time slices."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A small char-level corpus through prepare.py itself: sentences from a little grammar, so there is something
    to learn and the router has structure to find."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    subjects, verbs, objects = ["the king", "a fool", "my lord", "the queen", "good sir"], \
        ["loves", "mocks", "serves", "fears", "names"], ["the crown", "his horse", "her ring", "the moon", "a ghost"]
    text = "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(2000))
    src = root / "tiny.txt"
    src.write_text(text)
    prepare.main([f"--input={src}", "--tokenizer=char", f"--data_root={root}", "--name=tiny"])
    return str(root)


def run_train(data_root, out_dir, *args):
    """Run train.py in this process (no interpreter start-up) and return its module globals."""
    return run_train_argv("--dataset=tiny", f"--data_root={data_root}", f"--out_dir={out_dir}", *TRAIN_TINY, *args)


def run_train_argv(*args):
    argv, hook = sys.argv, sys.excepthook
    sys.argv = ["train.py", *args]
    try:
        return runpy.run_path(TRAIN, run_name="__main__")
    finally:
        sys.argv, sys.excepthook = argv, hook  # train.py sets its Ctrl-C hook: not for this process
        errors.release_locks()  # the process goes on: the next run may use the same out_dir


def fails_with(data_root, tmp_path, *args):
    with pytest.raises(SystemExit) as e:
        run_train(data_root, tmp_path / "fail", *args)
    return str(e.value.code)


def read_log(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


# -----------------------------------------------------------------------------


def test_resume_is_exact(data_root, tmp_path):
    """N steps, save, resume, N more == 2N steps uninterrupted: every parameter, expert bias and Adam moment."""
    common = ["--eval_interval=100", "--lr_decay_iters=12", "--balance=bias", "--bias_update_rate=0.01"]
    straight = run_train(data_root, tmp_path / "a", "--max_iters=12", *common)
    run_train(data_root, tmp_path / "b", "--max_iters=6", *common)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iter_num"] == 6
    resumed = run_train(data_root, tmp_path / "b", "--max_iters=12", "--init_from=resume", *common)
    assert resumed["iter_num"] == 12
    want, got = straight["raw_model"].state_dict(), resumed["raw_model"].state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"
    biases = [k for k in want if k.endswith("expert_bias")]
    assert len(biases) == 2 and all(want[k].abs().sum() > 0 for k in biases)  # the biases did move
    opt_a, opt_b = straight["optimizer"].state_dict()["state"], resumed["optimizer"].state_dict()["state"]
    for i in opt_a:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[i][k], opt_b[i][k])
    # and the checkpoint written at the end of each holds the same
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


def test_compile_blocks_trains_as_eager_does(data_root, tmp_path):
    """--compile --compile_blocks (each transformer block compiled in place, and the head with its loss) against the
    eager run: the same losses and weights to float32 rounding and the same checkpoint keys; identical blocks
    compile once, and evaluations run
    eagerly (nothing compiled in eval mode). Dense blocks only: the CPU's MoE path is the reference loop, which
    breaks graphs where the GPU's kernels do not."""
    common = ["--max_iters=4", "--eval_interval=2", "--n_dense_layers=3"]
    eager = run_train(data_root, tmp_path / "eager", *common)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    blocks = run_train(data_root, tmp_path / "blocks", *common, "--compile", "--compile_blocks")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # three blocks, one compilation;
    # the head with its loss (Model.head_and_loss), the other
    ea, eb = read_log(tmp_path / "eager", "eval"), read_log(tmp_path / "blocks", "eval")
    assert [r["iter"] for r in ea] == [r["iter"] for r in eb] == [0, 2, 4]
    for a, b in zip(ea, eb):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 and abs(a["train_loss"] - b["train_loss"]) < 1e-4, (a, b)
    want, got = eager["raw_model"].state_dict(), blocks["raw_model"].state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-4, rtol=1e-3), name
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("eager", "blocks"))
    assert ca["model"].keys() == cb["model"].keys()
    torch._dynamo.reset()
    counters.clear()
    run_train(data_root, tmp_path / "blocks", *common, "--compile", "--compile_blocks", "--init_from=resume",
              "--eval_only")
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])


def test_resume_with_more_iters_keeps_the_lr_on_its_curve(data_root, tmp_path, capsys):
    """A run of 8 iters (lr_decay_iters = max_iters = 8) resumed with --max_iters=12 goes on along the saved run's
    schedule: the lr at the resumed step is the one the saved run computed there, and the 4 new iters run at
    min_lr; the run says so. --lr_decay_iters=12 stretches the cosine instead (the lr goes back up)."""
    common = ["--eval_interval=8", "--warmup_iters=2", "--log_interval=1"]
    saved = run_train(data_root, tmp_path / "a", "--max_iters=8", *common)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    resumed = run_train(data_root, tmp_path / "a", "--max_iters=12", "--init_from=resume", *common)
    out = capsys.readouterr().out
    assert "the lr schedule keeps the checkpoint's lr_decay_iters=8, so iters 8..12 run at min_lr 3.00e-04" in out
    assert resumed["lr_decay_iters"] == 8 and resumed["get_lr"](8) == saved["get_lr"](8) == saved["min_lr"]
    lrs = {r["iter"]: r["lr"] for r in read_log(tmp_path / "a", "train")}
    assert [lrs[i] for i in range(9, 13)] == [saved["min_lr"]] * 4  # each logged lr is the one iter i - 1 used
    assert all(lrs[i] == saved["get_lr"](i - 1) for i in range(1, 9))  # the saved run's own curve, kept in the log
    stretched = run_train(data_root, tmp_path / "b", "--max_iters=12", "--init_from=resume", "--lr_decay_iters=12",
                          *common)
    assert stretched["get_lr"](8) > 2 * saved["min_lr"]  # the other choice, when it is asked for


def test_new_run_into_another_runs_out_dir_says_so_and_keeps_it(good_run, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(good_run / "good", out)
    kept = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run_train(data_root, out, "--max_iters=2")
    msg = str(e.value.code)
    assert msg.startswith(f"{out}/ckpt.pt holds another run's checkpoint (") and "\n" not in msg
    assert msg.endswith("continue it with --init_from=resume, train this one elsewhere with --out_dir=DIR, or "
                        "replace it with --overwrite")
    assert (out / "ckpt.pt").read_bytes() == kept  # refused before anything was written
    capsys.readouterr()
    g = run_train(data_root, out, "--max_iters=2", "--eval_interval=2", "--overwrite")
    assert f"--overwrite: {out}/ckpt.pt (" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["run"] == g["run_id"]  # now this run's
    run_train(data_root, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume")  # resume needs no flag


def test_missing_dataset_lists_the_ones_there(data_root, tmp_path, monkeypatch):
    assert fails_with(data_root, tmp_path, "--dataset=tiyn") == (
        f"no dataset {data_root}/tiyn; {data_root}/ has tiny: did you mean --dataset=tiny?")
    assert fails_with(data_root, tmp_path, "--dataset=poems") == (
        f"no dataset {data_root}/poems; {data_root}/ has tiny: pick one with --dataset=NAME, or build poems with "
        "python prepare.py --input=FILE_OR_FOLDER --name=poems")
    monkeypatch.chdir(tmp_path)  # a relative data_root is the current folder's: the path looked in is shown whole
    msg = fails_with("data", tmp_path, "--dataset=tiny")
    assert f"data/tiny ({tmp_path}/data/tiny)" in msg


def test_missing_checkpoint_lists_the_ones_nearby(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("out/a", "out/b/c"):
        os.makedirs(d)
        open(os.path.join(d, "ckpt.pt"), "w").close()
    with pytest.raises(SystemExit) as e:
        sample.main(["--device=cpu"])
    assert str(e.value.code) == ("no checkpoint in out/: run python train.py first; checkpoints there: out/a, "
                                 "out/b/c (--out_dir=DIR)")
    with pytest.raises(SystemExit) as e:
        run_train_argv("--init_from=resume", "--out_dir=out/x", "--device=cpu")
    assert str(e.value.code) == ("no checkpoint at out/x/ckpt.pt to resume from: train from scratch first "
                                 "(--init_from=scratch); checkpoints there: out/a, out/b/c (--out_dir=DIR)")


def test_thread_choice_is_printed_and_follows_the_free_cores(data_root, tmp_path, capsys, monkeypatch):
    import system
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the choice itself, as a user without it gets it
    capsys.readouterr()
    g = run_train(data_root, tmp_path / "a", "--max_iters=2", "--eval_interval=2", "--threads=0")
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("threads: "))
    n, why = re.fullmatch(r"threads: (\d+) \((.*)\)", line).groups()
    assert int(n) == g["n_threads"] and 1 <= int(n) <= os.cpu_count()
    assert why.endswith("--threads=N or OMP_NUM_THREADS=N fixes it")
    assert re.match(r"\d+ physical cores, \d+\.\d busy with other work; follows the load", why), why
    run_train(data_root, tmp_path / "b", "--max_iters=2", "--eval_interval=2", "--threads=3")
    assert "threads: 3 (--threads; --threads=N or OMP_NUM_THREADS=N fixes it)" in capsys.readouterr().out
    sample.main([f"--out_dir={tmp_path / 'b'}", "--device=cpu", "--num_samples=1", "--max_new_tokens=2"])
    assert re.search(r"; threads: \d+ \(\d+ physical cores, \d+\.\d busy with other work; --threads=N or "
                     r"OMP_NUM_THREADS=N fixes it\)$", capsys.readouterr().err, re.M)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert system.pick_threads(0) == (2, "OMP_NUM_THREADS", False)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert system.pick_threads(0, share=64)[:2] == (1, f"{system.physical_cores()[1]} physical cores / 64 ranks")
    # the arithmetic: 2 logical CPUs, 1.5 CPU-seconds busy in 1 s of which 0.5 were ours -> 1 core busy elsewhere
    a, b = (0.0, {0: (0.0, 0.0), 1: (0.0, 0.0)}, 0.0), (1.0, {0: (1.0, 1.0), 1: (0.5, 1.0)}, 0.5)
    assert system.busy_elsewhere(a, b, [0, 1]) == 1.0
    assert [system.free_threads(2, busy, 2) for busy in (0.0, 0.4, 0.6, 1.0, 2.0)] == [2, 2, 1, 1, 1]
    assert system.free_threads(4, 2.0, 8) == 3  # 8 hyperthreads of 4 cores: 2 busy threads are one core's worth


HELP_SCRIPTS = ["train.py", "sample.py", "bench.py", "study.py"]


@pytest.mark.parametrize("script", HELP_SCRIPTS)
def test_help_lists_every_setting(script):
    """--help exits 0 and lists every setting the script defines (its module-level assignments before the
    settings_of line; train.py's ModelConfig fields too) with its default and type, in the source's groups."""
    src = open(os.path.join(HERE, script)).read()
    cut = next(i for i, l in enumerate(src.splitlines(), 1) if "settings_of(globals())" in l)
    names = [t.id for node in ast.parse(src).body if isinstance(node, ast.Assign) and node.lineno < cut
             for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_")]
    if script == "train.py":
        names += [f.name for f in dataclasses.fields(ModelConfig)]
    r = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True,
                       cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and not r.stderr, r.stderr
    lines = r.stdout.splitlines()
    listed = [m[1] for m in (re.match(r"  --(\w+)=", l) for l in lines) if m]
    assert sorted(set(names)) == sorted(listed), set(names) ^ set(listed)  # each once, nothing else
    if script == "train.py":
        assert any(re.fullmatch(r"  --max_iters=400 +int", l) for l in lines)
        assert any(re.match(r"  --threads=0 +int +CPU: torch threads; 0 = OMP_NUM_THREADS if set, else one per", l)
                   for l in lines)
        assert any(re.fullmatch(r"  --lr_decay_iters=None +int or None +None: max_iters", l) for l in lines)
        assert {"I/O", "data", "load balancing", "model.py: MLA (DeepSeek-V2 section 2.1)"} <= set(lines)
        out_dir_line = next(i for i, l in enumerate(lines) if l.startswith("  --out_dir="))
        assert lines.index("I/O") < out_dir_line
        assert lines[out_dir_line].endswith("ckpt.pt, log.jsonl and the plots go here")
    if script == "sample.py":
        assert any(re.match(r"  --top_p=1.0 +float +nucleus sampling", l) for l in lines)


def test_checkpoint_round_trips_into_model(data_root, tmp_path):
    g = run_train(data_root, tmp_path, "--max_iters=4", "--eval_interval=2")
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)  # no pickled code needed
    assert set(ckpt) == {"model", "optimizer", "model_args", "config", "iter_num", "best_val_loss", "run", "data",
                         "train_seconds"}
    assert ckpt["iter_num"] == 4 and ckpt["config"]["dataset"] == "tiny" and ckpt["config"]["data_root"] == data_root
    assert ckpt["data"]["dir"] == os.path.join(data_root, "tiny") and ckpt["data"]["tokenizer"]["kind"] == "char"
    assert ckpt["config"]["n_experts"] == 8 and ckpt["model_args"]["vocab_size"] == g["data"].vocab_size
    model = Model(ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])  # strict: same names and shapes, expert biases included
    model.eval()
    g["raw_model"].eval()
    idx = torch.randint(0, ckpt["model_args"]["vocab_size"], (2, 16))
    assert torch.equal(model(idx)[0], g["raw_model"](idx)[0])
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in read_log(tmp_path, "eval") if r["iter"] > 0)


def test_bias_balancing_lowers_max_vio(data_root, tmp_path):
    """Same seed, same batches: the aux-loss-free bias update leaves the experts far better balanced than none."""
    args = ["--max_iters=60", "--eval_interval=30", "--eval_iters=4", "--bias_update_rate=0.01"]
    run_train(data_root, tmp_path / "bias", "--balance=bias", *args)
    run_train(data_root, tmp_path / "none", "--balance=none", *args)

    def late_max_vio(d):
        batch = [r["maxvio_batch"] for r in read_log(d, "train") if r["iter"] > 30]
        return sum(batch) / len(batch), read_log(d, "eval")[-1]["maxvio_global"]

    (bias_batch, bias_global), (none_batch, none_global) = late_max_vio(tmp_path / "bias"), late_max_vio(tmp_path / "none")
    print(f"MaxVio_batch bias {bias_batch:.3f} none {none_batch:.3f}; MaxVio_global bias {bias_global:.3f} "
          f"none {none_global:.3f}")
    assert bias_batch < 0.7 * none_batch
    assert bias_global < none_global


def test_overrides_and_config_files(data_root, tmp_path):
    cfg = tmp_path / "my_config.py"
    cfg.write_text("n_layer = 2\nn_experts = 16\nbalance = 'none'\n")
    g = run_train(data_root, tmp_path, str(cfg), "--n_experts=64", "--top_k=6", "--n_shared=2", "--max_iters=0",
                  "--eval_only")
    c = g["raw_model"].config
    assert (c.n_layer, c.n_experts, c.top_k, c.n_shared) == (2, 64, 6, 2)  # file, then --key=value, in order
    assert g["balance"] == "none" and g["eval_only"] is True and c.aux_alpha == 0.0
    assert not os.path.exists(tmp_path / "ckpt.pt")  # eval_only saves nothing
    g = run_train(data_root, tmp_path, "--balance=aux", "--aux_alpha=0.001", "--max_iters=0")
    assert g["raw_model"].config.aux_alpha == 0.001  # the aux loss is on only with balance=aux


@pytest.mark.parametrize("args, words", [
    (["--n_expert=4"], "unknown setting --n_expert; did you mean --n_experts"),
    (["--learning_rat=1e-3"], "did you mean --learning_rate"),
    (["--n_experts=2.5"], "--n_experts expects an int"),
    (["--compile=maybe"], "--compile expects true or false"),
    (["--compile_blocks"], "--compile_blocks says how --compile compiles: add --compile"),
    (["--balance=loss"], "--balance='loss' must be one of bias, aux, none"),
    (["--top_k=9"], "invalid config: top_k (9) must be in 1..n_experts (8)"),
    (["--n_group=3"], "n_experts (8) must be divisible by n_group (3)"),
    (["--n_group=2", "--topk_group=3"], "topk_group (3) must be in 1..n_group (2)"),
    (["--vocab_size=10"], "vocab_size 10 is smaller than the data's vocabulary"),
    (["--dataset=nothing_here"], "has tiny: pick one with --dataset=NAME, or build nothing_here with python prepare"),
    (["--init_from=resume"], "no checkpoint at"),
])
def test_rejections_are_one_clear_line(data_root, tmp_path, args, words):
    msg = fails_with(data_root, tmp_path, *args)
    assert words in msg and "\n" not in msg, msg
    assert not os.path.exists(tmp_path / "fail" / "log.jsonl")  # rejected before any work


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path):
    run_train(data_root, tmp_path, "--max_iters=4", "--eval_interval=2")
    good = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    msg = fails_with(data_root, tmp_path, f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=10",
                     "--learning_rate=1e30", "--warmup_iters=0")  # finite, but the weights blow up
    assert "loss became NaN/inf at iter" in msg and "keeps iter 4" in msg, msg
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert kept["iter_num"] == 4 and all(torch.equal(good["model"][k], kept["model"][k]) for k in good["model"])


def test_ddp_two_ranks_match_one_rank(data_root, tmp_path):
    """torchrun with 2 CPU ranks (gloo) x 1 micro-batch == 1 rank x 2 micro-batches: the same batches, gradients
    averaged by DDP instead of summed in place (equal up to float rounding), and expert biases updated from the
    all-reduced counts, so every rank keeps the same ones."""
    args = ["--max_iters=6", "--eval_interval=100", "--gradient_accumulation_steps=2", "--bias_update_rate=0.01"]
    run_train(data_root, tmp_path / "one", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
                        "--dataset=tiny", f"--data_root={data_root}", f"--out_dir={tmp_path / 'two'}", *TRAIN_TINY,
                        *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 rank(s) x 1 micro-batches" in r.stdout
    one, two = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k
    assert any(one[k].abs().sum() > 0 for k in one if k.endswith("expert_bias"))


# -----------------------------------------------------------------------------
# sharded training (FSDP2, parallel.py): 2 CPU ranks under torchrun with gloo against one process

# run as a torchrun script: train.py through runpy, then each rank's expert biases saved (they are replicated, so
# ckpt.pt holds only rank 0's); "full_disk" first: every write of a save fails half-way, as on a full disk
FSDP_RUNNER = """
import contextlib, errno, os, runpy, sys
sys.path.insert(0, {here!r})
import errors, torch
mode, out_dir = sys.argv[1], sys.argv[2]
if mode == "full_disk":
    real_atomic_write = errors.atomic_write

    @contextlib.contextmanager
    def full_disk(path):
        with real_atomic_write(path) as f:
            class Half:
                def write(self, b):
                    f.write(bytes(b)[:len(b) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                flush = f.flush
            yield Half()
    errors.atomic_write = full_disk  # train.py imports it from errors
sys.argv = [{train!r}, *sys.argv[3:], "--out_dir=" + out_dir]
run = runpy.run_path({train!r}, run_name="__main__")
torch.save([m.expert_bias for m in run["moe_layers"]], os.path.join(out_dir, f"bias{{os.environ['RANK']}}.pt"))
"""
# a tiny MoE model with an MTP module, 4 micro-batches per step (2 per rank), an evaluation and a save every step
FSDP_ARGS = ["--mtp_depth=1", "--gradient_accumulation_steps=4", "--eval_interval=1", "--lr_decay_iters=6",
             "--bias_update_rate=0.01", "--log_interval=1"]
FSDP_ATOL = 2e-5  # float32; the gradients are summed in another order (reduce-scatter vs in place): rounding only


def run_fsdp(tmp_path, data_root, out_dir, *args, mode="plain"):
    runner = tmp_path / "fsdp_runner.py"
    runner.write_text(FSDP_RUNNER.format(here=HERE, train=TRAIN))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(runner), mode, str(out_dir), "--dataset=tiny", f"--data_root={data_root}", *TRAIN_TINY,
                           *FSDP_ARGS, "--fsdp=True", *args], capture_output=True, text=True, env=env, timeout=300)


def eval_losses(out_dir):
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in read_log(out_dir, "eval")}


def assert_same_checkpoint(want, got, atol):
    """Two ckpt.pt files: the same keys, shapes and kinds, tensors within atol, the expert biases equal."""
    a, b = (torch.load(p, weights_only=True) for p in (want, got))
    assert a["iter_num"] == b["iter_num"] and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype and a["model"][k].shape == b["model"][k].shape, k
        if k.endswith("expert_bias"):
            assert torch.equal(a["model"][k], b["model"][k]), k
        assert_close(k, b["model"][k], a["model"][k], atol)
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        assert torch.equal(oa["state"][i]["step"], ob["state"][i]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert_close(f"state {i} {k}", ob["state"][i][k], oa["state"][i][k], atol)


def test_fsdp_matches_one_process_and_resumes_across(data_root, tmp_path):
    """6 steps on one process == 3 under FSDP, resumed on one process for 3 more == 3 on one process, resumed under
    FSDP: the same evaluation losses every step and the same ckpt.pt (within FSDP_ATOL; its optimizer state in
    optimizer.state_dict()'s own format), the expert biases equal exactly, on both ranks."""
    run_train(data_root, tmp_path / "one", "--max_iters=6", *FSDP_ARGS)
    one = eval_losses(tmp_path / "one")
    # FSDP from scratch for 3 steps, then one process
    r = run_fsdp(tmp_path, data_root, tmp_path / "fsdp_first", "--max_iters=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s) x 2 micro-batches" in r.stdout and "sharded (FSDP2)" in r.stdout
    run_train(data_root, tmp_path / "fsdp_first", "--max_iters=6", "--init_from=resume", *FSDP_ARGS)
    # one process for 3 steps, then FSDP
    run_train(data_root, tmp_path / "fsdp_last", "--max_iters=3", *FSDP_ARGS)
    r = run_fsdp(tmp_path, data_root, tmp_path / "fsdp_last", "--max_iters=6", "--init_from=resume")
    assert r.returncode == 0, r.stderr[-3000:]
    for d in ("fsdp_first", "fsdp_last"):
        got = eval_losses(tmp_path / d)
        assert got.keys() == one.keys() == set(range(7))
        diff = max(abs(x - y) for i in one for x, y in zip(one[i], got[i]))
        print(f"{d}: max |eval loss - one process's| over 7 evaluations = {diff:.2e}")
        assert diff < FSDP_ATOL, (d, one, got)
        assert_same_checkpoint(tmp_path / "one" / "ckpt.pt", tmp_path / d / "ckpt.pt", FSDP_ATOL)
    biases = [torch.load(tmp_path / "fsdp_last" / f"bias{r}.pt", weights_only=True) for r in (0, 1)]
    want = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    want = [want[k] for k in want if k.endswith("expert_bias")]
    assert len(want) == 3 and all(b.abs().sum() > 0 for b in want)  # 2 MoE blocks and the MTP one, and they moved
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(want, *biases))


def test_fsdp_fine_tunes_a_folder_in_bfloat16_and_a_failed_save_keeps_the_old_checkpoint(data_root, tmp_path):
    """--init_from=FOLDER under FSDP (rank 0 reads it, the ranks get their shards) with the GPU's mixed precision
    (bfloat16 weights, float32 gradient reduction): its first evaluation is the folder's model's within bfloat16
    rounding; then every write of the save fails half-way (a full disk): the old ckpt.pt stays byte-identical."""
    first = run_train(data_root, tmp_path / "a", "--max_iters=2", "--eval_interval=2")
    hf.save_pretrained(first["raw_model"], str(tmp_path / "hf"))
    before = (tmp_path / "a" / "ckpt.pt").read_bytes()
    r = run_fsdp(tmp_path, data_root, tmp_path / "a", "--max_iters=2", "--eval_interval=2", "--overwrite",
                 f"--init_from={tmp_path / 'hf'}", "--dtype=bfloat16", "--mtp_depth=0", mode="full_disk")
    assert r.returncode != 0
    assert re.search(r"cannot save \S+ckpt.pt at iter 2 \(No space left on device\): stopping", r.stderr), r.stderr
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == before
    assert not [f for f in os.listdir(tmp_path / "a") if ".tmp-" in f]
    want, got = read_log(tmp_path / "a", "eval")[1], read_log(tmp_path / "a", "eval")[2]
    assert want["iter"] == 2 and got["iter"] == 0 and abs(got["val_loss"] - want["val_loss"]) < 0.02, (want, got)
    assert math.isfinite(read_log(tmp_path / "a", "train")[-1]["loss"])


def test_fsdp_needs_torchrun(data_root, tmp_path):
    msg = fails_with(data_root, tmp_path, "--fsdp=True")
    assert "--fsdp=True shards the model over torchrun's processes" in msg and "\n" not in msg


def test_plots_are_drawn_from_the_log(data_root, tmp_path):
    """--plot draws loss.png and expert_load.png at the end; --plot_only redraws them from log.jsonl alone."""
    pytest.importorskip("matplotlib")
    run_train(data_root, tmp_path, "--max_iters=4", "--eval_interval=2", "--plot=True")
    pngs = [tmp_path / "loss.png", tmp_path / "expert_load.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png.unlink()
    with pytest.raises(SystemExit) as e:  # plot_only exits after drawing
        run_train(data_root, tmp_path, "--plot_only")
    assert e.value.code is None and all(png.exists() for png in pngs)


def test_init_from_a_deepseek_folder_fine_tunes_it(data_root, tmp_path):
    """Train, export with save_pretrained, fine-tune from the folder: the first evaluation gives the exported model's
    last losses (same eval batches), and the loaded expert biases are where the updates continue from."""
    first = run_train(data_root, tmp_path / "a", "--max_iters=6", "--eval_interval=6", "--bias_update_rate=0.01")
    hf.save_pretrained(first["raw_model"], str(tmp_path / "hf"))
    run_train(data_root, tmp_path / "b", "--max_iters=2", "--eval_interval=100", "--bias_update_rate=0.01",
              f"--init_from={tmp_path / 'hf'}")
    want, got = read_log(tmp_path / "a", "eval")[-1], read_log(tmp_path / "b", "eval")[0]
    assert got["iter"] == 0 and abs(got["val_loss"] - want["val_loss"]) < 1e-5, (got, want)
    trained = first["raw_model"].state_dict()
    loaded = run_train(data_root, tmp_path / "c", "--max_iters=0", f"--init_from={tmp_path / 'hf'}")["raw_model"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.items())  # expert biases included
    assert all(trained[k].abs().sum() > 0 for k in trained if k.endswith("expert_bias"))
    assert "config.json" in fails_with(data_root, tmp_path, f"--init_from={tmp_path / 'nowhere'}")


# -----------------------------------------------------------------------------
# generate.py: the latent cache against no cache and an MHA cache, determinism, the captured step


TINY_VOCAB = tiny_config().vocab_size


def tiny_model(seed=0, **kw):
    """A random tiny model whose weights are large enough that attention and routing matter (at the init's 0.02
    greedy decoding of a tiny model repeats one or two tokens)."""
    torch.manual_seed(seed)
    model = Model(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


def tokens(model, idx, n, cache="latent", info=None, **kw):
    """generate_stream's tokens with the latent cache, the MHA cache (mla.MHACache) or none."""
    if cache == "none":
        return torch.cat(list(generate_stream(model, idx, n, use_cache=False, **kw)), dim=1)
    max_len = min(idx.shape[1] + n, model.config.block_size)
    p = model.embed.weight
    kv = new_cache(model, idx.shape[0], max_len) if cache == "latent" else \
        MHACache(model.config, idx.shape[0], max_len, p.device, p.dtype)
    if info is not None:
        info.update(cache=kv, cache_bytes=kv.nbytes())
    return torch.cat(list(generate_stream(model, idx, n, cache=kv, **kw)), dim=1)


# -----------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_latent_cache_greedy_equals_no_cache_and_mha_cache(q_lora_rank):
    model = tiny_model(q_lora_rank=q_lora_rank)
    idx = torch.randint(TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    latent = tokens(model, idx, 40, temperature=0, cache="latent")
    none = tokens(model, idx, 40, temperature=0, cache="none")
    mha = tokens(model, idx, 40, temperature=0, cache="mha")
    print("latent:", latent[0].tolist())
    assert latent.shape == (2, 40)
    assert torch.equal(latent, none), "latent-cache decoding diverged from full recomputation"
    assert torch.equal(latent, mha), "the MHA-cache baseline diverged from the latent cache"
    assert len(set(latent[0].tolist())) > 3  # a real sequence, not one token repeated
    assert torch.equal(generate(model, idx, 40, temperature=0)[:, 7:], latent)  # same as generate()


def test_cache_bytes_formula():
    model = tiny_model()
    cfg = model.config
    B, T, N = 3, 5, 11
    idx = torch.zeros(B, T, dtype=torch.long) + 7
    for dt, elt in [(torch.float32, 4), (torch.bfloat16, 2)]:
        cast_weights(model, dt)
        info = {}
        tokens(model, idx, N, temperature=0, info=info)
        assert info["cache_bytes"] == cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (T + N) * B * elt
        assert info["cache"].kv.dtype == dt
        mha = {}
        tokens(model, idx, N, temperature=0, cache="mha", info=mha)
        assert mha["cache_bytes"] == cfg.n_layer * cfg.n_head * (cfg.qk_head_dim + cfg.v_head_dim) * (T + N) * B * elt
    assert model.rope_cos.dtype == torch.float32 and model.layers[1].ffn.expert_bias.dtype == torch.float32


def test_greedy_and_seeded_sampling_are_deterministic():
    model = tiny_model()
    idx = torch.randint(TINY_VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    greedy = tokens(model, idx, 24, temperature=0)
    assert torch.equal(greedy, tokens(model, idx, 24, temperature=0))
    assert torch.equal(greedy, tokens(model, idx, 24, temperature=1.0, top_k=1))  # top_k 1 is greedy too

    def seeded(seed, **kw):
        return tokens(model, idx, 24, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    a = seeded(1337)
    assert torch.equal(a, seeded(1337))
    assert not torch.equal(a, seeded(1338))
    assert not torch.equal(a, greedy)
    assert torch.equal(seeded(5, top_p=0.9), seeded(5, top_p=0.9))


@pytest.mark.parametrize("cache", ["latent", "mha"])
def test_static_decode_step_equals_eager(cache):
    """cuda_graph=True runs the step CapturedStep captures: the position in a device tensor that the step advances,
    the whole preallocated cache read with the rows past the position masked. On the CPU it runs uncaptured: the
    same tokens as the eager, slice-by-position path, through a refill past block_size too."""
    model = tiny_model(block_size=32)
    idx = torch.randint(TINY_VOCAB, (3, 10), generator=torch.Generator().manual_seed(4))
    eager = tokens(model, idx, 38, cache=cache, temperature=0)
    static = tokens(model, idx, 38, cache=cache, temperature=0, cuda_graph=True)
    assert torch.equal(static, eager)
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    sampled = tokens(model, idx, 20, cache=cache, temperature=0.9, top_k=20, generator=g1)
    assert torch.equal(tokens(model, idx, 20, cache=cache, temperature=0.9, top_k=20, generator=g2, cuda_graph=True),
                       sampled)


@needs_cuda
def test_cuda_graph_decoding_matches_eager_gpu():
    """bf16 on the GPU, kernels on: 64 greedy steps replayed from one captured graph give the eager path's tokens
    (the same kernels run); a second generation with another batch and prompt length captures its own graph."""
    torch.manual_seed(0)
    model = Model(tiny_config(block_size=128, n_embd=128, moe_inter_dim=64)).cuda()
    cast_weights(model, torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    for batch, prompt in [(2, 9), (5, 3)]:
        idx = torch.randint(TINY_VOCAB, (batch, prompt), device="cuda")
        eager = generate(model, idx, 64, temperature=0)
        graph = generate(model, idx, 64, temperature=0, cuda_graph=True)
        assert torch.equal(graph, eager)


@needs_cuda
def test_speculative_decoding_with_cuda_graphs_gpu():
    """fp32 on the GPU, kernels on: speculation with its three steps captured gives the tokens of eager
    speculation, and both those of plain greedy decoding."""
    torch.manual_seed(0)
    model = Model(tiny_config(vocab_size=7, block_size=96, mtp_depth=1)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    idx = torch.randint(7, (2, 5), device="cuda")
    plain = generate(model, idx, 40, temperature=0)
    stats = {}
    eager = torch.cat([idx] + list(generate_stream(model, idx, 40, temperature=0, speculative=True, stats=stats)), 1)
    graph = generate(model, idx, 40, temperature=0, speculative=True, cuda_graph=True)
    assert torch.equal(eager, plain) and torch.equal(graph, plain) and stats["accepted"] > 0


def test_refill_past_block_size():
    """A full cache is refilled with the last block_size // 2 tokens at positions 0..: the tokens after the
    refill are the greedy continuation of exactly that context."""
    model = tiny_model(block_size=32)
    idx = torch.randint(TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    out = tokens(model, idx, 38, temperature=0)
    assert out.shape == (2, 38)
    assert torch.equal(out[:, :22], generate(model, idx, 22, temperature=0)[:, 10:])  # before the refill
    seq = torch.cat([idx, out], dim=1)  # the refill happens once 10 + 23 tokens exist (pos == block_size)
    context = seq[:, 33 - 16:33]
    assert torch.equal(out[:, 23:], generate(model, context, 15, temperature=0)[:, 16:])


def test_routing_is_recorded_from_generation():
    """The recorder keeps the decisions of the generation's own forward passes: one (K experts) row per position
    that was fed, in order, equal to the decisions a full forward over the final sequence makes."""
    model = tiny_model()
    moe = model.layers[2].ffn
    idx = torch.randint(TINY_VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    records = {}
    for kind in ("latent", "none"):
        routes = []
        with recording_routes([moe], sample.first_sample_routes(routes, batch=3)):
            out = tokens(model, idx, 20, temperature=0, cache=kind)
        records[kind] = [torch.cat(t) for t in zip(*routes)]
        assert moe.on_route is None  # recording ends with the block
    ids, weights = records["latent"]
    assert ids.shape == weights.shape == (6 + 20 - 1, model.config.top_k)
    assert torch.equal(ids, records["none"][0])
    seen = []
    hook = moe.register_forward_hook(lambda m, inputs, output: seen.append(m.route(inputs[0].flatten(0, 1))[0]))
    model(torch.cat([idx, out], dim=1)[:, :-1])
    hook.remove()
    full = seen[0].view(3, -1, model.config.top_k)[0]
    assert torch.equal(ids.sort(dim=-1).values, full.sort(dim=-1).values)


# -----------------------------------------------------------------------------
# multi-token prediction (DeepSeek-V3 section 2.2): the loss, checkpoints, self-speculative decoding




def mtp_model(seed=0, vocab_size=101, **kw):
    return tiny_model(seed, **{"mtp_depth": 1, "vocab_size": vocab_size, **kw})


def test_mtp_loss_is_the_formula():
    """V3 eqs. 21-25 by hand on a tiny case: depth k reads h^(k-1) and Emb(t_(i+k)), predicts t_(i+k+1); the
    training loss adds lambda / D times the sum of the depths' cross-entropies; eval reports the main loss alone."""
    model = mtp_model(mtp_depth=2, mtp_loss_weight=0.3).train()
    idx = torch.randint(101, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(101, (2, 12), generator=torch.Generator().manual_seed(2))
    _, loss = model(idx, targets)
    h = model.hidden(idx)
    main = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), targets.flatten())
    want = []
    for k, module in enumerate(model.mtp, start=1):
        cos, sin = model.rope_cos[:12 - k], model.rope_sin[:12 - k]
        x = module.eh_proj(torch.cat([module.enorm(model.embed(targets[:, k - 1:11])), module.hnorm(h[:, :12 - k])], -1))
        h = module.block(x, cos, sin)
        want.append(F.cross_entropy(model.head(module.norm(h)).flatten(0, 1), targets[:, k:].flatten()))
    assert_close("MTP losses", model.mtp_loss, torch.stack(want), 1e-5)
    assert_close("training loss", loss, main + 0.3 / 2 * sum(want), 1e-5)
    model.eval()
    assert_close("eval loss is the main head's", model(idx, targets)[1], main, 1e-5)


def test_mtp_depth_0_changes_nothing():
    """The main model of an MTP model is the same function as the model without it, with the same weights."""
    with_mtp, plain = mtp_model(), tiny_model()
    state = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    plain.load_state_dict(state)
    idx = torch.randint(101, (2, 10), generator=torch.Generator().manual_seed(3))
    assert torch.equal(with_mtp(idx)[0], plain(idx)[0])
    assert len(with_mtp.moe_layers()) == len(plain.moe_layers()) + 1  # the MTP block's MoE balances too


@pytest.mark.parametrize("vocab_size", [5, 101])
def test_greedy_speculative_decoding_equals_plain(vocab_size):
    """A random MTP module: with 5 tokens its drafts are accepted often, with 101 almost never; either way greedy
    speculation gives exactly plain greedy decoding's tokens, for several prompts and a batch."""
    model = mtp_model(vocab_size=vocab_size)
    for seed, (B, T) in enumerate([(1, 3), (1, 9), (3, 5)]):
        idx = torch.randint(vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
        stats = {}
        spec = torch.cat(list(generate_stream(model, idx, 30, temperature=0, speculative=True, stats=stats)), 1)
        assert torch.equal(spec, generate(model, idx, 30, temperature=0)[:, T:]), (vocab_size, seed)
        static = generate(model, idx, 30, temperature=0, speculative=True, cuda_graph=True)[:, T:]
        assert torch.equal(static, spec)  # the steps a CUDA graph captures: positions on the device
        print(f"vocab {vocab_size}, B {B}: {stats['accepted']} of {stats['drafts']} drafts accepted")
        if vocab_size == 5 and B == 1:
            assert 0 < stats["accepted"] < stats["drafts"]  # both paths taken


def test_every_draft_accepted():
    """Heads that always predict token 0 (their norms zeroed): every draft is accepted, two tokens per step."""
    model = mtp_model()
    with torch.no_grad():
        model.norm.weight.zero_()
        model.mtp[0].norm.weight.zero_()
    idx = torch.randint(101, (2, 4), generator=torch.Generator().manual_seed(4))
    stats = {}
    spec = torch.cat(list(generate_stream(model, idx, 11, temperature=0, speculative=True, stats=stats)), 1)
    assert torch.equal(spec, torch.zeros(2, 11, dtype=torch.long))
    assert stats["accepted"] == stats["drafts"] == 2 * 5  # 1 + 5 steps of 2 tokens


def test_speculative_sampling_keeps_the_distribution():
    """4,000 rows sample two tokens from one prompt, speculating (the rejection rule) with a random MTP module:
    the empirical distribution of the pairs matches the model's own filtered p(x1) p(x2 | x1) (chi-square)."""
    V, N = 5, 4000
    model = mtp_model(vocab_size=V)
    prompt = torch.tensor([[1, 3, 2]])
    with torch.no_grad():  # sample_next's distributions: temperature 0.9, the top 4 of 5 tokens
        p1 = sample_probs(model(prompt)[0][:, -1], 0.9, 4)[0]
        ext = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = sample_probs(model(ext)[0][:, -1], 0.9, 4)
    want = (p1[:, None] * p2).flatten()
    stats = {}
    got = torch.cat(list(generate_stream(model, prompt.repeat(N, 1), 2, temperature=0.9, top_k=4, speculative=True,
                                         generator=torch.Generator().manual_seed(5), stats=stats)), 1)
    counts = torch.bincount(got[:, 0] * V + got[:, 1], minlength=V * V).double()
    possible = want > 0
    assert counts[~possible].sum() == 0  # nothing outside the top-k
    chi2 = ((counts - N * want)[possible] ** 2 / (N * want[possible])).sum().item()
    dof = int(possible.sum()) - 1
    print(f"chi-square {chi2:.1f} ({dof} dof), {stats['accepted']} of {stats['drafts']} drafts accepted")
    assert 0 < stats["accepted"] < stats["drafts"] and dof >= 12 and chi2 < 3.09 + dof + 4 * dof ** 0.5  # ~0.5% tail


def test_speculative_refuses_without_mtp_or_room():
    with pytest.raises(ValueError, match="mtp_depth"):
        list(generate_stream(tiny_model(), torch.zeros(1, 3, dtype=torch.long), 5, speculative=True))
    with pytest.raises(ValueError, match="block_size"):
        list(generate_stream(mtp_model(), torch.zeros(1, 30, dtype=torch.long), 40, speculative=True))


def test_mtp_checkpoint_in_v3_layout_round_trips(tmp_path):
    """save_pretrained writes the MTP module as DeepSeek-V3 does (layer num_hidden_layers: enorm, hnorm, eh_proj,
    shared_head.{norm, head}, embed_tokens, a decoder layer); it loads, gives the same logits and MTP loss, and
    saves again to the same tensors."""
    from safetensors.torch import load_file
    model = mtp_model(q_lora_rank=24)
    with torch.no_grad():
        for m in model.moe_layers():
            m.expert_bias.uniform_(-0.1, 0.1)
    hf.save_pretrained(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "model.safetensors")
    n = model.config.n_layer
    for name in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
                 "embed_tokens.weight", "self_attn.q_a_proj.weight", "mlp.experts.7.down_proj.weight",
                 "mlp.gate.e_score_correction_bias", "input_layernorm.weight"]:
        assert f"model.layers.{n}.{name}" in saved, name
    assert json.load(open(tmp_path / "a" / "config.json"))["num_nextn_predict_layers"] == 1
    again = hf.from_pretrained(tmp_path / "a")
    idx = torch.randint(101, (2, 12), generator=torch.Generator().manual_seed(6))
    model.eval()
    assert torch.equal(again(idx, idx)[0], model(idx, idx)[0])
    assert torch.equal(again.mtp_loss, model.mtp_loss)
    hf.save_pretrained(again, tmp_path / "b")
    resaved = load_file(tmp_path / "b" / "model.safetensors")
    assert resaved.keys() == saved.keys() and all(torch.equal(resaved[k], saved[k]) for k in saved)
    assert hf.from_pretrained(tmp_path / "a", mtp_depth=0).config.mtp_depth == 0  # dropping the module on load


# -----------------------------------------------------------------------------
# the script, end to end, on a checkpoint in train.py's format with a char tokenizer from prepare.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    prepare = pytest.importorskip("prepare")
    root = tmp_path_factory.mktemp("sample")
    text = "".join(f"ALICE:\nI have {i} apples, and Bob has {3 * i}.\n\nBOB:\nYes, Alice!\n\n" for i in range(200))
    (root / "in.txt").write_text(text)
    prepare.main([f"--input={root / 'in.txt'}", "--tokenizer=char", f"--data_root={root / 'data'}", "--name=tiny"])
    encode, decode, eot = data_py.load_tokenizer(str(root / "data" / "tiny"))
    torch.manual_seed(0)
    model = Model(tiny_config(vocab_size=eot + 1))
    os.makedirs(root / "out")
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "iter_num": 0, "best_val_loss": 9.9,
                "config": {"dataset": "tiny", "data_root": str(root / "data")}}, root / "out" / "ckpt.pt")
    return root, decode


def run_main(capsys, *argv):
    out = sample.main(list(argv))
    captured = capsys.readouterr()
    return out, captured.out, captured.err


def test_main_streams_and_reports_cache(checkpoint, capsys):
    root, decode = checkpoint
    common = (f"--out_dir={root / 'out'}", "--start=ALICE:", "--num_samples=2", "--max_new_tokens=20",
              "--temperature=0", "--device=cpu", "--dtype=float32")
    out, stdout, stderr = run_main(capsys, *common)
    assert len(out) == 2 and len(out[0]) == 6 + 20
    assert stdout.startswith(decode(out[0]))  # the first sample, streamed, then the second
    assert decode(out[1]) in stdout
    cfg = tiny_config(vocab_size=1)
    latent = cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 26 * 2 * 4
    mha = cfg.n_layer * 2 * cfg.n_head * cfg.v_head_dim * 26 * 2 * 4
    assert f"cache: {latent:,} bytes" in stderr and f"would need {mha:,} bytes" in stderr
    assert "prompt 6 tokens x 2 samples, generated 20 x 2 = 40 tokens" in stderr
    slowest = re.search(r"the slowest after it, token (\d+), ([\d.]+) ms\)", stderr)
    assert slowest and 2 <= int(slowest[1]) <= 20, stderr  # a token after the first, by its place
    out_no_cache, _, stderr = run_main(capsys, *common, "--no_cache")
    assert out_no_cache == out
    assert "cache: none" in stderr


def test_main_bad_input(checkpoint, capsys, tmp_path, monkeypatch):
    root, decode = checkpoint
    monkeypatch.chdir(tmp_path)  # no out/ here
    with pytest.raises(SystemExit, match=r"^no checkpoint in out/: run python train.py first"):
        sample.main(["--device=cpu"])
    with pytest.raises(SystemExit, match=r"^no checkpoint in .*nowhere/: run python train.py first$"):
        sample.main([f"--out_dir={tmp_path / 'nowhere'}", "--device=cpu"])
    with pytest.raises(SystemExit, match=r"^cannot read the prompt file .*missing.txt: No such file or directory$"):
        sample.main([f"--out_dir={root / 'out'}", f"--start=FILE:{tmp_path / 'missing.txt'}", "--device=cpu"])
    prompt = tmp_path / "long.txt"
    prompt.write_text("Yes, Alice! " * 10)  # 120 characters, block_size 64
    out, stdout, stderr = run_main(capsys, f"--out_dir={root / 'out'}", f"--start=FILE:{prompt}", "--num_samples=1",
                                   "--max_new_tokens=5", "--device=cpu", "--dtype=float32")
    assert "warning: the prompt has 120 tokens, more than the model's context of 64; keeping the last 64" in stderr
    assert len(out[0]) == 64 + 5 and decode(out[0][:64]) == ("Yes, Alice! " * 10)[-64:]


def test_main_show_routing(checkpoint, capsys):
    root, decode = checkpoint
    out, stdout, _ = run_main(capsys, f"--out_dir={root / 'out'}", "--start=BOB:", "--num_samples=2",
                              "--max_new_tokens=12", "--device=cpu", "--dtype=float32", "--show_routing",
                              "--routing_layer=2")
    assert "routing in layer 2 (top-2 of 8 routed experts), sample 1: 15 tokens (4 prompt, 11 generated" in stdout
    table = stdout.split(" pos  token")[1].split("\nper expert")[0].strip().splitlines()[1:]
    assert len(table) == 15
    assert sum(int(line.split()[1]) for line in stdout.split("most served tokens\n")[1].splitlines()) == 15 * 2
    with pytest.raises(SystemExit, match="is not an MoE layer: pick one of 1..2"):
        sample.main([f"--out_dir={root / 'out'}", "--device=cpu", "--show_routing", "--routing_layer=0"])


def test_save_pretrained_then_init_from_the_folder(checkpoint, capsys, tmp_path):
    """--save_pretrained writes a DeepSeek-layout folder with the tokenizer; --init_from=that folder samples the same."""
    root, decode = checkpoint
    common = ("--start=ALICE:", "--num_samples=1", "--max_new_tokens=16", "--temperature=0", "--device=cpu",
              "--dtype=float32")
    want, _, _ = run_main(capsys, f"--out_dir={root / 'out'}", *common)
    run_main(capsys, f"--out_dir={root / 'out'}", f"--save_pretrained={tmp_path / 'hf'}")
    assert {"config.json", "model.safetensors", "meta.json"} <= set(os.listdir(tmp_path / "hf"))
    got, _, _ = run_main(capsys, f"--init_from={tmp_path / 'hf'}", *common)
    assert got == want
    with pytest.raises(SystemExit, match="neither 'resume' .* nor a folder with config.json"):
        sample.main([f"--init_from={tmp_path / 'nowhere'}", "--device=cpu"])


def test_init_from_a_folder_with_a_hugging_face_tokenizer(capsys, tmp_path):
    """A folder as DeepSeek ships it: tokenizer.json + tokenizer_config.json, read by transformers, offline."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", "to", "be", "or", "not"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}')
    torch.manual_seed(0)
    hf.save_pretrained(Model(tiny_config(vocab_size=len(vocab))), str(tmp_path))
    out, stdout, _ = run_main(capsys, f"--init_from={tmp_path}", "--start=to be", "--num_samples=1",
                              "--max_new_tokens=6", "--device=cpu", "--dtype=float32")
    assert out[0][:2] == [2, 3] and len(out[0]) == 8
    assert stdout.startswith("to be")



# -----------------------------------------------------------------------------
# failure behaviour (README, "Failure behaviour"): every bad invocation of train.py, sample.py and prepare.py ends
# with one line on stderr and a non-zero exit, touching nothing; a failed save keeps the previous checkpoint;
# prepare.py swaps a dataset in whole; logs keep their history


@pytest.fixture(scope="module")
def good_run(data_root, tmp_path_factory):
    """A tiny finished run (ckpt.pt at iter 2, log.jsonl) trained with a relative --data_root, its export to a
    Hugging Face folder, and the crafted files the bad invocations point at."""
    root = tmp_path_factory.mktemp("failures")
    here = os.getcwd()
    os.chdir(os.path.dirname(data_root))  # the checkpoint must record the data's absolute path
    try:
        run_train_argv("--dataset=tiny", f"--data_root={os.path.basename(data_root)}", f"--out_dir={root / 'good'}",
                       *TRAIN_TINY, "--max_iters=2", "--eval_interval=2")
    finally:
        os.chdir(here)
    good_ckpt = torch.load(root / "good" / "ckpt.pt", weights_only=True)
    model = Model(ModelConfig(**good_ckpt["model_args"]))
    model.load_state_dict(good_ckpt["model"])
    hf.save_pretrained(model, str(root / "hf_good"))
    hf.copy_tokenizer(os.path.join(data_root, "tiny"), str(root / "hf_good"))

    bad = root / "bad"
    bad.mkdir()
    (bad / "a_file").write_text("not a folder")
    (bad / "no_log").mkdir()
    os.mkfifo(bad / "fifo.txt")
    (bad / "types_config.py").write_text('batch_size = "four"\n')
    (bad / "resume_config.py").write_text("n_head = 4\n")
    text = "\n".join(f"{i} other words, other letters: {i * 7}!" for i in range(400)) + "\n"
    (bad / "other.txt").write_text(text)
    prepare.main([f"--input={bad / 'other.txt'}", "--tokenizer=char", f"--data_root={bad / 'data'}", "--name=other"])
    (bad / "data" / "empty_meta").mkdir()
    (bad / "data" / "empty_meta" / "meta.json").write_text("{}")
    for split in ("train", "val"):
        (bad / "data" / "empty_meta" / f"{split}.bin").write_bytes(bytes(100))

    raw = (root / "good" / "ckpt.pt").read_bytes()
    for name, content in [("zero", b""), ("truncated", raw[:len(raw) // 2]), ("random", random.Random(4096).randbytes(4096))]:
        (bad / name).mkdir()
        (bad / name / "ckpt.pt").write_bytes(content)
    (bad / "folder" / "ckpt.pt").mkdir(parents=True)

    def crafted_ckpt(name, edit):
        ckpt = torch.load(root / "good" / "ckpt.pt", weights_only=True)
        edit(ckpt)
        (bad / name).mkdir()
        torch.save(ckpt, bad / name / "ckpt.pt")
    crafted_ckpt("huge_args", lambda c: c["model_args"].update(n_embd=60000))
    crafted_ckpt("int_weights", lambda c: c["model"].update({"embed.weight": c["model"]["embed.weight"].long()}))
    crafted_ckpt("retokenized", lambda c: c["data"].update(dir=str(bad / "data" / "other")))  # as if re-prepared
    crafted_ckpt("nan_weights", lambda c: c["model"]["embed.weight"].view(-1)[3:5].fill_(float("nan")))
    crafted_ckpt("nan_bias", lambda c: c["model"]["layers.2.ffn.expert_bias"].fill_(float("inf")))
    crafted_ckpt("bad_optimizer", lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)))
    crafted_ckpt("bad_best", lambda c: c.update(best_val_loss="low"))
    crafted_ckpt("sparse", lambda c: c["model"].update({"norm.weight": c["model"]["norm.weight"].to_sparse()}))
    (bad / "syntax_config.py").write_text("batch_size = 4\nmax_iters = (\n")
    (bad / "name_config.py").write_text("batch_size = 4\nmax_iters = undefined_name\n")
    (bad / "nul_config.py").write_bytes(b"batch_size = 4\x00\n")
    (bad / "latin1_config.py").write_bytes(b"wandb_run_name = 'caf\xe9'\n")
    (bad / "nan_config.py").write_text('learning_rate = float("nan")\n')
    for name, meta in [("deep_meta", b"[" * 100_000), ("bom_meta", b"\xef\xbb\xbf" + (bad / "data" / "other" /
                       "meta.json").read_bytes().replace(b'"vocab_size"', b'"vocab_size_"'))]:
        shutil.copytree(bad / "data" / "other", bad / "data" / name)
        (bad / "data" / name / "meta.json").write_bytes(meta)
    shutil.copytree(bad / "data" / "other", bad / "data" / "bad_ranks")
    (bad / "data" / "bad_ranks" / "tokenizer.json").write_text('{"chars": 5}')

    def crafted_hf(name, edit_config=None, safetensors=None):
        shutil.copytree(root / "hf_good", bad / name)
        if edit_config:
            config = json.loads((bad / name / "config.json").read_text())
            edit_config(config)
            (bad / name / "config.json").write_text(json.dumps(config))
        if safetensors is not None:
            (bad / name / "model.safetensors").write_bytes(safetensors)
    from safetensors.torch import load_file, save
    weights = load_file(root / "hf_good" / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].to(torch.int32)
    crafted_hf("hf_huge", lambda c: c.update(num_hidden_layers=10_000_000, hidden_size=60000))
    crafted_hf("hf_int", safetensors=save(weights))
    crafted_hf("hf_corrupt", safetensors=b"garbage" * 10)
    crafted_hf("hf_type", lambda c: c.update(hidden_size="wide"))
    crafted_hf("hf_key", lambda c: c.pop("vocab_size"))
    crafted_hf("hf_list", lambda c: c.update(quantization_config=[1]))
    crafted_hf("hf_top0", lambda c: c.update(num_experts_per_tok=0))
    crafted_hf("hf_theta", lambda c: c.update(rope_theta="abc"))
    crafted_hf("hf_scaling", lambda c: c.update(rope_scaling="yarn"))
    weights = load_file(root / "hf_good" / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    crafted_hf("hf_nan", safetensors=save(weights))
    # a folder whose tokenizer_config.json names code of its own (auto_map): it must never run
    crafted_hf("hf_code")
    for name in ("meta.json", "tokenizer.json"):
        (bad / "hf_code" / name).unlink()
    (bad / "hf_code" / "tokenizer.json").write_text("{}")
    (bad / "hf_code" / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["custom.Tok", None]}, "tokenizer_class": "Tok"}))
    (bad / "hf_code" / "custom.py").write_text("open(__file__ + '.ran', 'w').write('ran')\n")
    return root


BAD_INVOCATIONS = [  # (script, arguments, words the one line must contain); {places} as in the test below
    # resume asks for another model or other data
    ("train", ["--init_from=resume", "--dataset={data}"], "but the checkpoint was trained on"),
    ("train", ["--init_from=resume", "--n_layer=8"], "--n_layer=8 but the checkpoint has n_layer=3"),
    ("train", ["--init_from=resume", "--n_embd=256"], "--n_embd=256 but the checkpoint has n_embd=32"),
    ("train", ["--init_from=resume", "--vocab_size=500"], "--vocab_size=500 but the checkpoint has vocab_size="),
    ("train", ["--init_from=resume", "{bad}/resume_config.py"], "--n_head=4 but the checkpoint has n_head=2"),
    ("train", ["--init_from=resume", "--out_dir={bad}/retokenized", "--dataset={data}"],
     "is not the one the checkpoint was trained with"),
    ("train", ["--init_from={hf_good}", "--n_layer=5"], "has n_layer=3"),
    # corrupt or crafted checkpoints
    ("train", ["--init_from=resume", "--out_dir={bad}/zero"], "not a readable checkpoint (EOFError)"),
    ("train", ["--init_from=resume", "--out_dir={bad}/truncated"], "not a readable checkpoint (RuntimeError"),
    ("train", ["--init_from=resume", "--out_dir={bad}/random"], "is not a readable checkpoint ("),
    ("train", ["--init_from=resume", "--out_dir={bad}/folder"], "not a readable checkpoint (Is a directory)"),
    ("train", ["--init_from=resume", "--out_dir={bad}/huge_args"], "does not match its own model_args: embed.weight"),
    ("train", ["--init_from=resume", "--out_dir={bad}/int_weights"], "embed.weight is (25, 32) torch.int64"),
    ("train", ["--init_from={bad}/hf_huge"], "n_layer (10000000) is over 10000"),
    ("train", ["--init_from={bad}/hf_int"], "stored as torch.int32, not as floating-point weights"),
    # types and sizes
    ("train", ["--lr_decay_iters=abc"], "--lr_decay_iters expects an int, got 'abc'"),
    ("train", ["--min_lr=abc"], "--min_lr expects a float, got 'abc'"),
    ("train", ["--vocab_size=abc"], "--vocab_size expects an int"),
    ("train", ["--norm_topk=maybe"], "--norm_topk expects true or false, got 'maybe'"),
    ("train", ["--compile=2"], "--compile expects true or false"),
    ("train", ["{bad}/types_config.py"], "batch_size in {bad}/types_config.py expects an int, got 'four'"),
    ("train", ["--n_embd=0"], "n_embd must be >= 1, got 0"),
    ("train", ["--n_head=-1"], "n_head must be >= 1, got -1"),
    ("train", ["--block_size=0"], "block_size must be >= 1"),
    ("train", ["--moe_inter_dim=0"], "moe_inter_dim must be >= 1"),
    ("train", ["--n_layer=10000000"], "n_layer (10000000) is over 10000"),
    ("train", ["--max_iters=-5"], "--max_iters=-5 must be >= 0"),
    ("train", ["--seed=-1"], "--seed=-1 must be in"),
    # places
    ("train", ["--out_dir={bad}/a_file"], "is a file, not a folder"),
    ("train", ["--out_dir={bad}/a_file", "--plot_only"], "is a file, not a folder"),
    ("train", ["--out_dir={bad}/no_log", "--plot_only"], "log.jsonl to plot: train first"),
    ("train", ["--dataset={bad}/data/empty_meta"], "meta.json is not one prepare.py wrote"),
    ("train", ["--dataset={bad}/data/deep_meta"], "meta.json is nested too deeply"),
    ("train", ["--dataset={bad}/data/bom_meta"], "meta.json is not one prepare.py wrote (its vocab_size is missing"),
    ("train", ["--dataset={bad}/data/bad_ranks"], "cannot read the tokenizer"),
    # every setting's domain, for config files and the command line alike; devices; memory
    ("train", ["--beta1=1e400"], "--beta1=inf must be a finite number"),
    ("train", ["--beta2=-0.5"], "--beta2=-0.5 must be in [0, 1)"),
    ("train", ["--learning_rate=-1"], "--learning_rate=-1.0 must be >= 0"),
    ("train", ["--weight_decay=-1"], "--weight_decay=-1.0 must be >= 0"),
    ("train", ["--bias_update_rate=1e400"], "--bias_update_rate=inf must be a finite number"),
    ("train", ["{bad}/nan_config.py"], "learning_rate = nan in {bad}/nan_config.py must be a finite number"),
    ("train", ["--device=gpu"], "--device='gpu' must be auto, cpu, or cuda / cuda:N of a GPU this machine has"),
    ("train", ["--device=cuda:99"], "--device='cuda:99' must be auto, cpu, or cuda / cuda:N"),
    ("train", ["--vocab_size=4000000000"], "this needs about"),
    ("train", ["--batch_size=1000000000000"], "lower --batch_size"),
    # config files that do not run: the file and the line
    ("train", ["{bad}/syntax_config.py"], "{bad}/syntax_config.py:2: SyntaxError"),
    ("train", ["{bad}/name_config.py"], "{bad}/name_config.py:2: NameError: name 'undefined_name' is not defined"),
    ("train", ["{bad}/nul_config.py"], "{bad}/nul_config.py"),
    ("train", ["{bad}/latin1_config.py"], "{bad}/latin1_config.py"),
    # resume from checkpoints whose optimizer state or fields would fail later, after writing
    ("train", ["--init_from=resume", "--out_dir={bad}/bad_optimizer"], "optimizer state does not fit its model (its "
     "exp_avg of a (25, 32) parameter is (3,))"),
    ("train", ["--init_from=resume", "--out_dir={bad}/bad_best"], "is not a checkpoint train.py wrote"),
    ("train", ["--init_from=resume", "--out_dir={bad}/sparse"], "a tensor is sparse or on the meta device"),
    ("train", ["--init_from=resume", "--out_dir={bad}/nan_bias"], "layers.2.ffn.expert_bias holds NaN or inf"),
    # sampling arguments
    ("sample", ["--temperature=-1"], "--temperature=-1.0 must be a number >= 0"),
    ("sample", ["--temperature=nan"], "--temperature expects a float, got 'nan'"),
    ("sample", ["--top_p=2"], "--top_p=2.0 must be in (0, 1]"),
    ("sample", ["--top_p=0"], "--top_p=0.0 must be in (0, 1]"),
    ("sample", ["--top_k=-1"], "--top_k=-1 must be >= 0"),
    ("sample", ["--top_k=None"], "--top_k expects an int, got None"),
    ("sample", ["--num_samples=0"], "--num_samples=0 must be >= 1"),
    ("sample", ["--max_new_tokens=0"], "--max_new_tokens=0 must be >= 1"),
    ("sample", ["--seed=-1"], "--seed=-1 must be in"),
    ("sample", ["--start=caf\u00e9"], "character '\u00e9' is not in this char vocabulary"),
    ("sample", ["--save_pretrained={bad}/a_file"], "is a file"),
    # sample.py on corrupt or crafted inputs
    ("sample", ["--out_dir={bad}/zero"], "not a readable checkpoint"),
    ("sample", ["--out_dir={bad}/folder"], "not a readable checkpoint (Is a directory)"),
    ("sample", ["--out_dir={bad}/huge_args"], "does not match its own model_args"),
    ("sample", ["--out_dir={bad}/retokenized"], "is not the one the checkpoint was trained with"),
    ("sample", ["--init_from={bad}/hf_huge"], "n_layer (10000000) is over 10000"),
    ("sample", ["--init_from={bad}/hf_int"], "not as floating-point weights"),
    ("sample", ["--init_from={bad}/hf_corrupt"], "SafetensorError"),
    ("sample", ["--init_from={bad}/hf_type"], "n_embd must be int, got 'wide'"),
    ("sample", ["--init_from={bad}/hf_key"], "config.json lacks ['vocab_size']"),
    ("sample", ["--init_from={bad}/hf_list"], "cannot read the checkpoint in"),
    ("sample", ["--init_from={bad}/hf_top0"], "invalid config: top_k must be >= 1, got 0"),
    ("sample", ["--init_from={bad}/hf_theta"], "rope_theta must be a number, got 'abc'"),
    ("sample", ["--init_from={bad}/hf_scaling"], "rope_scaling must be an object (or null), got 'yarn'"),
    ("sample", ["--init_from={bad}/hf_nan", "--temperature=0"], "hf_nan: norm.weight holds NaN or inf"),
    ("sample", ["--out_dir={bad}/nan_weights", "--temperature=0"], "embed.weight holds NaN or inf"),
    ("sample", ["--start=FILE:/dev/zero"], "/dev/zero is not a regular file"),
    ("sample", ["--num_samples=1000000000000"], "ask for fewer --num_samples"),
    ("sample", ["--out_dir="], "--out_dir is empty"),
    ("sample", ["--device=gpu"], "--device='gpu' must be cpu, or cuda"),
    # prepare.py
    ("prepare", ["--input={bad}/fifo.txt"], "is not a regular file"),
    ("prepare", ["--vocab_size=abc"], "argument --vocab_size: invalid int value: 'abc'"),
    ("prepare", ["--bogus"], "unrecognized arguments: --bogus"),
    ("prepare", ["--vocab-size=4096"], "unrecognized arguments: --vocab-size=4096; did you mean --vocab_size?"),
    ("prepare", ["--input={bad}/other.txt", "--data_root={bad}/a_file"], "is not a folder"),
    ("prepare", ["--corpus=claims", "--mix_weights=math:0.5,code:0.5"], "must give each of math, code, language one"),
    ("prepare", ["--corpus=claims", "--mix_weights=math:0.5,code:0.5,language:0.5"], "sum to 1 (they sum to 1.5)"),
    ("prepare", ["--train_tokens=1000"], "--train_tokens is a setting of --corpus=claims"),
]


def entry_point_fails(script, args):
    """Run train.py, sample.py or prepare.py in this process with args -> the one-line message it exits with."""
    with pytest.raises(SystemExit) as e:
        if script == "train":
            run_train_argv("--device=cpu", "--plot=False", "--dataset=tiny", *args)
        elif script == "sample":
            sample.main(["--device=cpu", *args])
        else:
            prepare.main(args)
    return e.value.code


@pytest.mark.parametrize("script, args, words", BAD_INVOCATIONS,
                         ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_INVOCATIONS])
def test_bad_invocation_is_one_line_and_touches_nothing(good_run, data_root, capsys, monkeypatch, script, args, words):
    monkeypatch.delenv("NANOSEEK_DEBUG", raising=False)
    places = dict(good=good_run / "good", bad=good_run / "bad", hf_good=good_run / "hf_good",
                  data=good_run / "bad" / "data" / "other")
    args = [a.format(**places) for a in args]
    if script == "train":
        args = [f"--data_root={data_root}", f"--out_dir={places['good']}", *args]
    elif script == "sample":
        args = [f"--out_dir={places['good']}", *args]
    kept = {name: (places["good"] / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    capsys.readouterr()
    msg = entry_point_fails(script, args)
    assert isinstance(msg, str) and words.format(**places) in msg, msg  # a message: exit status 1
    assert "\n" not in msg and "Traceback" not in msg
    assert capsys.readouterr().err == ""  # so the process's stderr is this one line
    assert all((places["good"] / name).read_bytes() == b for name, b in kept.items())


def test_bad_invocations_print_one_line_without_traceback(good_run, data_root):
    """The real processes: one line on stderr, a non-zero exit; NANOSEEK_DEBUG=1 shows the traceback."""
    env = {k: v for k, v in os.environ.items() if k != "NANOSEEK_DEBUG"}
    cases = [
        ([TRAIN, f"--data_root={data_root}", "--dataset=tiny", f"--out_dir={good_run / 'good'}", "--init_from=resume",
          "--n_layer=8"], "--n_layer=8 but the checkpoint has n_layer=3"),
        ([os.path.join(HERE, "sample.py"), f"--out_dir={good_run / 'bad' / 'truncated'}", "--device=cpu"],
         "not a readable checkpoint"),
        ([os.path.join(HERE, "prepare.py"), f"--input={good_run / 'bad' / 'fifo.txt'}"], "is not a regular file"),
    ]
    for argv, words in cases:
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=good_run)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    r = subprocess.run([sys.executable, *cases[2][0]], capture_output=True, text=True,
                       env={**env, "NANOSEEK_DEBUG": "1"}, cwd=good_run)
    assert r.returncode == 1 and "Traceback" in r.stderr and "is not a regular file" in r.stderr


def script_process(*argv, **kw):
    """A script as a real process without NANOSEEK_DEBUG, one thread, in a timeout: a hang fails the test."""
    env = {k: v for k, v in os.environ.items() if k != "NANOSEEK_DEBUG"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], capture_output=True, env=env, timeout=kw.pop("timeout", 120), **kw)


def test_a_second_run_in_a_locked_out_dir_touches_nothing(good_run, data_root, tmp_path):
    """Two real processes: one holds out_dir's lock (as a training run does for its whole life), the other, a
    resume into the same folder, names the holder in one line and exits; every file stays byte for byte."""
    out = tmp_path / "out"
    shutil.copytree(good_run / "good", out)
    before = {n: (out / n).read_bytes() for n in ("ckpt.pt", "log.jsonl")}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, errors; errors.hold_lock(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(120)", str(out)],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        r = script_process(TRAIN, f"--data_root={data_root}", "--dataset=tiny", f"--out_dir={out}",
                           "--init_from=resume", "--max_iters=4", "--device=cpu")
    finally:
        holder.kill()
        holder.wait()
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{out} is in use by another run (pid {holder.pid} since" in err, err
    assert {n: (out / n).read_bytes() for n in ("ckpt.pt", "log.jsonl")} == before
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "train.lock"]
    r = script_process(TRAIN, f"--data_root={data_root}", "--dataset=tiny", f"--out_dir={out}", *TRAIN_TINY,
                       "--init_from=resume", "--max_iters=4", "--eval_interval=2")  # the holder is gone: it runs
    assert r.returncode == 0, r.stderr.decode()


def test_no_code_from_a_model_folder_runs(good_run):
    """A tokenizer_config.json whose auto_map names custom.py: refused in one line, even with "y" on stdin (what
    transformers would ask), and custom.py never runs."""
    folder = good_run / "bad" / "hf_code"
    r = script_process(os.path.join(HERE, "sample.py"), f"--init_from={folder}", "--device=cpu", input=b"y\ny\n")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "cannot read the tokenizer in" in err, err
    assert "custom code" in err and not (folder / "custom.py.ran").exists()


def test_fifos_and_links_are_refused_not_waited_on(good_run, data_root, tmp_path):
    """A FIFO as the prompt file, meta.json, log.jsonl or a safetensors shard; log.jsonl as a link to someone
    else's file: one line each, within the timeout, and the link's target untouched."""
    os.mkfifo(tmp_path / "fifo")
    shutil.copytree(os.path.join(data_root, "tiny"), tmp_path / "data" / "tiny")
    (tmp_path / "data" / "tiny" / "meta.json").unlink()
    os.mkfifo(tmp_path / "data" / "tiny" / "meta.json")
    shutil.copytree(good_run / "hf_good", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "fifo_log").mkdir()
    os.mkfifo(tmp_path / "fifo_log" / "log.jsonl")
    (tmp_path / "link_log").mkdir()
    (tmp_path / "victim").write_text("someone else's\n")
    os.symlink(tmp_path / "victim", tmp_path / "link_log" / "log.jsonl")
    sample_py = os.path.join(HERE, "sample.py")
    train_tiny = [TRAIN, f"--data_root={data_root}", "--dataset=tiny", *TRAIN_TINY]
    for argv, words in [
        ([sample_py, f"--out_dir={good_run / 'good'}", f"--start=FILE:{tmp_path / 'fifo'}", "--device=cpu"],
         "fifo is not a regular file"),
        ([TRAIN, f"--data_root={tmp_path / 'data'}", "--dataset=tiny", f"--out_dir={tmp_path / 'o'}", "--device=cpu"],
         "meta.json is not a regular file"),
        ([sample_py, f"--init_from={tmp_path / 'hf'}", "--device=cpu"], "model.safetensors is not a regular file"),
        ([*train_tiny, f"--out_dir={tmp_path / 'fifo_log'}"], "log.jsonl is not a regular file"),
    ]:
        r = script_process(*argv, timeout=60)
        err = r.stderr.decode().strip().splitlines()
        assert r.returncode == 1 and len(err) == 1 and words in err[0], (argv, err)
    for args, words in [(["--plot_only"], "log.jsonl is not a regular file"), ([], "log.jsonl is not a regular file")]:
        msg = fails_with(data_root, tmp_path, f"--out_dir={tmp_path / 'fifo_log'}", *args)  # no hang now: in-process
        assert words in msg and "\n" not in msg, msg
    msg = fails_with(data_root, tmp_path, f"--out_dir={tmp_path / 'link_log'}")
    assert "it must be a plain file, not a link" in msg and "\n" not in msg, msg
    assert (tmp_path / "victim").read_text() == "someone else's\n"


def test_closed_pipe_and_full_stdout(good_run):
    """python sample.py | head -c1 ends quietly (no traceback, nothing about the pipe); > /dev/full ends in one
    line saying so."""
    argv = [sys.executable, os.path.join(HERE, "sample.py"), f"--out_dir={good_run / 'good'}", "--device=cpu",
            "--max_new_tokens=300", "--num_samples=2"]
    env = {k: v for k, v in os.environ.items() if k != "NANOSEEK_DEBUG"} | {"OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(1)
    p.stdout.close()  # what head does once it has its byte
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert "Traceback" not in err and "Broken" not in err and "Exception ignored" not in err, err
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            r = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, env=env, timeout=60)
        last = r.stderr.decode().strip().splitlines()[-1]
        assert r.returncode == 1 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
        assert last == "stopped: cannot write the output (No space left on device)", last


def test_bias_update_that_overflows_stops_the_run(data_root, tmp_path):
    """--bias_update_rate=1e300 is finite, but the float32 expert biases become inf after one step: one line, and
    the run stops before a checkpoint with them could be saved."""
    msg = fails_with(data_root, tmp_path, f"--out_dir={tmp_path / 'o'}", "--max_iters=4", "--eval_interval=2",
                     "--bias_update_rate=1e300")
    assert msg.startswith("the expert biases became NaN/inf at iter 0") and "no checkpoint was saved" in msg, msg
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(good_run, data_root, tmp_path):
    shutil.copytree(good_run / "good", tmp_path / "out")
    p = subprocess.Popen([sys.executable, "-u", TRAIN, f"--data_root={data_root}", "--dataset=tiny",
                          f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=1000000",
                          "--eval_interval=4", "--device=cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_DEBUG": "0"})
    for line in p.stdout:
        if line.startswith("eval 8"):  # a checkpoint of iter 4 or 8 is saved, or being saved
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    m = re.fullmatch(r"interrupted at iter \d+: \S+ckpt.pt keeps iter (\d+)\n", err)
    assert p.returncode != 0 and m, err
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt", "log.jsonl", "train.lock"]  # no temp file
    # the signal lands a few iters after "eval 8" was read: the checkpoint kept is whichever evaluation came last
    kept = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"]
    assert kept == int(m[1]) and kept >= 4 and kept % 4 == 0


def test_failed_save_keeps_the_previous_checkpoint(good_run, data_root, tmp_path, monkeypatch):
    """A disk that fills up half-way through torch.save: one line, ckpt.pt byte-identical, no temp file left."""
    shutil.copytree(good_run / "good", tmp_path / "out")
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    real_atomic_write = errors.atomic_write

    @contextlib.contextmanager
    def full_disk(path):
        with real_atomic_write(path) as f:
            written = [0]

            def write(b):
                if written[0] + len(b) > len(before) // 2:
                    f.write(bytes(b)[:len(before) // 2 - written[0]])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written[0] += len(b)
                return f.write(b)
            yield types.SimpleNamespace(write=write, flush=f.flush)
    monkeypatch.setattr(errors, "atomic_write", full_disk)  # train.py imports it from errors
    msg = fails_with(data_root, tmp_path, f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=4")
    assert re.fullmatch(r"cannot save \S+ckpt.pt at iter 4 \(No space left on device\): stopping; \S+ckpt.pt keeps "
                        r"iter 2", msg), msg
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt", "log.jsonl", "train.lock"]


def test_atomic_write_never_follows_a_link_and_leaves_nothing_on_failure(tmp_path):
    target, victim = tmp_path / "ckpt.pt", tmp_path / "victim"
    target.write_bytes(b"old")
    victim.write_bytes(b"someone else's")
    os.symlink(victim, tmp_path / f"ckpt.pt.tmp-{os.getpid()}")  # planted where this process's temp file goes
    with errors.atomic_write(str(target)) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and victim.read_bytes() == b"someone else's"
    with pytest.raises(OSError):
        with errors.atomic_write(str(target)) as f:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "victim"]
    umask = os.umask(0o022)
    try:
        with errors.atomic_write(str(tmp_path / "model.safetensors")) as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    assert oct(os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == "0o644"


def test_log_keeps_every_run_and_a_resume_drops_only_its_later_records(good_run, data_root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(good_run / "good", out)
    first = (out / "log.jsonl").read_bytes()
    run_train(data_root, out, "--max_iters=4", "--eval_interval=2", "--overwrite")  # a new run, same out_dir: appended
    second = (out / "log.jsonl").read_bytes()
    assert second.startswith(first) and len(second) > len(first)
    run_b = json.loads(second[len(first):].splitlines()[0])["run"]
    with open(out / "log.jsonl", "a") as f:  # what a crash after the iter-4 checkpoint leaves: iter 6, half a line
        f.write(json.dumps({"kind": "train", "iter": 6, "run": run_b, "loss": 0.0, "tokens": 0}) + '\n{"kind": "tr')
    run_train(data_root, out, "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    third = (out / "log.jsonl").read_bytes()
    assert third.startswith(second)  # everything up to the checkpoint kept as it was
    later = [json.loads(line) for line in third[len(second):].splitlines()]
    assert [r["kind"] for r in later][:2] == ["start", "eval"] and later[0]["iter"] == 4
    assert all(r["run"] == run_b for r in later) and all(r.get("loss") != 0.0 for r in later)
    if importlib.util.find_spec("matplotlib"):  # a partial last line does not stop the plots
        with open(out / "log.jsonl", "a") as f:
            f.write('{"kind": "ev')
        with pytest.raises(SystemExit) as e:
            run_train(data_root, out, "--plot_only")
        assert e.value.code is None and (out / "loss.png").exists()


def test_sample_finds_the_data_from_another_folder(good_run, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run used a relative --data_root: the checkpoint records the absolute folder
    out, _, _ = run_main(capsys, f"--out_dir={good_run / 'good'}", "--num_samples=1", "--max_new_tokens=4",
                         "--device=cpu", "--temperature=1e-30")  # a tiny temperature is greedy, not NaN
    assert len(out[0]) == 5
    out_zero, _, _ = run_main(capsys, f"--out_dir={good_run / 'good'}", "--num_samples=1", "--max_new_tokens=4",
                              "--device=cpu", "--temperature=0")
    assert out == out_zero


def test_save_pretrained_writes_normal_permissions(good_run, capsys, tmp_path):
    umask = os.umask(0o022)
    try:
        run_main(capsys, f"--out_dir={good_run / 'good'}", f"--save_pretrained={tmp_path / 'hf'}", "--device=cpu")
    finally:
        os.umask(umask)
    assert {os.stat(tmp_path / "hf" / n).st_mode & 0o777 for n in os.listdir(tmp_path / "hf")} == {0o644}


def test_fifo_in_an_input_folder_is_skipped(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(numbered_text(100))
    os.mkfifo(tmp_path / "in" / "pipe.txt")
    data = data_py.load_data(run(tmp_path, f"--input={tmp_path / 'in'}", "--tokenizer=char"))
    assert "skipping 1 name(s) that are not regular files: pipe.txt" in capsys.readouterr().err
    assert data.meta["documents"] == 1


def dataset_files(folder):
    return {n: (folder / n).read_bytes() for n in ("train.bin", "val.bin", "tokenizer.json")}


def test_prepare_swaps_a_dataset_in_whole(tmp_path, monkeypatch):
    """A kill at each rename of prepare.py's last step leaves the whole old dataset or the whole new one: as it
    stands (swap_in alone, no cleanup: a kill -9), after the next run's recover_swap, and through main()'s own
    cleanup when the rename raises instead."""
    (tmp_path / "old.txt").write_text(numbered_text(300, seed=1))
    (tmp_path / "new.txt").write_text(numbered_text(300, seed=2).upper())  # other characters: another tokenizer
    make = ["--tokenizer=char", "--name=ds"]
    prepare.main([f"--input={tmp_path / 'old.txt'}", f"--data_root={tmp_path / 'old'}", *make])
    prepare.main([f"--input={tmp_path / 'new.txt'}", f"--data_root={tmp_path / 'new'}", *make])
    old, new = dataset_files(tmp_path / "old" / "ds"), dataset_files(tmp_path / "new" / "ds")
    assert old != new
    real_rename = os.rename

    def rename_killed_at(k):
        calls = []

        def rename(a, b):
            calls.append((a, b))
            if len(calls) - 1 == k:
                raise KeyboardInterrupt
            return real_rename(a, b)
        return rename

    data = tmp_path / "data"
    for k in range(3):  # swap_in renames twice: killed before the first, before the second, not at all
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(tmp_path / "old", data)
        staging = prepare.make_staging(str(data / "ds"))
        os.rmdir(os.path.join(staging, "new"))
        shutil.copytree(tmp_path / "new" / "ds", os.path.join(staging, "new"))
        monkeypatch.setattr(os, "rename", rename_killed_at(k))
        try:
            prepare.swap_in(staging, str(data / "ds"))
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(os, "rename", real_rename)
        if (data / "ds").exists():
            assert dataset_files(data / "ds") in (old, new)
        else:
            assert dataset_files(pathlib.Path(staging) / "old") == old
        prepare.recover_swap(str(data / "ds"))  # what the next run does first
        assert dataset_files(data / "ds") == (new if k == 2 else old) and os.listdir(data) == ["ds"]
    for k in range(2):  # the same through main(): its cleanup puts the old dataset back
        shutil.rmtree(data)
        shutil.copytree(tmp_path / "old", data)
        monkeypatch.setattr(os, "rename", rename_killed_at(k))
        with pytest.raises(KeyboardInterrupt):
            prepare.main([f"--input={tmp_path / 'new.txt'}", f"--data_root={data}", *make])
        monkeypatch.setattr(os, "rename", real_rename)
        assert dataset_files(data / "ds") == old and os.listdir(data) == ["ds"]
    prepare.main([f"--input={tmp_path / 'new.txt'}", f"--data_root={data}", *make])
    assert dataset_files(data / "ds") == new and os.listdir(data) == ["ds"]


def test_prepare_deletes_only_what_it_made(tmp_path):
    """Hidden folders named like prepare.py's staging ones but not marked as its own, a file or a link where the
    dataset goes, and a user's file inside it: never moved aside or deleted; each refusal is one line."""
    (tmp_path / "in.txt").write_text(numbered_text(300, seed=1))
    data = tmp_path / "data"
    make = [f"--input={tmp_path / 'in.txt'}", "--tokenizer=char", f"--data_root={data}"]
    prepare.main([*make, "--name=.ds.old"])  # a dataset whose name looks like a backup
    (data / ".ds.prepare-12345678").mkdir()  # a user's folder that looks like a staging folder
    (data / ".ds.prepare-12345678" / "keep").write_text("mine")
    kept = dataset_files(data / ".ds.old")
    prepare.main([*make, "--name=ds", "--force"])
    prepare.main([*make, "--name=ds", "--force"])
    assert dataset_files(data / ".ds.old") == kept and (data / ".ds.prepare-12345678" / "keep").read_text() == "mine"
    (data / "ds" / "notes.txt").write_text("mine")
    (data / "afile").write_text("mine")
    os.symlink(data / ".ds.old", data / "alink")
    before = sorted(os.listdir(data))
    for name, words in [("ds", "holds files prepare.py did not write (notes.txt)"), ("afile", "is a file"),
                        ("alink", "is a symlink")]:
        with pytest.raises(SystemExit) as e:
            prepare.main([*make, f"--name={name}", "--force"])
        assert words in str(e.value.code) and "\n" not in str(e.value.code), e.value.code
    assert sorted(os.listdir(data)) == before and (data / "afile").read_text() == "mine"
    assert (data / "ds" / "notes.txt").read_text() == "mine"


# -----------------------------------------------------------------------------
# the DeepSeekMoE claims (README): the mix corpus, the architecture ablation's configs, the specialization metric


def tiny_mix_domains(n_lines=400):
    """Stand-ins for corpus.MIX_DOMAINS: every line starts with its domain's name, so any text can be traced back."""
    def domain(name, seed):
        def docs():  # two documents of different lines
            texts = ["".join(f"{name} {line}\n" for line in numbered_text(n_lines, seed + k).splitlines()).encode()
                     for k in range(2)]
            return [(f"{name}-{k}", len(t), functools.partial(io.BytesIO, t)) for k, t in enumerate(texts)], \
                f"{name}: stand-in", name
        return docs
    return {name: domain(name, 10 * i) for i, name in enumerate(("verse", "code", "prose"))}


def test_mix_corpus_is_deterministic_and_val_domains_are_recovered(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MIX_DOMAINS", tiny_mix_domains())
    outs = [prepare.main([f"--data_root={tmp_path / d}", "--corpus=mix", "--vocab_size=300", "--force"])
            for d in ("a", "b")]
    for f in ("train.bin", "val.bin", "tokenizer.tiktoken"):
        assert open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read(), f
    data = data_py.load_data(outs[0])
    names, ids = data_py.val_domains(data.meta)
    assert names == ["verse", "code", "prose"] and len(ids) == len(data.val)
    val = data.val.tolist()
    for k, name in enumerate(names):
        mine = [t for t, d in zip(val, ids) if d == k]
        text = data.decode(mine).replace(data_py.EOT, "")
        lines = [line for line in text.splitlines() if line]
        assert lines and all(line.startswith(name + " ") for line in lines), name  # every val token of the domain
        share = data.meta["domains"][k]["bytes"]
        assert 0.05 < share["val"] / (share["train"] + share["val"]) < 0.2  # each domain split on its own
    assert sum(d["tokens"]["train"] for d in data.meta["domains"]) == data.meta["tokens"]["train"]
    assert data_py.val_domains({"tokens": {"val": 5}}) is None  # one-domain data


def tiny_claims_domains():
    """Stand-ins for corpus.CLAIMS_DOMAINS: the real math generator (it makes as little as asked for), and code and
    language documents whose every line starts with the domain's name, so any text can be traced back."""
    def finite(name, seed, n_lines):
        def make(_seed):
            texts = ["".join(f"{name} {line}\n" for line in numbered_text(n_lines, seed + k).splitlines()).encode()
                     for k in range(3)]
            return corpus.Domain(f"{name}: stand-in", name, {"stand_in": True},
                                 docs=[(f"{name}-{k}", len(t), functools.partial(io.BytesIO, t)) for k, t in enumerate(texts)])
        return make
    return {"math": corpus.math_domain, "code": finite("code", 100, 800), "language": finite("language", 200, 100)}


def test_claims_corpus_is_deterministic_keeps_its_weights_and_val_domains(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CLAIMS_DOMAINS", tiny_claims_domains())
    make = ["--corpus=claims", "--vocab_size=400", "--train_tokens=60000", "--val_bytes=3000",
            "--mix_weights=math:0.5,code:0.1,language:0.4", "--force"]
    outs = [prepare.main([f"--data_root={tmp_path / d}", *make]) for d in ("a", "b")]
    for f in ("train.bin", "val.bin", "tokenizer.tiktoken"):
        assert open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read(), f
    data = data_py.load_data(outs[0])
    meta = data.meta
    names, ids = data_py.val_domains(meta)
    assert names == ["math", "code", "language"] and len(ids) == len(data.val)
    # the weights, exactly: each domain's share of train.bin, its tokens one after another, each ending a document
    train, start = data.train.tolist(), 0
    for d, want in zip(meta["domains"], (30000, 6000, 24000)):
        assert d["tokens"]["train"] == want and train[start + want - 1] == data.eot_token, d["name"]
        text = data.decode(train[start:start + want])
        start += want
        if d["name"] == "math":
            assert text.startswith("Problem: ") and d["passes"] == 1.0
        else:
            lines = [line for line in text.replace(data_py.EOT, "\n").splitlines() if line]
            assert all(line.startswith(d["name"] + " ") for line in lines[:-1]), d["name"]  # the last may be cut
    language = meta["domains"][2]
    assert language["passes"] > 1.5 and meta["domains"][1]["passes"] < 1  # repeated to fill; cut to fit
    # every val token's domain, each domain's val about --val_bytes, and never text that train holds
    train_text = data.decode(train)
    val = data.val.tolist()
    for k, name in enumerate(names):
        text = data.decode([t for t, d in zip(val, ids) if d == k])
        assert 2500 < meta["domains"][k]["bytes"]["val"] < 12000, name
        if name == "math":
            problems = text.replace(data_py.EOT, "\n\n").strip().split("\n\n")
            assert all(p.startswith("Problem: ") and "\nAnswer: " in p for p in problems)
        else:
            lines = [line for line in text.replace(data_py.EOT, "\n").splitlines() if line.strip()]
            assert lines and all(line.startswith(name + " ") for line in lines), name
            assert not any(line in train_text for line in lines if len(line) > 20), name  # numbered: all distinct
    assert meta["packages"]["rustbpe"] and meta["config"]["seed"] == 0


def exact(expr):
    """An arithmetic expression of the math problems' steps ("3/4 + (-2)^2 * 5") -> its exact value, by Python's
    own parser with every integer made a Fraction; None if it is not one."""
    if not re.fullmatch(r"[\d\s+\-*/^().]+", expr) or not re.search(r"\d", expr):
        return None
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m[0]})", expr.replace("^", "**")), {"Fraction": Fraction})


def poly_at(text, x):
    """"3x^2 - 2x + 5" or "(2x + 3)(x - 4)" at x, exactly."""
    expr = re.sub(r"(\d|\))x", r"\1*x", text.replace(")(", ")*(")).replace("^", "**")
    expr = re.sub(r"\d+", lambda m: f"Fraction({m[0]})", expr)
    return eval(expr, {"Fraction": Fraction, "x": Fraction(x)})


def test_math_problems_steps_and_answers_are_right():
    """Every kind, 150 problems each: each step that is plain arithmetic holds, and the answer is recomputed from
    the question alone (Fraction arithmetic, math.gcd, the polynomial evaluated at several points, sympy's derivative)."""
    import sympy
    rng = random.Random(0)
    for kind in math_problems.MATH_KINDS:
        for _ in range(150):
            question, steps, answer = kind(rng)
            for line in steps:
                values = [v for v in map(exact, line.split(": ")[0].split(" = ")) if v is not None]
                assert len(set(values)) <= 1, (kind.__name__, question, line)
            nums = [int(n) for n in re.findall(r"-?\d+", question)]
            if kind.__name__ in ("addition", "subtraction", "multiplication", "fractions", "order_of_operations"):
                expr = question.split(" ", 1)[1].rstrip(".").replace(" divided by ", " / (") + \
                    (")" if "divided" in question else "")
                assert exact(expr) == exact(answer), (question, answer)
            elif kind.__name__ == "division":
                q, _, r = answer.partition(" remainder ")
                assert divmod(nums[0], nums[1]) == (int(q), int(r or 0)), (question, answer)
            elif kind.__name__ == "percent":
                assert Fraction(nums[0], 100) * nums[1] == exact(answer), (question, answer)
            elif kind.__name__ == "gcd_lcm":
                g = math.gcd(nums[0], nums[1])
                assert int(answer) == (g if "greatest" in question else nums[0] * nums[1] // g), (question, answer)
            elif kind.__name__ == "prime_factors":
                bases = [int(b) for b in re.findall(r"(\d+)(?:\^\d+)?", answer)]
                assert exact(answer) == nums[0] and bases == sorted(set(bases)) and all(map(sympy.isprime, bases)), \
                    (question, answer)
            elif kind.__name__ == "linear_equation":
                left, right = question[len("Solve "):-len(" for x.")].split(" = ")
                x = exact(answer[len("x = "):])
                assert poly_at(left, x) == poly_at(right, x), (question, answer)
            elif kind.__name__ == "expand":
                product = question[len("Expand "):-1].replace(")^2", ")*(" + question[len("Expand ("):-4] + ")")
                assert all(poly_at(product, x) == poly_at(answer, x) for x in (-2, 0, 1, 3, 7)), (question, answer)
            elif kind.__name__ == "evaluate":
                poly, x = question[len("Evaluate "):-1].split(" at x = ")
                assert poly_at(poly, int(x)) == exact(answer), (question, answer)
            elif kind.__name__ == "derivative":
                f = question[len("Differentiate f(x) = "):-1]
                want = sympy.diff(sympy.sympify(re.sub(r"(\d)x", r"\1*x", f).replace("^", "**")), sympy.Symbol("x"))
                assert all(want.subs("x", x) == poly_at(answer[len("f'(x) = "):], x) for x in (-2, 0, 1, 3, 5)), \
                    (question, answer)
            else:
                raise AssertionError(f"no check for {kind.__name__}")
    doc = math_problems.math_document(0, "train", 3)
    assert doc == math_problems.math_document(0, "train", 3) != math_problems.math_document(0, "val", 3)
    assert doc.decode().count("Problem: ") == math_problems.PROBLEMS_PER_DOCUMENT


def test_train_reports_val_loss_per_domain(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MIX_DOMAINS", tiny_mix_domains())
    prepare.main([f"--data_root={tmp_path}", "--corpus=mix", "--tokenizer=char"])
    g = run_train_argv("--dataset=mix_char", f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'out'}",
                       *TRAIN_TINY, "--max_iters=2", "--eval_interval=2", "--eval_iters=4")
    rec = read_log(tmp_path / "out", "eval")[-1]
    assert list(rec["val_loss_domain"]) == ["verse", "code", "prose"]
    assert min(rec["val_loss_domain"].values()) <= rec["val_loss"] <= max(rec["val_loss_domain"].values())
    assert g["domains"] is not None


def test_mutual_information_of_routing():
    rng = np.random.default_rng(0)
    independent = np.outer([300, 200, 100], rng.integers(1, 50, size=16))  # the expert ignores the domain
    assert abs(mutual_information(independent)) < 1e-12
    own = np.kron(np.eye(3), np.ones((1, 4))) * 100  # each domain to its own 4 experts, domains equally common
    assert abs(mutual_information(own) - math.log2(3)) < 1e-12
    skewed = np.kron(np.diag([400, 100, 100]), np.ones((1, 4)))  # = H(domain) when domains are not equal
    p = np.array([4, 1, 1]) / 6
    assert abs(mutual_information(skewed) + (p * np.log2(p)).sum()) < 1e-12
    # each of a token's top-k choices is one (domain, expert) observation
    counts = routing_counts(np.array([[0, 1], [1, 2], [3, 0]]), np.array([0, 0, 1]), 2, 4)
    assert counts.tolist() == [[1, 2, 1, 0], [1, 0, 0, 1]]


STUDY = os.path.join(HERE, "study.py")
ARMS = ["dense", "coarse", "coarse_shared", "fine", "fine_shared1", "deepseekmoe"]


@pytest.mark.parametrize("scale", ["gpu", "cpu"])
def test_arch_variants_same_active_flops_and_expert_params(scale, tmp_path):
    """study.py --arch_dry_run counts every arm of the architecture study with Model's own count."""
    path = tmp_path / "variants.json"
    r = subprocess.run([sys.executable, STUDY, "--sections=arch", f"--arch_scale={scale}",
                        "--arch_dry_run", f"--json_path={path}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "18 runs: 6 arms x seeds 1337, 1338, 1339" in r.stdout  # every arm under three seeds
    counts = json.loads(path.read_text())["arch_variants"]
    assert list(counts) == ARMS
    flops = {n: c["flops"] for n, c in counts.items()}
    # the routers differ (64 experts score each token where 16 do): well under 1% of the GPU config's FLOPs, a
    # little more at the CPU scale, where the FFNs are narrow; the rest of the work is equal by construction
    assert max(flops.values()) / min(flops.values()) < (1.01 if scale == "gpu" else 1.02), flops
    assert len({c["flops"] - c["router_flops"] for c in counts.values()}) == 1, counts
    assert counts["dense"]["expert_params"] == [] and counts["dense"]["params"] == counts["dense"]["active"]
    experts = {e for n, c in counts.items() if n != "dense" for e in c["expert_params"]}
    assert len(experts) == 1, counts  # every MoE layer of every arm holds the same expert parameters
    assert all(len(c["expert_params"]) == 1 for n, c in counts.items() if n != "dense")


def test_eval_records_carry_the_training_seconds(data_root, tmp_path, capsys):
    """train_seconds: the time of the steps so far, evaluations and saves excluded: at each evaluation it is the sum
    of the log lines' step times since the start (log_interval divides eval_interval); --save_last_only saves once.
    The start record splits the start-up's seconds into parts and names the machine."""
    run_train(data_root, tmp_path, "--max_iters=12", "--eval_interval=4", "--log_interval=2", "--save_last_only")
    assert capsys.readouterr().out.count("saved ") == 1
    ev, tr = read_log(tmp_path, "eval"), read_log(tmp_path, "train")
    assert [r["iter"] for r in ev] == [0, 4, 8, 12] and ev[0]["train_seconds"] < 0.05
    for r in ev[1:]:
        steps = sum(t["ms"] * 2 / 1000 for t in tr if t["iter"] <= r["iter"])
        assert steps <= r["train_seconds"] <= steps + 0.05 + 0.1 * steps, (r, steps)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_seconds"] == ev[-1]["train_seconds"]
    start, = read_log(tmp_path, "start")  # the start-up's parts add up to it; the machine is named
    assert abs(sum(start["startup_parts"].values()) - start["startup_seconds"]) < 0.01, start
    assert min(start["startup_parts"].values()) >= 0 and start["device"].startswith("no GPU (")


def fake_run(out_dir, val_losses, domains, seconds, ms=10.0, maxvio=0.5, device=None):
    """A log.jsonl as train.py writes it, with the given val loss at each evaluation (every 10 iters)."""
    os.makedirs(out_dir)
    recs = [dict(kind="start", iter=0, run="r", startup_seconds=1.0, **({"device": device} if device else {}))]
    for k, (v, t) in enumerate(zip(val_losses, seconds)):
        it = 10 * k
        if k:
            recs += [dict(kind="train", iter=it - 5, ms=ms * (3 if k == 1 else 1), tok_s=1000.0, loss=v, run="r"),
                     dict(kind="train", iter=it, ms=ms, tok_s=1000.0, loss=v, run="r")]
        recs.append(dict(kind="eval", iter=it, tokens=it * 100, train_seconds=t, eval_seconds=0.5, val_loss=v,
                         maxvio_global=maxvio,
                         val_loss_domain={d: v + j for j, d in enumerate(domains)}, run="r"))
    (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_arch_study_mean_spread_and_claims_from_logs(tmp_path, monkeypatch):
    """study.py --runs=read on fake logs of every arm and seed: the mean and spread over seeds overall and per
    domain, the paired differences per seed at equal tokens and at equal seconds, and both pictures."""
    monkeypatch.setattr(corpus, "MIX_DOMAINS", tiny_mix_domains())
    data = prepare.main([f"--data_root={tmp_path / 'data'}", "--corpus=mix", "--tokenizer=char"])
    seeds, domains = (1, 2, 3), ["verse", "code", "prose"]
    final = {arm: {s: 5.0 - 0.01 * a + 0.006 * s * (a % 2) for s in seeds} for a, arm in enumerate(ARMS)}
    for arm in ARMS:
        for s in seeds:  # dense runs twice as fast: at equal seconds it is read where the MoE run ends
            secs = [0, 1, 2] if arm == "dense" else [0, 2, 4]
            fake_run(tmp_path / "arch" / f"{arm}-s{s}", [8.0, final[arm][s] + 1, final[arm][s]], domains, secs,
                     device="NVIDIA H200")  # where they ran, not this machine, names the tables and pictures
            (tmp_path / "arch" / f"{arm}-s{s}" / "study_run.json").write_text(json.dumps(dict(wall_seconds=10.0)))
    path = tmp_path / "study.json"
    r = subprocess.run([sys.executable, STUDY, "--sections=arch", "--arch_scale=cpu", "--runs=read",
                        f"--dataset={data}", f"--arch_dir={tmp_path / 'arch'}", "--arch_seeds=(1, 2, 3)",
                        f"--json_path={path}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(path.read_text())["arch"]
    for arm in ARMS:
        xs = np.array([final[arm][s] for s in seeds])
        st = out["rows"][arm]["val_loss"]
        assert abs(st["mean"] - xs.mean()) < 1e-12 and abs(st["std"] - xs.std(ddof=1)) < 1e-12
        assert (st["min"], st["max"]) == (xs.min(), xs.max())
        assert abs(out["rows"][arm]["domains"]["prose"]["mean"] - xs.mean() - 2) < 1e-12
        assert abs(out["rows"][arm]["warmup_seconds"]["mean"] - 0.1) < 1e-12  # the first window's extra 2 x 10 ms x 5
    claims = {(c["arm"], c["against"], c["axis"]): c for c in out["claims"]}
    tok = claims["deepseekmoe", "dense", "tokens"]
    assert np.allclose(tok["diffs"], [final["deepseekmoe"][s] - final["dense"][s] for s in seeds])
    assert tok["verdict"] == "lower under all 3 seeds"
    # equal seconds (the warm-up taken out): dense ends at 2 - 0.1 s, where the MoE run is at its middle evaluation
    for s, d in zip(seeds, claims["deepseekmoe", "dense", "seconds"]["diffs"]):
        assert abs(d - (final["deepseekmoe"][s] + 1 - final["dense"][s])) < 1e-9, d
    assert claims["deepseekmoe", "fine_shared1", "tokens"]["verdict"] == \
        "signs differ across seeds (1 of 3 lower): not decided"
    # dense ends at 5.0 after 2,000 tokens; DeepSeekMoE falls from final + 1 at 1,000 tokens to final at 2,000, so
    # it reaches 5.0 at 1,000 + 1,000 x (final + 1 - 5.0): the step ratio of a tie at equal seconds is 2,000 over it
    reach = [1000 + 1000 * (final["deepseekmoe"][s] + 1 - 5.0) for s in seeds]
    assert np.allclose(out["deepseekmoe_tokens_to_dense_loss"], reach)
    assert np.allclose(out["tie_step_ratio"], [2000 / r for r in reach])
    assert "(NVIDIA H200), seeds 1, 2, 3" in r.stdout, r.stdout
    # the section's seconds by part, summed over its runs: 18 x 10 s of wall, 1 s of start-up each, training
    # seconds 2 (dense) or 4, 0.1 s of warm-up each (0.6 s in the first seed's six), three evaluations of 0.5 s
    assert ("the 18 runs' 180 s: start-up 18 s, compile warm-up 2 s (1 s of it in the first run of each arm), "
            "training steps 64 s, evaluations 27 s, checkpoint saves and exits 69 s") in r.stdout, r.stdout
    assert (tmp_path / "arch" / "arch_tokens.png").exists() and (tmp_path / "arch" / "arch_seconds.png").exists()


def test_tradeoff_reads_the_arch_bias_run_and_stop_after_stops_before_a_run(tmp_path, monkeypatch):
    """The tradeoff's bias run is the arch section's DeepSeekMoE run (the same train.py arguments): a finished one is
    read, not trained again; --stop_after then stops the study before the first run it would have to train, in one
    line that says how to go on."""
    monkeypatch.setattr(corpus, "MIX_DOMAINS", tiny_mix_domains(40))
    data = prepare.main([f"--data_root={tmp_path / 'data'}", "--corpus=mix", "--tokenizer=char"])
    arch_run = tmp_path / "arch" / "deepseekmoe-s1"
    fake_run(arch_run, [8.0, 6.0, 5.0], ["verse", "code", "prose"], [0, 2, 4])
    # the arguments the arch section gives its DeepSeekMoE run at the CPU scale (2 shared + top-6 of 62 x 64)
    args = ["--balance=bias", "--seed=1", f"--dataset={data}", "--n_experts=62", "--top_k=6", "--n_shared=2",
            "--moe_inter_dim=64"]
    (arch_run / "study_run.json").write_text(json.dumps(dict(config="config/study_cpu.py", args=args)))
    r = subprocess.run([sys.executable, STUDY, "--sections=tradeoff", "--arch_scale=cpu", "--runs=reuse",
                        f"--dataset={data}", f"--arch_dir={tmp_path / 'arch'}", "--arch_seeds=(1, 2, 3)",
                        "--stop_after=1e-9", f"--json_path={tmp_path / 's.json'}"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert f"bias-s1: the arch section's run of the same arguments, read from {arch_run}" in r.stdout, r.stdout
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "stopped before [1/6] aux0.0001-s1" in r.stderr and "--runs=reuse goes on" in r.stderr, r.stderr
    assert not (tmp_path / "arch" / "tradeoff").exists()  # nothing trained
    # --runs=read finds the bias run where reuse found it, and names the first run it lacks
    r = subprocess.run([sys.executable, STUDY, "--sections=tradeoff", "--arch_scale=cpu", "--runs=read",
                        f"--dataset={data}", f"--arch_dir={tmp_path / 'arch'}", "--arch_seeds=(1, 2, 3)",
                        f"--json_path={tmp_path / 's.json'}"], capture_output=True, text=True, cwd=tmp_path)
    assert f"bias-s1: the arch section's run of the same arguments, read from {arch_run}" in r.stdout, r.stdout
    assert r.returncode != 0 and "aux0.0001-s1" in r.stderr and "train it first" in r.stderr, r.stderr


def test_study_overlaps_start_ups_but_never_trains_two_runs_at_once(data_root, tmp_path):
    """--overlap=on: each run's process starts while the run before it trains and waits after its imports until
    that run has ended. The four balance runs all finish; every run after the first was started during the run
    before it and began after it ended; each run's own wall seconds leave its wait out."""
    args = " ".join(["--dataset=tiny", f"--data_root={data_root}", *TRAIN_TINY, "--max_iters=4", "--eval_interval=4"])
    (tmp_path / "tmp").mkdir()  # the gates' folder goes here, and must be gone at the end
    r = subprocess.run([sys.executable, STUDY, "--sections=balance", "--overlap=on", f"--balance_dir={tmp_path / 'b'}",
                        f"--balance_args={args}", f"--json_path={tmp_path / 's.json'}"], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert r.returncode == 0, r.stderr
    names = ["bias", "aux0.01", "aux0.001", "none"]
    runs = [json.loads((tmp_path / "b" / n / "study_run.json").read_text()) for n in names]
    assert runs[0]["launched"] <= runs[0]["opened"] < runs[0]["ended"]
    for before, run in zip(runs, runs[1:]):
        assert run["launched"] < before["ended"] <= run["opened"] < run["ended"], (before, run)
    for name, run in zip(names, runs):
        start = read_log(tmp_path / "b" / name, "start")[-1]
        assert start["waited_seconds"] >= 0
        assert abs(run["wall_seconds"] - (run["ended"] - run["launched"] - start["waited_seconds"])) < 1e-6
    assert "the 4 runs trained in this call took" in r.stdout, r.stdout
    assert not any((tmp_path / "tmp").iterdir())


def test_tradeoff_compares_the_bias_with_the_aux_curve_at_its_own_maxvio(tmp_path, monkeypatch):
    """--runs=read on fake trade-off logs: the best alpha is the lowest val loss of the first seed, and the bias is
    judged against the aux-loss curve read at the bias's own MaxVio_global (linear in log MaxVio between alphas)."""
    monkeypatch.setattr(corpus, "MIX_DOMAINS", tiny_mix_domains(40))
    data = prepare.main([f"--data_root={tmp_path / 'data'}", "--corpus=mix", "--tokenizer=char"])
    out = tmp_path / "arch" / "tradeoff"
    curve = {"aux0.0001": (3.0, 2.32), "aux0.001": (1.5, 2.33), "aux0.003": (0.9, 2.335), "aux0.01": (0.7, 2.34),
             "aux0.1": (0.4, 2.345)}
    runs = {f"{k}-s1": v for k, v in curve.items()}
    runs.update({"bias-s1": (0.8, 2.30), "none-s1": (4.0, 2.35), "bias-s2": (0.75, 2.31), "aux0.0001-s2": (3.1, 2.33)})
    for name, (mv, v) in runs.items():
        fake_run(out / name, [8.0, v + 1, v], ["verse", "code", "prose"], [0, 2, 4], maxvio=mv)
    r = subprocess.run([sys.executable, STUDY, "--sections=tradeoff", "--arch_scale=cpu", "--runs=read",
                        f"--dataset={data}", f"--arch_dir={tmp_path / 'arch'}", "--arch_seeds=(1, 2, 3)",
                        f"--json_path={tmp_path / 's.json'}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "s.json").read_text())["tradeoff"]
    assert res["best_alpha"] == 0.0001 and np.allclose(res["bias_minus_best_alpha"], [2.30 - 2.32, 2.31 - 2.33])
    w = (math.log(0.8) - math.log(0.7)) / (math.log(0.9) - math.log(0.7))  # 0.8 lies between alpha 0.01 and 0.003
    assert abs(res["bias_minus_aux_curve"] - (2.30 - (2.34 + w * (2.335 - 2.34)))) < 1e-9, res
    assert (out / "tradeoff.png").exists()


@pytest.mark.parametrize("args, words", [
    (["--sections=arch", "--arch_seeds=(1,)"], "3 or more distinct seeds"),
    (["--sections=arch", "--arch_seeds=(1, 1, 2)"], "3 or more distinct seeds"),
    (["--sections=tradeoff", "--tradeoff_alphas=(-0.1, 0.001, 0.01, 0.1)"], "in (0, 1]"),
    (["--sections=arch", "--dataset=nosuch"], "python prepare.py --corpus=nosuch"),
    (["--sections=specialize", "--dataset=DATA", "--arch_dir=EMPTY"], "run --sections=arch first"),
    (["--sections=arch", "--runs=maybe"], "one of train, reuse, read"),
])
def test_bad_study_arguments_are_one_line(args, words, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MIX_DOMAINS", tiny_mix_domains(40))
    data = prepare.main([f"--data_root={tmp_path / 'data'}", "--corpus=mix", "--tokenizer=char"]) \
        if "--dataset=DATA" in args else ""
    args = [a.replace("DATA", data).replace("EMPTY", str(tmp_path / "empty")) for a in args]
    r = subprocess.run([sys.executable, STUDY, *args, f"--json_path={tmp_path / 's.json'}"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "out").exists()