# make setup: create or refresh .venv (torch 2.13.0 first, then the project with its test extras).
# make demo:  the platform's main job on the embedded default (tiny preset, synthetic subjects).
# make test:  the whole suite (CPU, no network).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# pip's local wheel folder, where this machine keeps the CPU torch build; PyPI elsewhere (CUDA on GPU boxes).
FIND_LINKS := $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global.find-links='\(.*\)'/\1/p")
UV_FLAGS := --python $(PY) $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) -c constraints.txt

.PHONY: setup demo cluster-demo test bench clean

setup:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv
	@# torch first and pinned: a later resolve must never swap in a multi-GB CUDA build.
	$(UV) pip install -q $(UV_FLAGS) torch==2.13.0
	$(UV) pip install -q $(UV_FLAGS) -e '.[dev]'

demo: setup
	$(PY) -m cluster.demo

# The Kubernetes flow's commands (ray start, serve deploy, ray job submit, a client call) on a local head.
cluster-demo: setup
	bash k8s/local/cluster-demo.sh

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_train_step.py

clean:
	rm -rf demo-out cluster-demo-out .pytest_cache
