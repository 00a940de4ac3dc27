"""Crop-box JPEG decoding (fasttrain/data/_jpeg.c): the same pixels as a full decode, on every kind of JPEG."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.data import decode
from fasttrain.data.torchvision_backend import TrainTransform

# Where libjpeg-turbo's headers are, `make install` builds the module: its absence there is a failure.
needs_module = pytest.mark.skipif(not decode.crop_decoder_available() and not os.path.exists("/usr/include/jpeglib.h"),
                                  reason="crop decoder not built: no libjpeg headers on this machine")


def jpeg(h, w, seed=0, mode="RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(h, w, 3)), 0), 1)  # gradients and edges, not just noise
    pixels = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    pixels[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 256, size=3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


def full(data: bytes) -> torch.Tensor:
    return decode.decode_bytes("x.jpg", data)


KINDS = {  # name: (height, width, PIL save options, mode)
    "4:2:0": (375, 500, dict(quality=90, subsampling=2), "RGB"),
    "4:2:2": (333, 467, dict(quality=85, subsampling=1), "RGB"),
    "4:4:4": (301, 257, dict(quality=95, subsampling=0), "RGB"),
    "progressive": (360, 480, dict(quality=80, progressive=True), "RGB"),
    "restart markers": (250, 390, dict(quality=75, restart_marker_rows=1), "RGB"),
    "grayscale": (200, 299, dict(quality=90), "L"),
    "tiny": (9, 13, dict(quality=90), "RGB"),
}


@needs_module
@pytest.mark.parametrize("kind", KINDS)
def test_box_equals_full_decode_cropped(kind):
    h, w, save, mode = KINDS[kind]
    data = jpeg(h, w, seed=len(kind), mode=mode, **save)
    whole = full(data)
    assert tuple(whole.shape) == (3, h, w) and decode.jpeg_size(data) == (h, w)
    rng = random.Random(kind)
    boxes = [(0, 0, h, w), (h - 1, w - 1, 1, 1), (0, w - 5, h, 5), (h // 2, 0, h - h // 2, w // 2)]
    boxes += [TrainTransform(224).box(h, w, rng) for _ in range(40)]
    boxes += [(t, left, rng.randint(1, h - t), rng.randint(1, w - left))  # every alignment against the MCUs
              for t, left in ((rng.randrange(h), 16 * rng.randrange(w // 16 + 1) % w) for _ in range(20))]
    for top, left, bh, bw in boxes:
        got = decode.decode_jpeg_box(data, top, left, bh, bw)
        assert got is not None and got.dtype == torch.uint8
        assert torch.equal(got, whole[:, top:top + bh, left:left + bw]), (kind, (top, left, bh, bw))


@needs_module
def test_train_load_matches_transform_of_the_full_decode(tmp_path):
    """TrainTransform.load (box-only decode, or a full one where that cannot run) gives exactly what the
    transform gives on the fully decoded image, draw for draw: JPEG, PNG and CMYK JPEG (libjpeg cannot make
    RGB of it; the full decode's PIL fallback can)."""
    files = {"a.jpg": jpeg(375, 500, seed=1, quality=90), "b.jpg": jpeg(120, 700, seed=2, quality=90)}
    png, cmyk = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(files["a.jpg"])).save(png, format="PNG")
    Image.open(io.BytesIO(files["a.jpg"])).convert("CMYK").save(cmyk, format="JPEG")
    files.update({"c.png": png.getvalue(), "d.jpg": cmyk.getvalue()})
    assert decode.jpeg_size(files["d.jpg"]) is not None and decode.decode_jpeg_box(files["d.jpg"], 0, 0, 8, 8) is None
    tf = TrainTransform(64)
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        for seed in range(12):
            want = tf(decode.decode_file(str(path)), random.Random(seed))
            assert torch.equal(tf.load(str(path), random.Random(seed)), want), (name, seed)


@needs_module
def test_truncated_or_corrupt_jpeg_is_bad_whichever_box(tmp_path):
    """A box above a truncation would decode: the fast path takes only whole files, so a truncated file is
    reported (BadImage) as the full decode reports it, with any seed."""
    data = jpeg(375, 500, quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert decode.jpeg_size(path.read_bytes()) is None
    for seed in range(8):
        with pytest.raises(decode.BadImage):
            TrainTransform(64).load(str(path), random.Random(seed))
    garbage = bytearray(data)
    garbage[len(data) // 2: len(data) // 2 + 400] = os.urandom(400)  # corrupt entropy data, ends complete
    assert decode.decode_jpeg_box(bytes(garbage), 0, 0, 375, 500) is None  # libjpeg's warning is refused
    with pytest.raises(ValueError, match="not inside"):
        decode._jpeg.decode_crop(data, 300, 0, 100, 10)


def test_recycled_float_buffers_are_never_handed_out_while_held():
    """The CPU normalize's output buffers: one is reused only once nothing holds it (a name, a list, the
    result of in-place ops on it), and a buffer no one holds is reused rather than a new one made."""
    from fasttrain.data.torchvision_backend import RecycledBuffers
    pool, shape, fmt = RecycledBuffers(keep=3), torch.Size([2, 3, 8, 8]), torch.contiguous_format

    def storage(t):
        return t.untyped_storage().data_ptr()
    a = pool.empty(shape, fmt)
    held = {storage(a)}
    batches = [(pool.empty(shape, fmt).normal_().sub_(1.0), None)]  # in a list, as list(loader) keeps them
    held.add(storage(batches[0][0]))
    conv = torch.nn.Conv2d(3, 1, 3)
    x = pool.empty(shape, fmt).normal_()
    loss = conv(x).sum()  # the step that uses it
    held.add(storage(x))
    assert len(held) == 3
    fresh = pool.empty(shape, fmt)
    assert storage(fresh) not in held and len(pool.buffers) == 3
    del fresh
    assert storage(pool.empty(shape, fmt)) not in held  # the fresh one, free again, is the one reused
    loss.backward()
    del loss, x, a, batches
    before = {storage(b) for b in pool.buffers}
    kept = [pool.empty(shape, fmt) for _ in range(3)]  # all three held at once: each one reused, none new
    assert {storage(b) for b in kept} == before
    assert pool.empty(torch.Size([1, 3, 8, 8]), fmt).shape == (1, 3, 8, 8)  # another shape: a new buffer
    assert pool.empty(shape, torch.channels_last).is_contiguous(memory_format=torch.channels_last)


def test_without_the_module_whole_images_are_decoded(tmp_path, monkeypatch):
    """A machine where _jpeg.c could not be built: same crops from full decodes, and the loader says so."""
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(200, 260, quality=90))
    tf = TrainTransform(32)
    want = [tf.load(str(path), random.Random(seed)) for seed in range(4)]
    monkeypatch.setattr(decode, "_jpeg", None)
    assert not decode.crop_decoder_available() and decode.jpeg_size(path.read_bytes()) is None
    assert all(torch.equal(tf.load(str(path), random.Random(seed)), w) for seed, w in enumerate(want))


@needs_module
def test_train_samples_decode_only_their_box(tmp_path, monkeypatch):
    """The DataLoader's train dataset takes the box path for every whole JPEG (val decodes whole images)."""
    from fasttrain.data import torchvision_backend as tvb
    from fasttrain.data.scan import Split
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(120, 150, seed=i, quality=90))
    split = Split(str(tmp_path), ("c",), tuple((str(tmp_path / f"{i}.jpg"), 0) for i in range(3)))
    calls = []
    monkeypatch.setattr(tvb, "decode_jpeg_box", lambda *a: calls.append(a[1:]) or decode.decode_jpeg_box(*a))
    items = [tvb.ImageFiles(split, TrainTransform(32))[(i, i)] for i in range(3)]
    assert len(calls) == 3 and all(img.shape == (3, 32, 32) and bad is None for img, _, bad in items)
    tvb.ImageFiles(split, tvb.ValTransform(32))[0]
    assert len(calls) == 3


def test_collate_in_a_worker_stacks_into_shared_memory(monkeypatch):
    """A worker's batch is made in shared memory (no second copy on its way to the training process);
    bad samples are left out and reported; in the main process (workers=0) nothing is shared."""
    from fasttrain.data import torchvision_backend as tb
    images = [torch.full((3, 4, 5), i, dtype=torch.uint8) for i in range(3)]
    items = [(images[0], 7, None), (None, 8, ("bad.jpg", "truncated")), (images[1], 9, None), (images[2], 1, None)]
    x, y, bad = tb.collate(items)
    assert not x.is_shared() and torch.equal(x, torch.stack(images)) and y.tolist() == [7, 9, 1]
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    x, y, bad = tb.collate(items)
    assert x.is_shared() and torch.equal(x, torch.stack(images)) and x.dtype == torch.uint8
    assert y.tolist() == [7, 9, 1] and bad == [("bad.jpg", "truncated")]
