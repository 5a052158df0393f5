#!/usr/bin/env bash
# Issue 26's independent check, outside the load bench: the release server on a fresh
# database with the bench's 1,000 droplets (benches/load/mix.rs: every tenth capable of one of
# the five capabilities, those of two of them with contracts), routing paused; POST /tasks of the
# mix with wrk, then heartbeats with wrk; then pgbench running the spec's SQL as one statement
# (create.sql, heartbeat.sql) on the same database, 8 and 64 clients. Prints each figure and
# the ratios, and the CPU per request of the server and of its PostgreSQL backends (from
# /proc: run it on the database's machine). Needs wrk, pgbench, psql, curl, python3 and
# `cargo build --release`.
#
#   scripts/independent/run.sh            # 10 s per run, 64 connections, 2 wrk threads
#   SECONDS_EACH=30 CONNECTIONS=64 scripts/independent/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
here=scripts/independent
host=${PGHOST:-127.0.0.1}
db="orch_independent_$$"
url="postgres://postgres@${host}:5432/${db}"
port=${PORT:-18426}
secs=${SECONDS_EACH:-10}
conns=${CONNECTIONS:-64}
bin=${ORCHESTRATOR_BIN:-target/release/orchestrator}
base="http://127.0.0.1:${port}"
secret="independent-check-secret-0123456789abcdef"

server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  psql -q -U postgres -h "$host" -d postgres -c "DROP DATABASE IF EXISTS ${db} WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

env -i PATH="$PATH" DATABASE_URL="$url" PORT="$port" HOST=127.0.0.1 ENVIRONMENT=development \
  JWT_SECRET_KEY="$secret" DROPLET_ID=1000000 LOG_LEVEL=ERROR \
  DATABASE_POOL_SIZE=8 DATABASE_MAX_OVERFLOW=0 HEARTBEAT_TIMEOUT=3600 HEARTBEAT_CHECK_INTERVAL=3600 \
  RATE_LIMIT_PER_MINUTE=10000000 ASSIGNMENT_TIMEOUT_SECONDS=3600 "$bin" >/dev/null &
server=$!
for _ in $(seq 1 600); do
  curl -fs "$base/health" >/dev/null 2>&1 && break
  sleep 0.1
done

token() { # droplet id, permissions as a JSON list
  curl -fs -X POST "$base/token" -H 'Content-Type: application/json' \
    -d "{\"droplet_id\": $1, \"permissions\": $2}" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("access_token") or d["payload"]["access_token"])'
}
admin=$(token 1 '["read","write","admin"]')
writer=$(token 5 '["read","write"]')

# The mix's droplets, 16 registrations at a time (as the bench registers them).
python3 - "$base" "$admin" <<'EOF'
import json, sys, uuid, urllib.request
from concurrent.futures import ThreadPoolExecutor
base, admin = sys.argv[1], sys.argv[2]
caps = ["verify", "ocr", "translate", "summarize", "classify"]
def droplet(i):
    if i % 10 != 0:
        return [f"other-{i % 37}", "storage"], {}
    k = (i // 10) % 5
    c = caps[k]
    schemas = {c: {"type": "object", "required": ["document", "language"],
                   "properties": {"document": {"type": "string", "maxLength": 4096},
                                  "language": {"enum": ["en", "fr", "de"]},
                                  "pages": {"type": "integer", "minimum": 1}}}} if k < 2 or (k == 2 and i % 20 == 0) else {}
    return [c, "storage"], schemas
def register(i):
    capabilities, schemas = droplet(i)
    body = {"trace_id": str(uuid.uuid4()), "source": i, "target": 10, "message_type": "command",
            "timestamp": "2026-12-06T12:00:00Z",
            "payload": {"droplet_id": i, "name": f"mix-{i}", "steward": "bench",
                        "endpoint": f"http://127.0.0.1:9/d/{i}", "capabilities": capabilities,
                        "capability_schemas": schemas}}
    req = urllib.request.Request(f"{base}/droplets/register", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {admin}"})
    urllib.request.urlopen(req).read()
with ThreadPoolExecutor(16) as pool:
    list(pool.map(register, range(1, 1001)))
EOF
curl -fs -X POST "$base/management/scheduler/jobs/task_router/pause" -H "Authorization: Bearer $admin" >/dev/null

# CPU (utime+stime, clock ticks) of the server, and of the PostgreSQL backends serving this
# run's database (shared background processes such as the WAL writer not counted).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
backend_ticks() {
  local total=0 p
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q "postgres: .* ${db} "; then
      total=$((total + $(ticks "${p#/proc/}")))
    fi
  done
  echo "$total"
}
# Runs wrk with $1's script into /tmp/independent-$1.txt and prints the CPU per request.
measured() { # what, token
  local s0 b0 s1 b1
  s0=$(ticks "$server"); b0=$(backend_ticks)
  TOKEN="$2" wrk -t2 -c"$conns" -d"${secs}s" --latency -s "$here/$1.lua" "$base" | tee "/tmp/independent-$1.txt"
  s1=$(ticks "$server"); b1=$(backend_ticks)
  python3 -c "
import os, re
n = int(re.search(r'(\d+) requests in', open('/tmp/independent-$1.txt').read()).group(1))
us = 1e6 / os.sysconf('SC_CLK_TCK') / max(n, 1)
print(f'$1 CPU per request: server {($s1 - $s0) * us:.0f} us, PostgreSQL backends {($b1 - $b0) * us:.0f} us ({n} requests)')"
}
echo "== POST /tasks, the mix: wrk -t2 -c${conns} -d${secs}s (uptime: $(uptime | sed 's/.*load/load/'))"
measured create-mix "$writer"
cp /tmp/independent-create-mix.txt /tmp/independent-create.txt
echo "== heartbeats: wrk -t2 -c${conns} -d${secs}s"
measured heartbeat "$admin"
kill "$server"; wait "$server" 2>/dev/null || true; server=""

# The spec's SQL alone: our status-count trigger is not part of it.
psql -q -U postgres -h "$host" -d "$db" -c "ALTER TABLE tasks DISABLE TRIGGER task_counts_insert"
sql() { # script, clients
  pgbench -n -M prepared -j 2 -c "$2" -T "$secs" -f "$1" "$url" 2>/dev/null | awk '/^tps = /{print $3}'
}
rate() { awk '/^Requests\/sec:/{print $2}' "$1"; }
non2xx() { awk '/Non-2xx/{print $5}' "$1"; }
for what in create heartbeat; do
  c8=$(sql "$here/$what.sql" 8)
  c64=$(sql "$here/$what.sql" 64)
  api=$(rate "/tmp/independent-$what.txt")
  bad=$(non2xx "/tmp/independent-$what.txt")
  python3 -c "a,b,c=$api,$c8,$c64; print(f'$what: HTTP {a:.0f} req/s (${bad:-0} non-2xx) vs SQL {b:.0f} tx/s (8 clients) / {c:.0f} tx/s (64 clients): ratio {a/max(b,c):.2f} to the better')"
done
