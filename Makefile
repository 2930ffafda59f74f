# The two commands a new user runs: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline

.PHONY: setup setup-gpu demo test test-unit test-integration lint clean

setup:
	@bash scripts/setup.sh cpu

setup-gpu:
	@bash scripts/setup.sh gpu

demo: setup
	$(VENV)/bin/rmr1 demo $(ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests -m unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests -m "integration or e2e" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
