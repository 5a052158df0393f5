#!/usr/bin/env bash
# The Python client library's tests (clients/python) against the real service binary and a
# real PostgreSQL: builds the binary if needed, makes a throwaway venv, installs the library
# with its test extras, runs pytest. Each run makes its orch_test_py_* databases and drops
# them (the pytest fixtures do, on failure too).
#
# Needs: cargo, python3 (3.10+) and PostgreSQL at TEST_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432); psql and Python's venv module are installed with
# apt-get when missing (as root). PYTHON chooses the interpreter; extra arguments go to
# pytest (e.g. -k redelivery).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "python-client-test: please install $*" >&2
    exit 1
  fi
}

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed"'
command -v psql >/dev/null || apt_install postgresql-client
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv

cargo build --quiet --bin orchestrator
VENV=$(mktemp -d "${TMPDIR:-/tmp}/orch-pyclient.XXXXXX")
trap 'rm -rf "$VENV"' EXIT
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "./clients/python[test]"
cd clients/python
ORCHESTRATOR_BIN="$ROOT/target/debug/orchestrator" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
