# The two set-up commands of README.md: `make demo` (main job) and `make test` (test suite).
# Each creates .venv and installs everything it needs on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test test-slow lint bench

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/codebook-features demo $(ARGS)

# Debian's Chromium for the browser test (installed only where it is missing).
browser:
	bash scripts/setup-browser.sh

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/snap.py --quick
