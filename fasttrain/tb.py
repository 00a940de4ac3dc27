"""TensorBoard events in OUTPUT_DIR/tb/, written by rank 0 (`tensorboard --logdir runs/`).

Every point sits at a global step, epoch x steps_per_epoch + steps done, so a resumed run continues the
same curves: its writer opens with a purge step, and TensorBoard hides what the stopped run wrote past the
checkpoint (the steps the resumed run redoes). Per print step: train/loss, train/top1, train/lr,
train/images_per_sec, train/data_wait, all read at the print step's existing sync; per epoch, at the
epoch's last step: every number of its metrics.jsonl row as epoch/<key>; once: the resolved config as text.
"""

from __future__ import annotations

import json
import os

from .errors import UserError

SKIP = ("time",)  # unix time: TensorBoard stores every event's wall time already (and float32 would blur it)


def available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return False
    return True


def wanted(flag: bool | None) -> bool:
    """--tensorboard / --no-tensorboard / auto (on when tensorboard imports)."""
    if flag is None:
        return available()
    if flag and not available():
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or the extra: pip install 'fasttrain[watch]'), or drop the flag")
    return flag


def purge_step(epoch: int, step: int, steps_per_epoch: int) -> int:
    """The first global step whose old events a run starting at (epoch, step) hides. The stopped run wrote
    the checkpoint's own step before saving, and this run does not write it again: keep it. Except a
    checkpoint at an epoch's last step: this run validates that epoch again and writes its epoch/* points
    at that very step (losing the stopped run's train/* point there)."""
    g = epoch * steps_per_epoch + step
    return g if step == steps_per_epoch else g + 1


class TensorBoard:
    """One SummaryWriter; every method is a no-op when disabled (ranks other than 0, --no-tensorboard)."""

    def __init__(self, log_dir: str, enabled: bool, start: int, config: dict):
        """start: the purge step (see purge_step); a fresh run passes 0 or 1 and so hides all earlier events."""
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(log_dir, exist_ok=True)
        # purge_step writes a SessionLog.START at `start`: TensorBoard drops the older events at or past it.
        self.writer = SummaryWriter(log_dir, purge_step=start, flush_secs=30)
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), start)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def step(self, global_step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, global_step)

    def epoch(self, global_step: int, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, global_step)
        self.writer.flush()  # a person watching sees the epoch now, not at the next timed flush

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
