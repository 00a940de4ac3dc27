"""Named training recipes: TOML files of ordinary options shipped in this folder, plus what each is meant to
reproduce.

    fasttrain recipes                                     # list them, with their published results
    fasttrain train /data/imagenet --recipe rn50-16ep     # use one; any flag (or --config) still wins

A recipe file is a flat TOML of option keys, exactly as a --config file, and one [recipe] table saying what
it targets: `top1`, `top5` (percent), `hardware`, `wall_minutes`, `source`, `note`. fasttrain
has NOT run these recipes on ImageNet: the numbers are their sources' published results.
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
