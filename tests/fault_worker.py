"""Test-only entry point: `[torchrun ...] tests/fault_worker.py train ARGS` runs fasttrain's CLI with faults
injected through environment variables, so fault tests are exact and deterministic:

    FT_TEST_TINY_MODEL=1         a small CNN without BatchNorm or dropout (per-rank batch statistics would
                                 otherwise make 2 ranks differ from 1 rank at the same global batch)
    FT_TEST_TINY_MODEL=bn        the same with a BatchNorm layer (running statistics: per-rank buffers)
    FT_TEST_RAISE=RANK:STEP      that rank raises inside its STEP-th train step (1-based, counted per process)
    FT_TEST_SIGTERM=RANK:STEP    that rank sends itself SIGTERM at its STEP-th step (first torchrun attempt only)
    FT_TEST_CTRL_C=RANK:STEP     that rank sends SIGINT to the job's process group, as Ctrl-C at a terminal does
                                 (the test starts each job in a group of its own)
    FT_TEST_NAN=RANK:STEP        that rank's loss is NaN at its STEP-th step
    FT_TEST_HANG_IN_SAVE=N       the N-th checkpoint write stops half-way (partial temporary file written),
                                 touches OUTPUT_DIR/hanging and sleeps, for the test to kill -9 it there
    FT_TEST_STEP_LOG=PATH        append one line to PATH after each finished train step (rank 0): what a
                                 kill -9 test counts as work done
    FT_TEST_BATCH_LOG=PATH       append one line per train step to PATH (rank 0): a CRC of the batch's labels,
                                 the float64 sum of its images, the same weighted by column (a flip changes
                                 it) and the sum of absolute values (the scale for a tolerance); a host sync
                                 per step. So a stopped and resumed run's batches can be compared with an
                                 uninterrupted run's (benchmarks/resume_check.py)
    FT_TEST_LEAK_MB=N            every validation keeps N MiB more (resident): a leak the memory test must see
    FT_TEST_MALLOC_TRIM=1        before each host memory reading, glibc's malloc_trim(0) hands freed heap memory
                                 back to the OS: the reading is then memory in use, not memory glibc keeps
    FT_TEST_EAGER_COMPILE=1      --compile-step's function traced by dynamo but run by its eager backend
                                 (inductor's code generation takes minutes on 2 cores)
    FT_TEST_NO_SHARED_DISK=RANK  that rank cannot see the run's files (a node without the shared file system):
                                 its stat of a checkpoint finds nothing, and reading one fails the test
    FT_TEST_THREAD_LOG=PATH      each process appends "RANK THREADS" when training starts (torch's intra-op
                                 threads); also in processes --multiprocessing-distributed spawns, which run
                                 this file as __mp_main__ (so the patch is made at import, not under __main__)
"""

import os
import signal
import sys
import time
import zlib

import torch

import fasttrain.checkpoint as C
import fasttrain.train as T
from fasttrain.cli import main
from fasttrain.engine import Trainer


def tiny_model(cfg, num_classes):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, num_classes))


def tiny_bn_model(cfg, num_classes):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, num_classes))


def _at(var):
    if var not in os.environ:
        return None
    rank, step = os.environ[var].split(":")
    return int(rank), int(step)


def _patch_steps():
    raise_at, term_at, nan_at = _at("FT_TEST_RAISE"), _at("FT_TEST_SIGTERM"), _at("FT_TEST_NAN")
    ctrl_c_at = _at("FT_TEST_CTRL_C")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    rank = int(os.environ.get("RANK", "0"))
    log = os.environ.get("FT_TEST_STEP_LOG") if rank == 0 else None
    batch_log = os.environ.get("FT_TEST_BATCH_LOG") if rank == 0 else None
    original = Trainer.train_step
    count = [0]

    def append(path, line):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, line.encode())
        os.close(fd)

    def logged(self, images, labels, meter):
        if batch_log:
            crc = zlib.crc32(labels.cpu().numpy().tobytes())
            x = images.double()
            column = torch.arange(x.shape[-1], dtype=torch.float64, device=x.device)
            sums = torch.stack([x.sum(), (x * column).sum(), x.abs().sum()]).tolist()
            append(batch_log, f"labels {crc:08x} n {labels.shape[0]} sum {sums[0]!r} wsum {sums[1]!r} "
                              f"abs {sums[2]!r}\n")
        out = original(self, images, labels, meter)
        if log:
            append(log, "step\n")
        return out

    def train_step(self, images, labels, meter):
        count[0] += 1
        if raise_at == (rank, count[0]):
            raise RuntimeError(f"injected failure on rank {rank} at step {count[0]}")
        if term_at == (rank, count[0]) and first_attempt:
            os.kill(os.getpid(), signal.SIGTERM)
        if ctrl_c_at == (rank, count[0]) and first_attempt:
            # torchrun starts each worker in a session of its own: a terminal's Ctrl-C reaches torchrun's group
            # only, and torchrun passes it on. Without torchrun, this process's own group (the test's job).
            os.killpg(os.getpgid(os.getppid()) if "TORCHELASTIC_RUN_ID" in os.environ else os.getpgrp(),
                      signal.SIGINT)
            # Under torchrun the signal comes back through torchrun, which may take a while on a loaded
            # machine: wait for it here, so the stop lands at the next sync point, as a test expects.
            from fasttrain.signals import stop_requested
            deadline = time.monotonic() + 30
            while not stop_requested() and time.monotonic() < deadline:
                time.sleep(0.01)
        if nan_at == (rank, count[0]):
            crit = self.criterion
            self.criterion = lambda logits, y: crit(logits, y) * float("nan")
            try:
                return logged(self, images, labels, meter)
            finally:
                self.criterion = crit
        return logged(self, images, labels, meter)
    Trainer.train_step = train_step


def _patch_save():
    hang_at = int(os.environ["FT_TEST_HANG_IN_SAVE"])
    original, count = C.atomic_save, [0]

    def atomic_save(obj, path):
        count[0] += 1
        if count[0] != hang_at:
            return original(obj, path)
        with open(f"{path}.tmp.{os.getpid()}", "wb") as fh:
            fh.write(b"half a checkpoint")
        open(os.path.join(os.path.dirname(path), "hanging"), "w").close()
        time.sleep(600)
    C.atomic_save = atomic_save


def _patch_leak():
    mb, kept, original = int(os.environ["FT_TEST_LEAK_MB"]), [], T.evaluate

    def evaluate(*args, **kw):
        kept.append(torch.ones(mb << 18))  # float32, written: resident
        return original(*args, **kw)
    T.evaluate = evaluate


def _patch_trim():
    import ctypes

    import fasttrain.monitor as M
    libc, original = ctypes.CDLL("libc.so.6"), M.host_memory_mb

    def host_memory_mb(pid=None):
        libc.malloc_trim(0)
        return original(pid)
    M.host_memory_mb = host_memory_mb


def _patch_no_shared_disk():
    if int(os.environ.get("RANK", "0")) != int(os.environ["FT_TEST_NO_SHARED_DISK"]):
        return
    import fasttrain.checkpointer as K
    K.file_stamp = lambda path: None

    def load(path, *a, **kw):
        raise AssertionError(f"rank {os.environ['RANK']} read {path}, which it cannot see")
    C.load = load


def _patch_thread_log():
    path, original = os.environ["FT_TEST_THREAD_LOG"], Trainer.train_step
    logged = []

    def train_step(self, images, labels, meter):
        if not logged:
            logged.append(1)
            with open(path, "a") as fh:
                fh.write(f"{self.dist.rank} {torch.get_num_threads()}\n")
        return original(self, images, labels, meter)
    Trainer.train_step = train_step


if os.environ.get("FT_TEST_THREAD_LOG"):
    _patch_thread_log()


if __name__ == "__main__":
    if os.environ.get("FT_TEST_TINY_MODEL"):
        T.build_model = tiny_bn_model if os.environ["FT_TEST_TINY_MODEL"] == "bn" else tiny_model
    _patch_steps()
    if "FT_TEST_HANG_IN_SAVE" in os.environ:
        _patch_save()
    if "FT_TEST_LEAK_MB" in os.environ:
        _patch_leak()
    if os.environ.get("FT_TEST_MALLOC_TRIM"):
        _patch_trim()
    if os.environ.get("FT_TEST_EAGER_COMPILE"):
        import fasttrain.capture as K
        real = K.compile_fn
        K.compile_fn = lambda fn, mode: real(fn, mode, backend="eager")
    if "FT_TEST_NO_SHARED_DISK" in os.environ:
        _patch_no_shared_disk()
    sys.exit(main(sys.argv[1:]))
