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

# Regenerate the README's dashboard screenshots (docs/screenshots/*.png) from the browser tests;
# a plain `make test` writes them to a temporary directory. CI=true: a missing chromium fails.
.PHONY: screenshots
screenshots: setup
	CI=true KFAC_LAB_SCREENSHOTS=docs/screenshots $(PY) -m pytest -n 0 -q -p no:cacheprovider tests/dashboards/test_browser.py
