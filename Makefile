# `make demo` and `make test` create ./.venv on first use (Python 3.10+), install inflens into it
# and run. If the python3 you start from already has torch, the venv sees (and keeps) it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml tools/install_torch.py
	if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) tools/install_torch.py
	$(PY) -m pip install -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/inflens demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -m determinism -p no:cacheprovider
	OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 $(PY) -m pytest -q -m determinism -p no:cacheprovider

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks && $(VENV)/bin/ruff format --check src tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_scoring.py

clean:
	rm -rf $(VENV) inflens-demo
