# The two set-up commands of the README. Each installs what is missing, then does its job.
PYTHON ?= python3
export PYTHON

.PHONY: setup train test lint

setup:
	@bash tools/setup.sh

# time_limit_s keeps the quick start inside 5 minutes on a slow or busy machine: the loop then
# stops early with a final eval, checkpoint and summary (status "time_limit").
train: setup
	$(PYTHON) -m launch.train time_limit_s=240 $(ARGS)

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

lint: setup
	$(PYTHON) -m ruff check .
