#!/usr/bin/env bash
# make package: a Debian package of pg_nudge for PostgreSQL 15 on Debian 12,
# installable without a Rust toolchain: `apt install ./pg-nudge_<version>_<arch>.deb`.
# It holds the extension (cargo pgrx package: the library, the control file,
# the install and upgrade scripts), nudge-mailer and nudge-gateway with
# systemd units (installed, not enabled) and their /etc/default files, and
# the documentation. Writes target/package/pg-nudge_<version>-1_<arch>.deb.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
pg_major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
version=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
out=target/package
root=$out/root
rm -rf "$root" "$out/ext"
mkdir -p "$root"

echo "package: building the extension (release)"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$out/ext" >/dev/null
cp -a "$out/ext/." "$root/"
# the released install scripts: upgrades start from them (ALTER EXTENSION UPDATE)
install -m 644 sql/released/*.sql "$root$("$PG_CONFIG" --sharedir)/extension/"
for f in "$("$PG_CONFIG" --pkglibdir)/pg_nudge.so" "$("$PG_CONFIG" --sharedir)/extension/pg_nudge.control" \
         "$("$PG_CONFIG" --sharedir)/extension/pg_nudge--$version.sql"; do
  [[ -f $root$f ]] || { echo "package: $f is missing from cargo pgrx package's output"; exit 1; }
done

echo "package: building nudge-mailer and nudge-gateway (release)"
cargo build --release -p nudge-mailer -p nudge-gateway >/dev/null 2>&1 \
  || cargo build --release -p nudge-mailer -p nudge-gateway
install -D -m 755 "${CARGO_TARGET_DIR:-target}/release/nudge-mailer" "$root/usr/bin/nudge-mailer"
install -D -m 755 "${CARGO_TARGET_DIR:-target}/release/nudge-gateway" "$root/usr/bin/nudge-gateway"
strip "$root/usr/bin/nudge-mailer" "$root/usr/bin/nudge-gateway" "$root$("$PG_CONFIG" --pkglibdir)/pg_nudge.so"
for s in nudge-mailer nudge-gateway; do
  install -D -m 644 "packaging/$s.service" "$root/lib/systemd/system/$s.service"
  # it will hold passwords and signing keys: systemd (root) reads it, nobody else
  install -D -m 600 "packaging/$s.default" "$root/etc/default/$s"
done
doc=$root/usr/share/doc/pg-nudge
install -D -m 644 README.md "$doc/README.md"
install -m 644 docs/*.md "$doc/"
cat > "$doc/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pg_nudge
License: MIT
COPY

# What the binaries link against must be what Depends names: nothing but libc
# and libgcc (rustls, no OpenSSL; the extension links against the server).
for bin in "$root/usr/bin/nudge-mailer" "$root/usr/bin/nudge-gateway"; do
  extra=$(objdump -p "$bin" | awk '/NEEDED/ {print $2}' | grep -vE '^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|ld-linux.*)$' || true)
  [[ -z $extra ]] || { echo "package: $bin needs $extra, which Depends does not name"; exit 1; }
done
glibc=$(objdump -T "$root/usr/bin/nudge-mailer" "$root/usr/bin/nudge-gateway" "$root$("$PG_CONFIG" --pkglibdir)/pg_nudge.so" \
  | grep -oE 'GLIBC_[0-9]+\.[0-9]+' | sed 's/GLIBC_//' | sort -V | tail -1)

mkdir -p "$root/DEBIAN"
install -m 755 packaging/postinst packaging/prerm packaging/postrm "$root/DEBIAN/"
printf '/etc/default/nudge-mailer\n/etc/default/nudge-gateway\n' > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: pg-nudge
Version: $version-1
Architecture: $arch
Maintainer: pg_nudge developers <pg-nudge@localhost>
Installed-Size: $size
Depends: postgresql-$pg_major, libc6 (>= $glibc), libgcc-s1
Section: database
Priority: optional
Homepage: https://github.com/pg-nudge/pg_nudge
Description: behavioral triggered email inside PostgreSQL
 pg_nudge evaluates SQL-defined triggers ("added to cart and did not
 purchase within 24 hours") over event tables in a background worker and
 writes each due, personalized message to an outbox table.
 .
 This package holds the extension for PostgreSQL $pg_major (CREATE EXTENSION
 pg_nudge, with shared_preload_libraries = 'pg_nudge'), the reference SMTP
 mailer nudge-mailer and the HTTP gateway nudge-gateway, with systemd units.
CONTROL
deb=$out/pg-nudge_${version}-1_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "package: $deb ($(du -h "$deb" | cut -f1))"
