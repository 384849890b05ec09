# The two commands of the README. Each installs what it needs first.
PYTHON ?= python3

.PHONY: setup run test test-fast bench

setup:
	bash scripts/setup.sh

run: setup
	$(PYTHON) -m pyvmm run

# CI runs at least 20,000 translator-vs-real-CPU sequences (issue 3).
BT_EXAMPLES ?= 20000

# One test process per core, at most 4: most of the suite's time is guest
# boots, each a single busy Python thread, so two cores halve the wall time.
# Whole files go to one process (loadfile): a module's shared guest stays one boot;
# in the order tests/conftest.py gives them (the boots first), not xdist's.
TEST_JOBS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; echo $$n)

test: setup
	PYVMM_BT_EXAMPLES=$(BT_EXAMPLES) $(PYTHON) -m pytest -q -ra --durations=15 -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" -x

bench: setup
	$(PYTHON) bench/exits.py
	$(PYTHON) bench/boot_first_line.py
