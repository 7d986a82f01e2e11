# Set-up and the things people run most. Everything installs into ./.venv.
#   make chat        install, then chat about an example image with the shipped cogvlm-tiny
#   make test        install with the test extras (and Chromium for the browser test), run every test (CI)
#   make test-fast   the everyday subset: no browser, no multi-process or long end-to-end runs
VENV ?= .venv
PY := $(VENV)/bin/python
# "compat" editable installs put the checkout on sys.path, so `import cogvlm` works from anywhere
INSTALL := $(PY) -m pip install -q --config-settings editable_mode=compat -e
EXAMPLE ?= cogvlm/web_examples/shapes-0.png

.PHONY: chat test test-fast bench

$(VENV)/.installed-run: pyproject.toml
	python3 -m venv $(VENV)
	$(INSTALL) .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	python3 -m venv $(VENV)
	$(INSTALL) '.[test,web,serve,train]'
	touch $@

chat: $(VENV)/.installed-run
	$(VENV)/bin/cogvlm chat --image $(EXAMPLE)

test: $(VENV)/.installed-test
	bash scripts/install-test-deps.sh
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed-test
	$(INSTALL) '.[bench]'
	$(PY) benchmarks/load.py
	$(PY) benchmarks/generate.py
