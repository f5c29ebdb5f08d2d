-- wrk script of `make loadtest`: POST one image (the file named by LOADTEST_IMAGE) to the URL,
-- then print one line "LOADTEST_JSON {...}" with the counts and latency percentiles (microseconds),
-- which localcloud/loadtest.py reads (wrk --latency prints no p95).
local path = assert(os.getenv("LOADTEST_IMAGE"), "set LOADTEST_IMAGE to the image to POST")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = os.getenv("LOADTEST_CONTENT_TYPE") or "image/png"

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'LOADTEST_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p95": %d, "p99": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99)))
end
