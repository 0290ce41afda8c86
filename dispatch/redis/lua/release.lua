-- release: give back slots and fold the outcomes into the statistics, with the same
-- arithmetic as WorkerEntry.record (Lua numbers are doubles too; %.17g writes them back
-- without loss). No prelude: KEYS are worker hashes (one may come more than once);
-- ARGV[1] the EWMA weight, ARGV[2] now, ARGV[3] the latency every estimate decays to,
-- ARGV[4] seconds of that decay, ARGV[5] the most a peak may raise it by, then for
-- each key its latency in ms ('' = none) and its outcome: '1' ok, '0' an
-- infrastructure fault, 'e' a handler's unmeant error, '' no verdict (balancing.Health).
-- Returns, for each key, {failures in a row, was it probing ('1'/'0'), ejected_until}
-- ({} for a worker that is gone): the broker decides about ejection.
local alpha, now, floor, tau, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for k, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    out[#out + 1] = {}
  else
    local f = redis.call('HMGET', key, 'in_flight', 'completed', 'errors', 'latency_ms',
                         'error_rate', 'latency_at', 'failures', 'probing', 'ejected_until')
    local outcome, sample = ARGV[2 * k + 5], ARGV[2 * k + 4]
    local completed, errors, error_rate = tonumber(f[2]), tonumber(f[3]), tonumber(f[5])
    local failures, probing = tonumber(f[7] or '0'), f[8] or '0'
    local ok = outcome == '1'
    if ok then
      completed, failures, probing = completed + 1, 0, '0'
    elseif outcome ~= '' then  -- 'e' a handler's unmeant error, '0' a fault
      errors = errors + 1
      if outcome == '0' then failures = failures + 1 end
    end
    if outcome ~= '' then error_rate = error_rate + alpha * ((ok and 0.0 or 1.0) - error_rate) end
    local fresh = ok and f[8] == '1'  -- a probe that succeeded: a clean slate
    if fresh then error_rate = 0.0 end
    local latency, latency_at = tonumber(f[4]), tonumber(f[6] or '0')
    if sample ~= '' and (fresh or latency_at <= 0) then  -- peak_ewma: the first whole
      latency, latency_at = tonumber(sample), now
    elseif sample ~= '' then
      local current = math.max(latency, floor)  -- balancing.decayed, then peak_ewma
      if latency > floor then
        current = floor + (latency - floor) * math.exp(-math.max(0, now - latency_at) / tau)
      end
      local s = tonumber(sample)
      if s > current then
        latency = math.min(s, current * step)
      else
        latency = current + alpha * (s - current)
      end
      latency_at = now
    end
    redis.call('HSET', key, 'in_flight', string.format('%d', math.max(0, tonumber(f[1]) - 1)),
      'completed', string.format('%d', completed), 'errors', string.format('%d', errors),
      'latency_ms', string.format('%.17g', latency),
      'latency_at', string.format('%.17g', latency_at),
      'error_rate', string.format('%.17g', error_rate),
      'failures', string.format('%d', failures), 'probing', probing)
    out[#out + 1] = {failures, f[8] or '0', f[9] or '0'}
  end
end
return out
