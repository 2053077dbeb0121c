# Set-up on a fresh machine: `make run` (the main job on its offline default) and `make test`.
# Both create .venv on first use. Torch: the CPU wheel torch==2.13.0 is installed first unless the
# venv already has a torch (install your own GPU build into .venv first, or set TORCH_SPEC).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.alignscope-installed

.PHONY: venv run demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,zoo]"
	touch $(STAMP)

run: venv
	$(VENV)/bin/alignscope-train

demo: venv
	$(VENV)/bin/alignscope-demo

test: venv
	$(PY) -m pytest -q -n 2

lint: venv
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

bench: venv
	$(PY) scripts/bench_engine.py
	$(PY) scripts/bench_jacobian.py --smollm2 --large 64
	$(PY) scripts/bench_randomized_defaults.py
	$(PY) scripts/bench_auto_engine.py
	$(PY) scripts/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
