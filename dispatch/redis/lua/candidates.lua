-- candidates: the first half of reserve, for one or more pools at once. KEYS[2] the
-- round-robin counter; ARGV[3] key TTL (ms), ARGV[4] how many choices will be made,
-- ARGV[5] a random seed, ARGV[6] the affinity salt, ARGV[7..] quadruples of a command, how many of its workers to
-- look at (a random sample if more are there; 0: all), a selector (JSON list of
-- [name, value] pairs, '' for none: then only the workers with all those labels, found
-- by intersecting the label sets, never by a scan; if none has them, a few of the
-- others, so that the broker can say which selector matched nobody) and an affinity
-- key ('' for none; without a selector: the first few distinct workers clockwise from
-- the key's point on the command's ring, in that order). Returns {seq, {{total, rows}, ...}}
-- with one pair per triple: total is how many live workers are in the pool; rows are
-- the ones looked at, as {id, weight, in_flight, max_concurrency, draining,
-- latency_ms, latency_at, error_rate, ejected_until, probing, labels, version}; the
-- broker chooses among them in Python (dispatch/core/balancing.py). seq is the global
-- sequence number of the last of the choices (INCRBY their number).
math.randomseed(tonumber(ARGV[5]))
local found = {}
-- The first `count` distinct workers clockwise from `key`'s point on `command`'s ring.
local function successors(command, key, count)
  local ring, point, ids, seen = ring_key(command), ring_point(ARGV[6], key), {}, {}
  for _, range in ipairs({{point, '+inf'}, {'-inf', '+inf'}}) do  -- then round again
    local offset = 0
    while #ids < count do
      local members = redis.call('ZRANGEBYSCORE', ring, range[1], range[2], 'LIMIT', offset,
                                 4 * count)
      for _, member in ipairs(members) do
        local id = string.match(member, '^(.*)#%d+$')
        if not seen[id] then
          seen[id] = true
          ids[#ids + 1] = id
          if #ids == count then break end
        end
      end
      if #members < 4 * count then break end
      offset = offset + #members
    end
    if #ids == count then break end
  end
  return ids
end

for i = 7, #ARGV, 4 do
  local set, sample = command_key(ARGV[i]), tonumber(ARGV[i + 1])
  local ids, total
  if ARGV[i + 3] ~= '' and ARGV[i + 2] == '' then
    total = redis.call('SCARD', set)
    ids = successors(ARGV[i], ARGV[i + 3], sample > 0 and sample or total)
  elseif ARGV[i + 2] ~= '' then
    local sets = {set}
    for _, pair in ipairs(cjson.decode(ARGV[i + 2])) do
      sets[#sets + 1] = label_key(pair[1], pair[2])
    end
    ids = redis.call('SINTER', unpack(sets))
    total = #ids
    if total == 0 then  -- matched nobody: a few others, for choose() to say so
      ids = redis.call('SRANDMEMBER', set, 8)
      total = #ids
    elseif sample > 0 and total > sample then  -- a partial Fisher-Yates shuffle
      for j = 1, sample do
        local k = math.random(j, total)
        ids[j], ids[k] = ids[k], ids[j]
      end
      for j = total, sample + 1, -1 do ids[j] = nil end
    end
  else
    total = redis.call('SCARD', set)
    if sample > 0 and total > sample then
      ids = redis.call('SRANDMEMBER', set, sample)
    else
      ids = redis.call('SMEMBERS', set)
    end
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
