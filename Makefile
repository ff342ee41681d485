# pg_nudge: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
PG_CONFIG ?= /usr/bin/pg_config
TEST_DIR  ?= /tmp/pg_nudge-it
TEST_PORT ?= 28815
DEMO_DIR  ?= $(CURDIR)/.demo/data
DEMO_PORT ?= 28816
KEEP      ?= 0
CITUS_DIR ?= /tmp/pg_nudge-citus
CITUS_PORT ?= 28850
# Citus's source for the cluster tests: beside the project (as on this workplace's machines)
CITUS_SRC ?= $(firstword $(wildcard $(CURDIR)/../shared/vendor/citus /work/shared/vendor/citus) $(CURDIR)/../shared/vendor/citus)
SOAK_MINUTES ?= 10
REGRESS   := $(shell ls tests/pg_regress/sql/*.sql | xargs -n1 basename | sed 's/\.sql$$//' | sort)
PG_REGRESS := $(shell dirname $$($(PG_CONFIG) --pgxs 2>/dev/null || echo /x/x))/../test/regress/pg_regress

.PHONY: bench soak setup install test test-unit test-pgrx test-server test-package test-citus package regress tour integration demo demo-stop clean

setup:
	@scripts/setup.sh

install: setup
	cargo pgrx install --pg-config $(PG_CONFIG) >/dev/null
	@# released install scripts, so that upgrades from them can be tested
	install -m 644 sql/released/*.sql $$($(PG_CONFIG) --sharedir)/extension/

## the whole suite: unit tests, in-server pgrx tests, SQL regression and integration tests,
## then the Debian package installed with apt and toured
test: setup test-unit test-pgrx test-server test-package test-citus

test-unit:
	cargo test -p nudge-core -p nudge-mailer -p nudge-gateway

test-pgrx:
	install -d -o postgres /tmp/pg_nudge-test 2>/dev/null || mkdir -p /tmp/pg_nudge-test
	cargo pgrx test pg15 --runas postgres --pgdata /tmp/pg_nudge-test

# pg_regress and the integration tests against one real server of our own
test-server: install
	cargo build -p nudge-mailer -p nudge-gateway
	@scripts/cluster.sh start $(TEST_DIR) $(TEST_PORT) shared_preload_libraries=pg_nudge nudge.database=nudge_it_worker wal_level=logical output_plugin_libraries=pgoutput,test_decoding,pg_nudge
	@trap 'scripts/cluster.sh stop $(TEST_DIR)' EXIT; \
	  $(MAKE) --no-print-directory regress tour integration

regress:
	@$(PG_REGRESS) --host=127.0.0.1 --port=$(TEST_PORT) --user=postgres --dbname=nudge_regress \
	  --inputdir=tests/pg_regress --outputdir=tests/pg_regress $(REGRESS) \
	  || { cat tests/pg_regress/regression.diffs 2>/dev/null | head -200; exit 1; }

tour:
	@scripts/readme-tour.sh $(TEST_PORT)

integration:
	NUDGE_TEST_DSN="host=127.0.0.1 port=$(TEST_PORT) user=postgres" cargo test -p nudge-integration --tests -- --test-threads=1

## pg_nudge on a Citus cluster on this machine (a coordinator and two worker nodes):
## builds Citus 13.2.2 from ../shared/vendor/citus when it is not installed
test-citus: install
	@if [[ ! -f $$($(PG_CONFIG) --pkglibdir)/citus.so ]]; then \
	  [[ -f $(CITUS_SRC)/build.sh ]] || { echo "test-citus: Citus is not installed and $(CITUS_SRC)/build.sh is missing (CITUS_SRC=...)" >&2; exit 1; }; \
	  bash $(CITUS_SRC)/build.sh $(PG_CONFIG); fi
	@scripts/citus-cluster.sh start $(CITUS_DIR) $(CITUS_PORT) shop replay claims
	@trap 'scripts/citus-cluster.sh stop $(CITUS_DIR)' EXIT; \
	  NUDGE_CITUS_DSN="host=127.0.0.1 port=$(CITUS_PORT) user=postgres" \
	  cargo test -p nudge-integration --test citus -- --ignored --test-threads=1

## a Debian package for PostgreSQL 15 (extension, nudge-mailer, nudge-gateway, systemd units)
package: setup
	@scripts/package.sh

## installs that package with apt and runs the README tour against it on a cluster of its own
test-package: package
	@scripts/package-test.sh

## a realistic scenario on a cluster of its own; `make demo-stop` stops it when kept
demo: install
	cargo build -p nudge-mailer -p nudge-gateway
	@DEMO_DIR=$(DEMO_DIR) DEMO_PORT=$(DEMO_PORT) KEEP=$(KEEP) demo/run.sh

## benchmarks against baselines on a cluster of its own (release build); writes bench/RESULTS.md
bench: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG) >/dev/null
	install -m 644 sql/released/*.sql $$($(PG_CONFIG) --sharedir)/extension/
	cargo build --release -p nudge-bench -p nudge-mailer
	@# BENCH_ONLY=citus: only the Citus part; BENCH_CITUS=1: it too (docs/citus.md)
	@if [[ "$${BENCH_ONLY:-}" != citus ]]; then bench/run.sh; fi
	@if [[ "$${BENCH_CITUS:-0}" == 1 || "$${BENCH_ONLY:-}" == citus ]]; then CITUS_SRC=$(CITUS_SRC) bench/citus.sh; fi

## fault injection under steady load on a cluster of its own (port 28830), SOAK_MINUTES long;
## not part of `make test`. Exits non-zero when a message was lost, sent twice or is stuck.
soak: install
	cargo build -p nudge-mailer -p nudge-integration --bins
	@# the soak stops its cluster itself; this covers an interrupted run
	@trap 'scripts/cluster.sh stop /tmp/pg_nudge-soak' EXIT; \
	  SOAK_MINUTES=$(SOAK_MINUTES) target/debug/soak

demo-stop:
	@scripts/cluster.sh stop $(DEMO_DIR) && echo "demo server stopped"

clean:
	cargo clean
	rm -rf .demo tests/pg_regress/results tests/pg_regress/regression.*
