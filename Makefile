# Verbs a newcomer needs. Everything runs from the project's own .venv.
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes: most tests wait on servers and worker processes, so one per core halves the
# wall time; each runs its own throwaway PostgreSQL, Redis and fakes (PYTEST_JOBS=0: none).
PYTEST_JOBS ?= 2
PYTEST    := $(PY) -m pytest $(if $(filter 0,$(PYTEST_JOBS)),,-n $(PYTEST_JOBS) --dist loadfile)

.PHONY: install test test-fast lint demo bench up down clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev extra

test: $(STAMP) ## run the whole suite against throwaway PostgreSQL, Redis and a fake Ollama
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(STAMP) ## the suite less its `slow` tests (own worker processes, large catalogs)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: $(STAMP) ## embedded PostgreSQL + Redis + worker + Flower, sample catalog, live backfill (ONCE=1 exits after it)
	$(PY) -m devstack.demo $(if $(ONCE),--once,)

bench: $(STAMP) ## every bench at small sizes (~10-15 min), bench/results/*.json and a chart (see bench/README.md)
	$(PY) -m bench

up: ## the real stack: PostgreSQL, Redis, Ollama, worker, beat, Flower
	docker compose up -d --build

down:
	docker compose down

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
