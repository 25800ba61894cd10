# Two commands do all set-up on a fresh machine:
#   make book   — install, run every chapter on the demo profile, build _build/html
#   make test   — install if needed, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
INSTALLED := $(VENV)/.installed
# extras installed with the package: the test tools by default; `make book EXTRAS=` installs
# only what the book needs (the publishing workflow does)
EXTRAS ?= [dev]

# The embedded default needs no network: never reach the Hugging Face hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: book chapters html test test-slow bench clean install lab cluster cluster-stop

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.$(EXTRAS)'
	touch $@

chapters: $(INSTALLED)
	$(PY) -m gradbrain.book run --profile $(PROFILE) --quiet

html: $(INSTALLED)
	$(VENV)/bin/jupyter-book build . -W --keep-going

book: chapters html

# one pytest-xdist worker per core; a test file stays on one worker (its module fixtures,
# e.g. the tiny book build, are computed once); files go out in the order tests/conftest.py
# sets (long ones first), not sorted by their number of tests; the library's docstring
# examples run too (--doctest-modules)
test: $(INSTALLED)
	$(PY) -m pytest -m "not slow" -n auto --dist loadfile --no-loadscope-reorder \
		--doctest-modules tests lib/gradbrain

test-slow: $(INSTALLED)
	$(PY) -m pytest -m slow

bench: $(INSTALLED)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# a single-node Slurm cluster on this machine (root; installs slurm-wlm + munge with apt
# if missing) for the sweep's slurm executor and its tests: see README, "Sweeps"
cluster:
	scripts/local-slurm.sh start

cluster-stop:
	scripts/local-slurm.sh stop

lab: $(INSTALLED)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf _build executed
