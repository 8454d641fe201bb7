# kdens — fresh machine to results in one command each.
#   make demo   set up, then run the main job on the embedded digits data
#   make test   set up, then run the test suite (what .ci/run calls)
#   make bench  set up, then reproduce BENCHMARKS.md (long; needs dataset-fashion-mnist)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.kdens-installed
TORCH   = torch==2.13.0

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

# torch goes in first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[all]" $(TORCH)
	touch $(STAMP)

# The main job on the embedded digits data: every stage from examples/digits.toml, then the report.
demo: setup
	$(VENV)/bin/kdens run examples/digits.toml --quiet
	@echo "open runs/digits/report.html (or runs/digits/report.md)"

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .venv-tflite runs .pytest_cache
