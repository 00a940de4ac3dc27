"""SIGTERM (preemption, torchrun stopping a job, `kill`) and SIGINT (Ctrl-C) become a request, not a crash.

The handler only sets a flag. The training loop reads it at its next sync point, all ranks agree on it
there (dist.any_rank), rank 0 writes a checkpoint, and the process exits 128 + the signal (143 for SIGTERM,
130 for Ctrl-C) so `--resume auto` goes on. A second Ctrl-C (or SIGTERM) while stopping restores the
default action and ends the process at once.

"Second" means a repeat at least REPEAT_GAP_S after the first: one Ctrl-C at a terminal reaches every
process of the foreground group, and torchrun (or the --multiprocessing-distributed parent) passes the one it
got on again, so each rank sees the same keypress two or three times within milliseconds; SLURM sends
SIGTERM to every process of a step, torchrun included, which forwards it once more. Those repeats are the
first request, not an impatient second one.

The handler is installed only around the training loop (train.run, which puts back whatever was there
before when it returns). Python runs signal handlers between bytecodes, so a process blocked in C (joining
a process group whose peer died, say) would never act on the flag: outside the loop the signals keep their
default actions, as a launcher expects (cli.main turns a KeyboardInterrupt there into one line and exit 130).
"""

from __future__ import annotations

import signal
import time

REPEAT_GAP_S = 1.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_first: tuple[int, float] | None = None  # (signal, when) of the stop request
_before: dict = {}  # the handlers install() replaced, which uninstall() puts back


def _now() -> float:
    return time.monotonic()


def _handler(signum, frame):
    global _first
    if _first is None:
        _first = (signum, _now())
        return
    if _now() - _first[1] >= REPEAT_GAP_S:  # asked again: stop now, as if no handler were installed
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def install() -> None:
    global _first
    _first = None
    for sig in STOP_SIGNALS:
        previous = signal.signal(sig, _handler)
        _before.setdefault(sig, previous)


def uninstall() -> None:
    """The handlers from before install() back (the process's defaults, or a caller's own: train.run may
    run inside a test, a notebook or the bench). Once installed, always uninstalled: train.run's finally."""
    while _before:
        sig, handler = _before.popitem()
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def stop_requested() -> int:
    """The signal that asked to stop (SIGINT or SIGTERM), 0 if none did."""
    return _first[0] if _first else 0


def exit_status(signum: int) -> int:
    """128 + the signal, what a shell and torchrun expect (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + signum
