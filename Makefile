# The two commands of the README:  `make book` (the book at the default smoke scale) and `make test`.
# Each creates its own virtual environment on first use and installs what it needs.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
SCALE  ?= smoke

.PHONY: book book-stored offline-bundle test test-fast browser steer corpora clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch; on a CUDA machine install a CUDA build of the same version first (README)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[book,test]"
	touch $@

## the main job: train at SCALE, execute every chapter with papermill, build _build/html
book: $(VENV)/.installed corpora
	$(PY) -m reflow_core book --scale $(SCALE)

## rebuild the HTML from the stored results of SCALE, without retraining; FROM=<OUT_DIR of offline/run.sh> first
## restores results/<scale> from the files a GPU host packed (their scale is the one they were run at)
book-stored: $(VENV)/.installed
ifdef FROM
	$(PY) -m reflow_core offline unpack "$(FROM)" --build
else
	$(PY) -m reflow_core book --scale $(SCALE) --no-execute
endif

## offline/ (≤ 36 MiB, git-ignored) for one command on an offline GPU host: wheels for BUNDLE_PYTHON (the host's
## Python: 3.12 for the common CUDA images), the `small` corpus as xz token shards, run.sh (README: "Running on an
## offline GPU machine")
BUNDLE_PYTHON ?= $(shell for p in $$(command -v python3.12) $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
                   "$$p" -c "" 2>/dev/null && { echo "$$p"; break; }; done)
offline-bundle: $(VENV)/.installed corpora
	@test -n "$(BUNDLE_PYTHON)" || { echo "offline-bundle: no python3.12 found; set BUNDLE_PYTHON=/path/to/python3.12"; exit 2; }
	$(PY) -m reflow_core offline build --scale small --python "$(BUNDLE_PYTHON)" --out offline

## the tests: unit tests, then every notebook at scale=test, the book build and a headless browser
test: $(VENV)/.installed browser
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

## Debian's chromium (and its chromedriver, for the Selenium tests) for the browser checks of the built book
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

## the live steering panel for any prompt (Voilà) on 127.0.0.1: SCALE's trained reflow model (the test model, trained
## in seconds, when SCALE has none yet); PORT=0 picks a free port; it prints the address, Ctrl-C stops it
PORT ?= 0
steer: $(VENV)/.installed
	$(PY) -m reflow_core steer --scale $(SCALE) --port $(PORT)

## the Debian text packages that smoke-mix and small-mix read (reflow_core/data.py): ~109 MB of .debs, ~25 s on a
## 2-core bookworm machine with a warm apt list, nothing done when all are installed. dict-gcide pulls in dictd (a
## dictionary server), r-cran-janeaustenr pulls in r-base-core (R is never run: the novels are read from the package's
## data file), libsword-utils brings mod2imp, which exports the SWORD modules as text.
CORPORA_DEBS := dict-gcide wordnet-base fortunes sword-comm-tdavid sword-comm-mhcc sword-text-web libsword-utils \
                r-cran-janeaustenr linux-doc-6.1
corpora:
	@command -v apt-get >/dev/null 2>&1 || { echo "note: no apt-get: the mixes will skip the Debian corpora"; exit 0; }; \
	n=$$(dpkg-query -W -f='$${Status}\n' $(CORPORA_DEBS) 2>/dev/null | grep -c ' installed$$'); \
	[ "$$n" = "$(words $(CORPORA_DEBS))" ] || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CORPORA_DEBS); }

clean:
	rm -rf _build results/test
