"""The optimizer (--opt): SGD as the reference (momentum, weight decay on every parameter), optionally without
weight decay on BatchNorm and biases (--no-bn-wd); LARS as MLPerf's ResNet-50 uses it (--opt lars); or timm's
AdamW and LAMB (--opt adamw, --opt lamb: build_adaptive).

The fused CUDA kernel is used for SGD where available (one launch for all parameters; faster than foreach
for ResNet-50 on an H100: benchmarks/ANCHORS.md), foreach elsewhere. The LR schedule is schedules.py's.
"""

from __future__ import annotations

import torch

from .config import OptimConfig

LARS_ETA = 0.001  # MLPerf's trust coefficient (its reference's `eeta`)


def param_groups(params: list[torch.nn.Parameter], cfg: OptimConfig) -> list[dict]:
    """One group, or with --no-bn-wd / LARS two: weights (ndim > 1), and BatchNorm weights and all biases
    (ndim <= 1) without weight decay. By shape rather than by name (FFCV's `'bn' in name`), so a ResNet's
    downsample BatchNorms and the classifier's bias are caught too. LARS also leaves the second group out of
    its trust ratio, as MLPerf's skip list ('batch_normalization', 'bias') does."""
    if not (cfg.no_bn_wd or cfg.optimizer == "lars"):
        return [{"params": params}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "trust": False}]


def build_optimizer(params, cfg: OptimConfig, device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD (fused on CUDA unless `fused` says otherwise, foreach elsewhere), LARS, AdamW or LAMB."""
    params = [p for p in params if p.requires_grad]
    groups = param_groups(params, cfg)
    if cfg.optimizer in ADAPTIVE:
        return build_adaptive(groups, cfg, device)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for g in groups:
        g.pop("trust", None)
    fused = device.type == "cuda" if fused is None else fused
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          **({"fused": True} if fused else {"foreach": True}))
    if fused and cfg.momentum:
        # The fused kernel creates a missing momentum buffer with empty_like and fills it in the same launch,
        # but returns before writing anything when the fp16 GradScaler found an inf, which it does on the
        # first steps: the buffer then holds garbage from then on and the loss goes NaN. Zeros are what the
        # first step would make of it (with dampening 0: buf = momentum * 0 + grad), so the step is the same
        # whether or not the first one is skipped. tests/test_train.py checks it against foreach.
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


class PerTensor(torch.optim.Optimizer):
    """An optimizer whose update is written per tensor (LARS, LAMB: a trust ratio of norms per tensor):
    step() runs the closure as torch's optimizers do, then `update(p, group)` for each parameter with a
    gradient."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        return loss

    def update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


def trust_ratio(w_norm: torch.Tensor, ratio: torch.Tensor, other_norm: torch.Tensor) -> torch.Tensor:
    """`ratio` where both norms are above 0, else 1 (a zero tensor or update keeps the plain LR); on the device."""
    return torch.where((w_norm > 0) & (other_norm > 0), ratio, torch.ones_like(ratio))


class LARS(PerTensor):
    """Layer-wise adaptive rate scaling (You et al. 2017) as in MLPerf's ResNet-50 reference (its
    lars_optimizer.py): for each weight tensor w with gradient g,

        trust = eta * |w| / (|g| + weight_decay * |w|)      (1 where |w| or |g| is 0)
        v     = momentum * v + lr * trust * (g + weight_decay * w)
        w     = w - v

    and for a group with trust=False (BatchNorm, biases) v = momentum * v + lr * g. The LR sits inside the
    momentum buffer, as there. Norms and the trust ratio stay on the device: no host sync. A loop over the
    parameters (~10 small kernels each): public foreach ops for norms do not exist, and LARS is meant for
    large per-GPU batches whose steps are long."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = LARS_ETA,
                 trust: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, trust=trust))

    def update(self, p: torch.Tensor, group: dict) -> None:
        lr, wd, m = group["lr"], group["weight_decay"], group["momentum"]
        g = p.grad.add(p, alpha=wd) if wd else p.grad
        if group["trust"]:
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
            trust = trust_ratio(w_norm, group["eta"] * w_norm / (g_norm + wd * w_norm), g_norm)
            update = g * (trust * lr)
        else:
            update = g * lr
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = update.clone()  # v = momentum * 0 + update
        else:
            state["momentum_buffer"].mul_(m).add_(update)
        p.sub_(state["momentum_buffer"])


# AdamW and LAMB, as timm offers them (--opt adamw, --opt lamb): weight decay on every parameter as for SGD
# (on weights only with --no-bn-wd).
ADAPTIVE = ("adamw", "lamb")
BETAS = (0.9, 0.999)


def build_adaptive(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    for g in groups:
        g.pop("trust", None)
    if cfg.optimizer == "adamw":
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay, **fast)
    return Lamb(groups, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)


class Lamb(PerTensor):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), as timm's Lamb without its
    built-in gradient clipping (that is --clip-grad here). For each tensor w with gradient g, at step t:

        m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay w
        w = w - lr * trust * u,            trust = |w| / |u|   (1 where |w| or |u| is 0)

    torch has no LAMB. A loop over the tensors with public ops; norms and the trust ratio stay on the device
    (no host sync). The step count is a plain int, so checkpoints load with weights_only=True."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = BETAS, eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, group: dict) -> None:
        (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
        if wd:
            update.add_(p, alpha=wd)
        w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
        p.sub_(update * (trust_ratio(w_norm, w_norm / u_norm, u_norm) * lr))
