"""
What a requirements file installs, measured on this machine's installed packages (no network): every distribution
it names and, transitively, what they require, with the bytes of the files each one installed (its RECORD).

    python .ci/install_size.py requirements.txt requirements-test.txt   # one total per file, each on top of the last
    python .ci/install_size.py --without=torch requirements.txt         # leave torch (and what only it needs) out

A package that is not installed here is listed as missing and counts 0 bytes.
"""
import os
import re
import sys
from importlib import metadata


def name_of(req):
    return re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(names, seen):
    """names and everything they require (extras and environment markers that do not apply skipped)."""
    todo = list(names)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        try:
            dist = metadata.distribution(n)
        except metadata.PackageNotFoundError:
            seen[n] = None
            continue
        seen[n] = dist
        for req in dist.requires or []:
            marker = req.split(";", 1)[1] if ";" in req else ""
            if "extra ==" in marker:
                continue
            todo.append(name_of(req))
    return seen


def size(dist):
    root = dist.locate_file("")
    return sum(os.path.getsize(p) for f in dist.files or [] if os.path.isfile(p := os.path.join(root, str(f))))


def main(argv):
    without = [a.split("=", 1)[1].lower() for a in argv if a.startswith("--without=")]
    seen = closure(without, {}) if without else {}  # counted as already there
    for path in (a for a in argv if not a.startswith("--")):
        with open(path) as f:
            reqs = [name_of(line.split("#", 1)[0]) for line in f if line.split("#", 1)[0].strip()]
        before = set(seen)
        closure([r for r in reqs if not r.startswith("-")], seen)
        new = sorted((n for n in set(seen) - before), key=lambda n: -(size(seen[n]) if seen[n] else 0))
        sizes = {n: size(seen[n]) if seen[n] else 0 for n in new}
        print(f"{path}: {sum(sizes.values()) / 1e6:,.0f} MB in {len(new)} distributions"
              + (f" (without {', '.join(without)} and what they need)" if without else ""))
        for n in new:
            print(f"  {n:28s} {sizes[n] / 1e6:9,.1f} MB" + ("" if seen[n] else "  (not installed here)"))


if __name__ == "__main__":
    main(sys.argv[1:])
