# turnid: `make run` serves on the embedded SQLite store, `make test` runs the suite.
# Both set everything up themselves (a virtualenv in .venv) on a machine with Python 3.11+.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
STUBS_DIR := client

.PHONY: install run test lint proto proto-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/turnid serve $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerates the committed Python stubs (messages, .pyi, gRPC) from protos/.
proto: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(STUBS_DIR) --pyi_out=$(STUBS_DIR) \
		--grpc_python_out=$(STUBS_DIR) $(PROTOS)

# Fails when the committed stubs differ from what `make proto` would write.
proto-check: install
	rm -rf .proto-check && mkdir -p .proto-check
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=.proto-check --pyi_out=.proto-check \
		--grpc_python_out=.proto-check $(PROTOS)
	diff -r .proto-check/turnid/v1 $(STUBS_DIR)/turnid/v1 -x __pycache__ -x __init__.py \
		|| (echo "stubs are stale: run 'make proto' and commit" >&2; rm -rf .proto-check; exit 1)
	rm -rf .proto-check

clean:
	rm -rf $(VENV) .proto-check .pytest_cache .mypy_cache .ruff_cache
