"""
One-line errors and all-or-nothing writes, for every nanoseek script: fail() ends the program with a line the user
can act on (NANOSEEK_DEBUG=1 shows the traceback instead); atomic_write() gives a file everything written or leaves
what it had (README, "Failure behaviour"). Imports nothing of nanoseek's.

    from errors import atomic_write, error_text, fail
"""
import os
from contextlib import contextmanager


def debugging():
    """NANOSEEK_DEBUG=1 (any value but 0): show tracebacks instead of one-line errors."""
    return os.environ.get("NANOSEEK_DEBUG", "0") not in ("", "0")


def fail(msg):
    """End the program with one line for an error the user can fix (exit status 1, the line on stderr).
    NANOSEEK_DEBUG=1 raises it as a RuntimeError instead, so the traceback and the exception behind it show."""
    msg = " ".join(line.strip() for line in str(msg).splitlines() if line.strip())
    if debugging():
        raise RuntimeError(msg)
    raise SystemExit(msg)


def error_text(e):
    """An exception as a short phrase for a one-line error: an OSError's reason (also when torch wraps one in a
    RuntimeError), else its type and the first sentence of its message."""
    os_error = e if isinstance(e, OSError) else e.__context__
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's messages go on for a paragraph
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextmanager
def atomic_write(path):
    """with atomic_write(path) as f: ...  -- path gets everything written to f, or keeps what it had.

    f is path + ".tmp" in the same folder, created exclusively and never through a symlink (O_EXCL | O_NOFOLLOW:
    a link someone put there is not followed), flushed to the disk (fsync) and renamed over path. On any error or
    interruption (a full disk, Ctrl-C) the temp file is removed. A kill -9 can leave it: the next write removes it
    first (the name is ours). The mode is 0666 minus the umask, as open() gives."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)  # unlinks a symlink itself, never its target
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
