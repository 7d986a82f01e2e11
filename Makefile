# Set-up and the two things people run most. Everything installs into ./.venv.
#   make chat   install, then chat about an example image with the shipped cogvlm-tiny
#   make test   install with the test extras (and Chromium for the browser test), run every test
VENV ?= .venv
PY := $(VENV)/bin/python
# "compat" editable installs put the checkout on sys.path, so `import cogvlm` works from anywhere
INSTALL := $(PY) -m pip install -q --config-settings editable_mode=compat -e
EXAMPLE ?= cogvlm/web_examples/shapes-0.png

.PHONY: chat test bench

$(VENV)/.installed-run: pyproject.toml
	python3 -m venv $(VENV)
	$(INSTALL) .
	touch $@

$(VENV)/.installed-test: pyproject.toml scripts/install-test-deps.sh
	python3 -m venv $(VENV)
	bash scripts/install-test-deps.sh
	$(INSTALL) '.[test,web,serve,train]'
	touch $@

chat: $(VENV)/.installed-run
	$(VENV)/bin/cogvlm chat --image $(EXAMPLE)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(VENV)/.installed-test
	$(INSTALL) '.[bench]'
	$(PY) benchmarks/load.py
	$(PY) benchmarks/generate.py
