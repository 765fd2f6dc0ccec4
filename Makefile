# turnid: `make run` serves on the embedded SQLite store, `make test` runs the suite.
# Both set everything up themselves (a virtualenv in .venv) on a machine with Python 3.11+.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
STUBS_DIR := client

.PHONY: install run test lint proto proto-check bench clean node-install stubs-ts example-node breaking

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/turnid serve $(ARGS)

# The cross-language tests need Node.js and npm: `make test` installs the Node packages when npm is
# on PATH, and without it runs every other test (the cross-language ones skip, saying why; CI runs
# `make node-install` itself and fails rather than skips them).
NPM := $(shell command -v npm 2>/dev/null)

test: install $(if $(NPM),node-install)
	@$(if $(NPM),:,echo "make test: npm is not on PATH: the cross-language tests will be skipped")
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install node-install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint

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

# Prints one markdown table against a no-op grpc.aio baseline; raw figures go to bench/results/.
# About 6 minutes on 2 cores (--curve: about 1 more). BENCH_ARGS="--help" lists the knobs; PostgreSQL rows run when
# TURNID_BENCH_POSTGRES_DSN (or TURNID_TEST_POSTGRES_DSN) is set.
bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .proto-check .pytest_cache .mypy_cache .ruff_cache

# --- protos for other languages: buf, TypeScript stubs, the Node example (README "Other languages")
# buf, protoc-gen-es and the example's packages come from npm, pinned by package-lock.json.
NODE_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf
# The commit `make breaking` compares protos/ against (any git revision: a tag, a sha, ...).
BREAKING_AGAINST ?= HEAD~1

node-install: $(NODE_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

# TypeScript stubs (protobuf-es + service descriptors for Connect) in gen/ts; not committed.
stubs-ts: node-install
	$(BUF) generate

# Type-checks and compiles examples/node with the stubs into gen/node (run: see the example).
example-node: stubs-ts
	node_modules/.bin/tsc -p examples/node

# Fails when protos/ breaks wire or source compatibility (buf's FILE rules) with BREAKING_AGAINST.
# A shallow clone is deepened by one commit first; with no earlier commit (a one-commit history,
# or a clone that cannot be deepened) or no protos/ in it, the check says so and is skipped.
breaking: node-install
	@if [ "$$(git rev-parse --is-shallow-repository)" = true ] \
		&& ! git rev-parse -q --verify '$(BREAKING_AGAINST)^{commit}' >/dev/null; then \
		echo "breaking: shallow clone, fetching one more commit"; \
		git fetch --quiet --deepen=1 || true; \
	fi; \
	against=$$(git rev-parse -q --verify '$(BREAKING_AGAINST)^{commit}') || { \
		echo "breaking: SKIPPED: no commit $(BREAKING_AGAINST) in this clone (first commit, or history unavailable)"; \
		exit 0; }; \
	if ! git cat-file -e "$$against:protos" 2>/dev/null; then \
		echo "breaking: SKIPPED: $(BREAKING_AGAINST) ($$against) has no protos/"; exit 0; fi; \
	echo "breaking: protos/ against $(BREAKING_AGAINST) ($$against)"; \
	$(BUF) breaking protos --against ".git#ref=$$against,subdir=protos"
