"""Watching a run: TensorBoard events (read back with tensorboard's own reader), curves.png and `fasttrain
plot`, --profile's trace, time and memory in metrics.jsonl, the run summary, host memory staying flat."""

from __future__ import annotations

import json
import os
import statistics
import shutil
import subprocess
import sys

import pytest
import torch

from fasttrain import checkpoint as ckpt_io
from fasttrain import cli, monitor
from fasttrain.metrics import read_jsonl

from .conftest import REPO, make_tree, run_group
from .fault_worker import tiny_model

WORKER = os.path.join(REPO, "tests", "fault_worker.py")

pytest.importorskip("tensorboard")  # in fasttrain[dev]; without it every test here would only skip its checks

COMMON = ["--device", "cpu", "-j", "0", "-b", "16", "--image-size", "32", "--seed", "3", "-p", "2",
          "--lr", "0.05", "--warmup-epochs", "0.5"]  # tiny_data: 96 train images = 6 steps an epoch


def train(data, out, *extra):
    assert cli.main(["train", str(data), *COMMON, "--output-dir", str(out), *extra]) == 0
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    return acc


def scalars(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_run_writes_tensorboard_curves_time_and_memory(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    out = tmp_path / "r"
    rows = train(tiny_data, out, "--epochs", "3")
    for r in rows:
        assert r["epoch_seconds"] > 0 and r["host_rss_mb"] > 50  # a Python process with torch: far above 50 MiB
        assert "gpu_max_mem_mb" not in r  # CUDA only
    walls = [r["wall_seconds"] for r in rows]
    assert walls == sorted(walls) and walls[0] >= rows[0]["epoch_seconds"]

    acc = events(out)
    numeric = {k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "time"}
    assert {"train/loss", "train/top1", "train/lr", "train/images_per_sec", "train/data_wait"} | \
        {f"epoch/{k}" for k in numeric} <= set(acc.Tags()["scalars"])
    assert [s for s, _ in scalars(acc, "train/loss")] == list(range(2, 19, 2))  # global steps, every print step
    for key in ("val_top1", "train_loss", "epoch_seconds", "host_rss_mb", "lr"):  # at each epoch's last step
        assert scalars(acc, f"epoch/{key}") == [(6 * (i + 1), pytest.approx(r[key], rel=1e-6))
                                                for i, r in enumerate(rows)]
    # at an epoch's last print step the running train loss is the epoch's (one process)
    assert dict(scalars(acc, "train/loss"))[12] == pytest.approx(rows[1]["train_loss"], rel=1e-6)
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"arch": "resnet18"' in config and '"epochs": 3' in config

    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    assert "ETA 0:" in captured.out  # the plain progress lines (not a terminal here)
    epoch_line = next(line for line in captured.out.splitlines() if line.startswith("fasttrain: epoch 2:"))
    assert " s, run 0:" in epoch_line and "ETA 0:00:00" in epoch_line and " MiB" in epoch_line
    summary = captured.out.strip().splitlines()[-1]  # one stream: step lines, epoch lines and the summary
    best = max(rows, key=lambda r: r["val_top1"])
    assert summary.startswith(f"fasttrain: done: best val Acc@1 {best['val_top1']:.3f} (epoch {best['epoch']}), "
                              f"last {rows[-1]['val_top1']:.3f} (epoch 2);")
    assert "train img/s" in summary and "curves.png" in summary and f"{out}/tb/" in summary


def test_resumed_run_continues_the_same_curves(tiny_data, tmp_path, monkeypatch):
    """A resume after a crash that left events past its checkpoint (kill -9 between the epoch's events and
    its checkpoint) shows every step once, with the values of a run never stopped."""
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    straight = tmp_path / "straight"
    train(tiny_data, straight, "--epochs", "2")
    out = tmp_path / "crashed"
    train(tiny_data, out, "--epochs", "1")
    shutil.copy(out / ckpt_io.LATEST, tmp_path / "after-epoch-0")
    train(tiny_data, out, "--epochs", "2", "--resume", "auto")
    shutil.copy(tmp_path / "after-epoch-0", out / ckpt_io.LATEST)  # as if epoch 1's checkpoint never landed
    rows = train(tiny_data, out, "--epochs", "2", "--resume", "auto")

    a, b = events(straight), events(out)
    for tag in ("train/loss", "train/top1", "train/lr", "epoch/val_top1", "epoch/train_loss"):
        assert scalars(b, tag) == scalars(a, tag), tag
    assert [s for s, _ in scalars(b, "train/loss")] == list(range(2, 13, 2))  # no step twice, none missing
    # wall time goes on from the checkpoint: the resumed epoch ends after epoch 0's wall time plus its own
    assert rows[1]["wall_seconds"] >= rows[0]["wall_seconds"] + rows[1]["epoch_seconds"]
    assert ckpt_io.load(str(out / ckpt_io.LATEST))["wall_seconds"] >= rows[1]["wall_seconds"]


def test_plot_overlays_runs_and_curves_need_matplotlib_only_optionally(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    a, b = tmp_path / "lr05", tmp_path / "lr01"
    train(tiny_data, a, "--epochs", "2", "--no-tensorboard")
    monkeypatch.setattr("fasttrain.plot.matplotlib_missing", lambda: "matplotlib is not installed (test)")
    rows_b = train(tiny_data, b, "--epochs", "3", "--lr", "0.01", "--no-tensorboard")
    assert "fasttrain: no curves.png: matplotlib is not installed (test)" in capsys.readouterr().out
    assert not (b / "curves.png").exists() and not (b / "tb").exists()
    monkeypatch.undo()

    assert cli.main(["plot", str(a), str(b), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    from fasttrain.plot import draw
    fig = draw([str(a), str(b)])
    by_epoch, by_time = fig.axes[0], fig.axes[1]
    assert [line.get_label() for line in by_epoch.lines] == ["lr05", "lr01"]
    assert list(by_epoch.lines[1].get_xdata()) == [0, 1, 2]
    assert list(by_time.lines[1].get_xdata()) == pytest.approx([r["wall_seconds"] / 60 for r in rows_b])
    assert list(by_time.lines[1].get_ydata()) == [r["val_top1"] for r in rows_b]
    assert [t.get_text() for t in by_epoch.texts] == ["lr05", "lr01"]  # each named at its line's end

    capsys.readouterr()
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no metrics.jsonl" in err


def test_profile_writes_a_trace_and_training_goes_on(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    out = tmp_path / "p"
    rows = train(tiny_data, out, "--epochs", "2", "--profile", "1:3", "--no-tensorboard")
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["train_samples"] == 96 for r in rows)
    with open(out / "profile" / "steps-1-3.json") as fh:
        trace = json.load(fh)
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#1", "ProfilerStep#2"}
    assert "aten::convolution" in names and any(n.startswith("Optimizer.step") for n in names)
    story = capsys.readouterr().out
    assert "top 10 ops by self cpu time total" in story and "aten::" in story
    assert "sorted by self_cpu_time_total" in (out / "profile" / "ops.txt").read_text()
    assert not (out / "tb").exists()


@pytest.mark.parametrize("spec,message", [("20", "--profile must be START:END"), ("3:3", "--profile must be"),
                                          ("a:b", "--profile must be"), ("5:2", "--profile must be"),
                                          ("2:7", "goes past the 6 train steps of an epoch")])
def test_bad_profile_window_is_one_line_error(tiny_data, tmp_path, capsys, spec, message):
    code = cli.main(["train", str(tiny_data), *COMMON, "--output-dir", str(tmp_path), "--profile", spec])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[-1].startswith("fasttrain: error:") and message in err[-1]
    assert not any("Traceback" in line or "error" in line for line in err[:-1])


def test_host_memory_counts_child_processes():
    """DataLoader workers are child processes: their memory counts (each resident page once)."""
    before = monitor.host_memory_mb()
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; x = b'1' * (200 << 20); print(flush=True); "
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # the 200 MiB are resident
        assert monitor.host_memory_mb() - before > 180
    finally:
        child.stdin.close()
        child.wait()


# --- memory stays flat --------------------------------------------------------------------------------------
# Each run in a fresh process, as a real one (pytest's own process has freed heap memory that would hide
# growth). Images large enough (256 px, 128 px crops, batch 32) that keeping a few batches or a pipeline per
# epoch adds tens of MiB, and a 2-conv model so an epoch takes about a second. Before each reading the worker
# calls glibc's malloc_trim(0), so host_rss_mb is memory in use rather than memory glibc keeps for reuse:
# without it DALI CPU's reading climbs for ~12 epochs and then levels off (glibc keeping memory its threads
# freed; measured in benchmarks/RESULTS.md, 2026-11-27 08:00 and 09:25), which would make any small bound a
# coin toss.
# A leak grows for good, so the last epoch is compared with epoch 1 (epoch 0 fills caches and pools).
EPOCHS, BOUND_MB = 8, 48
MEM = ["--device", "cpu", "-j", "2", "-b", "32", "--image-size", "128", "--seed", "0", "-p", "2", "--lr", "0.05",
       "--no-tensorboard"]


@pytest.fixture(scope="module")
def large_images(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("large"), n_train=32, n_val=8, size=(256, 256))


def growth_mb(rows) -> float:
    """Median of the last 3 epochs' readings minus the median of epochs 1-3. host_rss_mb counts shared pages
    proportionally (PSS), so it moves by ~20 MiB when other processes map the same libraries (other jobs on a
    shared machine); a leak grows for good and moves both medians apart by several epochs' worth."""
    mb = [r["host_rss_mb"] for r in rows]
    return statistics.median(mb[-3:]) - statistics.median(mb[1:4])


def train_for_memory(data, out, loader, epochs=EPOCHS, env=None):
    r = run_group([sys.executable, WORKER, "train", data, *MEM, "--loader", loader, "--epochs", epochs,
                   "--output-dir", out], 300, {"FT_TEST_TINY_MODEL": "1", "FT_TEST_MALLOC_TRIM": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_host_memory_stays_flat(large_images, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    rows = train_for_memory(large_images, tmp_path / loader, loader)
    assert growth_mb(rows) < BOUND_MB, [round(r["host_rss_mb"]) for r in rows]


@pytest.mark.slow
def test_host_memory_check_catches_a_leak(large_images, tmp_path):
    """The check above can fail: a run that keeps 24 MiB more each epoch goes past the bound."""
    rows = train_for_memory(large_images, tmp_path / "leak", "torchvision", env={"FT_TEST_LEAK_MB": "24"})
    assert growth_mb(rows) > BOUND_MB, [round(r["host_rss_mb"]) for r in rows]


def test_gpu_idle_is_the_gaps_between_steps_read_only_once_done():
    """metrics.GpuIdle, as train_one_epoch uses it, with fake CUDA events on a fake clock: idle is the time
    from one step's end to the next one's start, over idle + busy; an event not done yet is left for the
    next collect(), so reading it never waits on the GPU."""
    from fasttrain.metrics import GpuIdle
    clock = {"t": 0.0, "done_until": float("inf")}

    class Event:
        def record(self):
            self.t = clock["t"]

        def query(self):
            return self.t <= clock["done_until"]

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    idle = GpuIdle(torch.device("cpu"), event=Event)
    for start, end in ((0, 1), (3, 4), (4, 5)):  # GPU waited 2 s for the 2nd batch, none for the 3rd
        clock["t"] = start
        idle.start()
        clock["t"] = end
        idle.end()
    clock["done_until"] = 4.5  # the last step's end event has not happened yet
    idle.collect()
    assert idle.fraction() == pytest.approx(2 / 4) and len(idle.marks) == 2
    clock["done_until"] = float("inf")
    idle.collect()
    assert idle.fraction() == pytest.approx(2 / 5) and idle.marks == []
    assert GpuIdle(torch.device("cpu")).fraction() is None  # no GPU, no figure


def test_gpu_memory_in_use_counts_what_torch_does_not_allocate(monkeypatch):
    """On CUDA each epoch records the tensors' peak (torch's allocator) and what the driver says is in use on
    the device (DALI's buffers, the CUDA context, torch's cache): faked here, there is no GPU."""
    from types import SimpleNamespace

    from fasttrain.watch import Watch
    cuda = torch.device("cuda", 0)
    # Only torch's byte counters are faked (what the driver and the allocator would say); fasttrain's own
    # reading of them (MiB, in use = total - free) runs as it does on a GPU.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * 2**20, 100 * 2**20))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 25 * 2**20 + 2**19)
    assert monitor.gpu_in_use_mb(cuda) == (40.0, 100.0) and monitor.gpu_in_use_mb(torch.device("cpu")) is None
    fake = SimpleNamespace(clock=SimpleNamespace(end_epoch=lambda val_seconds: 3.0, wall_seconds=lambda: 9.0),
                           dist=SimpleNamespace(device=cuda, is_main=True))
    out = Watch.time_and_memory(fake, 0.5)
    assert (out["gpu_max_mem_mb"], out["gpu_used_mb"], out["gpu_total_mb"]) == (25.5, 40.0, 100.0)
