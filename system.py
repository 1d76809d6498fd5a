"""
The machine: what nanoseek needs to know about the hardware it runs on, one table or probe per fact. Its name (as
every table and log gives it), the GPUs' datasheet peaks (for MFU and bandwidth), the memory a device has (for the
estimate that refuses a run that cannot fit), and the CPU threads worth using when other processes share the cores
(README, "Threads").

    from system import peak_flops, pick_threads
    n, why, adapt = pick_threads()     # torch.set_num_threads(n); why says how it was chosen
"""
import math
import os
import time

import torch

# -----------------------------------------------------------------------------
# GPUs


# dense bf16 tensor-core peak (datasheets, no sparsity) per GPU, for MFU; the first name found in the device's wins
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
              "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}
# HBM bytes/s (datasheets) per GPU, for the bandwidth a kernel reaches
PEAK_BW = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12, "H800": 3.35e12,
           "GH200": 4.0e12, "B200": 8.0e12, "A100": 2.0e12}


def datasheet(table, device):
    """The entry of table for this CUDA device (the first name found in the device's), or None: a CPU, or a GPU
    not in the table."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in table.items() if k in name), None)


def machine_name(device):
    """What the numbers of a run on device were measured on, as every table and log names it: the GPU's name, or
    "no GPU (N CPU cores)"."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"no GPU ({os.cpu_count()} CPU cores)"


def peak_flops(device):
    """Dense bf16 peak FLOP/s of this CUDA device, or None."""
    return datasheet(PEAK_FLOPS, device)


def peak_bandwidth(device):
    """HBM bytes/s of this CUDA device, or None."""
    return datasheet(PEAK_BW, device)


# -----------------------------------------------------------------------------
# memory


def device_memory(device):
    """Bytes of memory the device has: a GPU's total, or for the CPU the machine's RAM (or its cgroup's limit)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:  # a container's limit, when it has one ("max" = none)
            limit = f.read().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total


def memory_problem(device, parts, advice):
    """None when the estimated parts {what: bytes} fit the device's memory, else one line with the estimate."""
    need, have = sum(parts.values()), device_memory(device)
    if need <= have:
        return None
    shown = ", ".join(f"{k} {v / 2**30:,.1f}" for k, v in parts.items())
    return f"this needs about {need / 2**30:,.1f} GiB ({shown}), over the {have / 2**30:,.1f} GiB {device} has: {advice}"


# -----------------------------------------------------------------------------
# CPU threads


def cpu_sample():
    """(wall time, {logical CPU: (busy, all) seconds since boot} from /proc/stat, this process's CPU seconds), or
    None where there is no /proc/stat. Two samples give the cores other processes kept busy in between."""
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
        tick = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal: idle and iowait are the idle columns
        cpus = {int(r[0][3:]): ((sum(map(int, r[1:9])) - int(r[4]) - int(r[5])) / tick, sum(map(int, r[1:9])) / tick)
                for r in rows}
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return time.time(), cpus, own.user + own.system


def busy_elsewhere(a, b, cpus):
    """The cores of cpus (logical CPUs) that processes other than this one kept busy between samples a and b."""
    busy = sum(b[1][c][0] - a[1][c][0] for c in cpus if c in a[1] and c in b[1])
    return max(0.0, (busy - (b[2] - a[2])) / max(b[0] - a[0], 1e-3))


def physical_cores():
    """(the logical CPUs this process may run on, how many physical cores they are: hyperthreads count once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_cpus_list") as f:
                cores.add(f.read().strip())  # the logical CPUs of c's physical core: one entry per core
        except OSError:
            cores.add(str(c))
    return cpus, len(cores)


def free_threads(physical, busy_logical, n_logical):
    """Threads that fit on the physical cores that other work leaves free (at least 1)."""
    busy_cores = busy_logical * physical / n_logical  # logical CPUs busy -> physical cores' worth
    return max(1, min(physical, math.floor(physical - busy_cores + 0.5)))


def pick_threads(requested=0, share=1):
    """-> (torch threads for CPU work, why, whether to keep adapting it). requested > 0 is taken as it is; else
    OMP_NUM_THREADS if set; else one thread per physical core this process may run on (its CPU affinity), divided
    by `share` (ranks of a CPU DDP run on this host), less the cores other work keeps busy over the next 0.25 s.
    More threads than free cores make every thread wait for the ones descheduled: on a 2-core machine with one busy
    core, 2 threads train several times slower than 1 (README, "Threads")."""
    if requested > 0:
        return requested, "--threads", False
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS", False
    cpus, cores = physical_cores()
    physical = max(1, cores // max(share, 1))
    if share > 1:  # the other ranks start at the same time: their start-up would read as load
        return physical, f"{cores} physical cores / {share} ranks", False
    a = cpu_sample()
    if a is None:
        return physical, f"{physical} physical cores", False
    time.sleep(0.25)
    busy = busy_elsewhere(a, cpu_sample(), cpus)
    return free_threads(physical, busy, len(cpus)), \
        f"{physical} physical cores, {busy * physical / len(cpus):.1f} busy with other work", True


class ThreadFollower:
    """Other work that starts or stops during a CPU run: each update() (train.py calls it at its log lines) sets
    torch's threads to the physical cores other processes left free since the last one, a second or more ago. A
    changed count changes the last bits of the numbers (README, "Threads"); --threads=N keeps it fixed."""

    def __init__(self, n_threads):
        self.n_threads = n_threads
        self.cpus, self.physical = physical_cores()
        self.last = cpu_sample()

    def update(self):
        """-> a line saying what changed, or None."""
        now = cpu_sample()
        if now is None or self.last is None or now[0] - self.last[0] < 1.0:
            return None
        busy = busy_elsewhere(self.last, now, self.cpus)
        self.last = now
        want = free_threads(self.physical, busy, len(self.cpus))
        if want == self.n_threads:
            return None
        line = (f"threads: {self.n_threads} -> {want} ({busy * self.physical / len(self.cpus):.1f} of "
                f"{self.physical} physical cores busy with other work)")
        torch.set_num_threads(want)
        self.n_threads = want
        return line
