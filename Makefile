# The two commands of the README. Each installs what it needs first.
PYTHON ?= python3

.PHONY: setup run test test-fast bench

setup:
	bash scripts/setup.sh

run: setup
	$(PYTHON) -m pyvmm run

# CI runs at least 20,000 translator-vs-real-CPU sequences (issue 3).
BT_EXAMPLES ?= 20000

test: setup
	PYVMM_BT_EXAMPLES=$(BT_EXAMPLES) $(PYTHON) -m pytest -q -ra --durations=15

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" -x

bench: setup
	$(PYTHON) bench/exits.py
	$(PYTHON) bench/boot_first_line.py
