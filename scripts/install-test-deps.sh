#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine (root): the real
# components the tests run (Samba AD DC, PostgreSQL, ODBC drivers, Prometheus, Alertmanager,
# promtool) and the Python packages. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  prometheus prometheus-alertmanager
  samba samba-ad-dc samba-ad-provision
  unixodbc unixodbc-dev tdsodbc odbc-postgresql libsqliteodbc
  postgresql
  chromium chromium-driver
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
