# `make demo` and `make test` set everything up themselves on a fresh Debian machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install demo test lint clean

$(FASHION):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# torch first, from its pinned CPU build; the constraints file keeps any dependency from swapping it
# for a multi-GB CUDA build (torchvision and torch-fidelity are deliberately not dependencies).
$(STAMP): pyproject.toml constraints.txt | $(FASHION)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job with tmpq's default strategy at a demo size (under 10 min on 2 cores): calibrate, search timesteps +
# bits under the W6A6@10-steps budget, re-score against FP and uniform PTQ, export the winner, write the report.
# Only the search's size is set here (generations, population, final samples); every strategy setting is the default.
DEMO_ARGS ?= --like W6A6 --budget-steps 10 --steps 10 --generations 3 --population 16 --final-samples 300 --final-top 2
demo: install
	$(BIN)/tmpq run --model builtin:fashion --run-dir runs/demo $(DEMO_ARGS)

# One pytest worker per core (pytest-xdist); tests/conftest.py gives each worker its share of the torch threads.
test: install
	$(BIN)/python -m pytest -n auto

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
