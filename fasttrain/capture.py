"""--compile-step: the optimizer step as one torch.compile'd function, so that with the compiled model a
training step is the compiled forward and backward, then this, and nothing eager in between that costs a
kernel per tensor or a host sync.

    tensor_lr(optimizer)                        # after the LR schedule is built: each group's LR a 0-d tensor
    tr.update = CompiledUpdate(tr, mode)        # after the checkpoint is restored (its state is what it compiles)
    keep = tr.update()                          # engine.Trainer, after a window's backward

What the function does, on the device: fp16's static loss scale taken off the gradients (--loss-scale),
the check that every gradient is finite (only where a step may be skipped: --on-nan skip, or fp16's
dynamic GradScaler, whose own check ran just before and whose scale is updated just after), gradient
clipping (--clip-grad), the optimizer's step, and the --ema update. A step that must be skipped is skipped
on the device: the parameters and the optimizer state (and, for --on-nan skip, the EMA) are put back as
they were with torch.where, and state the step created (torch's AdamW makes its state at its first step)
back to zeros, which is where it starts. It returns that decision as a 0-d bool tensor (None where nothing
can skip) for the engine's meters, so no step reads a device value on the host.

The LR schedule stays schedules.py's LambdaLR, stepped on the host; the LR it computes is written into the
0-d tensor the compiled step reads (torch's schedulers fill a tensor LR in place: one small copy per param
group a step): a new LR each step with no recompile. torch.compile's mode is --compile-mode's: with
reduce-overhead the step is CUDA graphs. What stays eager in a step besides: the meters' update of the
window's losses and logits (a few small kernels, as without --compile-step), fp16's GradScaler's own
unscale and scale update (dynamic scale only), and zero_grad (no kernel: the gradients are set to None).

The step is called through the optimizer's class (`type(opt).step(opt)`): the LR scheduler wraps the
instance's step in a function of a torch file that dynamo does not trace, which would run it eagerly. torch's
own optimizers break the graph just around their step (to keep it an inference graph), so SGD/AdamW give a
few graphs, each compiled; LARS and LAMB are traced whole with the rest.
"""

from __future__ import annotations

import inspect

import torch

from .scaling import is_dynamic_scaler


def tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each param group's LR as a 0-d float32 tensor on `device` (float32: the precision the kernels apply a
    Python float LR in), for torch.compile to read instead of specializing on a number (optim.build_optimizer
    with compiled_step=True picks the AdamW kernel that takes one)."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def keep_lr_kind(mine, saved):
    """The LR a checkpoint's param group brings, in the form this optimizer uses: written into its tensor
    (the same tensor the compiled step reads) or as a float. Checkpoints of either kind load in either run."""
    value = float(saved)
    if isinstance(mine, torch.Tensor):
        mine.fill_(value)
        return mine
    return value


def _state_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v for p in params for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]


def _restore(keep: torch.Tensor, tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for t, s in zip(tensors, saved):
        t.copy_(torch.where(keep, t, s))


def compile_fn(fn, mode: str, backend: str = "inductor"):
    """torch.compile as --compile-step uses it (tests trace it with dynamo's eager backend: no code generated).
    Each CompiledUpdate its own compiled entries where torch can keep them apart (isolate_recompiles): the
    function's code is the same for every instance, and instances made in one process (the bench, the tests)
    would otherwise share dynamo's recompile limit and run uncompiled past it (the bench also calls
    torch.compiler.reset() between variants, for a torch without that option)."""
    isolated = "isolate_recompiles" in inspect.signature(torch.compile).parameters
    return torch.compile(fn, mode=mode, dynamic=False, backend=backend,
                         **({"isolate_recompiles": True} if isolated else {}))


class CompiledUpdate:
    """The optimizer step of a Trainer (`tr`): its optimizer, raw model, EMA, --clip-grad, --on-nan and
    scaler, compiled with torch.compile in `mode`."""

    def __init__(self, tr, mode: str = "default"):
        self.optimizer, self.model, self.ema, self.clip_grad = tr.optimizer, tr.model, tr.ema, tr.clip_grad
        dynamic = is_dynamic_scaler(tr.scaler)
        self.skip = tr.on_nan == "skip" and not dynamic  # --on-nan skip: the EMA and the meters skip too
        self.mask = self.skip or dynamic                   # the parameters and optimizer state skip
        self.unscale = getattr(tr.scaler, "inverse_scale", None)  # a static fp16 loss scale (--loss-scale)
        self.lrs = [group["lr"] for group in self.optimizer.param_groups]  # tensor_lr's, read by the graph
        self._step = compile_fn(self._run, mode)

    def __call__(self) -> torch.Tensor | None:
        return self._step()

    def after_schedule(self) -> None:
        """After the schedule's step: the LR it set, in the tensor the compiled step reads. (torch's schedulers
        fill a tensor LR in place; one that put a float there instead would make every new LR a recompile.)"""
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            if group["lr"] is not lr:
                group["lr"] = keep_lr_kind(lr, group["lr"])

    @torch.no_grad()
    def _run(self) -> torch.Tensor | None:
        opt = self.optimizer
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if self.unscale is not None:
            for p in params:
                p.grad.mul_(self.unscale)
        keep = None
        if self.mask:
            keep = torch.stack([torch.isfinite(p.grad).all() for p in params]).all()
            had_state = [len(opt.state[p]) > 0 for p in params]
            tensors = params + _state_tensors(opt, [p for p, had in zip(params, had_state) if had])
            saved = [t.clone() for t in tensors]
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        type(opt).step(opt)
        if self.mask:
            _restore(keep, tensors, saved)
            new = _state_tensors(opt, [p for p, had in zip(params, had_state) if not had])
            _restore(keep, new, [torch.zeros_like(t) for t in new])
        if self.ema is not None:
            self._ema_update(keep if self.skip else None)
        return keep

    def _ema_update(self, keep: torch.Tensor | None) -> None:
        if keep is None:
            self.ema.update(self.model)
            return
        tensors = self.ema.float_tensors()
        saved = [t.clone() for t in tensors]
        self.ema.update(self.model)
        _restore(keep, tensors, saved)
