#!/usr/bin/env bash
# Opt-in: build real llama.cpp (vendored in llama-cpp-python's sdist) into .venv for
# tests/test_llamacpp_interop.py. PyPI's prebuilt llama.cpp wheels (llama-cpp-py-sync) need
# glibc 2.38; this machine has 2.36, so it is compiled here: about 11 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install diskcache 'jinja2>=2.11.3'
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  .venv/bin/pip install --no-deps llama-cpp-python==0.3.36
.venv/bin/python -c "import llama_cpp; print('llama.cpp (llama-cpp-python', llama_cpp.__version__, ') is installed')"
