# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medtl-installed
DEMO_DIR ?= demo_run

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-cache-dir -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medtl demo --out $(DEMO_DIR)

test: $(STAMP)
	bash scripts/system_deps.sh
	$(PY) -m pytest -q -ra --timeout=900 --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff format --check medtl tests benchmarks
	$(VENV)/bin/ruff check medtl tests benchmarks
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format medtl tests benchmarks
	$(VENV)/bin/ruff check --fix medtl tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/loading.py
	$(PY) benchmarks/feature_extraction.py
	$(PY) benchmarks/engine_throughput.py
	$(PY) benchmarks/evaluation_honesty.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs mlruns mlflow.db .pytest_cache
