# Inferswarm: `make run` (the demo) and `make test` (the whole suite) work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export INFERSWARM_PASSPHRASE ?= inferswarm-demo

.PHONY: install run test bench clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,inference]' 'torch==2.13.0'
	touch $(STAMP)

# The main job: a local market on loopback (escrow agent, three providers, a consumer), a paid
# chat, its receipts and balances; then the consumer's OpenAI-compatible API until Ctrl-C.
run: install
	$(VENV)/bin/node demo --home .demo

test: install
	$(PY) -m pytest -q

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis
