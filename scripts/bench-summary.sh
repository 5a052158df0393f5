#!/usr/bin/env bash
# /metrics/summary (and the other windowed metrics) as a quiet dashboard sees them, at a given
# history size (issue 26, item 4): N tasks spread over 30 days in a fresh database, one
# assignment history row each, the rollups folded, every job paused, wrk with 8 readers.
#   scripts/bench-summary.sh 1000 1000000
# BIN (default target/release/orchestrator) is the server; PostgreSQL as for the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/orchestrator}
host=${PGHOST:-127.0.0.1}
secret=benchmark-secret-0123456789abcdef0123456789
port=18439
for n in "$@"; do
  db="orch_bench_summary_$$_$n"
  url="postgres://postgres@${host}:5432/${db}"
  psql -q -h "$host" -U postgres -c "CREATE DATABASE ${db}"
  DATABASE_URL=$url JWT_SECRET_KEY=$secret "$bin" migrate >/dev/null
  started=$(date +%s)
  psql -q -v ON_ERROR_STOP=1 -h "$host" -U postgres -d "$db" <<SQL
INSERT INTO tasks (task_type, title, payload, priority, status, created_at, assigned_at, started_at, completed_at, retry_count)
SELECT 'type' || (g % 20), 'task ' || g, jsonb_build_object('n', g), 1 + (g % 10),
       (ARRAY['completed','completed','completed','failed','cancelled','in_progress','completed','completed'])[1 + g % 8],
       c, c + make_interval(secs => 0.05 + (g % 13) * 0.01), c + make_interval(secs => 0.1),
       CASE WHEN g % 8 = 5 THEN NULL ELSE c + make_interval(secs => 1.1 + (g % 29) * 0.1) END, g % 3
FROM generate_series(1, $n) g, LATERAL (SELECT NOW()::timestamp - make_interval(secs => g * (2592000.0 / $n)) AS c) t;
INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, changed_at)
SELECT id, 'pending', 'assigned', 'task_router', assigned_at FROM tasks;
-- The fold of services/analytics/rollups.rs::fold, as the health monitor's job runs it.
SELECT task_rollup_fold(25, 31, 32);
VACUUM ANALYZE;
SQL
  echo "== $n tasks over 30 days: loaded and folded in $(( $(date +%s) - started )) s"
  DATABASE_URL=$url PORT=$port HOST=127.0.0.1 JWT_SECRET_KEY=$secret DROPLET_ID=1000000 LOG_LEVEL=ERROR \
    DATABASE_POOL_SIZE=8 DATABASE_MAX_OVERFLOW=0 RATE_LIMIT_PER_MINUTE=10000000 "$bin" serve >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 60); do curl -s -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 1; done
  tok=$(JWT_SECRET_KEY=$secret "$bin" token --droplet-id 1 --permissions read,write,admin 2>/dev/null | tail -1)
  for job in health_monitor task_router registry_sync heartbeat_cleanup websocket_ping; do
    curl -s -o /dev/null -X POST -H "Authorization: Bearer $tok" "http://127.0.0.1:$port/management/scheduler/jobs/$job/pause"
  done
  for path in /metrics/summary "/metrics/tasks/performance?time_range=24h" "/metrics/tasks/by-type?time_range=30d" \
              "/metrics/routing?time_range=24h"; do
    echo "-- GET $path"
    wrk -t2 -c8 -d10s --latency -H "Authorization: Bearer $tok" "http://127.0.0.1:$port$path" \
      | grep -E "Requests/sec|  50%|  99%|Non-2xx"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  psql -q -h "$host" -U postgres -c "DROP DATABASE ${db}"
done
