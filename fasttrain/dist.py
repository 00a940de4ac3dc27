"""Distributed set-up: read the launch environment once, return a frozen DistInfo.

Three ways in, one result:
- torchrun (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), multi-node by rendezvous;
- SLURM's srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, tasks per node from SLURM_STEP_TASKS_PER_NODE;
  MASTER_ADDR/PORT or --dist-url from the user); a task that sees one GPU (--gpus-per-task=1) uses it;
- the reference script's flags: --multiprocessing-distributed spawns one process per GPU (per
  --nproc-per-node on CPU) and each calls setup() with its local rank; --dist-url/--world-size/--rank.
Backend: NCCL on CUDA, Gloo on CPU, unless --dist-backend says otherwise. Nothing happens on import.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .config import DistConfig
from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def per_rank_batch(self, node_batch: int) -> int:
        """-b is per node, as in the reference: split across this node's processes."""
        if node_batch < self.local_world_size:
            raise UserError(f"--batch-size {node_batch} is smaller than the {self.local_world_size} processes "
                            "on this node (-b is the batch of a whole node, split across its processes)")
        return node_batch // self.local_world_size


def check_gpu_flag(gpu: int | None) -> None:
    """--gpu where no GPU is visible: the reference would train on the CPU, silently."""
    if gpu is not None and not torch.cuda.is_available():
        raise UserError(f"--gpu {gpu} asked for, but no CUDA GPU is visible: drop --gpu to train on the CPU "
                        "(--device cpu)")


def pick_device(want: str, index: int, gpu: int | None) -> torch.device:
    check_gpu_flag(gpu)
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible (use --device cpu)")
    index = gpu if gpu is not None else index
    if index >= torch.cuda.device_count():
        raise UserError(f"GPU {index} asked for, but only {torch.cuda.device_count()} visible")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Launch:
    """Where the launcher put this process: ranks, sizes, how to join, and which visible GPU is its own."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    init_method: str
    gpu_index: int


def slurm_tasks_on_node(env) -> int:
    """Tasks of this srun step on this node, from SLURM's task counts ("8(x2)" = 8 on each of 2 nodes, "2,1"
    = 2 then 1), which exist whatever flags made them; SLURM_GPUS_ON_NODE counts GPUs, not tasks. fasttrain
    splits -b and -j per node, so every node must run the same number of tasks."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return int(env.get("SLURM_NTASKS_PER_NODE", "1"))
    counts = []
    for part in spec.split(","):
        n, _, times = part.partition("(x")
        counts += [int(n)] * int(times.rstrip(")") or 1)
    if len(set(counts)) > 1:
        raise UserError(f"SLURM runs a different number of tasks on each node ({spec}); -b and -j are split "
                        "per node, so give every node the same count (srun --ntasks-per-node=N)")
    return counts[0]


def _slurm_gpu_index(local_rank: int, local_world: int) -> int:
    """`srun --gpus-per-task=1` (or --gpu-bind) shows each task only its own GPU(s): use the first visible one.
    With every GPU of the node visible to every task (--gres=gpu:8 alone), the task's local id picks one."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return local_rank if visible >= local_world else 0


def read_launch(cfg: DistConfig, spawned_local_rank: int | None, nproc: int) -> Launch:
    """Ranks, sizes and GPU from wherever the launch put them. Nothing is changed, only read."""
    env = os.environ
    if spawned_local_rank is not None:  # reference: --multiprocessing-distributed
        nodes = max(cfg.world_size, 1)
        node_rank = max(cfg.rank, 0)
        return Launch(node_rank * nproc + spawned_local_rank, spawned_local_rank, nodes * nproc, nproc,
                      cfg.dist_url, spawned_local_rank)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything that sets the env:// variables)
        local = int(env.get("LOCAL_RANK", 0))
        return Launch(int(env["RANK"]), local, int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", 1)),
                      cfg.dist_url or "env://", local)
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun, one task per GPU
        if not cfg.dist_url and "MASTER_ADDR" not in env:
            raise UserError("under srun, set MASTER_ADDR and MASTER_PORT (e.g. the first host of "
                            "$SLURM_JOB_NODELIST) or pass --dist-url tcp://HOST:PORT")
        local, local_world = int(env.get("SLURM_LOCALID", 0)), slurm_tasks_on_node(env)
        return Launch(int(env["SLURM_PROCID"]), local, int(env["SLURM_NTASKS"]), local_world,
                      cfg.dist_url or "env://", _slurm_gpu_index(local, local_world))
    if cfg.world_size > 1:  # reference: one process per node, --dist-url --world-size N --rank R
        if cfg.rank < 0 or not cfg.dist_url:
            raise UserError("--world-size > 1 needs --rank and --dist-url (or launch with torchrun)")
        return Launch(cfg.rank, 0, cfg.world_size, 1, cfg.dist_url, 0)
    return Launch(0, 0, 1, 1, "", 0)


def setup(cfg: DistConfig, device: str, spawned_local_rank: int | None = None, nproc: int = 1) -> DistInfo:
    """Join the process group if the launch asks for one; return where this process stands."""
    at = read_launch(cfg, spawned_local_rank, nproc)
    dev = pick_device(device, at.gpu_index, cfg.gpu if at.world_size == 1 else None)
    if dev.type == "cuda":
        # Also with one process (`--gpu N`): streams made without a device (side streams, DALI's, cuDNN's
        # handles) go to the current device, which is GPU 0 until this is set.
        torch.cuda.set_device(dev)
    if at.world_size == 1 and spawned_local_rank is None:
        return DistInfo(device=dev)
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("--dist-backend nccl needs CUDA GPUs; on CPU use gloo (or leave it on auto)")
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    tdist.init_process_group(backend, init_method=at.init_method, world_size=at.world_size, rank=at.rank,
                             timeout=datetime.timedelta(seconds=cfg.timeout_s), **kwargs)
    return DistInfo(at.rank, at.local_rank, at.world_size, at.local_world_size, dev, backend)


def teardown(info: DistInfo) -> None:
    if info.distributed and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank (a collective: call it at the same step everywhere)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int, info: DistInfo) -> int:
    """The largest of every rank's `value`, on every rank (a collective, as any_rank)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=info.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.distributed:
        tdist.barrier(device_ids=[info.device.index]) if info.backend == "nccl" else tdist.barrier()


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank (pickled in memory between our own processes: a checkpoint read once)."""
    if not info.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=info.device if info.backend == "nccl" else None)
    return box[0]


@torch.no_grad()
def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does at the start of each
    forward. After the last train step each rank holds the statistics of its own last batch; validation
    runs on the un-wrapped module, so without this rank r would score its share of val with its own
    statistics, and the recorded accuracy would not be that of the checkpoint (rank 0's model)."""
    if info.distributed:
        for buf in model.buffers():
            tdist.broadcast(buf, src=0)
