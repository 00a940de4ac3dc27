#!/usr/bin/env bash
# The GPU benchmark for a short device window, in one command: ordered so that a window cut short still
# yields the most. Planned to end within ~10 minutes (570 s) on one H100 or H200 with 16 CPU cores:
#
#   FASTTRAIN_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_run.sh   # on the GPU machine
#   OUT=/tmp/g bash benchmarks/gpu_run.sh --dry-run      # anywhere: checks the plan, writes OUT, runs nothing
#
# Run it from the repository root. It assumes fasttrain's dependencies import as a user installs them
# (`pip install 'fasttrain[dali,bench]'`; DALI and timm are optional: without one, its entries are left out
# and the bench says so) and takes PYTHONPATH as it finds it; the tree itself need not be installed
# (`python -m` runs it from here). Steps, each under its own time limit, each bench writing its bench.json
# after every entry (a stage cut short keeps what it measured):
#   1. env.txt: date, commit, GPU, CPUs, Python, torch, torchvision, DALI, timm; where the crop-box JPEG
#      decoder (a C module pip builds) is missing, build it with gcc if it can;
#   2. ceiling/ (CEILING_S): ResNet-50 model-only variants, each `fasttrain train` flags, in the order the
#      2026-12-04 H200 run set (bench's ceiling_variants): bf16+channels_last+compile (this run's baseline);
#      + --compile-mode reduce-overhead (CUDA graphs: the fastest there); on top of it fp16 with
#      --loss-scale 1024, batch 384 (--lr-per-256), batch 512 with --opt lars (its step compiled), fp16
#      with the dynamic GradScaler; then --compile-step without and with CUDA graphs (no gain measured),
#      foreach SGD, max-autotune-no-cudagraphs and max-autotune (minutes of autotuning each: last). A
#      variant that fails is left out with its reason (bench.json's plan.skipped) and the next one runs;
#   3. e2e/ (E2E_S): ResNet-50 end to end with the fastest ceiling variant (`--best-of`; its batch too; not a
#      variant whose compile took over 2 minutes, which would use up this stage):
#      the reference loop, fasttrain's torchvision and DALI GPU loaders, and the peers (timm's loader with
#      its prefetcher, torchvision's GPU decode_jpeg) feeding the same trainer; the model-only rate of the
#      same settings (of_ceiling divides by it) and the reference loop's;
#   4. dali/ (DALI_S): the DALI settings sweep (hardware-decoder share 0/0.65/0.9/0.99, prefetch 1-4) loader
#      only, then 0.65/0.99 and prefetch 3/4 feeding the same best ResNet-50 trainer;
#   5. resume.txt: benchmarks/resume_check.py, DALI "mixed": SIGTERM at step 6 of 16, --resume auto from
#      DALI's own checkpoint (no replay), and the batches against an uninterrupted run's, one for one
#      (what is left of TOTAL_S, at least RESUME_MIN_S);
#   6. goals.txt: benchmarks/check_goals.py over the three bench.json files (its SHORT lines do not stop this
#      script);
#   7. only when asked (PROFILE_LOADER=1, PROFILE=1; together ~110 s more): a torch.profiler look at the DALI
#      GPU loader alone (loader-profile.txt) and a trace of 4 steps of compiled ResNet-50 fed by DALI GPU
#      (profile.txt, profile-metrics.jsonl, trace.json.gz).
# On 4,096 generated JPEGs like those benchmarks/ANCHORS.md's figures were measured on (~460x375 px, ~70 KB),
# drawn once into FASTTRAIN_CACHE in ~15 s on 16 cores.
# Time plan: setup and JPEGs ~20 s; ceiling 200 s (the 2026-12-04 H200 run at its 190 s: the first
# variant's cold compile 61 s, later ones 2-36 s as inductor's cache served graphs an earlier variant
# compiled: four variants fit); end to end 150 s (71 s there: one compile, five short entries); DALI 100 s
# (84 s there, ResNet-18); the resume check's three short runs 60-90 s: about 570 s. A 15-minute device
# lease has room for it once. Lengthen CEILING_S for more ceiling variants; 0 leaves a stage out
# (CEILING_S=0: no --best-of, the later stages use bf16+channels_last+compile at batch 256).
# Results, the only files under OUT: env.txt, {ceiling,e2e,dali}/{bench.json,bench.log,bench.png},
# resume.txt, goals.txt (and the profiles, when asked). Checkpoints and the generated JPEGs go under
# SCRATCH and FASTTRAIN_CACHE, outside OUT. No matplotlib there? Then render the PNG elsewhere:
# fasttrain bench --from-json DIR/bench.json --out DIR.
# Knobs (environment): OUT (default runs/gpu), SCRATCH (/tmp/fasttrain-gpu-run), WORKERS (16), BATCH (256),
# IMAGES (4096), ARCH (resnet50), E2E_ARCHS (ARCH; "resnet50 resnet18": the end-to-end stage, peers included,
# for each, at the settings of ARCH's fastest ceiling variant), CEILING_S (200), E2E_S (150), DALI_S (100),
# TOTAL_S (570: the resume check gets what is left of it), RESUME_MIN_S (60), RESUME_CHECK (1; 0 leaves it
# out), PROFILE_LOADER (0), PROFILE (0), PYTHON (python3), LIKE (default; imagenet: every stage on JPEGs
# sized like ImageNet's, `fasttrain bench --like imagenet`; drawing 4,096 of them took 511 s on one core of
# the 2-core dev machine, so expect about a minute here), LOADER_S (0; N: first a loader-only stage, loader/,
# of N seconds), MAX_SIDE (unset; N: that stage also times each fasttrain loader on the same images as shards
# pre-resized to N px, `--shards --max-side N`).
# Decoding full-size against pre-resized ImageNet-sized JPEGs (issue 23), the loader stage alone:
#   LIKE=imagenet LOADER_S=240 MAX_SIDE=256 CEILING_S=0 E2E_S=0 DALI_S=0 RESUME_CHECK=0 bash benchmarks/gpu_run.sh
# Issue 23 (which loader, and both at once), stages left out unless given a time: AUTO_S, after the DALI stage,
# `fasttrain bench --sections auto` over AUTO_ARCHS ("resnet50 resnet18"): per arch the brief calibration
# `train --loader auto` makes (timed), then torchvision, DALI GPU and the hybrid end to end feeding the compiled
# model, and the path auto took (auto/bench.json; check_goals: auto within 5% of the best path, the calibration
# under 10 s, the hybrid ahead of both loaders where both are below the model); TUNE_S, last, `fasttrain tune`
# of each of AUTO_ARCHS with bf16 + channels_last + compile, each within TUNE_S (tune-ARCH.txt: each path
# alone and fed, p50/p95 ms, DALI's hardware-decoder share and prefetch depth). Estimated, not yet run:
# ~150 s and ~60-90 s an arch. The issue-23 window:
#   CEILING_S=0 E2E_S=0 DALI_S=0 RESUME_CHECK=0 AUTO_S=300 TUNE_S=120 bash benchmarks/gpu_run.sh
set -euo pipefail

dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
OUT=${OUT:-runs/gpu}
SCRATCH=${SCRATCH:-/tmp/fasttrain-gpu-run}
PY=${PYTHON:-python3}
CEILING_S=${CEILING_S:-200}
E2E_S=${E2E_S:-150}
DALI_S=${DALI_S:-100}
TOTAL_S=${TOTAL_S:-570}
RESUME_MIN_S=${RESUME_MIN_S:-60}
WORKERS=${WORKERS:-16}
IMAGES=${IMAGES:-4096}
BATCH=${BATCH:-256}
ARCH=${ARCH:-resnet50}
AUTO_S=${AUTO_S:-0}
TUNE_S=${TUNE_S:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FASTTRAIN_CACHE=${FASTTRAIN_CACHE:-/tmp/fasttrain-cache}

bench=(bench -j "$WORKERS" -b "$BATCH" --images "$IMAGES" -a "$ARCH")
[[ -n "${LIKE:-}" ]] && bench+=(--like "$LIKE")
LOADER_S=${LOADER_S:-0}
loader=("${bench[@]}" --sections loader --out "$OUT/loader")
[[ -n "${MAX_SIDE:-}" ]] && loader+=(--shards --max-side "$MAX_SIDE")
ceiling=("${bench[@]}" --sections ceiling --out "$OUT/ceiling")
best=(--best-of "$OUT/ceiling/bench.json")
e2e=("${bench[@]}")  # E2E_ARCHS: more archs end to end (each with the peers), at --best-of's settings
for a in ${E2E_ARCHS:-}; do [[ "$a" == "$ARCH" ]] || e2e+=(-a "$a"); done
e2e+=(--sections e2e --out "$OUT/e2e")
dali=("${bench[@]}" --sections dali --out "$OUT/dali")
# ResNet-18 at 64 px for 16 steps of 256: the check is about positions, not speed.
resume=(--out "$SCRATCH/resume" --stop-at 6)
train=(--loader dali -j "$WORKERS" -b 256 --image-size 64 --epochs 1 -p 2 --seed 0 --no-compile)
goals=(benchmarks/check_goals.py "$OUT/ceiling/bench.json" "$OUT/e2e/bench.json" "$OUT/dali/bench.json")
# Issue 23: --loader auto against each path (AUTO_S), `fasttrain tune` of each arch (TUNE_S)
auto=(bench -j "$WORKERS" -b "$BATCH" --images "$IMAGES" --sections auto --out "$OUT/auto")
for a in ${AUTO_ARCHS:-resnet50 resnet18}; do auto+=(-a "$a"); done
[[ -n "${LIKE:-}" ]] && auto+=(--like "$LIKE")
tune=(-j "$WORKERS" -b "$BATCH" --amp bf16 --channels-last --compile --cudnn-benchmark)
(( AUTO_S > 0 )) && goals+=("$OUT/auto/bench.json")

if (( dry )); then
  # Everything but the measuring: the arguments must parse, the scripts compile, and OUT must take files.
  # One Python for all the command lines (each stage's, separated by ---) and the scripts' syntax.
  "$PY" - "${loader[@]}" --- "${ceiling[@]}" --- "${e2e[@]}" "${best[@]}" --- "${dali[@]}" "${best[@]}" \
    --- train DATA "${train[@]}" --output-dir "$SCRATCH/resume/stopped" --- "${auto[@]}" \
    --- tune DATA "${tune[@]}" <<'PY'
import importlib.util, py_compile, sys
from fasttrain.bench import best_ceiling  # noqa: F401  (what picks --best-of's variant between the stages)
from fasttrain.cli import build_parser
line = []
for arg in sys.argv[1:] + ["---"]:
    if arg != "---":
        line.append(arg)
        continue
    build_parser().parse_args(line)
    line = []
for script in ("benchmarks/check_goals.py", "benchmarks/resume_check.py", "benchmarks/profile_loader.py",
               "tests/fault_worker.py"):
    py_compile.compile(script, doraise=True)
# The profile step's script imports what it needs (its main() does not run: __name__ is not "__main__").
spec = importlib.util.spec_from_file_location("profile_loader", "benchmarks/profile_loader.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
PY
  {
    (( LOADER_S > 0 )) && { printf '%q ' timeout "$LOADER_S" "$PY" -m fasttrain "${loader[@]}"; echo; }
    (( CEILING_S > 0 )) && { printf '%q ' timeout "$CEILING_S" "$PY" -m fasttrain "${ceiling[@]}"; echo; }
    (( E2E_S > 0 )) && { printf '%q ' timeout "$E2E_S" "$PY" -m fasttrain "${e2e[@]}" "${best[@]}"; echo; }
    (( DALI_S > 0 )) && { printf '%q ' timeout "$DALI_S" "$PY" -m fasttrain "${dali[@]}" "${best[@]}"; echo; }
    (( AUTO_S > 0 )) && { printf '%q ' timeout "$AUTO_S" "$PY" -m fasttrain "${auto[@]}"; echo; }
    [[ "${RESUME_CHECK:-1}" == 1 ]] && {
      printf '%q ' "$PY" benchmarks/resume_check.py --time-limit LEFT "${resume[@]}" -- train DATA "${train[@]}"
      echo; }
    printf '%q ' "$PY" "${goals[@]}"; echo
    if (( TUNE_S > 0 )); then
      for a in ${AUTO_ARCHS:-resnet50 resnet18}; do
        printf '%q ' timeout "$TUNE_S" "$PY" -m fasttrain tune DATA -a "$a" "${tune[@]}"; echo
      done
    fi
  } > "$OUT/gpu_run_plan.txt"
  echo "gpu_run: dry run: would run, in this order (the resume check gets what is left of ${TOTAL_S}s):"
  cat "$OUT/gpu_run_plan.txt"
  exit 0
fi

has_dali=1
if ! "$PY" -c 'import nvidia.dali' 2>/dev/null; then
  has_dali=0
  echo "gpu_run: nvidia.dali does not import (pip install 'fasttrain[dali]'): no DALI entries, no resume check" >&2
fi

# The crop-box JPEG decoder of the torchvision loader is a C module that pip builds; where the tree is not
# pip-installed, build it directly if a compiler and libjpeg-turbo's headers exist.
if ! "$PY" -c 'from fasttrain.data import _jpeg' 2>/dev/null; then
  ext=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if gcc -O2 -shared -fPIC -I"$inc" fasttrain/data/_jpeg.c -ljpeg -o "fasttrain/data/_jpeg$ext" 2>/dev/null; then
    echo "gpu_run: built the crop-box JPEG decoder"
  else
    echo "gpu_run: no crop-box JPEG decoder (no compiler or libjpeg headers): the torchvision loader decodes whole images" >&2
  fi
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${FASTTRAIN_GIT_COMMIT:-unknown (set FASTTRAIN_GIT_COMMIT)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  echo "cpus: $(nproc)"
  "$PY" - <<'PY' 2>&1 || true
import importlib, sys, torch, torchvision
def version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception as e:
        return f"not importable ({type(e).__name__})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, DALI {version('nvidia.dali')}, timm {version('timm')}")
PY
} | tee "$OUT/env.txt"

# run_bench NAME LIMIT ARGS...: one bench stage, stopped after LIMIT seconds; its output in OUT/NAME/bench.log.
status=0
run_bench() {
  local name=$1 limit=$2 rc=0
  shift 2
  (( limit > 0 )) || return 0
  mkdir -p "$OUT/$name"
  timeout --signal=TERM --kill-after=20 "$limit" "$PY" -m fasttrain "$@" 2>&1 | tee "$OUT/$name/bench.log" \
    || rc=${PIPESTATUS[0]}
  if (( rc == 124 )); then
    echo "gpu_run: $name stopped after ${limit}s; $OUT/$name/bench.json holds the entries that finished" >&2
  elif (( rc != 0 )); then
    status=$rc
  fi
}

run_bench loader "$LOADER_S" "${loader[@]}"
run_bench ceiling "$CEILING_S" "${ceiling[@]}"
# The later stages train with the fastest ceiling variant, when the ceiling stage measured one (--best-of's pick).
"$PY" -c 'import sys; from fasttrain.bench import best_ceiling; print(*best_ceiling(sys.argv[1], [sys.argv[2]]))' \
  "$OUT/ceiling/bench.json" "$ARCH" 2>/dev/null || best=()
run_bench e2e "$E2E_S" "${e2e[@]}" "${best[@]}"
(( has_dali )) && run_bench dali "$DALI_S" "${dali[@]}" "${best[@]}"
run_bench auto "$AUTO_S" "${auto[@]}"

# The bench's generated JPEGs (drawn once into FASTTRAIN_CACHE; made here if no bench drew them).
if (( has_dali )); then
  data=$("$PY" -c "from fasttrain.bench.images import bench_dataset; print(bench_dataset($IMAGES, like='${LIKE:-default}'))")
fi
if (( has_dali )) && [[ "${RESUME_CHECK:-1}" == 1 ]]; then
  left=$(( TOTAL_S - SECONDS - 5 ))
  (( left < RESUME_MIN_S )) && left=$RESUME_MIN_S
  "$PY" benchmarks/resume_check.py --time-limit "$left" "${resume[@]}" -- train "$data" "${train[@]}" \
    > "$OUT/resume.txt" 2>&1 || true
  grep -E "^resume_check:|run exit:|resumed from|replaying|Error" "$OUT/resume.txt" | head -20 || true
fi

present=()
for f in "${goals[@]:1}"; do [[ -f "$f" ]] && present+=("$f"); done
if (( ${#present[@]} )); then
  "$PY" benchmarks/check_goals.py "${present[@]}" | tee "$OUT/goals.txt" || true  # exit 1: a goal SHORT
fi

# Issue 23: the thorough loader profile of each arch, as `fasttrain train --loader auto` then reuses it.
if (( TUNE_S > 0 )); then
  [[ -n "${data:-}" ]] || data=$("$PY" -c \
    "from fasttrain.bench.images import bench_dataset; print(bench_dataset($IMAGES, like='${LIKE:-default}'))")
  for a in ${AUTO_ARCHS:-resnet50 resnet18}; do
    timeout --signal=INT --kill-after=20 "$TUNE_S" "$PY" -m fasttrain tune "$data" -a "$a" "${tune[@]}" \
      > "$OUT/tune-$a.txt" 2>&1 || true
    tail -12 "$OUT/tune-$a.txt" || true
  done
fi

# Step 7, only when asked: where the DALI GPU loader's time goes alone (torch.profiler over 80 batches at
# fasttrain's defaults: GPU busy share, kernels, main-thread wait, CPU per image; ~20-30 s), and a trace of 4
# steps of compiled ResNet-50 fed by DALI GPU after the compile warm-up (87 s on the H200, compile 71 s),
# with GPU idle and data wait per epoch in metrics.jsonl; the trace gzipped when under 16 MiB.
if (( has_dali )) && [[ "${PROFILE_LOADER:-0}" == 1 ]]; then
  timeout --signal=INT --kill-after=10 60 "$PY" benchmarks/profile_loader.py "$data" -j "$WORKERS" \
    -b "$BATCH" --batches 80 > "$OUT/loader-profile.txt" 2>&1 || true
  grep -E "^profile_loader|img/s|main thread|GPU:|CPU:" "$OUT/loader-profile.txt" | head -8 || true
fi
if (( has_dali )) && [[ "${PROFILE:-0}" == 1 ]]; then
  rm -rf "$SCRATCH/profile"
  timeout --signal=INT --kill-after=20 120 "$PY" -m fasttrain train "$data" -a resnet50 --loader dali \
    -j "$WORKERS" -b "$BATCH" --epochs 2 -p 4 --seed 0 --amp bf16 --channels-last --compile \
    --profile 10:14 --no-tensorboard --output-dir "$SCRATCH/profile" > "$OUT/profile.txt" 2>&1 || true
  cp "$SCRATCH/profile/metrics.jsonl" "$OUT/profile-metrics.jsonl" 2>/dev/null || true
  for t in "$SCRATCH"/profile/profile/*.json; do
    [[ -f "$t" ]] || continue
    gzip -c "$t" > "$SCRATCH/trace.json.gz"
    (( $(stat -c %s "$SCRATCH/trace.json.gz") < 16000000 )) && cp "$SCRATCH/trace.json.gz" "$OUT/trace.json.gz"
  done
  grep -E "GPU idle|data wait|epoch [0-9]:|Error|trace" "$OUT/profile.txt" | head -20 || true
fi
echo "gpu_run: done in ${SECONDS}s"
exit "$status"
