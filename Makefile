# One entry point. Every target first brings .venv up to date with requirements.txt,
# pyproject.toml and the detectron2 installer (re-run only when one of them changed).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test test-core clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/install_detectron2.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job: train + evaluate the tiny Swin config on the built-in synthetic dataset (CPU).
demo: $(STAMP)
	$(PY) tools/demo.py $(ARGS)

# The test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# The core package's tests alone (pytest -m core): the heads, losses, samplers, evaluators and a
# training run of the core without the harness.
test-core: $(STAMP)
	$(PY) -m pytest -m core $(ARGS)

clean:
	rm -rf $(VENV) output
