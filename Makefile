# Two entry points: `make run` (the embedded demo) and `make test`.
# Both self-install: Debian packages where missing, a .venv, pip packages,
# the generated gRPC code and the compiled page operations (pgformat._native,
# built by pip from setup.py into libs/pgformat/, never committed).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PGBIN := /usr/lib/postgresql/15/bin
GEN := build/gen
PROTOS := $(wildcard protos/zproto/*.proto)
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow test-all bench proto clean lint

install: $(STAMP)

$(STAMP): pyproject.toml setup.py libs/pgformat/_native.c $(PROTOS) scripts/install-system-deps.sh
	PYTHON=$(PYTHON) bash scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet "grpcio-tools>=1.60"
	$(MAKE) proto
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

# Generated code lives under build/gen and is never edited or committed.
proto:
	rm -rf $(GEN)/zproto
	mkdir -p $(GEN)/zproto
	touch $(GEN)/zproto/__init__.py
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --pyi_out=$(GEN) \
		--grpc_python_out=$(GEN) $(PROTOS)

run: install
	$(VENV)/bin/zctl demo

test: install
	$(VENV)/bin/pytest -q

test-slow: install
	$(VENV)/bin/pytest -q --runslow

bench: install
	$(PY) bench/wal_decode.py

clean:
	rm -rf $(VENV) build .pytest_cache libs/pgformat/_native.*.so
