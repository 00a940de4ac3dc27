"""The command line: every reference flag parses with its meaning; bad input is one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fasttrain import cli
from fasttrain.config import Config

from .conftest import REPO, run_cli


def parse(*argv) -> Config:
    ns = cli.build_parser().parse_args(["train", *argv])
    return cli.parse_config(ns)


def test_reference_defaults_kept(monkeypatch):
    c = parse("DATA")
    assert (c.model.arch, c.data.workers, c.optim.epochs, c.optim.start_epoch, c.data.batch_size) == \
        ("resnet18", None, 90, 0, 256)  # workers None: the reference's 4, capped at the cores (below)
    from fasttrain import cpu_share
    monkeypatch.setattr(cpu_share, "cores", lambda: 16)
    assert cpu_share.workers_per_process(None, 1) == (4, "") and cpu_share.workers_per_process(None, 2)[0] == 2
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.run.print_freq) == (0.1, 0.9, 1e-4, 10)
    assert (c.run.resume, c.run.evaluate, c.model.pretrained, c.run.seed, c.dist.gpu) == ("", False, False, None, None)
    assert (c.dist.world_size, c.dist.rank, c.dist.multiprocessing_distributed, c.data.dummy) == (-1, -1, False, False)


def test_every_reference_flag_parses():
    c = parse("/data/imagenet", "-a", "resnet50", "-j", "8", "--epochs", "3", "--start-epoch", "1", "-b", "512",
              "--lr", "0.2", "--momentum", "0.8", "--wd", "5e-5", "-p", "20", "--resume", "ck.pth", "-e",
              "--world-size", "2", "--rank", "1", "--dist-url", "tcp://10.0.0.1:2345", "--dist-backend", "gloo",
              "--seed", "7", "--gpu", "0", "--multiprocessing-distributed", "--dummy")
    assert c.data.data == "/data/imagenet" and c.model.arch == "resnet50" and c.data.workers == 8
    assert (c.optim.epochs, c.optim.start_epoch, c.data.batch_size, c.optim.lr) == (3, 1, 512, 0.2)
    assert (c.optim.momentum, c.optim.weight_decay, c.run.print_freq, c.run.resume) == (0.8, 5e-5, 20, "ck.pth")
    assert c.run.evaluate and c.dist.multiprocessing_distributed and c.data.dummy
    assert (c.dist.world_size, c.dist.rank, c.dist.dist_url, c.dist.dist_backend) == (2, 1, "tcp://10.0.0.1:2345", "gloo")
    assert (c.run.seed, c.dist.gpu, c.data.loader) == (7, 0, "synthetic")


def test_long_aliases():
    c = parse("D", "--arch", "vgg11", "--workers", "1", "--batch-size", "8", "--learning-rate", "0.5",
              "--weight-decay", "0", "--print-freq", "1", "--evaluate")
    assert (c.model.arch, c.data.workers, c.data.batch_size, c.optim.lr, c.optim.weight_decay) == ("vgg11", 1, 8, 0.5, 0)
    assert c.run.print_freq == 1 and c.run.evaluate


def test_fasttrain_flags():
    c = parse("D", "--device", "cpu", "--loader", "torchvision", "--amp", "bf16", "--channels-last", "--compile",
              "--compile-mode", "reduce-overhead", "--cudnn-benchmark", "--image-size", "160", "--lr-schedule", "cosine", "--warmup-epochs", "2",
              "--label-smoothing", "0.1", "--output-dir", "out")
    assert (c.run.device, c.data.loader, c.run.amp, c.data.image_size) == ("cpu", "torchvision", "bf16", 160)
    assert c.run.channels_last and c.run.compile and c.run.cudnn_benchmark and c.run.compile_mode == "reduce-overhead"
    assert (c.optim.lr_schedule, c.optim.warmup_epochs, c.optim.label_smoothing, c.run.output_dir) == \
        ("cosine", 2.0, 0.1, "out")


def test_toml_config_and_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('arch = "resnet34"\nbatch-size = 128\nlr = 0.05\nchannels_last = true\n')
    c = parse("D", "--config", str(f), "--lr", "0.3")
    assert (c.model.arch, c.data.batch_size, c.optim.lr, c.run.channels_last) == ("resnet34", 128, 0.3, True)


def test_toml_unknown_key_is_error(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text("batch_sise = 3\n")
    assert cli.main(["train", "D", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttrain: error:") and "batch_sise" in err and err.count("\n") == 1


@pytest.mark.parametrize("line,needle", [
    ("batch-size = 1.5", "--batch-size must be an integer, got 1.5"),
    ('workers = "4"', "--workers must be an integer, got '4'"),
    ("lr = true", "--lr must be a number, got True"),
    ("arch = 18", "--arch must be a string, got 18"),
])
def test_toml_value_of_the_wrong_type_is_error(line, needle, tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    assert cli.main(["train", "D", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttrain: error:") and needle in err and err.count("\n") == 1
    f.write_text("lr = 1\nwarmup-epochs = 2\n")  # an integer is a fine number
    assert parse("D", "--config", str(f)).optim.lr == 1.0


def test_resume_auto_needs_output_dir(capsys):
    """Without --output-dir each run gets a new timestamped folder, where `auto` would never find the last run."""
    assert cli.main(["train", "D", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--resume auto continues the run in --output-dir" in err and err.count("\n") == 1
    assert parse("D", "--resume", "auto", "--output-dir", "runs/x").run.resume == "auto"


def test_no_data_means_demo_defaults():
    c = parse()
    assert c.data.data is None and c.data.image_size == 64 and c.optim.epochs == 10 and c.optim.lr == 0.05
    assert c.optim.lr_schedule == "cosine" and c.optim.warmup_epochs == 1.0
    assert parse("--epochs", "3").optim.epochs == 3


def test_a_schedule_chosen_over_the_demo_drops_the_demos_warm_up():
    """The demo's 1-epoch warm-up belongs to its cosine schedule: a recipe's triangular schedule on the demo
    data was refused for a --warmup-epochs the user never gave."""
    c = parse("--recipe", "rn18-16ep")
    assert c.optim.lr_schedule == "triangular" and c.optim.warmup_epochs == 0
    assert parse("--lr-schedule", "step").optim.warmup_epochs == 0
    assert parse("--lr-schedule", "step", "--warmup-epochs", "2").optim.warmup_epochs == 2


def test_a_toml_table_is_named_in_the_error(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[data]\nbatch_size = 32\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fasttrain: error: config file {path}: [data] is a table, and fasttrain's config has none: one key per "
        "long flag name at the top level (e.g. batch-size = 256, lr = 0.1)")


@pytest.mark.parametrize("argv,needle", [
    (["train", "--bogus-flag"], "unrecognized arguments"),
    (["train", "D", "-b", "0"], "--batch-size must be at least 1"),
    (["train", "D", "--amp", "fp8"], "invalid choice"),
    (["train", "D", "--pretrained"], "--weights"),
    # these ended in a traceback from torch (label smoothing, momentum, weight decay) or ran with nonsense
    (["train", "D", "--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["train", "D", "--momentum", "-1"], "--momentum must be 0 or more"),
    (["train", "D", "--wd", "-0.1"], "--wd must be 0 or more"),
    (["train", "D", "--start-epoch", "-1"], "--start-epoch must be 0 or more"),
    (["train", "D", "--checkpoint-interval", "-5"], "--checkpoint-interval must be 0 or more"),
    (["train", "D", "--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more"),
    (["train", "D", "--steps-per-epoch", "-1"], "--steps-per-epoch must be 0 or more"),
    (["train", "D", "--max-bad-files", "-1"], "--max-bad-files must be 0 or more"),
    (["train", "D", "--prefetch", "0"], "--prefetch must be at least 1"),
    (["train", "--dummy", "--num-classes", "0"], "--num-classes must be at least 1"),
])
def test_parse_errors_are_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttrain: error:") and needle in err and err.count("\n") == 1


def _tree_without(tiny_data, tmp_path, drop):
    import shutil
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    if drop:
        shutil.rmtree(dst / drop)
    return dst


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("no_train", "no train/ folder"),
    ("no_val", "no val/ folder"),
    ("empty_class", "has no images"),
    ("unknown_arch", "unknown arch 'resnet1000'"),
    ("resume_missing", "does not exist"),
])
def test_bad_input_exit_2_one_line(case, needle, tiny_data, tmp_path, capsys):
    data = _tree_without(tiny_data, tmp_path, {"no_train": "train", "no_val": "val"}.get(case))
    if case == "empty_class":
        os.makedirs(data / "train" / "zz_empty")
        os.makedirs(data / "val" / "zz_empty")
    argv = ["train", str(tmp_path / "nope") if case == "missing" else str(data), "--device", "cpu", "-j", "0",
            "--epochs", "1", "-b", "8", "--output-dir", str(tmp_path / "out")]
    argv += {"unknown_arch": ["-a", "resnet1000"], "resume_missing": ["--resume", str(tmp_path / "x.pth")]}.get(case, [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fasttrain: error:") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_subprocess_error_has_no_traceback(tmp_path):
    r = run_cli("train", tmp_path / "missing", "--device", "cpu", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("fasttrain: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_performance_toggles_auto_per_device():
    from fasttrain.config import resolve_toggles
    c = parse("D")
    assert (c.run.amp, c.run.channels_last, c.run.compile, c.run.cudnn_benchmark) == ("auto", None, None, None)
    cpu = resolve_toggles(c.run, "cpu")
    assert (cpu.amp, cpu.channels_last, cpu.compile, cpu.cudnn_benchmark) == ("none", False, False, False)
    off = resolve_toggles(parse("D", "--no-compile", "--amp", "none", "--channels-last").run, "cpu")
    assert (off.amp, off.channels_last, off.compile) == ("none", True, False)


def test_importing_fasttrain_changes_no_environment_variable():
    """A library import has no side effects on the process (the rule for the product): no environment
    variable, warning filter, signal handler or torch setting changes when any fasttrain module is imported;
    the `fasttrain` program itself turns on huge pages for big CPU tensors, unless the environment already says."""
    # The dependencies first: torchvision's import sets TORCHINDUCTOR_CACHE_DIR itself, numpy and torch add
    # warning filters of their own.
    script = ("import os, signal, warnings, importlib, importlib.util, pkgutil, torch, torchvision, numpy, PIL\n"
              "if importlib.util.find_spec('nvidia.dali'): import nvidia.dali\n"
              "def now(): return (dict(os.environ), list(warnings.filters), signal.getsignal(signal.SIGINT), "
              "signal.getsignal(signal.SIGTERM), torch.backends.cudnn.benchmark, torch.get_num_threads())\n"
              "before = now(); import fasttrain\n"
              "for m in pkgutil.walk_packages(fasttrain.__path__, 'fasttrain.'):\n"
              "    if m.name != 'fasttrain.__main__': importlib.import_module(m.name)\n"
              "after = now(); changed = {k for k in set(before[0]) | set(after[0]) if before[0].get(k) != "
              "after[0].get(k)}; print(sorted(changed)); print([i for i in range(1, 6) if before[i] != after[i]])\n"
              "fasttrain.cli.main(['recipes']); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[]" and lines[1] == "[]" and lines[-1] == "1", out.stdout
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "0", out.stdout
