# `make demo`: environment + synthetic data + training + serving on http://127.0.0.1:8000
# `make test`: the test suite (reads the real HAM10000 sample from ../shared/data/ham10000)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo train-demo serve-demo test lint
venv: $(VENV)/.installed

$(VENV)/.installed: requirements-serve.txt requirements-train.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

train-demo: venv
	$(PY) -m training demo-data --out demo-data
	$(PY) -m training run --data-dir demo-data --out runs/demo --preset smoke

serve-demo: venv
	$(PY) -m service --bundle runs/demo/bundle

demo: train-demo serve-demo

test: venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check training service clients benchmarks tests
