"""--loader auto: the decision from measured rates (pure), the profile cache, the measuring on this CPU, and
what `fasttrain train` and `fasttrain tune` do with them."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from fasttrain import calibrate, cli, tune
from fasttrain import loader_choice as LC
from fasttrain.config import Config, DataConfig
from fasttrain.data.base import Layout
from fasttrain.data.scan import scan_dataset
from fasttrain.dist import DistInfo

CPU = torch.device("cpu")


def rates(model: float, device="cpu", **paths) -> LC.Rates:
    """rates(100, torchvision=60, dali=(80, alone)) : fed rates (and alone ones) of each path."""
    out = {}
    for name, v in paths.items():
        fed, alone = (v if isinstance(v, tuple) else (v, None))
        knobs = {"hw_decoder_load": 0.9, "prefetch": 2} if name == "dali" else None
        out[name] = LC.PathRate(alone=alone, fed=fed, knobs=knobs)
    return LC.Rates(model=model, paths=out, device=device)


def test_the_fastest_path_feeding_the_model_wins():
    assert LC.decide(rates(100, torchvision=60, dali=80)).loader == "dali"
    assert LC.decide(rates(100, torchvision=97, dali=80)).loader == "torchvision"
    r = rates(100, torchvision=60, dali=70)
    r.paths["hybrid"] = LC.PathRate(alone=200, fed=95, knobs={"dali_share": 0.53125})
    c = LC.decide(r)
    assert (c.loader, c.dali_share, c.hw_decoder_load, c.prefetch) == ("hybrid", 0.53125, 0.9, 2)
    assert "hybrid 95" in c.why and "model alone 100 (eager)" in c.why
    assert LC.describe_choice(c, "cpu") == "hybrid (--dali-share 0.53125 --prefetch 2)"
    assert LC.describe_choice(c, "cuda") == "hybrid (--dali-share 0.53125 --hw-decoder-load 0.9 --prefetch 2)"
    assert LC.describe_choice(LC.decide(rates(100, torchvision=90)), "cuda") == "torchvision"


def test_a_tie_goes_to_the_simpler_path():
    c = LC.decide(rates(100, torchvision=79, dali=80))  # 1.25% apart: within TIE
    assert c.loader == "torchvision" and "within 2% of dali-cpu and simpler" in c.why
    assert LC.decide(rates(100, torchvision=77, dali=80)).loader == "dali"  # 3.75% apart


def test_the_hybrid_is_measured_only_where_both_loaders_hold_the_model_back():
    # The H200 run at 7da15f4 (benchmarks/RESULTS.md): ResNet-50 is fed fully by the CPU path, ResNet-18 by
    # neither loader.
    r50 = rates(6766, device="cuda", torchvision=6629, dali=6109)
    assert not LC.wants_hybrid(r50) and LC.decide(r50).loader == "torchvision"
    r18 = rates(18081, device="cuda", torchvision=9638, dali=12983)
    assert LC.wants_hybrid(r18) and LC.decide(r18).loader == "dali"
    assert LC.hybrid_share(r18) == 18 / 32  # 12983 / (12983 + 9638) = 0.574, rounded to 32nds
    assert LC.measured_share(r18) == 18 / 32
    assert LC.measured_share(rates(100, torchvision=50)) is None


def test_unmeasured_feeding_is_estimated_from_the_rates_alone():
    r = rates(100, torchvision=(None, 60.0), dali=(None, 400.0))
    assert LC.score(r, "torchvision") == 60 and LC.score(r, "dali") == 100
    c = LC.decide(r)
    assert c.loader == "dali" and "(est.)" in c.why
    assert LC.decide(LC.Rates(model=10)).loader == "torchvision"  # nothing measured
    # On a CPU the model's threads and the loader share the cores: 2 cores, the model on both at 13 img/s,
    # loaders of 1.2 and 1.8 CPU ms an image: 12.90 against 12.85, a tie, the simpler path.
    r = LC.Rates(model=13.0, cores=2, threads=2, paths={"torchvision": LC.PathRate(alone=1600.0, cpu_ms=1.2),
                                                       "dali": LC.PathRate(alone=1100.0, cpu_ms=1.8)})
    assert LC.score(r, "torchvision") == pytest.approx(2 / (2 / 13 + 0.0012))
    assert LC.decide(r).loader == "torchvision" and not LC.wants_hybrid(r)
    r.threads = 1  # one core left to the loaders: the model's own rate
    assert LC.score(r, "dali") == 13.0
    r.threads = 2
    r.paths["dali"].cpu_ms, r.paths["torchvision"].cpu_ms = 5.0, 60.0  # a loader that costs the model cores
    assert LC.decide(r).loader == "dali"


def test_dali_knobs_change_only_for_a_clear_gain():
    default = {"hw_decoder_load": 0.9, "prefetch": 2}
    v = {"a": LC.PathRate(alone=1000, knobs=dict(default)), "b": LC.PathRate(alone=1015, knobs={"hw_decoder_load": 0.99,
                                                                                              "prefetch": 2}),
         "c": LC.PathRate(alone=990, knobs={"hw_decoder_load": 0.9, "prefetch": 4})}
    assert LC.best_dali_knobs(v, default) == default  # 1.5% better: noise
    v["b"].alone = 1100
    assert LC.best_dali_knobs(v, default) == {"hw_decoder_load": 0.99, "prefetch": 2}


def test_profiles_are_cached_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    key, other = {"host": "a", "arch": "resnet18"}, {"host": "a", "arch": "resnet50"}
    r = rates(100, torchvision=(60.0, 500.0), dali=80)
    path = LC.save_profile(key, r)
    assert path and path.startswith(str(tmp_path / "cache" / "loader-profiles"))
    got, where = LC.load_profile(key)
    assert where == path and got == r and LC.decide(got) == LC.decide(r)
    assert LC.load_profile(other) is None
    open(path, "w").write("{not json")
    assert LC.load_profile(key) is None
    assert "alone img/s" in LC.table(r) and "dali-cpu" in LC.table(r)


def test_measuring_on_this_cpu_leaves_the_run_as_it_was(tiny_data):
    """Each loader alone and feeding the model, on this CPU (DALI's CPU mode), in a second; the generators of
    the process (which decide the run's initial weights, crops of -j 0, ...) are put back afterwards."""
    train, val = scan_dataset(tiny_data)
    cfg = Config(data=DataConfig(data=tiny_data, image_size=32, batch_size=8, workers=1))
    windows = calibrate.Windows(model_s=0.1, alone_s=0.05, fed_s=0.1, max_batches=4)

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))
    for s in (5,):
        random.seed(s), np.random.seed(s), torch.manual_seed(s)
        want = draws()
        random.seed(s), np.random.seed(s), torch.manual_seed(s)
        r = calibrate.measure(cfg, DistInfo(), Layout(CPU, False), train, val, 1, 8, ["torchvision", "dali"],
                              windows)
        assert draws() == want
    assert r.model > 0 and r.model_note == "eager" and r.seconds > 0
    paths = ["torchvision"] + (["dali"] if "dali" in r.paths else [])
    # where the seconds went: the model, then each loader (its opening apart), all within the total
    assert list(r.phases)[0] == "model" and all(r.phases[f"{p} open"] <= r.phases[p] for p in paths)
    assert sum(v for k, v in r.phases.items() if not k.endswith(" open")) <= r.seconds
    assert LC.phases_text(r).startswith("model ") and "torchvision " in LC.phases_text(r)
    assert LC.Rates.from_json(r.to_json()).phases == r.phases
    for name in paths:
        p = r.paths[name]
        assert p.alone > 0 and p.fed > 0 and p.p95_ms >= p.p50_ms > 0
        assert len(p.fed_step_ms) >= calibrate.FED_STEPS - 1 and min(p.fed_step_ms) > 0
    assert LC.decide(r).loader in paths


def _settings(out: str) -> dict[str, str]:
    return {ln.split()[0]: ln.strip() for ln in out.splitlines() if ln.startswith("  ")}


@pytest.mark.slow
def test_auto_measures_then_reuses_the_profile_and_trains_as_its_choice(tiny_data, tmp_path, monkeypatch, capsys):
    """--calibrate fresh measures and caches; the next run takes the cached profile; and a run with the chosen
    loader given outright ends with the same weights (measuring changed nothing of the run)."""
    pytest.importorskip("nvidia.dali")
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    common = ["train", tiny_data, "--device", "cpu", "-j", "1", "-b", "16", "--image-size", "32", "--epochs", "1",
              "--seed", "3", "-p", "3"]
    assert cli.main([*common, "--calibrate", "fresh", "--output-dir", str(tmp_path / "a")]) == 0
    first = _settings(capsys.readouterr().out)
    assert first["choice"].startswith("choice   auto: ") and "calibrated in" in first["choice"], first
    assert os.listdir(tmp_path / "cache" / "loader-profiles")
    assert cli.main([*common, "--output-dir", str(tmp_path / "b")]) == 0
    second = _settings(capsys.readouterr().out)
    assert "(profile " in second["choice"] and second["loader"] == first["loader"], second
    # config.toml holds the loader auto took: the same run again, without measuring
    again = ["train", "--config", str(tmp_path / "a" / "config.toml"), "--output-dir", str(tmp_path / "c")]
    assert cli.main(again) == 0
    assert "choice" not in _settings(capsys.readouterr().out)
    load = lambda d: torch.load(tmp_path / d / "checkpoint.pth.tar", map_location="cpu", weights_only=True)  # noqa: E731
    a, c = load("a")["state_dict"], load("c")["state_dict"]
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_a_short_run_or_calibrate_off_is_not_measured(tiny_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("nvidia.dali")
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    common = ["train", tiny_data, "--device", "cpu", "-j", "0", "-b", "32", "--image-size", "32", "--epochs", "1",
              "--steps-per-epoch", "1", "--val-steps", "1"]
    assert cli.main([*common, "--output-dir", str(tmp_path / "a")]) == 0
    s = _settings(capsys.readouterr().out)
    assert s["loader"].startswith("loader   torchvision") and "unmeasured: a run of under 200,000" in s["choice"]
    assert cli.main([*common, "--calibrate", "off", "--output-dir", str(tmp_path / "b")]) == 0
    assert "unmeasured (--calibrate off)" in _settings(capsys.readouterr().out)["choice"]
    assert not os.path.exists(tmp_path / "cache" / "loader-profiles")


def test_a_resumed_run_keeps_the_loader_of_its_checkpoint(tiny_data):
    """Another loader would give the resumed epoch other crops: auto takes the checkpoint's, with its knobs."""
    pytest.importorskip("nvidia.dali")
    train, val = scan_dataset(tiny_data)
    cfg = Config(data=DataConfig(data=tiny_data, image_size=32))
    ck = {"config": {"data": {"loader": "hybrid", "dali_share": 0.25, "hw_decoder_load": 0.99, "prefetch": 3}}}
    d, why = tune.choose(cfg, DistInfo(), Layout(CPU, False), ck, train, val, 1, 8)
    assert (d.loader, d.dali_share, d.hw_decoder_load, d.prefetch) == ("hybrid", 0.25, 0.99, 3)
    assert "the loader of the run this one resumes" in why
    cfg.data.randaugment = 9  # only the torchvision loader applies it
    d, why = tune.choose(cfg, DistInfo(), Layout(CPU, False), None, train, val, 1, 8)
    assert d.loader == "torchvision" and "--randaugment" in why


def test_tune_without_data_measures_the_demo_dataset(tmp_path, monkeypatch, capsys):
    """`fasttrain tune` with no DATA, as `fasttrain train` without it: the embedded demo dataset (here a few
    images a class of it), not a traceback."""
    from fasttrain.data import demo
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    real = demo.write_demo_dataset
    monkeypatch.setattr(demo, "write_demo_dataset", lambda root: real(root, {"train": 4, "val": 1}))
    assert cli.main(["tune", "--device", "cpu", "-j", "1", "-b", "8", "--image-size", "32", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "writing the embedded demo dataset" in out and "model alone (eager)" in out
    assert "profile written to" in out


def test_tune_prints_the_table_and_train_reuses_its_profile(tiny_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("nvidia.dali")  # without it auto has one loader: no profile to read
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    flags = [tiny_data, "--device", "cpu", "-j", "1", "-b", "16", "--image-size", "32"]
    assert cli.main(["tune", *flags, "--quick"]) == 0
    out = capsys.readouterr().out
    assert "alone img/s" in out and "model alone (eager)" in out and "torchvision" in out
    assert "--loader auto takes" in out and "profile written to" in out
    assert cli.main(["train", *flags, "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 0
    assert "(profile " in _settings(capsys.readouterr().out).get("choice", ""), "train did not reuse tune's profile"


def test_without_dali_or_when_measuring_fails_auto_keeps_the_unmeasured_rule(tiny_data, monkeypatch, capsys):
    from fasttrain.data import dali_backend
    train, val = scan_dataset(tiny_data)
    cfg = Config(data=DataConfig(data=tiny_data, image_size=32, calibrate="fresh"))
    monkeypatch.setattr(dali_backend, "available", lambda: False)
    d, why = tune.choose(cfg, DistInfo(), Layout(CPU, False), None, train, val, 1, 8)
    assert d.loader == "torchvision" and why == "auto: torchvision, the one loader here (no DALI)"
    monkeypatch.setattr(dali_backend, "available", lambda: True)

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(calibrate, "model_step", broken)
    d, why = tune.choose(cfg, DistInfo(), Layout(CPU, False), None, train, val, 1, 8)
    assert d.loader == "torchvision" and "unmeasured (the calibration failed)" in why
    assert "could not time the model step (RuntimeError: CUDA out of memory)" in capsys.readouterr().err
