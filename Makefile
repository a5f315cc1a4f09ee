# Two commands matter: `make demo` (a short training run on the embedded server) and `make test`.
# Both bootstrap .venv from nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint soak lab bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamtrain demo

test: $(STAMP) lint
	$(PY) -m pytest --nbmake tests notebooks

lint: $(STAMP)  # style of the package, its tests and benchmarks, types of the package: part of `make test`, so CI fails on a regression
	$(PY) -m ruff check streamtrain tests benchmarks
	$(PY) -m mypy

soak: $(STAMP)
	STREAMTRAIN_SOAK=1 $(PY) -m pytest --nbmake tests notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)  # root: containers

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis data
