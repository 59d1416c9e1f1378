# Two commands matter: `make report` (install + smoke report) and `make test` (unit tests + one smoke render).
# CPU machines get PyTorch's CPU build first (TORCH_SPEC); GPU nodes use environment.yml instead.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params/smoke.yaml
BIN := $(VENV)/bin

.PHONY: install etl-venv report test unit slow e2e lint lab kernels gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[report,dev,notebook]"
	touch $@

report: install
	$(BIN)/repro run $(PARAMS) --force

# JupyterLab on notebooks/: each py:percent file opens as a notebook (jupytext), reads any params file and
# writes to outputs/interactive/. The settings folder makes "Jupytext Notebook" the default viewer of .py files.
lab: install
	JUPYTERLAB_SETTINGS_DIR=$(CURDIR)/.jupyter/lab/user-settings $(BIN)/jupyter lab --ServerApp.root_dir=notebooks

# On a GPU node, in the environment that runs the report (conda env of environment.yml): mamba-ssm and
# causal-conv1d built for this GPU's architecture only, the wheels kept for the next node (repro.kernels).
kernels:
	python -m repro.kernels build

# On a GPU node, after `make kernels`: the GPU tests, then the benchmarks behind the GPU settings of the
# params files (train.cuda_graphs, mps) and our EHRMamba's step against mamba_ssm's, with and without
# model_sizes.ehrmamba.recompute; their numbers also land in outputs/gpu-check/*.json.
gpu-check:
	mkdir -p outputs/gpu-check
	python -m pytest -q -m gpu
	python -m repro.bench graphs --out outputs/gpu-check/graphs-ehrmamba.json
	python -m repro.bench graphs --model transformer --out outputs/gpu-check/graphs-transformer.json
	python -m repro.bench share --out outputs/gpu-check/share-ehrmamba.json
	python -m repro.bench share --model lstm --out outputs/gpu-check/share-lstm.json
	python -m repro.bench step --json outputs/gpu-check/step.json
	python -m repro.bench step --recompute --json outputs/gpu-check/step-recompute.json

unit: install
	$(BIN)/python -m pytest -q

# The MIMIC-IV chain test (tests/test_mimic_raw.py) runs the ETL from its own venv, .venv-etl.
etl-venv:
	PYTHON=$(PYTHON) bash etl/run_mimic_etl.sh --install

slow: install
	$(BIN)/python -m pytest -q -m slow

e2e: install etl-venv
	$(BIN)/python -m pytest -q -m e2e

test: unit slow e2e

lint: install
	$(BIN)/ruff check repro tests notebooks
	$(BIN)/ruff format --check repro tests notebooks

clean:
	rm -rf outputs/smoke outputs/.staging-* outputs/*.failed
