"""Tar shards: `fasttrain shard` writes what the folder holds (bytes, labels, class order, bad files reported),
byte-identically on a rerun and after a kill; both loaders train from them as from the folder (same
weights), with exact val counts on 2 Gloo ranks, exact mid-epoch resume and bad samples named by key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from fasttrain import cli
from fasttrain.data import dali_backend
from fasttrain.data.scan import scan_dataset
from fasttrain.errors import UserError
from fasttrain.metrics import read_jsonl

from .conftest import REPO, make_tree, run_group
from .fault_worker import tiny_model

HAS_DALI = dali_backend.available()
LOADERS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="no DALI"))]


def shard(data, out, *extra) -> int:
    return cli.main(["shard", str(data), str(out), *extra])


def files(root) -> dict[str, bytes]:
    """Every file under root (hidden ones too) by relative path, with its bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A tree with bad files (a text file named .jpg, an empty file, a JPEG cut in its header) and a PNG named
    .jpg, and its shards (-j 2, 3 kB shards: several per split)."""
    root = tmp_path_factory.mktemp("dirty")
    data = make_tree(root / "data", n_train=6, n_val=3)
    whole = open(os.path.join(data, "train", "hstripes_cool", "0000.jpg"), "rb").read()
    bad = {"train/vstripes_warm/0002.jpg": b"not an image\n" * 20, "val/hstripes_warm/0001.jpg": b"",
           "train/hstripes_cool/0004.jpg": whole[:whole.index(b"\xff\xda") // 2]}
    for rel, content in bad.items():
        open(os.path.join(data, rel), "wb").write(content)
    from PIL import Image
    Image.new("RGB", (20, 16), (10, 200, 30)).save(os.path.join(data, "train", "hstripes_warm", "0005.jpg"), "PNG")
    assert shard(data, root / "out", "--shard-size", "0.003", "-j", "2") == 0
    return data, root / "out", bad


def test_shards_hold_the_folders_bytes_labels_and_class_order(dirty, capsys):
    data, out, bad = dirty
    folder_train, folder_val = scan_dataset(data)
    train, val = scan_dataset(str(out))
    assert train.sharded and train.classes == folder_train.classes == tuple(json.load(open(out / "classes.json")))
    for got, want in ((train, folder_train), (val, folder_val)):
        good = [(p, label) for p, label in want.samples if os.path.relpath(p, data) not in bad]
        assert len(got) == len(good)
        for (member, label), (path, want_label) in zip(got.samples, good):  # the folder's order
            assert member.read() == open(path, "rb").read() and label == want_label, (member, path)
    manifest = json.load(open(out / "manifest.json"))
    assert {b["path"] for b in manifest["bad"]} == set(bad)
    assert manifest["splits"]["train"]["per_class"] == [5, 6, 6, 5] and manifest["splits"]["val"]["samples"] == 11
    reasons = {b["path"]: b["error"] for b in manifest["bad"]}
    assert reasons["val/hstripes_warm/0001.jpg"] == "empty file (0 bytes)"
    assert "not an image" in reasons["train/vstripes_warm/0002.jpg"]
    members, sizes = {}, 0
    for shard_info in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        path = out / shard_info["tar"]
        with tarfile.open(path) as tar:  # a plain POSIX tar: KEY.jpg + KEY.cls, fixed headers
            for m in tar.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "", 0o644)
                members[(shard_info["tar"][:5], m.name)] = tar.extractfile(m).read()
        assert os.path.getsize(path) == shard_info["bytes"]
        sizes += shard_info["samples"]
    assert sizes == len(train) + len(val) == len(members) // 2
    for member, label in train.samples:
        ext = "png" if member.read()[:4] == b"\x89PNG" else "jpg"
        assert members[("train", f"{member.key}.{ext}")] == member.read()
        assert members[("train", f"{member.key}.cls")] == str(label).encode()
    assert sum(name.endswith(".png") for _, name in members) == 1  # the PNG kept as it is, named for what it is


def test_index_files_are_dalis_own(dirty, tmp_path):
    """The index beside each shard is what DALI's wds2idx writes for it, and DALI's webdataset reader reads
    the shards with it: the same bytes and labels as fasttrain reads."""
    wds2idx = pytest.importorskip("wds2idx")  # ships with DALI
    _, out, _ = dirty
    manifest = json.load(open(out / "manifest.json"))
    first = manifest["splits"]["train"]["shards"][0]
    with wds2idx.IndexCreator(str(out / first["tar"]), str(tmp_path / "x.idx"), verbose=False) as ic:
        ic.create_index()
    assert open(tmp_path / "x.idx").read() == open(out / first["idx"]).read()
    if not HAS_DALI:
        return
    from nvidia.dali import fn, pipeline_def
    val = [s for s in manifest["splits"]["val"]["shards"]]
    n = sum(s["samples"] for s in val)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=[str(out / s["tar"]) for s in val],
                                     index_paths=[str(out / s["idx"]) for s in val], ext=["jpg", "cls"]))
    pipe = read()
    pipe.build()
    jpgs, cls = pipe.run()
    got = sorted((bytes(jpgs.at(i)), int(bytes(cls.at(i)))) for i in range(n))
    _, ours = scan_dataset(str(out))
    assert got == sorted((m.read(), label) for m, label in ours.samples)


KILLABLE = r"""
import sys, time
import fasttrain.shard as S
real = S._TarWriter.add
def slow(self, name, data):  # so that a kill lands mid-shard
    time.sleep(0.02)
    return real(self, name, data)
S._TarWriter.add = slow
from fasttrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_reruns_are_byte_identical_and_a_killed_job_finishes(dirty, tmp_path, capsys):
    data, out, _ = dirty
    reference = files(out)
    assert shard(data, tmp_path / "again", "--shard-size", "0.003", "-j", "1") == 0  # -j does not matter
    assert files(tmp_path / "again") == reference
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, "shard", data, str(killed), "--shard-size", "0.003",
                             "-j", "1"], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while len(os.listdir(killed / ".partial") if (killed / ".partial").is_dir() else ()) < 3:
            assert proc.poll() is None and time.time() - t0 < 60, "finished before it could be killed"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    left = files(killed)
    assert "manifest.json" not in left and any(k.endswith(".tar") for k in left)
    for name, content in left.items():  # whatever has a shard's name is a whole one
        if name.endswith((".tar", ".idx")):
            assert content == reference[name], name
    capsys.readouterr()
    assert cli.main(["train", str(killed), "--device", "cpu"]) == 2
    assert "unfinished `fasttrain shard` output" in capsys.readouterr().err.strip().splitlines()[-1]
    assert shard(data, killed, "--shard-size", "0.003", "-j", "2") == 0
    out, err = capsys.readouterr()
    assert "kept from the earlier, unfinished run" in err and files(killed) == reference
    assert "bad: train/vstripes_warm/0002.jpg: not an image" in out  # the report covers kept shards too


def test_bad_input_is_one_line_exit_2(dirty, tiny_data, tmp_path, capsys):
    data, out, _ = dirty
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    first = json.load(open(copy / "manifest.json"))["splits"]["train"]["shards"][0]["tar"]
    with open(copy / first, "ab") as fh:
        fh.write(b"x")
    for argv, words in ((["shard", data, os.path.join(data, "shards")], "must be outside DATA"),
                        (["shard", str(out), str(tmp_path / "o")], "already a sharded dataset"),
                        (["shard", data, str(tmp_path / "o"), "--shard-size", "0"], "--shard-size must be"),
                        (["train", str(out), "--file-list", str(tmp_path / "l.txt")], "is a sharded dataset"),
                        (["train", str(copy), "--device", "cpu"], "the manifest says")):
        assert cli.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert words in err[-1] and err[-1].startswith("fasttrain: error:"), (argv, err[-1])


@pytest.fixture(scope="module")
def clean(tiny_data, tmp_path_factory):
    """The tests' usual tree (96 train, 36 val) and its shards (~4 per split)."""
    out = tmp_path_factory.mktemp("clean") / "shards"
    assert shard(tiny_data, out, "--shard-size", "0.04", "-j", "2") == 0
    return tiny_data, str(out)


@pytest.mark.parametrize("loader", LOADERS)
def test_training_from_shards_equals_the_folder_and_resumes_mid_epoch(clean, tmp_path, monkeypatch, loader):
    """The same weights and metrics as from the folder (same batches, crops, flips: the shards' samples are
    the folder's, in its order); every val image scored once; a stop at step 4 of 6 then --resume auto ends
    where a straight run does."""
    folder, sharded = clean
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    args = ["--loader", loader, "--device", "cpu", "-j", "0", "-b", "16", "--image-size", "32", "--seed", "3",
            "-p", "2", "--lr", "0.05", "--epochs", "1"]

    def train(data, out, *extra, code=0):
        assert cli.main(["train", data, *args, "--output-dir", str(tmp_path / out), *extra]) == code
        ck = torch.load(tmp_path / out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
        return ck, read_jsonl(tmp_path / out / "metrics.jsonl") if code == 0 else None

    a, rows_a = train(folder, "folder")
    b, rows_b = train(sharded, "shards")
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    keys = ("train_loss", "train_samples", "val_loss", "val_top1", "val_samples")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    assert [r["val_samples"] for r in rows_b] == [36] and b["classes"] == a["classes"]
    calls = iter([0, signal.SIGTERM])  # sync points at steps 2, 4: stop at step 4
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: next(calls, 0))
    c, _ = train(sharded, "stopped", code=143)
    assert (c["epoch"], c["step"]) == (0, 4)
    monkeypatch.setattr("fasttrain.signals.stop_requested", lambda: 0)
    c, rows_c = train(sharded, "stopped", "--resume", "auto")
    assert all(torch.equal(v, c["state_dict"][k]) for k, v in b["state_dict"].items())
    assert [[r[k] for k in keys] for r in rows_c] == [[r[k] for k in keys] for r in rows_b]


@pytest.mark.slow
def test_two_gloo_ranks_from_shards_score_every_val_image_once(tmp_path):
    """2 processes reading shards: the same steps on each rank (DDP would hang otherwise), 27 val images
    (odd: one rank scores 14, the other 13) each scored once."""
    data = make_tree(tmp_path / "odd", n_train=16, n_val=9, classes=("checker_cool", "dots_warm", "rings_cool"))
    assert shard(data, tmp_path / "shards", "--shard-size", "0.02", "-j", "1") == 0
    loader = "dali" if HAS_DALI else "torchvision"
    r = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   os.path.join(REPO, "tests", "fault_worker.py"), "train", tmp_path / "shards", "--loader", loader,
                   "--device", "cpu", "-j", "2", "-b", "16", "--image-size", "32", "--epochs", "1", "--seed", "1",
                   "-p", "2", "--output-dir", tmp_path / "out"], 240,
                  {"FT_TEST_TINY_MODEL": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "48 train / 27 val images, 3 classes" in r.stdout and "16 global = 8 per process x 2 processes" in r.stdout
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [(row["val_samples"], row["train_samples"]) for row in rows] == [(27, 48)]  # 2 ranks x 3 steps x 8


@pytest.mark.parametrize("loader", LOADERS)
def test_a_sample_that_fails_to_decode_is_skipped_by_key(clean, tmp_path, capsys, loader):
    """Bytes of a train and a val sample overwritten inside their shards (the shards' sizes unchanged): the
    loader warns naming SHARD:KEY, goes on, and counts them against --max-bad-files."""
    from fasttrain.config import DataConfig
    from fasttrain.data import torchvision_backend
    from fasttrain.data.base import Layout
    from fasttrain.dist import DistInfo

    def loaders(max_bad=10):
        layout = Layout(torch.device("cpu"), False)
        if loader == "dali":
            cfg = DataConfig(image_size=32, max_bad_files=max_bad)
            return dali_backend.build(train, val, 8, 1, cfg, layout, DistInfo(), 3, 12)
        return torchvision_backend.build(train, val, 8, 0, 32, layout, 0, 1, 3, 12, max_bad)

    def epoch(batches):
        batches.set_epoch(0)
        return list(batches)
    copy = tmp_path / "shards"
    shutil.copytree(clean[1], copy)
    train, val = scan_dataset(str(copy))
    hit = [train.samples[5][0], val.samples[7][0]]
    for m in hit:
        with open(m.shard, "r+b") as fh:
            fh.seek(m.offset)
            fh.write(b"not an image".ljust(m.size, b"!"))
    tr, va = loaders()
    n_train = sum(b[1].shape[0] for b in epoch(tr))
    n_val = sum(b[1].shape[0] for b in va)
    err = capsys.readouterr().err
    for m in hit:
        assert f"skipped bad file {m.shard}:{m.key}: " in err, err
    assert n_val == 35 and n_train == (96 if loader == "dali" else 95)  # DALI refills the batch, torchvision drops
    tr, _ = loaders(max_bad=0)
    with pytest.raises(UserError, match=r"more than --max-bad-files=0 .*shard-\d+\.tar:\d{8}"):
        epoch(tr)


def test_bench_times_each_loader_on_the_folder_and_on_its_shards(clean, tmp_path, monkeypatch, capsys):
    """`fasttrain bench --shards`: each of fasttrain's loaders gets a twin reading the same images as shards
    (written once into the cache), measured beside it, with its rate against the folder's."""
    from dataclasses import replace

    from fasttrain.bench.loaders import FASTTRAIN_LOADERS, BenchData, available_loaders
    from fasttrain.bench.report import add_ratios, table
    from fasttrain.bench.shards import bench_shards, shard_twins
    from fasttrain.bench.suite import Plan, loader_section
    folder, _ = clean
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    where = bench_shards(folder)
    assert where.startswith(str(tmp_path / "cache")) and bench_shards(folder) == where
    assert "already holds these shards" in capsys.readouterr().err  # the second call wrote nothing
    cpu = torch.device("cpu")
    kinds = [k for k in available_loaders(cpu)[0] if k in ("reference", "torchvision", "dali-cpu")]
    plan = Plan(cpu, ["resnet18"], 1, 8, 8, image_size=32, loader_steps=(1, 2),
                loaders=shard_twins(kinds, FASTTRAIN_LOADERS))
    entries = loader_section(plan, replace(BenchData.scan(folder), shards=BenchData.scan(where)))
    add_ratios(entries)
    twins = {e["loader"]: e for e in entries if e["loader"].endswith("-shards")}
    assert set(twins) == {f"{k}-shards" for k in kinds if k != "reference"}
    assert all(e["vs_folder"] > 0 and e["timed_images"] == 16 for e in twins.values())
    assert "x folder)" in table(entries)


@pytest.fixture(scope="module")
def resized(dirty, tmp_path_factory):
    """The dirty tree plus a gray JPEG, a 64x48 RGBA PNG and a 72x12 strip (32x5 once resized: under
    --min-side 8), as shards with --max-side 32 (-j 2, 3 kB shards): the 48x40 JPEGs resized, the 20x16 PNG
    kept."""
    from PIL import Image
    root = tmp_path_factory.mktemp("resized")
    data = str(root / "data")
    shutil.copytree(dirty[0], data)
    Image.new("L", (40, 60), 90).save(os.path.join(data, "train", "vstripes_cool", "gray.jpg"), quality=90)
    Image.new("RGBA", (64, 48), (10, 10, 200, 100)).save(os.path.join(data, "train", "vstripes_cool", "alpha.png"))
    Image.new("RGB", (72, 12), (200, 10, 10)).save(os.path.join(data, "val", "vstripes_cool", "strip.jpg"), quality=90)
    bad = {**dirty[2], "val/vstripes_cool/strip.jpg": None}
    for j, out in (("2", "out"), ("1", "again")):
        assert shard(data, root / out, "--shard-size", "0.003", "-j", j, "--max-side", "32") == 0
    return data, root, bad


def test_max_side_resizes_the_large_images_and_keeps_the_rest(resized, capsys):
    """Images longer than --max-side become JPEGs scaled to it (aspect kept, the same picture); the others
    keep their bytes; bad files are still left out, now with one that resizing would make too small; the
    manifest and the summary say what was resized and the bytes before and after; -j does not matter."""
    import io

    import numpy as np
    from PIL import Image
    data, root, bad = resized
    out = root / "out"
    assert files(out) == files(root / "again")
    folder_train, folder_val = scan_dataset(data)
    train, val = scan_dataset(str(out))
    kept, shrunk, before, after, errors = 0, 0, 0, 0, []
    for got, want in ((train, folder_train), (val, folder_val)):
        good = [(p, label) for p, label in want.samples if os.path.relpath(p, data) not in bad]
        assert len(got) == len(good)
        for (member, label), (path, want_label) in zip(got.samples, good):
            original, written = open(path, "rb").read(), member.read()
            src, im = Image.open(io.BytesIO(original)), Image.open(io.BytesIO(written))
            before, after = before + len(original), after + len(written)
            assert label == want_label
            if max(src.size) <= 32:
                assert written == original, path
                kept += 1
                continue
            shrunk += 1
            w, h = src.size
            assert im.format == "JPEG" and im.size == ((32, round(h * 32 / w)) if w >= h else (round(w * 32 / h), 32))
            assert im.mode == ("L" if src.mode == "L" else "RGB")
            same = np.asarray(src.convert("L").resize(im.size, Image.Resampling.LANCZOS), np.float32)
            errors.append(np.abs(np.asarray(im.convert("L"), np.float32) - same).mean())
    assert (kept, shrunk) == (1, 34)  # the small PNG; 48x40 JPEGs, the gray one and the RGBA PNG
    assert max(errors) < 5  # the same picture: the JPEG's error, on images of strong stripes and noise
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["resize"] == {"max_side": 32, "quality": 90, "resized": 34, "bytes_before": before,
                                  "bytes_after": after}
    assert after < before
    exts = [line.split(" ")[0] for sp in manifest["splits"].values() for sh in sp["shards"]
            for line in open(out / sh["idx"]).read().splitlines()[1:]]
    assert exts.count("png") == 1 and exts.count("jpg") == 34  # the resized PNG is a .jpg now
    reasons = {b["path"]: b["error"] for b in manifest["bad"]}
    assert set(reasons) == set(bad) and "too small once resized to --max-side 32 (32x5 < --min-side 8)" in reasons["val/vstripes_cool/strip.jpg"]
    capsys.readouterr()
    assert shard(data, root / "again", "--shard-size", "0.003", "--max-side", "32") == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err


def test_max_side_and_quality_are_part_of_what_a_rerun_keeps(resized, tmp_path, capsys):
    """Another --quality or --max-side over a finished output rewrites it (the resume fingerprint names them),
    with other bytes; the same settings find it complete."""
    data, root, _ = resized
    out = tmp_path / "o"
    shutil.copytree(root / "out", out)
    reference = files(out)
    for extra in (["--max-side", "32", "--quality", "50"], ["--max-side", "24"], []):
        assert shard(data, out, "--shard-size", "0.003", "-j", "1", *extra) == 0
        err = capsys.readouterr().err
        assert "nothing to do" not in err and "kept from the earlier" not in err
        now = files(out)
        assert now != reference, extra
        reference = now
        assert json.load(open(out / "manifest.json"))["resize"]["max_side"] == (int(extra[1]) if extra else None)
    assert "--max-side" not in err  # no resizing: no resize line


@pytest.mark.parametrize("argv, words", [(["--quality", "80"], "give --max-side too"),
                                         (["--max-side", "4"], "--max-side must be at least --min-side (8)"),
                                         (["--max-side", "32", "--quality", "101"], "--quality must be")])
def test_bad_resize_flags_are_one_line_exit_2(tiny_data, tmp_path, capsys, argv, words):
    assert shard(tiny_data, tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("loader", LOADERS)
def test_both_loaders_train_from_resized_shards(tiny_data, tmp_path_factory, tmp_path, monkeypatch, capsys, loader):
    """Shards of the 48x40 images at --max-side 32: a run trains from them and its checkpoint scores the
    full-size folder's val images (what the accuracy comparison in benchmarks/ does)."""
    out = tmp_path_factory.getbasetemp() / "tiny-max32"
    if not out.exists():
        assert shard(tiny_data, out, "--shard-size", "0.04", "-j", "2", "--max-side", "32") == 0
    assert json.load(open(out / "manifest.json"))["resize"]["resized"] == 132
    monkeypatch.setattr("fasttrain.train.build_model", tiny_model)
    args = ["--loader", loader, "--device", "cpu", "-j", "0", "-b", "16"]
    assert cli.main(["train", str(out), *args, "--image-size", "32", "--seed", "3", "-p", "2", "--epochs", "1",
                     "--output-dir", str(tmp_path / "r")]) == 0
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [(r["train_samples"], r["val_samples"]) for r in rows] == [(96, 36)]
    capsys.readouterr()
    assert cli.main(["eval", str(tiny_data), "--checkpoint", str(tmp_path / "r" / "checkpoint.pth.tar"),
                     *args]) == 0
    assert "on 36 images" in capsys.readouterr().out


def test_bench_compares_the_folder_with_its_pre_resized_shards(clean, tmp_path, monkeypatch):
    """`fasttrain bench --shards --max-side N`: the twins read shards written with --max-side N (cached apart
    from the full-size ones) and say so in their names; their rate against the folder's is the decode
    rate full-size against pre-resized."""
    from dataclasses import replace

    from fasttrain.bench.loaders import FASTTRAIN_LOADERS, BenchData
    from fasttrain.bench.shards import bench_shards, shard_twins
    from fasttrain.bench.suite import Plan, loader_section
    folder, _ = clean
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    where = bench_shards(folder, max_side=32)
    assert where != bench_shards(folder) and BenchData.scan(where).max_side == 32
    assert BenchData.scan(folder).max_side is None
    plan = Plan(torch.device("cpu"), ["resnet18"], 1, 8, 8, image_size=32, loader_steps=(1, 2),
                loaders=shard_twins(["torchvision"], FASTTRAIN_LOADERS))
    entries = loader_section(plan, replace(BenchData.scan(folder), shards=BenchData.scan(where)))
    assert [e["name"] for e in entries] == ["loader/torchvision", "loader/torchvision-shards (max side 32)"]
    assert entries[1]["vs_folder"] > 0 and entries[1]["timed_images"] == 16 and entries[1]["max_side"] == 32
    assert "max_side" not in entries[0]
