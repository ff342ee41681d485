#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster for tests and the demo.
#   scripts/cluster.sh start DIR PORT [extra postgres -c options...]
#   scripts/cluster.sh stop DIR
# As root, the cluster runs as the postgres user (PostgreSQL refuses root).
set -euo pipefail
cmd=$1 dir=$2
bin=$(pg_config --bindir)
# a backtrace in every ERROR detail would make outputs differ between machines
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
if [[ $(id -u) == 0 ]]; then as=(runuser -u postgres --); else as=(); fi

case $cmd in
start)
  port=$3; shift 3
  if [[ -f $dir/postmaster.pid ]]; then "${as[@]}" "$bin/pg_ctl" -D "$dir" -m fast stop >/dev/null 2>&1 || true; fi
  rm -rf "$dir"
  mkdir -p "$dir"
  [[ $(id -u) == 0 ]] && chown postgres "$dir"
  "${as[@]}" "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  opts="-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=/tmp -c fsync=off -c timezone=UTC"
  # output_plugin_libraries (which logical decoding plugins the server
  # allows, for WAL capture) exists only in some builds of PostgreSQL 15
  known=$("${as[@]}" "$bin/postgres" --describe-config 2>/dev/null | cut -f1)
  for o in "$@"; do
    if [[ $o == output_plugin_libraries=* ]] && ! grep -qx output_plugin_libraries <<<"$known"; then continue; fi
    opts+=" -c $o"
  done
  "${as[@]}" "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -o "$opts" -w start >/dev/null
  ;;
stop)
  if [[ -f $dir/postmaster.pid ]]; then "${as[@]}" "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null; fi
  ;;
*) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
