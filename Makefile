# Two commands for a new user: `make reproduce` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup reproduce test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3.x ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name amanlib --display-name "amanlib (.venv)"
	touch $(STAMP)

reproduce: $(STAMP)
	$(PY) -m amanlib run-notebooks

test: $(STAMP)
	$(PY) -m pytest -ra

test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow"

bench: $(STAMP)
	$(PY) bench/magnify.py
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) results/notebooks results/figures results/bench results/work results/metrics.json .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
