# breakfix - the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench schema clean venv system-deps proto

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/breakfix demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy schemas correlator remediator bus collectors breakfix benchmarks
	$(BIN)/lint-imports

# Real components the tests start themselves (Debian packages; this runs as root in CI).
system-deps:
	@command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/mypy schemas correlator remediator bus collectors breakfix benchmarks
	$(BIN)/lint-imports
	$(BIN)/breakfix schema check
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. collectors/podresources/api.proto

schema: $(STAMP)
	$(BIN)/breakfix schema export

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
