# make train | make test | make lint. The first target builds .venv with a pinned torch.
# GPU or other platforms: make setup TORCH="torch==2.13.0" PIP_ARGS="--index-url <your torch wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_ARGS ?=
ARGS ?=

.PHONY: setup train test test-all lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(PIP_ARGS) "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[dev,bench,search,export,cluster]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/python train.py $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses=4 $(ARGS)

test-all: setup
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses=4 -m "slow or not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) outputs *.egg-info
