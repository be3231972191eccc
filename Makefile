# breakfix - the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench schema clean venv system-deps proto checkov image image-base vendor native FORCE

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The correlator's grouping core compiled to C with mypyc (tools/build_native.py; gcc and the Python headers).
# Rebuilt when a core source changes; until then an edited source runs as Python (breakfix/correlator/__init__.py).
# The script checks the stamp itself (sources, rules, schemas, this Python) and builds only when it differs.
NATIVE_STAMP := breakfix/correlator/_native/STAMP
$(NATIVE_STAMP): $(STAMP) FORCE
	$(BIN)/python tools/build_native.py
native: $(NATIVE_STAMP)
FORCE:

demo: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/breakfix demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy breakfix benchmarks
	$(BIN)/lint-imports

# Real components the tests start themselves (Debian packages; this runs as root in CI).
# prometheus (+promtool), prometheus-alertmanager, chromium (console browser tests), buildah (image build).
SYSTEM_PKGS := prometheus prometheus-alertmanager chromium buildah
system-deps:
	@missing=""; for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

# checkov pins many dependencies of its own: it lives in its own venv (tests/test_manifests.py runs it).
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
$(CHECKOV_STAMP):
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet 'checkov>=3.2,<4'
	@touch $(CHECKOV_STAMP)
checkov: $(CHECKOV_STAMP)

# The container image (Dockerfile), built daemonless with Debian's buildah: chroot isolation, vfs
# storage under .buildah/ (no registry is needed: `make image-base` makes the Debian base offline).
IMAGE ?= localhost/breakfix:dev
BASE_IMAGE ?= localhost/debian-min:bookworm
image-base:
	deploy/image/debian-base.sh
image:
	deploy/image/build.sh $(IMAGE) $(BASE_IMAGE)

test: $(STAMP) $(NATIVE_STAMP) system-deps $(CHECKOV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy breakfix benchmarks
	$(BIN)/lint-imports
	$(BIN)/breakfix schema check
	$(BIN)/pytest -q -rs

bench: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/python -m benchmarks.run

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. breakfix/collectors/podresources/api.proto

# The console's JS, from the npm registry (never a CDN at run time); version and sha256 in VENDORED.md.
HTMX_VERSION := 2.0.11
HTMX_SHA256 := d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717
vendor:
	@tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent htmx.org@$(HTMX_VERSION) >/dev/null && tar xzf htmx.org-*.tgz && \
	  echo "$(HTMX_SHA256)  package/dist/htmx.min.js" | sha256sum -c --quiet && \
	  cp package/dist/htmx.min.js $(CURDIR)/breakfix/console/static/htmx.min.js && rm -rf $$tmp && \
	  echo "vendored htmx.org $(HTMX_VERSION) into breakfix/console/static/"

schema: $(STAMP)
	$(BIN)/breakfix schema export

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info breakfix/correlator/_native
