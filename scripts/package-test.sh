#!/usr/bin/env bash
# make test-package: installs the Debian package from `make package` with apt,
# as a DBA would on a server without Rust, then on a new cluster of its own
# (port 28817): the README tour, an upgrade from the released 0.6.0 scripts,
# and the packaged nudge-gateway answering /healthz. Leaves the package
# installed (`make install` overwrites its files again).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
PORT=${PACKAGE_TEST_PORT:-28817}
DIR=/tmp/pg_nudge-package
deb=$(ls -t target/package/pg-nudge_*.deb | head -1)
# a first install, as on a new server: a pg-nudge installed before (an earlier
# run here) would keep its conffiles, modes included
if dpkg -s pg-nudge >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get purge -y -qq pg-nudge >/dev/null 2>&1
fi
echo "package test: apt install ./$deb"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --reinstall "./$deb" >/tmp/pg_nudge-apt.log 2>&1 \
  || { cat /tmp/pg_nudge-apt.log; exit 1; }
owner=$(dpkg -S "$(pg_config --pkglibdir)/pg_nudge.so" | cut -d: -f1)
[[ $owner == pg-nudge ]] || { echo "package test: pg_nudge.so belongs to $owner"; exit 1; }
for f in /etc/default/nudge-mailer /etc/default/nudge-gateway; do
  [[ $(stat -c %a "$f") == 600 ]] || { echo "package test: $f is readable by others"; exit 1; }
done
for f in /usr/bin/nudge-mailer /usr/bin/nudge-gateway /lib/systemd/system/nudge-gateway.service /etc/default/nudge-mailer; do
  [[ $(dpkg -S "$f" | cut -d: -f1) == pg-nudge ]] || { echo "package test: $f is not the package's"; exit 1; }
done

# nothing from this checkout from here on: no cargo on the PATH
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
scripts/cluster.sh start "$DIR" "$PORT" shared_preload_libraries=pg_nudge nudge.database=nudge_tour
gateway_pid=
trap '[[ -n $gateway_pid ]] && kill $gateway_pid 2>/dev/null; scripts/cluster.sh stop "$DIR"' EXIT
scripts/readme-tour.sh "$PORT"
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres)
PGOPTIONS=--client-min-messages=warning "${psql[@]}" -c "DROP DATABASE IF EXISTS nudge_pkg_upgrade" -c "CREATE DATABASE nudge_pkg_upgrade"
v=$("${psql[@]}" -d nudge_pkg_upgrade -A -t -c "CREATE EXTENSION pg_nudge VERSION '0.6.0'" -c "ALTER EXTENSION pg_nudge UPDATE" \
     -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_nudge'")
[[ $v == $(dpkg-query -W -f='${Version}' pg-nudge | cut -d- -f1) ]] || { echo "package test: upgraded to $v"; exit 1; }
gw_port=$((PORT + 1))
/usr/bin/nudge-gateway --listen "127.0.0.1:$gw_port" --database-url "host=127.0.0.1 port=$PORT user=postgres dbname=nudge_tour" 2>/dev/null &
gateway_pid=$!
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$gw_port/healthz" >/dev/null && break; sleep 0.1; done
[[ $(curl -sf "http://127.0.0.1:$gw_port/healthz") == ok ]] || { echo "package test: the packaged gateway does not answer"; exit 1; }
help=$(/usr/bin/nudge-mailer --help 2>&1 || true)
grep -q -- '--smtp-host' <<<"$help" || { echo "package test: nudge-mailer does not run"; exit 1; }
echo "package test: ok (tour, upgrade from 0.6.0, gateway, mailer from the package)"
