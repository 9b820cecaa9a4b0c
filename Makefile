# Everything goes through a project-local virtual environment so that a fresh clone needs nothing
# but Python 3.11. torch is installed first from its pinned CPU wheel: a bare `torch` requirement
# could otherwise pull a multi-GB CUDA build.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: env check test demo bench bench-preprocess gpu-check rehearse clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[render,test,datasets]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

# The fast tier for every edit: everything that starts no Ray, Blender or server process and is not slow
# (tests/conftest.py fails a test that starts one of those without its marker).
check: env
	@start=$$(date +%s); \
	$(BIN)/python -m pytest tests -m "not slow and not ray and not blender and not server"; rc=$$?; \
	echo "fast tier wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

test: env
	@bash infra/ci/install-system-deps.sh --if-permitted || echo "warning: system packages not installed (see above)"
	@start=$$(date +%s); \
	$(BIN)/python -m pytest tests; rc=$$?; \
	echo "test suite wall time: $$(( $$(date +%s) - start )) s"; exit $$rc

demo: env
	$(BIN)/python jobs/demo.py

bench: env
	$(BIN)/python -m mdt.bench.models

bench-preprocess: env
	$(BIN)/python -m pipelines.preprocess.bench

# One CUDA GPU, <= 8 min: backend parity, fp16/bf16 errors, chain latency, one training step per trellis preset
# (without CUDA: the CPU self-test on tiny models). Report: outputs/gpu-check/gpu_check.{json,md}
gpu-check: env
	$(BIN)/python -m mdt.bench.gpu_check

# The shipped trellis* presets end to end at full size on this machine's CPUs (about 90 min; peak RSS < 22 GB).
# Report: outputs/rehearse/report.{json,md}
rehearse: env
	$(BIN)/python -m pipelines.rehearse

clean:
	rm -rf $(VENV) .pytest_cache
