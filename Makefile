# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv first, from the
# lock file: the exact release of every package, transitive ones included (`make lock` refreshes
# it). `make test-latest` runs the suite on the newest releases pyproject.toml allows.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements/lock.txt
# torch is pinned to 2.13.0, the CPU build that installs in seconds on the project's machines
# (an unpinned torch pulls a multi-GB CUDA build). `make lock` resolves with this pin and
# `make test-latest` keeps it: "newest releases" means every package but torch.
TORCH  ?= torch==2.13.0
TOOLS  := .venv-tools
LATEST := .venv-latest
# hqq ships only as an sdist whose build also tries to compile CUDA kernels (and ignores the
# failure); this skips that step: surgery uses hqq's PyTorch backend, which runs on CPU.
export DISABLE_CUDA := 1

.PHONY: setup demo demo-multi test test-latest lock lint bench clean

# The lock pins everything, the build backend (hatchling) included, so the project installs
# without build isolation: nothing unpinned is downloaded.
$(VENV)/.installed: $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py
	$(PY) examples/multi_task.py

# Three task adapters on one frozen model, one mixed batch, timed against PEFT (part of `demo`).
demo-multi: setup
	$(PY) examples/multi_task.py

test: setup
	$(PY) -m pytest

# pip-compile (pip-tools) resolves pyproject's dependencies, the `dev` extra and the build
# dependencies with torch held at $(TORCH). It may pick a local build of that release (here
# /opt/wheels' torch-2.13.0+cpu), whose `+cpu` tag is then dropped from the lock: `torch==2.13.0`
# matches that wheel where it is offered (pip prefers it over the plain release) and stays
# installable from PyPI alone, where a `+cpu` pin would find nothing. The lock has no hashes for
# the same reason: each platform's torch wheel is a different file.
lock: $(TOOLS)/.installed
	printf '%s\n' "$(TORCH)" > $(TOOLS)/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(TOOLS)/bin/pip-compile --quiet --upgrade \
	  --extra dev --all-build-deps --strip-extras --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links --constraint $(TOOLS)/torch.txt \
	  --output-file $(LOCK) pyproject.toml
	sed -E -i 's/^(torch==[^+ ]+)\+[^ ]+/\1/' $(LOCK)

$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q "pip-tools==7.6.2"
	touch $@

# A separate venv, rebuilt each time so that it always has the newest releases.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q "$(TORCH)"
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH)"
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|peft)='
	$(LATEST)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check surgery tests benchmarks examples

bench: setup
	$(PY) benchmarks/bench_apply.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_merged_inference.py
	$(PY) benchmarks/bench_latency.py
	$(PY) benchmarks/bench_mixed_batch.py

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) out build dist .pytest_cache .hypothesis
