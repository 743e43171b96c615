# mtbench: two commands for a newcomer (see README): `make run` (main job) and `make test` (test suite).
# Both create the virtual environment in .venv on first use (about 2 minutes: pip resolves torch + torchvision).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mtbench-installed
METHODS ?= tadformer,mtlora

.PHONY: install run test test-slow params clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mtbench run --methods $(METHODS)
	$(BIN)/mtbench table

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

params: $(STAMP)
	$(BIN)/mtbench params --dataset pascal_context

clean:
	rm -rf $(VENV) build *.egg-info
