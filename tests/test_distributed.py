"""Distributed training with 2 real Gloo processes on CPU (torchrun, and the reference's spawn flags).

Every test runs subprocesses under a timeout: a hang is a failure, not a stuck CI job.
"""

from __future__ import annotations

import os
import re
import socket
import sys

import pytest
import torch

from fasttrain.data import dali_backend
from fasttrain.data.torchvision_backend import ResumableSampler
from fasttrain.metrics import read_jsonl

from .conftest import REPO, make_tree, run_group

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
WORKER = os.path.join(REPO, "tests", "fault_worker.py")
ARGS = ["--device", "cpu", "-j", "0", "-b", "16", "--image-size", "32", "--seed", "1", "-p", "2", "--lr", "0.05"]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """3 classes x 32 train (96) and 9 val (27: odd, not a multiple of any per-rank batch used here)."""
    return make_tree(tmp_path_factory.mktemp("odd"), n_train=32, n_val=9, classes=("checker_cool", "dots_warm",
                                                                                    "rings_cool"))


def torchrun(nproc, *args, env=None, timeout=240, extra=()):
    return run_group([*TORCHRUN, "--nproc-per-node", nproc, *extra, WORKER, "train", *args], timeout, env)


def rank_frames(stderr: str) -> list[str]:
    """Traceback frames in fasttrain's own source files or the test worker: a rank's traceback. Matched by
    the files' exact folders, not by a name: torchrun's own traceback names its venv, which may sit under a
    checkout folder called fasttrain."""
    import fasttrain
    ours = (os.path.dirname(os.path.abspath(fasttrain.__file__)) + os.sep, WORKER)
    return [ln for ln in stderr.splitlines() if ln.strip().startswith('File "') and
            any(ln.strip()[6:].startswith(o) for o in ours)]


def test_rank_frames_tells_a_rank_traceback_from_torchrun_s_own():
    """The check above must hold in any checkout folder: a venv under .../fasttrain/.venv is not ours."""
    import fasttrain
    pkg = os.path.dirname(os.path.abspath(fasttrain.__file__))
    torchrun_own = ('  File "/home/u/fasttrain/.venv/lib/python3.11/site-packages/torch/distributed/run.py", '
                    'line 1, in main')
    assert rank_frames(torchrun_own) == []
    rank = f'  File "{pkg}{os.sep}train.py", line 9, in run'
    assert rank_frames(f"{torchrun_own}\n{rank}") == [rank]
    assert rank_frames(f'  File "{WORKER}", line 3, in <module>') != []


def state(out):
    return torch.load(os.path.join(out, "checkpoint.pth.tar"), map_location="cpu", weights_only=True)


def test_torchrun_two_ranks_scores_every_val_image_once(odd_data, tmp_path):
    r = torchrun(2, odd_data, *ARGS, "--epochs", "2", "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["val_samples"] for row in rows] == [27, 27]
    assert all(row["train_samples"] == 96 for row in rows)  # 2 ranks x 6 steps x 8
    assert r.stdout.count("fasttrain: epoch 1:") == 1  # only rank 0 logs
    # step lines are summed over both ranks, as the epoch line is: the last one is the epoch's
    last = re.search(r"Epoch: \[1\]: \[6/6\]\tLoss (\S+)\tAcc@1 +(\S+)", r.stdout).groups()
    assert last == (f"{rows[1]['train_loss']:.4e}", f"{rows[1]['train_top1']:.2f}")


@pytest.mark.slow
def test_two_ranks_equal_one_rank_at_same_global_batch(odd_data, tmp_path):
    """Also with accumulation under DDP (the first batch of each window skips the all-reduce: no_sync):
    2 ranks x 4 images x 2 batches = 1 rank x 16 images, the same images each step."""
    env = {"FT_TEST_TINY_MODEL": "1"}
    one = torchrun(1, odd_data, *ARGS, "--epochs", "1", "--output-dir", tmp_path / "one", env=env)
    two = torchrun(2, odd_data, *ARGS, "--epochs", "1", "--output-dir", tmp_path / "two", env=env)
    accum = torchrun(2, odd_data, *ARGS, "-b", "8", "--grad-accum-steps", "2", "--epochs", "1",
                     "--output-dir", tmp_path / "accum", env=env)
    assert one.returncode == 0 and two.returncode == 0 and accum.returncode == 0, two.stderr[-3000:]
    a = state(tmp_path / "one")["state_dict"]
    for other in ("two", "accum"):
        b = state(tmp_path / other)["state_dict"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(a["0.weight"], torch.zeros_like(a["0.weight"]))


@pytest.mark.slow
def test_batchnorm_two_ranks_record_what_eval_of_the_checkpoint_gives(odd_data, tmp_path):
    """A BatchNorm model on 2 ranks, and a training set smaller than one batch per process (-b 128: 64 per
    process, 48 images each): it trains (one step of 48 on each rank, with a warning), and the val accuracy
    and loss recorded in metrics.jsonl are what `fasttrain eval` gives for the saved checkpoint (every rank
    validates with rank 0's BatchNorm statistics, the checkpoint's, not those of its own last batch)."""
    env = {"FT_TEST_TINY_MODEL": "bn", "OMP_NUM_THREADS": "1"}
    r = torchrun(2, odd_data, *ARGS, "-b", "128", "--epochs", "2", "--output-dir", tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "96 training images make less than one batch of 64 for each of the 2 process(es)" in r.stderr
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(row["train_samples"], row["val_samples"]) for row in rows] == [(96, 27), (96, 27)]
    e = run_group([sys.executable, WORKER, "eval", odd_data, "--checkpoint", tmp_path / "checkpoint.pth.tar",
                   "--device", "cpu", "-j", "0", "-b", "16"], 120, env)
    assert e.returncode == 0, e.stderr[-3000:]
    top1, loss = re.search(r"val: Acc@1 ([\d.]+) .* loss ([\d.]+) on 27 images", e.stdout).groups()
    assert top1 == f"{rows[-1]['val_top1']:.3f}" and float(loss) == pytest.approx(rows[-1]["val_loss"], rel=1e-5)


def test_shards_disjoint_cover_and_reshuffle():
    n, batch, world = 103, 8, 2
    steps = n // world // batch
    epochs = []
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            s = ResumableSampler(n, rank, world, seed=5, batch=batch, steps=steps)
            s.set_epoch(epoch)
            shards.append([item[0] for item in s])
        assert all(len(sh) == steps * batch for sh in shards)  # same number of steps on every rank
        assert not set(shards[0]) & set(shards[1])
        epochs.append(shards)
    assert epochs[0][0] != epochs[1][0]  # set_epoch reshuffles
    seen = set().union(*epochs[0], *epochs[1])
    assert len(seen) > n - world * batch  # whole batches only: at most world*batch-1 left out per epoch


@pytest.mark.parametrize("world", [1, 3, 8])
def test_synthetic_val_scores_exactly_50000_images(world):
    """--dummy's val set is 50,000 images however many ranks share it, as with real data."""
    from fasttrain.data import synthetic
    from fasttrain.data.base import Layout
    total = 0
    for rank in range(world):
        train, val = synthetic.build(256, world, 8, 10, Layout(torch.device("cpu"), False), 0, rank)
        val.set_epoch(0)
        sizes = [labels.shape[0] for _, labels in val]
        assert len(sizes) == len(val) and min(sizes) > 0
        total += sum(sizes)
    assert total == 50_000 and len(train) == 1_281_167 // world // 256


@pytest.mark.slow
def test_one_rank_failing_ends_both_in_bounded_time(odd_data, tmp_path):
    r = torchrun(2, odd_data, *ARGS, "--epochs", "2", "--output-dir", tmp_path, "--dist-timeout", "30",
                 env={"FT_TEST_RAISE": "1:3", "FT_TEST_TINY_MODEL": "1"}, timeout=120)
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("loader,stop", [("torchvision", "ctrl-c"), pytest.param("dali", "sigterm", marks=pytest.mark.skipif(
    not dali_backend.available(), reason="nvidia-dali is not installed"))])
def test_stop_signal_saves_stops_all_and_restart_resumes_exactly(odd_data, tmp_path, loader, stop):
    """SIGTERM to one rank, or Ctrl-C (SIGINT to torchrun and to every rank at once, and torchrun passes it on
    once more): every rank stops at the same sync point, a checkpoint is saved, each exits 128 + the signal,
    and `--resume auto` ends with the weights and metrics of a run never stopped."""
    env = {"FT_TEST_TINY_MODEL": "1", "OMP_NUM_THREADS": "1"}
    args = [*ARGS, "--epochs", "2", "--loader", loader] + (["-j", "1"] if loader == "dali" else [])
    straight = torchrun(2, odd_data, *args, "--output-dir", tmp_path / "straight", env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "preempted"
    fault, code, name = {"ctrl-c": ("FT_TEST_CTRL_C", 130, "SIGINT"), "sigterm": ("FT_TEST_SIGTERM", 143, "SIGTERM")}[stop]
    r = torchrun(2, odd_data, *args, "--output-dir", out, env={**env, fault: "1:3"})
    assert r.returncode != 0 and f"stopped by {name} at epoch 0 step 4" in r.stdout, r.stderr[-3000:]
    # No rank's traceback (torchrun itself reports the signal it got with one of its own, outside fasttrain)
    assert not rank_frames(r.stderr), r.stderr[-3000:]
    if stop == "sigterm":
        assert f"exitcode  : {code}" in r.stderr
    ck = state(out)
    assert (ck["epoch"], ck["step"], len(ck["rng"])) == (0, 4, 2)
    if loader == "dali":  # each rank's own DALI checkpoint, 4 batches of 8 into epoch 0
        assert [d["next"] for d in ck["data"]] == [[0, 4], [0, 4]]
        assert ck["data"][0]["dali"] != ck["data"][1]["dali"]
    r = torchrun(2, odd_data, *args, "--output-dir", out, "--resume", "auto", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = state(tmp_path / "straight")["state_dict"], state(out)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = ("epoch", "train_loss", "train_top1", "train_samples", "val_loss", "val_samples")
    rows = [[row[k] for k in keys] for row in read_jsonl(out / "metrics.jsonl")]
    assert rows == [[row[k] for k in keys] for row in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]


@pytest.mark.slow
def test_kill9_of_the_whole_job_then_resume_exactly(odd_data, tmp_path):
    """The node dies (kill -9 of torchrun and both ranks, at an arbitrary moment after the first checkpoint):
    at most one checkpoint interval is lost, and `--resume auto` ends with the weights of a run never killed."""
    import signal
    import subprocess
    import time
    env = {**os.environ, "FT_TEST_TINY_MODEL": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [*ARGS, "--epochs", "2", "--checkpoint-interval", "2", "--resume", "auto"]
    straight = torchrun(2, odd_data, *args, "--output-dir", tmp_path / "straight", env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out, log = tmp_path / "killed", tmp_path / "steps.log"
    cmd = [*TORCHRUN, "--nproc-per-node", "2", WORKER, "train", odd_data, *args, "--output-dir", str(out)]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env={**env, "FT_TEST_STEP_LOG": str(log)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while not (os.path.exists(log) and open(log).read().count("\n") >= 7) and time.time() - t0 < 180:
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.005)
        time.sleep(0.03)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done, ck = open(log).read().count("\n"), state(out)  # 6 steps per epoch (96 images / 2 ranks / 8)
    assert done - (ck["epoch"] * 6 + ck["step"]) <= 2 and len(ck["rng"]) == 2
    r = torchrun(2, odd_data, *args, "--output-dir", out, env=env)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a, b = state(tmp_path / "straight")["state_dict"], state(out)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [row["epoch"] for row in read_jsonl(out / "metrics.jsonl")] == [0, 1]


@pytest.mark.slow
def test_bad_files_under_two_ranks(odd_data, tmp_path):
    """A bad train file in one rank's shard and a bad val file: named once each, both ranks run every step
    (the torchvision loader drops the file from its batch), val scores every good image exactly once."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(odd_data, root)
    (root / "train" / "dots_warm" / "0004.jpg").write_bytes(b"not an image\n" * 20)
    (root / "val" / "rings_cool" / "0002.jpg").write_bytes(b"")
    r = torchrun(2, root, *ARGS, "--epochs", "2", "--output-dir", tmp_path / "out",
                 env={"FT_TEST_TINY_MODEL": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("skipped bad file") == 2, r.stderr[-3000:]
    assert "0004.jpg: not an image file" in r.stderr and "0002.jpg: empty file" in r.stderr
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [(row["val_samples"], row["train_samples"]) for row in rows] == [(26, 95), (26, 95)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_reference_spawn_flags_and_each_process_gets_its_share_of_the_cores(odd_data, tmp_path):
    """--multiprocessing-distributed --nproc-per-node 2 on CPU: each spawned process runs torch with its share
    of the cores (cores / 2 processes), as torchrun's OMP_NUM_THREADS
    gives it; spawned children used to start one thread per core each (here 5-7x slower than torchrun)."""
    from fasttrain.cpu_share import cores
    log = tmp_path / "threads.log"
    cmd = [sys.executable, WORKER, "train", odd_data, *ARGS, "--epochs", "1", "--output-dir", tmp_path,
           "--dist-url", f"tcp://127.0.0.1:{_free_port()}", "--world-size", "1", "--rank", "0",
           "--multiprocessing-distributed", "--nproc-per-node", "2"]
    r = run_group(cmd, timeout=240, env={"FT_TEST_THREAD_LOG": str(log), "OMP_NUM_THREADS": None})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch    16 global = 8 per process x 2 processes" in r.stdout
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["val_samples"] == 27
    share = max(1, cores() // 2)
    assert sorted(log.read_text().split("\n")[:-1]) == [f"0 {share}", f"1 {share}"]
    assert f"{share} torch thread" in r.stdout


@pytest.mark.slow
def test_resume_reads_the_checkpoint_on_each_rank_or_sends_it_where_a_rank_cannot_see_it(odd_data, tmp_path):
    """Ranks that share the file system each load the checkpoint themselves (only rank 0's verdict goes
    through the process group); a rank that cannot see the file gets it from rank 0 instead and never opens
    it; both resume to the same weights."""
    import shutil
    env = {"FT_TEST_TINY_MODEL": "bn", "OMP_NUM_THREADS": "1"}
    first = torchrun(2, odd_data, *ARGS, "--epochs", "1", "--output-dir", tmp_path / "a", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shared = torchrun(2, odd_data, *ARGS, "--epochs", "2", "--output-dir", tmp_path / "a", "--resume", "auto", env=env)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert "at epoch 1 step 0 (each rank read it from the shared file system)" in shared.stdout
    alone = torchrun(2, odd_data, *ARGS, "--epochs", "2", "--output-dir", tmp_path / "b", "--resume", "auto",
                     env={**env, "FT_TEST_NO_SHARED_DISK": "1"})
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "(read by rank 0 and sent to the other 1: not every rank can see the file)" in alone.stdout
    a, b = state(tmp_path / "a")["state_dict"], state(tmp_path / "b")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
