#!/usr/bin/env bash
# The scale benchmark against real servers (issue 13, docs/scale.md): an AD-shaped OpenLDAP, the
# ConfigMgr views on PostgreSQL through the PostgreSQL ODBC driver, and the Graph simulator, holding a
# seeded estate of N users; the exporter runs as a subprocess and is measured from the outside.
# Not part of the test run. Installs what is missing (slapd and ldap-utils here; PostgreSQL, unixODBC,
# the drivers and the Python packages through scripts/install-test-deps.sh), then runs
#
#   python3 -m benchmarks.scale run "$@"        (default: --users 10000)
#
# e.g. scripts/bench-scale.sh --users 500000 --json /tmp/scale-500k.json
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
for pkg in slapd ldap-utils; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No default directory and no system daemon: the benchmark runs its own slapd on high ports
  # (389/636 belong to the test suite's Samba AD DC).
  echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
scripts/install-test-deps.sh

if [ "$#" -eq 0 ]; then
  set -- --users 10000
fi
exec python3 -m benchmarks.scale run "$@"
