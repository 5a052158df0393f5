#!/usr/bin/env bash
# Refreshes .sqlx, the offline data of the compile-time-checked queries (sqlx::query! and its
# kin), from a fresh database with every migration applied; or, with --check, fails when the
# committed data is not what the code and migrations give. Needs PostgreSQL (as the tests do);
# a plain `cargo build` never does.
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = "--check" ] && check=true

host=${PGHOST:-127.0.0.1}
db="orch_test_sqlx_$$"
url="postgres://postgres@${host}:5432/${db}"
out=$(mktemp -d)
cleanup() {
  psql -q -U postgres -h "$host" -d postgres -c "DROP DATABASE IF EXISTS ${db}" >/dev/null 2>&1 || true
  rm -rf "$out"
}
trap cleanup EXIT
psql -q -U postgres -h "$host" -d postgres -c "CREATE DATABASE ${db}" >/dev/null
for m in migrations/*.sql; do
  # Each in one transaction, as sqlx applies them.
  psql -q -1 -v ON_ERROR_STOP=1 -U postgres -h "$host" -d "$db" -f "$m" >/dev/null
done

# The macros describe each query against that database and write one file per query into
# SQLX_OFFLINE_DIR. The package is cleaned first so that every macro runs again.
cargo clean -q -p orchestrator
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$out" DATABASE_URL="$url" cargo check -q --all-targets

if $check; then
  if ! diff -r -q "$out" .sqlx; then
    echo "sqlx-prepare: .sqlx is out of date; run scripts/sqlx-prepare.sh and commit it" >&2
    exit 1
  fi
  echo "sqlx-prepare: .sqlx is up to date ($(ls .sqlx | wc -l) queries)"
else
  rm -rf .sqlx
  cp -r "$out" .sqlx
  echo "sqlx-prepare: wrote $(ls .sqlx | wc -l) queries to .sqlx"
fi
