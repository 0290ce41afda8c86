-- release: give back slots and fold the outcomes into the statistics, with the same
-- arithmetic as MemoryRegistry.release (Lua numbers are doubles too; %.17g writes
-- them back without loss). No prelude: KEYS are worker hashes (one may come more
-- than once); ARGV[1] the EWMA weight, then for each key its latency in ms ('' = none)
-- and '1' if ok.
local alpha = tonumber(ARGV[1])
for k, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local f = redis.call('HMGET', key, 'in_flight', 'completed', 'errors', 'latency_ms',
                         'error_rate')
    local ok, sample = ARGV[2 * k + 1] == '1', ARGV[2 * k]
    local completed, errors = tonumber(f[2]), tonumber(f[3])
    if ok then completed = completed + 1 else errors = errors + 1 end
    local error_rate = tonumber(f[5])
    error_rate = error_rate + alpha * ((ok and 0.0 or 1.0) - error_rate)
    local latency = tonumber(f[4])
    if sample ~= '' then
      if completed + errors == 1 then
        latency = tonumber(sample)
      else
        latency = latency + alpha * (tonumber(sample) - latency)
      end
    end
    redis.call('HSET', key,
      'in_flight', string.format('%d', math.max(0, tonumber(f[1]) - 1)),
      'completed', string.format('%d', completed),
      'errors', string.format('%d', errors),
      'latency_ms', string.format('%.17g', latency),
      'error_rate', string.format('%.17g', error_rate))
  end
end
return 1
