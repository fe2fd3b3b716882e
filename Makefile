# Two entry points: `make serve` runs the service, `make test` runs the tests.
# Both create or refresh the virtualenv first (re-installed when a pyproject.toml changes): the service with its
# dev tools, and the client SDK (clients/python, its own distribution) that the client tests use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv serve test lint bench-distill bench-quality bench-quality-quick clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./clients/python
	touch $@

serve: venv
	$(VENV)/bin/fd2 serve

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-distill: venv
	$(PY) bench/distill_step.py

bench-quality: venv
	$(PY) bench/quality.py

bench-quality-quick: venv
	$(PY) bench/quality.py --quick

clean:
	rm -rf $(VENV) .fd2 .pytest_cache .ruff_cache
