# The two commands of the README: `make demo` (install, then the main job) and `make test` (install, then every check).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo test export clean-nbs readme

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision first, as the pair this machine's wheels provide (see constraints.txt)
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip check
	touch $@

demo: install
	$(BIN)/anime-pose demo --out demo_out

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash .ci/checks

export:
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

readme:
	$(BIN)/python .ci/make_readme.py
