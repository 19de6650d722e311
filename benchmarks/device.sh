#!/usr/bin/env bash
# The GPU checks in one call of a lent device machine (docs/benchmarks.md, "GPU"): the CUDA tests
# (tests/test_gpu.py), GD and whole stacks on CUDA beside the CPU (benchmarks/gpu.py), and the
# transformer's ensemble, single-model and roof figures on CUDA (benchmarks/transformer.py).
#
# The device's python3 has torch but not pydantic: carry its wheels in .whl (ignored by git; the
# download command is in docs/benchmarks.md). From the repository root, with the device tool:
#
#     run(command="bash benchmarks/device.sh", carry=[".whl"], timeout_s=540)
#
# About 7 minutes: the tests and the transformer first (a minute or two), then benchmarks/gpu.py,
# cut at GPU_BENCH_S (300) seconds.
#
# Each step's log and JSON go to $OUT (./device-out where OUT is unset: a dry run on a CPU machine,
# PYTHON=.venv/bin/python bash benchmarks/device.sh, skips the CUDA-only step and the tests skip).
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import pydantic" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$py" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$out/device.txt"
status=0
"$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" || status=1
if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    "$py" benchmarks/transformer.py --device cuda --out "$out/transformer_cuda.json" 2>&1 | tee "$out/transformer.log" || status=1
fi
# last, and bounded: its CPU column alone takes about 4 minutes on one thread (each case's row is
# printed as it finishes, so a cut run still reports the cases it reached)
timeout "${GPU_BENCH_S:-300}" "$py" benchmarks/gpu.py --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
rc=$?
[ $rc -eq 124 ] && echo "benchmarks/gpu.py cut at ${GPU_BENCH_S:-300} s" | tee -a "$out/gpu.log"
[ $rc -ne 0 ] && [ $rc -ne 124 ] && status=1
exit $status
