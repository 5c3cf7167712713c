#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (run from the repository root):
#   1. tests/integration/test_device.py on cuda (kernels against the float64 CPU reference, the
#      encoder in the GPU's precision, reconstruct + resume + report, --symmetry, --halves) and
#      the precision tests;
#   2. the 64 px benchmark (benchmarks/bench_reconstruct.py: 6VYB, 20,000 particles, SNR 0.1,
#      preset default) with `reconstruct --device cuda`.
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (default: $OUT, else gpu_check_out)
# The package is used from src/ (PYTHONPATH), not installed: a GPU machine's torch is its own
# CUDA build, not the CPU wheel pinned in pyproject.toml. Time limits (seconds): TEST_TIMEOUT
# (default 200) and BENCH_TIMEOUT (default 330); logs and the benchmark's table go to OUTDIR.
set -u
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())'
  lscpu | grep -E "Model name|^CPU\(s\)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

CRYOSPIN_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-200}" "$py" -m pytest -q -p no:cacheprovider \
  tests/integration/test_device.py ${EXTRA_TESTS:-tests/unit/test_precision.py} > "$out/tests_cuda.log" 2>&1
echo "device tests: exit $?"; tail -n 15 "$out/tests_cuda.log"

work=${BENCH_WORKDIR:-/tmp/cryospin_bench64}
timeout "${BENCH_TIMEOUT:-330}" "$py" benchmarks/bench_reconstruct.py --workdir "$work" \
  -- --device cuda > "$out/bench64.md" 2> "$out/bench64.err"
echo "64 px benchmark: exit $?"; cat "$out/bench64.md"; tail -n 5 "$out/bench64.err"
for f in bench.log run/run.log run/metrics.jsonl; do
  [ -f "$work/$f" ] && cp "$work/$f" "$out/bench64_$(basename "$f")"
done
exit 0
