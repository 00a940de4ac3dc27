"""Checkpoints and resume in the settings users run, not only the tests' usual ones: no --seed, -p unlike
the checkpoint interval, checkpoints the reference script wrote, weights_only loading, other class names,
eval next to a live run, a training set smaller than one batch."""

from __future__ import annotations

import os
import signal
import shutil

import pytest
import torch
import torchvision

from fasttrain import checkpoint as ckpt_io
from fasttrain import cli
from fasttrain.config import ModelConfig
from fasttrain.data.demo import CLASSES
from fasttrain.metrics import read_jsonl
from fasttrain.model import build_model

from .conftest import make_tree

NO_SEED = ["--device", "cpu", "-j", "0", "-b", "16", "--image-size", "32", "-p", "2", "--lr", "0.05",
           "--warmup-epochs", "0.5"]


def train(data, out, *extra, code=0):
    assert cli.main(["train", str(data), *NO_SEED, "--output-dir", str(out), *extra]) == code
    return read_jsonl(os.path.join(out, "metrics.jsonl")) if code == 0 else None


def load(out, name=ckpt_io.LATEST):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def same_weights(a, b):
    return all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def small_model(cfg, num_classes):
    """Dropout uses the RNG every step; fast enough to run the same training four times."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(8, num_classes))


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One short epoch of resnet18 (with --seed 5): its folder, for the tests that only read it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_data, out, "--epochs", "1", "--seed", "5", "--steps-per-epoch", "2")
    return out


def test_resume_without_seed_is_exact_and_keeps_the_runs_seed(tiny_data, tmp_path, monkeypatch, capsys):
    """No --seed: the run draws one and its checkpoint keeps it, so a run stopped mid-epoch and resumed (with
    no --seed, or another one, which is ignored with a warning) ends as a straight run with that seed."""
    monkeypatch.setattr("fasttrain.train.build_model", small_model)
    stopped = tmp_path / "stopped"
    calls = iter([0, signal.SIGTERM])  # sync points at steps 2, 4: stop at step 4 of 6
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: next(calls, 0))
    train(tiny_data, stopped, "--epochs", "2", code=143)
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: 0)
    ck = load(stopped)
    assert (ck["epoch"], ck["step"]) == (0, 4) and isinstance(ck["seed"], int)
    shutil.copytree(stopped, tmp_path / "stopped2")
    train(tiny_data, stopped, "--epochs", "2", "--resume", "auto")
    capsys.readouterr()
    train(tiny_data, tmp_path / "stopped2", "--epochs", "2", "--resume", "auto", "--seed", str(ck["seed"] + 1))
    assert f"warning: --seed {ck['seed'] + 1} ignored: the resumed run continues with its own seed {ck['seed']}" \
        in capsys.readouterr().err
    straight = train(tiny_data, tmp_path / "straight", "--epochs", "2", "--seed", str(ck["seed"]))
    s = load(tmp_path / "straight")
    assert same_weights(s, load(stopped)) and same_weights(s, load(tmp_path / "stopped2"))
    keys = ("train_loss", "train_samples", "val_loss")
    assert [[r[k] for k in keys] for r in read_jsonl(stopped / "metrics.jsonl")] == \
        [[r[k] for k in keys] for r in straight]


def test_checkpoint_interval_counts_steps_whatever_the_print_frequency(tiny_data, tmp_path, monkeypatch):
    """-p 4 with --checkpoint-interval 3 (6 steps an epoch): saves at step 3 of each epoch and at each
    epoch end, not only where print steps and interval meet."""
    monkeypatch.setattr("fasttrain.train.build_model", small_model)
    saved, real = [], ckpt_io.atomic_save

    def spy(obj, path):
        saved.append((obj["epoch"], obj["step"]))
        real(obj, path)
    monkeypatch.setattr(ckpt_io, "atomic_save", spy)
    train(tiny_data, tmp_path / "r", "--epochs", "2", "-p", "4", "--checkpoint-interval", "3", "--seed", "1")
    assert saved == [(0, 3), (1, 0), (1, 3), (2, 0)]


def test_checkpoints_load_with_weights_only_and_as_weights(trained):
    """Every value in our checkpoint loads with weights_only=True (torch.load's default), so `--pretrained
    --weights` takes our own checkpoints."""
    ck = torch.load(trained / ckpt_io.LATEST)
    assert len(ck["rng"]) == 1 and isinstance(ck["rng"][0]["numpy"][1], list)
    model = build_model(ModelConfig(arch="resnet18", pretrained=True, weights=str(trained / ckpt_io.LATEST)), 4)
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in model.state_dict().items())


def test_a_checkpoint_with_pickled_objects_is_refused(trained, tiny_data, tmp_path, capsys):
    """A file that would run code when unpickled (here it names builtins.print) is never loaded: exit 2 and
    one line, for --resume, eval and --weights alike."""
    path = tmp_path / "evil.pth.tar"
    torch.save({**load(trained), "hook": print}, path)
    for argv in (["train", tiny_data, *NO_SEED, "--resume", str(path), "--output-dir", str(tmp_path / "o")],
                 ["eval", tiny_data, "--checkpoint", str(path), "--device", "cpu", "-j", "0"],
                 ["train", tiny_data, *NO_SEED, "--pretrained", "--weights", str(path), "--output-dir",
                  str(tmp_path / "o")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("fasttrain: error:") and "pickled Python objects" in err[-1], err[-1]
        assert not any("Traceback" in line for line in err)


def test_a_file_that_is_no_checkpoint_is_called_that(tiny_data, tmp_path, capsys):
    """A text file given as a checkpoint is not "pickled Python objects" (torch words every weights_only
    failure alike), and the error does not pass on torch's advice to load it with weights_only=False."""
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint\n")
    assert cli.main(["eval", tiny_data, "--checkpoint", str(path), "--device", "cpu", "-j", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fasttrain: error: checkpoint {path} cannot be read (UnpicklingError: ") and \
        err.endswith("it may be truncated or not a PyTorch file") and len(err.splitlines()) == 1, err
    assert "pickled Python objects" not in err and "weights_only" not in err


def reference_checkpoint(path, epoch=1, num_classes=4):
    """What pytorch/examples imagenet/main.py saves: its DataParallel/DDP module's keys (`module.`),
    best_acc1 a tensor, SGD state after a step, and StepLR's state (which counts epochs)."""
    wrapped = torch.nn.DataParallel(torchvision.models.resnet18(num_classes=num_classes))
    opt = torch.optim.SGD(wrapped.parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    wrapped(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    torch.save({"epoch": epoch, "arch": "resnet18", "state_dict": wrapped.state_dict(),
                "best_acc1": torch.tensor(31.25), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               path)
    return {k.removeprefix("module."): v for k, v in wrapped.state_dict().items()}


def test_reference_checkpoint_resumes_evaluates_and_loads_as_weights(tiny_data, tmp_path, capsys):
    path = tmp_path / "ref.pth.tar"
    want = reference_checkpoint(path)
    model = build_model(ModelConfig(arch="resnet18", weights=str(path)), 4)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert cli.main(["eval", tiny_data, "--checkpoint", str(path), "--device", "cpu", "-j", "0", "-b", "16"]) == 0
    rows = train(tiny_data, tmp_path / "r", "--resume", str(path), "--epochs", "2", "--lr-schedule", "cosine",
                 "--steps-per-epoch", "2")
    assert "resumed from" in capsys.readouterr().out and [r["epoch"] for r in rows] == [1]
    # The schedule continues from the checkpoint's epoch, counted in our steps (its StepLR counted epochs).
    # metrics.jsonl's lr is what the epoch's first step used (warm-up 0.5 then cosine over 1.5 epochs: at
    # epoch 1.0, 0.75 of --lr), lr_last its last step's (epoch 1.5: 0.25); the optimizer's LR after that
    # last step is the end of the schedule, 0.
    assert rows[0]["lr"] == pytest.approx(0.05 * 0.75) and rows[0]["lr_last"] == pytest.approx(0.05 * 0.25)
    ck = load(tmp_path / "r")
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert ck["epoch"] == 2 and ck["best_acc1"] >= 31.25 and not any(k.startswith("module.") for k in ck["state_dict"])


def test_other_class_names_are_refused_on_eval_and_resume(trained, tmp_path, capsys):
    """The same number of classes with other names: exit 2 naming both lists, not a silent 'accuracy'."""
    other = make_tree(tmp_path / "other", n_train=4, n_val=2, classes=CLASSES[4:8])
    ck = str(trained / ckpt_io.LATEST)
    for argv in (["eval", other, "--checkpoint", ck, "--device", "cpu", "-j", "0"],
                 ["train", other, *NO_SEED, "--resume", ck, "--output-dir", str(tmp_path / "o")]):
        assert cli.main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert ("trained on other classes than DATA has (4 against 4; only in the checkpoint: [hstripes_cool, "
                "hstripes_warm, vstripes_cool, vstripes_warm]; only in DATA: [checker_cool, checker_warm, "
                "dots_cool, dots_warm])") in last, last


def test_eval_writes_nothing_in_a_live_runs_folder(trained, tiny_data, capsys):
    """A run still writing there has its next checkpoint in a temporary file: eval must leave it alone."""
    tmp = trained / f"{ckpt_io.LATEST}.tmp.424242"
    tmp.write_bytes(b"half a checkpoint")
    before = sorted(os.listdir(trained))
    try:
        assert cli.main(["eval", tiny_data, "--checkpoint", str(trained / ckpt_io.LATEST), "--device", "cpu",
                         "-j", "0", "-b", "7"]) == 0
        assert sorted(os.listdir(trained)) == before
    finally:
        tmp.unlink()
    row = read_jsonl(trained / "metrics.jsonl")[-1]
    assert f"Acc@1 {row['val_top1']:.3f}" in capsys.readouterr().out


def test_training_set_smaller_than_one_batch_trains(tmp_path, capsys, monkeypatch):
    """12 train images with -b 16: the reference trains on them, so does fasttrain (one step of 12, warned)."""
    monkeypatch.setattr("fasttrain.train.build_model", small_model)
    data = make_tree(tmp_path / "small", n_train=3, n_val=2)
    rows = train(data, tmp_path / "r", "--epochs", "2", "--seed", "0")
    assert "12 training images make less than one batch of 16" in capsys.readouterr().err
    assert [(r["train_samples"], r["val_samples"]) for r in rows] == [(12, 8), (12, 8)]
