# The two commands of the README: `make demo` (install, then the main job) and `make test` (install, then every check).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo test export clean-nbs readme wheel docs

install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	@# torch's CUDA build (the one this machine's wheels provide) makes the environment about 6.6 GB
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); if [ "$$free_kb" -lt 7340032 ]; then \
	  echo "make install: the virtual environment needs about 7 GB of free disk; only $$((free_kb / 1048576)) GB are free here" >&2; exit 1; fi
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

# _docs/index.html: the book as a website, every chapter with its stored outputs (no notebook is run; quarto renders it
# when installed, else .ci/make_docs.py does). Not nbdev_docs: without quarto that one runs `pip install -e` here.
docs: install
	$(BIN)/python .ci/make_docs.py

# dist/anime_pose-VERSION-py3-none-any.whl (and the sdist): `pip install dist/anime_pose-*.whl` anywhere,
# e.g. upload it to Colab and point the first cell of a notebook at it
wheel: install
	rm -rf dist build
	$(BIN)/python -m build --outdir dist .
	@$(BIN)/python -c "import sys, zipfile, glob; names = zipfile.ZipFile(glob.glob('dist/anime_pose-*.whl')[0]).namelist(); \
	  missing = [n for n in ('anime_pose/core.py', 'anime_pose/assets/') if not any(m.startswith(n) for m in names)]; \
	  sys.exit(f'the wheel lacks {missing}') if missing else print(f'dist/: wheel of {len(names)} files, modules and assets included')"
