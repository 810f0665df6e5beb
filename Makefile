# Two commands: `make run` (set up + serve on embedded defaults) and `make test` (set up + the whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=
PYTEST_ARGS ?=
# The suite runs in this many processes (pytest-xdist), a test module to a process so its fixtures are built once.
# Half of a serial run was spent waiting on the servers, databases and workers the tests start; two processes keep
# both cores busy.
TEST_PROCESSES ?= 2

.PHONY: install install-test run test lint bench clean

# `make run` is a single node: the API plus in-process workers, so the base package and the worker extra
# (pyproject.toml says which extra each role needs). The stamps are touched only once the imports work.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e '.[worker]' 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q --no-deps 'spandrel>=0.4,<0.5' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import darkroom, torch, diffusers; from darkroom.engines.upscalers import import_spandrel; import_spandrel()" && touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import pytest, hypothesis, psycopg, boto3, c2pa" && touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/darkroom serve $(ARGS)

# The wall time of the whole target (services, ruff, mypy, pytest) is printed at the end, pass or fail: the budget is
# 15 minutes on a quiet 2-core machine (pytest's own last line gives the suite's share).
test: install-test
	@start=$$(date +%s); \
	bash scripts/test-services.sh && \
	$(VENV)/bin/ruff check . && \
	$(PY) -m mypy && \
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS); \
	rc=$$?; elapsed=$$(( $$(date +%s) - start )); \
	echo "make test: $$(( elapsed / 60 ))m $$(( elapsed % 60 ))s wall (services, ruff, mypy, pytest), exit $$rc"; \
	exit $$rc

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
