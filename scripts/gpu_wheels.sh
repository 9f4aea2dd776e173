#!/usr/bin/env bash
# Download, here, the wheels that a lent GPU machine lacks, into .whl/ (in .gitignore) for
# scripts/gpu_check.sh. That machine has Python 3.12, CUDA torch, Triton, transformers, peft,
# accelerate, onnx and onnxruntime (CPU) but no diffusers, and it cannot reach any registry.
# (diffusers lists importlib_metadata but imports it only on Python < 3.8.) TensorRT cannot travel:
# its libraries are not served by the registries here (and exceed the 64 MiB a call may carry), nor
# can onnxruntime-gpu (255 MB): there the TensorRT tests skip, and ONNX Runtime runs on the CPU only.
# What this check shows is the Triton kernels compiled, CUDA torch, fp16 training and the eager bench.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers>=0.35,<0.50" "platformdirs>=4,<5"
du -sh .whl && ls .whl
