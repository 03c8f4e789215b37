# The two commands of README.md. Both create .venv and install everything on first use.
PY := .venv/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: setup lab test
setup:
	@bash scripts/setup.sh

lab: setup
	$(PY) -m kfac_lab lab

test: setup
	bash scripts/test.sh $(PYTEST_ARGS)
