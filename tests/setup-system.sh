#!/usr/bin/env bash
# What the test suite needs from the machine, on Debian (apt; root, or sudo): the
# mosquitto broker, PostgreSQL on 127.0.0.1:5432 with a database `test` that user
# postgres may use without a password, libfaketime (package faketime: the HIL clock-step
# scenario), FUSE 3 (package fuse3: the HIL power-loss filesystem), chromium (the
# console's browser tests drive it through Playwright, which downloads nothing) and
# systemd (its systemd-analyze verifies the shipped units; nothing is started). Installs the
# packages that are missing and starts the services that are not running; on a machine
# that has it all, it changes nothing, so the README's test command runs it every time.
set -euo pipefail

PACKAGES=(mosquitto postgresql faketime fuse3 procps chromium systemd)  # procps: pgrep, below; chromium: the console's browser tests; systemd: systemd-analyze verifies the shipped units
PG_HOST=127.0.0.1
PG_PORT=5432

say() { echo "setup-system: $*"; }
die() { echo "setup-system: $*" >&2; exit 1; }

# root runs it all itself; anyone else asks sudo for what needs root
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && as_root=(sudo)
fi
need_root() {
    [ "$(id -u)" -eq 0 ] || [ ${#as_root[@]} -gt 0 ] || die "$1: run as root (or install sudo)"
}

# -- packages ---------------------------------------------------------------------------
installed_postgresql=no
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for pkg in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = installed ] || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        need_root "to install ${missing[*]}"
        say "installing ${missing[*]}"
        "${as_root[@]}" apt-get update -qq
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
        for pkg in "${missing[@]}"; do
            [ "$pkg" = postgresql ] && installed_postgresql=yes
        done
    fi
else
    say "not a Debian machine: install ${PACKAGES[*]} (or their equivalents) yourself"
fi

# -- services ---------------------------------------------------------------------------
# the broker on 1883 (most tests start a private one of their own besides)
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    if ! pgrep -x mosquitto >/dev/null 2>&1; then
        say "starting mosquitto"
        PATH="$PATH:/usr/sbin" "${as_root[@]}" mosquitto -d -c /etc/mosquitto/mosquitto.conf \
            || say "mosquitto did not start; the tests that need 1883 will say so"
    fi
fi

if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    [ -n "$version" ] || die "PostgreSQL is not installed (no cluster in /etc/postgresql)"
    need_root "to start PostgreSQL $version"
    say "starting PostgreSQL $version"
    "${as_root[@]}" pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" && break
        sleep 1
    done
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" || die "PostgreSQL does not answer on $PG_HOST:$PG_PORT"
fi

# -- the tests' database ----------------------------------------------------------------
pg_test() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d test -Atqc 'SELECT 1' >/dev/null 2>&1; }
if command -v psql >/dev/null 2>&1 && ! pg_test; then
    need_root "to set up the database test"
    version=$(ls /etc/postgresql | sort -V | tail -1)
    if [ "$installed_postgresql" = yes ]; then
        # a cluster installed just now, for the tests: user postgres over loopback, no password
        hba=/etc/postgresql/$version/main/pg_hba.conf
        say "letting user postgres in over $PG_HOST without a password ($hba)"
        "${as_root[@]}" sed -i "1i host all postgres $PG_HOST/32 trust" "$hba"
        "${as_root[@]}" pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    fi
    if ! "${as_root[@]}" runuser -u postgres -- psql -Atqc \
        "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
        say "creating the database test"
        "${as_root[@]}" runuser -u postgres -- createdb test
    fi
    pg_test || die "user postgres cannot open the database test on $PG_HOST:$PG_PORT; add
  host all postgres $PG_HOST/32 trust
to the top of /etc/postgresql/$version/main/pg_hba.conf and reload PostgreSQL"
fi
say "ready"
