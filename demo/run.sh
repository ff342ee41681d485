#!/usr/bin/env bash
# make demo: a shop on a PostgreSQL cluster of its own, three days of events,
# the case study's triggers, one evaluation pass, and what it sent.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/.demo/data}
DEMO_PORT=${DEMO_PORT:-28816}
KEEP=${KEEP:-0}
psql=(psql -X -q -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -d shop)

scripts/cluster.sh start "$DEMO_DIR" "$DEMO_PORT"
[[ $KEEP == 1 ]] || trap 'scripts/cluster.sh stop "$DEMO_DIR"' EXIT
psql -X -q -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -c "CREATE DATABASE shop" >/dev/null
"${psql[@]}" -c "CREATE EXTENSION pg_nudge"

echo "== Defining triggers and loading the shop (3,000 customers, three days of events) =="
"${psql[@]}" -f demo/shop.sql >/dev/null
"${psql[@]}" -f demo/triggers.sql >/dev/null
start=$(date +%s%N)
"${psql[@]}" -f demo/events.sql >/dev/null
"${psql[@]}" -t -A -F ' ' -c "SELECT 'events: ' || (SELECT count(*) FROM nudge.events) || ' tracked, ' || (SELECT count(*) FROM app.orders) || ' orders'"
echo "loaded and captured in $(( ($(date +%s%N) - start) / 1000000 )) ms"

echo "== Running nudge.run_due() =="
"${psql[@]}" -t -A -c "SELECT 'messages written: ' || nudge.run_due(now(), 100000)"

"${psql[@]}" -f demo/report.sql

if [[ $KEEP == 1 ]]; then
  echo
  echo "The demo server is still running. Look further with:"
  echo "  psql -h 127.0.0.1 -p $DEMO_PORT -U postgres shop"
  echo "  e.g. SELECT * FROM nudge.outbox LIMIT 5;  SELECT * FROM nudge.explain('post_purchase', 'c17');"
  echo "Stop it with: make demo-stop"
else
  echo
  echo "To keep the server and look further with psql: make demo KEEP=1 (then make demo-stop)"
fi
