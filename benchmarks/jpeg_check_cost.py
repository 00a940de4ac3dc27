"""What the structural JPEG check (fasttrain/data/jpeg_check.py, run before DALI sees a dataset) adds to
the start of a run: the scan of DATA alone, the scan + first check (reads each file's ends), and the scan +
check from its cache (one stat per file), on the benchmark's generated JPEGs (~460x375 px, ~70 KB).

    .venv/bin/python benchmarks/jpeg_check_cost.py [N_TRAIN] [REPEATS]

Files are in the page cache (just written or read before): the figures are the CPU side of the check,
not a cold disk's. One process, threads as `-j 2`. Results go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from fasttrain.bench.images import bench_dataset
from fasttrain.data import jpeg_check
from fasttrain.data.scan import scan_dataset
from fasttrain.dist import DistInfo


def main(n_train: int = 2048, repeats: int = 3) -> None:
    root = bench_dataset(n_train)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FASTTRAIN_CACHE"] = cache  # the check's cache only; the images stay where they are
        for r in range(repeats):
            shutil.rmtree(os.path.join(cache, "jpeg-check"), ignore_errors=True)  # a first check each run
            t0 = time.perf_counter()
            train, val = scan_dataset(root)
            t1 = time.perf_counter()
            paths = [p for s in (train, val) for p, _ in s.samples]
            bad = jpeg_check.broken_jpegs(paths, DistInfo(), threads=2)
            t2 = time.perf_counter()
            scan_dataset(root)
            jpeg_check.broken_jpegs(paths, DistInfo(), threads=2)
            t3 = time.perf_counter()
            n = len(paths)
            print(f"run {r}: {n} files, {len(bad)} broken: scan {1e6 * (t1 - t0) / n:.1f} us/file, first check "
                  f"+{1e6 * (t2 - t1) / n:.1f} us/file, scan + cached check {1e6 * (t3 - t2) / n:.1f} us/file",
                  flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
