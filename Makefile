# make demo — install everything and run the demo; make test — install everything and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench bench-quick study studies clean

install:
	bash scripts/install.sh

demo: install
	$(VENV)/bin/revive demo

# EasyEdit's GitHub tree (unpacked by the install from ../shared/vendor) is a second `easyeditor`: its tests run in
# a pytest session of their own, with EASYEDIT_SOURCE naming it.
test: install
	$(PY) -m pytest -q
	@tree=$$(ls -d $(VENV)/src/EasyEdit-* 2>/dev/null | tail -n 1); \
	if [ -n "$$tree" ]; then echo "EASYEDIT_SOURCE=$$tree $(PY) -m pytest -q tests/tree"; \
	  EASYEDIT_SOURCE="$$(cd "$$tree" && pwd)" $(PY) -m pytest -q tests/tree; \
	else echo "tests/tree skipped: no EasyEdit tree (../shared/vendor/EasyEdit-*.tar.gz) unpacked into $(VENV)/src"; fi

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

# Every study, one after another in this order (the issues' priorities: the length study's own τ and variants runs
# first, then the baselines and the lifelong-editing companions; studies share runs, e.g. the length study's MEMIT
# runs are the others' references): days on a CPU. Each sitting continues where the last one stopped; a study that
# is stopped (SIGTERM, Ctrl-C) ends the chain with its checkpoint saved.
STUDIES ?= length tau variants baselines superposition wilke
studies: install
	@for s in $(STUDIES); do echo "[make] revive study $$s"; $(VENV)/bin/revive study $$s || exit $$?; done

clean:
	rm -rf build *.egg-info .pytest_cache
