# The two commands of the README. Each installs what it needs first.
PYTHON ?= python3

.PHONY: setup run test test-fast bench

setup:
	bash scripts/setup.sh

run: setup
	$(PYTHON) -m pyvmm run

test: setup
	$(PYTHON) -m pytest -q -ra

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench: setup
	$(PYTHON) bench/exits.py
	$(PYTHON) bench/boot_first_line.py
