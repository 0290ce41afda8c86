-- The worker registry's shared part: every registry script but release.lua starts
-- with this file (dispatch/redis/scripts.py joins them). Convention: KEYS[1] is the
-- heartbeats zset, ARGV[1] the key prefix ("dispatch:"), ARGV[2] the cutoff time (a
-- heartbeat older than it is dead); a script's own arguments start at ARGV[3]. Keys
-- derived from the prefix are not declared in KEYS: fine on one Redis server (and
-- with Sentinel), not on Redis Cluster.
local beats, prefix, cutoff = KEYS[1], ARGV[1], ARGV[2]

local function worker_key(id) return prefix .. 'worker:' .. id end
local function command_key(command) return prefix .. 'command:' .. command end
local function claim_key(id) return prefix .. 'claim:' .. id end
-- A dropped worker's ejection record, kept as long as its id's claim (WorkerEntry.standing).
local function standing_key(id) return prefix .. 'standing:' .. id end
-- A worker's command schemas (JSON): only describe reads them, never the hot scripts.
local function schemas_key(id) return prefix .. 'schemas:' .. id end
-- The workers with label `name` = `value` (the name's length first: no ambiguity).
local function label_key(name, value)
  return prefix .. 'label:' .. #name .. ':' .. name .. '=' .. value
end
-- A command's affinity ring (zset: "<id>#<n>" -> point), and a point on it: the first
-- 48 bits of SHA-1 of the broker's secret salt and the text, as balancing.ring_point. Each worker has RING_POINTS points there
-- (balancing.RING_POINTS: tests/test_redis_registry.py checks that they agree).
local RING_POINTS = 32
local function ring_key(command) return prefix .. 'ring:' .. command end
local function ring_point(salt, text)
  return tonumber(string.sub(redis.sha1hex(salt .. text), 1, 12), 16)
end
local function ring_members(id)
  local members = {}
  for n = 0, RING_POINTS - 1 do members[#members + 1] = id .. '#' .. n end
  return members
end

-- The label keys of a worker, from its hash's 'labels' field (JSON text, or nil).
local function label_keys(labels)
  local keys = {}
  if labels and labels ~= '' then
    for name, value in pairs(cjson.decode(labels)) do
      keys[#keys + 1] = label_key(name, value)
    end
  end
  return keys
end

-- Take a worker out of every structure; returns its old hash (flat list, maybe empty).
local function drop(id)
  local key = worker_key(id)
  local old = redis.call('HGETALL', key)
  for i = 1, #old, 2 do
    if old[i] == 'commands' then
      for _, command in ipairs(cjson.decode(old[i + 1])) do
        redis.call('SREM', command_key(command), id)
        redis.call('ZREM', ring_key(command), unpack(ring_members(id)))
      end
    elseif old[i] == 'labels' then
      for _, label in ipairs(label_keys(old[i + 1])) do
        redis.call('SREM', label, id)
      end
    end
  end
  local f = redis.call('HMGET', key, 'ejections', 'ejected_until', 'ejected_why')
  local claimed = redis.call('PTTL', claim_key(id))
  if tonumber(f[1] or '0') > 0 and claimed > 0 then
    redis.call('HSET', standing_key(id), 'ejections', f[1], 'ejected_until', f[2],
               'ejected_why', f[3] or '')
    redis.call('PEXPIRE', standing_key(id), claimed)
  end
  redis.call('DEL', key, schemas_key(id))
  redis.call('ZREM', beats, id)
  return old
end

-- The one rule for a free slot (balancing.eligible_state is its twin in Python): not
-- draining, not ejected (until `now`), not a probe already on trial, not full.
local function eligible(f, now)
  local in_flight = tonumber(f[1])
  return f[3] ~= '1' and tonumber(f[4] or '0') <= now and not (f[5] == '1' and in_flight > 0)
    and in_flight < tonumber(f[2])
end

-- Registered and heard from within the ttl (the dead are pruned just below).
local function alive(id)
  return redis.call('ZSCORE', beats, id) and redis.call('EXISTS', worker_key(id)) == 1
end

-- The compare-and-increment half of a reservation: take a slot of worker `id` if it is
-- live, offers `command` ('' = don't check) and is eligible at `now`. Returns 2 if
-- taken, 1 if it cannot take one now, 0 if it is not live or does not offer the command.
local function take(id, command, now)
  if not alive(id) then return 0 end
  if command ~= '' and redis.call('SISMEMBER', command_key(command), id) == 0 then
    return 0
  end
  local key = worker_key(id)
  local f = redis.call('HMGET', key, 'in_flight', 'max_concurrency', 'draining',
                       'ejected_until', 'probing')
  if not eligible(f, now) then return 1 end
  redis.call('HINCRBY', key, 'in_flight', 1)
  return 2
end

-- The dead are pruned before each script's own work.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', beats, '-inf', '(' .. cutoff)) do
  drop(id)
end
