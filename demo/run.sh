#!/usr/bin/env bash
# make demo: a shop on a PostgreSQL cluster of its own, three days of events,
# the case study's triggers, the background worker writing the outbox, the
# reference mailer delivering it to a real local SMTP server, and what arrived.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/.demo/data}
DEMO_PORT=${DEMO_PORT:-28816}
SMTP_PORT=${SMTP_PORT:-28825}
GATEWAY_PORT=${GATEWAY_PORT:-28826}
GATEWAY="http://127.0.0.1:$GATEWAY_PORT"
WRITE_KEY=demo-write-key
MAILDIR=$(dirname "$DEMO_DIR")/maildir
KEEP=${KEEP:-0}
psql=(psql -X -q -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -d shop)
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

scripts/cluster.sh start "$DEMO_DIR" "$DEMO_PORT" shared_preload_libraries=pg_nudge nudge.database=shop nudge.naptime=500
smtp_pid=
gateway_pid=
cleanup() {
  [[ -n $smtp_pid ]] && kill "$smtp_pid" 2>/dev/null || true
  [[ -n $gateway_pid ]] && kill "$gateway_pid" 2>/dev/null || true
  [[ $KEEP == 1 ]] || scripts/cluster.sh stop "$DEMO_DIR"
}
trap cleanup EXIT
psql -X -q -h 127.0.0.1 -p "$DEMO_PORT" -U postgres -c "CREATE DATABASE shop" >/dev/null
"${psql[@]}" -c "CREATE EXTENSION pg_nudge"

echo "== Defining triggers, then loading the shop: 3,000 customers, three days of events =="
"${psql[@]}" -f demo/shop.sql >/dev/null
"${psql[@]}" -f demo/triggers.sql >/dev/null
# unsubscribe links point at the demo's gateway (a real one is behind https)
"${psql[@]}" -c "SELECT nudge.configure('{\"unsubscribe_url\": \"$GATEWAY\"}')" >/dev/null
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
# 8 threads, each with one SMTP connection kept open (aiosmtpd, in Python, is the slow side here)
target/debug/nudge-mailer --once --concurrency 8 --batch 50 --smtp-port "$SMTP_PORT" \
  --from "Trailhead Outfitters <hello@shop.example>" \
  --database-url "host=127.0.0.1 port=$DEMO_PORT user=postgres dbname=shop" 2>/dev/null
echo "$(ls "$MAILDIR/new" | wc -l) emails arrived at the SMTP server in $(ms "$start") ms"

"${psql[@]}" -f demo/report.sql

"${psql[@]}" -f demo/journey.sql

echo "== One email as the SMTP server received it =="
first=$(grep -l "Still thinking" "$MAILDIR"/new/* | head -1 || true)
# the header block, folded lines joined
header=$(sed -n '1,/^$/p' "$first" | awk '/^[ \t]/ {sub(/^[ \t]+/, " "); line = line $0; next} {if (line != "") print line; line = $0} END {if (line != "") print line}')
grep -E '^(From|To|Subject|Message-ID|X-Nudge-Message-Key|List-Unsubscribe|List-Unsubscribe-Post|Content-Type):' <<<"$header"

echo
echo "== nudge-gateway: the app's SDK and the recipient's click arrive over HTTP =="
# a role with nudge_writer (events, profiles) and nudge_mailer (unsubscribe, webhooks) only
"${psql[@]}" -c "SET client_min_messages = warning; DROP ROLE IF EXISTS shop_gateway; CREATE ROLE shop_gateway LOGIN IN ROLE nudge_writer, nudge_mailer"
target/debug/nudge-gateway --listen "127.0.0.1:$GATEWAY_PORT" --write-keys "$WRITE_KEY" \
  --database-url "host=127.0.0.1 port=$DEMO_PORT user=shop_gateway dbname=shop" 2>/dev/null &
gateway_pid=$!
for _ in $(seq 1 100); do curl -sf "$GATEWAY/healthz" >/dev/null && break; sleep 0.1; done
key=$(grep -E '^X-Nudge-Message-Key:' <<<"$header" | sed -E 's/^[^:]+: //')
customer=$("${psql[@]}" -t -A -c "SELECT user_id FROM nudge.outbox WHERE message_key = '$key'")
link=$(grep -E '^List-Unsubscribe:' <<<"$header" | sed -E 's|^[^<]*<([^>]+)>.*|\1|')
echo "POST $link  (the mail client's one click, RFC 8058)"
curl -sf -X POST -d 'List-Unsubscribe=One-Click' "$link" | grep -o '<p>[^<]*' | sed 's/<p>/the page says: /'
"${psql[@]}" -c "SELECT user_id, topic, status, source FROM nudge.subscriptions"
echo "POST $GATEWAY/v1/track  (the shop's Segment SDK: $customer puts a new item in the cart)"
curl -sf -u "$WRITE_KEY:" -H 'Content-Type: application/json' "$GATEWAY/v1/track" -d "{
  \"userId\": \"$customer\", \"event\": \"cart_added\", \"messageId\": \"demo-after-unsubscribe\",
  \"timestamp\": \"$(date -u -d '-10 minutes' +%Y-%m-%dT%H:%M:%SZ)\",
  \"properties\": {\"cart_id\": \"demo-cart\", \"product_name\": \"Trail Tent\", \"price\": 249}}"; echo
for _ in $(seq 1 100); do
  [[ $("${psql[@]}" -t -A -c "SELECT count(*) FROM nudge.enrollments WHERE user_id = '$customer' AND key = 'demo-cart' AND state <> 'waiting'") == 1 ]] && break
  sleep 0.2
done
echo "The worker's decision about that cart:"
"${psql[@]}" -c "SELECT step, rule, detail FROM nudge.explain('cart_abandonment', '$customer') WHERE detail LIKE '%demo-cart%' OR rule = 'consent'"

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
