"""SIGTERM (preemption, torchrun stopping a job, `kill`) becomes a request, not a crash.

The handler only sets a flag. The training loop reads it at its next sync point, all ranks agree on it
there (dist.any_rank), rank 0 writes a checkpoint, and the process exits 143 so `--resume auto` goes on.
A second SIGTERM while stopping restores the default action and ends the process at once.

The handler is installed only around the training loop (train.run). Python runs signal handlers between
bytecodes, so a process blocked in C (joining a process group whose peer died, say) would never act on the
flag: outside the loop SIGTERM keeps its default action and ends the process, as a launcher expects.
"""

from __future__ import annotations

import signal

_requested = False


def _handler(signum, frame):
    global _requested
    if _requested:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    _requested = True


def install() -> None:
    global _requested
    _requested = False
    signal.signal(signal.SIGTERM, _handler)


def uninstall() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_requested() -> bool:
    return _requested
