#!/usr/bin/env bash
# BENCH_CITUS=1 make bench (or bench/citus.sh after make install): pg_nudge on
# one server next to pg_nudge on a Citus cluster on this machine (a
# coordinator and two worker nodes), same data, side by side:
#   capture: one INSERT of EVENTS events into nudge.events, against the same
#     INSERT into a plain table of the same shape (distributed alike on the
#     cluster): the ratio is what capture costs the writer;
#   evaluation: nudge.run_due over every due journey (the nodes' workers
#     off): messages per second, one server against the cluster.
# Writes bench/RESULTS-citus.md. On a 2-core machine the three nodes share
# the cores: the point is that the work is split per node and nothing
# serialises on the coordinator, not the absolute numbers (docs/citus.md).
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${BENCH_CITUS_EVENTS:-100000}
USERS=${BENCH_CITUS_USERS:-10000}
SHARDS=${BENCH_CITUS_SHARDS:-8}
ROUNDS=${BENCH_ROUNDS:-2}
SINGLE_DIR=/tmp/pg_nudge-bench-single SINGLE_PORT=28860
CLUSTER_DIR=/tmp/pg_nudge-bench-citus CLUSTER_PORT=28870
RESULTS=${BENCH_CITUS_RESULTS:-bench/RESULTS-citus.md}
if [[ ! -f $(pg_config --pkglibdir)/citus.so ]]; then
  bash "${CITUS_SRC:-../shared/vendor/citus}/build.sh"
fi

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }
best_low() { printf '%s\n' "$@" | sort -g | head -1; }  # the least disturbed round

scripts/cluster.sh start "$SINGLE_DIR" "$SINGLE_PORT" shared_preload_libraries=pg_nudge \
  nudge.database=bench nudge.enabled=off shared_buffers=512MB max_wal_size=4GB
psql -X -q -h 127.0.0.1 -p "$SINGLE_PORT" -U postgres -c "CREATE DATABASE bench"
scripts/citus-cluster.sh start "$CLUSTER_DIR" "$CLUSTER_PORT" bench
trap 'scripts/cluster.sh stop "$SINGLE_DIR"; scripts/citus-cluster.sh stop "$CLUSTER_DIR"' EXIT
for i in 0 1 2; do
  psql -X -q -h 127.0.0.1 -p $((CLUSTER_PORT + i)) -U postgres -d bench \
    -c "ALTER SYSTEM SET nudge.enabled = off" -c "SELECT pg_reload_conf()" >/dev/null
done

# $1 port; the rest: psql arguments
sql() { local port=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -t -A -h 127.0.0.1 -p "$port" -U postgres -d bench "$@"; }

setup() {  # $1 port, $2 distribute (0/1)
  # (on a cluster DROP EXTENSION leaves the coordinator's copies of the
  # reference tables in schema nudge: docs/citus.md)
  sql "$1" -c "DROP EXTENSION IF EXISTS pg_nudge CASCADE" -c "DROP SCHEMA IF EXISTS nudge CASCADE" -c "DROP TABLE IF EXISTS plain_events" \
    -c "CREATE EXTENSION pg_nudge" >/dev/null 2>&1
  sql "$1" -c "CREATE TABLE plain_events (LIKE nudge.events INCLUDING DEFAULTS INCLUDING IDENTITY)" >/dev/null
  if [[ $2 == 1 ]]; then
    sql "$1" -c "SET citus.shard_count = $SHARDS" -c "SELECT count(*) FROM nudge.distribute()" \
      -c "SELECT create_distributed_table('plain_events', 'user_id', colocate_with => 'nudge.events')" >/dev/null 2>&1
  fi
  sql "$1" >/dev/null <<'SQL'
SELECT nudge.define_template('cart', 'Your cart {{ event.cart_id }}', '<p>{{ event.cart_id }}</p>');
SELECT nudge.define_trigger('cart', '{"on": {"event": "cart_added", "key": "cart_id"}, "wait": "1 hour",
  "unless": [{"event": "purchased", "same_key": true}], "template": "cart"}');
SQL
  sql "$1" -c "INSERT INTO nudge.profiles (user_id, email) SELECT 'u' || i, 'u' || i || '@example.com' FROM generate_series(0, $USERS - 1) i" >/dev/null
}

load() {  # $1 port, $2 table: seconds for one INSERT of the events
  local t; t=$(now)
  sql "$1" -c "INSERT INTO $2 (user_id, event, props, occurred_at)
    SELECT 'u' || (i % $USERS), CASE WHEN i % 10 = 0 THEN 'purchased' ELSE 'cart_added' END,
           jsonb_build_object('cart_id', 'c' || (i / $USERS) % 5), now() - interval '2 hours' + i * interval '1 ms'
      FROM generate_series(1, $EVENTS) i" >/dev/null
  since "$t"
}

measure() {  # $1 port, $2 distribute: prints capture_s plain_s eval_s messages
  local cap=() plain=() ev=() msgs=0 t
  for ((r = 0; r < ROUNDS; r++)); do
    setup "$1" "$2"
    plain+=("$(load "$1" plain_events)")
    cap+=("$(load "$1" nudge.events)")
    # passes of the worker's batch size until nothing is due, as the worker runs
    t=$(now) msgs=0
    while n=$(sql "$1" -c "SELECT nudge.run_due(now(), 5000)") && ((n > 0)); do msgs=$((msgs + n)); done
    ev+=("$(since "$t")")
  done
  echo "$(best_low "${cap[@]}") $(best_low "${plain[@]}") $(best_low "${ev[@]}") $msgs"
}

read -r s_cap s_plain s_eval s_msgs < <(measure "$SINGLE_PORT" 0)
read -r c_cap c_plain c_eval c_msgs < <(measure "$CLUSTER_PORT" 1)
[[ $s_msgs == "$c_msgs" ]] || { echo "bench: the cluster wrote $c_msgs messages, one server $s_msgs" >&2; exit 1; }

r2() { printf '%.2f' "$(echo "$1" | bc -l)"; }
table="| | one server | Citus, 3 nodes | cluster / server |
|---|---:|---:|---:|
| capture: one INSERT of $EVENTS events, seconds | $(r2 "$s_cap") | $(r2 "$c_cap") | $(r2 "$c_cap / $s_cap") |
| the same INSERT into a plain table (baseline), seconds | $(r2 "$s_plain") | $(r2 "$c_plain") | $(r2 "$c_plain / $s_plain") |
| capture ratio (capture / baseline) | $(r2 "$s_cap / $s_plain") | $(r2 "$c_cap / $c_plain") | |
| evaluation: run_due (passes of 5,000) writing $s_msgs messages, messages/s | $(printf '%.0f' "$(echo "$s_msgs / $s_eval" | bc -l)") | $(printf '%.0f' "$(echo "$c_msgs / $c_eval" | bc -l)") | $(r2 "($c_msgs / $c_eval) / ($s_msgs / $s_eval)") |"
echo "$table"
{
  echo "# pg_nudge on one server and on a Citus cluster (BENCH_CITUS=1 make bench)"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; PostgreSQL $(pg_config --version | cut -d' ' -f2), Citus 13.2.2;"
  echo "$EVENTS events of $USERS users, $SHARDS shards over 2 worker nodes, the best of $ROUNDS rounds."
  echo "All three nodes share this machine's cores: what the cluster column shows is that capture"
  echo "and evaluation run on the nodes, in parallel, and nothing serialises on the coordinator."
  echo
  echo "$table"
} > "$RESULTS"
echo "written to $RESULTS"
