# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch by default; users with GPUs pass their own, e.g. TORCH=torch,
# or keep the torch already installed in the environment (it is never replaced).
TORCH  ?= torch==2.13.0

.PHONY: install run test test-slow test-gpu lint bench train wheels clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	if $(PY) -c "import sys, torch; sys.exit(not torch.__version__.startswith('2.13.'))"; \
	then $(PY) -m pip install -q -e ".[models,atoms]"; \
	else echo "torchvision/timm/hessQuik/mace/torchani not installed (pinned for torch 2.13): their tests skip"; fi
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m pipeline $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(ARGS)

lint: install
	$(PY) -m ruff check pipeline tests benchmarks
	$(PY) -m ruff format --check pipeline tests benchmarks

bench: install
	$(PY) benchmarks/compare_methods.py $(ARGS)

train: install
	$(PY) -m pipeline.inputs.train

# Wheels of what a bare GPU image (python 3.12, torch, h5py, numpy) lacks, for
# benchmarks/gpu_check.sh on a machine without network: carried there in .whl/. Dask as
# pinned by rapids-dask-dependency (what dask-cuda 26.10 expects).
GPU_WHEELS = hydra-core==1.3.8 omegaconf==2.3.1 dask==2026.7.1 distributed==2026.7.1 \
	partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0 tornado==6.6.1 dask-cuda==26.10.0 \
	rapids-dask-dependency==26.10.0
wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		-d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) outputs .pytest_cache
