"""Named training recipes: TOML files of ordinary options shipped in this folder, plus what each is meant to
reproduce.

    fasttrain recipes                                     # list them, with their published results
    fasttrain train /data/imagenet --recipe rn50-16ep     # use one; any flag (or --config) still wins

A recipe file is a flat TOML of option keys, exactly as a --config file, and one [recipe] table saying what
it targets: `top1`, `top5` (percent), `hardware`, `wall_minutes`, `source`, `note`. fasttrain
has NOT run these recipes on ImageNet: the numbers are their sources' published results.

A recipe is written for its number of epochs. Given another --epochs (`--recipe rn18-16ep --epochs 1`, a quick
try), its epoch-based knobs that nothing else set (the LR peak, warm-up, progressive resizing's ramp) scale
with it, so the run keeps the recipe's shape: `scale_to_epochs`.
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import Any

from ..config import toml_values
from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

META_KEYS = {"top1", "top5", "hardware", "wall_minutes", "source", "note"}
NOT_RUN = ("fasttrain has not itself run these recipes on ImageNet: the results are their sources' published "
           "numbers, the target each recipe is meant to reproduce.")


def names() -> list[str]:
    return sorted(f.name[:-5] for f in resources.files(__name__).iterdir() if f.name.endswith(".toml"))


def _raw(name: str) -> dict[str, Any]:
    if name not in names():
        raise UserError(f"unknown recipe '{name}': one of {', '.join(names())} (see `fasttrain recipes`)")
    return tomllib.loads(resources.files(__name__).joinpath(f"{name}.toml").read_text())


def load(name: str) -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
    """({(group, field): value} of the recipe's options, its [recipe] table)."""
    raw = _raw(name)
    meta = raw.pop("recipe", {})
    if set(meta) - META_KEYS:
        raise UserError(f"recipe {name}: unknown [recipe] keys {sorted(set(meta) - META_KEYS)}")
    return toml_values(raw, f"recipe {name}"), meta


# The options counted in epochs that a recipe's shape depends on.
EPOCH_KNOBS = (("optim", "lr_peak_epoch"), ("optim", "warmup_epochs"), ("data", "start_ramp"),
               ("data", "end_ramp"))


def scale_to_epochs(recipe: dict[tuple[str, str], Any], values: dict[tuple[str, str], Any],
                    given: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """The recipe's epoch knobs (EPOCH_KNOBS) for a run of `values`' epochs (the options of every layer)
    instead of the recipe's own number, each in proportion (FFCV's LR peaks at epoch 2 of 16: at epoch 0.125
    of 1), except those in `given` (set by --config or a flag, which win as ever). Ramp epochs are rounded,
    the end kept at or after the start."""
    own, epochs = recipe.get(("optim", "epochs")), values.get(("optim", "epochs"))
    if not own or own == epochs:
        return {}
    out = {}
    for key in EPOCH_KNOBS:
        if key in recipe and key not in given:
            value = recipe[key] * epochs / own
            out[key] = round(value) if key[0] == "data" else value  # the ramp's are whole epochs
    if ("data", "end_ramp") in out:
        out[("data", "end_ramp")] = max(out[("data", "end_ramp")],
                                        out.get(("data", "start_ramp"), values.get(("data", "start_ramp"), 0)))
    return out


def describe_scaling(name: str, own: int, epochs: int, recipe: dict, scaled: dict) -> str:
    """One line saying what scale_to_epochs changed."""
    what = ", ".join(f"--{key[1].replace('_', '-')} {recipe[key]:g} -> {value:g}" for key, value in scaled.items())
    return f"recipe {name} is written for {own} epochs; for --epochs {epochs} its epoch knobs scale: {what}"


def recipes_command() -> int:
    """`fasttrain recipes`: one line per recipe, then where the numbers come from."""
    rows = [("recipe", "arch", "epochs", "top-1 %", "hardware", "wall time", "source")]
    for name in names():
        values, meta = load(name)
        minutes = meta.get("wall_minutes")
        rows.append((name, values[("model", "arch")], str(values[("optim", "epochs")]), f"{meta['top1']:g}",
                     meta.get("hardware", "?"), f"{minutes:g} min" if minutes else "not published",
                     meta.get("source", "?")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print()
    for name in names():
        note = load(name)[1].get("note")
        if note:
            print(f"{name}: {note}")
    print(f"\n{NOT_RUN}\nUse one with `fasttrain train DATA --recipe NAME`; --config and any flag override it, option by option.")
    return 0
