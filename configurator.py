"""
nanoGPT-style overrides for the scripts' module-level settings, one mechanism for all of them:

    python train.py config/train_small.py --batch_size=32 --compile

A bare `--flag` sets a bool to True. Values are parsed as Python literals and must match the default's type
(an int may stand where a float is expected; a None default takes any literal, or the raw string). Unknown
keys and wrong types end the program with one line naming the close matches.

    settings = {k: v for k, v in globals().items() if ...}   # the script's defaults
    configure(settings, sys.argv[1:]); globals().update(settings)
"""
import difflib
import os
import sys
from ast import literal_eval


def _fail(msg):
    raise SystemExit(msg)


def _parse(key, raw, default):
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        _fail(f"--{key} expects true or false, got {raw!r}")
    if isinstance(default, str):
        return raw
    try:
        value = literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None:
            return raw
        _fail(f"--{key} expects a {type(default).__name__}, got {raw!r}")
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        _fail(f"--{key} expects a {type(default).__name__}, got {raw!r}")
    return value


def _check_key(key, settings):
    if key not in settings:
        close = difflib.get_close_matches(key, list(settings), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        _fail(f"unknown setting --{key}{hint}")


def read_config_file(path):
    """The settings a config file assigns (names starting with _ are its own). A config file may start from
    another one with exec(open(...).read()): __file__ is its own path."""
    scope = {}
    with open(path) as f:
        exec(f.read(), {"__file__": path}, scope)
    return {k: v for k, v in scope.items() if not k.startswith("_")}


def configure(settings, argv):
    """Update the dict `settings` in place from config files and --key=value arguments, in order."""
    for arg in argv:
        if not arg.startswith("--"):  # a config file: plain Python assigning some of the settings
            if not os.path.isfile(arg):
                _fail(f"no config file {arg}: pass a path like config/train_small.py or --key=value")
            for key, value in read_config_file(arg).items():
                _check_key(key, settings)
                settings[key] = value
            continue
        key, eq, raw = arg[2:].partition("=")
        _check_key(key, settings)
        if not eq:
            if not isinstance(settings[key], bool):
                _fail(f"--{key} needs a value: --{key}=...")
            settings[key] = True
        else:
            settings[key] = _parse(key, raw, settings[key])
    return settings


if __name__ == "__main__":
    print(configure({"a": 1, "b": 0.5, "c": "x", "d": False, "e": None}, sys.argv[1:]))
