# Set-up on a fresh machine: `make demo` or `make test` create .venv and install from this repo.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-avx2 test-all lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,report]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf demo_run
	$(VENV)/bin/cryospin demo --out demo_run

test: $(STAMP)
	$(PY) -m pytest -q

# the kernels of an AVX2-only CPU (no native bf16) on any x86 machine
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# ruff, the import contracts of pyproject.toml ([tool.importlinter]: the layers
# core < forward < io < model < train | evaluate < workflows < report < cli), then mypy on src
# ([tool.mypy]; the versions pinned as in the dev extra)
lint: $(STAMP)
	$(PY) -m pip install --quiet 'ruff==0.17.6' 'import-linter==2.16' 'mypy==2.4.1'
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) demo_run
