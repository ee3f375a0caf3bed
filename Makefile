# Two entry points, each creating .venv and installing what it needs:
#   make demo   - the seed's order flow on the embedded SQLite default
#   make test   - lint, type-check and the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint typecheck pytest bench clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.base
	$(PIP) -e '.[dev,redis,nats,amqp,postgres]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/interplay demo

test: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests examples benchmarks

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

pytest: $(VENV)/.dev
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(PIP) -e '.[bench]'
	$(PY) benchmarks/choreography.py
	$(PY) benchmarks/orchestration.py
	$(PY) benchmarks/brokers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
