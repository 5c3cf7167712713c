#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (run from the repository root). One call,
# each step under its own time limit, within a total of BUDGET seconds (default 570):
#   0. Python packages the GPU image lacks (mrcfile, starfile, gemmi) from .whl/ if present
#      (`pip download ... -d .whl`, see /work/.library/device/README.md), and the machine;
#   1. tests/integration/test_device.py and the precision tests on cuda (kernels against the
#      float64 CPU reference, the encoder in the GPU's precision, reconstruct + resume + report,
#      --symmetry, --halves), while the 64 px data set is simulated on the CPU (6VYB, 20,000
#      particles, SNR 0.1: the benchmark's);
#   2. the 64 px benchmark (benchmarks/bench_reconstruct.py, preset default) on cuda;
#   3. issue 14's method comparison on the same data, one run at a time: search only
#      (`--switch-epoch 0`) and the hybrid (`--preset paper-synthetic`: 10,000 encoder steps and
#      the switch's hypotheses, then HYBRID_SEARCH search epochs and local epochs), then
#      benchmarks/bench_curves.py (median error and FSC against wall time, all three runs);
#   4. images/s of each stage against the batch size (benchmarks/bench_batch.py) on a 5,000-
#      particle set of the same kind.
# STEPS picks the steps (default "tests bench methods batch"), e.g. STEPS=batch.
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (default: $OUT, else gpu_check_out)
# The package is used from src/ (PYTHONPATH), not installed: a GPU machine's torch is its own
# CUDA build, not the CPU wheel pinned in pyproject.toml. Sizes for a dry run on a CPU:
# DEVICE=cpu N_PARTICLES=2000 BOX=32 PIXEL=6.8 SWITCH_STEPS=100 (the hybrid's stage 1).
set -u
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
start=$SECONDS
budget=${BUDGET:-570}
# seconds left for a step: its cap, or what the budget leaves after `reserve` seconds
left() { local cap=$1 reserve=${2:-0} rest; rest=$((budget - (SECONDS - start) - reserve))
         [ "$rest" -lt "$cap" ] && cap=$rest; [ "$cap" -lt 1 ] && cap=1; echo "$cap"; }
stamp() { echo "[$((SECONDS - start)) s] $*"; }
steps=" ${STEPS:-tests bench methods batch} "
has() { [[ $steps == *" $1 "* ]]; }
simulate() {  # FOLDER N: the benchmark's data set (6VYB, SNR 0.1) with N particles
  [ -f "$1/particles.star" ] && return 0
  timeout "$(left 200)" "$py" -m cryospin.cli.main simulate bundled:6vyb -o "$1" \
    --n-particles "$2" --box "${BOX:-64}" --pixel-size "${PIXEL:-3.4}" --snr 0.1 --seed 0 \
    --no-progress > "$out/simulate_$(basename "$1").log" 2>&1
  stamp "simulate $2: exit $?"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
torch.cuda.is_available() and torch.cuda.get_device_name(0))'
  lscpu | grep -E "Model name|^CPU\(s\)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

work=${BENCH_WORKDIR:-/tmp/cryospin_bench64}
data=$work/data
mkdir -p "$work"
if has tests; then
  CRYOSPIN_TEST_DEVICE=$device timeout "$(left "${TEST_TIMEOUT:-150}")" "$py" -m pytest -q \
    -p no:cacheprovider tests/integration/test_device.py \
    ${EXTRA_TESTS:-tests/unit/test_precision.py} > "$out/tests_cuda.log" 2>&1 &
  tests=$!
fi
{ has bench || has methods; } && simulate "$data" "${N_PARTICLES:-20000}"
if has tests; then
  wait "$tests"
  stamp "device tests: exit $?"; tail -n 15 "$out/tests_cuda.log"
fi

runs=()
if has bench; then
  timeout "$(left "${BENCH_TIMEOUT:-150}" 200)" "$py" benchmarks/bench_reconstruct.py \
    --workdir "$work" --data "$data" --n-particles "${N_PARTICLES:-20000}" --box "${BOX:-64}" \
    --pixel-size "${PIXEL:-3.4}" -- --device "$device" > "$out/bench64.md" 2> "$out/bench64.err"
  stamp "64 px benchmark: exit $?"; cat "$out/bench64.md"; tail -n 5 "$out/bench64.err"
  runs+=("default=$work/run")
fi

reconstruct() {  # NAME CAP RESERVE FLAGS...: one reconstruction on the benchmark's data
  local name=$1 cap=$2 reserve=$3; shift 3
  rm -rf "${work:?}/$name"
  timeout "$(left "$cap" "$reserve")" "$py" -m cryospin.cli.main reconstruct \
    "$data/particles.star" -o "$work/$name" --seed 0 --no-progress --device "$device" "$@" \
    > "$out/$name.log" 2>&1
  stamp "$name: exit $?"; tail -n 3 "$out/$name.log"
  runs+=("$name=$work/$name")
}
if has methods; then
  reconstruct search "${SEARCH_TIMEOUT:-120}" 150 --switch-epoch 0
  reconstruct hybrid "${HYBRID_TIMEOUT:-400}" 40 --preset paper-synthetic \
    --search-epochs "${HYBRID_SEARCH:-2}" --epochs 12 ${SWITCH_STEPS:+--switch-steps $SWITCH_STEPS}
  timeout "$(left 60)" "$py" benchmarks/bench_curves.py --data "$data" --fsc-epochs 3 \
    --plot "$out/curves.png" "${runs[@]}" > "$out/curves.md" 2> "$out/curves.err"
  stamp "curves: exit $?"; cat "$out/curves.md"; tail -n 5 "$out/curves.err"
fi

if has batch; then
  small=${BATCH_DATA:-/tmp/cryospin_batch_data}
  simulate "$small" "${BATCH_PARTICLES:-5000}"
  timeout "$(left "${BATCH_TIMEOUT:-300}")" "$py" benchmarks/bench_batch.py --data "$small" \
    --workdir "$work/batch" --batches ${BATCHES:-default=64,256,1024 paper-synthetic=32,128,512} \
    -- --device "$device" > "$out/batch.md" 2> "$out/batch.err"
  stamp "batch sizes: exit $?"; cat "$out/batch.md"; tail -n 8 "$out/batch.err"
fi
# the runs' small files (per-epoch metrics, tracked poses, logs, configs) for the notes
(cd "$work" && tar czf "$out/runs.tgz" --ignore-failed-read \
  */metrics.jsonl */pose_track.npz */run.log */config.yaml bench.log batch/*/metrics.jsonl \
  2> /dev/null)
exit 0
