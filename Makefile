# Two commands for a fresh machine (each installs what it needs into .venv first):
#   make demo   upscale scikit-image's sample photos into ./isosr-demo/output
#   make test   lint (ruff), then run the test suite (what .ci/run runs)
# GPU users: install your CUDA build of torch into .venv first, or pass TORCH= to keep it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test install

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/isosr demo

test: $(VENV)/.installed
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .
	@# The report test opens report.html in a real headless browser: Debian's chromium.
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed: the browser test of report.html will be skipped"
	$(BIN)/python -m pytest -m "not autoscaling"
	@# The autoscaling test's fake cluster starts and stops with `ray stop --force`, which ends every
	@# Ray process on the machine: it runs in a pytest process of its own, after the others.
	$(BIN)/python -m pytest -m autoscaling
