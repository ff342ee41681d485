#!/usr/bin/env bash
# make demo: a shop on a PostgreSQL cluster of its own, three days of events,
# the case study's triggers, the background worker writing the outbox, the
# reference mailer delivering it to a real local SMTP server, and what arrived.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/.demo/data}
DEMO_PORT=${DEMO_PORT:-28816}
SMTP_PORT=${SMTP_PORT:-28825}
MAILDIR=$(dirname "$DEMO_DIR")/maildir
KEEP=${KEEP:-0}
psql=(psql -X -q -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -d shop)
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

scripts/cluster.sh start "$DEMO_DIR" "$DEMO_PORT" shared_preload_libraries=pg_nudge nudge.database=shop nudge.naptime=500
smtp_pid=
cleanup() {
  [[ -n $smtp_pid ]] && kill "$smtp_pid" 2>/dev/null || true
  [[ $KEEP == 1 ]] || scripts/cluster.sh stop "$DEMO_DIR"
}
trap cleanup EXIT
psql -X -q -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -c "CREATE DATABASE shop" >/dev/null
"${psql[@]}" -c "CREATE EXTENSION pg_nudge"

echo "== Defining triggers, then loading the shop: 3,000 customers, three days of events =="
"${psql[@]}" -f demo/shop.sql >/dev/null
"${psql[@]}" -f demo/triggers.sql >/dev/null
start=$(date +%s%N)
"${psql[@]}" -f demo/events.sql >/dev/null
"${psql[@]}" -t -A -c "SELECT (SELECT count(*) FROM nudge.events) || ' events tracked, ' || (SELECT count(*) FROM app.orders) || ' orders, all captured in $(ms "$start") ms'"

echo "== The background worker writes what is due (no run_due call) =="
start=$(date +%s%N)
for _ in $(seq 1 300); do
  left=$("${psql[@]}" -t -A -c "SELECT count(*) FROM nudge.enrollments e JOIN nudge.triggers t ON t.name = e.trigger
                                WHERE e.state = 'waiting' AND e.due_at <= now()")
  [[ $left == 0 ]] && break
  sleep 0.1
done
"${psql[@]}" -t -A -c "SELECT 'outbox: ' || count(*) || ' messages written by the worker within $(ms "$start") ms of the load' FROM nudge.outbox"

echo "== nudge-mailer delivers them over SMTP to a local aiosmtpd =="
rm -rf "$MAILDIR"
python3 -m aiosmtpd -n -l "127.0.0.1:$SMTP_PORT" -c aiosmtpd.handlers.Mailbox "$MAILDIR" &
smtp_pid=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SMTP_PORT") 2>/dev/null && break; sleep 0.1; done
start=$(date +%s%N)
# 8 connections: lettre 0.11.23 leaves Nagle on, so one connection waits ~40 ms per message
target/debug/nudge-mailer --once --concurrency 8 --batch 50 --smtp-port "$SMTP_PORT" \
  --from "Trailhead Outfitters <hello@shop.example>" \
  --database-url "host=127.0.0.1 port=$DEMO_PORT user=postgres dbname=shop" 2>/dev/null
echo "$(ls "$MAILDIR/new" | wc -l) emails arrived at the SMTP server in $(ms "$start") ms"

"${psql[@]}" -f demo/report.sql

echo "== One email as the SMTP server received it =="
first=$(grep -l "Still thinking" "$MAILDIR"/new/* | head -1 || true)
# the header block, folded lines joined
header=$(sed -n '1,/^$/p' "$first" | awk '/^[ \t]/ {sub(/^[ \t]+/, " "); line = line $0; next} {if (line != "") print line; line = $0} END {if (line != "") print line}')
grep -E '^(From|To|Subject|Message-ID|X-Nudge-Message-Key|List-Unsubscribe|List-Unsubscribe-Post|Content-Type):' <<<"$header"

echo
echo "== One click on its unsubscribe link (what the gateway's POST /u/<token> calls) =="
token=$(grep -E '^List-Unsubscribe:' <<<"$header" | sed -E 's|.*/u/([^>]+)>.*|\1|')
"${psql[@]}" -c "SELECT * FROM nudge.unsubscribe('$token')"
"${psql[@]}" -c "SELECT user_id, topic, status, source FROM nudge.subscriptions"

if [[ $KEEP == 1 ]]; then
  echo
  echo "The demo server is still running. Look further with:"
  echo "  psql -h 127.0.0.1 -p $DEMO_PORT -U postgres shop"
  echo "  e.g. SELECT * FROM nudge.outbox_metrics();  SELECT * FROM nudge.explain('post_purchase', 'c17');"
  echo "Stop it with: make demo-stop"
else
  echo
  echo "To keep the server and look further with psql: make demo KEEP=1 (then make demo-stop)"
fi
