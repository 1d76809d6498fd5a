"""
One-line errors, all-or-nothing writes and careful reads, for every nanoseek script (README, "Failure behaviour"):
fail() ends the program with a line the user can act on (NANOSEEK_DEBUG=1 shows the traceback instead);
atomic_write() gives a file everything written or leaves what it had; read_file() / read_json() read only regular
files of a bounded size (a FIFO or /dev/zero cannot hang them); hold_lock() keeps a second run out of an out_dir;
quiet_exits() makes Ctrl-C, a closed pipe and a full stdout end in one line or none. Imports nothing of nanoseek's.

    from errors import atomic_write, error_text, fail
"""
import errno
import json
import os
import stat
import sys
import time
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

    f is path + ".tmp-PID" in the same folder (PID: this process's, so two processes never share one), created
    exclusively and never through a symlink (O_EXCL | O_NOFOLLOW: a link someone put there is not followed),
    flushed to the disk (fsync) and renamed over path. On any error or interruption (a full disk, Ctrl-C) the temp
    file is removed. A kill -9 can leave it: the next write by a process of that id removes it first, and train.py
    removes those of its out_dir under its lock. The mode is 0666 minus the umask, as open() gives."""
    tmp = f"{path}.tmp-{os.getpid()}"
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


# -----------------------------------------------------------------------------
# reads that cannot hang or exhaust memory: regular files only, their size bounded before a byte is read

MiB = 1 << 20


def read_file(path, limit, what="file"):
    """The bytes of path, a regular file (a symlink to one is fine) of at most limit bytes; else ValueError naming
    it. Opened with O_NONBLOCK, so a FIFO planted there does not block the open; fstat then refuses it, a device
    (/dev/zero) or a folder."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, what)
        if st.st_size > limit:
            raise ValueError(f"{path} is {st.st_size:,} bytes, over the {limit:,} a {what} may have")
        return f.read(limit + 1)[:limit]


def not_regular(path, what):
    return ValueError(f"{path} is not a regular file (a FIFO, device or folder): nanoseek reads {what}s only from "
                      "plain files")


def check_regular(path, what="file"):
    """ValueError unless path is a regular file (for files read by other libraries: safetensors, torch.load)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise not_regular(path, what)


def parse_json(raw, path):
    """JSON bytes (a UTF-8 BOM is fine) -> the value; ValueError naming path for bad JSON or absurd nesting."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a nanoseek or transformers JSON file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({error_text(e)})") from e


def read_json(path, limit=64 * MiB, what="JSON file"):
    """read_file + parse_json: ValueError (one line, naming the file) for anything but a plain file of JSON."""
    return parse_json(read_file(path, limit, what), path)


# -----------------------------------------------------------------------------
# one run per out_dir


_held = []  # the lock files this process holds, open


def hold_lock(folder, name="train.lock"):
    """Take an exclusive lock on folder/name (fcntl.flock), held until this process ends (the kernel drops it then,
    also after a kill -9), and write who holds it into the file. A second process that asks while it is held gets
    one line naming the holder and exits, having changed nothing (the lock file stays: deleting it would let two
    processes lock two different files). Returns the open file."""
    import fcntl
    path = os.path.join(folder, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as e:
        fail(f"cannot lock {path} ({error_text(e)}): pick an --out_dir you can write")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        fail(f"{path} is not a regular file: move it away or pick another --out_dir")
    f = open(fd, "r+")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            fail(f"cannot lock {path} ({error_text(e)}): pick another --out_dir")
        holder = f.read(500).strip() or "another process"
        fail(f"{folder} is in use by another run ({holder}): wait for it to end, or pick another --out_dir")
    f.truncate(0)
    f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]}\n")
    f.flush()
    _held.append(f)
    return f


def release_locks():
    """Drop every lock hold_lock took (closing the file drops a flock): at the end of a run, and after each run
    of train.py in a process that runs it several times (the tests)."""
    while _held:
        _held.pop().close()


# -----------------------------------------------------------------------------
# the edges of a command-line tool


def quiet_exits():
    """Install a sys.excepthook (call it first, before the slow imports) for what a user does to a running
    command: Ctrl-C ends in one line, "interrupted"; a closed pipe (python sample.py | head) ends silently, as
    head expects; a full stdout (> /dev/full) in one line. Anything else shows as usual. Either way stdout is
    pointed at /dev/null before the interpreter's last flush, which would only fail again."""
    def hook(kind, value, tb):
        if debugging():
            return sys.__excepthook__(kind, value, tb)
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
        elif issubclass(kind, BrokenPipeError):
            pass
        elif issubclass(kind, OSError) and value.errno in (errno.ENOSPC, errno.EIO):
            print(f"stopped: cannot write the output ({error_text(value)})", file=sys.stderr)
        else:
            return sys.__excepthook__(kind, value, tb)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    sys.excepthook = hook
