# Two commands matter: `make report` (install + smoke report) and `make test` (unit tests + one smoke render).
# CPU machines get PyTorch's CPU build first (TORCH_SPEC); GPU nodes use environment.yml instead.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params/smoke.yaml
BIN := $(VENV)/bin

.PHONY: install etl-venv report test unit slow e2e lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[report,dev]"
	touch $@

report: install
	$(BIN)/repro run $(PARAMS) --force

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
