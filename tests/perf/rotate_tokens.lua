-- wrk script for tests/perf/bench.py: every request carries the next token of a file, so the load comes
-- from many distinct users. Arguments (after `--`): tokens file, HTTP method, optional JSON body.
-- Requests are formatted once per thread in init(); request() only picks the next one.
-- done() prints one line, `BENCH_RESULT {...}`, that bench.py reads.

local thread_count = 0

function setup(thread)
   thread:set("thread_number", thread_count)
   thread_count = thread_count + 1
end

local requests = {}
local index = 0

function init(args)
   local path, method, body = args[1], args[2] or "GET", args[3]
   if body == "" then
      body = nil
   end
   local host = wrk.headers["Host"]
   for line in io.lines(path) do
      if #line > 0 then
         local headers = { ["Host"] = host, ["Authorization"] = "Bearer " .. line }
         if body then
            headers["Content-Type"] = "application/json"
         end
         requests[#requests + 1] = wrk.format(method, nil, headers, body)
      end
   end
   if #requests == 0 then
      error("no tokens in " .. path)
   end
   -- Threads start at different places in the list.
   local number = tonumber(thread_number) or 0
   index = (number * 7919) % #requests
end

function request()
   index = index % #requests + 1
   return requests[index]
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
