# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test check lint types bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Set everything up, migrate, and serve the reference service on SQLite at 127.0.0.1:$${PORT:-8000}.
demo: $(STAMP)
	CHARTER_ENV=development $(BIN)/charter demo --port $${PORT:-8000}

## Set everything up and run the whole test suite (PostgreSQL/Redis tests skip with a reason if absent; under CI=true they must run).
test: $(STAMP)
	$(BIN)/python -m pytest --cov=charter --cov-branch --cov-report=term:skip-covered --cov-fail-under=$${COV_FLOOR:-85} -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

types: $(STAMP)
	$(BIN)/mypy

check: lint types test

bench-quick: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage charter-demo.db*
