# dicom-node: the two set-up commands are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test test-deps services lint typecheck bench clean ohif
OHIF_VERSION := 3.13.2
OHIF_STAMP := .ohif/.$(OHIF_VERSION)

install: $(STAMP)

# The stamp makes `make install` a no-op while pyproject.toml and constraints.txt are unchanged.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

serve: install
	$(BIN)/dicom-node serve $(ARGS)

# Debian packages the tests use as real peers: Orthanc (PACS) with its DICOMweb plugin (STOW-RS), DCMTK (modality),
# dicom3tools (dciodvfy), Chromium for the browser test of the admin page, redis-server (the worker tests start
# private servers).
test-deps:
	@missing=""; \
	for p in orthanc orthanc-dicomweb dcmtk dicom3tools chromium chromium-driver redis-server; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

services:
	bash .ci/services.sh

# OHIF Viewer's built app (npm registry, package/dist) for the real-viewer tests; fetched once per version.
$(OHIF_STAMP):
	rm -rf .ohif && mkdir -p .ohif
	cd .ohif && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && tar xzf ohif-app-$(OHIF_VERSION).tgz && rm ohif-app-$(OHIF_VERSION).tgz
	touch $@

ohif: $(OHIF_STAMP)

test: install test-deps services ohif
	$(BIN)/pytest $(PYTEST_ARGS)

lint: typecheck
	$(BIN)/ruff check dicom_node workers models tests bench experiments
	$(BIN)/ruff format --check dicom_node workers models tests bench experiments
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layers.py

# mypy cannot follow the package-dir mapping (models/ installs as dicom_node.models, workers/ as
# dicom_node.workers), so it reads a tree of links laid out as the installed package.
TYPECHECK_TREE := .typecheck
typecheck: install
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/dicom_node
	for entry in dicom_node/*; do ln -s ../../$$entry $(TYPECHECK_TREE)/dicom_node/; done
	ln -s ../../models $(TYPECHECK_TREE)/dicom_node/models
	ln -s ../../workers $(TYPECHECK_TREE)/dicom_node/workers
	ln -s ../bench $(TYPECHECK_TREE)/bench
	cd $(TYPECHECK_TREE) && ../$(BIN)/mypy --config-file ../pyproject.toml dicom_node bench

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .ohif
