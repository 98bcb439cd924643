# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medfm demo --out outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/pytest

# everything but the slow, multi-process and real-data tests (markers set in tests/conftest.py)
test-fast: lint
	$(BIN)/pytest -m "not slow and not ddp and not real_data"

bench: $(STAMP)
	$(BIN)/python benchmarks/import_time.py
	$(BIN)/python benchmarks/extract_speed.py
	$(BIN)/python benchmarks/extract_devices.py
	$(BIN)/python benchmarks/dicom_region.py
	$(BIN)/python benchmarks/probe_real.py
	$(BIN)/python benchmarks/pretrain_throughput.py
	$(BIN)/python benchmarks/ssl_real.py
	$(BIN)/python benchmarks/finetune_real.py
	$(BIN)/python benchmarks/extract2d_speed.py
	$(BIN)/python benchmarks/detect_real.py
	$(BIN)/python benchmarks/segment_real.py
	$(BIN)/python benchmarks/analyze_real.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
