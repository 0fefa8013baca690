# integration-outbox: `make run` (the whole system with sandbox providers) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# Defaults for the demo; any of them can be overridden from the environment. DATABASE_URL is
# not set here: unset, every process and every `outbox` command uses the same embedded
# database, ~/.local/share/integration-outbox/outbox.db (see README, Configuration).
export REDIS_URL ?= redis://localhost:6379/0
export SANDBOX_PORT ?= 8100
export OUTBOX_PAYMENTS_BASE_URL ?= http://127.0.0.1:$(SANDBOX_PORT)
export OUTBOX_PAYMENTS_API_KEY ?= sk_test_sandbox
export SANDBOX_PAYMENTS_API_KEY ?= $(OUTBOX_PAYMENTS_API_KEY)
export OUTBOX_EMAIL_BASE_URL ?= http://127.0.0.1:$(SANDBOX_PORT)
export OUTBOX_EMAIL_API_KEY ?= $(OUTBOX_PAYMENTS_API_KEY)
export OUTBOX_EMAIL_FROM ?= Demo Shop <shop@example.com>
# Inbound: the sandbox signs its webhooks with these demo secrets and sends them to the
# receiver (`outbox inbound`, port 8200); the inbound worker runs the shop's handlers.
export OUTBOX_INBOUND_PORT ?= 8200
export OUTBOX_PAYMENTS_WEBHOOK_SECRET ?= whsec_demo_payments_0123456789abcdef
export OUTBOX_EMAIL_WEBHOOK_SECRET ?= whsec_ZGVtby1lbWFpbC13ZWJob29rLXNlY3JldC0wMQ==
export SANDBOX_PAYMENTS_WEBHOOK_URL ?= http://127.0.0.1:$(OUTBOX_INBOUND_PORT)/webhooks/payments
export SANDBOX_EMAIL_WEBHOOK_URL ?= http://127.0.0.1:$(OUTBOX_INBOUND_PORT)/webhooks/email
export OUTBOX_HANDLERS ?= examples.handlers
# The crm provider: OAuth2 against the sandbox's authorisation server (the driver connects
# it at start, as `outbox crm connect` does with a browser).
export OUTBOX_CRM_BASE_URL ?= http://127.0.0.1:$(SANDBOX_PORT)
export OUTBOX_CRM_AUTHORIZE_URL ?= $(OUTBOX_CRM_BASE_URL)/oauth/authorize
export OUTBOX_CRM_TOKEN_URL ?= $(OUTBOX_CRM_BASE_URL)/oauth/v1/token
export OUTBOX_CRM_CLIENT_ID ?= outbox-demo-client
export OUTBOX_CRM_CLIENT_SECRET ?= outbox-demo-secret-0123456789
export SANDBOX_CRM_CLIENT_ID ?= $(OUTBOX_CRM_CLIENT_ID)
export SANDBOX_CRM_CLIENT_SECRET ?= $(OUTBOX_CRM_CLIENT_SECRET)
# Signed outbound webhooks: the sandbox's receiver (/_sandbox/hooks/NAME) is on loopback, which
# the SSRF guard refuses unless allow-listed.
export OUTBOX_WEBHOOKS_ALLOW_HOSTS ?= 127.0.0.1

.PHONY: install system-packages migrate redis rabbitmq run test bench bench-smoke chaos chaos-smoke soak lint clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

migrate: install
	$(BIN)/outbox db upgrade

redis: install
	$(BIN)/python scripts/ensure_redis.py

# The delivery, crash and dead-letter tests also run on RabbitMQ (OUTBOX_TEST_AMQP_URL,
# default amqp://guest:guest@127.0.0.1:5672/): started here if installed but stopped.
rabbitmq: install
	$(BIN)/python scripts/ensure_rabbitmq.py

run: migrate redis
	@creds="$$(scripts/credentials.sh FLOWER_BASIC_AUTH flower)"; web="$$(scripts/credentials.sh OUTBOX_WEB_AUTH web)"; \
	echo "Admin:   http://127.0.0.1:8300  (login $${web%%:*} / $${web#*:}; set OUTBOX_WEB_AUTH to choose)"; \
	echo "Flower:  http://127.0.0.1:5555  (login $${creds%%:*} / $${creds#*:}; set FLOWER_BASIC_AUTH to choose)"; \
	echo "Shop:    POST http://127.0.0.1:8000/orders, GET /orders/REF (paid once the webhook came)    Sandbox: $(OUTBOX_PAYMENTS_BASE_URL)/_sandbox/stats"; \
	echo "Status:  $(BIN)/outbox status   (or: source $(BIN)/activate; outbox status)"; \
	key="$$(scripts/secret_key.sh $(BIN)/python)" || exit 1; \
	[ -z "$$key" ] || echo "Secrets: OUTBOX_SECRET_KEY_FILE=$$key (export it to run outbox endpoints or outbox crm connect yourself)"; \
	FLOWER_BASIC_AUTH="$$creds" OUTBOX_WEB_AUTH="$$web" OUTBOX_SECRET_KEY_FILE="$$key" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile

system-packages:
	scripts/install_system_packages.sh

# Two passes: every test that does not judge timing on two pytest workers (pytest-xdist;
# each worker has its own Redis DB, PostgreSQL databases and RabbitMQ vhost), then the
# timing-judging ones (marked serial) alone, so that no other test's load skews them.
test: install system-packages redis rabbitmq
	$(BIN)/pytest -n 2 -m "not serial"
	$(BIN)/pytest -m serial
	$(MAKE) --no-print-directory bench-smoke

# Every benchmark with tiny counts (about a minute): a benchmark that breaks fails `make test`.
bench-smoke: install redis
	$(BIN)/python -m bench --smoke
	$(BIN)/python -m bench scale --smoke
	$(BIN)/python -m bench backlog --smoke
	$(BIN)/python -m bench scaleout --smoke
	$(BIN)/python -m bench web --smoke
	$(BIN)/python -m bench inbound --smoke

bench: install redis
	$(BIN)/python -m bench
	$(BIN)/python -m bench scale
	$(BIN)/python -m bench backlog
	$(BIN)/python -m bench scaleout
	$(BIN)/python -m bench web
	$(BIN)/python -m bench inbound

# Fault scenarios against the real stack (PostgreSQL on 127.0.0.1:5432, a private redis-server),
# one line of figures each; exit 1 if a must-show fails. Full sizes take 20-30 min;
# `make chaos QUICK=1` (= `make chaos-smoke`) a few minutes. CHAOS_ARGS="--only worker_kill".
chaos: install
	$(BIN)/python -m bench.chaos $(if $(QUICK),--quick) $(CHAOS_ARGS)

chaos-smoke: install
	$(BIN)/python -m bench.chaos --quick $(CHAOS_ARGS)

# 50 deliveries/s for 10 minutes with a fault every minute (QUICK=1: 2 minutes).
soak: install
	$(BIN)/python -m bench.soak $(if $(QUICK),--quick) $(SOAK_ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf var .pytest_cache
