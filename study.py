"""
The training studies: each drives train.py over a few variants (same data, tokens and seed unless a study says
otherwise), reads their log.jsonl and draws one picture. They measure loss, not speed (speed is bench.py). Prints
markdown tables (the device first) and writes every number to json_path.

    python study.py --sections=balance               # four train.py runs: bias vs aux loss vs none
    python study.py --sections=mtp                   # mtp_depth 0 vs 1, then speculative decoding (GPU)
    python study.py --sections=arch,specialize,tradeoff --arch_scale=cpu  # the claims at CPU size (minutes)
    python study.py --sections=arch,specialize --runs=reuse     # on a GPU (config/study_gpu.py); a study cut off
                                                                # by a time limit goes on where it stopped
    python study.py --sections=arch --arch_dry_run             # the arms' parameters and FLOPs, no training

Sections:
  balance  the load-balancing ablation of train.py (config/train_balance.py, same data, tokens and seed):
           --balance=bias vs aux (alpha 0.01, 0.001) vs none; final val loss, MaxVio_global, tokens/s, and
           balance_dir/balance.png (val loss and MaxVio over training, the four runs overlaid)
  mtp      two train.py runs (config/train_balance.py, mtp_depth 0 and 1): the main head's val loss, the MTP
           head's loss and accuracy, mtp_dir/mtp.png; then greedy decoding of the MTP checkpoint, plain (eager and
           CUDA graph) and speculative, at batch 1 and 32: acceptance, tokens/s, the same tokens or not
  arch     the DeepSeekMoE ablation (arXiv 2401.06066) and the shared-expert question (arch_arms below): dense,
           coarse top-2 of 16, coarse + 1 shared, fine-grained top-8 of 64 with 0, 1 or 2 shared experts (top-8 of
           64, 1 + top-7 of 63, 2 + top-6 of 62 = DeepSeekMoE); the same active FFN width and expert parameters,
           --balance=bias, every arm under every seed of arch_seeds (config/study_gpu.py or config/study_cpu.py,
           on --dataset); val loss overall and per domain as mean and spread over seeds, the claims as paired
           differences per seed at equal tokens (and against dense at equal training seconds), and
           arch_dir/arch_tokens.png, arch_seconds.png (val loss against training tokens and training seconds)
  specialize  the arch section's DeepSeekMoE and coarse checkpoints, every seed, over the data's val: the mutual
           information between domain and chosen expert per MoE layer in bits (mean and spread over seeds), next to
           the same counts with the domains shuffled, and arch_dir/specialize.png (the first seed's shares)
  tradeoff the balancing trade-off (Wang et al. arXiv 2408.15664, Figure 1): the DeepSeekMoE arm with
           --balance=aux at tradeoff_alphas, bias and none under the first seed, then bias and the best alpha
           under the second; val loss against MaxVio_global (arch_dir/tradeoff/tradeoff.png)
Every run prints its seconds (start-up, training, evaluations, the save) and the study's projected total;
--stop_after=SECONDS begins no run that would end past that many (a device's time limit), --runs=reuse goes on.
On a GPU (--overlap) each run's process starts while the run before it trains and waits after its imports until
that run has ended: the imports cost the study nothing, and no two runs train at once.
Every study but mtp (its decoding half needs a CUDA GPU) runs on a CPU at its CPU scale.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from configurator import at_least, configure, one_of, read_config_file, settings_of
from data import data_dir, load_data, val_domains
from generate import generate, generate_stream
from errors import atomic_write
from logs import last_run, pyplot, read_log, run_sections, save_figure, table, tokens_axis
from model import Model, ModelConfig, cast_weights
from moe import mutual_information, recording_routes, routing_counts
from system import machine_name

# -----------------------------------------------------------------------------
# settings (configurator.py: --key=value)
sections = "balance"             # comma-separated: balance, mtp, arch, specialize, tradeoff
json_path = "out/study.json"     # every number measured
balance_dir = "out/balance"      # the balance section's runs (one train.py out_dir each) and balance.png
balance_args = ""                # extra train.py arguments for every balance run, e.g. "--max_iters=400"
mtp_dir = "out/mtp"              # the mtp section's two runs and mtp.png
mtp_args = ""                    # extra train.py arguments for both mtp runs
mtp_new = 256                    # tokens decoded per sample in the mtp section
arch_scale = "gpu"               # arch, specialize, tradeoff: "gpu" (config/study_gpu.py) or "cpu" (.._cpu.py)
dataset = ""                     # their corpus (data/NAME of prepare.py, with domains); "" = the config's
arch_dir = ""                    # their runs (one train.py out_dir each) and pictures; "" = out/arch-ARCH_SCALE
arch_args = ""                   # extra train.py arguments for every arch and tradeoff run
arch_seeds = (1337, 1338, 1339)  # every arm trains under each; the tradeoff section uses the first two
arch_dry_run = False             # arch: print each arm's parameters and FLOPs per token, train nothing
specialize_tokens = 0            # val tokens the specialize section routes per checkpoint; 0 = the scale's
                                 # (SPECIALIZE_TOKENS); more than val holds = all of val
tradeoff_alphas = (0.0001, 0.001, 0.003, 0.01, 0.1)  # aux_alpha of the tradeoff section's --balance=aux runs
runs = "train"                   # "train": every run anew; "reuse": a run whose out_dir holds a finished run of
                                 # the same arguments is read, not trained again; "read": train nothing, read all
stop_after = 0.0                 # seconds from the study's start: no run is begun that would end past it (judged by
                                 # the mean of the runs so far); the same command with --runs=reuse goes on. 0 = none
overlap = "auto"                 # "on": each run's process starts (imports) while the run before it trains; "auto":
                                 # on a GPU only (a CPU run has no core to spare); "off"
seed = 0
settings = settings_of(globals())
HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")
T_START = time.time()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = machine_name(device)
results = dict(device=gpu, torch=torch.__version__)


# -----------------------------------------------------------------------------
# the load-balancing ablation: four train.py runs, one table, one picture

BALANCE_RUNS = {"bias": ["--balance=bias"], "aux 0.01": ["--balance=aux", "--aux_alpha=0.01"],
                "aux 0.001": ["--balance=aux", "--aux_alpha=0.001"], "none": ["--balance=none"]}


def ran_on(logs):
    """Where a section's runs trained, as their logs' start records say (train.py writes it), so --runs=read on
    another machine still names it; this machine for logs written before train.py recorded it."""
    names = {next((r.get("device") for r in recs if r["kind"] == "start"), None) for recs in logs.values()}
    return ", ".join(sorted(names)) if names and None not in names else gpu


def run_dir(out_root, name):
    return os.path.join(out_root, name.replace(" ", ""))


def median_tok_s(train_records):
    """The median tokens/s of a run's log lines, the first (compilation, warm-up) left out; nan with none logged
    (a run shorter than its log_interval)."""
    rates = sorted(r["tok_s"] for r in train_records[1:]) or [r["tok_s"] for r in train_records]
    return rates[len(rates) // 2] if rates else float("nan")


def warmup_seconds(recs):
    """The first log interval's time beyond the run's median step time (torch.compile, the first CUDA kernels): the
    one-off cost inside a run's training seconds."""
    tr = [r for r in recs if r["kind"] == "train"]
    if len(tr) < 2:
        return 0.0
    ms = sorted(r["ms"] for r in tr[1:])[(len(tr) - 1) // 2]
    return max(tr[0]["ms"] - ms, 0.0) * tr[0]["iter"] / 1000


def run_parts(recs, wall):
    """Where a run's wall seconds went, from its log: start-up (imports, data, model: train.py's start record),
    training steps (the compile warm-up among them), evaluations, and the rest (checkpoint save, exit)."""
    nan = float("nan")
    start = next((r for r in recs if r["kind"] == "start"), {})
    ev = [r for r in recs if r["kind"] == "eval"]
    parts = dict(wall=wall, startup=start.get("startup_seconds", nan), train=ev[-1].get("train_seconds", nan),
                 warmup=warmup_seconds(recs), evals=sum(r.get("eval_seconds", nan) for r in ev),
                 startup_parts=start.get("startup_parts", {}))
    parts["rest"] = wall - parts["startup"] - parts["train"] - parts["evals"]
    return parts


def study_run(out_dir):
    """out_dir's study_run.json: the config and arguments of the run that finished there and its wall seconds
    (written when it did), or {} where there is none."""
    try:
        with open(os.path.join(out_dir, "study_run.json")) as f:
            saved = json.load(f)
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def finished_run(out_dir, config, args):
    """out_dir's last run if it finished (its last evaluation at the end) under the same config and arguments
    (study_run.json), else None."""
    saved = study_run(out_dir)
    try:
        recs = last_run(read_log(os.path.join(out_dir, "log.jsonl")))
    except (OSError, ValueError):
        return None
    same = (saved.get("config"), saved.get("args")) == (config, args)
    return recs if same and any(r["kind"] == "eval" for r in recs) else None


def print_run_seconds(parts, n_runs):
    """One line: where the seconds of a section's runs went, summed over those whose wall time is known."""
    if not parts:
        return
    total = {k: sum(p[k] for p in parts) for k in ("wall", "startup", "warmup", "train", "evals", "rest")}
    first = sum(p["warmup"] for p in parts if p["first"])
    unknown = f" ({n_runs - len(parts)} runs of an older study.py without theirs)" if len(parts) < n_runs else ""
    print(f"the {len(parts)} runs' {total['wall']:.0f} s{unknown}: start-up {total['startup']:.0f} s, compile "
          f"warm-up {total['warmup']:.0f} s ({first:.0f} s of it in the first run of each arm), training steps "
          f"{total['train'] - total['warmup']:.0f} s, evaluations {total['evals']:.0f} s, checkpoint saves and "
          f"exits {total['rest']:.0f} s", flush=True)


WALLS = []  # the seconds of every run trained so far, all sections: --stop_after's estimate
START_AFTER = "NANOSEEK_START_AFTER"  # train.py waits for this file before it reads its data or touches the GPU


def launch(cmd, gate):
    """A train.py process with its stderr in a temp file (two run at once: a pipe could fill); with a gate path,
    the process does its imports, then waits until that file exists."""
    err = tempfile.TemporaryFile(mode="w+")
    env = {**os.environ, START_AFTER: gate} if gate else None
    return dict(proc=subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env), err=err,
                launched=time.time(), gate=gate)


def train_runs(config, todo, out_root, extra):
    """One train.py run per entry of todo {name: [arguments]} on top of config, each in out_root/name, one after
    the other; returns {name: that run's log.jsonl records}. A run that fails stops the study with its last line.
    --runs=reuse reads a run that finished before with the same arguments; --runs=read trains nothing.
    With overlap, the next run's process starts as soon as one begins, and waits after its imports for that one to
    end: its imports cost the study nothing, and no two runs ever train at once."""
    logs, t_start, walls, all_parts, seen = {}, time.time(), [], [], set()

    def known_parts(name, out_dir):  # the run's seconds by part, where its wall time is on record
        wall = study_run(out_dir).get("wall_seconds")
        if not isinstance(wall, (int, float)):
            return None
        parts = run_parts(logs[name], wall)
        arm = name.rsplit("-s", 1)[0]
        parts["first"] = arm not in seen  # the first run of an arm in this section compiles its shapes cold
        seen.add(arm)
        all_parts.append(parts)
        results.setdefault("run_seconds", {})[out_dir] = parts
        return parts

    entries = {name: [*args, *extra.split()] for name, args in todo.items()}
    reusable = {name: finished_run(run_dir(out_root, name), config, args) if runs == "reuse" else None
                for name, args in entries.items()}
    to_train = [name for name in entries if runs == "train" or runs == "reuse" and reusable[name] is None]
    cmds = {name: [sys.executable, TRAIN, os.path.join(HERE, config), *entries[name],
                   f"--out_dir={run_dir(out_root, name)}", "--overwrite"] for name in to_train}
    gates = tempfile.mkdtemp(prefix="study-gates-")
    waiting = {}  # name: the started process of the next run to train, waiting at its gate
    t_first = None
    try:
        for k, (name, args) in enumerate(entries.items()):
            out_dir = run_dir(out_root, name)
            head = f"[{k + 1}/{len(todo)}] {name}"
            if runs == "read":
                path = os.path.join(out_dir, "log.jsonl")
                if not os.path.isfile(path):
                    raise SystemExit(f"study.py --runs=read: no {path}: train it first (--runs=reuse trains only "
                                     "what is missing)")
                logs[name] = last_run(read_log(path))
                print(f"{head}: read {path}", flush=True)
                known_parts(name, out_dir)
                continue
            if name not in cmds:
                logs[name] = reusable[name]
                print(f"{head}: finished before with the same arguments, read from {out_dir}", flush=True)
                known_parts(name, out_dir)
                continue
            mean_wall = sum(WALLS) / len(WALLS) if WALLS else 0.0
            if stop_after and time.time() - T_START + mean_wall > stop_after:
                raise SystemExit(f"study.py: stopped before {head} ({time.time() - T_START:.0f} s in, runs take "
                                 f"~{mean_wall:.0f} s, --stop_after={stop_after:g}): the same command with "
                                 "--runs=reuse goes on from there")
            print(f"{head} $ python " + " ".join(cmds[name][1:]), flush=True)  # a study run again replaces its own
            run = waiting.pop(name, None) or launch(cmds[name], "")
            opened = time.time()
            t_first = t_first or opened
            if run["gate"]:
                open(run["gate"], "w").close()
            later = to_train[to_train.index(name) + 1:]
            if overlap and later:
                waiting[later[0]] = launch(cmds[later[0]], os.path.join(gates, later[0].replace(" ", "")))
            returncode = run["proc"].wait()
            ended = time.time()
            run["err"].seek(0)
            stderr = run["err"].read()
            run["err"].close()
            if returncode:
                last = (stderr.strip().splitlines() or ["(no message)"])[-1]
                raise SystemExit(f"study.py: the {name!r} run failed: {last}")
            logs[name] = last_run(read_log(os.path.join(out_dir, "log.jsonl")))  # log.jsonl keeps earlier runs too
            start = next((r for r in logs[name] if r["kind"] == "start"), {})
            wall = ended - run["launched"] - start.get("waited_seconds", 0.0)  # its own seconds: the wait left out
            with atomic_write(os.path.join(out_dir, "study_run.json")) as f:
                f.write(json.dumps(dict(config=config, args=args, wall_seconds=wall, launched=run["launched"],
                                        opened=opened, ended=ended)).encode())
            walls.append(wall)
            WALLS.append(wall)
            parts = known_parts(name, out_dir)
            elapsed = time.time() - t_start
            # by the section's own seconds per run so far (overlapped start-ups left out), the first seed's cold
            # compiles among them: a projection on the high side
            eta = (ended - t_first) / len(walls) * (len(to_train) - len(walls))
            of_it = ", ".join(f"{part} {sec:.1f}" for part, sec in parts["startup_parts"].items())
            print(f"  {wall:.0f} s: start-up {parts['startup']:.1f} s{f' ({of_it})' if of_it else ''}, training "
                  f"{parts['train']:.1f} s (of it first-steps warm-up {parts['warmup']:.1f} s), evaluations "
                  f"{parts['evals']:.1f} s, checkpoint save and exit {parts['rest']:.1f} s | these {len(todo)} "
                  f"runs: {elapsed:.0f} s so far, about {eta:.0f} s to go, projected total {elapsed + eta:.0f} s",
                  flush=True)
    finally:  # a failed run, --stop_after or Ctrl-C: the started next run goes too
        for run in waiting.values():
            run["proc"].kill()
            run["proc"].wait()
            run["err"].close()
        shutil.rmtree(gates, ignore_errors=True)
    print_run_seconds(all_parts, len(todo))
    if walls:
        took, own = time.time() - t_first, sum(walls)
        print(f"the {len(walls)} runs trained in this call took {took:.0f} s, against the {own:.0f} s of "
              f"their own: {max(own - took, 0):.0f} s of start-ups overlapped the run before", flush=True)
    return logs


def study_balance():
    logs = train_runs("config/train_balance.py", BALANCE_RUNS, balance_dir, balance_args)
    rows = []
    for name, recs in logs.items():
        ev = [r for r in recs if r["kind"] == "eval"]
        tr = [r for r in recs if r["kind"] == "train"]
        late = [r["maxvio_batch"] for r in tr if r["iter"] > tr[-1]["iter"] * 0.75] or [float("nan")]
        tok_s = median_tok_s(tr)
        row = dict(balance=name, val_loss=ev[-1]["val_loss"], maxvio_global=ev[-1]["maxvio_global"],
                   maxvio_batch_last_quarter=sum(late) / len(late), tok_s=tok_s, mfu=tr[-1].get("mfu") if tr else None,
                   tokens=ev[-1]["tokens"])
        rows.append(row)
    print(table(["balance", "final val loss", "MaxVio_global (val)", "MaxVio_batch (last quarter)", "tokens/s (median)"],
          [[r["balance"], f"{r['val_loss']:.4f}", f"{r['maxvio_global']:.3f}", f"{r['maxvio_batch_last_quarter']:.3f}",
            f"{r['tok_s']:,.0f}"] for r in rows]))
    print(f"{rows[0]['tokens']:,} training tokens per run")
    results["balance"] = rows
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, recs in logs.items():
        ev = [r for r in recs if r["kind"] == "eval" and r["iter"] > 0]
        tr = [r for r in recs if r["kind"] == "train"]
        a.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-", ms=3, label=name)
        b.plot([r["tokens"] for r in tr], [r["maxvio_batch"] for r in tr], lw=0.8, label=name)
    a.set(xlabel="training tokens", ylabel="val loss (nats)", title="val loss")
    b.set(xlabel="training tokens", ylabel="MaxVio_batch (mean over MoE layers)", yscale="log",
          title="expert load imbalance")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(title="--balance")
    fig.suptitle(f"config/train_balance.py, same data, tokens and seed ({ran_on(logs)})", fontsize=10)
    save_figure(fig, os.path.join(balance_dir, "balance.png"))


# -----------------------------------------------------------------------------
# multi-token prediction: does it help the main model, how good are its drafts, what does speculation buy


def study_mtp():
    """config/train_balance.py (64 experts, top-6, 2 shared) with mtp_depth 0 and 1, same data, tokens and seed:
    the main head's val loss and the MTP head's; then the MTP checkpoint decodes greedily, plainly and
    speculatively, at batch 1 and 32: acceptance, tokens/s, and whether the tokens are the same."""
    logs = train_runs("config/train_balance.py", {"mtp 0": ["--mtp_depth=0"], "mtp 1": ["--mtp_depth=1"]}, mtp_dir,
                      mtp_args)
    rows = []
    for name, recs in logs.items():
        ev = [r for r in recs if r["kind"] == "eval"]
        tr = [r for r in recs if r["kind"] == "train"]
        rows.append(dict(run=name, val_loss=ev[-1]["val_loss"], mtp_loss=ev[-1].get("val_mtp_loss", [None])[0],
                         mtp_accuracy=ev[-1].get("val_mtp_accuracy", [None])[0], tokens=ev[-1]["tokens"],
                         tok_s=median_tok_s(tr)))
    print(table(["mtp_depth", "val loss (main head)", "val loss (MTP head, token t+2)", "MTP top-1 accuracy",
                 "training tokens/s"],
                [[r["run"][-1], f"{r['val_loss']:.4f}", "-" if r["mtp_loss"] is None else f"{r['mtp_loss']:.4f}",
                  "-" if r["mtp_accuracy"] is None else f"{r['mtp_accuracy']:.3f}", f"{r['tok_s']:,.0f}"]
                 for r in rows]))
    print(f"{rows[0]['tokens']:,} training tokens per run")
    results["mtp"] = dict(training=rows)

    ckpt = torch.load(os.path.join(mtp_dir, "mtp1", "ckpt.pt"), map_location="cpu", weights_only=True)
    model = Model(ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model = cast_weights(model.to(device), torch.bfloat16).eval()  # as sample.py runs it
    val = load_data(ckpt["data"]["dir"]).val
    decoding = []
    for batch in (1, 32):
        starts = np.random.default_rng(seed).integers(0, len(val) - 64, size=batch)
        idx = torch.tensor(np.stack([val[s:s + 64] for s in starts]).astype(np.int64), device=device)
        out = {}
        for mode, kw in [("plain, eager", {}), ("plain, CUDA graph", dict(cuda_graph=True)),
                         ("speculative, eager", dict(speculative=True)),
                         ("speculative, CUDA graphs", dict(speculative=True, cuda_graph=True))]:
            stats = {}
            generate(model, idx, 8, temperature=0, **kw)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = torch.cat(list(generate_stream(model, idx, mtp_new, temperature=0, stats=stats, **kw)), 1)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            out[mode] = tokens
            row = dict(batch=batch, mode=mode, tok_s=batch * mtp_new / seconds,
                       acceptance=stats["accepted"] / stats["drafts"] if stats else None,
                       same=bool(torch.equal(tokens, out["plain, eager"])))
            decoding.append(row)
    print(table(["batch", "decoding (greedy, 64-token prompts from val)", f"tokens/s ({mtp_new} new)",
                 "drafts accepted", "tokens = plain eager"],
                [[r["batch"], r["mode"], f"{r['tok_s']:,.0f}", "-" if r["acceptance"] is None else
                  f"{r['acceptance']:.1%}", "yes" if r["same"] else "no"] for r in decoding]))
    results["mtp"]["decoding"] = decoding
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, recs in logs.items():
        ev = [r for r in recs if r["kind"] == "eval" and r["iter"] > 0]
        ax.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-", ms=3, label=f"{name}: main head")
        if "val_mtp_loss" in ev[-1]:
            ax.plot([r["tokens"] for r in ev], [r["val_mtp_loss"][0] for r in ev], "s--", ms=3,
                    label=f"{name}: MTP head (token t+2)")
    ax.set(xlabel="training tokens", ylabel="val loss (nats)", title=f"config/train_balance.py, mtp_depth 0 vs 1 ({ran_on(logs)})")
    save_figure(fig, os.path.join(mtp_dir, "mtp.png"), ax)


# -----------------------------------------------------------------------------
# the DeepSeekMoE claims: the architecture ablation over seeds, expert specialization, the balancing trade-off

ARCH_CONFIGS = {"gpu": "config/study_gpu.py", "cpu": "config/study_cpu.py"}
# val tokens the specialize section routes per checkpoint (--specialize_tokens=0): 1.6-5.1 s each on an H200,
# 5.4-6.9 s on 2 cores
SPECIALIZE_TOKENS = {"gpu": 1_000_000, "cpu": 131_072}


def arch_arms(cfg):
    """The DeepSeekMoE paper's ablation (arXiv 2401.06066, fine-grained expert segmentation and shared-expert
    isolation) and the shared-expert question OLMoE (arXiv 2409.02060) answers the other way, at the width of cfg
    (a config's settings): {name: train.py overrides}. A segment is the fine-grained expert, cfg's moe_inter_dim;
    every arm spends 8 segments of FFN hidden per token (the dense FFN is 8 segments wide) and every MoE arm holds
    64 segments of experts, shared ones included."""
    seg, n_layer = cfg["moe_inter_dim"], cfg["n_layer"]
    return {
        "dense": dict(n_dense_layers=n_layer, dense_inter_dim=8 * seg),
        "coarse": dict(n_experts=16, top_k=2, n_shared=0, moe_inter_dim=4 * seg),  # GShard / Mixtral style
        "coarse_shared": dict(n_experts=15, top_k=1, n_shared=1, moe_inter_dim=4 * seg),  # + shared-expert isolation
        "fine": dict(n_experts=64, top_k=8, n_shared=0, moe_inter_dim=seg),  # fine-grained, 0 shared (OLMoE)
        "fine_shared1": dict(n_experts=63, top_k=7, n_shared=1, moe_inter_dim=seg),  # 1 shared (the 2B ablation)
        "deepseekmoe": dict(n_experts=62, top_k=6, n_shared=2, moe_inter_dim=seg),  # 2 shared (DeepSeekMoE)
    }


ARCH_LABELS = {"dense": "dense (SwiGLU 8 seg)", "coarse": "coarse: top-2 of 16 x 4 seg",
               "coarse_shared": "coarse + 1 shared: top-1 of 15 x 4 seg", "fine": "fine, 0 shared: top-8 of 64",
               "fine_shared1": "fine, 1 shared: top-7 of 63", "deepseekmoe": "DeepSeekMoE, 2 shared: top-6 of 62"}
# the claims, as paired comparisons (same seed: same initial draw and the same batches): (arm, against, what it asks)
ARCH_CLAIMS = [("deepseekmoe", "dense", "fine-grained + shared beats dense at equal active compute"),
               ("deepseekmoe", "coarse", "fine-grained + shared beats a coarse MoE (GShard / Mixtral)"),
               ("fine", "coarse", "fine-grained segmentation alone beats coarse experts"),
               ("coarse_shared", "coarse", "shared-expert isolation helps coarse experts"),
               ("fine_shared1", "fine", "the shared-expert question: 1 shared vs 0"),
               ("deepseekmoe", "fine", "the shared-expert question: 2 shared vs 0"),
               ("deepseekmoe", "fine_shared1", "the shared-expert question: 2 shared vs 1")]


def arch_config():
    """(config file, its settings on top of ModelConfig's defaults, the dataset the study trains on)."""
    if arch_scale not in ARCH_CONFIGS:
        raise SystemExit(f"--arch_scale must be one of {', '.join(ARCH_CONFIGS)}, got {arch_scale!r}")
    cfg = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)},
           **read_config_file(os.path.join(HERE, ARCH_CONFIGS[arch_scale]))}
    return ARCH_CONFIGS[arch_scale], cfg, dataset or cfg.get("dataset", "shakespeare")


def args_of(overrides):
    return [f"--{k}={v}" for k, v in overrides.items()]


def arm_args(overrides, seed_, data_name, balance=("--balance=bias",)):
    """train.py's arguments for one arm under one seed; the same list in the arch and tradeoff sections, so the
    tradeoff's bias runs are the arch section's DeepSeekMoE runs."""
    return [*balance, f"--seed={seed_}", f"--dataset={data_name}", *args_of(overrides)]


def arch_runs(arms, data_name):
    """{run name: train.py arguments}, every arm under every seed, seed by seed: a study cut short has whole seeds."""
    return {f"{arm}-s{s}": arm_args(o, s, data_name) for s in arch_seeds for arm, o in arms.items()}


def final_row(recs):
    """The numbers of a finished run's log: its last evaluation, the median tokens/s, the tokens trained, the
    training seconds (evaluations and saves excluded) and the warm-up inside them."""
    ev = [r for r in recs if r["kind"] == "eval"]
    tr = [r for r in recs if r["kind"] == "train"]
    return dict(val_loss=ev[-1]["val_loss"], domains=ev[-1].get("val_loss_domain", {}),
                still_falling=len(ev) > 1 and ev[-1]["val_loss"] < ev[-2]["val_loss"],  # not yet overfitting
                maxvio_global=ev[-1].get("maxvio_global"), tokens=ev[-1]["tokens"], tok_s=median_tok_s(tr),
                train_seconds=ev[-1].get("train_seconds", float("nan")), warmup_seconds=warmup_seconds(recs))


def seed_stats(xs):
    """A quantity over seeds: mean, sample standard deviation (n - 1), min, max, n."""
    a = np.asarray(xs, dtype=float)
    return dict(mean=float(a.mean()), std=float(a.std(ddof=1)) if len(a) > 1 else 0.0, min=float(a.min()),
                max=float(a.max()), n=len(a))


def fmt_stats(st, digits=4):
    """'3.6512 ± 0.0120 (3.6400-3.6640)': mean ± std over seeds (min-max)."""
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} ({st['min']:.{digits}f}-{st['max']:.{digits}f})"


def curve(recs, seconds=False):
    """A run's val loss at each evaluation against training tokens, or against training seconds with the first
    steps' warm-up (torch.compile) taken out -> (xs, ys)."""
    ev = [r for r in recs if r["kind"] == "eval"]
    if not seconds:
        return [r["tokens"] for r in ev], [r["val_loss"] for r in ev]
    warm = warmup_seconds(recs)
    return [max(r.get("train_seconds", float("nan")) - (warm if r["iter"] > 0 else 0), 0) for r in ev], \
        [r["val_loss"] for r in ev]


def at(xs, ys, x):
    """ys interpolated at x along the run's evaluations."""
    return float(np.interp(x, xs, ys))


def paired(logs, arm, other, seconds=False):
    """arm's final val loss minus other's, per seed (the same seed: the same initial draw and batches). At equal
    seconds: both curves read at the earlier of the two runs' ends."""
    diffs = []
    for s in arch_seeds:
        (xa, ya), (xb, yb) = curve(logs[f"{arm}-s{s}"], seconds), curve(logs[f"{other}-s{s}"], seconds)
        x = min(xa[-1], xb[-1])
        diffs.append(at(xa, ya, x) - at(xb, yb, x))
    return diffs


def tokens_to_reach(recs, target):
    """The training tokens at which a run's val loss first reaches target, linear between its evaluations; None if
    it never does."""
    xs, ys = curve(recs)
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if y1 <= target:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0) if y0 > target else x0
    return None


def verdict(diffs):
    n = len(diffs)
    if all(d < 0 for d in diffs):
        return f"lower under all {n} seeds"
    if all(d > 0 for d in diffs):
        return f"higher under all {n} seeds"
    return f"signs differ across seeds ({sum(d < 0 for d in diffs)} of {n} lower): not decided"


def arch_counts(cfg, arms, vocab_size):
    """By Model's own count, on the meta device: {name: params, active params, training FLOPs per token, the
    parameters of each MoE layer's experts (routed + shared), the router's FLOPs per token}."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {}
    for n, o in arms.items():
        with torch.device("meta"):
            m = Model(ModelConfig(**{**{k: v for k, v in cfg.items() if k in names}, "vocab_size": vocab_size, **o}))
        experts = sorted({sum(p.numel() for p in layer.experts.parameters()) +
                          sum(p.numel() for p in (layer.shared_experts.parameters() if layer.shared_experts else []))
                          for layer in m.moe_layers()})
        router = 6 * m.config.n_moe_layers * m.config.n_embd * m.config.n_experts if m.moe_layers() else 0
        out[n] = dict(params=m.num_params(), active=m.num_params(active=True), flops=m.flops_per_token(),
                      expert_params=experts, router_flops=router)
    return out


def plot_arch(logs, arms, seconds, path, title):
    """Val loss over training, mean over seeds (line) and min-max (band), one colour per arm."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, arm in enumerate(arms):
        cs = [curve(logs[f"{arm}-s{s}"], seconds) for s in arch_seeds]
        n = min(len(x) for x, _ in cs)
        xs = np.mean([x[1:n] for x, _ in cs], axis=0)  # the evaluation at iter 0 (seconds 0, loss ~ln V) left out
        ys = np.array([y[1:n] for _, y in cs])
        ax.plot(xs, ys.mean(0), "o-", ms=3, color=f"C{i}", label=ARCH_LABELS[arm])
        ax.fill_between(xs, ys.min(0), ys.max(0), color=f"C{i}", alpha=0.2, lw=0)
    ax.set(ylabel=f"val loss (nats), mean and min-max over {len(arch_seeds)} seeds", title=title)
    if seconds:
        ax.set_xlabel("training seconds (evaluations, checkpoints and the compile warm-up excluded)")
    else:
        tokens_axis(ax)
    save_figure(fig, path, ax)


def study_arch():
    config, cfg, data_name = arch_config()
    arms = arch_arms(cfg)
    if arch_dry_run:  # what the arms are, before any training: equal active FLOPs and expert parameters
        counts = arch_counts(cfg, arms, vocab_size=8192)  # the BPE of prepare.py --corpus=mix
        print(table(["arm", "params", "active", "MFLOPs/token (router)", "expert params per MoE layer"],
                    [[ARCH_LABELS[n], f"{c['params']:,}", f"{c['active']:,}",
                      f"{c['flops'] / 1e6:.3f} ({c['router_flops'] / 1e6:.3f})", c["expert_params"]]
                     for n, c in counts.items()]))
        todo = arch_runs(arms, data_name)
        print(f"{len(todo)} runs: {len(arms)} arms x seeds {', '.join(map(str, arch_seeds))}, {config} on "
              f"data/{data_name}")
        results["arch_variants"] = counts
        return
    data = load_data(data_name)
    logs = train_runs(config, arch_runs(arms, data_name), arch_dir, arch_args)
    counts = arch_counts(cfg, arms, data.vocab_size)
    rows = {}
    for arm in arms:
        per_seed = {s: final_row(logs[f"{arm}-s{s}"]) for s in arch_seeds}
        finals = list(per_seed.values())
        domains = list(finals[0]["domains"])
        rows[arm] = dict(label=ARCH_LABELS[arm], seeds=per_seed, **counts[arm],
                         val_loss=seed_stats([r["val_loss"] for r in finals]),
                         domains={d: seed_stats([r["domains"][d] for r in finals]) for d in domains},
                         train_seconds=seed_stats([r["train_seconds"] - r["warmup_seconds"] for r in finals]),
                         warmup_seconds=seed_stats([r["warmup_seconds"] for r in finals]),
                         tok_s=seed_stats([r["tok_s"] for r in finals]),
                         still_falling=sum(r["still_falling"] for r in finals),
                         maxvio_global=None if finals[0]["maxvio_global"] is None else
                         seed_stats([r["maxvio_global"] for r in finals]))
    domains = list(next(iter(rows.values()))["domains"])
    seeds, where = ", ".join(map(str, arch_seeds)), ran_on(logs)
    print(f"\n## DeepSeekMoE architecture study, {config} on data/{data_name} ({where}), seeds {seeds}\n")
    print("final val loss, mean ± std over seeds (min-max); per domain: mean (max - min)\n")
    print(table(["arm", "val loss", *[f"val {d}" for d in domains], "params", "active", "MFLOPs/token",
                 "tokens/s", "training s", "MaxVio_global", "val loss still falling (seeds)"],
                [[r["label"], fmt_stats(r["val_loss"]),
                  *[f"{r['domains'][d]['mean']:.4f} ({r['domains'][d]['max'] - r['domains'][d]['min']:.4f})"
                    for d in domains], f"{r['params'] / 1e6:.2f}M", f"{r['active'] / 1e6:.2f}M",
                  f"{r['flops'] / 1e6:.1f}", f"{r['tok_s']['mean']:,.0f}", f"{r['train_seconds']['mean']:.1f}",
                  "-" if r["maxvio_global"] is None else f"{r['maxvio_global']['mean']:.3f}",
                  f"{r['still_falling']} of {len(arch_seeds)}"] for r in rows.values()]))
    claims = []
    for arm, other, question in ARCH_CLAIMS:
        for axis in ("tokens", "seconds"):
            if axis == "seconds" and other != "dense":
                continue  # equal seconds is what a user pays: asked against the dense model
            diffs = paired(logs, arm, other, seconds=axis == "seconds")
            claims.append(dict(arm=arm, against=other, question=question, axis=axis, diffs=diffs,
                               mean=float(np.mean(diffs)), verdict=verdict(diffs)))
    print("\nthe claims, paired by seed: val loss of the arm minus the other's (negative: the arm is better)\n")
    print(table(["claim", "at equal", "mean difference", "per seed", "verdict"],
                [[c["question"] + f" ({c['arm']} - {c['against']})", "training seconds" if c["axis"] == "seconds"
                  else "tokens", f"{c['mean']:+.4f}", " / ".join(f"{d:+.4f}" for d in c["diffs"]), c["verdict"]]
                 for c in claims]))
    ds, dense = rows["deepseekmoe"], rows["dense"]
    by = {(c["arm"], c["against"], c["axis"]): c for c in claims}
    print(f"\nDeepSeekMoE against dense: at equal tokens {by['deepseekmoe', 'dense', 'tokens']['mean']:+.4f} nats "
          f"({by['deepseekmoe', 'dense', 'tokens']['verdict']}); at equal training seconds "
          f"{by['deepseekmoe', 'dense', 'seconds']['mean']:+.4f} ({by['deepseekmoe', 'dense', 'seconds']['verdict']}), "
          f"its step costing {dense['tok_s']['mean'] / ds['tok_s']['mean']:.2f}x the dense model's "
          f"({ds['tok_s']['mean']:,.0f} vs {dense['tok_s']['mean']:,.0f} tokens/s)")
    # the step ratio at which the two would tie at equal seconds: dense's tokens over those DeepSeekMoE needs to
    # reach dense's final val loss (a step cheaper than that and DeepSeekMoE wins on wall-clock, at this run length)
    reach = [tokens_to_reach(logs[f"deepseekmoe-s{s}"], dense["seeds"][s]["val_loss"]) for s in arch_seeds]
    # None where it ends above the dense run's final loss: no step ratio ties there
    tie = [None if r is None else dense["seeds"][s]["tokens"] / r for s, r in zip(arch_seeds, reach)]
    print(f"DeepSeekMoE reaches the dense run's final val loss after "
          f"{' / '.join('never, in its run' if r is None else f'{r / 1e6:.2f}M' for r in reach)} tokens (per seed, "
          f"linear between evaluations) of the dense run's {dense['seeds'][arch_seeds[0]]['tokens'] / 1e6:.2f}M: at "
          f"equal seconds the two tie where its step costs {' / '.join('-' if t is None else f'{t:.2f}x' for t in tie)}"
          f" the dense one's (measured: {dense['tok_s']['mean'] / ds['tok_s']['mean']:.2f}x)")
    tokens = next(iter(ds["seeds"].values()))["tokens"]
    n_train = data.meta["tokens"]["train"]
    print(f"{tokens:,} training tokens per run ({tokens / n_train:.2f} passes over the {n_train:,} of the train split)")
    results["arch"] = dict(config=config, dataset=data_name, seeds=list(arch_seeds), rows=rows, claims=claims,
                           tokens=tokens, train_tokens=n_train, deepseekmoe_tokens_to_dense_loss=reach,
                           tie_step_ratio=tie)
    title = f"{config} on data/{data_name}, --balance=bias ({where})"
    plot_arch(logs, arms, False, os.path.join(arch_dir, "arch_tokens.png"), title)
    plot_arch(logs, arms, True, os.path.join(arch_dir, "arch_seconds.png"), title)


SPECIALIZE_ARMS = ("deepseekmoe", "coarse")


def specialize_checkpoints():
    """{(arm, seed): the arch run's ckpt.pt} for the arms the specialize section reads."""
    return {(arm, s): os.path.join(run_dir(arch_dir, f"{arm}-s{s}"), "ckpt.pt") for arm in SPECIALIZE_ARMS
            for s in arch_seeds}


@torch.no_grad()
def record_routing(ckpt_path, n_tokens):
    """Run a train.py checkpoint over its data's val (n_tokens of it, or all where val is shorter, in windows of
    block_size spread evenly over val so every domain comes in its share) and record every MoE layer's routed expert
    choices per token -> (domain names, domain of each token, [(N, K) choices per layer], n_experts)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)  # the AdamW moments never read
    model = Model(ModelConfig(**ckpt["model_args"])).to(device).eval()
    model.load_state_dict(ckpt["model"])
    data = load_data(ckpt["data"]["dir"])
    names, domain = val_domains(data.meta)
    T = model.config.block_size
    starts = np.linspace(0, len(data.val) - T, min(n_tokens, len(data.val)) // T).round()
    at_ = starts.astype(np.int64)[:, None] + np.arange(T)  # (windows, T) positions in val
    choices = [[] for _ in model.moe_layers()]
    val = torch.from_numpy(np.asarray(data.val)[at_].astype(np.int64))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with recording_routes(model.moe_layers(), lambda i, ids, _: choices[i].append(ids.cpu())), amp:
        for rows in val.split(32):  # on a GPU under bf16 autocast, as train.py trained and evaluated it
            model(rows.to(device))
    return names, domain[at_].reshape(-1), [torch.cat(c).numpy() for c in choices], model.config.n_experts


def study_specialize():
    rng = np.random.default_rng(seed)
    per_run, panels = [], {}
    for (arm, s), path in specialize_checkpoints().items():
        t0 = time.time()
        names, domain, choices, E = record_routing(path, specialize_tokens or SPECIALIZE_TOKENS[arch_scale])
        shuffled = rng.permutation(domain)  # a router that ignores the domain, with the same counts
        for layer, ch in enumerate(choices):
            counts = routing_counts(ch, domain, len(names), E)
            row = dict(arm=arm, seed=s, layer=layer, tokens=len(domain), experts=E, top_k=ch.shape[1],
                       mi_bits=mutual_information(counts),
                       mi_shuffled_bits=mutual_information(routing_counts(ch, shuffled, len(names), E)),
                       h_domain_bits=mutual_information(np.diag(np.bincount(domain, minlength=len(names)))))
            per_run.append(row)
            panels[arm, s, layer] = (counts, row)
        print(f"  {arm}-s{s}: {len(domain):,} val tokens routed in {time.time() - t0:.1f} s", flush=True)
    rows = []
    n_layers = max(r["layer"] for r in per_run) + 1
    for arm in SPECIALIZE_ARMS:
        for layer in range(n_layers):
            mine = [r for r in per_run if r["arm"] == arm and r["layer"] == layer]
            rows.append(dict(arm=arm, layer=layer, experts=mine[0]["experts"], top_k=mine[0]["top_k"],
                             mi_bits=seed_stats([r["mi_bits"] for r in mine]),
                             mi_shuffled_bits_max=max(r["mi_shuffled_bits"] for r in mine),
                             h_domain_bits=mine[0]["h_domain_bits"], tokens=mine[0]["tokens"]))
    print(f"\n## Expert specialization over data/{arch_config()[2]}'s val ({gpu}): I(domain; chosen expert), bits, "
          f"mean ± std over seeds {', '.join(map(str, arch_seeds))} (min-max)\n")
    print(table(["arm", "MoE layer", "routed experts, top-k", "MI (bits)", "MI, domains shuffled (max)",
                 "H(domain)", "val tokens"],
                [[ARCH_LABELS[r["arm"]], r["layer"], f"{r['experts']}, top-{r['top_k']}", fmt_stats(r["mi_bits"]),
                  f"{r['mi_shuffled_bits_max']:.4f}", f"{r['h_domain_bits']:.3f}", f"{r['tokens']:,}"] for r in rows]))
    results["specialize"] = dict(domains=names, rows=rows, runs=per_run)
    plt = pyplot()
    s = arch_seeds[0]  # experts are not the same experts under another seed: the picture is one seed's
    fig, axes = plt.subplots(n_layers, len(SPECIALIZE_ARMS), figsize=(6.5 * len(SPECIALIZE_ARMS), 1.6 * n_layers + 1.2),
                             squeeze=False, layout="constrained")
    for j, arm in enumerate(SPECIALIZE_ARMS):
        for i in range(n_layers):
            counts, row = panels[arm, s, i]
            mi = next(r["mi_bits"] for r in rows if r["arm"] == arm and r["layer"] == i)
            share = counts / counts.sum(1, keepdims=True) * row["top_k"]  # a domain's tokens that chose each expert
            # experts grouped by the domain they favour most (against their mean share), strongest first
            lift = share / share.mean(0, keepdims=True).clip(1e-12)
            order = sorted(range(share.shape[1]), key=lambda e: (lift[:, e].argmax(), -lift[:, e].max()))
            im = axes[i, j].imshow(share[:, order], aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
            axes[i, j].set_yticks(range(len(names)), names, fontsize=8)
            axes[i, j].set_xticks([])
            axes[i, j].set_title(f"{ARCH_LABELS[arm]}, MoE layer {i}: MI {row['mi_bits']:.3f} bits (seeds: "
                                 f"{mi['mean']:.3f} ± {mi['std']:.3f}; shuffled {row['mi_shuffled_bits']:.4f})",
                                 fontsize=8)
            fig.colorbar(im, ax=axes[i, j], shrink=0.9, label="share")
        axes[-1, j].set_xlabel(f"routed experts, grouped by the domain they favour (seed {s})")
    fig.suptitle(f"which experts each domain's tokens choose (colour: the share of the domain's tokens that chose "
                 f"the expert), data/{arch_config()[2]} val ({gpu})", fontsize=10)
    save_figure(fig, os.path.join(arch_dir, "specialize.png"), dpi=110, tight=False)


def bias_against_curve(rows, aux, s):
    """Seed s's bias run against the aux-loss runs of seed s at the bias's own MaxVio_global: (bias val loss minus
    the curve's, the curve's val loss there), linear between the alphas in log MaxVio; None outside the curve."""
    pts = sorted((math.log(rows[k]["seeds"][s]["maxvio_global"]), rows[k]["seeds"][s]["val_loss"]) for k in aux)
    b = rows["bias"]["seeds"][s]
    x = math.log(b["maxvio_global"])
    if not pts[0][0] <= x <= pts[-1][0]:
        return None
    y = float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))
    return b["val_loss"] - y, y


def study_tradeoff():
    """Wang et al. Figure 1 at the study's scale: the DeepSeekMoE arm with --balance=aux at every alpha, bias and
    none under the first seed; then the bias and the best alpha again under the second. A bias run is the arch
    section's DeepSeekMoE run of that seed (the same arguments): where that one finished, it is read, not trained."""
    config, cfg, data_name = arch_config()
    arm = arch_arms(cfg)["deepseekmoe"]
    kinds = {f"aux{a:g}": ["--balance=aux", f"--aux_alpha={a}"] for a in tradeoff_alphas}
    kinds.update({"bias": ["--balance=bias"], "none": ["--balance=none"]})
    s1, s2 = arch_seeds[:2]
    out = os.path.join(arch_dir, "tradeoff")

    def run(todo):  # {kind: seed} -> logs, the bias runs from the arch section where it has them
        logs, train = {}, {}
        for k, s in todo.items():
            args = arm_args(arm, s, data_name, kinds[k])
            arch_run = run_dir(arch_dir, f"deepseekmoe-s{s}")
            if k == "bias" and (recs := finished_run(arch_run, config, [*args, *arch_args.split()])) is not None:
                print(f"{k}-s{s}: the arch section's run of the same arguments, read from {arch_run}", flush=True)
                logs[f"{k}-s{s}"] = recs
            else:
                train[f"{k}-s{s}"] = args
        return {**logs, **train_runs(config, train, out, arch_args)}

    logs = run({k: s1 for k in kinds})
    best = min((k for k in kinds if k.startswith("aux")), key=lambda k: final_row(logs[f"{k}-s{s1}"])["val_loss"])
    logs.update(run({k: s2 for k in ("bias", best)}))
    rows = {}
    for k in kinds:
        finals = {s: final_row(logs[f"{k}-s{s}"]) for s in (s1, s2) if f"{k}-s{s}" in logs}
        rows[k] = dict(seeds=finals, val_loss=seed_stats([r["val_loss"] for r in finals.values()]),
                       maxvio_global=seed_stats([r["maxvio_global"] for r in finals.values()]),
                       tok_s=seed_stats([r["tok_s"] for r in finals.values()]))
    where = ran_on(logs)
    print(f"\n## Balancing trade-off, {config} (DeepSeekMoE arm) on data/{data_name} ({where}); seed {s2} again "
          f"for bias and the best alpha ({best[3:]})\n")
    print(table(["--balance", f"val loss (seed {s1})", f"seed {s2}", f"MaxVio_global (seed {s1})", f"seed {s2}",
                 "tokens/s"],
                [[k, f"{r['seeds'][s1]['val_loss']:.4f}",
                  f"{r['seeds'][s2]['val_loss']:.4f}" if s2 in r["seeds"] else "-",
                  f"{r['seeds'][s1]['maxvio_global']:.3f}",
                  f"{r['seeds'][s2]['maxvio_global']:.3f}" if s2 in r["seeds"] else "-", f"{r['tok_s']['mean']:,.0f}"]
                 for k, r in rows.items()]))
    diffs = [rows["bias"]["seeds"][s]["val_loss"] - rows[best]["seeds"][s]["val_loss"] for s in (s1, s2)]
    print(f"\nbias against the best alpha ({best[3:]}), paired by seed: val loss "
          f"{' / '.join(f'{d:+.4f}' for d in diffs)} ({verdict(diffs)}); MaxVio_global "
          f"{rows['bias']['maxvio_global']['mean']:.3f} vs {rows[best]['maxvio_global']['mean']:.3f} (mean of both seeds)")
    aux = [k for k in kinds if k.startswith("aux")]
    vs_curve = bias_against_curve(rows, aux, s1)
    if vs_curve is None:
        print(f"the bias's MaxVio_global (seed {s1}) lies outside the aux-loss curve's range: not compared at equal "
              "balance")
    else:
        print(f"at the bias's MaxVio_global ({rows['bias']['seeds'][s1]['maxvio_global']:.3f}, seed {s1}) the "
              f"aux-loss curve's val loss is {vs_curve[1]:.4f} (between its alphas, linear in log MaxVio): the bias "
              f"is {vs_curve[0]:+.4f} against it")
    results["tradeoff"] = dict(config=config, dataset=data_name, best_alpha=float(best[3:]), rows=rows,
                               bias_minus_best_alpha=diffs,
                               bias_minus_aux_curve=None if vs_curve is None else vs_curve[0])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([rows[k]["seeds"][s1]["maxvio_global"] for k in aux], [rows[k]["seeds"][s1]["val_loss"] for k in aux],
            "o-", color="C0", label=f"aux loss, alpha {', '.join(k[3:] for k in aux)}")
    for k in aux:
        ax.annotate(k[3:], (rows[k]["seeds"][s1]["maxvio_global"], rows[k]["seeds"][s1]["val_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    for k, marker, color in ((best, "o", "C0"), ("bias", "*", "C1"), ("none", "x", "C2")):
        for s, r in rows[k]["seeds"].items():
            if k != best or s != s1:
                fill = dict(color=color) if s == s1 else dict(facecolors="none", edgecolors=color)  # seed 2 hollow
                ax.scatter(r["maxvio_global"], r["val_loss"], s=60, marker=marker, **fill,
                           label=f"{k}, seed {s}" if k != best else f"alpha {best[3:]}, seed {s}")
    ax.set(xscale="log", xlabel="MaxVio_global (val)", ylabel="val loss (nats)",
           title=f"aux-loss alpha vs loss-free bias, {config}\n({where})")
    save_figure(fig, os.path.join(out, "tradeoff.png"), ax)


def check_settings(names):
    """The study's arguments that no run can repair, one line each, before any run."""
    if not {"arch", "specialize", "tradeoff"} & set(names) or arch_dry_run and names == ["arch"]:
        return
    _, _, data_name = arch_config()
    if not os.path.isfile(os.path.join(data_dir(data_name), "meta.json")):
        raise SystemExit(f"study.py: no {data_dir(data_name)} to train on (--dataset={data_name}): build it first, "
                         f"e.g. python prepare.py --corpus={data_name}")
    if ("specialize" in names or "arch" in names and not arch_dry_run) and \
            val_domains(load_data(data_name).meta) is None:
        raise SystemExit(f"study.py: data/{data_name} has no domains: the arch and specialize sections report per "
                         "domain; build a corpus with domains (python prepare.py --corpus=mix)")
    if "specialize" in names and "arch" not in names:
        missing = [p for p in specialize_checkpoints().values() if not os.path.isfile(p)]
        if missing:
            raise SystemExit(f"study.py --sections=specialize: no {missing[0]} ({len(missing)} of "
                             f"{len(specialize_checkpoints())} checkpoints missing): run --sections=arch first "
                             f"(with the same --arch_scale, --arch_dir and --arch_seeds)")


# -----------------------------------------------------------------------------
SECTIONS = dict(balance=study_balance, mtp=study_mtp, arch=study_arch, specialize=study_specialize,
                tradeoff=study_tradeoff)
DOMAINS = {"arch_seeds": ("a tuple of 3 or more distinct seeds (ints >= 0): every arm trains under each, and the "
                          "spread over them is the noise the claims are judged against",
                          lambda v: len(v) >= 3 and len(set(v)) == len(v) and all(type(s) is int and s >= 0
                                                                                   for s in v)),
           "tradeoff_alphas": ("a tuple of 4 or more aux-loss weights in (0, 1] (--balance=none is the alpha-0 run, "
                               "which the section makes anyway)",
                               lambda v: len(v) >= 4 and all(type(a) in (int, float) and 0 < a <= 1 for a in v)),
           "runs": one_of("train", "reuse", "read"), "arch_scale": one_of(*ARCH_CONFIGS),
           "specialize_tokens": at_least(0), "stop_after": at_least(0), "overlap": one_of("auto", "on", "off")}


def main(argv):
    global arch_dir, overlap
    configure(settings, argv, domains=DOMAINS)
    globals().update(settings)
    arch_dir = arch_dir or f"out/arch-{arch_scale}"
    overlap = overlap == "on" or overlap == "auto" and device.type == "cuda"  # now whether it does
    names = [s.strip() for s in sections.split(",")]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"study.py: no section {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    if "mtp" in names and device.type != "cuda":
        raise SystemExit("study.py --sections=mtp needs a CUDA GPU (its decoding half times CUDA graphs)")
    check_settings(names)
    results["settings"] = settings
    print(f"device: {gpu} | torch {torch.__version__}")
    run_sections(SECTIONS, names, results, json_path)


if __name__ == "__main__":
    main(sys.argv[1:])
