# make demo — install everything and run the demo; make test — install everything and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench bench-quick study clean

install:
	bash scripts/install.sh

demo: install
	$(VENV)/bin/revive demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	cd benchmarks && $(abspath $(PY)) run_all.py

bench-quick: install
	cd benchmarks && $(abspath $(PY)) run_all.py --quick

# The length study (eval/studies/length.yaml, ../shared/data beside the project): hours on a CPU; run it again
# after a stop and it continues where it stopped.
study: install
	$(VENV)/bin/revive study length

clean:
	rm -rf build *.egg-info .pytest_cache
