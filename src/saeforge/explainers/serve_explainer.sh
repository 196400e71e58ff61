#!/usr/bin/env bash
# Serve an explainer model through vLLM's OpenAI-compatible API, as saeforge's client expects.
#
#   bash $(python -c 'import saeforge.explainers as e, pathlib; print(pathlib.Path(e.__file__).parent)')/serve_explainer.sh [MODEL_OR_HF_FOLDER] [PORT] [extra vllm args...]
#
# MODEL_OR_HF_FOLDER: a hub id or a local HF folder; "smollm2" (the default) converts the
# embedded SmolLM2 GGUF to an HF folder under ${SAEFORGE_CACHE:-~/.cache/saeforge} first.
# PORT defaults to 8000. The model is served as $SERVED_MODEL_NAME (default: smollm2), matching
# configs/explainer/vllm.yaml. Python: $VLLM_PYTHON, else ${VLLM_VENV:-./.venv-vllm} (from `make vllm`),
# else the python on PATH (a GPU machine with the normal `pip install vllm`).
# Without a GPU: --enforce-eager, --dtype bfloat16 where the CPU has bf16 instructions
# (avx512_bf16 / amx_bf16), else float32, and VLLM_CPU_KVCACHE_SPACE=2 (GiB); bench/README.md
# (explain.py) lists the CPU settings tried.
set -euo pipefail

MODEL="${1:-smollm2}"
PORT="${2:-8000}"
shift $(( $# > 2 ? 2 : $# ))
SERVED="${SERVED_MODEL_NAME:-smollm2}"

if [[ -n "${VLLM_PYTHON:-}" ]]; then
  PY="$VLLM_PYTHON"
elif [[ -x "${VLLM_VENV:-.venv-vllm}/bin/python" ]]; then
  PY="${VLLM_VENV:-.venv-vllm}/bin/python"
else
  PY="python"
fi

if [[ "$MODEL" == "smollm2" ]]; then
  # the python that has saeforge installed converts the GGUF ($SAEFORGE_PYTHON, else ./.venv, else PATH)
  MAIN_PY="${SAEFORGE_PYTHON:-.venv/bin/python}"; [[ -x "$MAIN_PY" ]] || MAIN_PY=python
  MODEL="$("$MAIN_PY" -m saeforge.lm.hf_folder | tail -n 1)"
fi

ARGS=(--model "$MODEL" --served-model-name "$SERVED" --host 127.0.0.1 --port "$PORT"
      --max-model-len 2048)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ARGS+=(--dtype auto)
else
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
  # bf16 halves the weights read per decode step and doubles the GEMM rate where the CPU has
  # bf16 dot products; without them it would be emulated, slower than float32.
  if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then CPU_DTYPE=bfloat16; else CPU_DTYPE=float32; fi
  ARGS+=(--dtype "$CPU_DTYPE" --enforce-eager)  # extra arguments come later, so `--dtype float32` overrides
fi

echo "serving $MODEL as '$SERVED' on http://127.0.0.1:$PORT/v1 with $PY" >&2
exec "$PY" -m vllm.entrypoints.openai.api_server "${ARGS[@]}" "$@"
