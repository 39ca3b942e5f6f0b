-- Cycles through pre-signed bodies: BENCH_BODIES names a file of "signature<TAB>body" lines.
-- Thread k of n sends lines k, k+n, k+2n, ...; done() prints one JSON line of figures.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local n = tonumber(os.getenv("BENCH_THREADS") or "1")
  local path = os.getenv("BENCH_BODIES")
  requests = {}
  local i = 0
  for line in io.lines(path) do
    if i % n == tid then
      local tab = string.find(line, "\t", 1, true)
      local sig = string.sub(line, 1, tab - 1)
      local body = string.sub(line, tab + 1)
      table.insert(requests, wrk.format("POST", "/webhooks/runflow",
        {["Content-Type"] = "application/json", ["Runflow-Signature"] = sig}, body))
    end
    i = i + 1
  end
  index = 0
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "non2xx": %d, "errors": %d, "p50_ms": %.2f, "p99_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
