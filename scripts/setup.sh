#!/usr/bin/env bash
# Installs what building and testing pg_nudge needs, skipping what is there.
# Idempotent: a warm machine pays only for the checks.
set -euo pipefail
PGRX_VERSION=0.18.1
SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo

need_apt=()
for pkg in postgresql-15 postgresql-server-dev-15 postgresql-contrib clang libclang-dev sudo pkg-config bc curl openssl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian starts a cluster on 5432 when it installs the server; we run our own.
$SUDO pg_ctlcluster 15 main stop >/dev/null 2>&1 || true

# A real SMTP server for the mailer's tests and the demo: aiosmtpd (PyPI).
if ! command -v python3 >/dev/null; then
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-pip >/dev/null
fi
# and the analytics vendors' official SDKs, pointed at nudge-gateway in its tests
need_py=()
python3 -c 'import aiosmtpd' 2>/dev/null || need_py+=(aiosmtpd)
python3 -c 'import segment.analytics' 2>/dev/null || need_py+=(segment-analytics-python)
python3 -c 'import amplitude' 2>/dev/null || need_py+=(amplitude-analytics)
python3 -c 'import mixpanel' 2>/dev/null || need_py+=(mixpanel)
if ((${#need_py[@]})); then
  echo "setup: installing ${need_py[*]}"
  python3 -m pip install -q --disable-pip-version-check "${need_py[@]}" 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${need_py[@]}"
fi

export PATH="$HOME/.cargo/bin:$PATH"
if [[ $(cargo pgrx --version 2>/dev/null) != "cargo-pgrx $PGRX_VERSION" ]]; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (about 5 minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
if ! grep -qs 'pg15' "$HOME/.pgrx/config.toml"; then
  cargo pgrx init --pg15 "$(command -v pg_config || echo /usr/bin/pg_config)"
fi
