# The two commands of the README. Both install what they need first (reusing an existing torch).
PY ?= python3

.PHONY: demo test setup setup-dev

setup:
	PYTHON=$(PY) bash scripts/bootstrap.sh

setup-dev:
	PYTHON=$(PY) bash scripts/bootstrap.sh dev

demo: setup
	$(PY) -m latentmoe demo

test: setup-dev
	$(PY) -m pytest
