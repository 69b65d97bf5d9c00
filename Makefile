# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out
STUDY  ?= study_out

.PHONY: test lint demo study bench info clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check gpudiffim tests bench
	$(PY) -m pytest -q

# the demo preset in the note's three flavors and zogy over the same fakes, each flavor's diaSources
# associated into its own APDB with alerts, and the report comparing them
demo: $(STAMP)
	$(VENV)/bin/gpudiffim info
	$(VENV)/bin/gpudiffim simulate $(DEMO)/repo --preset demo --seed 0
	$(VENV)/bin/gpudiffim study $(DEMO)/repo -o $(DEMO)/study --inject-fakes 50 \
		--template-fakes 5 --alerts

# the HSC sprint's shape: 33 visits x 6 detectors of 2048 x 4176, four flavors, one Dask
# worker process per core (the in-process runner leaves cores idle while Python runs)
WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
study: $(STUDY)/repo/manifest.ecsv
	$(VENV)/bin/gpudiffim study $(STUDY)/repo -o $(STUDY)/study --inject-fakes 100 --compress \
		--template-fakes 10 --dask local:$(WORKERS)

# simulated once (5 min here): a rerun of `make study` resumes where it stopped
$(STUDY)/repo/manifest.ecsv: | $(STAMP)
	$(VENV)/bin/gpudiffim simulate $(STUDY)/repo --preset sprint --seed 0

bench: $(STAMP)
	$(PY) -m pytest bench -q -o python_files='bench_*.py' --benchmark-only \
		--benchmark-columns=min,median,max,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check gpudiffim tests bench

info: $(STAMP)
	$(VENV)/bin/gpudiffim info

clean:
	rm -rf $(VENV) $(DEMO) $(STUDY) .pytest_cache .benchmarks
