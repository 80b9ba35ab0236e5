# tilefm developer entry points. `make demo` and `make test` are the two commands in README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: install demo test bench clean

# The CPU build of torch first (this machine keeps its wheel at hand): a bare `torch`
# requirement would pull the multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Set up, then run both sample jobs on the embedded defaults (local Ray, local S3 server).
demo: install
	$(PY) -m tilefm.localstack demo --data $(SHARED)/data --models $(SHARED)/models --out demo-output

## The whole test suite (real Ray, real SeaweedFS S3, real models and data from ../shared).
test: install
	$(PY) -m pytest -ra

bench: install
	TILEFM_MODEL_STORE=$(SHARED)/models $(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) demo-output test-output
