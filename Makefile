# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint docs bench bench-gpu results clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision pinned here (the local wheel cache serves these); pyproject only declares ranges.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[test,pretrained,index,clip,export,webdataset,docs,serve,wandb,hub]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crossmatch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the end-to-end runs through the CLI (marked slow); `make test` (and CI) runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

# The documentation site (mkdocs.yml, docs/) into site/, offline; tests/test_docs.py builds it the same way.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The kept benchmarks at their small default sizes (about 15-20 minutes on 2 idle cores); each prints its figures
# with the machine's load average and thread count. docs/benchmarks.md says how to read them.
bench: $(STAMP)
	$(BIN)/python benchmarks/scan_scoring.py
	$(BIN)/python benchmarks/accumulation.py
	$(BIN)/python benchmarks/index_search.py --threads 1
	$(BIN)/python benchmarks/shard_loader.py
	$(BIN)/python benchmarks/checkpoint_integrity.py
	$(BIN)/python benchmarks/train_throughput.py --recipes tiny
	$(BIN)/python benchmarks/demo.py

# The GPU checks (exits 1 at once without a CUDA device).
bench-gpu: $(STAMP)
	bash benchmarks/gpu_check.sh

# docs/results.md from results/runs.jsonl (tests/test_results.py checks it is current).
results: $(STAMP)
	$(BIN)/python scripts/results.py

clean:
	rm -rf runs data/shapes .pytest_cache site
