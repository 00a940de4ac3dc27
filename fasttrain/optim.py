"""The optimizer (--opt): SGD as the reference (momentum, weight decay on every parameter), optionally without
weight decay on BatchNorm and biases (--no-bn-wd); LARS as MLPerf's ResNet-50 uses it (--opt lars); or timm's
AdamW and LAMB (--opt adamw, --opt lamb: build_adaptive).

SGD and AdamW are torch's: the fused kernel (one launch for all parameters) on CUDA, foreach elsewhere, or
what --optim-impl says (benchmarks/ANCHORS.md and RESULTS.md have the two measured against each other). LARS
and LAMB are written here, as one update over a parameter group's tensors with public per-tensor ops (a norm
of each weight and gradient, the trust ratio, the update: several kernels per tensor when run eagerly;
benchmarks/RESULTS.md counts the operator calls). torch's multi-tensor `torch._foreach_*` functions are not
used: the project uses no underscore torch API, and torch's own documentation of its public `torch.foreach`
module (newer than the torch versions fasttrain supports) calls them the private functions it replaces. What
makes the update few kernels instead is `--compile-step` (capture.py): the whole optimizer step is one
torch.compile'd function, and inductor fuses each tensor's ops (with --compile-mode reduce-overhead, into CUDA
graphs). For that, their state exists from the start (zeros, what the first step would build
on) and the LR may be a 0-d tensor, so no step adds state or changes a Python value dynamo specializes on;
LAMB's step count is a 0-d float64 tensor (exact to 2^53 steps; its bias corrections computed in double, as
before). Checkpoints of the per-tensor loop they replaced (LAMB's step an int) load into them. Both are
checked against timm's Lars and Lamb (tests/test_optim.py). The LR schedule is schedules.py's.
"""

from __future__ import annotations

import torch

from .config import OptimConfig
from .errors import UserError

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


def fused_kernel(cfg: OptimConfig, device: torch.device) -> bool:
    """--optim-impl for torch's SGD and AdamW: fused (one kernel for all parameters) or foreach."""
    return device.type == "cuda" if cfg.optim_impl == "auto" else cfg.optim_impl == "fused"


def build_optimizer(params, cfg: OptimConfig, device: torch.device, compiled_step: bool = False
                    ) -> torch.optim.Optimizer:
    """SGD (fused or foreach: --optim-impl), LARS, AdamW or LAMB. `compiled_step` (--compile-step): the LR
    will be a tensor (capture.tensor_lr), which torch's AdamW takes fused, or on CUDA as capturable."""
    params = [p for p in params if p.requires_grad]
    groups = param_groups(params, cfg)
    if cfg.optimizer in ADAPTIVE:
        return build_adaptive(groups, cfg, device, compiled_step)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for g in groups:
        g.pop("trust", None)
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          **({"fused": True} if fused_kernel(cfg, device) else {"foreach": True}))
    if cfg.momentum:
        # The momentum buffers exist from the start, zeros: what the first step makes of a missing one (with
        # dampening 0: buf = momentum * 0 + grad), so the steps are the same. The fused kernel needs it: it
        # creates a missing buffer with empty_like and fills it in the same launch, but returns before writing
        # anything when the fp16 GradScaler found an inf, which it does on the first steps, and the buffer then
        # holds garbage from then on (tests/test_train.py checks it against foreach). --compile-step needs it
        # too: a step it skips on the device (--on-nan skip) must leave the state as it found it.
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


class PerTensor(torch.optim.Optimizer):
    """An optimizer whose update is written here (LARS, LAMB: a trust ratio of norms per tensor): step() runs
    the closure as torch's optimizers do, then `update(group, params)` on each group's parameters that have a
    gradient. `init(p, state)` fills a parameter's state with what the first step would start from, at
    construction and after load_state_dict (a checkpoint written before a tensor's first step, or by the
    earlier per-tensor LAMB), so that a step only ever updates tensors that exist."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self._init_state()

    def _init_state(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.init(p, self.state[p])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._init_state()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.update(group, params)
        return loss

    def init(self, p: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def update(self, group: dict, params: list[torch.Tensor]) -> None:
        raise NotImplementedError


def trust_ratio(w_norm: torch.Tensor, ratio: torch.Tensor, other_norm: torch.Tensor) -> torch.Tensor:
    """`ratio` where both norms are above 0, else 1 (a zero tensor or update keeps the plain LR); on the device."""
    return torch.where((w_norm > 0) & (other_norm > 0), ratio, torch.ones_like(ratio))


class LARS(PerTensor):
    """Layer-wise adaptive rate scaling (You et al. 2017) as in MLPerf's ResNet-50 reference (its
    lars_optimizer.py): for each weight tensor w with gradient g,

        trust = eta * |w| / (|g| + weight_decay * |w|)      (1 where |w| or |g| is 0)
        v     = momentum * v + lr * trust * (g + weight_decay * w)        (v starts at 0)
        w     = w - v

    and for a group with trust=False (BatchNorm, biases) v = momentum * v + lr * g. The LR sits inside the
    momentum buffer, as there (timm's Lars keeps it outside: the same steps while the LR is constant). Norms
    and the trust ratio stay on the device: no host sync."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = LARS_ETA,
                 trust: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, trust=trust))

    def init(self, p: torch.Tensor, state: dict) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def update(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, wd, m, eta = group["lr"], group["weight_decay"], group["momentum"], group["eta"]
        for p in params:
            g = p.grad.add(p, alpha=wd) if wd else p.grad
            if group["trust"]:
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                rate = trust_ratio(w_norm, eta * w_norm / (g_norm + wd * w_norm), g_norm) * lr
            else:
                rate = lr
            buf = self.state[p]["momentum_buffer"]
            buf.mul_(m).add_(g * rate)
            p.sub_(buf)


# AdamW and LAMB, as timm offers them (--opt adamw, --opt lamb): weight decay on every parameter as for SGD
# (on weights only with --no-bn-wd).
ADAPTIVE = ("adamw", "lamb")
BETAS = (0.9, 0.999)


def build_adaptive(groups: list[dict], cfg: OptimConfig, device: torch.device, compiled_step: bool = False
                   ) -> torch.optim.Optimizer:
    for g in groups:
        g.pop("trust", None)
    if cfg.optimizer == "adamw":
        fused = fused_kernel(cfg, device)
        if compiled_step and not fused and device.type != "cuda":
            # torch's foreach AdamW takes a tensor LR only as capturable, which it supports on GPUs only
            if cfg.optim_impl == "foreach":
                raise UserError("--compile-step with --opt adamw --optim-impl foreach needs a GPU (torch's foreach "
                                "AdamW takes the compiled step's tensor LR only there): drop --optim-impl foreach")
            fused = True
        fast = {"fused": True} if fused else {"foreach": True, "capturable": compiled_step}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay, **fast)
    return Lamb(groups, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)


class Lamb(PerTensor):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), as timm's Lamb without its
    built-in gradient clipping (that is --clip-grad here) and with the trust ratio on every tensor (timm's
    always_adapt=True). For each tensor w with gradient g, at step t:

        m = b1 m + (1 - b1) g              v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay w
        w = w - lr * trust * u,            trust = |w| / |u|   (1 where |w| or |u| is 0)

    torch has no LAMB. Norms and the trust ratio stay on the device (no host sync); t is a 0-d float64
    tensor on the parameter's device, so the bias corrections are the double-precision values a Python
    int step gave, without a host value for torch.compile to specialize on."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = BETAS, eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def init(self, p: torch.Tensor, state: dict) -> None:
        step = state.get("step", 0)
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.float64 and step.device == p.device):
            state["step"] = torch.tensor(float(step), dtype=torch.float64, device=p.device)  # an int before
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def update(self, group: dict, params: list[torch.Tensor]) -> None:
        (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
        for p in params:
            state = self.state[p]
            t, m, v = state["step"].add_(1), state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
            if wd:
                update.add_(p, alpha=wd)
            w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
            p.sub_(update * (trust_ratio(w_norm, w_norm / u_norm, u_norm) * lr))
