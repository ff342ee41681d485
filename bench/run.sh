#!/usr/bin/env bash
# make bench: pg_nudge against baselines on one server, side by side, fixed seed.
# Prints a table of figures and ratios and writes it, with the machine and the
# server settings, to bench/RESULTS.md. Sizes can be shrunk for a quick look:
#   BENCH_EVENTS=100000 BENCH_DUE=20000 make bench
# or limited to some parts (the backtest replays what the capture part loaded):
#   BENCH_ONLY=evaluation,outbox make bench
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${BENCH_DIR:-/tmp/pg_nudge-bench}
PORT=${BENCH_PORT:-28818}
# BENCH_SCALE=10: ten times the events, users and due journeys (10M events),
# to see that the cost per event stays flat
SCALE=${BENCH_SCALE:-1}
EVENTS=${BENCH_EVENTS:-$((1000000 * SCALE))}
USERS=${BENCH_USERS:-$((100000 * SCALE))}
DUE=${BENCH_DUE:-$((200000 * SCALE))}
WHALE=${BENCH_WHALE:-1000000}
PINGS=${BENCH_PINGS:-10000}
PING_RATE=${BENCH_PING_RATE:-500}
INSERT_SECONDS=${BENCH_INSERT_SECONDS:-15}
INSERT_CLIENTS=${BENCH_INSERT_CLIENTS:-4}
OUTBOX_SECONDS=${BENCH_OUTBOX_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-2}
RESULTS=${BENCH_RESULTS:-bench/RESULTS.md}
# (nudge.enabled is switched with ALTER SYSTEM: a -c option would override it)
# wal_level = logical for every part: WAL capture's ratios are against a plain
# table under the same wal_level (output_plugin_libraries exists only in some builds)
SETTINGS=(shared_preload_libraries=pg_nudge nudge.database=bench nudge.naptime=100
          wal_level=logical output_plugin_libraries=pgoutput,test_decoding,pg_nudge
          track_commit_timestamp=on shared_buffers=1GB max_wal_size=8GB checkpoint_timeout=30min
          max_connections=100)
if [[ $(id -u) == 0 ]]; then as=(runuser -u postgres --); else as=(); fi
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d bench)
q() { "${psql[@]}" -t -A -c "$1"; }
# waits until query $1 returns t, at most $2 seconds
wait_for() {
  local until=$((SECONDS + $2))
  until [[ $(q "$1") == t ]]; do
    ((SECONDS < until)) || { echo "bench: gave up waiting for: $1" >&2; exit 1; }
    sleep 0.2
  done
}
worker() { "${psql[@]}" -c "ALTER SYSTEM SET nudge.enabled = $1" -c "SELECT pg_reload_conf()" >/dev/null; }
pause_all() { q "SELECT count(nudge.pause_trigger(name)) FROM nudge.triggers WHERE status = 'active'" >/dev/null; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
best() { printf '%s\n' "$@" | sort -g | tail -1; }  # the best of the rounds (least disturbed)
fmt() { printf '%.0f' "$1" | sed -E ':a;s/^([0-9]+)([0-9]{3})/\1,\2/;ta'; }  # 1,234,567 without a locale
enrolled=0
only() { [[ -z ${BENCH_ONLY:-} || ,$BENCH_ONLY, == *,$1,* ]]; }
rows=()
row() { rows+=("| $1 | $2 | $3 | $4 | $5 |"); printf '%-58s %16s %16s %7s  %s\n' "$1" "$2" "$3" "$4" "$5"; }

scripts/cluster.sh start "$DIR" "$PORT" "${SETTINGS[@]}"
trap 'scripts/cluster.sh stop "$DIR"' EXIT
psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE bench" >/dev/null
worker off  # capture is measured alone; the worker drains in part 2
"${psql[@]}" -v users="$USERS" -f bench/schema.sql >/dev/null
"${psql[@]}" -f bench/queue.sql >/dev/null

csv=/tmp/pg_nudge-bench-events-$EVENTS-$USERS.csv
if [[ ! -s $csv ]]; then
  echo "generating $EVENTS events over $USERS users (Zipf, fixed seed)..."
  python3 bench/gen_events.py "$EVENTS" "$USERS" 1767225600 2592000 > "$csv.tmp" && mv "$csv.tmp" "$csv"
fi
chmod a+r "$csv"
reset_nudge() { q "TRUNCATE nudge.enrollments, nudge.journal, nudge.outbox, nudge.capture_queue" >/dev/null; }

echo
printf '%-58s %16s %16s %7s  %s\n' "measure" "baseline" "pg_nudge" "ratio" "target"

if only capture; then
# 1. Capture cost: the same COPY into a plain table and into a source with 5
# triggers, immediate (the default: journeys open in the inserting statement)
# and deferred (nudge.deferred_capture = on: the statement queues the events,
# the worker enrolls them; measured separately below).
copy_rate() {  # table, deferred (on/off)
  q "TRUNCATE bench.$1" >/dev/null; reset_nudge; q "CHECKPOINT" >/dev/null
  local t0; t0=$(now)
  "${psql[@]}" -c "SET nudge.deferred_capture = $2" \
    -c "COPY bench.$1 (user_id, event, occurred_at, props) FROM '$csv' WITH (FORMAT csv)" >/dev/null
  echo "$EVENTS / $(since "$t0")" | bc -l
}
plain=() nudged=() deferred=()
for _ in $(seq "$ROUNDS"); do
  plain+=("$(copy_rate plain off)"); nudged+=("$(copy_rate events off)"); deferred+=("$(copy_rate events on)")
done
p=$(best "${plain[@]}") n=$(best "${nudged[@]}") d=$(best "${deferred[@]}")
row "capture: COPY $(fmt "$EVENTS") events, 5 triggers (rows/s)" "$(fmt "$p")" "$(fmt "$n")" "$(ratio "$n" "$p")" "-"
row "capture: the same COPY, deferred capture (rows/s)" "$(fmt "$p")" "$(fmt "$d")" "$(ratio "$d" "$p")" ">= 0.9"
# the deferred work: the queued events enrolled in one go (what the worker does)
queued=$(q "SELECT count(*) FROM nudge.capture_queue")
t0=$(now)
q "SELECT nudge.capture_pending($queued)" >/dev/null
row "capture: deferred, $(fmt "$queued") queued events enrolled (events/s)" "-" \
    "$(fmt "$(echo "$queued / $(since "$t0")" | bc -l)")" "-" "-"
enrolled=$(q "SELECT count(*) FROM nudge.enrollments")

# single-row inserts from concurrent clients (pgbench, prepared statements),
# after a VACUUM so that autovacuum does not compete with one side only
"${psql[@]}" -c "VACUUM ANALYZE" >/dev/null
insert_tps() {  # table, deferred (on/off)
  sed "s/TABLE/$1/" bench/insert.sql > "/tmp/pg_nudge-bench-insert-$1.sql"
  q "CHECKPOINT" >/dev/null
  PGOPTIONS="-c nudge.deferred_capture=$2" \
  pgbench -n -M prepared -h 127.0.0.1 -p "$PORT" -U postgres -c "$INSERT_CLIENTS" -j 2 -T "$INSERT_SECONDS" \
    -f "/tmp/pg_nudge-bench-insert-$1.sql" bench 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
plain=() nudged=() deferred=()
for _ in $(seq "$ROUNDS"); do
  plain+=("$(insert_tps plain off)"); nudged+=("$(insert_tps events off)"); deferred+=("$(insert_tps events on)")
done
p=$(best "${plain[@]}") n=$(best "${nudged[@]}") d=$(best "${deferred[@]}")
row "capture: single-row INSERT, $INSERT_CLIENTS clients (rows/s)" "$(fmt "$p")" "$(fmt "$n")" "$(ratio "$n" "$p")" "-"
row "capture: the same inserts, deferred capture (rows/s)" "$(fmt "$p")" "$(fmt "$d")" "$(ratio "$d" "$p")" ">= 0.8"
q "SELECT nudge.capture_pending(100000000)" >/dev/null

# WAL capture (nudge.set_capture('wal')): the sources' triggers are off; the
# slot is read afterwards, as the worker would, and timed on its own. The
# plain table is measured again in the same rounds, side by side.
q "SELECT nudge.set_capture('wal')" >/dev/null
plain=() wal=() walenroll=()
for _ in $(seq "$ROUNDS"); do
  plain+=("$(copy_rate plain off)"); wal+=("$(copy_rate events off)")
  t0=$(now); n=$(q "SELECT nudge.capture_pending(100000000)")
  walenroll+=("$(echo "$n / $(since "$t0")" | bc -l)")
done
p=$(best "${plain[@]}") w=$(best "${wal[@]}")
row "capture: the same COPY, WAL capture (rows/s)" "$(fmt "$p")" "$(fmt "$w")" "$(ratio "$w" "$p")" ">= 0.95"
row "capture: WAL, $(fmt "$EVENTS") inserts read from the slot and enrolled (events/s)" "-" \
    "$(fmt "$(best "${walenroll[@]}")")" "-" "-"
"${psql[@]}" -c "VACUUM ANALYZE" >/dev/null
plain=() wal=()
for _ in $(seq "$ROUNDS"); do
  plain+=("$(insert_tps plain off)"); wal+=("$(insert_tps events off)")
  q "SELECT nudge.capture_pending(100000000)" >/dev/null
done
p=$(best "${plain[@]}") w=$(best "${wal[@]}")
row "capture: the same inserts, WAL capture (rows/s)" "$(fmt "$p")" "$(fmt "$w")" "$(ratio "$w" "$p")" ">= 0.95"

q "SELECT nudge.set_capture('immediate')" >/dev/null
q "SELECT nudge.capture_pending(100000000)" >/dev/null  # reads the slot to the switch
q "SELECT nudge.capture_pending(100000000)" >/dev/null  # drops it
fi

if only backtest; then
# 5. Backtest: the cart trigger replayed over the loaded events.
t0=$(now)
q "SELECT count(*) FROM nudge.backtest((SELECT v.definition FROM nudge.trigger_versions v WHERE v.trigger = 'cart_abandonment'),
                                      '2026-01-01', '2026-02-01')" >/dev/null
secs=$(since "$t0")
replayed=$(q "SELECT count(*) FROM bench.events")
row "backtest: $(fmt "$replayed") events replayed (events/s; s)" "-" "$(fmt "$(echo "$replayed / $secs" | bc -l)")" "-" \
    "< 10 s: $(printf '%.1f' "$secs") s"

# one user with WHALE events: a backtest holds one user's history at a time,
# so its peak memory is that user's. The backend's peak resident size
# (VmHWM) before and after, in one session.
"${psql[@]}" -c "SET nudge.deferred_capture = on" \
  -c "INSERT INTO bench.events (user_id, event, occurred_at, props)
      SELECT 'whale', CASE WHEN i % 10 = 0 THEN 'cart_added' ELSE 'product_viewed' END,
             '2026-01-01'::timestamptz + (i % 2592000) * interval '1 second',
             jsonb_build_object('cart_id', 'w' || (i % 1000), 'product_id', i % 500)
        FROM generate_series(1, $WHALE) i" -c "TRUNCATE nudge.capture_queue" >/dev/null
rm -f /tmp/pg_nudge-bench-pid /tmp/pg_nudge-bench-done
"${psql[@]}" -t -A >/dev/null <<SQL &
\\o /tmp/pg_nudge-bench-pid
SELECT pg_backend_pid();
\\o /dev/null
SELECT pg_sleep(1);
SELECT count(*) FROM nudge.backtest((SELECT v.definition FROM nudge.trigger_versions v WHERE v.trigger = 'cart_abandonment'),
                                    '2026-01-01', '2026-02-01');
\\o /tmp/pg_nudge-bench-done
SELECT 1;
\\o /dev/null
SELECT pg_sleep(3);
SQL
hwm() { grep VmHWM "/proc/$1/status" | tr -s ' ' | cut -d' ' -f2; }
until [[ -s /tmp/pg_nudge-bench-pid ]]; do sleep 0.1; done
pid=$(tr -d ' \n' < /tmp/pg_nudge-bench-pid); before=$(hwm "$pid"); t0=$(now)
until [[ -s /tmp/pg_nudge-bench-done ]]; do sleep 0.1; done
wsecs=$(echo "$(since "$t0") - 1" | bc -l); after=$(hwm "$pid")
wait
row "backtest: one user with $(fmt "$WHALE") events, backend peak memory (MB; s)" "$((before / 1024))" "$((after / 1024))" "-" \
    "bounded: $(printf '%.1f' "$wsecs") s"
q "DELETE FROM bench.events WHERE user_id = 'whale'" >/dev/null

fi

if only wal_lag; then
# WAL capture's enrollment lag (after the backtest, which replays what the
# capture part loaded: this part truncates the events)
q "SELECT nudge.set_capture('wal')" >/dev/null
# enrollment lag from the slot at a steady rate, with the worker reading it:
# event commit to enrollment commit (each event its own journey)
WAL_RATE=${BENCH_WAL_RATE:-5000}
WAL_SECONDS=${BENCH_WAL_SECONDS:-10}
pause_all
reset_nudge
q "SELECT nudge.define_trigger('wal_lag', '{\"on\": {\"event\": \"wping\", \"key\": \"n\"}, \"wait\": \"1 day\", \"template\": \"ping\"}')" >/dev/null
q "TRUNCATE bench.events" >/dev/null
worker on
# steady state: the worker's first loop after it is enabled also looks for
# experiment winners and applies retention over what the parts above loaded
sleep 3
pgbench -n -M prepared -h 127.0.0.1 -p "$PORT" -U postgres -c "$INSERT_CLIENTS" -j 2 -R "$WAL_RATE" -T "$WAL_SECONDS" \
  -f bench/wal_ping.sql bench >/dev/null 2>&1
sent=$(q "SELECT count(DISTINCT (user_id, props->>'n')) FROM bench.events WHERE event = 'wping'")
wait_for "SELECT count(*) >= $sent FROM nudge.enrollments WHERE trigger = 'wal_lag'" 120
worker off
read -r p50 p99 < <(q "SELECT round(1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY s)::numeric, 1),
                              round(1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY s)::numeric, 1)
                         FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(n.xmin) - pg_xact_commit_timestamp(e.xmin)) s
                                 FROM nudge.enrollments n JOIN bench.events e
                                   ON e.user_id = n.user_id AND e.event = 'wping' AND e.props->>'n' = n.key
                                WHERE n.trigger = 'wal_lag') l" | tr '|' ' ')
row "capture: WAL, $(fmt "$sent") events at $WAL_RATE/s, commit to enrollment (ms)" "-" "p50 $p50, p99 $p99" "-" "p99 < 1000"
q "SELECT nudge.drop_trigger('wal_lag')" >/dev/null
q "SELECT nudge.set_capture('immediate')" >/dev/null
q "SELECT nudge.capture_pending(100000000)" >/dev/null
q "SELECT nudge.capture_pending(100000000)" >/dev/null
fi

if only evaluation; then
# 2. Evaluation: DUE enrollments due at once, drained by the worker, vs the
# INSERT ... SELECT ... WHERE NOT EXISTS a user would schedule with pg_cron.
pause_all
q "TRUNCATE bench.events" >/dev/null; reset_nudge
"${psql[@]}" -v due="$DUE" -f bench/evaluation.sql >/dev/null
waiting=$(q "SELECT count(*) FROM nudge.enrollments WHERE state = 'waiting' AND due_at <= now()")
q "CHECKPOINT" >/dev/null
t0=$(now)
"${psql[@]}" -f bench/evaluation_baseline.sql >/dev/null
bsecs=$(since "$t0")
bcount=$(q "SELECT count(*) FROM bench.hand_outbox")
q "CHECKPOINT" >/dev/null
start=$(q "SELECT clock_timestamp()")
worker on
wait_for "SELECT NOT EXISTS (SELECT 1 FROM nudge.enrollments WHERE state = 'waiting' AND due_at <= now())" 600
worker off
read -r ncount nsecs < <(q "SELECT count(*), extract(epoch FROM max(pg_xact_commit_timestamp(xmin)) - '$start'::timestamptz)
                          FROM nudge.outbox" | tr '|' ' ')
b=$(echo "$bcount / $bsecs" | bc -l) n=$(echo "$ncount / $nsecs" | bc -l)
row "evaluation: $(fmt "$waiting") due -> $(fmt "$ncount") messages (msg/s)" "$(fmt "$b")" "$(fmt "$n")" "$(ratio "$n" "$b")" \
    ">= 20,000/s, >= 0.5"
[[ $bcount == "$ncount" ]] || echo "  note: the baseline wrote $bcount messages, pg_nudge $ncount"

fi

if only latency; then
# 4. Latency: a zero-wait trigger, events at a steady rate, event commit to outbox commit.
pause_all
reset_nudge
q "SELECT nudge.define_trigger('ping', '{\"on\": {\"event\": \"ping\"}, \"wait\": \"0 seconds\", \"template\": \"ping\"}')" >/dev/null
worker on
sleep 1
pgbench -n -M prepared -h 127.0.0.1 -p "$PORT" -U postgres -c 2 -j 2 -R "$PING_RATE" -t $((PINGS / 2)) \
  -f bench/ping.sql bench >/dev/null 2>&1
wait_for "SELECT count(*) >= $PINGS FROM nudge.outbox WHERE trigger = 'ping'" 120
worker off
read -r p50 p99 < <(q "SELECT round(1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY s)::numeric, 1),
                              round(1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY s)::numeric, 1)
                         FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(o.xmin) - pg_xact_commit_timestamp(e.xmin)) s
                                 FROM nudge.outbox o JOIN bench.events e ON e.user_id = o.user_id AND e.event = 'ping'
                                WHERE o.trigger = 'ping') l" | tr '|' ' ')
row "latency: $(fmt "$PINGS") events at $PING_RATE/s, commit to outbox (ms)" "-" "p50 $p50, p99 $p99" "-" "p50 < 100, p99 < 1000"

fi

if only outbox; then
# 3. Outbox: claim + ack by C consumers, batch B, vs the hand-written SKIP LOCKED queue.
for c in 1 4 16; do
  for b in 1 10 100; do
    r=()
    for sys in queue nudge; do
      q "SELECT bench.fill('$sys', $((b == 1 ? 60000 : b == 10 ? 200000 : 400000)))" >/dev/null
      "${psql[@]}" -c "VACUUM ANALYZE nudge.outbox" -c "VACUUM ANALYZE bench.queue" -c "CHECKPOINT" >/dev/null
      r+=("$(target/release/nudge-bench outbox "host=127.0.0.1 port=$PORT user=postgres dbname=bench" "$sys" "$c" "$b" "$OUTBOX_SECONDS")")
    done
    row "outbox: claim + ack, $c consumer(s), batch $b (msg/s)" "$(fmt "${r[0]}")" "$(fmt "${r[1]}")" "$(ratio "${r[1]}" "${r[0]}")" "$( ((b > 1)) && echo '>= 0.7' || echo -)"
  done
done

fi

if only mailer; then
# 4. nudge-mailer against Postfix's own load generator: smtp-sink receives for
#    both; smtp-source sends the same count and size with as many sessions.
MAIL_N=${BENCH_MAIL:-20000}
MAIL_C=${BENCH_MAIL_CONCURRENCY:-4}
SINK=127.0.0.1:$((PORT + 7))
if ! command -v smtp-sink >/dev/null; then
  echo "bench: installing Postfix for smtp-sink and smtp-source (it is not started)"
  SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postfix >/dev/null
fi
sink_user=(); [[ $(id -u) == 0 ]] && sink_user=(-u postfix)
smtp-sink "${sink_user[@]}" "$SINK" 256 &
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null || true; scripts/cluster.sh stop "$DIR"' EXIT
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/${SINK%:*}/${SINK#*:}") 2>/dev/null && break; sleep 0.1; done
q "SELECT bench.fill('nudge', $MAIL_N)" >/dev/null
# the size of what the mailer sends: the html part and about 700 bytes of headers
size=$(q "SELECT avg(length(html))::int + 700 FROM nudge.outbox")
r=()
for round in $(seq 1 "$ROUNDS"); do
  t=$(now); smtp-source -s "$MAIL_C" -m "$MAIL_N" -l "$size" -f bench@shop.example -t u1@shop.example "$SINK"
  r+=("$(echo "$MAIL_N / $(since "$t")" | bc -l)")
done
base=$(best "${r[@]}")
r=()
for round in $(seq 1 "$ROUNDS"); do
  q "UPDATE nudge.outbox SET status = 'pending', available_at = now(), checked_at = now(), attempts = 0, claimed_by = NULL" >/dev/null
  "${psql[@]}" -c "VACUUM ANALYZE nudge.outbox" >/dev/null
  t=$(now)
  target/release/nudge-mailer --once --concurrency "$MAIL_C" --batch 50 --smtp-host "${SINK%:*}" --smtp-port "${SINK#*:}" \
    --database-url "host=127.0.0.1 port=$PORT user=postgres dbname=bench" 2>/dev/null
  r+=("$(echo "$MAIL_N / $(since "$t")" | bc -l)")
  sent=$(q "SELECT count(*) FROM nudge.outbox WHERE status = 'sent'")
  [[ $sent == "$MAIL_N" ]] || { echo "bench: the mailer sent $sent of $MAIL_N"; exit 1; }
done
ours=$(best "${r[@]}")
row "mailer: $(fmt "$MAIL_N") messages of $size bytes into smtp-sink, $MAIL_C sessions (msg/s)" "$(fmt "$base")" "$(fmt "$ours")" "$(ratio "$ours" "$base")" ">= 0.5, >= 2,000/s"
kill $sink_pid 2>/dev/null || true
fi

{
  echo "# pg_nudge benchmark results"
  echo
  echo "\`make bench\` on $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo "Machine: $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(uname -sr)."
  echo "Server: $(q 'SELECT version()' | cut -d, -f1), one cluster for baseline and pg_nudge, settings:"
  echo "\`fsync=off $(printf '%s ' "${SETTINGS[@]}")\` (fsync off: the ratios show CPU cost, not disk flushes)."
  echo "The mailer part: nudge-mailer (release) and Postfix's smtp-source (the baseline) into one smtp-sink."
  echo "Data: $(fmt "$EVENTS") events, Zipf (s = 1.07) over $(fmt "$USERS") users, fixed seed (bench/gen_events.py);"
  echo "the COPY left $(fmt "$enrolled") enrollments. Figures are the best of $ROUNDS rounds where rounds are run."
  [[ -z ${BENCH_ONLY:-} ]] || echo "Only these parts were run: $BENCH_ONLY."
  echo
  echo "| measure | baseline | pg_nudge | ratio | target |"
  echo "|---|---:|---:|---:|---|"
  printf '%s\n' "${rows[@]}"
} > "$RESULTS"
echo
echo "written to $RESULTS"
