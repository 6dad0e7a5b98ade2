# wb: every target uses its own virtual environment in .venv (created on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test bench lint clean

install: $(STAMP)

# torch first, pinned, so pip takes the CPU build lying on this machine's disk instead of a
# multi-GB CUDA build; everything else then finds torch already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench.run --out bench/out/bench.json

lint: install
	$(BIN)/ruff check workbench tests bench

clean:
	rm -rf $(VENV) bench/out .pytest_cache
