# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

.PHONY: test lint demo bench info clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check gpudiffim tests bench
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/gpudiffim info
	$(VENV)/bin/gpudiffim simulate $(DEMO)/repo --preset demo --seed 0
	$(VENV)/bin/gpudiffim make-apdb sqlite:///$(DEMO)/apdb.db
	$(VENV)/bin/gpudiffim run $(DEMO)/repo -o $(DEMO)/run --flavor auto \
		--apdb sqlite:///$(DEMO)/apdb.db --alerts $(DEMO)/alerts

bench: $(STAMP)
	$(PY) -m pytest bench -q -o python_files='bench_*.py' --benchmark-only \
		--benchmark-columns=min,median,max,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check gpudiffim tests bench

info: $(STAMP)
	$(VENV)/bin/gpudiffim info

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .benchmarks
