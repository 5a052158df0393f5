-- wrk script: heartbeats of droplets 1..1000 at random, each an envelope with metrics.
-- TOKEN: an admin token (it may heartbeat any droplet).
local token = os.getenv("TOKEN")
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("id", thread_id)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

function request()
  local d = math.random(1, 1000)
  local body = string.format(
    '{"udc_version":"1.0","trace_id":"00000000-0000-4000-8000-%012d","source":%d,"target":10,'
      .. '"message_type":"heartbeat","timestamp":"2026-12-06T12:00:00Z",'
      .. '"payload":{"status":"active","metrics":{"cpu_percent":12.5,"memory_mb":256}}}',
    math.random(0, 999999999999), d)
  return wrk.format("POST", "/droplets/" .. d .. "/heartbeat",
    { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token }, body)
end
