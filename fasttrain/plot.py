"""Training curves from metrics.jsonl: one figure, several runs overlaid.

    fasttrain plot runs/a runs/b --out curves.png

Panels: val top-1 against epoch and against the run's wall-clock time (time to accuracy), train and val
loss, learning rate, train img/s, host and GPU memory. Each run keeps one colour in every panel and is
named in the legend and at the end of its val top-1 lines. Written at the end of every run as
OUTPUT_DIR/curves.png when matplotlib is installed. No pyplot: a Figure with the Agg canvas touches no
global backend state.
"""

from __future__ import annotations

import os

from .errors import UserError
from .metrics import read_jsonl


def matplotlib_missing() -> str | None:
    """None, or why there is no plot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    return None


def load_run(path: str) -> tuple[str, list[dict]]:
    """(name, rows) of a run folder (or its metrics.jsonl)."""
    metrics = path if os.path.isfile(path) else os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"{path} holds no metrics.jsonl: pass run folders (OUTPUT_DIR of fasttrain train)")
    try:
        rows = [r for r in read_jsonl(metrics) if "epoch" in r and "val_top1" in r]
    except ValueError as e:
        raise UserError(f"{metrics} is not JSON lines ({e})") from None
    if not rows:
        raise UserError(f"{metrics} has no finished epoch yet")
    folder = os.path.dirname(os.path.abspath(metrics))
    return os.path.basename(folder), rows


def _names(paths: list[str], runs: list[tuple[str, list[dict]]]) -> list[str]:
    """Folder names, or (when two runs share one) the paths as given."""
    names = [n for n, _ in runs]
    return names if len(set(names)) == len(names) else [p.rstrip("/") for p in paths]


def _wall(rows: list[dict]) -> tuple[list[float], str]:
    """x values of the time-to-accuracy panel and their unit. Rows from before wall_seconds existed: time
    since the first epoch's end (a lower bound)."""
    secs = [r["wall_seconds"] if "wall_seconds" in r else r["time"] - rows[0]["time"] for r in rows]
    return secs, "wall_seconds" if "wall_seconds" in rows[0] else "time"


PANELS = (  # (title, y label, [(metrics key, line style)], x)
    ("val top-1 by epoch", "top-1 (%)", [("val_top1", "-")], "epoch"),
    ("val top-1 by time (time to accuracy)", "top-1 (%)", [("val_top1", "-")], "wall"),
    ("loss: train (solid), val (dashed)", "loss", [("train_loss", "-"), ("val_loss", "--")], "epoch"),
    ("learning rate (first step of the epoch)", "lr", [("lr", "-")], "epoch"),
    ("train speed", "img/s", [("train_images_per_sec", "-")], "epoch"),
    ("memory: host (solid), GPU tensors' peak (dashed), GPU in use (dotted)", "MiB",
     [("host_rss_mb", "-"), ("gpu_max_mem_mb", "--"), ("gpu_used_mb", ":")], "epoch"),
)


def draw(paths: list[str]):
    """The figure of the runs in `paths` (a matplotlib Figure, not yet saved)."""
    why = matplotlib_missing()
    if why:
        raise UserError(f"fasttrain plot needs matplotlib: {why}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = [load_run(p) for p in paths]
    names = _names(paths, runs)
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    longest = max(max(_wall(rows)[0]) for _, rows in runs)
    unit, scale = ("h", 3600.0) if longest > 2 * 3600 else ("min", 60.0)
    for i, ((_, rows), name) in enumerate(zip(runs, names)):
        colour = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        wall, source = _wall(rows)
        for ax, (title, ylabel, series, x_kind) in zip(axes, PANELS):
            xs = epochs if x_kind == "epoch" else [s / scale for s in wall]
            for key, style in series:
                points = [(x, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]
                if not points:
                    continue
                label = name if (key, style) == series[0] else None
                ax.plot(*zip(*points), style, color=colour, marker="o" if len(points) < 30 else None,
                        markersize=3, label=label)
                if key == "val_top1":  # named at its end: no legend hunt on the panel that matters most
                    ax.annotate(name, points[-1], xytext=(4, 0), textcoords="offset points", color=colour,
                                fontsize=8, va="center")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(ylabel)
            if x_kind == "epoch":
                ax.set_xlabel("epoch")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                ax.set_xlabel(f"wall-clock ({unit})" + ("" if source == "wall_seconds" else ", from epoch 0's end"))
            ax.grid(alpha=0.3)
    if all(r[k] > 0 for _, rows in runs for r in rows for k in ("train_loss", "val_loss")):
        axes[2].set_yscale("log")  # a loss falls by orders of magnitude; early spikes would flatten the rest
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(names), 6), frameon=False)
    return fig


def plot_runs(paths: list[str], out: str) -> str:
    fig = draw(paths)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=80)
    return out


def plot_command(ns) -> int:
    out = plot_runs(ns.runs, ns.out)
    print(f"fasttrain: wrote {out} ({len(ns.runs)} run(s))")
    return 0
