"""--loader hybrid: the torchvision workers and DALI (CPU-only mode here) feeding the same steps, each batch whole
from one source: the epoch's order, exact resume, per-rank sharding, exact validation, bad files of both."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("nvidia.dali")

from fasttrain import cli  # noqa: E402
from fasttrain.config import DataConfig  # noqa: E402
from fasttrain.data import hybrid, torchvision_backend  # noqa: E402
from fasttrain.data.base import Layout, check_shard_sizes  # noqa: E402
from fasttrain.data.scan import Split, scan_dataset  # noqa: E402
from fasttrain.dist import DistInfo  # noqa: E402
from fasttrain.errors import UserError  # noqa: E402
from fasttrain.metrics import read_jsonl  # noqa: E402
from fasttrain.schedules import Resolution  # noqa: E402

from .conftest import REPO  # noqa: E402

CPU = torch.device("cpu")


def build(train: Split, val: Split, share=0.5, batch=8, world=1, rank=0, max_bad=10, seed=3, workers=0):
    """The hybrid loader on DALI's CPU mode; its workers in this process (-j 0: no fork here, where other
    tests' DALI pipelines may still be prefetching; the CLI tests below run real workers)."""
    steps, batch = check_shard_sizes(len(train), world, batch, len(val))
    cfg = DataConfig(image_size=32, max_bad_files=max_bad, prefetch=2, dali_share=share)
    sizes = Resolution.from_config(cfg)
    return hybrid.build(train, val, batch, workers, cfg, Layout(CPU, False), DistInfo(rank=rank, world_size=world),
                        seed, steps, sizes, sizes.val_size)


def torchvision_only(train: Split, val: Split, batch=8, world=1, rank=0, seed=3):
    steps, batch = check_shard_sizes(len(train), world, batch, len(val))
    return torchvision_backend.build(train, val, batch, 0, 32, Layout(CPU, False), rank, world, seed, steps, 10)


def tagged(split: Split) -> Split:
    """The same files, each labelled with its index: the labels that come out say which files were read."""
    return Split(split.root, split.classes, tuple((p, i) for i, (p, _) in enumerate(split.samples)))


def epoch(batches, n=0, start_step=0):
    batches.set_epoch(n, start_step)
    return list(batches)


def tags(batches) -> list[int]:
    return [int(t) for _, labels in batches for t in labels]


def same(a, b):
    assert len(a) == len(b)
    for (x, lx), (y, ly) in zip(a, b):
        assert torch.equal(x, y) and torch.equal(lx, ly)  # the same crops and flips, not only the same files


def test_dali_batches_spread_evenly_by_the_share():
    assert hybrid.dali_batch_ids(6, 1 / 3) == [2, 5]
    assert hybrid.dali_batch_ids(10, 0.5) == [1, 3, 5, 7, 9]
    ids = hybrid.dali_batch_ids(1000, 13 / 32)
    assert len(ids) == 406 and max(b - a for a, b in zip(ids, ids[1:])) == 3  # never more than ceil(32/13) apart
    assert hybrid.round_share(0.574) == 18 / 32 and hybrid.round_share(0.001) == 1 / 32
    assert hybrid.round_share(0.999) == 31 / 32
    with pytest.raises(UserError, match="--dali-share"):
        hybrid.dali_batch_ids(4, 1.5)


def test_each_batch_whole_from_one_source_in_the_epoch_order(tiny_data):
    """The hybrid's epoch is the other loaders' epoch: the same files in the same batches. The workers' batches
    are bitwise those of the torchvision loader alone (crops seeded per sample); DALI's are its own crops of
    the same files."""
    train, val = (tagged(s) for s in scan_dataset(tiny_data))
    tr, va = build(train, val, share=1 / 3)
    tv, _ = torchvision_only(train, val)
    for e in range(2):
        got, want = epoch(tr, e), epoch(tv, e)
        assert tags(got) == tags(want) and len(got) == len(tr) == 12
        dali = set(hybrid.dali_batch_ids(12, 1 / 3))
        assert dali == {2, 5, 8, 11}
        for k, ((x, y), (x0, y0)) in enumerate(zip(got, want)):
            assert torch.equal(y, y0) and x.shape == x0.shape == (8, 3, 32, 32)
            assert torch.equal(x, x0) != (k in dali)  # a DALI batch is DALI's crops, a worker batch the workers'
    tr.close()
    va.close()


def test_resume_mid_epoch_continues_with_the_same_batches(tiny_data, monkeypatch):
    """A loader stopped mid-epoch (its state taken as a checkpoint takes it) and a new one loaded from that
    state continue with exactly the batches of a loader never stopped, from either source, into the next
    epoch; DALI's part restores its own checkpoint instead of replaying what was done."""
    train, val = scan_dataset(tiny_data)
    tr, _ = build(train, val)
    straight = [epoch(tr, e) for e in range(3)]
    tr.close()
    for stop in (3, 4):  # the next batch from DALI (odd positions at share 0.5), then from the workers
        tr, _ = build(train, val)
        epoch(tr, 0)
        tr.set_epoch(1)
        it = iter(tr)
        for _ in range(stop):
            next(it)
        state = tr.state_dict()
        it.close()
        tr.close()
        assert state["share"] == 0.5 and state["dali"]["next"] == [1, stop // 2]
        fresh, _ = build(train, val)
        fresh.load_state_dict(state)
        same(epoch(fresh, 1, start_step=stop), straight[1][stop:])
        same(epoch(fresh, 2), straight[2])
        assert fresh.dali.builds == 1  # restored from DALI's checkpoint, nothing replayed
        fresh.close()


def test_a_state_of_another_share_is_not_used(tiny_data, capsys):
    train, val = (tagged(s) for s in scan_dataset(tiny_data))
    tr, _ = build(train, val, share=0.5)
    straight = epoch(tr, 0)
    tr.set_epoch(0)
    it = iter(tr)
    next(it)
    state = tr.state_dict()
    it.close()
    tr.close()
    other, _ = build(train, val, share=0.25)
    other.load_state_dict(state)
    assert "--dali-share 0.5" in capsys.readouterr().err
    assert tags(epoch(other, 0, start_step=1)) == tags(straight[1:])  # the same files from that step on
    other.close()


def test_ranks_read_disjoint_shards_and_val_scores_every_image_once(tiny_data):
    train, val = (tagged(s) for s in scan_dataset(tiny_data))
    seen_train, seen_val = [], []
    for rank in range(2):
        tr, va = build(train, val, world=2, rank=rank, batch=5)  # 48 a rank: 9 steps of 5; 36 val images
        tv, _ = torchvision_only(train, val, world=2, rank=rank, batch=5)
        got = tags(epoch(tr, 1))
        assert got == tags(epoch(tv, 1)) and len(got) == 45
        seen_train.append(got)
        first = tags(va)
        assert tags(va) == first  # a second pass (the next epoch) scores the same images
        seen_val += first
        tr.close()
        va.close()
    assert not set(seen_train[0]) & set(seen_train[1])
    assert sorted(seen_val) == list(range(36))


def test_bad_files_of_both_sources_are_named_and_counted_once(tiny_data, tmp_path, capsys):
    """A bad file in a workers' batch and one in a DALI batch: each named in a warning, the epoch keeps its steps,
    and --max-bad-files counts both sources' files together."""
    root = tmp_path / "bad"
    shutil.copytree(tiny_data, root)
    train0, val0 = scan_dataset(str(root))
    tv, _ = torchvision_only(train0, val0)
    order = tv.loader.sampler
    order.set_epoch(0)
    first = [i for i, _, _ in order]
    bad = [train0.samples[first[0]][0], train0.samples[first[8]][0]]  # in batch 0 (workers), batch 1 (DALI)
    for path in bad:
        open(path, "wb").write(b"not an image\n" * 20)
    train, val = scan_dataset(str(root))
    tr, _ = build(train, val)
    batches = epoch(tr, 0)
    err = capsys.readouterr().err
    assert all(f"skipped bad file {p}" in err for p in bad), err
    assert len(batches) == 12 and batches[0][1].shape == (7,) and batches[1][1].shape == (8,)  # DALI fills in
    assert sorted(tr.cpu.budget.seen) == sorted(bad) and tr.cpu.budget is tr.dali.budget
    tr.close()
    tr, _ = build(train, val, max_bad=1)
    with pytest.raises(UserError, match=r"more than --max-bad-files=1"):
        epoch(tr, 0)
    tr.close()


def test_stop_mid_epoch_then_resume_equals_straight_run_through_the_cli(tiny_data, tmp_path, monkeypatch):
    """--loader hybrid: a stop at step 4 of 6, then --resume auto, ends with the same weights as a run never
    stopped; the checkpoint holds the share and DALI's own position."""
    args = ["train", tiny_data, "--loader", "hybrid", "--dali-share", "0.5", "--device", "cpu", "-j", "1", "-b", "16",
            "--image-size", "32", "--seed", "3", "-p", "2", "--lr", "0.05", "--epochs", "2"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "straight")]) == 0
    calls = iter([0, signal.SIGTERM])  # at_sync runs at steps 2, 4, ...: stop at step 4
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: next(calls, 0))
    assert cli.main([*args, "--output-dir", str(tmp_path / "stopped")]) == 143
    load = lambda d: torch.load(tmp_path / d / "checkpoint.pth.tar", map_location="cpu", weights_only=True)  # noqa: E731
    ck = load("stopped")
    (pos,) = ck["data"]
    assert pos["share"] == 0.5 and pos["dali"]["next"] == [0, 2]  # 4 batches in: 2 of them DALI's
    assert ck["config"]["data"]["loader"] == "hybrid"
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: 0)
    # --loader auto on resume keeps the checkpoint's loader and share
    resumed = [a for a in args if a not in ("hybrid", "--dali-share", "0.5")]
    resumed[resumed.index("--loader")] = "--calibrate"
    resumed.insert(resumed.index("--calibrate") + 1, "auto")
    assert cli.main([*resumed, "--output-dir", str(tmp_path / "stopped"), "--resume", "auto"]) == 0
    a, b = load("straight")["state_dict"], load("stopped")["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_gloo_ranks_measure_the_share_and_train(tiny_data, tmp_path):
    """2 real processes: --loader hybrid with the share measured by both ranks at once (a collective
    calibration), every rank the same steps, every val image once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fasttrain",
           "train", tiny_data, "--loader", "hybrid", "--calibrate", "fresh", "--device", "cpu", "-j", "1", "-b", "16",
           "--image-size", "32", "--epochs", "1", "--seed", "1", "-p", "2", "--output-dir", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "FASTTRAIN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loader   hybrid" in r.stdout and "the loaders' measured ratio" in r.stdout, r.stdout
    rows = read_jsonl(os.path.join(tmp_path, "out", "metrics.jsonl"))
    assert [(row["val_samples"], row["train_samples"]) for row in rows] == [(36, 96)]
    assert os.listdir(tmp_path / "cache" / "loader-profiles")  # rank 0 cached what both measured
