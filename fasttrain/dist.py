"""Distributed set-up: read the launch environment once, return a frozen DistInfo.

Three ways in, one result:
- torchrun (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), multi-node by rendezvous;
- SLURM's srun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; MASTER_ADDR/PORT or --dist-url from the user);
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

    def per_rank_workers(self, node_workers: int) -> int:
        return (node_workers + self.local_world_size - 1) // self.local_world_size


def pick_device(want: str, local_rank: int, gpu: int | None) -> torch.device:
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible (use --device cpu)")
    index = gpu if gpu is not None else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"GPU {index} asked for, but only {torch.cuda.device_count()} visible")
    return torch.device("cuda", index)


def _launch_env(cfg: DistConfig, spawned_local_rank: int | None, nproc: int) -> tuple[int, int, int, int, str]:
    """(rank, local_rank, world_size, local_world_size, init_method) from wherever the launch put them."""
    env = os.environ
    if spawned_local_rank is not None:  # reference: --multiprocessing-distributed
        nodes = max(cfg.world_size, 1)
        node_rank = max(cfg.rank, 0)
        return (node_rank * nproc + spawned_local_rank, spawned_local_rank, nodes * nproc, nproc, cfg.dist_url)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or anything that sets the env:// variables)
        local = int(env.get("LOCAL_RANK", 0))
        return (int(env["RANK"]), local, int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", 1)),
                cfg.dist_url or "env://")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun
        if not cfg.dist_url and "MASTER_ADDR" not in env:
            raise UserError("under srun, set MASTER_ADDR and MASTER_PORT (e.g. the first host of "
                            "$SLURM_JOB_NODELIST) or pass --dist-url tcp://HOST:PORT")
        ntasks_node = int(env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_GPUS_ON_NODE", "1")).split("(")[0])
        return (int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                ntasks_node, cfg.dist_url or "env://")
    if cfg.world_size > 1:  # reference: one process per node, --dist-url --world-size N --rank R
        if cfg.rank < 0 or not cfg.dist_url:
            raise UserError("--world-size > 1 needs --rank and --dist-url (or launch with torchrun)")
        return cfg.rank, 0, cfg.world_size, 1, cfg.dist_url
    return 0, 0, 1, 1, ""


def setup(cfg: DistConfig, device: str, spawned_local_rank: int | None = None, nproc: int = 1) -> DistInfo:
    """Join the process group if the launch asks for one; return where this process stands."""
    rank, local_rank, world, local_world, init = _launch_env(cfg, spawned_local_rank, nproc)
    dev = pick_device(device, local_rank, cfg.gpu if world == 1 else None)
    if dev.type == "cuda":
        # Also with one process (`--gpu N`): streams made without a device (side streams, DALI's, cuDNN's
        # handles) go to the current device, which is GPU 0 until this is set.
        torch.cuda.set_device(dev)
    if world == 1 and spawned_local_rank is None:
        return DistInfo(device=dev)
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("--dist-backend nccl needs CUDA GPUs; on CPU use gloo (or leave it on auto)")
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    tdist.init_process_group(backend, init_method=init, world_size=world, rank=rank,
                             timeout=datetime.timedelta(seconds=cfg.timeout_s), **kwargs)
    return DistInfo(rank, local_rank, world, local_world, dev, backend)


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


def barrier(info: DistInfo) -> None:
    if info.distributed:
        tdist.barrier(device_ids=[info.device.index]) if info.backend == "nccl" else tdist.barrier()
