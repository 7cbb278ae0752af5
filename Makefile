# make setup: create or refresh .venv (torch 2.13.0 first, then the project with its test extras).
# make demo:  the platform's main job on the embedded default (tiny preset, synthetic subjects).
# make test:  the whole suite (CPU, no network), tests/faults excepted.
# make cluster-faults: the fault suite (tests/faults): a two-node Ray on 127.0.0.1, nodes, actors, Ray and
#             PostgreSQL killed or restarted mid-run; serially (no xdist), each test states its figure.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# pip's local wheel folder, where this machine keeps the CPU torch build; PyPI elsewhere (CUDA on GPU boxes).
FIND_LINKS := $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global.find-links='\(.*\)'/\1/p")
# --compile-bytecode: this machine (and many CI images) sets PYTHONDONTWRITEBYTECODE=1, so without .pyc files written
# at install every Python process (each Ray worker, each test subprocess) compiles torch, transformers, diffusers
# and Ray from source: `import tune.worker` took 26 s instead of 10 s (BENCHMARKS, time to first step).
UV_FLAGS := --python $(PY) $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) -c constraints.txt --compile-bytecode

.PHONY: setup demo cluster-demo test e2e cluster-faults bench clean

setup:
	@# A new venv is compiled by uv (--compile-bytecode), so it starts with the stamp the step below looks for.
	@test -x $(PY) || { $(PYTHON) -m venv $(VENV) && touch $(VENV)/.bytecode-compiled; }
	@test -x $(UV) || $(PY) -m pip install -q uv
	@# torch first and pinned: a later resolve must never swap in a multi-GB CUDA build.
	$(UV) pip install -q $(UV_FLAGS) torch==2.13.0
	$(UV) pip install -q $(UV_FLAGS) -e '.[dev]'
	@# A venv made before --compile-bytecode holds no .pyc files; compile them once (uv skips installed packages).
	@test -f $(VENV)/.bytecode-compiled || { $(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null 2>&1; touch $(VENV)/.bytecode-compiled; }
	@# DeepSpeed's CPU comm op, compiled once into .venv/torch_extensions rather than in a tune's start-up.
	$(PY) -m tune.ds_ops

demo: setup
	$(PY) -m ct2i.demo

# The Kubernetes flow's commands (ray start, serve deploy, ray job submit, a client call) on a local head.
cluster-demo: setup
	bash k8s/local/cluster-demo.sh

# Two xdist workers: the tests that use Ray run one after another on one of them (one Ray for the session,
# tests/conftest.py), everything else on the other.
# The operator entry points end to end (`e2e`: `ct2i serve`, `make demo`, `make cluster-demo`, `ray job submit`,
# each in subprocesses with its own Ray) run in `make e2e`, which .ci/run also runs.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 -m "not e2e"

# Serially: each starts Ray processes of its own (a `ray start` head, `ct2i serve`, the demos).
e2e: setup
	$(PY) -m pytest -q -p no:xdist --durations=0 -rA -m e2e tests/ct2i tests/k8s

# Serially: each fault test starts (or restarts) Ray processes of its own and times its recovery; two at once
# on a 2-core machine would measure each other.
cluster-faults: setup
	$(PY) -m pytest -q -p no:xdist --durations=0 -rA tests/faults

bench: setup
	$(PY) bench/bench_train_step.py

clean:
	rm -rf demo-out cluster-demo-out .pytest_cache
