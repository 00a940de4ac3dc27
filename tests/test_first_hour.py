"""What a new user meets first: help, --version, the printed settings and OUTPUT_DIR/config.toml, argument
errors before any work, one stream for the run's story, a finished run resumed, CPU threads and workers."""

from __future__ import annotations

import pytest
import torch

from fasttrain import checkpoint as ckpt_io
from fasttrain import cli, cpu_share, settings
from fasttrain.config import Config
from fasttrain.metrics import read_jsonl

from .fault_worker import tiny_model

COMMON = ["--device", "cpu", "-j", "0", "-b", "16", "--image-size", "32", "--seed", "3", "-p", "2",
          "--lr", "0.05", "--no-tensorboard"]


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_shows_defaults_and_eval_lists_only_its_options(capsys):
    train = " ".join(help_text(capsys, "train").split())  # argparse wraps lines
    for flag_help in ("(default: 256; the demo without DATA: 64)", "(default: 90; the demo without DATA: 10)",
                      "(default: 0.1; the demo without DATA: 0.05)", "(default: 0.0001)", "-p N, --print-freq N",
                      "(default: 10)", "(default: 4 as the reference, capped at the cores each process has)"):
        assert flag_help in train, flag_help
    ev = help_text(capsys, "eval")
    assert "--epochs" not in ev and "--lr" not in ev and "--output-dir" not in ev and "--resume" not in ev
    assert "--val-steps" in ev and "--checkpoint PATH" in ev and "[DATA]" not in ev and "DATA\n" in ev
    for sub in ("bench", "check-data"):
        text = help_text(capsys, sub)
        assert "DATA                  dataset root" in text and "-j N, --workers N" in text
    bench = " ".join(help_text(capsys, "bench").split())
    assert "where bench.json and bench.png go (default: runs/bench)" in bench and "-a ARCH, --arch ARCH model" in bench
    assert cli.main(["eval", "--checkpoint", "x.pth"]) == 2  # DATA is not optional
    assert "required: DATA" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith(f"fasttrain {__import__('fasttrain').__version__} (torch ")


@pytest.mark.parametrize("extra,needle", [
    (["-a", "resnet999"], "unknown arch 'resnet999'"),
    (["--weights", "/nonexistent/w.pth"], "--weights /nonexistent/w.pth does not exist"),
    (["--randaugment", "9", "--loader", "dali"], "applied in the torchvision loader"),
    (["--auto-augment", "imagenet", "--dummy"], "no images to augment"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be at least 1"),
    (["--gpu", "0", "--device", "cpu"], "contradict"),
    (["--gpu", "0"], "--gpu 0 asked for, but no CUDA GPU is visible"),
])
def test_argument_errors_come_before_any_work(extra, needle, tmp_path, capsys, monkeypatch):
    """DATA does not exist: an argument error that waited for the data scan would say so instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["train", str(tmp_path / "no-such-data"), "--output-dir", str(tmp_path / "out"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()  # not even the output folder


def test_settings_printed_config_toml_round_trip_and_a_finished_run(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    out = tmp_path / "r"
    argv = ["train", tiny_data, *COMMON, "--epochs", "2", "--lr-schedule", "cosine", "--steps-per-epoch", "2",
            "--val-steps", "1", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    story = capsys.readouterr().out
    threads = cpu_share.describe(*cpu_share.intra_op_threads(1))
    for line in (f"settings (written to {out}/config.toml):", f"  data     {tiny_data}: 96 train / 16 val images "
                 "(--val-steps 1: 16 of them), 4 classes", "  loader   torchvision, 0 workers per process",
                 "  batch    16 global = 16 per process x 1 process; 2 steps an epoch",
                 "  optim    sgd lr 0.05 momentum 0.9 wd 0.0001, cosine schedule", "  epochs   2",
                 f"  device   cpu: amp none, channels_last off, compile off, cudnn.benchmark off; {threads}",
                 "  seed     3", f"  output   {out}"):
        assert line in story, line
    # one stream: the settings, step lines, validation lines, epoch lines and the summary, in order
    order = [story.index(s) for s in ("settings", "Epoch: [0]: [2/2]", "Test: [1/1]", "fasttrain: epoch 0:",
                                      "Epoch: [1]: [2/2]", "fasttrain: done:")]
    assert order == sorted(order)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["val_samples"] for r in rows] == [16, 16] and "val_timed" not in rows[0]
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr_last"] > 0  # cosine's last step: not yet 0

    # config.toml: --config takes it back unchanged, and it is the config the checkpoint keeps
    ck = ckpt_io.load(str(out / ckpt_io.LATEST))
    again = cli.parse_config(cli.build_parser().parse_args(["train", "--config", str(out / "config.toml")]))
    assert again == Config.from_dict(ck["config"]) and again.run.seed == 3 and again.data.loader == "torchvision"
    assert settings.to_toml(again) == (out / "config.toml").read_text()

    # resuming the finished run: says so, trains nothing, changes nothing
    before = (out / "metrics.jsonl").read_text()
    assert cli.main([*argv, "--resume", "auto"]) == 0
    assert "is at epoch 2 of 2: the run is already done (raise --epochs to train on)" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before


def test_config_toml_keeps_one_side_of_each_pair(tmp_path):
    """--lr-per-256 and progressive resizing (a recipe's way of saying lr and size): config.toml writes the
    side in use only, since --config refuses a file that sets both --lr and --lr-per-256 (or --image-size
    and --min-res/--max-res); read back, the run gets the same LR and sizes."""
    from fasttrain.config import resolve_lr
    from fasttrain.schedules import Resolution
    parse = lambda *a: cli.parse_config(cli.build_parser().parse_args(["train", *a]))  # noqa: E731
    cfg = parse("DATA", "--lr-per-256", "0.5", "--min-res", "160", "--max-res", "192", "--end-ramp", "3")
    cfg.optim = resolve_lr(cfg.optim, 512)  # as a run does before writing config.toml
    path = tmp_path / "config.toml"
    settings.write_toml(cfg, str(path))
    text = path.read_text()
    assert "lr-per-256 = 0.5" in text and "\nlr = " not in text and "image-size" not in text
    again = parse("--config", str(path))
    assert settings.to_toml(again) == text
    assert resolve_lr(again.optim, 512).lr == cfg.optim.lr == 1.0
    assert Resolution.from_config(again.data) == Resolution.from_config(cfg.data)
    plain = parse("DATA", "--lr", "0.2")
    text = settings.to_toml(plain)
    assert "lr = 0.2" in text and "lr-per-256" not in text and "min-res" not in text and "image-size = 224" in text


def test_cpu_share_of_threads_and_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_share, "cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # torch's default: one per core
    assert cpu_share.intra_op_threads(1) == (8, "8 cores per process")  # torch's default for one process
    assert cpu_share.intra_op_threads(2)[0] == 4                 # two processes: half each
    assert cpu_share.intra_op_threads(16)[0] == 1                # at least one
    assert cpu_share.workers_per_process(None, 4) == (1, "")   # the reference's 4 a node, split
    assert cpu_share.workers_per_process(8, 2) == (4, "")      # -j as given, split
    monkeypatch.setattr(cpu_share, "cores", lambda: 2)
    n, why = cpu_share.workers_per_process(None, 1)
    assert n == 2 and "capped at the 2 cores" in why and cpu_share.workers_per_process(4, 1) == (4, "")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)   # a caller chose fewer: kept
    assert cpu_share.intra_op_threads(1) == (1, "1 set by the caller")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")                  # the user's (or torchrun's) choice wins
    assert cpu_share.intra_op_threads(1) == (1, "OMP_NUM_THREADS=3")
