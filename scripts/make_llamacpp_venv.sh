#!/usr/bin/env bash
# llama.cpp as a benchmark peer: a venv of its own (.venv-llamacpp) with llama-cpp-python built from its PyPI
# sdist (cmake and a C++ compiler; a few minutes on 2 cores). Never part of `make setup` or CI.
#
#   bash scripts/make_llamacpp_venv.sh            # portable build (GGML_NATIVE=OFF), AVX-512 on where the CPU has it
#   NATIVE=1 bash scripts/make_llamacpp_venv.sh   # -march=native (AMX where the CPU has it): .venv-llamacpp-native
#
# Then: .venv/bin/python benchmarks/bench_llamacpp.py [--peer .venv-llamacpp/bin/python]
set -euo pipefail
VERSION="${LLAMACPP_VERSION:-0.3.36}"
if [ "${NATIVE:-0}" = "1" ]; then
  VENV="${VENV:-.venv-llamacpp-native}"
  ARGS="-DGGML_NATIVE=ON"
else
  VENV="${VENV:-.venv-llamacpp}"
  # what a distribution would ship for this CPU family: its kernels without -march=native (AVX-512 ones only where
  # the CPU has AVX-512: an AVX2-only CPU would stop on an illegal instruction)
  ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    ARGS="$ARGS -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
  fi
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q numpy
CMAKE_ARGS="$ARGS -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$VENV/bin/pip" install -q --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in $VENV')"
