"""What a benchmark run leaves behind: bench.json (entries + environment), a table, and bench.png.

Each entry's ratio_to_reference divides its img/s by the reference entry of the same section (and the
same arch) measured in the same run, so machine speed and background load mostly cancel out. Peer entries
(timm's loader, torchvision's GPU decode: peers.py) are marked "(peer)" in the table and drawn in their own
colour in the plot.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch

SECTION_TITLES = {"loader": "Loader only (decode + augment, batches delivered to the device)",
                  "model": "Model only (synthetic batches on the device)",
                  "e2e": "End to end (loader + model)",
                  "ceiling": "Model only, variants past the compiled ceiling (x the reference loop)",
                  "recipe": "Recipe knobs end to end (torchvision loader + model; x = against the fixed-size run)",
                  "dali": "DALI loader settings (--hw-decoder-load, --prefetch): loader only, then end to end",
                  "auto": "--loader auto's pick against every path it picks from, end to end"}


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the checkout fasttrain runs from, with '-dirty' if tracked files are modified;
    $FASTTRAIN_GIT_COMMIT where the tree travelled without .git (the GPU machine)."""
    if os.environ.get("FASTTRAIN_GIT_COMMIT"):
        return os.environ["FASTTRAIN_GIT_COMMIT"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def dali_version() -> str | None:
    from ..data import dali_backend
    return dali_backend.version()


def timm_version() -> str | None:
    try:
        import timm
        return timm.__version__
    except Exception:  # not installed: the timm peer is left out
        return None


def environment(device: torch.device, args: dict | None = None) -> dict:
    """jpeg_box_decode: whether the torchvision loader decodes only the crop box of train JPEGs (the optional
    compiled module was built); without it that loader decodes whole images, ~0.2 CPU ms an image more."""
    import torchvision

    from ..data.decode import crop_decoder_available
    cuda = device.type == "cuda"
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "device": str(device),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "dali": dali_version(), "timm": timm_version(),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "git_commit": git_commit(), "args": args,
            "jpeg_box_decode": crop_decoder_available(),
            "load_average_at_start": load_average()}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a busy neighbour on a shared machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def reference_section(e: dict) -> str:
    """The section whose reference an entry is measured against: its own, but the dali and auto sections'
    entries (no reference loop of their own) against the loader section's (loader only) or the e2e section's."""
    if e["section"] == "auto":
        return "e2e"
    if e["section"] != "dali":
        return e["section"]
    return "loader" if e["arch"] is None else "e2e"


def add_ratios(entries: list[dict]) -> None:
    """ratio_to_reference for every entry: its img/s over the same section's (and arch's) reference."""
    refs = {(e["section"], e["arch"]): e["images_per_sec"] for e in entries if e.get("reference")}
    for e in entries:
        ref = refs.get((reference_section(e), e["arch"]))
        e["ratio_to_reference"] = e["images_per_sec"] / ref if ref else None


def write_json(path: str, entries: list[dict], env: dict, plan: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"environment": env, "plan": plan, "entries": entries}, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def label(e: dict) -> str:
    """An entry's row name: its name without the section, "(peer)" after a peer's."""
    return e["name"].split("/", 1)[1] + (" (peer)" if e.get("peer") else "")


def _ratio(e: dict, unit: str = "x") -> str:
    """x the reference loop ("-" where the run has none); for the dali section's entries also against
    fasttrain's default settings."""
    out = "-" if e.get("ratio_to_reference") is None else f"{e['ratio_to_reference']:.2f}{unit}"
    if e.get("default_knobs"):
        out += " (default)"
    elif e.get("vs_default") is not None:
        out += f" ({e['vs_default']:.2f}x default)"
    return out


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(entries: list[dict]) -> str:
    """Markdown table, one row per entry (pasteable into RESULTS.md). Loader-only rows show no data wait
    or device idle: they do nothing but wait for data, by construction."""
    rows = ["| section | configuration | img/s | x reference | data wait | device idle | p50 ms | p95 ms | CPU ms/img |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        ratio = "ref" if e.get("reference") else _ratio(e)
        ceiling = f" ({100 * e['of_ceiling']:.0f}% of ceiling)" if e.get("of_ceiling") else ""
        ceiling += f" ({e['vs_folder']:.2f}x folder)" if e.get("vs_folder") else ""
        loader = e["section"] == "loader" or (e["section"] == "dali" and e["arch"] is None)
        wait = None if loader else e["data_wait_fraction"]
        idle = None if loader else e.get("device_idle_fraction")
        cpu = e.get("cpu_ms_per_image")
        rows.append(f"| {e['section']} | {label(e)} | {e['images_per_sec']:,.1f} | {ratio}{ceiling} | "
                    f"{_percent(wait)} | {_percent(idle)} | {e['p50_ms']:.1f} | {e['p95_ms']:.1f} | "
                    f"{'-' if cpu is None else f'{cpu:.2f}'} |")
    return "\n".join(rows)


PEER_COLOUR = "#ff7f0e"


def panel_setup(section: str, first: dict, plan: dict) -> str:
    """A panel's sizes: batch, workers, and the image size of its section (the loader's crop, the models'
    input: they differ with --quick on CPU); an older bench.json without a plan gives no size."""
    loader_only = section == "loader" or (section == "dali" and first.get("arch") is None)
    size = plan.get("image_size" if loader_only else "model_image_size")
    return (f"batch {first['batch_size']}" + (f", {first['workers']} workers" if first.get("workers") else "")
            + (f", {size}x{size} px" if size else ""))


def plot(path: str, entries: list[dict], env: dict, plan: dict | None = None) -> None:
    """Horizontal bars of img/s, one panel per section (their scales differ by orders of magnitude);
    reference bars grey and hatched, peers orange, fasttrain blue; every bar labelled with its img/s and its
    ratio to the reference. `plan`: bench.json's, for each panel's image size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in SECTION_TITLES if any(e["section"] == s for e in entries)]
    heights = [sum(e["section"] == s for e in entries) + 1.2 for s in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(10, 0.42 * sum(heights) + 1.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, sec in zip(axes[:, 0], sections):
        rows = [e for e in entries if e["section"] == sec][::-1]  # first entry at the top
        vals = [e["images_per_sec"] for e in rows]
        colors = ["#9e9e9e" if e.get("reference") else PEER_COLOUR if e.get("peer") else "#1f77b4" for e in rows]
        bars = ax.barh(range(len(rows)), vals, color=colors, height=0.7)
        for bar, e in zip(bars, rows):
            if e.get("reference"):
                bar.set_hatch("//")
            ratio = "reference" if e.get("reference") else _ratio(e, "x ref")
            if e.get("of_ceiling"):
                ratio += f", {100 * e['of_ceiling']:.0f}% of model-only"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f"  {fmt_rate(e['images_per_sec'])}  ({ratio})", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [label(e) for e in rows], fontsize=8)
        ax.set_xlim(0, max(vals) * 1.5 if vals and max(vals) > 0 else 1)
        ax.set_title(f"{SECTION_TITLES[sec]}; {panel_setup(sec, rows[-1], plan or {})}", fontsize=10, loc="left")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("images / second (higher is better)")
    from matplotlib.patches import Patch
    where = env.get("gpu") or f"{env.get('cpu_count')}-core CPU"
    commit = env.get("git_commit") or "unknown"
    commit = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
    top = 1 - 0.55 / fig.get_figheight()  # room for a title line and a legend line
    quick = " (--quick: rough numbers)" if (env.get("args") or {}).get("quick") else ""
    fig.suptitle(f"fasttrain bench{quick}: {where}, torch {env['torch']}, commit {commit}, {env['date'][:10]}",
                 fontsize=10, y=1 - 0.12 / fig.get_figheight(), va="top")
    handles = [Patch(facecolor="#9e9e9e", hatch="//", label="reference loop (pytorch/examples imagenet)"),
               Patch(facecolor="#1f77b4", label="fasttrain")]
    if any(e.get("peer") for e in entries):
        handles.append(Patch(facecolor=PEER_COLOUR, label="peer: what a user would pick instead"))
    fig.legend(handles=handles, fontsize=8, ncol=len(handles), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.38 / fig.get_figheight()),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_rate(x: float) -> str:
    """1,234 img/s; 12.3 below 100, where the decimal still means something."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
