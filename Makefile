# kdens — fresh machine to results in one command each.
#   make demo   set up, then run the main job on the embedded digits data
#   make test   set up, then run the test suite (what .ci/run calls)
#   make bench  set up, then reproduce BENCHMARKS.md (long; needs dataset-fashion-mnist)
#   make test-docs  run every command the docs show (tests/test_docs_run.py, slow tier included)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.kdens-installed
TORCH   = torch==2.13.0
# The tflite-runtime 2.14 cross-check of `kdens deploy --target tflite` (numpy<2, so its own
# venv). kdens looks for it here by default and never installs it while a command runs.
TFLITE_RT_VENV ?= $(HOME)/.cache/kdens/venv-tflite-runtime

.PHONY: setup demo test test-all test-docs bench clean

setup: $(STAMP)

# torch goes in first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[all]" $(TORCH)
	@# tflite-runtime has wheels for CPython 3.8-3.11 on Linux x86_64/aarch64 only: elsewhere
	@# the cross-check reports "not checked" and names this step.
	[ -x $(TFLITE_RT_VENV)/bin/python ] && $(TFLITE_RT_VENV)/bin/python -c "import tflite_runtime" 2>/dev/null || \
	  ( $(PYTHON) -m venv $(TFLITE_RT_VENV) && \
	    $(TFLITE_RT_VENV)/bin/python -m pip install --quiet tflite-runtime==2.14.0 "numpy<2" ) || \
	  echo "note: no tflite-runtime 2.14 for this platform; the tflite cross-check will say 'not checked'"
	touch $(STAMP)

# The main job on the embedded digits data: every stage from examples/digits.toml, then the report.
# One torch thread unless told otherwise: these models are tiny, and on a shared 2-core machine two
# threads were pathological (BENCHMARKS.md); README's demo time is measured this way.
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/kdens run examples/digits.toml --quiet
	@echo "open runs/digits/report.html (or runs/digits/report.md)"

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

# Every command README.md, docs/ and examples/ show, run as written (KDENS_EPOCHS_CAP=1; before a release).
test-docs: setup
	$(PY) -m pytest -q -m "slow or not slow" tests/test_docs_run.py

bench: setup
	$(PY) bench/place_mnist.py
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
