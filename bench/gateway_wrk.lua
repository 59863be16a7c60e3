-- wrk script for bench/gateway.py: POSTs one JSON body, cycling the tenant
-- header over a small fixed set (a bounded label spread, like real traffic),
-- and prints a machine-readable summary line at the end.
--
-- Environment (set by gateway.py):
--   GATEWAY_BENCH_BODY_FILE   file holding the request body (JSON)
--   GATEWAY_BENCH_PATH        request path, e.g. /v1/chat/completions
--   GATEWAY_BENCH_TENANTS     number of distinct tenants (x-tenant-id: bench-<i>)

local body_file = assert(os.getenv("GATEWAY_BENCH_BODY_FILE"), "GATEWAY_BENCH_BODY_FILE unset")
local path = os.getenv("GATEWAY_BENCH_PATH") or "/v1/chat/completions"
local tenants = tonumber(os.getenv("GATEWAY_BENCH_TENANTS") or "8")

local f = assert(io.open(body_file, "rb"))
local body = f:read("*a")
f:close()

-- Requests are rendered once: per-request Lua work would load wrk, which
-- shares the two cores with the proxy under test.
local requests = {}
local next_index = 1

function init(args)
  for i = 1, tenants do
    requests[i] = wrk.format("POST", path, {
      ["content-type"] = "application/json",
      ["x-tenant-id"] = "bench-" .. i,
    }, body)
  end
end

function request()
  local r = requests[next_index]
  next_index = next_index % tenants + 1
  return r
end

function done(summary, latency, requests_stats)
  local e = summary.errors
  io.write(string.format(
    "GATEWAY_BENCH_RESULT {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"max_us\":%d,\"mean_us\":%.1f," ..
    "\"errors_connect\":%d,\"errors_read\":%d,\"errors_write\":%d," ..
    "\"errors_status\":%d,\"errors_timeout\":%d}\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
