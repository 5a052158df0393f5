#!/usr/bin/env bash
# Runs the README's tour (the bash blocks between <!-- tour:start --> and <!-- tour:end -->)
# as written against a live server on a fresh database, and checks the task completed.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${ORCHESTRATOR_BIN:-target/debug/orchestrator}
[ -x "$bin" ] || cargo build --quiet
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
db="orch_test_tour_$$"
log=$(mktemp)
export ORCH="http://127.0.0.1:$port"

DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db" PORT=$port HOST=127.0.0.1 ENVIRONMENT=development \
  LOG_LEVEL=WARNING JWT_SECRET_KEY= "$bin" serve >"$log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  psql -U postgres -h 127.0.0.1 -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -f "$log"
}
trap cleanup EXIT
for _ in $(seq 1 100); do curl -sf "$ORCH/health" >/dev/null && break; sleep 0.1; done

tour=$(awk '/<!-- tour:start -->/{on=1; next} /<!-- tour:end -->/{on=0} on' README.md |
  awk '/^```bash$/{code=1; next} /^```$/{code=0; next} code')
echo "running the README tour against $ORCH"
output=$(bash -euo pipefail -c "$tour
echo TOUR_TASK=\$TASK
echo TOUR_STATUS=\$(curl -s \$ORCH/tasks/\$TASK -H \"Authorization: Bearer \$ADMIN\" | jq -r .payload.task.status)
echo TOUR_HISTORY=\$(curl -s \$ORCH/tasks/\$TASK -H \"Authorization: Bearer \$ADMIN\" | jq '.payload.task.state_history | length')")
echo "$output"
grep -q '^TOUR_STATUS=completed$' <<<"$output" || { echo "README tour: the task did not end completed"; cat "$log"; exit 1; }
grep -q '^TOUR_HISTORY=4$' <<<"$output" || { echo "README tour: expected four history rows"; exit 1; }
if grep -q '"detail"' <<<"$output"; then echo "README tour: a line answered an error"; exit 1; fi
echo "README tour: ok"
