# Set-up and the two things people run most. Everything installs into ./.venv.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed  ## the whole test suite
	$(PY) -m pytest -q

bench: $(VENV)/.installed  ## benchmarks (slow; print measured ratios)
	$(PY) benchmarks/load.py
