#!/usr/bin/env bash
# One command for a GPU slot, from the repository root on the GPU machine:
#
#   bash bench/gpu_run.sh [gpu_check.py options]
#
# 1. installs wheelhouse/requirements-$WHEELHOUSE_PROFILE.txt (default kit) from wheelhouse/ if the folder is
#    there (no registry needed; a failed install is reported and the kit runs without the extras);
# 2. makes the repository importable without installing it (`jrm_kernels` is a link to kernels/, as setup.py
#    maps it);
# 3. runs bench/gpu_check.py under `timeout` ($GPU_CHECK_TIMEOUT s, default 480; the kit itself stops starting
#    new work after --budget-s, default here 400), its output in gpu_check.log;
# 4. copies bench/REPORT_GPU.md and gpu_check.log to $OUT when set (the device tool's result folder).
# Exit status: the kit's (0 all checks passed, 1 a check failed or a section raised, 124 killed by timeout).
#
# The interpreter is $PYTHON (default: python3 on PATH). Where the machine's torch lives in a venv, pass it:
#   PYTHON=/path/to/venv/bin/python bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON="${PYTHON:-python3}"  # the interpreter with torch + triton; where it lives is the machine's business
echo "gpu_run: $(date -u +%FT%TZ) python $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

profile="${WHEELHOUSE_PROFILE:-kit}"
if [ -f "wheelhouse/requirements-$profile.txt" ]; then
  t0=$SECONDS
  if "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links wheelhouse \
       -r "wheelhouse/requirements-$profile.txt"; then
    echo "gpu_run: installed wheelhouse/requirements-$profile.txt in $((SECONDS - t0)) s"
  else
    echo "gpu_run: WARNING: installing from wheelhouse/ failed; the kit runs without those packages"
  fi
else
  echo "gpu_run: no wheelhouse/requirements-$profile.txt (make wheelhouse PY=3.12 beforehand and carry" \
       "wheelhouse/): the optional peers are skipped"
fi

shim="$(mktemp -d)"
ln -s "$PWD/kernels" "$shim/jrm_kernels"
export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

timeout -k 15 "${GPU_CHECK_TIMEOUT:-480}" "$PYTHON" bench/gpu_check.py --out bench/REPORT_GPU.md --budget-s 400 "$@" \
  2>&1 | tee gpu_check.log
rc=${PIPESTATUS[0]}
echo "gpu_run: gpu_check.py exit status $rc"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp -f bench/REPORT_GPU.md gpu_check.log "$OUT"/ 2>/dev/null
fi
rm -rf "$shim"
exit "$rc"
