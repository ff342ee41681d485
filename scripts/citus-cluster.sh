#!/usr/bin/env bash
# A throwaway Citus cluster on this machine: a coordinator and two worker
# nodes, each a PostgreSQL 15 of its own with citus and pg_nudge preloaded,
# the databases DB... on each (the worker serves the first), the workers
# added to the coordinator in each.
#   scripts/citus-cluster.sh start DIR PORT DB [DB...]   (ports PORT, PORT+1, PORT+2)
#   scripts/citus-cluster.sh stop DIR
set -euo pipefail
cmd=$1 dir=$2
here=$(cd "$(dirname "$0")" && pwd)
case $cmd in
start)
  port=$3; shift 3; dbs=("$@"); db=${dbs[0]}
  for i in 0 1 2; do
    # citus first in shared_preload_libraries (it insists); two-phase commit
    # for writes that touch several nodes; triggers on distributed tables are
    # how capture runs on the node that holds a shard (docs/citus.md)
    "$here/cluster.sh" start "$dir/node$i" $((port + i)) \
      shared_preload_libraries=citus,pg_nudge nudge.database="$db" \
      max_prepared_transactions=20 citus.enable_unsafe_triggers=on \
      wal_level=logical
    for d in "${dbs[@]}"; do
      psql -qX -h 127.0.0.1 -p $((port + i)) -U postgres -c "CREATE DATABASE $d" >/dev/null
      psql -qX -h 127.0.0.1 -p $((port + i)) -U postgres -d "$d" -c "CREATE EXTENSION citus" >/dev/null
    done
  done
  for d in "${dbs[@]}"; do
    psql -qX -h 127.0.0.1 -p "$port" -U postgres -d "$d" -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT citus_set_coordinator_host('127.0.0.1', $port);
SELECT citus_add_node('127.0.0.1', $((port + 1)));
SELECT citus_add_node('127.0.0.1', $((port + 2)));
SQL
  done
  ;;
stop)
  for i in 0 1 2; do "$here/cluster.sh" stop "$dir/node$i" || true; done
  ;;
*) echo "usage: $0 start DIR PORT DB [DB...] | stop DIR" >&2; exit 2 ;;
esac
