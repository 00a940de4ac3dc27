#!/usr/bin/env bash
# The whole GPU benchmark in one command, planned to finish within ~10 minutes (590 s) on one H100 or H200
# with 16 CPU cores (torch.compile warm-ups included): the bench matrix, its goals, a profile of the DALI
# GPU loader alone, a DALI "mixed" stop/resume check, then a profile of compiled ResNet-50 training.
#
#   FASTTRAIN_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_run.sh   # on the GPU machine
#   OUT=/tmp/g bash benchmarks/gpu_run.sh --dry-run      # anywhere: checks the plan, writes OUT, runs nothing
#
# Run it from the repository root. It assumes fasttrain's dependencies import as a user installs them
# (`pip install 'fasttrain[dali,bench]'`; DALI and timm are optional: without one, its entries are left out
# and the bench says so) and takes PYTHONPATH as it finds it; the tree itself need not be installed
# (`python -m` runs it from here). Steps:
#   1. env.txt: date, commit, GPU, CPUs, Python, torch, torchvision, DALI, timm;
#   2. where the crop-box JPEG decoder (a C module pip builds) is missing, build it with gcc if it can;
#   3. `fasttrain bench -j 16 -b 256 --images 4096 -a resnet50 -a resnet18`, stopped after LIMIT_S:
#      - loader only: reference ImageFolder+PIL loader; fasttrain torchvision, DALI CPU, DALI GPU; the peers
#        timm (create_loader + prefetcher) and torchvision GPU decode_jpeg;
#      - model only, batch 256: reference loop settings (fp32, NCHW, loss.item() per step), fp32,
#        channels_last, bf16, bf16+channels_last, bf16+channels_last+compile (cuDNN autotuning on);
#      - end to end: the reference loop; fasttrain's loaders and the peers feeding fasttrain's trainer with
#        the fastest model-only toggles;
#      on 4,096 generated JPEGs like those benchmarks/ANCHORS.md's figures were measured on (~460x375 px,
#      ~70 KB), drawn in ~15 s on 16 cores. bench.json is rewritten after each entry, so a run cut short
#      still leaves what it measured;
#   4. benchmarks/check_goals.py on bench.json (goals.txt; its SHORT lines do not stop this script);
#   5. benchmarks/profile_loader.py: the DALI GPU loader alone under torch.profiler, 80 batches (GPU busy
#      share, kernels, main-thread wait, CPU per image: where its time goes), at most 60 s;
#   6. benchmarks/resume_check.py, also after a bench cut short: SIGTERM at step 6 of 16, --resume auto
#      from DALI's own checkpoint (no replay), and the batches against an uninterrupted run's;
#   7. a torch.profiler trace of 4 steps of compiled ResNet-50 fed by DALI GPU (below).
# Time plan: the first H200 run's matrix, without peers, took 217 s, of which torch.compile warm-up 46 s
# (ResNet-50) and 23 s (ResNet-18); the peers add about 50 s (2 loader-only entries, 4 end-to-end ones);
# drawing the JPEGs ~15 s: about 290 s expected on an H100, cut at LIMIT_S=350. The loader profile ~20-30 s
# (estimated, not yet run on a GPU; at most 60 s). The resume check's three short runs take about 60-75 s,
# set-up ~10 s: about 395-460 s in all, and TOTAL_S=470 bounds it. The
# profile (step 7) then gets what is left of TOTAL_S + 120 s: it took 87 s on the H200 (compile 71 s), so
# the whole script ends within ~590 s; a 15-minute device lease has room for it once (the second H200 run,
# with LIMIT_S=330 TOTAL_S=430, left the resume check 18 s too few for its uninterrupted run).
# Results, the only files under OUT: env.txt, bench/{bench.json,bench.log,goals.txt,bench.png},
# loader-profile.txt (step 5; PROFILE_LOADER=0 leaves it out), resume.txt, profile.txt,
# profile-metrics.jsonl, trace.json.gz (step 7; PROFILE=0 leaves it out).
# Checkpoints and the generated JPEGs go under SCRATCH and FASTTRAIN_CACHE, outside OUT. No matplotlib
# there? Then render the PNG elsewhere: fasttrain bench --from-json DIR/bench.json --out DIR.
# Knobs (environment): OUT (default runs/gpu), SCRATCH (/tmp/fasttrain-gpu-run), WORKERS (16), BATCH (256),
# IMAGES (4096), ARCHS ("resnet50 resnet18"), LIMIT_S (350: the bench is stopped after this long), TOTAL_S
# (470: the resume check gets what is left of it), PYTHON (python3), COMPILE_MODE (torch.compile mode of
# the compiled entries: default, reduce-overhead = + CUDA graphs, max-autotune), SECTIONS (the bench's
# --sections), RESUME_CHECK (1; 0 leaves the resume check out), PROFILE_LOADER (1; 0 leaves the DALI loader
# profile out), PROFILE (1; 0 leaves the ResNet-50 training profile out), LIKE (default; imagenet: the
# bench's JPEGs sized like ImageNet's, `fasttrain bench --like imagenet`, for the whole script; drawing 4,096
# of them took 511 s on one core of the 2-core dev machine, so expect about a minute here), MAX_SIDE
# (unset; N: each fasttrain loader also reads the same images as tar shards pre-resized to N px,
# `fasttrain bench --shards --max-side N`, loader only).
# Decoding full-size against pre-resized ImageNet-sized JPEGs (issue 23), loader section only:
#   LIKE=imagenet MAX_SIDE=256 SECTIONS=loader RESUME_CHECK=0 PROFILE=0 PROFILE_LOADER=0 bash benchmarks/gpu_run.sh
# A session that raises the ceiling instead (issue 12: compile modes, fp16, batch 384/512, foreach SGD; each
# variant compiles anew, ~50 s each, max-autotune last; bench.json keeps each variant as it finishes):
#   SECTIONS=ceiling ARCHS=resnet50 RESUME_CHECK=0 PROFILE=0 LIMIT_S=540 bash benchmarks/gpu_run.sh
# The DALI settings too (--sections dali: hardware-decoder share 0/0.65/0.9/0.99 and prefetch 1-4 loader only
# over a 3x longer window, then 0.65/0.99 and prefetch 3/4 feeding each compiled model; estimated ~100 s on
# an H200, not yet run), the profile left out as it was measured at 7da15f4:
#   SECTIONS=loader,model,e2e,dali PROFILE=0 LIMIT_S=420 TOTAL_S=560 bash benchmarks/gpu_run.sh
set -euo pipefail

dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
OUT=${OUT:-runs/gpu}
SCRATCH=${SCRATCH:-/tmp/fasttrain-gpu-run}
PY=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-350}
TOTAL_S=${TOTAL_S:-470}
WORKERS=${WORKERS:-16}
IMAGES=${IMAGES:-4096}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1
export FASTTRAIN_CACHE=${FASTTRAIN_CACHE:-/tmp/fasttrain-cache}

args=(bench --out "$OUT/bench" -j "$WORKERS" -b "${BATCH:-256}" --images "$IMAGES")
for a in ${ARCHS:-resnet50 resnet18}; do args+=(-a "$a"); done
[[ -n "${COMPILE_MODE:-}" ]] && args+=(--compile-mode "$COMPILE_MODE")
[[ -n "${SECTIONS:-}" ]] && args+=(--sections "$SECTIONS")
[[ -n "${LIKE:-}" ]] && args+=(--like "$LIKE")
[[ -n "${MAX_SIDE:-}" ]] && args+=(--shards --max-side "$MAX_SIDE")
# ResNet-18 at 64 px for 16 steps of 256: the check is about positions, not speed.
resume=(--out "$SCRATCH/resume" --stop-at 6)
train=(--loader dali -j "$WORKERS" -b 256 --image-size 64 --epochs 1 -p 2 --seed 0 --no-compile)

if (( dry )); then
  # Everything but the measuring: the arguments must parse, the scripts compile, and OUT must take files.
  "$PY" -c 'import sys; from fasttrain.cli import build_parser; build_parser().parse_args(sys.argv[1:])' "${args[@]}"
  "$PY" -c 'import sys; from fasttrain.cli import build_parser; build_parser().parse_args(sys.argv[1:])' \
    train DATA "${train[@]}" --output-dir "$SCRATCH/resume/stopped"
  "$PY" -m py_compile benchmarks/check_goals.py benchmarks/resume_check.py benchmarks/profile_loader.py \
    tests/fault_worker.py
  "$PY" benchmarks/profile_loader.py --help > /dev/null
  {
    printf '%q ' "$PY" -m fasttrain "${args[@]}"; echo
    printf '%q ' "$PY" benchmarks/check_goals.py "$OUT/bench/bench.json"; echo
    printf '%q ' "$PY" benchmarks/profile_loader.py DATA -j "$WORKERS" -b "${BATCH:-256}" --batches 80; echo
    printf '%q ' "$PY" benchmarks/resume_check.py --time-limit LEFT "${resume[@]}" -- train DATA "${train[@]}"; echo
  } > "$OUT/gpu_run_plan.txt"
  echo "gpu_run: dry run: would run (bench limited to ${LIMIT_S}s, all within ${TOTAL_S}s):"
  cat "$OUT/gpu_run_plan.txt"
  exit 0
fi

dali=1
if ! "$PY" -c 'import nvidia.dali' 2>/dev/null; then
  dali=0
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

status=0
timeout --signal=TERM --kill-after=20 "$LIMIT_S" "$PY" -m fasttrain "${args[@]}" 2>&1 | tee "$OUT/bench/bench.log" \
  || status=${PIPESTATUS[0]}
if (( status == 124 )); then
  echo "gpu_run: bench stopped after ${LIMIT_S}s; $OUT/bench/bench.json holds the parts that finished" >&2
fi
if [[ -f "$OUT/bench/bench.json" ]]; then
  "$PY" benchmarks/check_goals.py "$OUT/bench/bench.json" | tee "$OUT/bench/goals.txt" || true  # exit 1: a goal SHORT
fi

# The bench's generated JPEGs (drawn once into FASTTRAIN_CACHE; made here if the bench stopped before), for
# the loader profile, the resume check and the training profile.
if (( dali )); then
  data=$("$PY" -c "from fasttrain.bench.images import bench_dataset; print(bench_dataset($IMAGES, like='${LIKE:-default}'))")
fi

# Where the DALI GPU loader's time goes alone (issue 12: its 25,000 img/s goal): torch.profiler over 80
# batches at fasttrain's defaults; GPU busy share, kernels, main-thread wait, CPU per image (~20-30 s).
if (( dali )) && [[ "${PROFILE_LOADER:-1}" == 1 ]]; then
  timeout --signal=INT --kill-after=10 60 "$PY" benchmarks/profile_loader.py "$data" -j "$WORKERS" \
    -b "${BATCH:-256}" --batches 80 > "$OUT/loader-profile.txt" 2>&1 || true
  grep -E "^profile_loader|img/s|main thread|GPU:|CPU:" "$OUT/loader-profile.txt" | head -8 || true
fi

# Also after a bench cut short by LIMIT_S: the resume check gets what is left of TOTAL_S (at least 60 s).
if (( dali )) && [[ "${RESUME_CHECK:-1}" == 1 ]]; then
  left=$(( TOTAL_S - SECONDS - 5 ))
  (( left < 60 )) && left=60
  "$PY" benchmarks/resume_check.py --time-limit "$left" "${resume[@]}" -- train "$data" "${train[@]}" \
    > "$OUT/resume.txt" 2>&1 || true
  grep -E "^resume_check:|run exit:|resumed from|replaying|Error" "$OUT/resume.txt" | head -20 || true
fi
# Step 7, where the time goes (issue 12): a torch.profiler trace of 4 steps of the best ResNet-50 path (DALI GPU,
# bf16, channels_last, compiled), after the compile warm-up; GPU idle and data wait per epoch in
# metrics.jsonl. Results: profile.txt (the run's output, top-10 ops by device time), profile-metrics.jsonl,
# and the trace gzipped when under 16 MiB.
if (( dali )) && [[ "${PROFILE:-1}" == 1 ]]; then
  left=$(( TOTAL_S + 120 - SECONDS ))
  (( left < 60 )) && left=60
  rm -rf "$SCRATCH/profile"
  timeout --signal=INT --kill-after=20 "$left" "$PY" -m fasttrain train "$data" -a resnet50 --loader dali \
    -j "$WORKERS" -b "${BATCH:-256}" --epochs 2 -p 4 --seed 0 --amp bf16 --channels-last --compile \
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
