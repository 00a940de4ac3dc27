"""How a node's CPU cores are shared: per training process, between its loader workers and torch's threads.

Each training process gets cores / processes-on-the-node (the cores this process may run on: its affinity
mask, so `taskset` and cgroup cpusets count). Of those:
- loader workers: `-j` as given (per node, split across the node's processes, as the reference); by
  default the reference's 4, capped at the process's cores, since more workers than cores only queue
  (and PyTorch warns about it once per DataLoader);
- torch's intra-op threads: the process's share of the cores, on a CPU device as on a GPU. For one process
  that is torch's own default (one thread per core); `--multiprocessing-distributed` spawns processes that
  would each start with one thread per core of the machine: this gives them their share, as torchrun's
  OMP_NUM_THREADS does. Loader workers are not subtracted: on a quiet 2-core machine the demo (-j 2) ran
  faster with 2 threads than with 1 (its workers need little CPU), while on the same machine shared with
  other jobs 1 thread was faster, OpenMP's threads spinning at each op's barrier against the other
  processes (both measured: benchmarks/RESULTS.md). A busy machine: OMP_NUM_THREADS=1.
The count is only ever lowered from what torch has (a caller that chose fewer keeps them), and an explicit
OMP_NUM_THREADS in the environment wins outright (torchrun sets it to 1 for more than one process per node).
"""

from __future__ import annotations

import math
import os

import torch

REFERENCE_WORKERS = 4  # the reference script's -j default


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cores_per_process(local_world_size: int) -> int:
    return max(1, cores() // max(1, local_world_size))


def workers_per_process(node_workers: int | None, local_world_size: int) -> tuple[int, str]:
    """(loader workers of each process, why, when it is not simply -j split). `node_workers` None = default."""
    if node_workers is not None:
        return math.ceil(node_workers / local_world_size), ""
    want, have = math.ceil(REFERENCE_WORKERS / local_world_size), cores_per_process(local_world_size)
    if want > have:
        return have, (f" (default {REFERENCE_WORKERS} a node capped at the {have} core{'s' if have > 1 else ''} "
                      f"of each process)")
    return want, ""


def intra_op_threads(local_world_size: int) -> tuple[int, str]:
    """(torch threads this process should use, why)."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    want = cores_per_process(local_world_size)
    why = f"{want} core{'s' if want > 1 else ''} per process"
    have = torch.get_num_threads()
    if have < want:
        return have, f"{have} set by the caller"
    return want, why


def apply(local_world_size: int) -> tuple[int, str]:
    """Set this process's intra-op threads (see the module docstring); returns what intra_op_threads says."""
    n, why = intra_op_threads(local_world_size)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n, why


def describe(n: int, why: str) -> str:
    return f"{n} torch thread{'s' if n != 1 else ''} ({why})"
