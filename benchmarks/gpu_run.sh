#!/usr/bin/env bash
# The whole GPU benchmark matrix in one command: about 5 minutes on one H100 with 16 CPU cores, then a
# one-minute DALI GPU stop/resume check.
#
#   FASTTRAIN_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_run.sh   # on the GPU machine
#   OUT=/tmp/g bash benchmarks/gpu_run.sh --dry-run      # anywhere: checks the plan, writes OUT, runs nothing
#
# On the GPU machine (torch 2.11, Python 3.12, no package index) send DALI first, as
# ../shared/gpu/README.md says: five commands that copy .dali-parts/K into /tmp/dl. This script unpacks
# them into /tmp/site when DALI does not import yet, sets PYTHONPATH=/tmp/site:$PWD (the tree is not
# pip-installed there), then runs `fasttrain bench` with:
#   - loader only: reference ImageFolder+PIL loader vs fasttrain torchvision, DALI CPU, DALI GPU (16 workers)
#   - model only, ResNet-50 and ResNet-18, batch 256: reference loop settings (fp32, NCHW, loss.item() per
#     step), fp32, channels_last, bf16, bf16+channels_last, bf16+channels_last+compile (cuDNN autotuning on)
#   - end to end: the reference loop vs each fasttrain loader with the fastest model-only toggles
# 4,096 generated JPEGs like ../shared/ANCHORS.md's (~460x375 px, ~70 KB), drawn in ~15 s on 16 cores.
# Writes $OUT/bench/{bench.json,bench.png,bench.log} and $OUT/env.txt; bench.json is rewritten after each
# part, so a run cut short by the time limit still leaves what it measured. No matplotlib there? Then
# render the PNG on the CPU machine: fasttrain bench --from-json DIR/bench.json --out DIR.
# Knobs (environment): OUT (default runs/gpu), WORKERS (16), BATCH (256), IMAGES (4096), ARCHS
# ("resnet50 resnet18"), LIMIT_S (400: the bench is stopped after this long), PYTHON (python3), COMPILE_MODE
# (torch.compile mode of the compiled entries: default, reduce-overhead = + CUDA graphs, max-autotune).
set -euo pipefail

dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-400}
mkdir -p "$OUT/bench"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASTTRAIN_CACHE=${FASTTRAIN_CACHE:-/tmp/fasttrain-cache}

args=(bench --out "$OUT/bench" -j "${WORKERS:-16}" -b "${BATCH:-256}" --images "${IMAGES:-4096}")
for a in ${ARCHS:-resnet50 resnet18}; do args+=(-a "$a"); done
[[ -n "${COMPILE_MODE:-}" ]] && args+=(--compile-mode "$COMPILE_MODE")

if (( dry )); then
  # Everything but the measuring: the arguments must parse, and OUT must take files.
  "$PY" -c 'import sys; from fasttrain.cli import build_parser; build_parser().parse_args(sys.argv[1:])' "${args[@]}"
  printf '%q ' "$PY" -m fasttrain "${args[@]}" > "$OUT/gpu_run_plan.txt"
  echo >> "$OUT/gpu_run_plan.txt"
  echo "gpu_run: dry run: would run: $(cat "$OUT/gpu_run_plan.txt")"
  exit 0
fi

if ! "$PY" -c 'import nvidia.dali' 2>/dev/null; then
  if compgen -G "/tmp/dl/part.*" > /dev/null; then
    t0=$SECONDS
    mkdir -p /tmp/site
    (cd /tmp/dl && cat part.* | LD_LIBRARY_PATH=/tmp/dl/bin ./bin/zstd -d --long=27 | tar -C /tmp/site -xf -)
    echo "gpu_run: DALI unpacked into /tmp/site in $((SECONDS - t0))s"
  else
    echo "gpu_run: DALI does not import and /tmp/dl holds no parts: the DALI entries are left out" >&2
  fi
fi

# The crop-box JPEG decoder of the torchvision loader is a C module that pip builds here; the tree is not
# pip-installed there, so build it directly where a compiler and libjpeg-turbo's headers exist.
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
import sys, torch, torchvision
try:
    import nvidia.dali as dali; dali_v = dali.__version__
except Exception as e:
    dali_v = f"not importable ({type(e).__name__})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, DALI {dali_v}")
PY
} | tee "$OUT/env.txt"

status=0
timeout --signal=TERM --kill-after=20 "$LIMIT_S" "$PY" -m fasttrain "${args[@]}" 2>&1 | tee "$OUT/bench/bench.log" \
  || status=${PIPESTATUS[0]}
if (( status == 124 )); then
  echo "gpu_run: stopped after ${LIMIT_S}s; $OUT/bench/bench.json holds the parts that finished" >&2
fi
if [[ -f "$OUT/bench/bench.json" ]]; then
  "$PY" benchmarks/check_goals.py "$OUT/bench/bench.json" | tee "$OUT/bench/goals.txt"
fi

# DALI "mixed" stop and resume (CPU CI runs it only in DALI's CPU mode): SIGTERM at step 6 of 16, then
# --resume auto from each rank's DALI checkpoint. Expect 143, then 0 with "resumed from" and no "replaying".
if "$PY" -c 'import nvidia.dali' 2>/dev/null; then  # also after a bench cut short by LIMIT_S
  data=$("$PY" -c "from fasttrain.bench.images import bench_dataset; print(bench_dataset(${IMAGES:-4096}))")
  train=(train "$data" --loader dali -j "${WORKERS:-16}" -b 256 --image-size 64 --epochs 1 -p 2 --seed 0
         --output-dir "$OUT/resume" --no-compile)
  {
    FT_TEST_SIGTERM=0:6 timeout 120 "$PY" tests/fault_worker.py "${train[@]}"; echo "first run exit: $?"
    timeout 120 "$PY" tests/fault_worker.py "${train[@]}" --resume auto; echo "resumed run exit: $?"
  } > "$OUT/resume.txt" 2>&1 || true
  grep -E "exit:|resumed from|replaying|Error|error" "$OUT/resume.txt" | head -20
fi
exit "$status"
