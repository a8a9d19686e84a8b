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

demo: install
	$(BIN)/tmpq eval --model builtin:fashion --steps 10 --schedule quad --num-samples 1000 --seed 0 --out runs/demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
