# Two commands: `make demo` and `make test`. Both create and use .venv in the repo root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned here because this machine's pip serves these builds from local files; any torch>=2.4 works.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup data demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the project's metadata changes; torch only when it is missing.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m s2bnn.deploy._build  # prebuild the packed-runtime kernels into the cache
	$(BIN)/python -c "from s2bnn.nn import _kernels; _kernels.prebuild()"  # and the training ones
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from the Debian package (offline); the loader also accepts any dir with the idx files.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null && \
	  echo "Fashion-MNIST installed in $(FMNIST_DIR)"; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'" \
	       "or set S2BNN_FASHION_MNIST=DIR holding the four idx .gz files"; \
	fi

demo: setup data
	$(BIN)/s2bnn demo --out $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup data lint
	$(BIN)/python -m pytest

bench: setup data
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
