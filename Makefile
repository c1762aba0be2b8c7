# The two commands of the README:  `make book` (the book at the default smoke scale) and `make test`.
# Each creates its own virtual environment on first use and installs what it needs.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
SCALE  ?= smoke

.PHONY: book book-stored test test-fast browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch; on a CUDA machine install a CUDA build of the same version first (README)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[book,test]"
	touch $@

## the main job: train at SCALE, execute every chapter with papermill, build _build/html
book: $(VENV)/.installed
	$(PY) -m reflow_core book --scale $(SCALE)

## rebuild the HTML from the stored results of SCALE, without retraining
book-stored: $(VENV)/.installed
	$(PY) -m reflow_core book --scale $(SCALE) --no-execute

## the tests: unit tests, then every notebook at scale=test, the book build and a headless browser
test: $(VENV)/.installed browser
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

## Debian's chromium for the browser checks of the built book
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends chromium; fi; }

clean:
	rm -rf _build results/test
