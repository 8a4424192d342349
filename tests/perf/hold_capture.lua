-- wrk script for tests/perf/bench.py's "hold" scenario, a generation's flow: a user's POST /credits/holds (the
-- next token), then the worker's POST /credits/holds/<id>/capture with the service-role key, for a hold an
-- earlier answer named. Arguments (after `--`): tokens file, service-role key, hold body.
-- done() prints `BENCH_RESULT {...}`; every second request is a capture, so pairs = requests / 2.

local thread_count = 0

function setup(thread)
   thread:set("thread_number", thread_count)
   thread_count = thread_count + 1
end

local tokens = {}
local index = 0
local service_key = nil
local body = nil
-- Holds answered and not yet captured.
local pending = {}

function init(args)
   service_key, body = args[2], args[3]
   for line in io.lines(args[1]) do
      if #line > 0 then
         tokens[#tokens + 1] = line
      end
   end
   local number = tonumber(thread_number) or 0
   index = (number * 7919) % #tokens
end

local function headers(token)
   return { ["Host"] = wrk.headers["Host"], ["Authorization"] = "Bearer " .. token,
            ["Content-Type"] = "application/json" }
end

function request()
   local hold = table.remove(pending)
   if hold then
      return wrk.format("POST", "/credits/holds/" .. hold .. "/capture", headers(service_key), "{}")
   end
   index = index % #tokens + 1
   return wrk.format("POST", "/credits/holds", headers(tokens[index]), body)
end

function response(status, _, answer)
   if status == 201 then
      local id = string.match(answer, '"hold":{"id":"([%w%-]+)"')
      if id then
         pending[#pending + 1] = id
      end
   end
end

function done(summary, latency, _)
   local errors = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
         .. '"non_2xx": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
      errors.status, errors.connect, errors.read, errors.write, errors.timeout
   ))
end
