"""Stop a training run with SIGTERM, resume it, and check that it went on with the same batches as a run
that was never stopped (issue 12: "resumes from DALI's own checkpoint, no replay, same next batch").

    python benchmarks/resume_check.py --out /tmp/rc --stop-at 6 --time-limit 150 -- \\
        train DATA --loader dali -j 16 -b 256 --image-size 64 --epochs 1 -p 2 --seed 0 --no-compile

Three runs of `tests/fault_worker.py` (fasttrain's CLI with test hooks), each logging a CRC of every
batch's labels and sums of its images (FT_TEST_BATCH_LOG):
1. stopped: SIGTERM at step --stop-at; expects exit 143 and a checkpoint (the stop lands on the next
   print step, -p);
2. resumed: the same command with `--resume auto`; expects exit 0, "resumed from", and no "replaying"
   (the line fasttrain prints when DALI cannot take its checkpoint and the epoch's done part is decoded
   again);
3. straight: the same command, never stopped, into another folder, if --time-limit leaves time for it.
The batches of 1 then 2 must equal those of 3, one for one. The last metrics.jsonl row of 2 and 3 is
printed side by side: on a CPU they are bitwise equal; on a GPU cuDNN's autotuned kernels need not be
deterministic, so they are shown, not compared. Checkpoints and logs stay under --out; the report goes
to stdout. Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Of a batch's image sums, relative to its sum of absolute values: a different crop or flip moves them by
# percents; two GPU decodes of the same file may differ in a few pixel values, far below this.
SUM_TOLERANCE = 1e-5


def run(args: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    """(exit status, output, seconds) of `python -m tests.fault_worker ARGS` from the repository root (so
    fasttrain imports from this tree without a PYTHONPATH edit); 124 when it ran past `timeout`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fault_worker", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its DataLoader workers too
        out, _ = proc.communicate()
        code = 124
    return code, out, time.perf_counter() - t0


def read_lines(path: str) -> list[str]:
    return open(path).read().splitlines() if os.path.exists(path) else []


def same_batch(a: str, b: str) -> bool:
    """Lines `labels CRC n N sum S wsum W abs A` (tests/fault_worker.py): the same labels in the same order,
    and image sums (plain, and weighted by column, which a flip changes) within SUM_TOLERANCE x A."""
    fa, fb = a.split(), b.split()
    if fa[:4] != fb[:4]:
        return False
    scale = SUM_TOLERANCE * max(float(fa[9]), float(fb[9]), 1.0)
    return all(abs(float(fa[i]) - float(fb[i])) <= scale for i in (5, 7))


def last_metrics(folder: str) -> dict | None:
    path = os.path.join(folder, "metrics.jsonl")
    rows = [json.loads(line) for line in read_lines(path) if line.strip()]
    return rows[-1] if rows else None


def compare(resumed_log: str, straight_log: str, stop_at: int) -> tuple[bool, str]:
    """(ok, line): the stopped + resumed runs' batches against the uninterrupted run's, one for one."""
    got, want = read_lines(resumed_log), read_lines(straight_log)
    differ = [i + 1 for i, (x, y) in enumerate(zip(got, want)) if not same_batch(x, y)]
    ok = len(got) == len(want) and not differ and len(want) > stop_at
    how = (f"different at steps {differ[:5]}" if differ else
           f"the same one for one (labels exact, image sums within {SUM_TOLERANCE:g} of their absolute sum)")
    return ok, (f"batches of the stopped + resumed runs against the uninterrupted run's: {len(got)} and "
                f"{len(want)} batches, {how}")


def print_last_metrics(resumed: str, straight: str) -> None:
    m2, m3 = last_metrics(resumed), last_metrics(straight)
    if m2 and m3:
        keys = [k for k in ("train_loss", "train_top1", "val_loss", "val_top1") if k in m2 and k in m3]
        print("resume_check: last metrics row, resumed vs uninterrupted: " +
              ", ".join(f"{k} {m2[k]!r} vs {m3[k]!r}" for k in keys), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs' checkpoints and logs")
    p.add_argument("--stop-at", type=int, default=6, help="the step at which the first run gets SIGTERM")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds for all three runs together")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- train DATA [fasttrain train flags]")
    a = p.parse_args(argv)
    train = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    if train[:1] != ["train"]:
        p.error("give the training command after --: -- train DATA ...")
    deadline = time.perf_counter() + a.time_limit
    stopped, straight = os.path.join(a.out, "stopped"), os.path.join(a.out, "straight")
    for folder in (stopped, straight):  # a checkpoint left by an earlier check must not be resumed from
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    logs = {name: os.path.join(a.out, f"{name}.batches") for name in ("stopped", "straight")}
    for path in logs.values():
        if os.path.exists(path):
            os.remove(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    checks: list[tuple[bool, str]] = []

    def step(title: str, args: list[str], extra_env: dict) -> tuple[int, str, float]:
        code, out, secs = run(args, {**env, **extra_env}, deadline - time.perf_counter())
        print(f"--- {title} ({secs:.0f}s): fasttrain {' '.join(args)}\n{out.rstrip()}\n{title} run exit: {code}",
              flush=True)
        return code, out, secs

    base = [*train, "--output-dir", stopped]
    code1, _, secs1 = step("stopped", base, {"FT_TEST_SIGTERM": f"0:{a.stop_at}", "FT_TEST_BATCH_LOG": logs["stopped"]})
    checks.append((code1 == 143, f"stopped run: exit {code1} (expected 143, saved on SIGTERM)"))
    code2, out2, secs2 = step("resumed", [*base, "--resume", "auto"], {"FT_TEST_BATCH_LOG": logs["stopped"]})
    checks.append((code2 == 0, f"resumed run: exit {code2} (expected 0)"))
    checks.append(("resumed from" in out2, "resumed run says \"resumed from\""))
    checks.append(("replaying" not in out2, "resumed run did not replay its done part (no \"replaying\")"))
    left = deadline - time.perf_counter()
    if left < 1.2 * (secs1 + secs2):
        print(f"resume_check: no uninterrupted run to compare with: {left:.0f}s left, it needs about "
              f"{secs1 + secs2:.0f}s", flush=True)
    else:
        code3, _, _ = step("straight", [*train, "--output-dir", straight], {"FT_TEST_BATCH_LOG": logs["straight"]})
        checks.append((code3 == 0, f"uninterrupted run: exit {code3} (expected 0)"))
        checks.append(compare(logs["stopped"], logs["straight"], a.stop_at))
        print_last_metrics(stopped, straight)
    for ok, line in checks:
        print(f"resume_check: {'ok  ' if ok else 'FAIL'} {line}", flush=True)
    passed = all(ok for ok, _ in checks)
    print(f"resume_check: {'PASS' if passed else 'FAIL'}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
