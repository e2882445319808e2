# pyqmail: the two commands are `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEMO   := $(CURDIR)/var/qmail
# Debian packages the tests use as real peers (tcprules/tcpserver, swaks, Postfix's
# smtp-source/smtp-sink, tinycdb's cdb, dnsmasq for DNS on loopback, openssl s_client for TLS,
# OpenDKIM's opendkim-testmsg and Perl's Mail::DKIM to verify DKIM signatures; chromium reads
# the status page of `pyqmail run --http`, Debian's prometheus-client parses its /metrics;
# python3-authres parses Authentication-Results in the acceptance check;
# sasl2-bin's saslpasswd2 makes the SASL users of the Postfix smarthost with AUTH; srs is
# Mail::SRS's command, the reference our SRS addresses are checked against; systemd's
# systemd-analyze verifies the unit `pyqmail service install --systemd` writes, and
# daemontools' svscan/supervise/multilog run the scripts of --daemontools; NSD serves the
# DNSSEC-signed zone that dnsmasq --dnssec validates for the DANE tests; strace shows
# which process of root mode's local delivery fsyncs and opens what).
DEBS   := ucspi-tcp swaks postfix tinycdb dnsmasq-base openssl opendkim-tools libmail-dkim-perl \
          chromium python3-prometheus-client python3-authres sasl2-bin srs systemd daemontools nsd \
          strace

.PHONY: run test lint typecheck pytest deps accounts venv compat bench clean man install-man

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Install the Debian packages the tests need when they are missing (CI runs as root).
deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make deps: need root to apt-get install$$missing" >&2; exit 1; fi; \
	  echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections; \
	  echo "postfix postfix/mailname string mx.bench.local" | debconf-set-selections; \
	  apt-get update -q >/dev/null 2>&1 || true; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null || exit 1; \
	fi
	@# Postfix is only a peer for the tests and benches: never leave the packaged one running on :25.
	@if command -v postfix >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then postfix stop >/dev/null 2>&1 || true; fi
	@# Likewise NSD: the tests run their own on a free port; never the packaged one on :53.
	@if [ -s /run/nsd/nsd.pid ] && [ "$$(id -u)" = 0 ]; then kill "$$(cat /run/nsd/nsd.pid)" 2>/dev/null || true; fi

# The root-mode tests run deliveries, the queue and the listeners as qmail's accounts
# (alias qmaild qmaill qmailp qmailq qmailr qmails; groups qmail nofiles). As root, create
# the missing ones as `pyqmail init --create-users` does, so that no root test is skipped
# on a new machine. As an ordinary user there is nothing to do: root tests are skipped.
accounts: venv
	@if [ "$$(id -u)" = 0 ]; then $(PY) -c 'from pyqmail.layout import create_users; made = create_users(); print("make accounts: created " + ", ".join(made)) if made else None'; fi

lint: venv
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/ruff check src tests bench

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv deps accounts
	$(VENV)/bin/pytest --cov --cov-report=term:skip-covered -q -p no:cacheprovider --ignore=tests/compat

test: lint typecheck pytest

# Run pyqmail on a demo home under ./var/qmail, SMTP on 127.0.0.1:2525.
run: venv
	@[ -d $(DEMO)/control ] || PYQMAIL_SINGLE_USER=1 $(VENV)/bin/pyqmail init $(DEMO) --me demo.pyqmail.test -q
	@$(VENV)/bin/python -m pyqmail.demo $(DEMO)
	PYQMAIL_SINGLE_USER=1 $(VENV)/bin/pyqmail run --home $(DEMO) --smtp 127.0.0.1:2525 --single-user

# Compare with the real qmail when ../shared/reference is present (not part of make test).
compat: venv deps accounts
	PYQMAIL_COMPAT=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/compat

# Manual pages for pyqmail's commands, from the argparse parsers behind --help.
MANDIR ?= /usr/local/share/man
man: venv
	$(PY) -m pyqmail.cli.manpage man/man1

install-man: man
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 0644 man/man1/*.1 $(DESTDIR)$(MANDIR)/man1/

bench: venv deps
	$(PIP) install -q -e '.[test,bench]'
	$(PY) bench/queue.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage man
