"""What pre-resizing (`fasttrain shard --max-side N`) costs in accuracy: the same short schedule trained on
full-size images and on copies pre-resized to each N, every model scored on the same full-size val images.

    python benchmarks/resize_accuracy.py --work /tmp/ra --json benchmarks/results/X.json    # ~40 min, 2 cores

The data (drawn here, deterministic): the demo's 10 learnable classes (stripes, checkerboards, dots, rings
in warm or cool colours; fasttrain/data/demo.py), at ImageNet's spread of sizes (bench --like imagenet's)
scaled by --image-size/224, so the images stand to the model's crop as ImageNet's stand to a 224 px crop;
--max-side is scaled alike (default 146 and 100 at 64 px crops: 2.3x and 1.6x the crop, as 512 and 350 px
are at 224). A texture's period is
drawn in pixels, so a resized image's texture is finer: what a small RandomResizedCrop of it has lost is
what the experiment measures.

Each copy (the full-size one too) is written by `fasttrain shard`, so every run reads the same way; each
run is `fasttrain train SHARDS` (the demo's settings: ResNet-18, SGD lr 0.05, 1 warm-up epoch, cosine,
--epochs E) then `fasttrain eval FOLDER --checkpoint` of its last checkpoint on the full-size val folder,
and its own val (resized as its train set) from metrics.jsonl. --seeds repeats every run per seed: at a few
hundred val images, one image is a quarter of a percent, and seeds move top-1 by more than that. A run
already finished in --work (its resize_accuracy.json) is kept, so an interrupted call picks up where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # fasttrain from this tree, as `python -m fasttrain` from its root would import it

from fasttrain.bench.images import imagenet_size  # noqa: E402
from fasttrain.data.demo import CLASSES, draw, written_into_place  # noqa: E402


def write_data(out: str, per_class: int, val_per_class: int, scale: float, seed: int = 0) -> str:
    """OUT/{train,val}/<class>/*.jpg: demo classes at ImageNet's sizes x scale (unless already there)."""
    if os.path.isdir(os.path.join(out, "val")):
        return out
    with written_into_place(out) as tmp:
        for split_i, (split, n) in enumerate((("train", per_class), ("val", val_per_class))):
            for c, name in enumerate(CLASSES):
                texture, palette = name.split("_")
                rng = np.random.default_rng([seed, split_i, c, 23])
                folder = os.path.join(tmp, split, name)
                os.makedirs(folder)
                for i in range(n):
                    w, h = (max(16, round(s * scale)) for s in imagenet_size(rng))
                    img = Image.fromarray(draw(texture, palette == "warm", rng, h, w))
                    img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=int(rng.integers(88, 97)))
    return out


def fasttrain(*args: str, timeout: float = 3600) -> str:
    """Output of `python -m fasttrain ARGS` from the repository root; raises on a non-zero exit."""
    res = subprocess.run([sys.executable, "-m", "fasttrain", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"resize_accuracy: `fasttrain {' '.join(args)}` failed ({res.returncode}):\n"
                         f"{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="scratch folder: data, shards, runs")
    p.add_argument("--json", default=None, help="where to write the results")
    p.add_argument("--max-side", default="146,100", help="comma list of --max-side values (default: 146,100)")
    p.add_argument("--per-class", type=int, default=120, help="train images per class (10 classes)")
    p.add_argument("--val-per-class", type=int, default=40, help="val images per class")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list of training seeds")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("-a", "--arch", default="resnet18")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("-j", "--workers", type=int, default=2)
    ns = p.parse_args()
    sides = [int(s) for s in ns.max_side.split(",") if s]
    seeds = [int(s) for s in ns.seeds.split(",") if s]
    t0 = time.perf_counter()
    folder = write_data(os.path.join(ns.work, "data"), ns.per_class, ns.val_per_class, ns.image_size / 224)
    results = {"command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]), "copies": {}, "runs": []}
    for side in [None] + sides:
        name = f"max{side}" if side else "full"
        shards = os.path.join(ns.work, name)
        out = fasttrain("shard", folder, shards, "-j", str(ns.workers), *(["--max-side", str(side)] if side else []))
        manifest = json.load(open(os.path.join(shards, "manifest.json")))
        results["copies"][name] = {"max_side": side, **manifest["resize"],
                                   "shard_bytes": sum(s["bytes"] for sp in manifest["splits"].values()
                                                      for s in sp["shards"])}
        said = [line for line in out.splitlines() if "wrote" in line or "nothing to do" in line]
        print(f"resize_accuracy: {name}: {said[-1] if said else out.strip()}", flush=True)
        for seed in seeds:
            run = os.path.join(ns.work, "runs", f"{name}-seed{seed}")
            done = os.path.join(run, "resize_accuracy.json")
            if os.path.exists(done):  # a run an earlier, interrupted call finished: kept
                results["runs"].append(json.load(open(done)))
                continue
            t = time.perf_counter()
            fasttrain("train", shards, "-a", ns.arch, "--image-size", str(ns.image_size), "-b", str(ns.batch_size),
                      "-j", str(ns.workers), "--epochs", str(ns.epochs), "--lr", "0.05", "--warmup-epochs", "1",
                      "--lr-schedule", "cosine", "--seed", str(seed), "--device", "cpu", "--no-tensorboard",
                      "--output-dir", run)
            seconds = time.perf_counter() - t
            rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            ev = fasttrain("eval", folder, "--checkpoint", os.path.join(run, "checkpoint.pth.tar"), "-j",
                           str(ns.workers), "--device", "cpu")
            top1 = float(re.findall(r"val: Acc@1 ([0-9.]+)", ev)[-1])
            results["runs"].append({"copy": name, "max_side": side, "seed": seed, "train_seconds": round(seconds, 1),
                                    "own_val_top1": rows[-1]["val_top1"], "full_size_val_top1": top1})
            with open(done, "w") as fh:
                json.dump(results["runs"][-1], fh)
            print(f"resize_accuracy: {name} seed {seed}: full-size val top-1 {top1:.2f} (own val "
                  f"{rows[-1]['val_top1']:.2f}), trained in {seconds:.0f}s", flush=True)
    results["summary"] = {}
    for name in results["copies"]:
        top1 = np.array([r["full_size_val_top1"] for r in results["runs"] if r["copy"] == name])
        results["summary"][name] = {"runs": len(top1), "mean": round(float(top1.mean()), 2),
                                    "std": round(float(top1.std(ddof=1)), 2) if len(top1) > 1 else None,
                                    "min": float(top1.min()), "max": float(top1.max())}
        print(f"resize_accuracy: {name}: full-size val top-1 mean {top1.mean():.2f} over {len(top1)} seeds "
              f"({top1.min():.2f}-{top1.max():.2f})", flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    results["environment"] = {"commit": commit.stdout.strip() or "unknown", "python": platform.python_version(),
                              "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
