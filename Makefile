# The two commands of the README:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run every check and test
# Both create .venv from scratch when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo up test check lint typecheck generate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/autoloader demo

up: $(STAMP)
	$(BIN)/autoloader up

generate: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

check: $(STAMP)
	$(BIN)/python scripts/generate_protos.py --check
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: check
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
