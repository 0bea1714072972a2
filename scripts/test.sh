#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, lints, type-checks and runs
# pytest (whose fixtures start Samba AD DC, PostgreSQL, Prometheus and Alertmanager on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh

echo "== ruff"
python3 -m ruff check .
python3 -m ruff format --check .
echo "== mypy"
python3 -m mypy
echo "== pytest"
set +e
python3 -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
