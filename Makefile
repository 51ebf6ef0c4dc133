# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch by default; users with GPUs pass their own, e.g. TORCH=torch,
# or keep the torch already installed in the environment (it is never replaced).
TORCH  ?= torch==2.13.0

.PHONY: install run test test-slow lint bench train clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m pipeline $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

lint: install
	$(PY) -m ruff check pipeline tests benchmarks
	$(PY) -m ruff format --check pipeline tests benchmarks

bench: install
	$(PY) benchmarks/compare_methods.py $(ARGS)

train: install
	$(PY) -m pipeline.train

clean:
	rm -rf $(VENV) outputs .pytest_cache
