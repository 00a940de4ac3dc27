"""`fasttrain bench`: produces every section with sane numbers, its JSON and PNG, and its helpers behave.
No timing asserts: the machine is shared and noisy; only that numbers exist and make sense."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from fasttrain import cli
from fasttrain.bench.measure import time_loop
from fasttrain.bench.report import add_ratios
from fasttrain.data import dali_backend

from .conftest import REPO

MODEL_COMBOS = {"fp32", "fp32+channels_last", "bf16", "bf16+channels_last"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `fasttrain bench --quick` run (JPEGs generated into a fresh cache) shared by the tests below."""
    tmp = tmp_path_factory.mktemp("bench")
    old = os.environ.get("FASTTRAIN_CACHE")
    os.environ["FASTTRAIN_CACHE"] = str(tmp / "cache")
    try:
        code = cli.main(["bench", "--quick", "--out", str(tmp / "out")])
    finally:
        os.environ.pop("FASTTRAIN_CACHE") if old is None else os.environ.__setitem__("FASTTRAIN_CACHE", old)
    assert code == 0
    with open(tmp / "out" / "bench.json") as fh:
        return tmp / "out", json.load(fh)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_bench_has_every_section_with_sane_numbers(quick):
    out, doc = quick
    entries = doc["entries"]
    assert {e["section"] for e in entries} == {"loader", "model", "e2e"}
    for e in entries:
        assert finite_positive(e["images_per_sec"]), e["name"]
        assert 0.0 <= e["data_wait_fraction"] <= 1.0, e["name"]
        assert finite_positive(e["p50_ms"]) and e["p50_ms"] <= e["p95_ms"], e["name"]
        assert finite_positive(e["ratio_to_reference"]), e["name"]
        assert e["timed_steps"] >= 2 and e["timed_images"] == e["timed_steps"] * e["batch_size"], e["name"]
    for section in ("loader", "model", "e2e"):
        refs = [e for e in entries if e["section"] == section and e["reference"]]
        assert len(refs) == 1 and refs[0]["ratio_to_reference"] == 1.0, section
    loaders = {e["loader"] for e in entries if e["section"] == "loader"}
    expected = {"reference", "torchvision"} | ({"dali-cpu"} if dali_backend.available() else set())
    assert loaders == expected
    combos = {e["name"].split("/")[-1] for e in entries if e["section"] == "model" and not e["reference"]}
    assert combos == MODEL_COMBOS
    e2e = [e for e in entries if e["section"] == "e2e" and not e["reference"]]
    assert {e["loader"] for e in e2e} == expected - {"reference"}
    assert all(finite_positive(e["of_ceiling"]) for e in e2e)
    # the loaders deliver the whole batch, and only wait for data: fraction ~1 by construction
    assert all(e["data_wait_fraction"] > 0.5 for e in entries if e["section"] == "loader")


def test_quick_bench_records_environment_and_writes_png(quick):
    out, doc = quick
    env = doc["environment"]
    for key in ("torch", "torchvision", "dali", "cuda", "gpu", "cpu_count", "git_commit", "date", "jpeg_box_decode"):
        assert key in env
    from fasttrain.data.decode import crop_decoder_available
    assert env["jpeg_box_decode"] is crop_decoder_available()
    assert env["torch"] == torch.__version__ and env["cpu_count"] == os.cpu_count()
    if os.path.isdir(os.path.join(REPO, ".git")):
        assert env["git_commit"]
    with open(out / "bench.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out / "bench.png") > 10_000


def test_from_json_redraws_without_measuring(quick, tmp_path, capsys):
    out, doc = quick
    assert cli.main(["bench", "--from-json", str(out / "bench.json"), "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| loader | reference |" in text and "x reference" in text
    assert json.load(open(tmp_path / "bench.json"))["entries"] == doc["entries"]
    assert os.path.getsize(tmp_path / "bench.png") > 10_000


def test_check_goals_reads_the_json(quick):
    out, _ = quick
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "check_goals.py"), str(out / "bench.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "loader only: best fasttrain path" in res.stdout


def test_time_loop_excludes_warmup_and_counts_images():
    batches = [(torch.zeros(3, 1), torch.zeros(3)) for _ in range(6)]
    calls = []

    def step(x, y):
        calls.append(len(calls))
        if len(calls) == 1:
            time.sleep(0.5)  # a first step that compiles: must not be in the timed window

    t = time_loop(batches, step, torch.device("cpu"), warmup=2, steps=4)
    assert len(calls) == 6 and t.images == 12 and len(t.step_ms) == 4
    assert t.warmup_s >= 0.5 > t.seconds
    with pytest.raises(RuntimeError, match="loader ended after 6 of 8"):
        time_loop(batches, None, torch.device("cpu"), warmup=2, steps=6)


def test_ratios_are_per_section_and_arch():
    entries = [{"section": "loader", "arch": None, "images_per_sec": 100.0, "reference": True},
               {"section": "loader", "arch": None, "images_per_sec": 250.0, "reference": False},
               {"section": "e2e", "arch": "a", "images_per_sec": 10.0, "reference": True},
               {"section": "e2e", "arch": "b", "images_per_sec": 40.0, "reference": True},
               {"section": "e2e", "arch": "b", "images_per_sec": 20.0, "reference": False}]
    add_ratios(entries)
    assert [e["ratio_to_reference"] for e in entries] == [1.0, 2.5, 1.0, 1.0, 0.5]


def test_reference_loop_entry_point_runs(tiny_data, capsys):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import reference_loop
    finally:
        sys.path.pop(0)
    assert reference_loop.main([tiny_data, "-b", "8", "-j", "0", "--image-size", "32", "--steps", "2",
                                "--warmup", "1"]) == 0
    assert "img/s" in capsys.readouterr().out


def test_gpu_run_dry_run_parses_its_command(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "ARCHS": "resnet50"}
    res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_run.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    plan = (tmp_path / "gpu_run_plan.txt").read_text()
    assert "-m fasttrain bench --out" in plan and "-a resnet50" in plan and "-j 16 -b 256" in plan
    assert (tmp_path / "bench").is_dir()


def test_stage_benchmarks_run(tmp_path):
    """benchmarks/test_stages.py (pytest-benchmark) runs each stage once, untimed, so it cannot rot."""
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          os.path.join(REPO, "benchmarks", "test_stages.py")], cwd=REPO, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "FASTTRAIN_STAGE_IMAGES": "8"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_toggles_keep_each_field_in_its_place(mode):
    """The GPU matrix's compiled entry: a mix-up of positional fields (cudnn_benchmark <-> compile_mode) crashed
    the first GPU run at `torch.backends.cudnn.benchmark = "default"`; CPU runs never built that entry."""
    from fasttrain.bench import toggle_combos
    combos = toggle_combos(torch.device("cuda"), with_compile=True, compile_mode=mode)
    compiled = [tg for tg in combos if tg.compile]
    assert len(compiled) == 1 and compiled[0].compile_mode == mode
    assert all(tg.cudnn_benchmark is True for tg in combos)
    assert all(tg.compile_mode in ("default", "reduce-overhead", "max-autotune") for tg in combos)
