# chatstate: `make run` serves the bot locally, `make test` runs every test.
# Python 3.13: `python3.13` on PATH if it runs (a pyenv shim with no version selected does not),
# else an installed pyenv 3.13, else the usual install places. `make PYTHON=/path/to/python3.13` wins.
PYTHON ?= $(shell for p in python3.13 $$HOME/.pyenv/versions/3.13*/bin/python3.13 /usr/local/bin/python3.13 \
	/usr/bin/python3.13; do "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1 \
	&& { echo "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
DEV_HOST := $(addprefix devtools/,host.py functions_host.py worker.py rpc.py routes.py http_exchange.py timers.py ncrontab.py queues.py azurite.py)

.PHONY: help deps python-version run chat playground test unit pytest lint infra-check bench clean teams-package torture usage

help:
	@echo "make run         serve the bot on http://127.0.0.1:$${PORT:-7071}/api/messages (Azurite + offline model by default)"
	@echo "make run MCP=demo  the same, with the demo MCP server's tools (devtools/mcp_server.py)"
	@echo "make chat        chat with the running bot from this terminal, as Teams shows it (INLINE=1: inline replies)"
	@echo "make playground  open the Microsoft 365 Agents Playground against the running bot"
	@echo "make test        lint, template checks and every test (starts its own Azurite)"
	@echo "make unit        the unit tier alone (no I/O; about a second)"
	@echo "make teams-package  the Teams app package appPackage/build/chatstate.zip (needs CLIENT_ID; COPILOT=off: not a Copilot agent)"
	@echo "make bench       store and webhook benchmarks; figures go to benchmarks/results.json"
	@echo "make torture     the randomized concurrency test (SEED=…, ROUNDS=… or DURATION=… seconds, KINDS=…)"
	@echo "make usage       tokens and turns by tenant (LEVEL=user: by user) over DAYS=30; CSV=file.csv for chargeback"

deps: python-version $(VENV)/.installed node_modules/.installed

# Before anything installs: PYTHON must be a Python 3.13 (one line naming it otherwise).
python-version:
	@test -n "$(PYTHON)" || { echo "error: Python 3.13 not found (install it, or make PYTHON=/path/to/python3.13)" >&2; exit 1; }
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null || { \
		echo "error: PYTHON=$(PYTHON) is $$("$(PYTHON)" --version 2>/dev/null || echo 'not runnable'); chatstate needs Python 3.13 (make PYTHON=/path/to/python3.13 ...)" >&2; exit 1; }

$(VENV)/.installed: requirements.txt requirements-dev.txt | python-version
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null || \
		{ rm -rf $(VENV) && echo "creating $(VENV) with $(PYTHON)" && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: deps
	$(PY) -m devtools.run $(if $(MCP),--mcp $(MCP))

chat: deps
	$(PY) -m devtools.chat $(if $(INLINE),--inline)

playground: deps
	$(PY) -m devtools.playground

lint: deps
	$(VENV)/bin/ruff check shared devtools tests benchmarks function_app.py
	$(VENV)/bin/mypy shared
	$(VENV)/bin/mypy --strict $(DEV_HOST)

# Test tiers, by folder: tests/unit (no I/O), tests/integration (Azurite and local stand-ins),
# tests/e2e (the app over HTTP through the dev host).
unit: deps
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

pytest: deps
	$(PY) -m devtools.azurite -- $(PY) -m pytest -q $(PYTEST_ARGS)

test: lint infra-check pytest

infra-check:
	bash infra/check.sh

teams-package: deps
	@$(PY) -m devtools.teams_package $(if $(COPILOT),--copilot $(COPILOT))

bench: deps
	$(PY) -m devtools.azurite -- $(PY) -m benchmarks.run

# Seeded random interleavings of every operation on two instances, storage faults injected,
# invariants checked (tests/integration/torture.py); a short run is part of `make test`.
torture: deps
	$(PY) -m devtools.azurite -- $(PY) -m tests.integration.torture $(if $(SEED),--seed $(SEED)) \
		$(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(DURATION),--duration $(DURATION)) \
		$(if $(KINDS),--kinds $(KINDS))

# Usage by tenant or user from the budget ledgers (devtools/usage.py); CSV=… writes one line per
# account and day. Against Azure: CHAT_STORAGE_TABLE_ENDPOINT=… and `az login`.
usage: deps
	$(PY) -m devtools.usage $(if $(LEVEL),--level $(LEVEL)) $(if $(DAYS),--days $(DAYS)) \
		$(if $(CSV),--csv $(CSV))

clean:
	rm -rf $(VENV) .venv-infra .venv-checkov node_modules .azurite .pytest_cache .ruff_cache
