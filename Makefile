# Conveniences; the README's two commands are the plain-shell equivalents of `make demo` and `make test`.
PY ?= python3
BIN = .venv/bin

.PHONY: setup demo test lint bench
setup:
	$(PY) -m venv .venv && $(BIN)/pip install -q -e ".[dev]"
demo: setup
	$(BIN)/gmpq search --recipe recipes/quickstart.yaml
test: setup
	$(BIN)/pytest -q
lint:
	$(BIN)/ruff check gmpq detr_ptq tests benchmarks
bench:
	$(BIN)/python benchmarks/bench_all.py
