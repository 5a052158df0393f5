#!/usr/bin/env bash
# Takes docs/dashboard.png (the README's screenshot): the live dashboard while
# `orchestrator-simulator` pushes tasks through a fresh server, shot by headless Chromium over
# chromedriver's WebDriver API. Needs PostgreSQL on 127.0.0.1:5432, chromium, chromium-driver.
# Usage: scripts/dashboard-screenshot.sh [out.png]
#   VIEWPORT (1440x1440: tall enough for the counters, the chart, 12 droplets and the first
#   tasks), WAIT_MIN/WAIT_MAX (seconds of simulation before the shot, 35/70).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-docs/dashboard.png}
bin=target/debug/orchestrator
sim_bin=target/debug/orchestrator-simulator
# Both binaries (the workspace's default members: the service and the simulator).
cargo build --quiet
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
driver_port=$(free_port)
db="orch_test_shot_$$"
url="http://127.0.0.1:$port"
log=$(mktemp)
profile=$(mktemp -d)
export JWT_SECRET_KEY="dashboard-screenshot-secret-$$-0123456789abcdef"

DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db" PORT=$port HOST=127.0.0.1 ENVIRONMENT=development \
  LOG_LEVEL=WARNING RATE_LIMIT_PER_MINUTE=1000000 HEARTBEAT_CHECK_INTERVAL=5 TASK_ROUTER_INTERVAL=1 \
  "$bin" serve >"$log" 2>&1 &
server=$!
sim=""
driver=""
cleanup() {
  for pid in $sim $driver $server; do kill "$pid" 2>/dev/null || true; done
  for pid in $sim $driver $server; do wait "$pid" 2>/dev/null || true; done
  psql -U postgres -h 127.0.0.1 -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$log" "$profile"
}
trap cleanup EXIT
for _ in $(seq 1 150); do curl -sf "$url/health" >/dev/null && break; sleep 0.2; done
curl -sf "$url/health" >/dev/null || { echo "the server did not start:"; cat "$log"; exit 1; }

chromedriver --port="$driver_port" >/dev/null 2>&1 &
driver=$!
# The chart bins per minute: start at :35 so that the shot, 35 s in, has bars in two minutes.
sleep $(((95 - 10#$(date +%S)) % 60))
sim_start=$(date +%s)
# 10 tasks a second of 500 ms keep about a dozen in progress (newest first), so finished
# tasks show among the rows in the shot too.
"$sim_bin" --url "$url" --droplets 12 --capabilities render,verify,deploy \
  --tasks-per-second 10 --duration 60 --work-ms 500 --fail-rate 0.1 --quiet >/dev/null 2>&1 &
sim=$!
admin=$("$bin" token --droplet-id 1 --steward operator --permissions read,write,admin)

URL="$url" DRIVER="http://127.0.0.1:$driver_port" TOKEN="$admin" OUT="$out" PROFILE="$profile" \
  SIM_START=$sim_start VIEWPORT=${VIEWPORT:-1440x1440} WAIT_MIN=${WAIT_MIN:-35} WAIT_MAX=${WAIT_MAX:-70} python3 - <<'PY'
"""A few WebDriver commands over urllib: sign in, wait for a busy board, save the shot."""
import base64, json, os, time, urllib.request

driver = os.environ["DRIVER"]

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(driver + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["value"]

for _ in range(100):
    try:
        if call("GET", "/status")["ready"]:
            break
    except OSError:
        pass
    time.sleep(0.1)

caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
    "binary": "/usr/bin/chromium",
    "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=" + os.environ["VIEWPORT"].replace("x", ","),
             "--user-data-dir=" + os.environ["PROFILE"]]}}}}
session = "/session/" + call("POST", "/session", caps)["sessionId"]

def js(script):
    return call("POST", session + "/execute/sync", {"script": script, "args": []})

def wait(what, script, seconds=30):
    deadline = time.time() + seconds
    while not js(script):
        if time.time() > deadline:
            raise SystemExit("timed out waiting for " + what + ":\n" + js("return document.body.innerText"))
        time.sleep(0.2)

try:
    # --window-size counts the (invisible) window frame: size the window so that the
    # viewport, which is what the screenshot shows, is exactly VIEWPORT.
    width, height = (int(v) for v in os.environ["VIEWPORT"].split("x"))
    for _ in range(3):
        inner = js("return [window.innerWidth, window.innerHeight]")
        if inner == [width, height]:
            break
        rect = call("GET", session + "/window/rect")
        call("POST", session + "/window/rect", {"width": rect["width"] + width - inner[0],
                                                 "height": rect["height"] + height - inner[1]})
    start = float(os.environ["SIM_START"])
    call("POST", session + "/url", {"url": os.environ["URL"] + "/dashboard"})
    wait("the sign-in form", "return !document.querySelector('#signin').hidden")
    field = call("POST", session + "/element", {"using": "css selector", "value": "#token-input"})
    field = next(iter(field.values()))
    call("POST", session + "/element/" + field + "/value", {"text": os.environ["TOKEN"]})
    js("document.querySelector('#signin-button').click()")
    wait("the live feeds", "return document.querySelector('#conn').dataset.state === 'live'")
    # The chart bins per minute: wait for bars in two minutes (or WAIT_MAX), and for tasks in
    # several states, finished ones among them, in the rows the shot shows.
    busy = """
      const bars = new Set([...document.querySelectorAll('#chart rect.bar')].map(r => r.getAttribute('x')));
      const shown = [...document.querySelectorAll('#tasks tbody tr')]
        .filter(r => r.getBoundingClientRect().bottom <= window.innerHeight);
      const states = new Set(shown.map(r => r.dataset.status));
      return bars.size >= 2 && states.size >= 3 && (states.has('completed') || states.has('failed'));"""
    while time.time() - start < float(os.environ["WAIT_MIN"]):
        time.sleep(1)
    # The rows move while the shot is taken: keep a shot that was busy before and after.
    while True:
        late = time.time() - start > float(os.environ["WAIT_MAX"])
        if js(busy) or late:
            png = base64.b64decode(call("GET", session + "/screenshot"))
            if late or js(busy):
                break
        time.sleep(0.5)
    with open(os.environ["OUT"], "wb") as f:
        f.write(png)
    print("page: " + js("""
      const n = k => document.querySelector('#count-' + k).textContent;
      const rows = {};
      for (const r of document.querySelectorAll('#tasks tbody tr')) rows[r.dataset.status] = (rows[r.dataset.status] || 0) + 1;
      return 'counters ' + ['pending', 'assigned', 'in_progress', 'completed', 'failed'].map(k => k + ' ' + n(k)).join(', ')
        + '; task rows ' + JSON.stringify(rows);"""))
    print("dashboard: %d bytes in %s after %.0f s" % (len(png), os.environ["OUT"], time.time() - start))
finally:
    call("DELETE", session)
PY

# Squeeze the PNG when the tools are there (lossy palette, still crisp for a UI).
if command -v pngquant >/dev/null; then pngquant --force --skip-if-larger --quality 70-95 --output "$out" -- "$out" || true; fi
if command -v optipng >/dev/null; then optipng -quiet -o2 "$out" || true; fi
echo "dashboard screenshot: $out ($(stat -c %s "$out") bytes)"
