# `make demo`: environment + synthetic data + training + serving on http://127.0.0.1:8000
# `make test`: lint, format and type checks, then the test suite in random order
#              (reads the real HAM10000 sample from ../shared/data/ham10000)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo train-demo serve-demo test test-fast check lint
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]" -e ./clients
	touch $@

train-demo: venv
	$(PY) -m training demo-data --out demo-data
	$(PY) -m training run --data-dir demo-data --out runs/demo --preset smoke

serve-demo: venv
	$(PY) -m service --bundle runs/demo/bundle

demo: train-demo serve-demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

# the in-process tier only (no uvicorn, browser, fresh venv or killed processes)
test-fast: venv
	$(PY) -m pytest -m "not scenario"
