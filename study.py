"""
The training studies: each drives train.py over a few variants (same data, tokens and seed unless a study says
otherwise), reads their log.jsonl and draws one picture. They measure loss, not speed (speed is bench.py). Prints
markdown tables (the device first) and writes every number to json_path.

    python study.py --sections=balance               # four train.py runs: bias vs aux loss vs none
    python study.py --sections=mtp                   # mtp_depth 0 vs 1, then speculative decoding (GPU)
    python study.py --sections=arch,specialize       # five architectures on data/mix, then which experts each domain uses
    python study.py --sections=arch,specialize --arch_scale=cpu   # the same at CPU size: minutes on 2 cores
    python study.py --sections=tradeoff              # aux-loss alpha sweep vs bias vs none: val loss vs MaxVio_global

Sections:
  balance  the load-balancing ablation of train.py (config/train_balance.py, same data, tokens and seed):
           --balance=bias vs aux (alpha 0.01, 0.001) vs none; final val loss, MaxVio_global, tokens/s, and
           balance_dir/balance.png (val loss and MaxVio over training, the four runs overlaid)
  mtp      two train.py runs (config/train_balance.py, mtp_depth 0 and 1): the main head's val loss, the MTP
           head's loss and accuracy, mtp_dir/mtp.png; then greedy decoding of the MTP checkpoint, plain (eager and
           CUDA graph) and speculative, at batch 1 and 32: tokens/s, drafts accepted, the same tokens or not
  arch     the DeepSeekMoE ablation (arXiv 2401.06066; arch_variants below): dense vs coarse top-2 of 16 vs 1 shared
           + top-1 of 15 vs fine-grained 2 shared + top-6 of 62 vs fine-grained top-8 of 64, same active FFN width
           and total expert parameters, --balance=bias, on data/mix with config/train_arch.py (arch_scale=gpu) or
           config/train_arch_cpu.py (cpu); then a second seed for the best two; val loss overall and per domain,
           parameters, tokens/s, MaxVio_global, and arch_dir/arch.png (val loss against tokens)
  specialize  the arch section's fine-grained and coarse checkpoints over data/mix's val: the share of each domain's
           tokens each routed expert receives, per MoE layer (arch_dir/specialize.png), and the mutual information
           between domain and chosen expert in bits, next to the same counts with the domains shuffled
  tradeoff the balancing trade-off (Wang et al. arXiv 2408.15664, Figure 1): the arch config's fine-grained model
           with --balance=aux at tradeoff_alphas, bias and none; val loss against MaxVio_global
           (arch_dir/tradeoff.png)
Every study but mtp (its decoding half needs a CUDA GPU) runs on a CPU at its CPU scale.
"""
import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import torch

from configurator import configure, read_config_file, settings_of
from data import load_data, val_domains
from generate import generate, generate_stream
from logs import last_run, pyplot, read_log, run_sections, save_figure, table
from model import Model, ModelConfig, cast_weights
from moe import mutual_information, recording_routes, routing_counts

# -----------------------------------------------------------------------------
# settings (configurator.py: --key=value)
sections = "balance"             # comma-separated: balance, mtp, arch, specialize, tradeoff
json_path = "out/study.json"     # every number measured
balance_dir = "out/balance"      # the balance section's runs (one train.py out_dir each) and balance.png
balance_args = ""                # extra train.py arguments for every balance run, e.g. "--max_iters=400"
mtp_dir = "out/mtp"              # the mtp section's two runs and mtp.png
mtp_args = ""                    # extra train.py arguments for both mtp runs
mtp_new = 256                    # tokens decoded per sample in the mtp section
arch_scale = "gpu"               # arch, specialize, tradeoff: "gpu" (config/train_arch.py) or "cpu" (.._cpu.py)
arch_dir = ""                    # their runs (one train.py out_dir each) and pictures; "" = out/arch-ARCH_SCALE
arch_args = ""                   # extra train.py arguments for every arch and tradeoff run
arch_seeds = (1337, 1338)        # every variant runs with the first; the best two again with the second
arch_dry_run = False             # arch: print each variant's parameters and FLOPs per token, train nothing
specialize_tokens = 0            # val tokens the specialize section routes per checkpoint; 0 = all of val
tradeoff_alphas = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)  # aux_alpha of the tradeoff section's --balance=aux runs
seed = 0
settings = settings_of(globals())
HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"no GPU ({os.cpu_count()} CPU cores)"
results = dict(device=gpu, torch=torch.__version__)


# -----------------------------------------------------------------------------
# the load-balancing ablation: four train.py runs, one table, one picture

BALANCE_RUNS = {"bias": ["--balance=bias"], "aux 0.01": ["--balance=aux", "--aux_alpha=0.01"],
                "aux 0.001": ["--balance=aux", "--aux_alpha=0.001"], "none": ["--balance=none"]}


def run_dir(out_root, name):
    return os.path.join(out_root, name.replace(" ", ""))


def median_tok_s(train_records):
    """The median tokens/s of a run's log lines, the first (compilation, warm-up) left out; nan with none logged
    (a run shorter than its log_interval)."""
    rates = sorted(r["tok_s"] for r in train_records[1:]) or [r["tok_s"] for r in train_records]
    return rates[len(rates) // 2] if rates else float("nan")


def train_runs(config, runs, out_root, extra):
    """One train.py run per entry of runs {name: [arguments]} on top of config, each in out_root/name, one after
    the other; returns {name: that run's log.jsonl records}. A run that fails stops the study with its last line."""
    logs, t_start = {}, time.time()
    for k, (name, args) in enumerate(runs.items()):
        out_dir = run_dir(out_root, name)
        cmd = [sys.executable, TRAIN, os.path.join(HERE, config), *args, f"--out_dir={out_dir}", "--overwrite",
               *extra.split()]  # a study run again replaces its own runs
        print(f"[{k + 1}/{len(runs)}] $ python " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise SystemExit(f"study.py: the {name!r} run failed: {last}")
        logs[name] = last_run(read_log(os.path.join(out_dir, "log.jsonl")))  # log.jsonl keeps earlier runs too
        elapsed = time.time() - t_start
        eta = elapsed / (k + 1) * (len(runs) - k - 1)
        print(f"  {time.time() - t0:.0f} s (study {elapsed:.0f} s so far, about {eta:.0f} s to go)", flush=True)
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
    fig.suptitle(f"config/train_balance.py, same data, tokens and seed ({gpu})", fontsize=10)
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
    ax.set(xlabel="training tokens", ylabel="val loss (nats)", title=f"config/train_balance.py, mtp_depth 0 vs 1 ({gpu})")
    save_figure(fig, os.path.join(mtp_dir, "mtp.png"), ax)


# -----------------------------------------------------------------------------
# the DeepSeekMoE claims: the architecture ablation, expert specialization, the balancing trade-off

ARCH_CONFIGS = {"gpu": "config/train_arch.py", "cpu": "config/train_arch_cpu.py"}


def arch_variants(cfg):
    """The DeepSeekMoE paper's ablation (arXiv 2401.06066, fine-grained expert segmentation and shared-expert
    isolation) at the width of cfg (a config's settings): {name: train.py overrides}. A segment is the
    fine-grained expert, cfg's moe_inter_dim; every variant spends 8 segments of FFN hidden per token (the dense
    FFN is 8 segments wide) and every MoE variant holds 64 segments of experts, shared ones included."""
    seg, n_layer = cfg["moe_inter_dim"], cfg["n_layer"]
    return {
        "dense": dict(n_dense_layers=n_layer, dense_inter_dim=8 * seg),
        "coarse": dict(n_experts=16, top_k=2, n_shared=0, moe_inter_dim=4 * seg),  # GShard / Mixtral style
        "shared": dict(n_experts=15, top_k=1, n_shared=1, moe_inter_dim=4 * seg),  # + shared-expert isolation
        "deepseekmoe": dict(n_experts=62, top_k=6, n_shared=2, moe_inter_dim=seg),  # fine-grained + shared
        "fine": dict(n_experts=64, top_k=8, n_shared=0, moe_inter_dim=seg),  # fine-grained, no shared expert
    }


ARCH_LABELS = {"dense": "dense (SwiGLU 8 seg)", "coarse": "coarse: top-2 of 16 x 4 seg",
               "shared": "1 shared + top-1 of 15 x 4 seg", "deepseekmoe": "DeepSeekMoE: 2 shared + top-6 of 62",
               "fine": "fine: top-8 of 64"}


def arch_config():
    if arch_scale not in ARCH_CONFIGS:
        raise SystemExit(f"--arch_scale must be one of {', '.join(ARCH_CONFIGS)}, got {arch_scale!r}")
    return ARCH_CONFIGS[arch_scale], {**{f.name: f.default for f in dataclasses.fields(ModelConfig)},
                                      **read_config_file(os.path.join(HERE, ARCH_CONFIGS[arch_scale]))}


def args_of(overrides):
    return [f"--{k}={v}" for k, v in overrides.items()]


def final_row(recs):
    """The numbers of a finished run's log: its last evaluation, the median tokens/s, the tokens trained."""
    ev = [r for r in recs if r["kind"] == "eval"]
    tr = [r for r in recs if r["kind"] == "train"]
    return dict(val_loss=ev[-1]["val_loss"], domains=ev[-1].get("val_loss_domain", {}),
                maxvio_global=ev[-1].get("maxvio_global"), tokens=ev[-1]["tokens"],
                tok_s=median_tok_s(tr))


def variant_counts(cfg, variants, vocab_size):
    """By Model's own count, on the meta device: {name: params, active params, training FLOPs per token, the
    parameters of each MoE layer's experts (routed + shared), the router's FLOPs per token}."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {}
    for n, o in variants.items():
        with torch.device("meta"):
            m = Model(ModelConfig(**{**{k: v for k, v in cfg.items() if k in names}, "vocab_size": vocab_size, **o}))
        experts = sorted({sum(p.numel() for p in layer.experts.parameters()) +
                          sum(p.numel() for p in (layer.shared_experts.parameters() if layer.shared_experts else []))
                          for layer in m.moe_layers()})
        router = 6 * m.config.n_moe_layers * m.config.n_embd * m.config.n_experts if m.moe_layers() else 0
        out[n] = dict(params=m.num_params(), active=m.num_params(active=True), flops=m.flops_per_token(),
                      expert_params=experts, router_flops=router)
    return out


def study_arch():
    config, cfg = arch_config()
    variants = arch_variants(cfg)
    s1, s2 = arch_seeds
    if arch_dry_run:  # what the arms are, before any training: equal active FLOPs and expert parameters
        counts = variant_counts(cfg, variants, vocab_size=8192)  # the BPE of prepare.py --corpus=mix
        print(table(["variant", "params", "active", "MFLOPs/token (router)", "expert params per MoE layer"],
                    [[ARCH_LABELS[n], f"{c['params']:,}", f"{c['active']:,}",
                      f"{c['flops'] / 1e6:.3f} ({c['router_flops'] / 1e6:.3f})", c["expert_params"]]
                     for n, c in counts.items()]))
        results["arch_variants"] = counts
        return
    logs = train_runs(config, {n: ["--balance=bias", f"--seed={s1}", *args_of(o)] for n, o in variants.items()},
                      arch_dir, arch_args)
    rows = {n: final_row(recs) for n, recs in logs.items()}
    best = sorted(rows, key=lambda n: rows[n]["val_loss"])[:2]  # the two that decide the ranking: a second seed
    logs2 = train_runs(config, {f"{n} seed2": ["--balance=bias", f"--seed={s2}", *args_of(variants[n])]
                                for n in best}, arch_dir, arch_args)
    for n in best:
        rows[n]["val_loss_seed2"] = final_row(logs2[f"{n} seed2"])["val_loss"]
    for n, counts in variant_counts(cfg, variants, load_data(cfg["dataset"]).vocab_size).items():
        rows[n].update(params=counts["params"], active=counts["active"], flops=counts["flops"])
    domains = list(next(iter(rows.values()))["domains"])
    print(f"\n## DeepSeekMoE architecture ablation, {config} on data/{cfg['dataset']} ({gpu})\n")
    print(table(["variant", f"val loss (seed {s1})", f"seed {s2}", *[f"val {d}" for d in domains], "params",
                 "active", "MFLOPs/token", "tokens/s", "MaxVio_global"],
                [[ARCH_LABELS[n], f"{r['val_loss']:.4f}",
                  f"{r['val_loss_seed2']:.4f}" if "val_loss_seed2" in r else "-",
                  *[f"{r['domains'][d]:.4f}" for d in domains], f"{r['params'] / 1e6:.2f}M",
                  f"{r['active'] / 1e6:.2f}M", f"{r['flops'] / 1e6:.1f}", f"{r['tok_s']:,.0f}",
                  "-" if r["maxvio_global"] is None else f"{r['maxvio_global']:.3f}"] for n, r in rows.items()]))
    tokens = next(iter(rows.values()))["tokens"]
    n_train = load_data(cfg["dataset"]).meta["tokens"]["train"]
    print(f"{tokens:,} training tokens per run ({tokens / n_train:.2f} passes over the {n_train:,} of the train "
          f"split); seed {s2} rerun for: {', '.join(best)}")
    results["arch"] = dict(config=config, rows=rows, tokens=tokens, train_tokens=n_train)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for n, recs in {**logs, **logs2}.items():
        ev = [r for r in recs if r["kind"] == "eval" and r["iter"] > 0]
        base = n.replace(" seed2", "")
        ax.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-" if base == n else "s--", ms=3,
                color=f"C{list(variants).index(base)}", label=ARCH_LABELS[base] + (f" (seed {s2})" if base != n else ""))
    ax.set(xlabel="training tokens", ylabel="val loss (nats)", title=f"{config}, --balance=bias ({gpu})")
    save_figure(fig, os.path.join(arch_dir, "arch.png"), ax)


@torch.no_grad()
def record_routing(ckpt_path, n_tokens):
    """Run a train.py checkpoint over its data's val (n_tokens of it, 0 = all, in windows of block_size spread
    evenly over val so every domain comes in its share) and record every MoE
    layer's routed expert choices per token -> (domain names, domain of each token, [(N, K) choices per layer],
    n_experts)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = Model(ModelConfig(**ckpt["model_args"])).to(device).eval()
    model.load_state_dict(ckpt["model"])
    data = load_data(ckpt["data"]["dir"])
    names, domain = val_domains(data.meta)
    T = model.config.block_size
    starts = np.linspace(0, len(data.val) - T, min(n_tokens or len(data.val), len(data.val)) // T).round()
    at = starts.astype(np.int64)[:, None] + np.arange(T)  # (windows, T) positions in val
    choices = [[] for _ in model.moe_layers()]
    val = torch.from_numpy(np.asarray(data.val)[at].astype(np.int64))
    with recording_routes(model.moe_layers(), lambda i, ids, _: choices[i].append(ids.cpu())):
        for rows in val.split(32):
            model(rows.to(device))
    return names, domain[at].reshape(-1), [torch.cat(c).numpy() for c in choices], model.config.n_experts


def study_specialize():
    runs = {"deepseekmoe": ARCH_LABELS["deepseekmoe"], "coarse": ARCH_LABELS["coarse"]}
    rng = np.random.default_rng(seed)
    out, panels = [], {}
    for run, label in runs.items():
        names, domain, choices, E = record_routing(os.path.join(arch_dir, run, "ckpt.pt"), specialize_tokens)
        shuffled = rng.permutation(domain)  # a router that ignores the domain, with the same counts
        for layer, ch in enumerate(choices):
            counts = routing_counts(ch, domain, len(names), E)
            row = dict(run=run, layer=layer, tokens=len(domain), experts=E, top_k=ch.shape[1],
                       mi_bits=mutual_information(counts),
                       mi_shuffled_bits=mutual_information(routing_counts(ch, shuffled, len(names), E)),
                       h_domain_bits=mutual_information(np.diag(np.bincount(domain, minlength=len(names)))))
            out.append(row)
            panels[run, layer] = (counts, row)
    print(f"\n## Expert specialization over data/mix's val ({gpu}): I(domain; chosen expert), bits\n")
    print(table(["checkpoint", "MoE layer", "routed experts, top-k", "MI (bits)", "MI, domains shuffled",
                 "H(domain)", "val tokens"],
                [[runs[r["run"]], r["layer"], f"{r['experts']}, top-{r['top_k']}", f"{r['mi_bits']:.4f}",
                  f"{r['mi_shuffled_bits']:.4f}", f"{r['h_domain_bits']:.3f}", f"{r['tokens']:,}"] for r in out]))
    results["specialize"] = dict(domains=names, rows=out)
    plt = pyplot()
    n_layers = max(layer for _, layer in panels) + 1
    fig, axes = plt.subplots(n_layers, len(runs), figsize=(6.5 * len(runs), 1.6 * n_layers + 1.2), squeeze=False,
                             layout="constrained")
    for j, run in enumerate(runs):
        for i in range(n_layers):
            counts, row = panels[run, i]
            share = counts / counts.sum(1, keepdims=True) * row["top_k"]  # a domain's tokens that chose each expert
            # experts grouped by the domain they favour most (against their mean share), strongest first
            lift = share / share.mean(0, keepdims=True).clip(1e-12)
            order = sorted(range(share.shape[1]), key=lambda e: (lift[:, e].argmax(), -lift[:, e].max()))
            im = axes[i, j].imshow(share[:, order], aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
            axes[i, j].set_yticks(range(len(names)), names, fontsize=8)
            axes[i, j].set_xticks([])
            axes[i, j].set_title(f"{runs[run]}, MoE layer {i}: MI {row['mi_bits']:.3f} bits "
                                 f"(shuffled {row['mi_shuffled_bits']:.4f})", fontsize=8)
            fig.colorbar(im, ax=axes[i, j], shrink=0.9, label="share of the domain's tokens")
        axes[-1, j].set_xlabel("routed experts, grouped by the domain they favour")
    fig.suptitle(f"which experts each domain's tokens choose, data/mix val ({gpu})", fontsize=10)
    save_figure(fig, os.path.join(arch_dir, "specialize.png"), dpi=110, tight=False)


def study_tradeoff():
    config, cfg = arch_config()
    base = ["--seed=%d" % arch_seeds[0], *args_of(arch_variants(cfg)["deepseekmoe"])]
    runs = {f"aux {a:g}": [*base, "--balance=aux", f"--aux_alpha={a}"] for a in tradeoff_alphas}
    runs.update({"bias": [*base, "--balance=bias"], "none": [*base, "--balance=none"]})
    logs = train_runs(config, runs, os.path.join(arch_dir, "tradeoff"), arch_args)
    rows = {n: final_row(recs) for n, recs in logs.items()}
    print(f"\n## Balancing trade-off, {config} (fine-grained + shared) on data/{cfg['dataset']} ({gpu})\n")
    print(table(["--balance", "val loss", "MaxVio_global", "tokens/s"],
                [[n, f"{r['val_loss']:.4f}", f"{r['maxvio_global']:.3f}", f"{r['tok_s']:,.0f}"]
                 for n, r in rows.items()]))
    results["tradeoff"] = rows
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (n, r) in enumerate(rows.items()):
        ax.scatter(r["maxvio_global"], r["val_loss"], s=40, marker="*" if n == "bias" else "o", color=f"C{i}", label=n)
    ax.set(xscale="log", xlabel="MaxVio_global (val)", ylabel="val loss (nats)",
           title=f"aux-loss alpha vs loss-free bias ({gpu})")
    save_figure(fig, os.path.join(arch_dir, "tradeoff.png"), ax)

# -----------------------------------------------------------------------------
SECTIONS = dict(balance=study_balance, mtp=study_mtp, arch=study_arch, specialize=study_specialize,
                tradeoff=study_tradeoff)


def main(argv):
    global arch_dir
    configure(settings, argv)
    globals().update(settings)
    arch_dir = arch_dir or f"out/arch-{arch_scale}"
    names = [s.strip() for s in sections.split(",")]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"study.py: no section {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    if "mtp" in names and device.type != "cuda":
        raise SystemExit("study.py --sections=mtp needs a CUDA GPU (its decoding half times CUDA graphs)")
    results["settings"] = settings
    print(f"device: {gpu} | torch {torch.__version__}")
    run_sections(SECTIONS, names, results, json_path)


if __name__ == "__main__":
    main(sys.argv[1:])
