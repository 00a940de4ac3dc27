"""Read a bench.json and say which of issue 5's speed goals it meets (every ratio from the same run).

    python benchmarks/check_goals.py runs/bench/bench.json

CPU: loader only, fasttrain's best path >= 2x the reference loader at the same worker count.
GPU: ResNet-50 end to end >= 95% of its model-only rate with the same toggles and >= 4.5x the reference
loop; ResNet-18 >= 90% and >= 8x. Prints one line per goal; exit status 0 whatever the outcome (a
benchmark reports, it does not gate).
"""

from __future__ import annotations

import json
import sys

GPU_GOALS = {"resnet50": (0.95, 4.5), "resnet18": (0.90, 8.0)}


def goal_lines(doc: dict) -> list[str]:
    entries, lines = doc["entries"], []
    loaders = [e for e in entries if e["section"] == "loader" and not e["reference"]]
    if loaders:
        best = max(loaders, key=lambda e: e["ratio_to_reference"])
        ok = best["ratio_to_reference"] >= 2.0
        lines.append(f"{'MET ' if ok else 'SHORT'} loader only: best fasttrain path {best['loader']} "
                     f"{best['images_per_sec']:,.0f} img/s = {best['ratio_to_reference']:.2f}x the reference "
                     f"(goal 2x on a 2-core CPU)")
    for arch, (ceiling, ratio) in GPU_GOALS.items():
        e2e = [e for e in entries if e["section"] == "e2e" and e["arch"] == arch and not e["reference"]]
        if not e2e or doc["environment"].get("gpu") is None:
            continue
        best = max(e2e, key=lambda e: e["images_per_sec"])
        ok = best["of_ceiling"] >= ceiling and best["ratio_to_reference"] >= ratio
        lines.append(f"{'MET ' if ok else 'SHORT'} {arch} end to end: {best['name']} {best['images_per_sec']:,.0f} "
                     f"img/s = {100 * best['of_ceiling']:.0f}% of model-only (goal {100 * ceiling:.0f}%), "
                     f"{best['ratio_to_reference']:.2f}x the reference loop (goal {ratio}x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0] if argv else "runs/bench/bench.json") as fh:
        doc = json.load(fh)
    print("\n".join(goal_lines(doc)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
