# `make demo`: environment + synthetic data + training + serving on http://127.0.0.1:8000
# `make test`: lint, format and type checks, then the test suite in random order
#              (reads the real HAM10000 sample from ../shared/data/ham10000)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo train-demo serve-demo test test-fast check lint locks mutants
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/pyproject.toml requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt  # the lock: the versions CI tested
	$(PY) -m pip install --quiet --no-deps -e ".[dev]" -e ./clients
	touch $@

# Refresh the locks of the training and development environments from pyproject.toml (the serving
# image's requirements-serve.txt is kept by hand: it leaves out what catboost needs only to plot).
LOCK := uv pip compile --python-version 3.11 --no-annotate --quiet  # UV_FIND_LINKS for local wheels
locks:
	$(LOCK) pyproject.toml --extra train -o requirements-train.txt
	$(LOCK) pyproject.toml clients/pyproject.toml --extra dev -o requirements-dev.txt

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

# Mutation testing of the modules that carry the promises (pyproject.toml [tool.mutmut]; docs/development.md,
# "Mutation testing" gives the last result). About 25 minutes on 2 cores from scratch; a rerun with mutants/
# kept retests only the functions that changed. Lists the survivors: each is killed by a test or explained there.
# installed on demand: not part of the locked test environment
MUTMUT := mutmut==3.8.1
mutants: venv
	$(PY) -m pip install --quiet "$(MUTMUT)"
	$(VENV)/bin/mutmut run
	$(VENV)/bin/mutmut export-cicd-stats
	cat mutants/mutmut-cicd-stats.json
	$(VENV)/bin/mutmut results
