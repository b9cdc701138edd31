# The README's two commands: `make demo` runs the demo federation, `make test` runs the tests.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: install demo test check bench

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -e ".[dev]"

install: .venv/bin/python

demo: install
	.venv/bin/jigsaw demo --out demo-out

test: install
	.venv/bin/python -m pytest -q

check: install
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
