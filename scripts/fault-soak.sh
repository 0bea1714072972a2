#!/usr/bin/env bash
# The bounded fault soak (issue 12, docs/hardening.md): real backends (an AD-shaped OpenLDAP behind a
# fault-injecting TCP proxy, the Graph simulator with its fault API, a SQLite ConfigMgr database over
# ODBC), the exporter as a process, random faults across every source for a few minutes, a scrape
# every second, then stop/damage/restart rounds on the state file. Not part of the test run.
#
#   scripts/fault-soak.sh [--minutes N] [--seed S] [--state-rounds K] [--json FILE] ...
#
# Installs what is missing (slapd, unixODBC and the SQLite ODBC driver, the Python packages), then
# runs `python3 -m benchmarks.soak "$@"`. Exit code 0 when every check passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
for pkg in slapd ldap-utils unixodbc libsqliteodbc; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No default directory and no system daemon: the soak runs its own slapd on high ports
  # (389/636 belong to the test suite's Samba AD DC).
  echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -c 'import exporter, pyodbc, ldap3, trustme' 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check -e '.[test]'

exec python3 -m benchmarks.soak "$@"
