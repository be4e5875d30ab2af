# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build that installs in seconds on the project's machines (an
# unpinned torch pulls a multi-GB CUDA build). Another build: `make test TORCH="torch==2.6.0"`.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check surgery tests benchmarks examples

bench: setup
	$(PY) benchmarks/bench_apply.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_merged_inference.py
	$(PY) benchmarks/bench_latency.py

clean:
	rm -rf $(VENV) out build dist .pytest_cache .hypothesis
