-- candidates: the first half of reserve, for one or more commands at once. KEYS[2] the
-- round-robin counter; ARGV[3] key TTL (ms), ARGV[4] how many choices will be made,
-- ARGV[5..] pairs of a command and how many of its workers to look at (a random sample
-- if more offer it; 0: all). Returns {seq, {{total, rows}, ...}} with one
-- pair per command: total is how many live workers offer it; rows are the ones looked
-- at (all, or a random sample), as {id, weight, in_flight, max_concurrency, draining,
-- latency_ms, latency_at, error_rate, ejected_until, probing, labels, version}; the
-- broker chooses among them in Python (dispatch/core/balancing.py). seq is the global
-- sequence number of the last of the choices (INCRBY their number).
local found = {}
for i = 5, #ARGV, 2 do
  local set, sample = command_key(ARGV[i]), tonumber(ARGV[i + 1])
  local ids
  local total = redis.call('SCARD', set)
  if sample > 0 and total > sample then
    ids = redis.call('SRANDMEMBER', set, sample)
  else
    ids = redis.call('SMEMBERS', set)
  end
  local rows = {}
  for _, id in ipairs(ids) do
    if not alive(id) then
      redis.call('SREM', set, id)  -- left behind by a hash that expired
      total = total - 1
    else
      rows[#rows + 1] = {id, unpack(redis.call('HMGET', worker_key(id), 'weight', 'in_flight',
        'max_concurrency', 'draining', 'latency_ms', 'latency_at', 'error_rate',
        'ejected_until', 'probing', 'labels', 'version'))}
    end
  end
  found[#found + 1] = {total, rows}
end
local seq = redis.call('INCRBY', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {seq, found}
