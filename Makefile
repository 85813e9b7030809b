# Postbus — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# Debian packages of the real mail clients the tests drive (CLIENTS.md), and Dovecot, which
# the differential test (tests/socket/test_imap_dovecot_differential.py) compares against
# (swaks needs the two Perl TLS modules for STARTTLS and --tls-on-connect)
CLIENT_TOOLS := swaks libnet-ssleay-perl libio-socket-ssl-perl fetchmail getmail6 isync curl offlineimap3 mutt dovecot-imapd
CLIENT_BINS := swaks fetchmail getmail mbsync curl offlineimap mutt dovecot

.PHONY: run test test-fast fuzz soak mutate venv clients bench bench-smtp bench-store bench-imap bench-pop3 bench-mime bench-relay bench-e2e bench-imap-stress imaptest schemas lint typecheck clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

## Start the whole platform with embedded NATS, S3 and SQLite (data in .run/)
run: $(STAMP)
	@umask 077 && mkdir -p .run && chmod 700 .run
	$(VENV)/bin/postbus run

## Real mail clients for the tests (installed with apt-get when missing and we are root)
clients:
	@missing=""; for b in $(CLIENT_BINS); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	perl -MIO::Socket::SSL -e1 2>/dev/null || missing="$$missing IO::Socket::SSL"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing mail clients:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CLIENT_TOOLS)) >/dev/null \
	      || echo "warning: could not install $(CLIENT_TOOLS); tests that need them will be skipped"; \
	  else echo "warning: missing$$missing (apt-get install $(CLIENT_TOOLS)); those tests will be skipped"; fi; \
	fi

## Unit, session, socket and end-to-end tests (real nats-server, SeaweedFS, SQL, clients).
## The store's contract suites also run on PostgreSQL when one answers on 127.0.0.1:5432
## (or POSTBUS_TEST_POSTGRES_URL names one); a run that collects no test fails (pytest: 5).
PG_LOCAL := postgresql://postgres@127.0.0.1:5432/test
test: $(STAMP) clients
	$(PY) -m postbus.proto.schema --check
	@if [ -z "$$POSTBUS_TEST_POSTGRES_URL" ] && $(PY) -c "import socket; socket.create_connection(('127.0.0.1', 5432), 1)" 2>/dev/null; then \
	  export POSTBUS_TEST_POSTGRES_URL=$(PG_LOCAL); echo "PostgreSQL on 127.0.0.1:5432: store contract suites run on it too"; fi; \
	$(PY) -m pytest -q -rs -p no:cacheprovider --timeout=600 tests

## Unit and session tests only: pure code and sessions against in-memory ports, no servers
## (a few seconds); like `make test`, a run that collects no test fails (pytest: 5)
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=120 tests/unit tests/session

## A longer property/fuzz campaign over the pure parsers and sessions (IMAP, POP3, SMTP,
## MIME, DSN, relay wire, addresses, import): FUZZ_FACTOR times the examples of `make test`
FUZZ_FACTOR ?= 50
fuzz: $(STAMP)
	POSTBUS_FUZZ_FACTOR=$(FUZZ_FACTOR) $(PY) -m pytest -q -p no:cacheprovider \
	  $$(grep -rl "@given" tests/unit tests/session)

## Crash soak: SMTP load while ingress, mime-processor and mailbox-store are SIGKILLed again
## and again; fails on a lost 250 or a doubled message
soak: $(STAMP)
	$(PY) tests/soak/soak_crash.py

## Mutation testing (cosmic-ray) of the pure policy and protocol modules against their unit
## tests; survivors are printed (docs/testing.md says which remain and why)
mutate: $(STAMP)
	@mkdir -p bench-results
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) tests/mutation/run_mutate.py

## Benchmarks (medians printed; JSON in bench-results/). bench-e2e runs a bare aiosmtpd beside
## the platform and bench-imap-stress a tuned Dovecot (../shared/tools/imaptest, or IMAPTEST_DIR):
## each figure comes with its anchor from the same run (docs/benchmarks.md)
bench: bench-smtp bench-store bench-imap bench-pop3 bench-mime bench-relay bench-e2e bench-imap-stress
bench-smtp bench-store bench-imap bench-pop3 bench-mime bench-relay bench-e2e bench-imap-stress: bench-%: $(STAMP)
	@mkdir -p bench-results
	@f=tests/bench/bench_$$(echo $* | tr - _).py; if [ -f $$f ]; then $(PY) $$f; else echo "no benchmark for $*"; fi

## Dovecot's imaptest compliance scripts against the platform (skips where the tool is missing)
imaptest: $(STAMP)
	@mkdir -p bench-results
	$(PY) tests/bench/imaptest_compliance.py

## Debian's dovecot-imapd, when missing: the Dovecot differential test
## (tests/socket/test_imap_dovecot_differential.py, skipped without it) starts one
.PHONY: dovecot
dovecot:
	@command -v dovecot >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd >/dev/null; }
	@dovecot --version

## Regenerate proto/schemas from the pydantic models
schemas: $(STAMP)
	$(PY) -m postbus.proto.schema

lint: $(STAMP)
	$(VENV)/bin/ruff check libs proto services tests

## mypy --strict over every package in pyproject's package-dir (libs, proto, all services).
## mypy cannot follow setuptools' package-dir mapping: give it a tree of symlinks named postbus/
## (its cache stays beside it, so a second run only checks what changed)
TYPECHECK_PACKAGES = $$($(PY) -c "import tomllib; print(*('-p ' + k for k in tomllib.load(open('pyproject.toml','rb'))['tool']['setuptools']['package-dir']))")
typecheck: $(STAMP)
	@rm -rf $(VENV)/typecheck/postbus && mkdir -p $(VENV)/typecheck/postbus && touch $(VENV)/typecheck/postbus/__init__.py
	@$(PY) -c "import tomllib,os; m=tomllib.load(open('pyproject.toml','rb'))['tool']['setuptools']['package-dir']; [os.symlink(os.path.abspath(v), p) for k,v in m.items() for p in ['$(VENV)/typecheck/'+k.replace('.','/')] if not os.path.exists(p)]"
	pkgs="$(TYPECHECK_PACKAGES)" && cd $(VENV)/typecheck && ../bin/mypy --config-file $(CURDIR)/pyproject.toml --strict $$pkgs

clean:
	rm -rf .run bench-results .pytest_cache
