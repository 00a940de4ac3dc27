"""CPU milliseconds to decode one image of each dataset, on one thread: what a set of JPEGs costs a loader's
workers, without the loaders' queues, batching and neighbours' noise in the way.

    python benchmarks/decode_cost.py ~/.cache/fasttrain/bench-v1-512 ~/.cache/fasttrain/bench-imagenet-v1-512 \\
        /tmp/shards-max256 --repeats 3

Each DATA is an ImageFolder tree or `fasttrain shard` output (its train split is read). Every train image's
bytes are read into memory first; then, per repeat and dataset in turn (interleaved, so a busy machine
slows all alike), each image is decoded whole (data/decode.py's decode_bytes: torchvision's libjpeg-turbo
decode, what the val path and a DALI-less loader do) and, where the C module is built, only a
RandomResizedCrop box of it (what fasttrain's torchvision loader decodes of a train JPEG; boxes drawn by its
TrainTransform from a fixed seed). The best repeat's mean per image is printed, with the dataset's mean
size and bytes. Process CPU time, not wall time, so other processes' load moves it little.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fasttrain.data.decode import crop_decoder_available, decode_bytes, decode_jpeg_box, jpeg_size  # noqa: E402
from fasttrain.data.decode import read_bytes  # noqa: E402
from fasttrain.data.scan import scan_dataset  # noqa: E402
from fasttrain.data.torchvision_backend import TrainTransform  # noqa: E402


def images(root: str) -> list[bytes]:
    return [read_bytes(p) for p, _ in scan_dataset(root)[0].samples]


def full(blobs: list[bytes]) -> list[tuple[int, int]]:
    return [tuple(decode_bytes("x", b).shape[1:]) for b in blobs]


def boxes(blobs: list[bytes]) -> None:
    tf = TrainTransform(224)
    for i, b in enumerate(blobs):
        size = jpeg_size(b)
        if size is None:  # not a whole JPEG the crop decoder takes: the loader decodes it whole
            decode_bytes("x", b)
        else:
            decode_jpeg_box(b, *tf.box(*size, random.Random(i)))


def cpu_ms_per_image(fn, blobs: list[bytes]) -> float:
    t = time.process_time()
    fn(blobs)
    return 1000 * (time.process_time() - t) / len(blobs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="ImageFolder trees or `fasttrain shard` outputs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    ns = p.parse_args()
    import torch
    torch.set_num_threads(1)  # as in a DataLoader worker
    sets = {d: images(d) for d in ns.data}
    stats = {}
    for d, blobs in sets.items():
        hw = np.array(full(blobs))  # also warms up every decoder
        stats[d] = {"images": len(blobs), "mean_width": round(float(hw[:, 1].mean())),
                    "mean_height": round(float(hw[:, 0].mean())), "mean_kb": round(sum(map(len, blobs)) / len(blobs) / 1e3, 1),
                    "full_ms": [], "box_ms": []}
    for _ in range(ns.repeats):
        for d, blobs in sets.items():
            stats[d]["full_ms"].append(round(cpu_ms_per_image(full, blobs), 3))
            if crop_decoder_available():
                stats[d]["box_ms"].append(round(cpu_ms_per_image(boxes, blobs), 3))
    for d, s in stats.items():
        box = f", RandomResizedCrop box {min(s['box_ms']):.3f} ms" if s["box_ms"] else ""
        print(f"{d}: {s['images']} images, mean {s['mean_width']}x{s['mean_height']} px, {s['mean_kb']} KB; "
              f"CPU ms per image (best of {ns.repeats}): whole {min(s['full_ms']):.3f}{box}")
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "load_average_at_end": os.getloadavg(), "sets": stats}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
