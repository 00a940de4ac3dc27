"""Does --loader auto's fed window, started right after the alone window has run the loader's queue dry,
under-measure a torchvision loader that can outrun the model? (The 2026-12-04 H200 run measured the hybrid
feeding ResNet-18 at 41% of its end-to-end rate.) A stand-in model step (a sleep of --step-ms) fed by the
calibration's own probe, once as calibrate.py runs it and once with --settle seconds of pause before the fed
window, so that the workers' queue refills.

    python benchmarks/calibration_settle.py DATA -j 16 -b 32 --step-ms 31 --alone-s 0.4 --fed-s 0.56 --settle 1

With many workers per core (16 on 2) each worker's batch takes long, as 16 workers' do beside a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fasttrain import calibrate  # noqa: E402
from fasttrain.config import DataConfig  # noqa: E402
from fasttrain.data.base import Layout  # noqa: E402
from fasttrain.data.scan import scan_dataset  # noqa: E402
from fasttrain.dist import DistInfo  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("-j", "--workers", type=int, default=16)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=31.0, help="the stand-in model step (a sleep)")
    p.add_argument("--alone-s", type=float, default=0.4)
    p.add_argument("--fed-s", type=float, default=0.56)
    p.add_argument("--settle", type=float, default=1.0, help="pause before the fed window, second probe")
    ns = p.parse_args()
    train, val = scan_dataset(ns.data)
    data = DataConfig(data=ns.data, image_size=224, batch_size=ns.batch_size, workers=ns.workers)
    split = calibrate.calibration_split(train, DistInfo(), 200 * ns.batch_size, 0)
    w = calibrate.Windows(model_s=0.5, alone_s=ns.alone_s, fed_s=ns.fed_s, max_batches=60)
    step_s = ns.step_ms / 1e3
    from fasttrain.bench import measure
    real = measure.time_loop  # probe() looks it up at each call: the settled run swaps in a pause before it
    for settle in (0.0, ns.settle):
        def step(x, y):
            time.sleep(step_s)

        def settled(*a, **k):
            time.sleep(settle)
            return real(*a, **k)
        measure.time_loop = settled
        try:
            r = calibrate.probe("torchvision", split, val, ns.batch_size, ns.workers, data,
                                Layout(torch.device("cpu"), False), step, step_s, w)
        finally:
            measure.time_loop = real
        print(f"settle {settle:g}s: alone {r.alone:,.0f} img/s, fed {r.fed:,.0f} img/s (model "
              f"{ns.batch_size / step_s:,.0f}), p50 {r.p50_ms:.1f} p95 {r.p95_ms:.1f} ms; fed steps {r.fed_step_ms}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
