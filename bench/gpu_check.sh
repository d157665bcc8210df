#!/usr/bin/env bash
# The GPU checks of issue 6, as one run on a lent NVIDIA machine (device tool; carry .whl from
# bench/gpu_wheels.sh):  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   1. install the carried wheels and build pycuda from its sdist against the machine's CUDA;
#   2. the GPU tests: torch-cuda with CUDA graphs vs the CPU reference, pycuda's buffers and
#      gather kernel vs torch, and every simulator test of the TensorRT backend;
#   3. bench/cascade_overhead.py --backend torch-cuda (batch 1 and 32, graphs and eager, and the
#      trained example at its thresholds: the staged loop, the decisions on the device
#      (edgeexit.runtime.device_cascade) and the monolithic graph), rows into $OUT/cascade_overhead.json.
# Logs go to $OUT; the table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
export PATH=/usr/local/cuda/bin:$PATH
( python3 -m pip wheel -q --no-build-isolation --no-deps -w /tmp/pycuda-wheel .whl/pycuda-*.tar.gz \
  && python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/pycuda-wheel/pycuda-*.whl ) \
  > "$OUT/pycuda_build.log" 2>&1 && echo "pycuda: built" || { echo "pycuda: build failed (see pycuda_build.log)"; tail -20 "$OUT/pycuda_build.log"; }
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, numpy, onnxruntime
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
try:
    import pycuda.driver as cuda; cuda.init(); d = cuda.Device(0); print("pycuda ok:", d.name(), d.compute_capability())
except Exception as e:
    print("pycuda missing:", e)
PY
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_runtime.py tests/test_tensorrt.py 2>&1 | tee "$OUT/tests.log" | tail -15
python3 bench/cascade_overhead.py --backend torch-cuda --json "$OUT/cascade_overhead.json" 2>&1 | tee "$OUT/bench.log" | tail -25
