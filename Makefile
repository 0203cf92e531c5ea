# Inferswarm: `make run` (the demo) and `make test` (the whole suite) work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export INFERSWARM_PASSPHRASE ?= inferswarm-demo

.PHONY: install run test bench clean netns-tools chain-tools contracts

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. One line per step, and while pip works
# (minutes on a fresh machine: torch alone is large) a line every 15 s saying how far it got; pip's
# own output goes to $(VENV)/install.log and is shown only when it fails.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	@test -x $(PY) || { echo "creating the virtual environment $(VENV)…"; $(PYTHON) -m venv $(VENV); }
	@echo "installing dependencies into $(VENV) (a few minutes on a fresh machine, once)…"
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --disable-pip-version-check --progress-bar off -e '.[test,inference]' 'torch==2.13.0' \
		> $(VENV)/install.log 2>&1 & pid=$$!; t=0; \
	trap 'kill $$pid 2>/dev/null; echo " stopped: run make again to finish the install"; exit 130' INT TERM; \
	while kill -0 $$pid 2>/dev/null; do \
		sleep 1; t=$$((t + 1)); \
		if [ $$((t % 15)) -eq 0 ]; then \
			if grep -q '^Installing collected packages' $(VENV)/install.log; then \
				echo "  … $$t s: unpacking the packages into $(VENV)"; \
			else \
				echo "  … $$t s: $$(grep -c '^Collecting' $(VENV)/install.log) packages fetched"; \
			fi; \
		fi; \
	done; \
	if ! wait $$pid; then \
		tail -n 25 $(VENV)/install.log; echo "installing the dependencies failed (the whole log: $(VENV)/install.log)"; exit 1; \
	fi
	@touch $(STAMP)
	@echo "✓ dependencies installed"

# The main job: a local market on loopback (escrow agent, three providers, a consumer), a paid
# chat, its receipts and balances; then the consumer's OpenAI-compatible API until Ctrl-C.
run: install
	@$(VENV)/bin/node demo --home .demo

# The multi-host tests (tests/netns) build networks of namespaces with `ip` and `iptables`; as root
# on Debian/Ubuntu, missing ones are installed here. Elsewhere (not root, no apt-get) they skip,
# saying why.
test: install netns-tools chain-tools
	$(PY) -m pytest -q

# The JSON-RPC integration test (tests/wallet/test_chain_jsonrpc.py) also runs the contracts on
# ganache, an EVM of its own, from the npm registry into $(VENV)/npm (once); without npm it skips,
# saying why.
GANACHE := $(VENV)/npm/node_modules/ganache
chain-tools:
	@if [ ! -d $(GANACHE) ] && command -v npm >/dev/null 2>&1; then \
		echo "installing ganache (npm) for the JSON-RPC chain test…"; \
		npm install --prefix $(VENV)/npm --no-audit --no-fund --silent ganache@7.9.2 > $(VENV)/npm.log 2>&1 \
			|| echo "  could not install it (see $(VENV)/npm.log): that test will run on the devnet only"; \
	fi

netns-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
			! { command -v iptables && command -v ip; } >/dev/null 2>&1; then \
		echo "installing iproute2 and iptables for the multi-host tests…"; \
		{ apt-get install -y -q iproute2 iptables || { apt-get update -q && apt-get install -y -q iproute2 iptables; }; } \
			> $(VENV)/apt.log 2>&1 || echo "  could not install them (see $(VENV)/apt.log): the namespace tests will skip"; \
	fi

# After editing wallet/chain/contracts/*.vy: recompile with the pinned vyper and rewrite the
# checked-in ABI and bytecode (tests/wallet/test_chain_artifacts.py fails until this is run).
contracts: install
	@$(PY) -c 'from wallet.chain import write_artifacts; print(*write_artifacts(), sep="\n")'

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis
