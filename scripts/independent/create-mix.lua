-- wrk script: POST /tasks with the mix a mesh sends (issue 26): one of five capabilities, a
-- payload of about 300 bytes, a fresh trace id, and every 50th request (2 %) a repeat of the
-- thread's previous trace id (answered 200 with the same task). TOKEN: a write token.
local caps = { "verify", "ocr", "translate", "summarize", "classify" }
local langs = { "en", "fr", "de" }
local token = os.getenv("TOKEN")
local n, previous = 0, nil
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("id", thread_id)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

local function uuid()
  return string.gsub("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx", "[xy]", function(c)
    local v = (c == "x") and math.random(0, 15) or math.random(8, 11)
    return string.format("%x", v)
  end)
end

function request()
  n = n + 1
  local trace
  if n % 50 == 0 and previous then trace = previous else trace = uuid(); previous = trace end
  local k = n * 16 + (id or 0)
  local body = string.format(
    '{"udc_version":"1.0","trace_id":"%s","source":5,"target":10,"message_type":"command",'
      .. '"timestamp":"2026-12-06T12:00:00Z","payload":{"task_type":"document","title":"document %d",'
      .. '"required_capability":"%s","priority":%d,"payload":{"document":"s3://mesh-documents/2026/12/%012d/original.pdf",'
      .. '"language":"%s","pages":%d,"requested_by":"droplet-5","options":{"ocr_engine":"tesseract-5","dpi":300,'
      .. '"deskew":true,"notes":"a few hundred bytes, as the mesh\'s tasks carry"},'
      .. '"callback":"https://droplet-5.mesh.example/results/%d"}}}',
    trace, k, caps[(k % 5) + 1], 1 + k % 10, k, langs[(k % 3) + 1], 1 + k % 40, k)
  return wrk.format("POST", "/tasks",
    { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token }, body)
end
