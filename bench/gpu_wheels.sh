#!/usr/bin/env bash
# Run here (with internet) before a GPU check: fetch what the lent NVIDIA machine lacks into .whl/
# (git-ignored), for bench/gpu_check.sh there. That machine has Python 3.12, torch with CUDA,
# numpy, onnx, onnxruntime, cuda-python, scikit-learn, matplotlib, pytest; it lacks onnxsim,
# pycuda (built there from its sdist: it needs libcuda) and pycuda's pure-Python needs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl onnxsim==0.8.1 pytools platformdirs mako siphash24
# the sdist only (its build needs CUDA, so it is built on the GPU machine)
python3 -m pip download -q --no-deps --no-binary pycuda -d .whl pycuda==2026.1
ls -la .whl
