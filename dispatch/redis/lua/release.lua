-- release: give back slots and fold the outcomes into the statistics, with the same
-- arithmetic as WorkerEntry.record (Lua numbers are doubles too; %.17g writes them back
-- without loss). No prelude: KEYS are worker hashes (one may come more than once);
-- ARGV[1] the EWMA weight, ARGV[2] now, ARGV[3] the latency every estimate decays to,
-- ARGV[4] seconds of that decay, then for each key its latency in ms ('' = none) and
-- its outcome: '1' ok, '0' an infrastructure failure, '' the slot was not used.
-- Returns, for each key, {failures in a row, was it probing ('1'/'0'), ejected_until}
-- ({} for a worker that is gone): the broker decides about ejection.
local alpha, now, floor, tau = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local out = {}
for k, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    out[#out + 1] = {}
  else
    local f = redis.call('HMGET', key, 'in_flight', 'completed', 'errors', 'latency_ms',
                         'error_rate', 'latency_at', 'failures', 'probing', 'ejected_until')
    local outcome, sample = ARGV[2 * k + 4], ARGV[2 * k + 3]
    local fields = {'in_flight', string.format('%d', math.max(0, tonumber(f[1]) - 1))}
    local failures, probing = tonumber(f[7] or '0'), f[8] or '0'
    if outcome ~= '' then
      local ok = outcome == '1'
      local completed, errors = tonumber(f[2]), tonumber(f[3])
      if ok then
        completed, failures, probing = completed + 1, 0, '0'
      else
        errors, failures = errors + 1, failures + 1
      end
      local error_rate = tonumber(f[5])
      error_rate = error_rate + alpha * ((ok and 0.0 or 1.0) - error_rate)
      local latency, latency_at = tonumber(f[4]), tonumber(f[6] or '0')
      local fresh = ok and f[8] == '1'  -- a probe that succeeded: a clean slate
      if fresh then error_rate = 0.0 end
      if fresh and sample ~= '' then
        latency, latency_at = tonumber(sample), now
      elseif sample ~= '' then
        local current = math.max(latency, floor)  -- balancing.decayed, then peak_ewma
        if latency > floor and latency_at > 0 then
          current = floor + (latency - floor) * math.exp(-math.max(0, now - latency_at) / tau)
        end
        local s = tonumber(sample)
        if s > current then latency = s else latency = current + alpha * (s - current) end
        latency_at = now
      end
      for _, pair in ipairs({
          {'completed', string.format('%d', completed)},
          {'errors', string.format('%d', errors)},
          {'latency_ms', string.format('%.17g', latency)},
          {'latency_at', string.format('%.17g', latency_at)},
          {'error_rate', string.format('%.17g', error_rate)},
          {'failures', string.format('%d', failures)},
          {'probing', probing}}) do
        fields[#fields + 1] = pair[1]
        fields[#fields + 1] = pair[2]
      end
    end
    redis.call('HSET', key, unpack(fields))
    out[#out + 1] = {failures, f[8] or '0', f[9] or '0'}
  end
end
return out
