"""
nanoGPT-style overrides for the scripts' module-level settings, one mechanism for all of them:

    python train.py config/train_small.py --batch_size=32 --compile

Each setting has one type, declared once: its default's, or, for a default of None, the script's `types` entry
(None then means "derived": e.g. lr_decay_iters None = max_iters). Every value is checked against it wherever it
comes from, a config file or the command line: an int may stand where a float is expected; None only where the
default is None; a bool is true/false/1/0/yes/no/on/off on the command line (a bare `--flag` is true) and True or
False in a config file. Command-line values are Python literals (strings as they are). Unknown keys and wrong types
end the program with one line naming the close matches or the type expected. --help (or -h) prints every setting
with its default, its type and the comment beside it in the source, grouped as the source groups them, and exits.

Each setting may also have a domain, declared once beside the types (`domains`): the values it may take, checked
for config files and the command line alike, before any work. Every float must be finite in any case (1e400 is inf).
A config file that does not run (a syntax error, an undefined name, a NUL byte, bytes that are not UTF-8) ends in
one line naming the file and the line.

    settings = settings_of(globals())   # the script's defaults
    given = configure(settings, sys.argv[1:], types={"lr_decay_iters": int}, domains={"seed": at_least(0)})
    globals().update(settings)
"""
import ast
import difflib
import io
import math
import os
import sys
import textwrap
import tokenize
import traceback
from ast import literal_eval

from errors import MiB, error_text, fail, read_file

TYPE_NAMES = {bool: "true or false", int: "an int", float: "a float", str: "a string", tuple: "a tuple"}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def settings_of(namespace):
    """A script's settings: its module-level names of a plain type (bool, int, float, str, tuple or None) that
    do not start with _, in the order the script defines them."""
    plain = (bool, int, float, str, tuple, type(None))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, plain)}


# domains: (what the message says the value must be, the test), made by these helpers
def at_least(low):
    return f">= {low}", lambda v: v >= low


def between(low, high, open_high=False):
    return f"in [{low}, {high}{')' if open_high else ']'}", lambda v: low <= v and (v < high if open_high else v <= high)


def one_of(*choices):
    return "one of " + ", ".join(map(str, choices)), lambda v: v in choices


def a_device(allow_auto=False):
    """A device torch can parse and this machine has: cpu, cuda / cuda:N of a visible GPU, mps where it is built."""
    def exists(v):
        if allow_auto and v == "auto":
            return True
        import torch
        try:
            d = torch.device(v)
        except (RuntimeError, ValueError):
            return False
        if d.type == "cuda":
            return torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()
        if d.type == "mps":
            return torch.backends.mps.is_available()
        return d.type == "cpu"
    return f"{'auto, ' if allow_auto else ''}cpu, or cuda / cuda:N of a GPU this machine has", exists


def _check(where, value, kind, nullable, domain=None):
    """value if it is of type kind (an int is taken for a float, None where nullable), finite if a float and in its
    domain, else one line and exit. where is "--key" (the command line) or "key in FILE" (a config file)."""
    if value is None and nullable:
        return None
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        fail(f"{where} expects {TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    if kind is float and not math.isfinite(value):
        fail(f"{_shown(where, value)} must be a finite number")
    if domain is not None and not domain[1](value):
        fail(f"{_shown(where, value)} must be {domain[0]}")
    return value


def _shown(where, value):
    """--lr=-1.0, or lr = -1.0 in config/x.py"""
    if where.startswith("--"):
        return f"{where}={value!r}"
    key, _, path = where.partition(" in ")
    return f"{key} = {value!r} in {path}"


def _parse(raw, kind, nullable):
    """A command-line string -> the value it stands for (checked by _check afterwards)."""
    if kind is bool and raw.lower() in TRUE + FALSE:
        return raw.lower() in TRUE
    if kind is str and not (nullable and raw == "None"):
        return raw
    try:
        return literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # not a literal: _check reports it as the string it is


def _check_key(key, settings):
    if key not in settings:
        close = difflib.get_close_matches(key, list(settings), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        fail(f"unknown setting --{key}{hint}")


def read_config_file(path):
    """The settings a config file assigns (names starting with _ are its own). A config file may start from
    another one with exec(open(...).read()): __file__ is its own path. One that does not run is one line: the file,
    the line, the error."""
    scope = {}
    try:
        source = read_file(path, MiB, "config file").decode("utf-8")
        code = compile(source, path, "exec")
    except (OSError, ValueError) as e:  # not a plain file, too big, not UTF-8, NUL bytes (ValueError or SyntaxError)
        line = f":{e.lineno}" if getattr(e, "lineno", None) else ""
        fail(f"{path}{line}: {error_text(e) if isinstance(e, OSError) else e}: fix the config file")
    except SyntaxError as e:
        fail(f"{path}{':' + str(e.lineno) if e.lineno else ''}: {type(e).__name__}: {e.msg}: fix the config file")
    try:
        exec(code, {"__file__": path}, scope)
    except Exception as e:  # whatever the file's own code raises: name its deepest line in this file
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        fail(f"{path}{':' + str(lines[-1]) if lines else ''}: {error_text(e)}: fix the config file")
    return {k: v for k, v in scope.items() if not k.startswith("_")}


def source_notes(path):
    """{name: (group, comment)} for the settings a Python file assigns at module level or as fields of its classes
    (ModelConfig's), read from its source: the comment on the assignment's lines and on the comment-only lines
    indented deeper below it, and the group, the last comment line above it at the statement's own indentation (a
    `# --- ` prefix dropped, rule lines skipped)."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    comments = {}  # line number -> (column, text)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    lines = src.splitlines()
    notes = {}

    def walk(body, previous_end):
        group = None
        for node in body:
            for ln in range(previous_end + 1, node.lineno):  # the lines between the last statement and this one
                col, text = comments.get(ln, (None, ""))
                if col == node.col_offset and lines[ln - 1].lstrip().startswith("#") and text.strip("- "):
                    group = text[4:] if text.startswith("--- ") else text
            previous_end = node.end_lineno
            if isinstance(node, ast.ClassDef):
                walk(node.body, node.lineno)
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
                node.target if isinstance(node, ast.AnnAssign) else None
            if not isinstance(target, ast.Name) or target.id in notes:  # the first assignment is the setting's
                continue
            own = [comments[ln][1] for ln in range(node.lineno, node.end_lineno + 1) if ln in comments]
            ln = node.end_lineno + 1  # comment-only lines indented under it continue its comment
            while ln in comments and comments[ln][0] > node.col_offset and not lines[ln - 1][:comments[ln][0]].strip():
                own.append(comments[ln][1])
                previous_end = ln
                ln += 1
            notes[target.id] = (group, " ".join(own))
    walk(ast.parse(src).body, 0)
    return notes


def help_text(settings, types, script):
    """--help: every setting of the script with its default, its type and the comment beside it in the source,
    grouped as the source groups them. A setting the script does not assign itself (train.py's ModelConfig fields)
    takes its comment from the other modules of this folder that the script imported."""
    here = os.path.dirname(os.path.abspath(script))
    notes = source_notes(script)
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if os.path.isabs(path) and os.path.dirname(path) == here and path.endswith(".py") and \
                os.path.abspath(path) != os.path.abspath(script):
            for k, (group, comment) in source_notes(path).items():
                notes.setdefault(k, (f"{os.path.basename(path)}: {group}" if group else None, comment))
    name = os.path.basename(script)
    out = [f"usage: python {name} [config/FILE.py ...] [--key=value ...]",
           "The settings below, in order: their defaults, then each config file (Python assigning some of them) and",
           "--key=value, in the order given; a bool may be given bare (--compile = --compile=true)."]
    groups = {}  # group -> its settings, groups in the order they first appear
    for key in settings:
        groups.setdefault(notes.get(key, (None, ""))[0], []).append(key)
    for group, keys in groups.items():
        out += ["", group] if group else [""]
        for key in keys:
            kind = TYPE_NAMES.get(types[key], types[key].__name__).split(" ", 1)[-1] if types[key] is not bool \
                else "bool"
            head = f"  --{key}={settings[key]!r}"
            head = f"{head:<33} {kind + (' or None' if settings[key] is None else ''):<12}"
            comment = notes.get(key, (None, ""))[1]
            lines = textwrap.wrap(comment, 118, initial_indent=head + " ", subsequent_indent=" " * 48) \
                if len(head) <= 48 else [head] + textwrap.wrap(comment, 118, initial_indent=" " * 48,
                                                                subsequent_indent=" " * 48)
            out += lines or [head]
    return "\n".join(line.rstrip() for line in out)


def configure(settings, argv, types=None, domains=None):
    """Update the dict `settings` in place from config files and --key=value arguments, in order; types gives the
    type of each setting whose default is None, domains the values some may take (at_least, between, one_of, ...).
    Returns the names the arguments set (config files included)."""
    types = dict(types or {})
    domains = domains or {}
    for key, default in settings.items():
        if default is None and key not in types:
            raise TypeError(f"setting {key} defaults to None: declare its type in configure(types=...)")
        types.setdefault(key, type(default))
    if "--help" in argv or "-h" in argv:
        print(help_text(settings, types, sys.modules["__main__"].__file__))
        sys.exit(0)
    nullable = {k for k, v in settings.items() if v is None}
    given = set()
    for arg in argv:
        if not arg.startswith("--"):  # a config file: plain Python assigning some of the settings
            if not os.path.isfile(arg):
                fail(f"no config file {arg}: pass a path like config/train_small.py or --key=value")
            for key, value in read_config_file(arg).items():
                _check_key(key, settings)
                settings[key] = _check(f"{key} in {arg}", value, types[key], key in nullable, domains.get(key))
                given.add(key)
            continue
        key, eq, raw = arg[2:].partition("=")
        _check_key(key, settings)
        if not eq and types[key] is not bool:
            fail(f"--{key} needs a value: --{key}=...")
        value = True if not eq else _parse(raw, types[key], key in nullable)
        settings[key] = _check(f"--{key}", value, types[key], key in nullable, domains.get(key))
        given.add(key)
    return given


if __name__ == "__main__":
    demo = {"a": 1, "b": 0.5, "c": "x", "d": False, "e": None}
    print(configure(demo, sys.argv[1:], types={"e": int}), demo)
