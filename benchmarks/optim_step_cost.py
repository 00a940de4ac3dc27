"""One optimizer step on ResNet-50's parameters (random gradients), op by op against --compile-step's
compiled function: milliseconds per step and the operator calls the profiler sees.

    python benchmarks/optim_step_cost.py lars        # or lamb, sgd; --device cuda on a GPU

Op by op, LARS and LAMB make several operator calls per tensor (norms, the trust ratio, the update); the
compiled step is one call of a graph inductor generated. On a GPU each operator call is at least one kernel
launch. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's fasttrain

from fasttrain.capture import tensor_lr  # noqa: E402
from fasttrain.config import OptimConfig  # noqa: E402
from fasttrain.optim import build_optimizer  # noqa: E402


def top_level_ops(fn) -> collections.Counter:
    """Operator calls not made inside another operator call, by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def top(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and top(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("optimizer", choices=("lars", "lamb", "sgd"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ns = ap.parse_args()
    device = torch.device(ns.device)
    model = torchvision.models.resnet50().to(device)
    opt = build_optimizer(model.parameters(), OptimConfig(optimizer=ns.optimizer, lr=0.1, weight_decay=5e-5), device,
                          compiled_step=True)
    tensor_lr(opt, device)  # as --compile-step: the eager step reads the same tensor LR
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    @torch.no_grad()
    def step():
        type(opt).step(opt)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    compiled = torch.compile(step, dynamic=False)
    t0 = time.perf_counter()
    compiled()
    sync()
    compile_s = time.perf_counter() - t0
    rows = []
    for name, fn in (("op by op", step), ("compiled", compiled)):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(ns.steps):
            fn()
        sync()
        ms = (time.perf_counter() - t) / ns.steps * 1e3
        ops = top_level_ops(fn)
        rows.append(f"{name}: {ms:.1f} ms a step, {sum(ops.values())} operator calls ({dict(ops.most_common(3))})")
    print(f"optim_step_cost: {ns.optimizer} on ResNet-50 ({len(list(model.parameters()))} tensors), {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; compile {compile_s:.0f} s")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
