"""
nanoGPT-style overrides for the scripts' module-level settings, one mechanism for all of them:

    python train.py config/train_small.py --batch_size=32 --compile

Each setting has one type, declared once: its default's, or, for a default of None, the script's `types` entry
(None then means "derived": e.g. lr_decay_iters None = max_iters). Every value is checked against it wherever it
comes from, a config file or the command line: an int may stand where a float is expected; None only where the
default is None; a bool is true/false/1/0/yes/no/on/off on the command line (a bare `--flag` is true) and True or
False in a config file. Command-line values are Python literals (strings as they are). Unknown keys and wrong types
end the program with one line naming the close matches or the type expected.

    settings = settings_of(globals())   # the script's defaults
    given = configure(settings, sys.argv[1:], types={"lr_decay_iters": int}); globals().update(settings)
"""
import difflib
import os
import sys
from ast import literal_eval

from errors import fail

TYPE_NAMES = {bool: "true or false", int: "an int", float: "a float", str: "a string", tuple: "a tuple"}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def settings_of(namespace):
    """A script's settings: its module-level names of a plain type (bool, int, float, str, tuple or None) that
    do not start with _, in the order the script defines them."""
    plain = (bool, int, float, str, tuple, type(None))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, plain)}


def _check(where, value, kind, nullable):
    """value if it is of type kind (an int is taken for a float, None where nullable), else one line and exit."""
    if value is None and nullable:
        return None
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        fail(f"{where} expects {TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    return value


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
    another one with exec(open(...).read()): __file__ is its own path."""
    scope = {}
    with open(path) as f:
        exec(f.read(), {"__file__": path}, scope)
    return {k: v for k, v in scope.items() if not k.startswith("_")}


def configure(settings, argv, types=None):
    """Update the dict `settings` in place from config files and --key=value arguments, in order; types gives the
    type of each setting whose default is None. Returns the names the arguments set (config files included)."""
    types = dict(types or {})
    for key, default in settings.items():
        if default is None and key not in types:
            raise TypeError(f"setting {key} defaults to None: declare its type in configure(types=...)")
        types.setdefault(key, type(default))
    nullable = {k for k, v in settings.items() if v is None}
    given = set()
    for arg in argv:
        if not arg.startswith("--"):  # a config file: plain Python assigning some of the settings
            if not os.path.isfile(arg):
                fail(f"no config file {arg}: pass a path like config/train_small.py or --key=value")
            for key, value in read_config_file(arg).items():
                _check_key(key, settings)
                settings[key] = _check(f"{key} in {arg}", value, types[key], key in nullable)
                given.add(key)
            continue
        key, eq, raw = arg[2:].partition("=")
        _check_key(key, settings)
        if not eq and types[key] is not bool:
            fail(f"--{key} needs a value: --{key}=...")
        value = True if not eq else _parse(raw, types[key], key in nullable)
        settings[key] = _check(f"--{key}", value, types[key], key in nullable)
        given.add(key)
    return given


if __name__ == "__main__":
    demo = {"a": 1, "b": 0.5, "c": "x", "d": False, "e": None}
    print(configure(demo, sys.argv[1:], types={"e": int}), demo)
