# `make test` and `make demo` work from a fresh clone with nothing but Python 3.11+ installed:
# each creates .venv if missing and (re)installs the project when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Touched after a successful install; newer pyproject.toml means reinstall.
STAMP  := $(VENV)/.installed

.PHONY: test demo install lint clean

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m flows.demo

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in pyproject.toml (torch==2.13.0, the CPU build); pip resolves it by name.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,dashboard]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
