# Two entry points for a fresh machine:  `make run` (whole pipeline on the embedded default)
# and `make test` (the test suite). Both create .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this disk; pinning it keeps pip from pulling a CUDA build.
PIP    := $(BIN)/pip install --disable-pip-version-check -q

.PHONY: run test setup setup-dev sysdeps bench serve serve-stop serve-status serve-mlflow cluster cluster-stop cluster-status clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

# System packages the pipeline needs: git (git sources) and bubblewrap (the sandbox that runs
# untrusted code). Installed with apt when we are root; otherwise we say what to install.
sysdeps:
	@missing=""; command -v git >/dev/null || missing="$$missing git"; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "please install:$$missing (e.g. sudo apt-get install -y$$missing)"; exit 1; fi; fi

setup: sysdeps $(VENV)/.installed
setup-dev: sysdeps $(VENV)/.installed-dev

run: setup
	$(BIN)/codeworld pipeline

test: setup-dev
	$(BIN)/pytest -q

bench: setup
	$(PIP) -e '.[bench]'
	$(BIN)/python bench/dedup.py

# Prefect server (UI on :4200), MLflow tracking server (UI on :5000, mlflow.db + mlartifacts/)
# and the pipeline's deployments served, in the background on 127.0.0.1; pids and logs in
# .serve/. `make serve-stop` stops exactly those processes.
SERVE_PREFECT_PORT ?= 4200
SERVE_MLFLOW_PORT  ?= 5000
serve: setup
	$(BIN)/python -m flows.serve start --prefect-port $(SERVE_PREFECT_PORT) --mlflow-port $(SERVE_MLFLOW_PORT)

serve-stop:
	$(BIN)/python -m flows.serve stop

serve-status:
	$(BIN)/python -m flows.serve status

# A local Dask cluster for `executor.kind: dask`: scheduler on 127.0.0.1:$(CLUSTER_PORT) and
# $(CLUSTER_WORKERS) single-threaded workers, in the background (pids and logs in .cluster/).
CLUSTER_PORT    ?= 8786
CLUSTER_WORKERS ?= 2
cluster: setup
	$(BIN)/python -m flows.cluster start --port $(CLUSTER_PORT) --workers $(CLUSTER_WORKERS)

cluster-stop:
	$(BIN)/python -m flows.cluster stop

cluster-status:
	$(BIN)/python -m flows.cluster status

serve-mlflow: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# data/ holds tracked .gitignore files (they keep the outputs out of git): put back after.
clean:
	rm -rf data metrics/*.json mlflow.db mlruns
	git checkout -- data 2>/dev/null || true
