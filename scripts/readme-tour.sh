#!/usr/bin/env bash
# Runs the README's five-minute tour, as written, in a new database: the
# README's first example must never go stale.
set -euo pipefail
port=$1
cd "$(dirname "$0")/.."
sql=$(awk '/^## A five-minute tour/{t=1} t && /^```sql/{f=1; next} f && /^```/{exit} f' README.md)
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres)
PGOPTIONS=--client-min-messages=warning "${psql[@]}" -c "DROP DATABASE IF EXISTS nudge_tour" -c "CREATE DATABASE nudge_tour"
out=$("${psql[@]}" -d nudge_tour -A -t <<<"$sql")
# the tour ends with one cart reminder sent and opened
grep -q "You left Boots in your cart, Ada" <<<"$out" || { echo "tour: no cart reminder in the outbox"; echo "$out"; exit 1; }
"${psql[@]}" -d nudge_tour -A -t -c "SELECT status || ' ' || (opened_at IS NOT NULL) FROM nudge.outbox" | grep -qx "sent true" \
  || { echo "tour: the message was not acked and opened"; exit 1; }
echo "README tour: ok"
