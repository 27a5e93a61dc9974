# The two set-up commands of the README. Each installs what is missing, then does its job.
PYTHON ?= python3
export PYTHON

.PHONY: setup train test lint

setup:
	@bash tools/setup.sh

train: setup
	$(PYTHON) -m launch.train $(ARGS)

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

lint: setup
	$(PYTHON) -m ruff check .
