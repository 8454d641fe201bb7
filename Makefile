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

# The main job on the embedded digits data: teacher -> distilled student -> int8 ONNX + TFLite -> bench.
KD = $(VENV)/bin/kdens
demo: setup
	$(KD) train-generalist --data digits --model mlp --model-arg hidden=256 --epochs 30 --batch-size 32 \
	    --out runs/digits/generalist --force --quiet
	$(KD) distill --teacher runs/digits/generalist --model mlp --model-arg hidden=32 --temperature 4 --alpha 0.3 \
	    --epochs 40 --batch-size 32 --out runs/digits/student --force --quiet
	$(KD) deploy --model runs/digits/student --target onnx --quantize int8 --threads 1 --max-accuracy-drop 1 \
	    --out runs/digits/deploy
	$(KD) deploy --model runs/digits/student --target tflite --quantize int8 --threads 1 --max-accuracy-drop 1 \
	    --out runs/digits/deploy
	$(KD) bench runs/digits/deploy --threads 1 --batch-sizes 1,32

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .venv-tflite runs .pytest_cache
