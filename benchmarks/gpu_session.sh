#!/usr/bin/env bash
# Everything a GPU session checks, in one command (device time is scarce; a fresh machine keeps nothing):
#   build with the CUDA kernels, the GPU tests, the kernel and SVD benchmarks, whole merges against the CPU.
# Run from the repository root on a CUDA machine:  bash benchmarks/gpu_session.sh [stage ...]
# Stages: build tests merges kernels svd profile merges1b, tests-py (the Python-side GPU tests only); default:
# the first five. Each runs under a timeout.
# Logs go to $OUT (or ./gpu-out); the last lines printed are a summary. Python packages the machine lacks
# (pydantic on the lent H100s of 2026-11) travel as wheels in .whl/, installed first when present.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests merges kernels svd)
summary=()

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/versions.txt"

stage() {  # stage NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  summary+=("$name rc=$rc $((SECONDS - t0))s")
}

for s in "${stages[@]}"; do
  case $s in
    build) stage build 240 python3 -m pip install --no-build-isolation --no-deps -v -e . ;;
    tests) stage tests 180 python3 -m pytest -q -rfE -m gpu -p no:cacheprovider --timeout 60 \
      tests/native tests/gpu tests/triton_kernels ;;
    tests-py) stage tests-py 150 python3 -m pytest -q -rfE -m gpu -p no:cacheprovider --timeout 60 \
      tests/gpu tests/triton_kernels ;;
    kernels) stage kernels 120 python3 benchmarks/gpu_bench.py ;;
    svd) stage svd 120 python3 -m benchmarks.svd_bench --device cuda ;;
    merges) stage merges 150 python3 -m benchmarks.gpu_merge_check --preset demo --work /tmp/gpucheck-demo ;;
    profile) stage profile 90 python3 -m benchmarks.gpu_merge_check --preset demo --methods ties --sets cuda \
      --repeat 1 --work /tmp/gpucheck-demo --profile "$OUT/profile.pstats" ;;
    merges1b) stage merges1b 240 python3 -m benchmarks.gpu_merge_check --preset 1b --methods ties,dare_ties \
      --sets cuda --repeat 1 --work /tmp/gpucheck-1b ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
