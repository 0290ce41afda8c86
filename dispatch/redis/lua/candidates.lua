-- candidates: the first half of reserve, for one or more commands at once. KEYS[2] the
-- round-robin counter; ARGV[3] key TTL (ms), ARGV[4] how many choices will be made,
-- ARGV[5..] the commands. Returns {seq, {{capable, rows}, ...}} with one pair per
-- command: capable is 1 if a live worker offers it; rows are those with a free slot,
-- as {id, weight, in_flight, max_concurrency, latency_ms, error_rate}. seq is the
-- global sequence number of the last of the choices (INCRBY their number), drawn only
-- when there is a choice to make (as MemoryRegistry counts).
local found, any = {}, false
for i = 5, #ARGV do
  local set = command_key(ARGV[i])
  local capable, rows = 0, {}
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    if not alive(id) then
      redis.call('SREM', set, id)  -- left behind by a hash that expired
    else
      capable = 1
      local f = redis.call('HMGET', worker_key(id), 'weight', 'in_flight', 'max_concurrency',
                           'latency_ms', 'error_rate', 'draining')
      if has_room(f[2], f[3], f[6]) then
        rows[#rows + 1] = {id, f[1], f[2], f[3], f[4], f[5]}
      end
    end
  end
  any = any or #rows > 0
  found[#found + 1] = {capable, rows}
end
local seq = 0
if any then
  seq = redis.call('INCRBY', KEYS[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return {seq, found}
