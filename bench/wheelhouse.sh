#!/usr/bin/env bash
# Fill wheelhouse/ (git-ignored) with the wheels a bare CUDA image lacks, for one Python version, so a GPU machine
# without registry access installs them from the folder:
#
#   bash bench/wheelhouse.sh [PY] [PROFILE]          # = make wheelhouse PY=3.12 [PROFILE=kit]
#   pip install --no-index --find-links wheelhouse -r wheelhouse/requirements-PROFILE.txt   # on the GPU machine
#
# The bare image has torch, triton, transformers, peft, accelerate, pytest, numpy, pillow, pyarrow, safetensors
# (and their own dependencies: sympy/mpmath, tqdm, pyyaml, psutil, packaging, typing-extensions ...).
# Profiles (each includes the one before):
#   kit    what bench/gpu_check.py can use beyond the image: liger-kernel (the fused-CE peer), mpmath (imported
#          by the kernel test modules whose grids the kit runs). ~2 MB. The kit itself needs none of the others.
#   suite  + deepspeed (its pure-Python wheel built here from the sdist) and its dependencies, webdataset,
#          bitsandbytes, pytest-timeout: the training stack and the test suite except MLflow and the server.
#          ~49 MB, 43 of them bitsandbytes: within the 64 MiB the device tool carries, with little to spare.
#   full   + mlflow, fastapi, uvicorn, httpx with every dependency pip resolves (pandas, scipy, ...): the whole
#          test suite; hundreds of MB.
# Torch-dependent wheels are fetched with --no-deps so pip never pulls a multi-GB CUDA torch; the versions are
# the ones the project's tests pass with.
set -euo pipefail

PY="${1:-${PY:-3.12}}"
PROFILE="${2:-${PROFILE:-kit}}"
OUT="${WHEELHOUSE:-wheelhouse}"
PIP="${PIP:-python -m pip}"
case "$PROFILE" in
  kit|suite|full) ;;
  *) echo "wheelhouse.sh: PROFILE=$PROFILE: expected kit, suite or full" >&2; exit 2;;
esac
if ! [[ "$PY" =~ ^3\.[0-9]+$ ]]; then echo "wheelhouse.sh: PY=$PY: expected e.g. 3.12" >&2; exit 2; fi

KIT=(liger-kernel==0.8.5 mpmath==1.3.0)
SUITE=(hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 einops==0.8.2 pydantic==2.14.4
       pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7
       bitsandbytes==0.50.2 pytest-timeout==2.4.0)
DEEPSPEED=deepspeed==0.19.8
FULL=(mlflow==3.17.2 fastapi uvicorn httpx)

mkdir -p "$OUT"
# binary wheels for the target interpreter and a glibc >= 2.28 x86-64 machine; pip does not widen an explicit
# --platform to the older manylinux tags that machine also runs, so they are listed
plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 \
         manylinux_2_5 manylinux1; do plat+=(--platform "${p}_x86_64"); done
target=(--only-binary=:all: --python-version "$PY" --implementation cp "${plat[@]}" -d "$OUT")

want=("${KIT[@]}")
$PIP download -q --no-deps "${target[@]}" "${KIT[@]}"
if [ "$PROFILE" != kit ]; then
  $PIP download -q --no-deps "${target[@]}" "${SUITE[@]}"
  if ! ls "$OUT"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    # an sdist: build its wheel here, without CUDA ops (DeepSpeed JIT-builds them where used); the build
    # imports torch, so use this environment's rather than an isolated one that would download torch
    $PIP wheel -q --no-deps --no-build-isolation -w "$OUT" "$DEEPSPEED"
  fi
  want+=("${SUITE[@]}" "$DEEPSPEED")
fi
if [ "$PROFILE" = full ]; then
  $PIP download -q "${target[@]}" "${FULL[@]}"
  want+=("${FULL[@]}")
fi

printf '%s\n' "${want[@]}" > "$OUT/requirements-$PROFILE.txt"
# every wheel's dependencies (markers evaluated for Python $PY on Linux) must be in the folder or on the image
python - "$OUT" "$PY" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

IMAGE = """torch triton transformers peft accelerate pytest numpy pillow pyarrow safetensors sympy mpmath networkx
jinja2 markupsafe fsspec filelock typing-extensions setuptools huggingface-hub hf-xet tokenizers regex requests
certifi charset-normalizer idna urllib3 pyyaml packaging tqdm psutil iniconfig pluggy pygments""".split()
out, py = Path(sys.argv[1]), sys.argv[2]
env = {"python_version": py, "python_full_version": py + ".0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix", "extra": ""}
have = {canon(w.name.split("-")[0]) for w in out.glob("*.whl")} | {canon(n) for n in IMAGE}
missing = {}
for whl in sorted(out.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            if canon(req.name) not in have:
                missing.setdefault(canon(req.name), []).append(whl.name.split("-")[0])
if missing:
    sys.exit("wheelhouse.sh: dependencies neither in the folder nor on the image: "
             + "; ".join(f"{k} (for {', '.join(v)})" for k, v in sorted(missing.items())))
print(f"wheelhouse.sh: every dependency of the {len(list(out.glob('*.whl')))} wheels is in the folder or on the image")
PYEOF
n_whl=$(find "$OUT" -maxdepth 1 -name "*.whl" | wc -l)
echo "wheelhouse.sh: $n_whl wheels, $(du -sh "$OUT" | cut -f1) in $OUT for Python $PY ($PROFILE)"
echo "install on the GPU machine: pip install --no-index --find-links $OUT -r $OUT/requirements-$PROFILE.txt"
