# make train | make test | make lint. The first target builds .venv with a pinned torch.
# GPU or other platforms: make setup TORCH="torch==2.13.0" PIP_ARGS="--index-url <your torch wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_ARGS ?=
ARGS ?=

.PHONY: setup train test test-isa test-all lint format clean

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

# The hardware-sensitive tests (-m isa) again under every instruction-set class below this CPU's own
# (ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY caps), one pytest process per class; prints a table.
test-isa: setup
	$(VENV)/bin/python -m tests.isa_lanes $(ARGS)

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
