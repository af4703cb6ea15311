# Two jobs: `make demo` runs the main job end to end, `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
GATEWATCH_DATA ?= $(abspath ../shared/data)
export GATEWATCH_DATA

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so no later resolve pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/torch-pin.txt
	$(PIP) install -q -c $(VENV)/torch-pin.txt -e ".[all]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m benchmarks.demo --data-dir "$(GATEWATCH_DATA)" --out demo-out

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo-out runs
