#!/usr/bin/env bash
# The kit's GPU job in one command (issue 23), from a copy of the repo and the carried wheelhouse/ (make wheelhouse),
# with no network, on one NVIDIA GPU. Phases, each stopped by `timeout` so that the whole script ends within
# GPU_BUDGET_S (default 580 s; the device allows 600 s per command):
#   setup   install wheelhouse/*.whl offline into .gpu_site (PYTHONPATH: the repo, then .gpu_site) and register the
#           Jupyter kernel "python3" that papermill starts, on that interpreter and path
#   gpu     the GPU (nvidia-smi, torch.cuda.get_device_name); env.txt: pip list, paths
#   smoke   the five notebooks on tiny parameters with device cuda into results/gpu_smoke (about 30-60 s)
#   full    the main job: run-notebooks -p backbone synthetic_macro -p device cuda (precision auto, the full model,
#           5 seeds) into results/gpu, for what is left but CHECKS_S: by default the variants AMAN, no magnification
#           and the best single factor of the committed CPU run (results/metrics.json), with the oracle;
#           GPU_VARIANTS=all trains every variant
#   checks  bench/gpu_checks.py: CUDA against CPU in fp32, bf16 against fp32, images/s and share of the bf16 peak
#           (CHECKS_S, default 90 s, kept for it)
# After each phase results/gpu_smoke and results/gpu are packed into $OUT/gpu_results.tar.gz (tar -xzf it in the
# repo's root). $OUT gets 5 files: log.txt, phases.tsv, env.txt, gpu_checks.json, gpu_results.tar.gz.
#
#   bash bench/gpu.sh             # on the device: the run tool's command, with carry ["wheelhouse"]
#   bash bench/gpu.sh --dry-run   # on a CPU (tests/test_gpu_command.py): the repo's ${PYTHON:-python3}, nothing
#                                 # installed, device cpu, tiny parameters in every phase, results under GPU_ROOT
# Environment: OUT (default: a new temporary folder), GPU_BUDGET_S (580; dry run 900), CHECKS_S (90), GPU_VARIANTS
# (all: every variant), GPU_FULL_ARGS (more run-notebooks arguments for the full run, shell-quoted, e.g.
# "-p seeds '[0]'"), GPU_PYTHON (device: python3), PYTHON
# (dry run: python3), GPU_ROOT (dry run: where results/ and data/ go; default a temporary folder, removed at the end),
# AMANLIB_MAGNET_CHECKPOINT (default wheelhouse/magnet/learning_based_mag.pth.tar; absent: Eulerian magnifier).
set -uo pipefail  # no -e: a failed phase is recorded and the next one still runs
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
MODE=device
for arg in "$@"; do
  case $arg in
    --dry-run) MODE=dry ;;
    -h | --help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done
[[ ${GPU_DRY_RUN:-0} == 1 ]] && MODE=dry

T0=$SECONDS
if [[ $MODE == dry ]]; then
  BUDGET=${GPU_BUDGET_S:-900} SCALE=3  # a shared CPU runs the tiny phases slower than the device runs its own
else
  BUDGET=${GPU_BUDGET_S:-580} SCALE=1
fi
RESERVE=40  # seconds kept after the last phase: a phase's kill grace (20 s) and the last pack
TMP=${TMPDIR:-/tmp}
OUT=${OUT:-$(mktemp -d "$TMP/amanlib-gpu-out.XXXXXX")}
mkdir -p "$OUT" && export OUT
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 AMANLIB_PROGRESS=text JUPYTER_PLATFORM_DIRS=1
KERNEL_HOME=$(mktemp -d "$TMP/amanlib-gpu-kernel.XXXXXX")
export JUPYTER_RUNTIME_DIR=$KERNEL_HOME/runtime JUPYTER_PATH=$KERNEL_HOME/share/jupyter
export JUPYTER_CONFIG_DIR=$KERNEL_HOME/config IPYTHONDIR=$KERNEL_HOME/ipython
if [[ $MODE == dry ]]; then
  PY=${PYTHON:-python3}
  ROOT=${GPU_ROOT:-}
  [[ -z $ROOT ]] && ROOT=$(mktemp -d "$TMP/amanlib-gpu-root.XXXXXX") && OWN_ROOT=1  # removed at the end
  DEVICE=cpu
  SITE=
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  PY=${GPU_PYTHON:-python3}
  ROOT=$REPO
  DEVICE=cuda
  SITE=$REPO/.gpu_site
  export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$ROOT/results" "$ROOT/data"
echo "bench/gpu.sh: mode $MODE, python $PY, device $DEVICE, results under $ROOT/results, OUT $OUT," \
  "budget ${BUDGET}s, $(date -u +%FT%TZ)"

# ------------------------------------------------------------------------------------------------------ helpers
printf 'phase\tstatus\tseconds\tlimit_s\n' >"$OUT/phases.tsv"
FAILED=0

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

record() { # NAME STATUS START LIMIT
  local secs
  secs=$(since "$3")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$secs" "$4" >>"$OUT/phases.tsv"
  echo "=== $1: $2 in ${secs}s ($((SECONDS - T0))s of ${BUDGET}s elapsed)"
  [[ $2 == ok ]] || FAILED=$((FAILED + 1))
}

kernel_pids() { # kernels started on our private runtime folder (papermill starts them in sessions of their own)
  local f pid
  for f in $(grep -lsaF -- "$JUPYTER_RUNTIME_DIR/kernel-" /proc/[0-9]*/cmdline 2>/dev/null); do
    pid=${f#/proc/}
    pid=${pid%/cmdline}
    [[ $pid != "$$" && $pid != "$BASHPID" && -e /proc/$pid ]] && echo "$pid"
  done
}

stop_kernels() { # a phase stopped by its limit may leave its kernel running (on the GPU): TERM, then KILL
  local pids
  pids=$(kernel_pids)
  [[ -z $pids ]] && return
  echo "stopping kernels left running: $(echo $pids)"
  kill $pids 2>/dev/null
  sleep 3
  pids=$(kernel_pids)
  [[ -n $pids ]] && kill -9 $pids 2>/dev/null
}

pack() {
  "$PY" "$REPO/bench/gpu_pack.py" --root "$ROOT" --out "$OUT/gpu_results.tar.gz" results/gpu_smoke results/gpu ||
    echo "bench/gpu.sh: packing the results failed"
}

run_phase() { # NAME LIMIT_S COMMAND...: run it under `timeout` (TERM, then KILL 20 s later), record, pack
  local name=$1 limit=$(($2 * SCALE)) start rc status
  shift 2
  local room=$((BUDGET - (SECONDS - T0) - RESERVE))
  ((limit > room)) && limit=$room
  if ((limit < 15)); then
    echo "=== $name: skipped, the budget of ${BUDGET}s is spent"
    printf '%s\tskipped\t0\t0\n' "$name" >>"$OUT/phases.tsv"
    FAILED=$((FAILED + 1))
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  start=$(now)
  timeout -k 20 "$limit" "$@"
  rc=$?
  status=ok
  ((rc == 124)) && status=timeout
  ((rc != 0 && rc != 124)) && status="failed($rc)"
  stop_kernels
  record "$name" "$status" "$start" "$limit"
  pack
}

# ------------------------------------------------------------------------------------------------------ setup
install_wheels() {
  if [[ $MODE == dry ]]; then
    echo "dry run: nothing installed; $PY as it is"
    return 0
  fi
  local wheels=("$REPO"/wheelhouse/*.whl)
  if [[ ! -e ${wheels[0]} ]]; then
    echo "no wheelhouse/*.whl: run 'make wheelhouse' on the development machine and carry wheelhouse"
    return 1
  fi
  rm -rf "$SITE"
  timeout 240 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$SITE" "${wheels[@]}" || return 1
  echo "installed ${#wheels[@]} wheels into $SITE"
}

register_kernel() { # papermill starts the kernel named python3: this interpreter, this PYTHONPATH
  timeout 60 "$PY" -m ipykernel install --prefix "$KERNEL_HOME" --name python3 \
    --display-name "Python 3 (amanlib GPU run)" --env PYTHONPATH "$PYTHONPATH" >/dev/null || return 1
  timeout 60 "$PY" -c "from jupyter_client.kernelspec import KernelSpecManager as M
s = M().get_kernel_spec('python3'); print('kernel python3:', ' '.join(s.argv[:3]), 'from', s.resource_dir)"
}

check_imports() {
  timeout 120 "$PY" - <<'EOF'
import importlib, sys
bad = []
for name in ("torch", "torchvision", "amanlib.notebooks", "amanlib.train", "amanlib.data.synthetic",
             "amanlib.magnify.phase", "amanlib.magnify.lagrangian", "papermill", "ipykernel.kernelapp", "plenoptic",
             "openpyxl", "cv2", "seaborn", "sklearn", "scipy", "yaml", "filelock"):
    try:
        module = importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
        continue
    print(f"  {name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
if bad:
    sys.exit("imports that fail:\n  " + "\n  ".join(bad))
EOF
}

start=$(now)
echo "=== setup"
if install_wheels && register_kernel && check_imports; then status=ok; else status=failed; fi
[[ $MODE == device ]] && { timeout 60 "$PY" -m pip check || true; }
record setup "$status" "$start" 0

# ------------------------------------------------------------------------------------------------------ gpu
start=$(now)
echo "=== gpu"
{
  echo "# $(date -u +%FT%TZ) mode $MODE, python $PY ($(command -v "$PY")), PYTHONPATH=$PYTHONPATH"
  command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi
  timeout 60 "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'GPU:',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'CPU threads', torch.get_num_threads())"
  [[ $MODE == device ]] && timeout 60 "$PY" -m pip list --format=freeze 2>/dev/null
} >"$OUT/env.txt" 2>&1
grep -E "NVIDIA|GPU:|Driver" "$OUT/env.txt" | head -5
if [[ $MODE == device ]] && ! timeout 60 "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device visible to torch"
  record gpu failed "$start" 0
else
  record gpu ok "$start" 0
fi

# ------------------------------------------------------------------------------------------------------ parameters
MAGNET=${AMANLIB_MAGNET_CHECKPOINT:-}
if [[ -z $MAGNET ]]; then
  for candidate in "$REPO/wheelhouse/magnet/learning_based_mag.pth.tar" \
    "${AMANLIB_REFERENCE:-$REPO/../shared/reference}/magnet/learning_based_mag.pth.tar"; do
    [[ -f $candidate ]] && { MAGNET=$candidate; break; }
  done
fi
if [[ -n $MAGNET && -f $MAGNET ]]; then
  export AMANLIB_MAGNET_CHECKPOINT=$MAGNET
  MAGS=(-p download_magnet false)
  SMOKE_MAGS=(-p magnifier learning -p methods '[learning, eulerian, phase]')
  echo "magnifier: learning, checkpoint $MAGNET"
else
  echo "WARNING: no learning-magnifier checkpoint (wheelhouse/magnet/ is made by 'make wheelhouse'):" \
    "every run uses the Eulerian magnifier instead"
  MAGS=(-p download_magnet false -p magnifier eulerian -p methods '[eulerian, phase]')
  SMOKE_MAGS=()
fi
TINY=(-p synthetic_subjects 3 -p synthetic_clips_per_subject 3 -p factors '[2, 4]' -p sweep_factors '[1, 4]'
  -p n_frames 2 -p backbone random -p fidelity authors -p epochs 2 -p download_fer false)
EXTRA=()
[[ -n ${GPU_FULL_ARGS:-} ]] && eval "EXTRA=($GPU_FULL_ARGS)"
if [[ $MODE == dry ]]; then
  # the full model's path through notebook 04 (CPU otherwise takes the frozen-layer4 one), on the smoke's clip
  # table and features (copied below): a CPU dry run stays within about 2 minutes
  FULL=(--only 04 -p fidelity authors -p epochs 1 -p frozen_layer4 false -p seeds '[0]')
  BEST="single factor 4"  # the smoke's factors are 2 and 4
  CHECKS=(--tiny)
else
  FULL=(-p backbone synthetic_macro)  # as `make reproduce` pins it; precision auto, frozen_layer4 auto: full model
  BEST=$(timeout 60 "$PY" -c "import json; print(json.load(open('$REPO/results/metrics.json'))['oracle']
['best_single_factor'])") || BEST=
  CHECKS=()
fi
if [[ ${GPU_VARIANTS:-} == all ]]; then
  echo "full run: every variant"
elif [[ -n $BEST ]]; then
  FULL+=(-p variants "[AMAN, no magnification, $BEST]")
  echo "full run: variants AMAN, no magnification and $BEST (the committed run's best single factor), the oracle"
else
  echo "full run: every variant (results/metrics.json names no best single factor)"
fi
RUN=("$PY" "$REPO/bench/gpu_run.py" run-notebooks)

# ------------------------------------------------------------------------------------------------------ phases
run_phase smoke 150 "${RUN[@]}" "${TINY[@]}" "${MAGS[@]}" "${SMOKE_MAGS[@]}" -p device "$DEVICE" \
  -p data_dir "$ROOT/data/gpu_smoke" --results "$ROOT/results/gpu_smoke"
if [[ $MODE == dry && -d $ROOT/results/gpu_smoke/work/features ]]; then
  mkdir -p "$ROOT/results/gpu/work"
  cp -a "$ROOT"/results/gpu_smoke/work/{index.csv,index.json,features} "$ROOT/results/gpu/work/"
fi
KEPT=$((${CHECKS_S:-90} * SCALE))  # the checks' time, kept from the full run's
RESERVE=$((RESERVE + KEPT))
run_phase full 600 "${RUN[@]}" "${FULL[@]}" "${MAGS[@]}" -p device "$DEVICE" -p data_dir "$ROOT/data" \
  "${EXTRA[@]}" --results "$ROOT/results/gpu"
RESERVE=$((RESERVE - KEPT))
run_phase checks $((KEPT / SCALE)) "$PY" "$REPO/bench/gpu_checks.py" --device "$DEVICE" --out "$OUT/gpu_checks.json" \
  "${CHECKS[@]}"

# ------------------------------------------------------------------------------------------------------ end
rm -rf "$KERNEL_HOME"
[[ -n ${OWN_ROOT:-} ]] && rm -rf "$ROOT"  # the dry run's data and caches; its results are in $OUT
echo "=== phases (seconds):"
column -t -s $'\t' "$OUT/phases.tsv" 2>/dev/null || cat "$OUT/phases.tsv"
echo "bench/gpu.sh: $((SECONDS - T0))s in all; $FAILED phase(s) not ok; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
((FAILED == 0))
