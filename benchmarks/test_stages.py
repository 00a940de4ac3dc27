"""Where a CPU loader's milliseconds go, stage by stage (pytest-benchmark), on the benchmark's JPEGs.

    .venv/bin/python -m pytest benchmarks/test_stages.py --benchmark-only      # = make bench-stages
    FASTTRAIN_STAGE_LIKE=imagenet FASTTRAIN_STAGE_IMAGES=256 make bench-stages  # on ImageNet-sized JPEGs

`fasttrain bench` times whole loaders side by side; this times their parts, on one thread, so a change to
one stage shows up as that stage's number. Per image unless the name says batch:
- decode: torchvision.io / libjpeg-turbo, whole image and crop box only (fasttrain's train path), against
  PIL (the reference's ImageFolder loader);
- augment: fasttrain's TrainTransform on uint8 tensors, torchvision's v2 RandomResizedCrop + flip on the
  same tensors, and the reference's PIL RandomResizedCrop + flip + ToTensor + Normalize;
- normalize_batch: 128 uint8 images to normalized float32, as the torchvision loader does it on a CPU device
  (on one intra-op thread: with more, they fight the DataLoader workers for the cores);
- dali_cpu_batch: fasttrain's DALI CPU-only pipeline through its iterator (file read, decode of the crop
  region, resize, flip, normalize), batch 32, one DALI thread.
CI runs this file once with --benchmark-disable (tests/test_bench.py), so it cannot rot; no time is asserted.
"""

from __future__ import annotations

import io
import itertools
import os
import random

import pytest
import torch
from PIL import Image

from fasttrain.bench.images import bench_dataset
from fasttrain.bench.reference import MEAN, STD
from fasttrain.data.base import Layout
from fasttrain.data.decode import decode_file, read_bytes
from fasttrain.data.scan import scan_dataset
from fasttrain.data.torchvision_backend import DeviceBatches, TrainTransform

SIZE = 224


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    n = int(os.environ.get("FASTTRAIN_STAGE_IMAGES", "64"))
    like = os.environ.get("FASTTRAIN_STAGE_LIKE", "default")  # bench --like: images.py
    return bench_dataset(n, out=str(tmp_path_factory.mktemp("stages") / "data"), processes=1, like=like)


@pytest.fixture(scope="module")
def files(root):
    return [p for p, _ in scan_dataset(root)[0].samples]


@pytest.fixture(scope="module")
def decoded(files):
    return [decode_file(p) for p in files]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    yield
    torch.set_num_threads(n)


def test_decode_torchvision(benchmark, files):
    data = itertools.cycle([read_bytes(p) for p in files])
    from torchvision.io import ImageReadMode, decode_image
    benchmark(lambda: decode_image(torch.frombuffer(bytearray(next(data)), dtype=torch.uint8), mode=ImageReadMode.RGB))


def test_decode_box_fasttrain(benchmark, files):
    """Only the RandomResizedCrop box (what the torchvision loader decodes of a train JPEG), boxes drawn by
    TrainTransform: same pixels as the full decode above, cropped."""
    from fasttrain.data.decode import crop_decoder_available, decode_jpeg_box, jpeg_size
    if not crop_decoder_available():
        pytest.skip("the crop decoder module was not built")
    tf, seeds = TrainTransform(SIZE), itertools.count()
    jobs = itertools.cycle([read_bytes(p) for p in files])

    def decode_box():
        data = next(jobs)
        return decode_jpeg_box(data, *tf.box(*jpeg_size(data), random.Random(next(seeds))))
    benchmark(decode_box)


def test_decode_pil_reference(benchmark, files):
    data = itertools.cycle([read_bytes(p) for p in files])
    benchmark(lambda: Image.open(io.BytesIO(next(data))).convert("RGB"))


def test_augment_fasttrain(benchmark, decoded):
    """Crop + resize + flip of a whole decoded image (with the box decoder the crop is already done)."""
    images, tf, seeds = itertools.cycle(decoded), TrainTransform(SIZE), itertools.count()
    benchmark(lambda: tf(next(images), random.Random(next(seeds))))


def test_augment_torchvision_v2(benchmark, decoded):
    from torchvision.transforms import v2
    images = itertools.cycle(decoded)
    tf = v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()])
    benchmark(lambda: tf(next(images)))


def test_augment_pil_reference(benchmark, files):
    import torchvision.transforms as T
    pil = itertools.cycle([Image.open(p).convert("RGB") for p in files])
    tf = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    benchmark(lambda: tf(next(pil)))


def test_normalize_batch(benchmark, decoded):
    tf = TrainTransform(SIZE)
    batch = torch.stack([tf(decoded[i % len(decoded)], random.Random(i)) for i in range(128)])
    labels = torch.zeros(128, dtype=torch.int64)
    to_float = DeviceBatches(None, Layout(torch.device("cpu"), channels_last=False), None)
    benchmark(lambda: to_float._to_device(batch, labels))


def test_dali_cpu_batch(benchmark, root):
    from fasttrain.data import dali_backend
    if not dali_backend.available():
        pytest.skip(f"nvidia.dali does not import ({dali_backend.import_error()})")
    from fasttrain.bench.loaders import BenchData, open_loader
    layout = Layout(torch.device("cpu"), channels_last=False)
    # fasttrain's own DALI CPU path (the pipeline and iterator `fasttrain train --loader dali` builds), not a
    # pipeline of its own: DALI is built in one place, fasttrain/data/dali_backend.py.
    with open_loader("dali-cpu", BenchData.scan(root), 32, 1, SIZE, layout, 10_000) as batches:
        it = iter(batches)
        next(it)  # the pipeline's start-up is not a batch's cost
        benchmark(lambda: next(it))
        it.close()
