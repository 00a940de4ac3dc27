"""Run the reference training loop (pytorch/examples imagenet/main.py, as reproduced in
fasttrain/bench/reference.py) on its own, printing img/s the way `fasttrain bench` measures it.

    python benchmarks/reference_loop.py DATA -a resnet18 -b 256 -j 16 --steps 100
    python benchmarks/reference_loop.py DATA -a resnet50 -b 256 -j 16 --steps 100 --cudnn-benchmark  # old script

DATA holds train/<class>/*.jpg (ImageFolder layout). The loop lives in the package, not here, so that an
installed `fasttrain bench` times exactly the same code; this file is only its command line.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

try:
    from fasttrain.bench.measure import time_loop
    from fasttrain.bench.reference import ReferenceStep, reference_dataset, reference_loader
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fasttrain.bench.measure import time_loop
    from fasttrain.bench.reference import ReferenceStep, reference_dataset, reference_loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", metavar="DATA")
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=50, help="timed steps, after --warmup untimed ones")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cudnn-benchmark", action="store_true", help="as versions of the script before ~2022")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_dir = os.path.join(a.data, "train")
    ds = reference_dataset(train_dir, a.image_size)
    repeat = -(-(a.warmup + a.steps) * a.batch_size // len(ds))  # a small folder is chained into one long epoch
    loader = reference_loader(reference_dataset(train_dir, a.image_size, repeat), a.batch_size, a.workers)
    step = ReferenceStep(a.arch, len(ds.classes), device, cudnn_benchmark=a.cudnn_benchmark)
    t = time_loop(loader, step, device, a.warmup, a.steps)
    s = t.summary()
    print(f"reference loop {a.arch} on {device}, batch {a.batch_size}, {a.workers} workers: "
          f"{s['images_per_sec']:.1f} img/s, data wait {100 * s['data_wait_fraction']:.0f}%, "
          f"step p50 {s['p50_ms']:.1f} ms p95 {s['p95_ms']:.1f} ms; loss {step.losses.avg:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
