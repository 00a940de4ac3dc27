"""--loader auto's decision: measured rates in, a loader (torchvision, dali or hybrid with its share, DALI's
knobs) out, and the profile cache that spares a run the measuring.

    rates = Rates(model=812.0, paths={"torchvision": PathRate(alone=1618, fed=790), "dali": PathRate(...)})
    choice = decide(rates)          # Choice(loader="torchvision", ..., why="...")
    save_profile(profile_key(...), rates); load_profile(key)

Everything here is a pure function of the numbers (calibrate.py measures them), so the same rates give the
same choice on every rank and every machine, and the rules are unit-tested:
- a path's score is the rate it fed the model at (`fed`), else what its loader alone and the model alone
  allow (min of the two);
- the best score wins; a path within TIE of the best that is simpler (torchvision, then dali, then hybrid:
  fewer moving parts, nothing sharing the GPU with the model) wins over it, since the calibration's short
  windows cannot tell such paths apart;
- the hybrid is worth measuring only where both loaders alone feed the model at under LOADER_BOUND of its
  model-only rate (each is the limit: together they can make more); its share of DALI batches is the
  ratio of the two loaders' rates, so neither waits on the other;
- DALI's hardware-decoder share and prefetch depth: the measured setting that made the most images alone,
  fasttrain's defaults unless another beats them by more than TIE.
The profile is one JSON file per host, data, model, batch, world size and toggles under the cache folder
($FASTTRAIN_CACHE or ~/.cache/fasttrain)/loader-profiles/; `fasttrain tune` writes it and prints the table,
`fasttrain train --loader auto` reads it, `--calibrate fresh` measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

from .data.hybrid import round_share

VERSION = 1           # of the profile's contents and the measuring: a new one ignores older files
TIE = 0.02            # paths within 2% of the best are a tie: the simpler one is taken
LOADER_BOUND = 0.95   # a path that feeds the model at under 95% of its model-only rate is bound by its loader
SIMPLER = ("torchvision", "dali", "hybrid")  # ties go to the earlier


@dataclass
class PathRate:
    """One data path as calibrate.py measured it: img/s alone (delivered to the device, no step) and feeding
    the model step; the loader's CPU time per image alone; the fed steps' p50/p95 (ms); DALI's knobs."""
    alone: float | None = None
    fed: float | None = None
    cpu_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    knobs: dict | None = None  # DALI: {"hw_decoder_load": F, "prefetch": N}; hybrid: {"dali_share": F}
    fed_step_ms: list[float] | None = None  # each fed step's time, in order: a stall at the start or throughout


@dataclass
class Rates:
    """A calibration's numbers: the model step alone (img/s), each path, and what they were measured with."""
    model: float
    paths: dict[str, PathRate] = field(default_factory=dict)
    device: str = "cpu"         # "cuda" or "cpu": which DALI mode "dali" is
    model_note: str = "eager"   # "eager" or "compiled": the model step the rates were measured with
    seconds: float = 0.0        # what the measuring cost
    created: str = ""
    cores: int = 1              # this process's share of the node's cores
    threads: int = 1            # torch's intra-op threads the model step ran on
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each part of `seconds` (phases_text)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Rates":
        return cls(model=float(d["model"]), paths={k: PathRate(**v) for k, v in d.get("paths", {}).items()},
                   device=d.get("device", "cpu"), model_note=d.get("model_note", "eager"),
                   seconds=float(d.get("seconds", 0.0)), created=d.get("created", ""), cores=int(d.get("cores", 1)),
                   threads=int(d.get("threads", 1)),
                   phases={k: float(v) for k, v in (d.get("phases") or {}).items()})


@dataclass(frozen=True)
class Choice:
    loader: str                   # torchvision | dali | hybrid
    dali_share: float = 0.0       # hybrid: share of the batches DALI makes
    hw_decoder_load: float | None = None  # DALI's knobs where measured (None: the configured ones)
    prefetch: int | None = None
    why: str = ""


def dali_name(device: str) -> str:
    return "dali-gpu" if device == "cuda" else "dali-cpu"


def display(path: str, device: str) -> str:
    return dali_name(device) if path == "dali" else path


def score(rates: Rates, path: str) -> float | None:
    """The rate path `path` trains at: as measured feeding the model; else (a model too slow to feed within
    the calibration's budget) estimated: the lowest of its loader's rate alone, the model's alone and, on a
    CPU, where the model's threads and the loader share the cores, what the cores allow: the model takes
    `threads` cores for 1/model s an image, the loader its CPU time an image (None: not measured)."""
    p = rates.paths.get(path)
    if p is None:
        return None
    if p.fed is not None:
        return p.fed
    if p.alone is None:
        return None
    est = min(p.alone, rates.model)
    if rates.device == "cpu" and p.cpu_ms is not None:
        est = min(est, rates.cores / (rates.threads / rates.model + p.cpu_ms / 1e3))
    return est


def loader_bound(rates: Rates, path: str) -> bool:
    s = score(rates, path)
    return s is not None and s < LOADER_BOUND * rates.model


def wants_hybrid(rates: Rates) -> bool:
    """Both single loaders measured, each feeding the model at under LOADER_BOUND of its rate."""
    return loader_bound(rates, "torchvision") and loader_bound(rates, "dali")


def hybrid_share(rates: Rates) -> float:
    """DALI's share of the hybrid's batches: its rate over both loaders' (as each fed the model alone, the
    rate it keeps up while the model runs), rounded to a multiple of 1/32 with neither source left empty."""
    tv, dali = score(rates, "torchvision"), score(rates, "dali")
    return round_share(dali / (tv + dali))


def measured_share(rates: Rates) -> float | None:
    """The hybrid's share: the one it was measured with, else the single loaders' ratio (None: not both
    measured)."""
    h = rates.paths.get("hybrid")
    if h is not None and h.knobs and h.knobs.get("dali_share"):
        return float(h.knobs["dali_share"])
    if score(rates, "torchvision") is None or score(rates, "dali") is None:
        return None
    return hybrid_share(rates)


def dali_label(knobs: dict, device: str) -> str:
    """`hw0.9+prefetch2` (as bench's DaliKnobs.label): DALI's CPU mode has no hardware decoder."""
    hw = f"hw{knobs['hw_decoder_load']:g}+" if device == "cuda" else ""
    return f"{hw}prefetch{knobs['prefetch']}"


def best_dali_knobs(variants: dict[str, PathRate], default: dict) -> dict:
    """Of DALI's measured knob settings (alone rates), the best; `default` (fasttrain's) unless another is
    faster by more than TIE."""
    base = next((v.alone for v in variants.values() if v.knobs == default and v.alone), None)
    best = max((v for v in variants.values() if v.alone and v.knobs), key=lambda v: v.alone, default=None)
    if best is None or base is None or best.alone <= base * (1 + TIE):
        return dict(default)
    return dict(best.knobs)


def decide(rates: Rates) -> Choice:
    """The path to train with: see the module docstring."""
    scored = {p: score(rates, p) for p in SIMPLER if score(rates, p) is not None}
    if not scored:
        return Choice("torchvision", why="nothing measured: torchvision")
    top = max(scored.values())
    path = next(p for p in SIMPLER if p in scored and scored[p] >= top * (1 - TIE))
    knobs = rates.paths[path].knobs or {}
    share = knobs.get("dali_share", 0.0) if path == "hybrid" else 0.0
    dali = rates.paths.get("dali")
    dk = (dali.knobs or {}) if dali is not None and path in ("dali", "hybrid") else {}
    return Choice(path, share, dk.get("hw_decoder_load"), dk.get("prefetch"), why=explain(rates, path, scored))


def rates_text(rates: Rates) -> str:
    """`img/s feeding the model: torchvision 790, dali-cpu 770; model alone 812 (eager)`."""
    scored = {p: score(rates, p) for p in SIMPLER if score(rates, p) is not None}
    fed = "feeding the model" if all(rates.paths[p].fed is not None for p in scored) else "(est.)"
    paths = ", ".join(f"{display(p, rates.device)} {s:,.0f}" for p, s in scored.items())
    return f"img/s {fed}: {paths}; model alone {rates.model:,.0f} ({rates.model_note})"


def explain(rates: Rates, path: str, scored: dict[str, float]) -> str:
    """The settings line's reason: every measured path's rate, the model's alone, and a tie if one decided."""
    tie = ""
    if scored[path] < max(scored.values()):
        best = max(scored, key=scored.get)
        tie = f"; {display(path, rates.device)} is within {100 * TIE:g}% of {display(best, rates.device)} and simpler"
    return rates_text(rates) + tie


def describe_choice(choice: Choice, device: str) -> str:
    """`torchvision`, `dali-gpu (--hw-decoder-load 0.9 --prefetch 2)`, `hybrid (--dali-share 0.5625 ...)`."""
    flags = [f"--dali-share {choice.dali_share:g}"] if choice.loader == "hybrid" else []
    if choice.loader in ("dali", "hybrid"):
        if device == "cuda" and choice.hw_decoder_load is not None:
            flags.append(f"--hw-decoder-load {choice.hw_decoder_load:g}")
        if choice.prefetch is not None:
            flags.append(f"--prefetch {choice.prefetch}")
    return display(choice.loader, device) + (f" ({' '.join(flags)})" if flags else "")


# -- the profile cache ---------------------------------------------------------------------------------------

def cache_dir() -> str:
    """$FASTTRAIN_CACHE (or ~/.cache/fasttrain)/loader-profiles, beside the demo dataset and the JPEG check."""
    from .data.demo import default_root
    return os.path.join(os.path.dirname(default_root()), "loader-profiles")


def profile_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), f"{digest}.json")


def load_profile(key: dict) -> tuple[Rates, str] | None:
    """(rates, path) of the cached profile of `key`, None where there is none (or it is unreadable)."""
    path = profile_path(key)
    try:
        with open(path) as fh:
            doc = json.load(fh)
        if doc.get("key") != key:
            return None
        return Rates.from_json(doc["rates"]), path
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_profile(key: dict, rates: Rates) -> str | None:
    """Write the profile atomically; None where the cache cannot be written (the run goes on)."""
    path = profile_path(key)
    rates.created = rates.created or time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"key": key, "rates": rates.to_json(), "choice": asdict(decide(rates))}, fh, indent=1)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def phases_text(rates: Rates) -> str:
    """Where a calibration's seconds went (the slowest rank's, each part): `model 2.1s, torchvision 1.9s (open
    1.2s), dali-gpu 3.0s (open 2.5s), ...`; "" where not recorded (a profile from an older fasttrain)."""
    parts = []
    for name, sec in rates.phases.items():
        if name.endswith(" open"):
            continue
        base = name.split("@")[0]
        label = display(base, rates.device) + name[len(base):]
        opened = rates.phases.get(f"{name} open")
        parts.append(f"{label} {sec:.1f}s" + (f" (open {opened:.1f}s)" if opened is not None else ""))
    return ", ".join(parts)


def table(rates: Rates) -> str:
    """`fasttrain tune`'s table: each measured path alone and feeding the model."""
    def num(x, fmt="{:,.0f}"):
        return "-" if x is None else fmt.format(x)
    rows = [("path", "alone img/s", "fed img/s", "of model", "p50 ms", "p95 ms", "CPU ms/img", "knobs")]
    rows.append((f"model alone ({rates.model_note})", "", num(rates.model), "100%", "", "", "", ""))
    for name, p in rates.paths.items():
        base = name.split("@")[0]
        knobs = ", ".join(f"{k} {v:g}" for k, v in (p.knobs or {}).items()
                          if rates.device == "cuda" or k != "hw_decoder_load")  # DALI's CPU mode has no such decoder
        rows.append((display(base, rates.device) + name[len(base):], num(p.alone), num(p.fed),
                     "-" if p.fed is None else f"{100 * p.fed / rates.model:.0f}%", num(p.p50_ms, "{:.1f}"),
                     num(p.p95_ms, "{:.1f}"), num(p.cpu_ms, "{:.2f}"), knobs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)
