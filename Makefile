# Everything a fresh Debian machine needs, then the suite or its tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install system-deps up test lint bench clean

install: system-deps $(VENV)/.installed

system-deps:
	@bash scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

up: install
	$(BIN)/crabglamp up

test: install
	$(BIN)/pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy contracts services

bench: install
	$(BIN)/python -m bench.append
	$(BIN)/python -m bench.credential_add
	$(BIN)/python -m bench.app_create
	$(BIN)/python -m bench.pull
	$(BIN)/python -m bench.boot

clean:
	rm -rf $(VENV) .data
