"""Launch environments (each SLURM form the README shows, torchrun inside srun) and stop signals, tested
with patched environments: no cluster, no GPU, no process group is needed."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from fasttrain import dist as D
from fasttrain.config import DistConfig
from fasttrain.errors import UserError

# srun --ntasks-per-node=8 --gpus-per-task=1 on 2 nodes: task 11 = node 1, local id 3. SLURM sets the
# requested count only when --ntasks-per-node is given, the step's task layout always.
SRUN = {"SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
        "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "SLURM_GPUS_ON_NODE": "8", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", *SRUN)


def setup_under(monkeypatch, env: dict, visible_gpus: int, device="cuda"):
    """dist.setup() as that launch would run it: (DistInfo, the process group it asked for)."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible_gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    joined = {}
    monkeypatch.setattr(D.tdist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    info = D.setup(DistConfig(), device)
    return info, joined


def test_srun_gpus_per_task_uses_the_one_gpu_each_task_sees(monkeypatch):
    info, joined = setup_under(monkeypatch, SRUN, visible_gpus=1)  # --gpus-per-task=1: CUDA_VISIBLE_DEVICES=3
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (11, 3, 16, 8)
    assert info.device == torch.device("cuda", 0)
    assert (joined["backend"], joined["rank"], joined["world_size"], joined["init_method"]) == ("nccl", 11, 16, "env://")


def test_srun_with_every_gpu_visible_picks_by_local_id(monkeypatch):
    info, _ = setup_under(monkeypatch, SRUN, visible_gpus=8)  # --gres=gpu:8 without per-task binding
    assert info.device == torch.device("cuda", 3)


def test_srun_tasks_per_node_come_from_slurms_task_counts(monkeypatch):
    """srun -N2 -n8 (no --ntasks-per-node) on nodes of 8 GPUs: 4 tasks a node, whatever the GPU count."""
    env = {**SRUN, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    del env["SLURM_NTASKS_PER_NODE"]
    info, _ = setup_under(monkeypatch, env, visible_gpus=2)  # --gpus-per-task=2
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (5, 1, 8, 4)
    assert info.device == torch.device("cuda", 0) and info.per_rank_batch(1024) == 256


def test_srun_on_cpu_and_its_errors(monkeypatch):
    info, joined = setup_under(monkeypatch, SRUN, visible_gpus=0, device="cpu")
    assert info.device == torch.device("cpu") and joined["backend"] == "gloo" and info.local_world_size == 8
    uneven = {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}
    with pytest.raises(UserError, match=r"different number of tasks on each node \(2\(x3\),1\)"):
        setup_under(monkeypatch, uneven, visible_gpus=1)
    no_master = {k: v for k, v in SRUN.items() if not k.startswith("MASTER_")}
    with pytest.raises(UserError, match="under srun, set MASTER_ADDR"):
        setup_under(monkeypatch, no_master, visible_gpus=1)


def test_sbatch_single_task_is_one_process(monkeypatch):
    info, joined = setup_under(monkeypatch, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
                               visible_gpus=1)
    assert not info.distributed and not joined and info.device == torch.device("cuda", 0)


def test_torchrun_inside_srun_follows_torchrun(monkeypatch):
    """One srun task per node running torchrun: torchrun's variables win over SLURM's."""
    env = {**SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
           "RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}
    info, _ = setup_under(monkeypatch, env, visible_gpus=8)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (13, 5, 16, 8)
    assert info.device == torch.device("cuda", 5)


HANDLER = r"""
import os, signal
from fasttrain import signals
clock = [0.0]
signals._now = lambda: clock[0]
signals.install()
os.kill(os.getpid(), signal.SIGINT)                   # Ctrl-C: a request, no KeyboardInterrupt
assert signals.stop_requested() == signal.SIGINT
clock[0] = 0.01
os.kill(os.getpid(), signal.SIGINT)                   # the same keypress passed on by a launcher
os.kill(os.getpid(), signal.SIGTERM)
assert signals.stop_requested() == signal.SIGINT
print("still running", flush=True)
clock[0] = 5.0
os.kill(os.getpid(), signal.SIGINT)                   # a second Ctrl-C: stop now
print("not stopped", flush=True)
"""


def test_ctrl_c_is_a_stop_request_and_a_second_one_stops_at_once():
    r = subprocess.run([sys.executable, "-c", HANDLER], capture_output=True, text=True, timeout=60)
    assert r.stdout == "still running\n" and r.returncode == -signal.SIGINT, (r.returncode, r.stderr[-2000:])


def test_one_process_with_gpu_n_makes_that_gpu_current(monkeypatch):
    """`--gpu 1` without a process group: torch.cuda.set_device(cuda:1), so side streams, DALI and cuDNN
    handles made without an explicit device land on GPU 1, not GPU 0 (was: set only under DDP)."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    info = D.setup(DistConfig(gpu=1), "cuda")
    assert info.device == torch.device("cuda", 1) and not info.distributed
    assert current == [torch.device("cuda", 1)]
