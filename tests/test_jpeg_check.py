"""The structural JPEG check that keeps broken files from DALI (whose parser can crash on them): what it
flags, what it lets through, and its per-dataset cache. No DALI needed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fasttrain.data import jpeg_check
from fasttrain.data.scan import Split
from fasttrain.dist import DistInfo


def jpeg(progressive=False, size=(64, 48)) -> bytes:
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def problem(tmp_path, data: bytes, name="x.jpg"):
    path = tmp_path / name
    path.write_bytes(data)
    return jpeg_check.jpeg_problem(str(path))


@pytest.mark.parametrize("progressive", [False, True])
def test_every_cut_is_flagged_and_the_whole_file_is_not(tmp_path, progressive):
    whole = jpeg(progressive)
    assert problem(tmp_path, whole) is None
    sos = whole.index(b"\xff\xda")
    for cut in [*range(2, sos + 12), *range(sos + 12, len(whole), 37), len(whole) - 1]:
        why = problem(tmp_path, whole[:cut])
        assert why and why.startswith(("truncated JPEG", "corrupt JPEG")), (cut, why)
    assert "header" in problem(tmp_path, whole[:sos // 2]) and "end-of-image" in problem(tmp_path, whole[:-100])


def test_whole_files_of_other_shapes_pass(tmp_path):
    whole = jpeg()
    app1 = b"\xff\xe1" + (2 + 40000).to_bytes(2, "big") + b"Exif\0\0" + bytes(40000 - 6)  # a header > 16 KB
    assert problem(tmp_path, whole[:2] + app1 + whole[2:]) is None
    assert problem(tmp_path, whole + bytes(10000)) is None  # bytes after the end-of-image marker
    assert problem(tmp_path, whole[:2] + b"\xff\xff" + whole[2:]) is None  # a fill byte before a marker
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    for other in (buf.getvalue(), b"not an image\n", b""):  # not JPEGs: DALI reports those itself
        assert problem(tmp_path, other) is None
    assert problem(tmp_path, whole[:2] + b"\x00" + whole[2:]).startswith("corrupt JPEG header: no marker")


def test_findings_are_cached_per_set_of_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(jpeg())
    bad.write_bytes(jpeg()[:300])
    paths = [str(good), str(bad)]
    first = jpeg_check.broken_jpegs(paths, DistInfo(), 2)
    assert list(first) == [str(bad)]
    real = jpeg_check.jpeg_problem
    monkeypatch.setattr(jpeg_check, "jpeg_problem", lambda p: pytest.fail("read again"))
    assert jpeg_check.broken_jpegs(paths, DistInfo(), 2) == first
    bad.write_bytes(jpeg())  # repaired: size and time change, so the files are checked again
    monkeypatch.setattr(jpeg_check, "jpeg_problem", real)
    assert jpeg_check.broken_jpegs(paths, DistInfo(), 2) == {}


def test_dropped_files_are_named_and_counted(tmp_path, monkeypatch, capsys):
    from fasttrain.errors import UserError
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(jpeg() if i % 2 else jpeg()[:500])
    split = Split(str(tmp_path), ("a",), tuple((str(f), 0) for f in files))
    train, val = jpeg_check.drop_broken_jpegs(split, split, DistInfo(), 1, max_bad=2)
    assert [p for p, _ in train.samples] == [str(files[1]), str(files[3])] and val == train
    err = capsys.readouterr().err
    assert err.count("skipped bad file") == 2 and f"skipped bad file {files[0]}: truncated JPEG" in err
    with pytest.raises(UserError, match="more than --max-bad-files=1"):
        jpeg_check.drop_broken_jpegs(split, split, DistInfo(), 1, max_bad=1)
