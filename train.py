"""
Train nanoseek on one GPU, several (DDP or FSDP2) or the CPU: nanoGPT's loop plus DeepSeek's expert balancing.

    python prepare.py                                    # data/shakespeare, once
    python train.py                                      # the CPU default: a few minutes on 2 cores
    python train.py config/train_small.py --compile      # the GPU "small" reference config (README, "The config")
    torchrun --standalone --nproc_per_node=8 train.py config/train_small.py --gradient_accumulation_steps=8
    torchrun --standalone --nproc_per_node=8 train.py --init_from=path/to/hf_folder --fsdp=True  # sharded (FSDP2)
    python train.py --n_experts=64 --top_k=6 --n_shared=2 --balance=aux --aux_alpha=0.001
    python train.py --init_from=resume --max_iters=4000  # continue out/ckpt.pt where it stopped, on its lr schedule
    python train.py --init_from=path/to/hf_folder --dataset=NAME  # fine-tune a DeepSeek-format checkpoint

Settings are the module-level defaults below, then config/*.py files and --key=value in the order given
(configurator.py; `python train.py --help` lists them); every ModelConfig field is one, with model.py's default.
The resolved settings are printed at start and saved in the checkpoint. Writes out_dir/ckpt.pt (sample.py reads
it), out_dir/log.jsonl, out_dir/loss.png, out_dir/expert_load.png, each whole or not at all; log.jsonl is appended
to. A bad input ends the run with one line (README, "Failure behaviour").

Load balancing (--balance):
  bias  auxiliary-loss-free (Wang et al. arXiv 2408.15664 Algorithm 1; DeepSeek-V3 section 2.1.2): after every
        optimizer step, with c_i the tokens routed to expert i by that step's training forward passes (all
        micro-batches, all ranks), b_i += bias_update_rate * sign(mean(c) - c_i). No gradient touches b.
  aux   the classic auxiliary loss aux_alpha * sum_i f_i P_i over the batch (DeepSeekMoE eq. 12)
  none  neither: the router is free to collapse onto a few experts
seq_aux_alpha (V3's complementary sequence-wise loss) works with any of them. MaxVio (Wang et al. eq. 6) measures
the result: MaxVio_batch over each training step's tokens, MaxVio_global over all the evaluation batches of val.
"""
import collections
import dataclasses
import json
import math
import os
import sys
import textwrap
import time
import uuid
from contextlib import nullcontext

T_PROCESS = time.time()  # the start-up seconds (imports, data, model, optimizer) are counted from here

from errors import quiet_exits

quiet_exits()  # before the slow imports: a Ctrl-C during them, a closed pipe or a full stdout is one line or none
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hf
import gpu_kernels
import parallel
from configurator import a_device, at_least, between, configure, one_of, settings_of
from data import data_dir, load_data, tokenizer_identity, val_domains
from errors import atomic_write, debugging, error_text, fail, hold_lock, release_locks
from logs import draw_plots, open_log
from model import DTYPES, Model, ModelConfig, clipped_step
from moe import max_vio, recording_routes
from system import ThreadFollower, machine_name, memory_problem, peak_flops, pick_threads

T_IMPORTED = time.time()  # the start-up's parts (the start record's startup_parts) end at T_IMPORTED, T_DATA, ...

# -----------------------------------------------------------------------------
# settings; the defaults train ModelConfig's default model on data/shakespeare in a few minutes on a 2-core CPU
# I/O
out_dir = "out"                  # ckpt.pt, log.jsonl and the plots go here
eval_interval = 100              # iters between evaluations (and checkpoints); the last iter is always evaluated
log_interval = 10                # iters between log lines
eval_iters = 10                  # batches per split in an evaluation (the same batches every time)
eval_only = False                # evaluate once and exit
always_save_checkpoint = True    # save at every evaluation; False: only when val loss improves
save_last_only = False           # save at the last iter only (study.py: its runs' checkpoints are read at the end)
init_from = "scratch"            # "scratch"; "resume" from out_dir/ckpt.pt (continues exactly); or a DeepSeek /
                                 # Hugging Face folder (config.json + *.safetensors) to fine-tune
overwrite = False                # a new run may replace another run's out_dir/ckpt.pt (at its first save)
plot = True                      # draw out_dir/loss.png and expert_load.png at the end (needs matplotlib)
plot_only = False                # only redraw the plots from out_dir/log.jsonl, train nothing
wandb_log = False                # also log to Weights & Biases (only if wandb is installed)
wandb_project = "nanoseek"
wandb_run_name = "run"
# data
dataset = "shakespeare"          # data_root/NAME written by prepare.py, or a path to such a folder
data_root = "data"
batch_size = 16                  # sequences per micro-batch (per rank)
gradient_accumulation_steps = 1  # micro-batches per optimizer step, summed over all ranks
# model: every ModelConfig field is a setting, with its default from model.py
for _f in dataclasses.fields(ModelConfig):
    globals()[_f.name] = _f.default
vocab_size = None                # None: the data's vocabulary (prepare.py's meta.json)
aux_alpha = 0.01                 # the auxiliary-loss weight of --balance=aux (the model gets 0 with bias or none)
# load balancing
balance = "bias"                 # "bias" (aux-loss-free), "aux" (classic auxiliary loss), "none"
bias_update_rate = 1e-3          # gamma: the bias step per optimizer step (V3, Wang et al.: 0.001)
# AdamW and the learning-rate schedule (linear warmup, cosine decay to min_lr)
learning_rate = 2e-3
max_iters = 400
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                  # clip the global gradient norm to this; 0 = off
moments_dtype = "float32"        # AdamW's two moments: "float32", or "bfloat16" as DeepSeek-V3 keeps them (§3.3.3):
                                 # 4 bytes less per parameter in memory and checkpoints, 8 less per step's traffic
decay_lr = True
warmup_iters = 30
lr_decay_iters = None            # None: max_iters
min_lr = None                    # None: learning_rate / 10
# system
device = "auto"                  # "auto": cuda if available, else cpu; or "cpu", "cuda", "cuda:1", ...
dtype = "auto"                   # "auto": bfloat16 autocast on CUDA, float32 on CPU; or float32/bfloat16/float16
compile = False                  # torch.compile the model (the uncompiled module is what gets saved)
compile_blocks = False           # with compile: compile each transformer block on its own (torchtitan's way), and
                                 # the head with its loss (Model.head_and_loss), instead of the whole model;
                                 # identical blocks share one compilation, so a run waits a fraction of the time
fsdp = False                     # under torchrun: shard weights, gradients and AdamW's moments over the ranks (FSDP2,
                                 # parallel.py) instead of replicating them (DDP); the same ckpt.pt either way
threads = 0                      # CPU: torch threads; 0 = OMP_NUM_THREADS if set, else one per free physical core
seed = 1337
# -----------------------------------------------------------------------------
settings = settings_of(globals())
# every setting's type: its default's, or for the None defaults ModelConfig's annotation or this
setting_types = {f.name: f.type for f in dataclasses.fields(ModelConfig)} | {"lr_decay_iters": int, "min_lr": float}
# the values a setting may take, checked for config files and the command line alike (ModelConfig checks its own)
setting_domains = {
    "balance": one_of("bias", "aux", "none"), "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "moments_dtype": one_of("float32", "bfloat16"),
    "device": a_device(allow_auto=True), "seed": between(0, 2**63 - 1),
    "beta1": between(0, 1, open_high=True), "beta2": between(0, 1, open_high=True),
    **{k: at_least(1) for k in ("batch_size", "gradient_accumulation_steps", "eval_iters", "log_interval",
                                "eval_interval")},
    **{k: at_least(0) for k in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr",
                                "weight_decay", "grad_clip", "bias_update_rate", "aux_alpha", "threads")},
}
given = configure(settings, sys.argv[1:], setting_types, setting_domains)  # the names the arguments set
globals().update(settings)
model_fields = [f.name for f in dataclasses.fields(ModelConfig)]
# -----------------------------------------------------------------------------

# settings that no config can repair, one line each, before any work
if init_from not in ("scratch", "resume") and not os.path.isfile(os.path.join(init_from, "config.json")):
    fail(f"--init_from must be scratch, resume or a folder with config.json + *.safetensors, got {init_from!r}")
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    fail(f"--out_dir={out_dir} is a file, not a folder: pick another --out_dir")
if not out_dir:
    fail("--out_dir is empty: name a folder, e.g. --out_dir=out")
if compile_blocks and not compile:
    fail("--compile_blocks says how --compile compiles: add --compile (or drop --compile_blocks)")

# one run per out_dir: the lock is held until this process ends; a second run names the holder and exits here,
# before it reads or writes anything of the folder (README, "Failure behaviour")
if int(os.environ.get("RANK", 0)) == 0:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out_dir={out_dir} ({error_text(e)}): pick a folder you can write")
    out_dir_lock = hold_lock(out_dir)
    for _name in os.listdir(out_dir):  # temp files of killed runs (atomic_write's, named by process): ours now
        if ".tmp-" in _name and _name.split(".tmp-")[0] in ("ckpt.pt", "log.jsonl", "loss.png", "expert_load.png"):
            os.remove(os.path.join(out_dir, _name))

if plot_only:
    if not os.path.isfile(os.path.join(out_dir, "log.jsonl")):
        fail(f"{out_dir}/log.jsonl is not a regular file: nothing to plot" if os.path.exists(
            os.path.join(out_dir, "log.jsonl")) else f"no {out_dir}/log.jsonl to plot: train first")
    problem = draw_plots(out_dir)
    if problem:
        fail(problem)
    sys.exit()

# study.py starts each run's process while the run before it trains, so the imports above overlap that run instead
# of adding to the study's time: with NANOSEEK_START_AFTER=PATH the run waits here, before it reads its data or
# touches the GPU, until the file PATH exists (or its parent is gone). The wait is not start-up (start record).
T_WAIT = time.time()
_gate = os.environ.get("NANOSEEK_START_AFTER")
if _gate:
    _parent = os.getppid()
    while not os.path.exists(_gate):
        if os.getppid() != _parent:
            fail("the study that started this run is gone: not training")
        time.sleep(0.02)
waited_seconds = time.time() - T_WAIT

# -----------------------------------------------------------------------------
# DDP: torchrun sets RANK; each process owns one GPU (or a share of the CPU with gloo)
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, local_rank, world_size = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the "
             f"{world_size} ranks")
    if fsdp and dtype == "float16":  # bfloat16 needs no loss scaling, and GradScaler knows nothing of shards
        fail("--fsdp=True trains in bfloat16 or float32, not float16: use --dtype=bfloat16")
else:
    rank, world_size = 0, 1
    if fsdp:  # one rank under torchrun is allowed: the sharded code path on one GPU, with nothing to share
        fail("--fsdp=True shards the model over torchrun's processes: run it as torchrun --standalone "
             "--nproc_per_node=N train.py ... --fsdp=True")
master = rank == 0
grad_accum = gradient_accumulation_steps // world_size  # micro-batches per rank per step
device_type = "cuda" if device.startswith("cuda") else "cpu"
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
if device_type == "cpu":  # measured before any work of ours, so the load seen is the machine's other work
    n_threads, threads_why, adapt_threads = pick_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n_threads)
else:
    adapt_threads = False
lr_decay_iters = max_iters if lr_decay_iters is None else lr_decay_iters
min_lr = learning_rate / 10 if min_lr is None else min_lr
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size


def say(*args):
    if master:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# data, model config, checkpoint

ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = pretrained = None
# On resume, and when fine-tuning a folder, the model is the source's: every ModelConfig field the arguments do not
# give takes the source's value, and one they give must agree with it (a resumed run continues the same model, on
# the same data). What may differ, safely: the runtime switches use_kernels and attn_impl (the same numbers) and the
# loss weights seq_aux_alpha, aux_alpha and mtp_loss_weight (V3 lowers lambda from 0.3 to 0.1 late in training; a
# folder also takes this run's block_size: from_pretrained gets it);
# and every setting outside ModelConfig: max_iters, the learning rate and its schedule, batch size, eval and log
# settings, balance, seed, and the runtime switches compile, device and dtype.
MAY_DIFFER = ("use_kernels", "attn_impl", "seq_aux_alpha", "aux_alpha", "mtp_loss_weight")


def take_model_settings(source, values):
    for k, v in values.items():
        if k in given and k in MAY_DIFFER:
            continue
        if k in given and settings[k] != v:
            fail(f"--{k}={settings[k]!r} but {source} has {k}={v!r}: its model is kept as it is; drop --{k} "
                 f"(or start a new run with --init_from=scratch)")
        globals()[k] = v


if init_from == "resume":
    if not os.path.exists(ckpt_path):
        fail(f"no checkpoint at {ckpt_path} to resume from: train from scratch first (--init_from=scratch)"
             f"{hf.checkpoints_near(out_dir)}")
    try:
        ckpt, _ = hf.read_checkpoint(ckpt_path)
    except ValueError as e:
        fail(f"{e}: cannot resume; start a new run (--init_from=scratch) or point --out_dir at a good checkpoint")
    if not isinstance(ckpt.get("optimizer"), dict):
        fail(f"{ckpt_path} has no optimizer state (not saved by train.py): cannot resume it; fine-tune an export "
             "of it instead (python sample.py --save_pretrained=DIR, then --init_from=DIR)")
    take_model_settings("the checkpoint", ckpt["model_args"])
    trained_on = hf.checkpoint_data_dir(ckpt)
    if given & {"dataset", "data_root"} and os.path.abspath(data_dir(dataset, data_root)) != trained_on:
        fail(f"--dataset={dataset} (in {os.path.abspath(data_dir(dataset, data_root))}) but the checkpoint was "
             f"trained on {trained_on}: a resumed run continues on its own data; drop --dataset and --data_root "
             "(or start a new run with --init_from=scratch)")
    dataset = trained_on
    saved_horizon = ckpt["config"].get("lr_decay_iters")
    if "lr_decay_iters" not in given and type(saved_horizon) is int:
        lr_decay_iters = saved_horizon  # the schedule goes on along the saved run's curve, not one for max_iters
elif init_from != "scratch":  # fine-tune a DeepSeek-format folder: its architecture, this run's context and switches
    runtime = dict(block_size=block_size, use_kernels=use_kernels, attn_impl=attn_impl, seq_aux_alpha=seq_aux_alpha,
                   aux_alpha=aux_alpha if balance == "aux" else 0.0)
    if master or not fsdp:  # FSDP: rank 0 alone reads the folder, and spreads it (parallel.sharded_model)
        try:
            pretrained = hf.from_pretrained(init_from, **runtime)
        except (ValueError, OSError) as e:
            fail(f"cannot load {init_from}: {error_text(e) if isinstance(e, OSError) else e}")
    folder_config = [None if pretrained is None else pretrained.config]
    if fsdp:
        dist.broadcast_object_list(folder_config)
    take_model_settings(init_from, {k: getattr(folder_config[0], k) for k in model_fields})
data = load_data(dataset, data_root=data_root)  # exits with "run python prepare.py first"
T_DATA = time.time()
data_identity = {"dir": os.path.abspath(data.dir), "tokenizer": tokenizer_identity(data.dir, data.meta)}
if ckpt is not None:
    try:
        hf.check_checkpoint_tokenizer(ckpt, data.dir)
    except ValueError as e:
        fail(f"{e}; cannot resume")
if vocab_size is None:
    vocab_size = data.vocab_size
if vocab_size < data.vocab_size:
    fail(f"vocab_size {vocab_size} is smaller than the data's vocabulary ({data.vocab_size} tokens in "
         f"{data.dir}/meta.json): drop --vocab_size or use a checkpoint made for this data")
for split, arr in (("train", data.train), ("val", data.val)):
    if len(arr) <= block_size:
        fail(f"{data.dir}/{split}.bin has {len(arr)} tokens, not more than block_size {block_size}: "
             "use a smaller --block_size or more data")
model_args = {k: globals()[k] for k in model_fields}
model_args["aux_alpha"] = aux_alpha if balance == "aux" else 0.0
try:
    model_config = ModelConfig(**model_args)  # validates: top_k <= n_experts, n_group | n_experts, ...
except ValueError as e:
    fail(str(e))
model_args = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)}  # resolved
# memory, before any is taken: fp32 weights and gradients, AdamW's two moments (FSDP: this rank's shard of them);
# one micro-batch's activations
_problem = memory_problem(device, {
    "weights, gradients and AdamW": (8 + 2 * DTYPES[moments_dtype].itemsize) * model_config.approx_params()
                                    // (world_size if fsdp else 1),
    # FSDP keeps the unsharded float32 gradients between the micro-batches of a step (set_requires_gradient_sync)
    **({"gradients between micro-batches": 4 * model_config.approx_params()} if fsdp and grad_accum > 1 else {}),
    "activations of a micro-batch": (4 if dtype == "float32" else 2) * batch_size * block_size * model_config.activation_floats()},
    "lower --batch_size (--gradient_accumulation_steps keeps the tokens per step) or --block_size, or use a "
    "smaller model")
if _problem:
    fail(_problem)
for k in ("dataset", "vocab_size", "device", "dtype", "lr_decay_iters", "min_lr") + tuple(model_fields):
    settings[k] = model_args[k] if k in model_args else globals()[k]  # the config saved is the one that ran
if ckpt is not None:  # the training settings are this command's: say which differ from the checkpoint's run
    unremarkable = ("out_dir", "init_from", "overwrite", "eval_only", "plot", "plot_only", "wandb_log",
                    "wandb_project", "wandb_run_name", "dataset", "data_root")
    changed = [f"{k}={settings[k]!r} (was {v!r})" for k, v in ckpt["config"].items()
               if k in settings and k not in unremarkable and settings[k] != v]
    if changed:
        say(f"resuming with settings that differ from the checkpoint's run: {', '.join(changed)}")
    if "lr_decay_iters" not in given and decay_lr and max_iters > lr_decay_iters:
        say(f"resume: the lr schedule keeps the checkpoint's lr_decay_iters={lr_decay_iters}, so iters "
            f"{max(lr_decay_iters, ckpt['iter_num'])}..{max_iters} run at min_lr {min_lr:.2e}; "
            f"--lr_decay_iters={max_iters} would stretch the cosine instead (the lr goes back up)")

if init_from != "resume" and not eval_only and os.path.isfile(ckpt_path):
    # a new run would replace another run's checkpoint at its first save, and until then leave it for sample.py
    _old = os.stat(ckpt_path)
    _old = f"{_old.st_size / 1e6:,.1f} MB, saved {time.strftime('%Y-%m-%d %H:%M', time.localtime(_old.st_mtime))}"
    if not overwrite:
        fail(f"{ckpt_path} holds another run's checkpoint ({_old}): continue it with --init_from=resume, "
             "train this one elsewhere with --out_dir=DIR, or replace it with --overwrite")
    say(f"--overwrite: {ckpt_path} ({_old}, another run's) is replaced at this run's first save")

# -----------------------------------------------------------------------------
# system

torch.manual_seed(seed)  # every rank builds the same initial model (DDP would broadcast it anyway)
torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
ptdtype = DTYPES[dtype]
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
peak = peak_flops(device)  # for MFU; None on the CPU
gpu_name = torch.cuda.get_device_name(device) if device_type == "cuda" else ""


def batch_offsets(arr, key):
    """Where the windows of batch key start. The offsets come from a generator seeded by (seed, key), key =
    (stream, iter, micro-batch) or (stream, eval batch): any batch can be drawn again, in any order, so a resumed
    run sees exactly the batches the uninterrupted one would."""
    return np.random.default_rng([seed, *key]).integers(0, len(arr) - block_size, size=batch_size)  # no RNG state


def get_batch(split, *key):
    """Random-offset windows of the memmapped bin (nanoGPT's loader), at batch_offsets(key)."""
    arr = data.train if split == "train" else data.val
    ix = batch_offsets(arr, key)
    x = torch.from_numpy(np.stack([arr[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([arr[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if max(x.max(), y.max()) >= vocab_size:  # on the host, before the copy: an index error on the GPU is fatal
        fail(f"{data.dir}/{split}.bin holds token id {int(max(x.max(), y.max()))}, past the vocabulary "
             f"({vocab_size}): it is not what prepare.py wrote with this meta.json; run python prepare.py --force")
    if device_type == "cuda":  # pinned host memory: the copy overlaps with the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters (nanoGPT)."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(lr_decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# model, optimizer, balancing state

iter_num, best_val_loss = 0, float("inf")
train_seconds = 0.0  # seconds spent in training steps so far, evaluations and checkpoint saves excluded
if ckpt is not None:
    iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    _t = ckpt.get("train_seconds")  # a resumed run's clock goes on from its checkpoint's (older ones have none)
    train_seconds = float(_t) if type(_t) in (int, float) and _t >= 0 else 0.0
if fsdp:  # the whole model on rank 0's host only (the checkpoint's, the folder's or a new one); each rank its shard
    full = {} if not master else ckpt["model"] if ckpt is not None else \
        pretrained.state_dict() if pretrained is not None else Model(model_config).state_dict()
    model = parallel.sharded_model(model_config, full, device, None if dtype == "float32" else ptdtype)
    pretrained = full = None
else:
    model = Model(model_config)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # expert_bias included: it is a persistent buffer
    elif init_from not in ("scratch", "resume"):
        model.load_state_dict(pretrained.state_dict())  # expert biases included: fine-tuning keeps updating them
        del pretrained
    model.to(device)
raw_model = model  # the uncompiled, un-DDP'd module: saved, evaluated, its MoE layers read
T_MODEL = time.time()
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, DTYPES[moments_dtype])
run_id = uuid.uuid4().hex[:12]  # tags this run's records in log.jsonl and its checkpoints
if ckpt is not None:
    try:
        if fsdp:
            parallel.load_optimizer(model, optimizer, ckpt["optimizer"] if master else {})
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        # load_state_dict checks the groups, not the moments: a wrong shape would fail at the first step, after
        # ckpt.pt was saved again; checked here, before anything is written
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st and (not torch.is_tensor(st[k]) or st[k].shape != p.shape or not st[k].is_floating_point()):
                        raise ValueError(f"its {k} of a {tuple(p.shape)} parameter is "
                                         f"{tuple(st[k].shape) if torch.is_tensor(st[k]) else type(st[k]).__name__}")
                if "step" in st and not (torch.is_tensor(st["step"]) and st["step"].numel() == 1):
                    raise ValueError("its step is not a number")
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: set_optimizer_state_dict's
        fail(f"{ckpt_path}: its optimizer state does not fit its model ({e if isinstance(e, ValueError) else error_text(e)}): cannot resume it")
    run_id = ckpt.get("run")  # the same run goes on (None: a checkpoint from before runs were tagged)
saved_iter = iter_num if ckpt is not None else None  # the iter ckpt.pt holds, for the messages of a stop
ckpt = None  # free the memory
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
if compile and compile_blocks:
    say("compiling the transformer blocks...")
    for block in [*raw_model.layers, *(m.block for m in raw_model.mtp)]:
        block.compile()  # in place: the module, its state_dict and its checkpoint stay as they are
    raw_model.head_and_loss = torch.compile(raw_model.head_and_loss)  # an instance attribute: nothing saved changes
elif compile:
    say("compiling the model...")
    model = torch.compile(model)
if ddp and not fsdp:
    # broadcast_buffers=False: each rank counts its own tokens_per_expert (summed by all_reduce below), and the
    # expert biases stay identical because every rank applies the same update to the same summed counts
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, broadcast_buffers=False)
T_READY = time.time()
moe_layers = raw_model.moe_layers()
n_moe = len(moe_layers)
flops_per_token = raw_model.flops_per_token(block_size)

# the unigram baseline: a model that ignores the context can do no better than this entropy
head_tokens = np.asarray(data.train[:1 << 24])
p = np.bincount(head_tokens, minlength=vocab_size) / len(head_tokens)
unigram_entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())

if master:
    say("config:\n" + textwrap.fill("  ".join(f"{k}={v!r}" for k, v in settings.items()), 118,
                                    initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False))
    if use_kernels and not (device_type == "cuda" and gpu_kernels.HAS_TRITON):  # the setting says may, the device decides
        say("in effect: use_kernels=True but the PyTorch paths run (the Triton kernels need CUDA and Triton)")
    say(f"model: {raw_model.num_params() / 1e6:.2f}M params, {raw_model.num_params(active=True) / 1e6:.2f}M "
        f"active per token, {n_moe} MoE layers ({n_experts} experts, top-{top_k}, {n_shared} shared), "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token")
    say(f"data: {data.dir}: {len(data.train):,} train / {len(data.val):,} val tokens, vocab {data.vocab_size}; "
        f"unigram entropy {unigram_entropy:.4f} nats (the loss to beat)")
    say(f"training: {device} {dtype}{' (' + gpu_name + ')' if device_type == 'cuda' else ''}, "
        f"{world_size} rank(s) x {grad_accum} micro-batches x {batch_size} x {block_size} = "
        f"{tokens_per_iter:,} tokens/iter{', sharded (FSDP2)' if fsdp else ''}, balance={balance}, "
        f"from iter {iter_num} to {max_iters}")
    if device_type == "cpu":
        say(f"threads: {n_threads} ({threads_why}; " + ("follows the load; " if adapt_threads else "") +
            "--threads=N or OMP_NUM_THREADS=N fixes it)")
    log_path = os.path.join(out_dir, "log.jsonl")
    try:
        os.makedirs(out_dir, exist_ok=True)
        log_file = open_log(log_path, *((run_id, iter_num) if init_from == "resume" else ()))
    except OSError as e:
        fail(f"cannot write {log_path} ({error_text(e)}; it must be a plain file, not a link): pick a folder you "
             "can write")
    except ValueError as e:  # not a plain file, or too big to read
        fail(f"{e}: move it away or pick another --out_dir")
wandb_run = None
if wandb_log and master:
    try:
        import wandb
        wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=settings)
    except ImportError:
        say("wandb_log: wandb is not installed, logging to log.jsonl only")


def log(rec):
    if not master:
        return
    try:
        log_file.write(json.dumps({**rec, "run": run_id}) + "\n")
        log_file.flush()
    except OSError as e:
        fail(f"cannot write {log_path} ({error_text(e)}): stopping; {kept_checkpoint()}")
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in rec.items() if not isinstance(v, list)}, step=rec["iter"])


def moe_max_vio(counts):
    """MaxVio of (n_moe, n_experts) counts, averaged over the MoE layers, as a 0-d tensor (no sync)."""
    return torch.stack([max_vio(c) for c in counts]).mean()


domains = val_domains(data.meta)  # data/mix: (names, the domain of every val token); else None


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # compile_blocks compiled raw_model's blocks in place: evaluate them eagerly
def evaluate():
    """Mean loss over the same eval_iters batches of each split, and the tokens each expert gets over all of val's
    (for MaxVio_global); with domains, val's loss per domain too (each target token counted in its own domain).
    Runs the uncompiled model in eval mode, where the MoE layers count nothing, so the training
    counts that drive the bias are untouched; the val counts come from moe.recording_routes instead."""
    raw_model.eval()
    out = {}
    mtp_sums = torch.zeros(2, len(raw_model.mtp), device=device)
    val_counts = torch.zeros(n_moe, n_experts, device=device)
    n_domains = len(domains[0]) if domains else 0
    domain_sums = torch.zeros(2, n_domains, device=device)  # loss sum, tokens

    def count(i, topk_ids, _):
        val_counts[i] += torch.bincount(topk_ids.flatten(), minlength=n_experts)

    for split, stream in (("train", 1), ("val", 2)):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, stream, k)
            with ctx, recording_routes(moe_layers if split == "val" else [], count):
                logits, loss = raw_model(X, Y)  # eval mode: cross-entropy only, no balance loss
            losses[k] = loss.item()
            if split == "val" and domains:
                ix = batch_offsets(data.val, (stream, k))
                dom = torch.from_numpy(domains[1][ix[:, None] + np.arange(1, block_size + 1)].astype(np.int64))
                dom = dom.flatten().to(device)
                token_loss = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), reduction="none")
                domain_sums[0].index_add_(0, dom, token_loss)
                domain_sums[1].index_add_(0, dom, torch.ones_like(token_loss))
            if split == "val" and raw_model.mtp:  # the MTP modules' own loss and top-1 accuracy, per depth
                mtp_sums += torch.stack([raw_model.mtp_loss, raw_model.mtp_accuracy]) / eval_iters
        out[split] = losses.mean().item()
    if raw_model.mtp:
        out["mtp_loss"], out["mtp_accuracy"] = mtp_sums.tolist()
    if domains:
        out["domain"] = {name: s / max(n, 1) for name, s, n in zip(domains[0], *domain_sums.tolist())}
    raw_model.train()
    return out, val_counts


def save_checkpoint():
    """Whole or not at all (atomic_write): a full disk or a kill mid-save leaves the previous ckpt.pt as it was."""
    global saved_iter
    if fsdp:  # every rank takes part in gathering the whole state to rank 0, which alone writes it
        model_state, optimizer_state = parallel.full_state(raw_model, optimizer)
        if not master:
            saved_iter = iter_num
            return
    else:
        model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
    ckpt = {"model": model_state, "optimizer": optimizer_state, "model_args": model_args,
            "config": settings, "iter_num": iter_num, "best_val_loss": best_val_loss, "run": run_id,
            "data": data_identity, "train_seconds": train_seconds}
    t_save = time.time()
    try:
        with atomic_write(ckpt_path) as f:
            torch.save(ckpt, f)
    except (OSError, RuntimeError) as e:  # torch.save wraps the OSError of a full disk in a RuntimeError
        fail(f"cannot save {ckpt_path} at iter {iter_num} ({error_text(e)}): stopping; {kept_checkpoint()}")
    saved_iter = iter_num
    # the optimizer's moments double the weights' bytes: an MoE checkpoint is 4x its dense twin's, and so is its save
    say(f"saved {ckpt_path} ({os.path.getsize(ckpt_path) / 1e9:.2f} GB) in {time.time() - t_save:.1f} s")


def kept_checkpoint():
    return f"{ckpt_path} keeps iter {saved_iter}" if saved_iter is not None else "no checkpoint was saved"


def stop_if_nonfinite():
    """The step loss and the expert biases are checked on the device every step (no sync) and read here, at log
    and eval points only."""
    bad = torch.stack([first_bad_iter, first_bad_bias_iter])
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad[0].item() >= 0:
        fail(f"loss became NaN/inf at iter {bad[0].item()}: stopping; {kept_checkpoint()}")
    if bad[1].item() >= 0:
        fail(f"the expert biases became NaN/inf at iter {bad[1].item()} (--bias_update_rate={bias_update_rate}): "
             f"stopping; {kept_checkpoint()}")


def report_interrupt(kind, value, tb):
    """Ctrl-C: one line on stderr instead of a traceback (NANOSEEK_DEBUG=1 keeps it). A save it interrupts leaves
    the previous checkpoint whole (atomic_write)."""
    if kind is KeyboardInterrupt and not debugging():
        print(f"interrupted at iter {iter_num}: {kept_checkpoint()}", file=sys.stderr)
    else:
        quiet_hook(kind, value, tb)  # a closed pipe, a full stdout, or a real traceback


quiet_hook, sys.excepthook = sys.excepthook, report_interrupt


thread_follower = ThreadFollower(n_threads) if adapt_threads else None  # CPU: other work that comes and goes


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


# -----------------------------------------------------------------------------
# the loop

first_bad_iter = torch.full((), -1, dtype=torch.long, device=device)  # first iter with a non-finite loss
first_bad_bias_iter = torch.full((), -1, dtype=torch.long, device=device)  # ... with a non-finite expert bias
load_window = torch.zeros(n_moe, n_experts, device=device)  # tokens per expert since the last log line
micro = rank * grad_accum  # micro-batch ids: rank r takes r*grad_accum.., so N ranks see what one rank would
X, Y = get_batch("train", 0, iter_num, micro)
log({"kind": "start", "iter": iter_num, "tokens_per_iter": tokens_per_iter, "unigram_entropy": unigram_entropy,
     "n_moe_layers": n_moe, "n_experts": n_experts, "balance": balance,
     "device": machine_name(device), "startup_seconds": time.time() - T_PROCESS - waited_seconds,
     "waited_seconds": waited_seconds,  # NANOSEEK_START_AFTER: for the run before this one to end
     "startup_parts": {"imports": T_IMPORTED - T_PROCESS, "settings and data": T_DATA - T_IMPORTED - waited_seconds,
                       "model": T_MODEL - T_DATA, "optimizer and compile": T_READY - T_MODEL,
                       "rest": time.time() - T_READY}})  # the unigram baseline, the log, the first batch
t_start = t0 = t_steps = time.time()  # t_steps: where the steps since the last evaluation began
window_iters = 0
eta_points = collections.deque([(t_start, iter_num)], maxlen=11)  # (time, iter) at the last log lines, for the ETA
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    last = iter_num >= max_iters
    if iter_num % eval_interval == 0 or last or eval_only:
        stop_if_nonfinite()  # a sync: the steps before it are done
        train_seconds += time.time() - t_steps
        if master or fsdp:  # FSDP: a forward pass is collective; every rank evaluates the same batches, 0 reports
            t_eval = time.time()
            losses, val_counts = evaluate()
            t_eval = time.time() - t_eval
            rec = {"kind": "eval", "iter": iter_num, "tokens": iter_num * tokens_per_iter,
                   "train_seconds": train_seconds, "eval_seconds": t_eval, "train_loss": losses["train"],
                   "val_loss": losses["val"]}
            line = f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            if raw_model.mtp:  # V3 eq. 24 on val; the val loss above is the main head's alone
                rec["val_mtp_loss"], rec["val_mtp_accuracy"] = losses["mtp_loss"], losses["mtp_accuracy"]
                line += (f", MTP loss {' '.join(f'{x:.4f}' for x in losses['mtp_loss'])} accuracy "
                         f"{' '.join(f'{x:.3f}' for x in losses['mtp_accuracy'])}")
            if domains:
                rec["val_loss_domain"] = losses["domain"]
                line += ", by domain " + " ".join(f"{d} {v:.4f}" for d, v in losses["domain"].items())
            if n_moe:
                rec["maxvio_global"] = moe_max_vio(val_counts).item()
                rec["val_load"] = (val_counts / val_counts.mean(1, keepdim=True)).tolist()
                line += f", MaxVio_global {rec['maxvio_global']:.3f}"
            say(line + f" (unigram entropy {unigram_entropy:.4f}; {t_eval:.1f} s)")
            log(rec)
            if not math.isfinite(losses["val"]):
                fail(f"val loss is {losses['val']} at iter {iter_num}: stopping without saving")
            if losses["val"] < best_val_loss or always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0 and not eval_only and (last or not save_last_only):
                    save_checkpoint()
        t0 = t_steps = time.time()  # evaluation and checkpoint time is not training time
        window_iters = 0
    if last or eval_only:
        break

    # one optimizer step: grad_accum micro-batches on each rank
    step_loss = torch.zeros((), device=device)
    step_mtp = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        if fsdp:  # reduce-scatter the gradients only on the last micro-batch; they accumulate in float32 before
            raw_model.set_requires_gradient_sync(micro_step == grad_accum - 1)
        elif ddp:  # all-reduce the gradients only on the last micro-batch
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with ctx:
            _, loss = model(X, Y)
            loss = loss / grad_accum
        # the next batch loads while the GPU works on this one
        nxt = (iter_num, micro + micro_step + 1) if micro_step + 1 < grad_accum else (iter_num + 1, micro)
        X, Y = get_batch("train", 0, *nxt)
        scaler.scale(loss).backward()
        step_loss += loss.detach()
        if raw_model.mtp:
            step_mtp += raw_model.mtp_loss.detach().mean() / grad_accum
    if scaler.is_enabled():  # float16: unscale, clip, and a step the scaler skips on inf or NaN gradients
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        clipped_step(optimizer, model.parameters(), grad_clip)
    optimizer.zero_grad(set_to_none=True)
    first_bad_iter = torch.where((first_bad_iter < 0) & ~torch.isfinite(step_loss), iter_num, first_bad_iter)

    # balancing: the tokens each expert got in this step's training forward passes, all micro-batches and ranks
    if n_moe:
        counts = torch.stack([m.tokens_per_expert for m in moe_layers])  # (n_moe, n_experts), a copy
        if ddp:
            dist.all_reduce(counts)  # every rank then applies the same update: identical biases
        if balance == "bias":
            raw_model.update_biases(bias_update_rate, counts)  # b_i += gamma * sign(mean(c) - c_i); resets counts
            finite = torch.stack([torch.isfinite(m.expert_bias).all() for m in moe_layers]).all()
            first_bad_bias_iter = torch.where((first_bad_bias_iter < 0) & ~finite, iter_num, first_bad_bias_iter)
        else:
            for m in moe_layers:
                m.tokens_per_expert.zero_()  # counted for MaxVio only
        load_window += counts
    iter_num += 1
    window_iters += 1

    if iter_num % log_interval == 0:
        stop_if_nonfinite()
        if master:
            loss_f = step_loss.item()  # the one sync of a logged step
            dt = (time.time() - t0) / window_iters
            t0, window_iters = time.time(), 0
            rec = {"kind": "train", "iter": iter_num, "tokens": iter_num * tokens_per_iter, "loss": loss_f,
                   "lr": lr, "ms": dt * 1000, "tok_s": tokens_per_iter / dt}
            if raw_model.mtp:  # the loss above includes mtp_loss_weight times this
                rec["mtp_loss"] = step_mtp.item()
            line = (f"iter {iter_num}/{max_iters} | loss {loss_f:.4f}"
                    + (f" (MTP {rec['mtp_loss']:.4f})" if raw_model.mtp else "") + f" | lr {lr:.2e} | {dt * 1000:.1f} ms | "
                    f"{tokens_per_iter / dt:,.0f} tok/s")
            if peak:
                rec["mfu"] = flops_per_token * tokens_per_iter / world_size / dt / peak
                line += f" | MFU {rec['mfu'] * 100:.1f}%"
            if n_moe:
                rec["maxvio_batch"] = moe_max_vio(counts).item()
                rec["load"] = (load_window / load_window.mean(1, keepdim=True)).tolist()
                load_window.zero_()
                line += f" | MaxVio_batch {rec['maxvio_batch']:.3f}"
            # the ETA from the last 10 log intervals, evaluations included: it follows a change of speed (another
            # job starting on the machine) within 10 log lines, and one slow iteration moves it by a tenth
            eta_points.append((time.time(), iter_num))
            (t_old, it_old), (t_new, it_new) = eta_points[0], eta_points[-1]
            eta = (t_new - t_old) / (it_new - it_old) * (max_iters - iter_num)
            say(line + f" | eta {fmt_time(eta)}")
            log(rec)
            if thread_follower is not None and (note := thread_follower.update()):
                say(note)
        else:
            load_window.zero_()

if master:
    peak_memory = ""
    if device_type == "cuda":
        peak_memory = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    say(f"done: {iter_num} iters in {fmt_time(time.time() - t_start)}, best val loss {best_val_loss:.4f} "
        f"(unigram entropy {unigram_entropy:.4f}){peak_memory}; checkpoint {ckpt_path}")
    log_file.close()
if ddp:
    dist.destroy_process_group()

if plot and master:
    problem = draw_plots(out_dir)  # the run itself is done and saved: a plot that fails is only a warning
    if problem:
        print(f"plot: {problem}", file=sys.stderr)
release_locks()  # the run is over: out_dir is free for the next
