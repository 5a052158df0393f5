#!/usr/bin/env bash
# The Python client library's tests (clients/python) against the real service binary and a
# real PostgreSQL: builds the binary if needed, makes a throwaway venv, installs the library
# with its test extras, runs pytest. Each run makes one orch_test_py_* database and drops it.
#
# Needs: cargo, python3 (3.10+), psql, PostgreSQL at TEST_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432). Set PYTHON to choose the interpreter; extra
# arguments go to pytest (e.g. -k redelivery).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed"'
command -v psql >/dev/null || { echo "python-client-test: psql is needed (apt-get install postgresql-client)" >&2; exit 1; }
cargo build --quiet --bin orchestrator
VENV=$(mktemp -d "${TMPDIR:-/tmp}/orch-pyclient.XXXXXX")
trap 'rm -rf "$VENV"' EXIT
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "./clients/python[test]"
cd clients/python
ORCHESTRATOR_BIN="$OLDPWD/target/debug/orchestrator" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
