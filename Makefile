# make run | make test | make check | make sync | make bench | make test-oldest   (README.md explains each)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CHECK  := build/check

.PHONY: setup run test test-oldest check sync sync-check bench clean

# `setup` always (re)installs; the other targets only need the venv to exist.
setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt

$(PY):
	$(MAKE) setup

run: $(PY)
	$(PY) hw2.py

test: $(PY)
	$(PY) -m pytest -q tests

# The suite on the oldest torch requirements.txt admits (Kaggle runs the notebook on its own
# preinstalled torch): a venv of its own on Python 3.11 (2.3.1 has no wheel for 3.13), 3.3 GB of
# CUDA wheels from PyPI; the suite took 16 min on 2 cores (2026-11-30), 8.3 min after the suite
# was cut (2026-12-02).
# VENV= carries over to the notebook test's own `make check`, which so runs on 2.3.1 too.
OLDEST := .venv-oldest
PYTHON_OLDEST ?= python3.11
test-oldest:
	$(PYTHON_OLDEST) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet torch==2.3.1 torchvision==0.18.1 "numpy<2" -r requirements.txt
	$(MAKE) test VENV=$(OLDEST)

# Execute the notebook headlessly (smoke preset) into a git-ignored copy; every HW2_* variable
# of the caller's shell is cleared first, so only the settings below apply.
check: $(PY)
	rm -rf $(CHECK) && mkdir -p $(CHECK)
	cp hw2.ipynb $(CHECK)/hw2.ipynb
	cd $(CHECK) && unset $$(env | grep -o '^HW2_[A-Za-z0-9_]*=' | tr -d =); \
		HW2_PRESET=smoke HW2_OUTPUT_DIR=out HW2_DATA_DIR= \
		../../$(VENV)/bin/jupyter execute --inplace --timeout=900 hw2.ipynb
	@ls $(CHECK)/out/submission.csv $(CHECK)/out/answers.json $(CHECK)/out/metrics.json

# Pair hw2.py <-> hw2.ipynb (the newer one wins), then prove they agree.
sync: $(PY)
	$(VENV)/bin/jupytext --sync hw2.py
	$(MAKE) sync-check

sync-check: $(PY)
	$(VENV)/bin/jupytext --to py:percent -o - hw2.ipynb | diff -u hw2.py - && echo "hw2.py == hw2.ipynb"

# Accuracy/time per preset on a validation split; appends to BENCHMARKS.md.
bench: $(PY)
	$(PY) tools/bench.py --preset quick

clean:
	rm -rf build outputs
