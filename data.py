"""
The run-time side of the data: open what prepare.py wrote in data/NAME/ (memmapped token bins, meta.json) and its
tokenizer (a byte-level BPE run through tiktoken, or a character vocabulary). train.py and sample.py use this;
prepare.py uses it too, to write the same tokenizer formats it reads.

    from data import load_data, load_tokenizer
    data = load_data("shakespeare")     # data.train, data.val (np.memmap), data.encode, data.decode, data.eot_token
    names, ids = val_domains(data.meta)  # data/mix: the domain of every val token (None for one-domain data)
"""
import base64
import difflib
import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from errors import MiB, atomic_write, error_text, fail, parse_json, read_file, read_json

EOT = "<|endoftext|>"  # the one special token, appended after every document


def data_dir(dataset, data_root="data"):
    """A dataset name ('shakespeare' -> data_root/shakespeare) or a path to such a folder (anything with a slash)."""
    return dataset if os.sep in dataset or "/" in dataset else os.path.join(data_root, dataset)


@dataclass
class Data:
    dir: str  # data_root/NAME
    meta: dict  # meta.json
    vocab_size: int  # embedding rows needed (includes the end-of-text token)
    train: np.ndarray  # np.memmap of token ids, 1-D, meta["dtype"]
    val: np.ndarray
    encode: Callable[[str], list]  # str -> list[int]
    decode: Callable[[list], str]  # list[int] -> str
    eot_token: int  # id of <|endoftext|>, which ends every document in the bins


# -----------------------------------------------------------------------------
# tokenizers


def tiktoken_encoding(ranks, pattern, eot, name="nanoseek"):
    try:
        import tiktoken
    except ImportError:
        fail("the tokenizer needs tiktoken: pip install tiktoken")
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: eot})


def char_encoder(chars):
    """chars (sorted) -> encode(text) -> np.uint32 ids, vectorized: the id of a character is its rank in chars."""
    codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)

    def encode(text):
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(codes, points).astype(np.uint32)
        known = ids < len(codes)
        known[known] = codes[ids[known]] == points[known]
        if not known.all():
            bad = text[int(np.argmin(known))]
            raise ValueError(f"character {bad!r} is not in this char vocabulary ({len(chars)} characters)")
        return ids
    return encode


def save_tiktoken_file(ranks, path):
    """tiktoken's own format, one "base64(token) rank" per line (tiktoken.load.load_tiktoken_bpe reads it)."""
    with atomic_write(path) as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def load_tiktoken_file(path):
    """The ranks save_tiktoken_file wrote; ValueError unless they are 0..N-1, each once (tiktoken's Rust core
    panics on duplicate, negative or huge ranks)."""
    ranks = {}
    for line in read_file(path, 256 * MiB, "tokenizer file").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"its ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


META_LIMIT = 16 * MiB  # meta.json is a few hundred bytes; a domain list or a fingerprint never comes near this


def read_meta(data_dir):
    """data_dir/meta.json as a dict; None when there is none, or it is not a plain file of JSON (prepare.py then
    rebuilds it; read_valid_meta says which)."""
    try:
        return read_json(os.path.join(data_dir, "meta.json"), META_LIMIT, "meta.json")
    except (OSError, ValueError):
        return None


META_CHECKS = {  # what train.py and sample.py rely on in a meta.json, checked before any of it is used
    "vocab_size": lambda m: type(m["vocab_size"]) is int and m["vocab_size"] > 0,
    "dtype": lambda m: m["dtype"] in ("uint16", "uint32"),
    "eot_token": lambda m: type(m["eot_token"]) is int and 0 <= m["eot_token"] < m["vocab_size"],
    "tokenizer.kind": lambda m: m["tokenizer"]["kind"] in ("bpe", "gpt2", "char"),
    "tokenizer.file": lambda m: m["tokenizer"]["file"] in ("tokenizer.json", "tokenizer.tiktoken"),
    "tokenizer.pattern": lambda m: m["tokenizer"]["kind"] == "char" or isinstance(m["tokenizer"]["pattern"], str),
    "tokens": lambda m: all(type(m["tokens"][s]) is int and m["tokens"][s] >= 0 for s in ("train", "val")),
}


def meta_problem(meta):
    """None when meta is a meta.json as prepare.py writes it, else the first field that is missing or wrong."""
    for field, ok in META_CHECKS.items():
        try:
            if ok(meta):
                continue
        except (KeyError, TypeError, IndexError):
            pass
        return f"its {field} is missing or wrong"
    return None


def read_valid_meta(data_dir):
    """meta.json of data_dir, checked: ends the program in one line when it is missing or not prepare.py's."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        fail(f"no data in {data_dir}: run python prepare.py first")
    try:
        meta = read_json(path, META_LIMIT, "meta.json")
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} ({error_text(e) if isinstance(e, OSError) else e}): run python prepare.py --force")
    problem = meta_problem(meta) if isinstance(meta, dict) else "it is not a JSON object"
    if problem:
        fail(f"{data_dir}/meta.json is not one prepare.py wrote ({problem}): run python prepare.py --force")
    return meta


def tokenizer_identity(data_dir, meta):
    """What a checkpoint records of the tokenizer its token ids mean: kind, vocab size and a hash of the file."""
    path = os.path.join(data_dir, meta["tokenizer"]["file"])
    try:
        digest = hashlib.sha1(read_file(path, 256 * MiB, "tokenizer file")).hexdigest()
    except (OSError, ValueError) as e:
        fail(f"cannot read the tokenizer {path} ({error_text(e) if isinstance(e, OSError) else e}): run python "
             "prepare.py --force")
    return {"kind": meta["tokenizer"]["kind"], "vocab_size": meta["vocab_size"], "sha1": digest}


def load_tokenizer(data_dir):
    """-> (encode(str) -> list[int], decode(list[int]) -> str, eot id) for the tokenizer saved in data_dir."""
    meta = read_valid_meta(data_dir)
    tok = meta["tokenizer"]
    eot = meta["eot_token"]
    path = os.path.join(data_dir, tok["file"])
    if not os.path.isfile(path):
        fail(f"no tokenizer in {data_dir} ({tok['file']} is missing): run python prepare.py --force")
    try:
        if tok["kind"] == "char":
            chars = parse_json(read_file(path, 256 * MiB, "tokenizer file"), path)["chars"]
            if not isinstance(chars, str) or len(chars) != eot:
                raise ValueError(f"its chars are not the {eot} characters meta.json's eot_token says")
            to_ids = char_encoder(chars)
        else:
            ranks = load_tiktoken_file(path)
            if eot < len(ranks):
                raise ValueError(f"the end-of-text id {eot} is one of its {len(ranks)} ranks")
            enc = tiktoken_encoding(ranks, tok["pattern"], eot)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a file that is not what prepare.py wrote
        fail(f"cannot read the tokenizer {path} ({error_text(e) if isinstance(e, OSError) else e}): run python "
             "prepare.py --force")
    except BaseException as e:  # tiktoken's Rust core panics on what it cannot build (pyo3 PanicException)
        if type(e).__name__ != "PanicException":
            raise
        fail(f"tiktoken cannot build the tokenizer {path} ({str(e)[:80]}): run python prepare.py --force")
    if tok["kind"] == "char":
        itos = list(chars) + [EOT]

        def encode(text):
            return to_ids(text).tolist()

        def decode(ids):  # ids past the vocabulary (a model may have spare embedding rows) show as U+FFFD
            return "".join(itos[i] if i < len(itos) else "\ufffd" for i in ids)
        return encode, decode, eot

    def encode(text):
        return enc.encode(text, allowed_special={EOT})  # a prompt may contain <|endoftext|> on purpose
    return encode, enc.decode, eot


# -----------------------------------------------------------------------------
# the token bins


def bins_match_meta(data_dir, meta):
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path) or os.path.getsize(path) != meta["tokens"][split] * itemsize:
            return False
    return os.path.exists(os.path.join(data_dir, meta["tokenizer"]["file"]))


def val_domains(meta):
    """-> (domain names, the domain id of every val token as np.uint8) for a dataset with domains (prepare.py
    --corpus=mix writes each domain's val tokens one after another and their counts in meta.json), else None."""
    domains = meta.get("domains")
    if not domains:
        return None
    try:
        names = [d["name"] for d in domains]
        counts = [d["tokens"]["val"] for d in domains]
        ok = all(type(c) is int and c >= 0 for c in counts) and sum(counts) == meta["tokens"]["val"] \
            and len(names) <= 255 and all(isinstance(n, str) for n in names)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        fail("the domains in meta.json do not add up to its val tokens: run python prepare.py --corpus=mix --force")
    return names, np.repeat(np.arange(len(names), dtype=np.uint8), counts)


def datasets_in(data_root):
    """The names of the datasets prepare.py wrote in data_root (folders holding a meta.json), sorted."""
    try:
        names = os.listdir(data_root)
    except OSError:
        return []
    return sorted(n for n in names if not n.startswith(".") and os.path.isfile(os.path.join(data_root, n, "meta.json")))


def missing_data(dataset, data_root):
    """The one line for a dataset that is not there: the folder looked in (relative paths are the current folder's)
    and what it holds, or, where it holds nothing, the data folder beside this file if that one has datasets."""
    path = data_dir(dataset, data_root)
    root = os.path.dirname(path) or "."
    here = datasets_in(root)
    where = f"{path} ({os.path.abspath(path)})" if not os.path.isabs(path) else path
    if here:
        close = difflib.get_close_matches(os.path.basename(path), here, n=1, cutoff=0.6)
        return (f"no dataset {where}; {root}/ has {', '.join(here)}" + (f": did you mean --dataset={close[0]}?" if
                close else f": pick one with --dataset=NAME, or build {os.path.basename(path)} with python "
                f"prepare.py --input=FILE_OR_FOLDER --name={os.path.basename(path)}"))
    repo_data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    if not os.path.isabs(path) and os.path.abspath(root) != repo_data and datasets_in(repo_data):
        return (f"no dataset {where}: relative paths are the current folder's; the repository's {repo_data} has "
                f"{', '.join(datasets_in(repo_data))}: run from {os.path.dirname(repo_data)}, or give "
                f"--data_root={repo_data}")
    return f"no data in {where}: run python prepare.py first"


def load_data(dataset, data_root="data"):
    """Open data_root/NAME (or a folder path) written by prepare.py: meta, tokenizer and memmapped bins."""
    path = data_dir(dataset, data_root)
    if not os.path.exists(os.path.join(path, "meta.json")) or \
            not all(os.path.exists(os.path.join(path, f"{s}.bin")) for s in ("train", "val")):
        fail(missing_data(dataset, data_root))
    meta = read_valid_meta(path)
    if not bins_match_meta(path, meta):
        fail(f"the bins in {path} do not match its meta.json (changed or cut short?): run python prepare.py --force")
    encode, decode, eot = load_tokenizer(path)
    bins = {}
    for split in ("train", "val"):
        # np.memmap refuses empty files; an empty split is still a valid (if useless) array
        empty = meta["tokens"][split] == 0
        bins[split] = np.zeros(0, meta["dtype"]) if empty else \
            np.memmap(os.path.join(path, f"{split}.bin"), dtype=meta["dtype"], mode="r")
    return Data(dir=path, meta=meta, vocab_size=meta["vocab_size"], train=bins["train"], val=bins["val"],
                encode=encode, decode=decode, eot_token=eot)
