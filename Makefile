# The commands of README.md. Each creates .venv and installs everything on first use.
PY := .venv/bin/python
PYTEST_ARGS ?= -n 2
# JupyterLab refuses to run as root unless told (containers, CI machines).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: setup lab test
setup:
	@bash scripts/setup.sh

lab: setup
	$(PY) -m kfac_lab lab

test: setup
	bash scripts/test.sh $(PYTEST_ARGS)

# JupyterLab on the notebooks, served to this machine only (127.0.0.1) with a fresh token:
# it opens your browser, or prints the URL (token included) to paste into one. The file browser
# starts in notebooks/; the server's root is the repository, so links to docs/ open too.
.PHONY: notebooks
notebooks: setup
	$(PY) -m jupyterlab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=. \
	    --LabApp.default_url=/lab/tree/notebooks $(ALLOW_ROOT)

# Regenerate the README's screenshots (docs/screenshots/*.png) from the browser tests (dashboards
# and JupyterLab);
# a plain `make test` writes them to a temporary directory. CI=true: a missing chromium fails.
.PHONY: screenshots
screenshots: setup
	CI=true KFAC_LAB_SCREENSHOTS=docs/screenshots $(PY) -m pytest -n 0 -q -p no:cacheprovider tests/dashboards/test_browser.py tests/notebooks/test_jupyterlab.py
