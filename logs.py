"""
The run's records and the pictures drawn from them. train.py writes out_dir/log.jsonl: one JSON record per line
(kind "start", "train" or "eval", its iter, and the run's tag). Runs in one out_dir append to it, so no run loses
the history of another; a resumed run continues its checkpoint's run (the same tag). train.py draws loss.png and
expert_load.png from it; study.py reads the runs it launches from it too. Also the markdown tables and the
PNG pictures of bench.py and study.py.

    from logs import last_run, read_log
    recs = last_run(read_log("out/log.jsonl"))     # the last run's records, in order
"""
import json
import math
import os
import time

import numpy as np

import stat

from errors import MiB, atomic_write, error_text, read_file

# -----------------------------------------------------------------------------
# log.jsonl


def parse_record(line):
    """A line of log.jsonl -> its record, or None for a line that is not one (cut short by a crash mid-write)."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and "kind" in r and "iter" in r else None


LOG_LIMIT = 4096 * MiB  # a log.jsonl is read whole; a million records with expert loads stay far below this


def read_log(path):
    """Every whole record of a log.jsonl, in order (lines a crash cut short are skipped). ValueError for a
    log.jsonl that is not a plain file or is over LOG_LIMIT (a FIFO or /dev/zero would hang the read)."""
    return [r for r in map(parse_record, read_file(path, LOG_LIMIT, "log").splitlines()) if r is not None]


def last_run(records):
    """The records of the last run that started in this log (its "start" record and everything tagged like it)."""
    run = next((r.get("run") for r in reversed(records) if r["kind"] == "start"), None)
    return [r for r in records if r.get("run") == run]


def open_log(path, resume_run=None, resume_iter=None):
    """log.jsonl opened for appending, never truncated: earlier runs' records stay. A resumed run (resume_run, the
    checkpoint's run and iter) first drops its own records after resume_iter, which it is about to write again.
    A last line that a crash cut short is ended, so the next record starts on its own line."""
    if resume_run is not None and os.path.exists(path):
        keep_log_until(path, resume_run, resume_iter)
    # never through a link (O_NOFOLLOW: a planted log.jsonl -> elsewhere gets nothing appended), never a FIFO
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0),
                 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file: train.py appends its records only to a plain log.jsonl")
    os.set_blocking(fd, True)
    f = open(fd, "a+")
    size = os.fstat(fd).st_size
    if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
        f.write("\n")
    return f


def keep_log_until(path, run, last_iter):
    """Rewrite log.jsonl (whole or not at all) without run's records after last_iter and without broken lines;
    every other line stays byte for byte."""
    lines = [(line, parse_record(line)) for line in read_file(path, LOG_LIMIT, "log").split(b"\n") if line]
    with atomic_write(path) as f:
        f.write(b"".join(line + b"\n" for line, r in lines
                         if r is not None and not (r.get("run") == run and r["iter"] > last_iter)))


# -----------------------------------------------------------------------------
# reports: markdown tables, and pictures (matplotlib, imported only when drawing)


def table(header, rows):
    """A markdown table (bench.py's and study.py's results)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_sections(sections, names, results, json_path):
    """Run sections[name]() for each name in order, timing each, then write results (every number) to json_path."""
    for name in names:
        t0 = time.time()
        sections[name]()
        print(f"({name} section: {time.time() - t0:.0f} s)")
    if json_path:
        os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        with atomic_write(json_path) as f:
            f.write(json.dumps(results, indent=1, default=str).encode())
        print(f"wrote {json_path}")


def pyplot():
    """matplotlib.pyplot without a display (ImportError where matplotlib is not installed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, ax=None, dpi=120, tight=True, announce=True):
    """fig as a PNG at path, whole or not at all; with ax, its grid and legend first."""
    plt = pyplot()
    if ax is not None:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if tight:
        fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
    if announce:
        print(f"wrote {path}")


# -----------------------------------------------------------------------------
# train.py's plots: train/val loss against tokens, and the load of every expert of every MoE layer over training


def tokens_axis(ax, fontsize=None):
    """An x axis of training tokens: a few ticks, labelled 100k / 1.5M / 2G, and its title."""
    import matplotlib.ticker as ticker
    ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: format_tokens(x)))
    ax.set_xlabel("training tokens", fontsize=fontsize)


def format_tokens(x):
    """400000 -> '400k', 1500000 -> '1.5M'."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def plot_run(out_dir):
    """out_dir/loss.png and, for a model with MoE layers, out_dir/expert_load.png, from its log's last run."""
    plt = pyplot()
    import matplotlib
    recs = {}
    for r in last_run(read_log(os.path.join(out_dir, "log.jsonl"))):
        recs[(r["kind"], r["iter"])] = r  # a resumed run writes its checkpoint's iter again: last wins
    train = sorted((r for r in recs.values() if r["kind"] == "train"), key=lambda r: r["iter"])
    evals = sorted((r for r in recs.values() if r["kind"] == "eval"), key=lambda r: r["iter"])
    start = next((r for r in recs.values() if r["kind"] == "start"), {})

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train (step)")
    ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "o-", ms=3, label="train (eval)")
    ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="val")
    if "unigram_entropy" in start:
        ax.axhline(start["unigram_entropy"], ls="--", c="gray", lw=1, label="unigram entropy")
    if evals:
        ax.set_title(f"{out_dir}: final val loss {evals[-1]['val_loss']:.4f}")
    tokens_axis(ax)
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, os.path.join(out_dir, "loss.png"), announce=False)
    written = ["loss.png"]

    loads = [r for r in train if "load" in r]
    if loads:
        n_layers = len(loads[0]["load"])
        cols = min(4, n_layers + 1)
        rows = math.ceil((n_layers + 1) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 3.0 * rows + 0.6), squeeze=False,
                                 layout="constrained")
        x0, x1 = loads[0]["tokens"], loads[-1]["tokens"]
        for i, ax in enumerate(axes.flat):
            if i < n_layers:
                # rows: experts; columns: log intervals; color: log2(tokens / mean) (white = its fair share)
                grid = np.log2(np.maximum(np.array([r["load"][i] for r in loads]).T, 1e-3))
                im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-2, vmax=2, interpolation="nearest",
                               extent=(x0, x1, grid.shape[0] - 0.5, -0.5))
                ax.set_title(f"MoE layer {i}", fontsize=9)
                ax.set_ylabel("expert", fontsize=8)
            elif i == n_layers:
                ax.plot([r["tokens"] for r in loads], [r["maxvio_batch"] for r in loads], lw=0.8,
                        label="MaxVio_batch")
                ev = [r for r in evals if "maxvio_global" in r]
                ax.plot([r["tokens"] for r in ev], [r["maxvio_global"] for r in ev], "o-", ms=3,
                        label="MaxVio_global (val)")
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
                ax.set_title("MaxVio (mean over layers)", fontsize=9)
            else:
                ax.axis("off")
            ax.tick_params(labelsize=7)
            if i <= n_layers:
                tokens_axis(ax, fontsize=8)
        fig.colorbar(im, ax=axes[:, :n_layers].ravel().tolist() if rows == 1 else axes.ravel().tolist(), shrink=0.8,
                     label="log2(tokens / mean)")
        fig.suptitle(f"{out_dir}: expert load over training tokens (balance={start.get('balance', '?')}; "
                     "red = overloaded, blue = starved)", fontsize=10)
        save_figure(fig, os.path.join(out_dir, "expert_load.png"), dpi=110, tight=False, announce=False)
        written.append("expert_load.png")
    print(f"plots: {', '.join(os.path.join(out_dir, w) for w in written)}")


def draw_plots(out_dir):
    """plot_run; -> None, or one line saying why it could not draw."""
    try:
        plot_run(out_dir)
    except ImportError:
        return "matplotlib is not installed; pip install matplotlib, then python train.py --plot_only"
    except OSError as e:
        return f"cannot draw the plots in {out_dir} ({error_text(e)}): pick an --out_dir you can write"
    except (KeyError, TypeError, ValueError) as e:  # records that are not train.py's, a log.jsonl that is no file
        return f"cannot plot {out_dir}/log.jsonl: a record is not one train.py wrote ({error_text(e)})"
