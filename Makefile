# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision pinned here (the local wheel cache serves these); pyproject only declares ranges.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[test,pretrained,index,clip,export,webdataset,hub]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crossmatch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/scan_scoring.py
	$(BIN)/python benchmarks/accumulation.py
	$(BIN)/python benchmarks/index_search.py
	$(BIN)/python benchmarks/shard_loader.py

clean:
	rm -rf runs data/shapes .pytest_cache
