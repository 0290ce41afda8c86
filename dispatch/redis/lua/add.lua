-- add: replace any entry with the same id, unless the id belongs to another owner.
-- KEYS[2] the worker hash; ARGV[3] id, ARGV[4] heartbeat time, ARGV[5] key TTL (ms),
-- ARGV[6] commands (JSON), ARGV[7] owner, ARGV[8] claim TTL (ms), ARGV[9] the affinity
-- salt, ARGV[10] its schemas (JSON, '' for none), ARGV[11..] the entry as field/value
-- pairs. Returns the replaced hash (empty if none), or 0 if the id is taken.
local id, now, key_ttl, owner = ARGV[3], ARGV[4], ARGV[5], ARGV[7]
local held = redis.call('GET', claim_key(id))
if alive(id) then held = redis.call('HGET', worker_key(id), 'owner') end
if held and held ~= '' and held ~= owner then return 0 end
redis.call('SET', claim_key(id), owner, 'PX', ARGV[8])
local old = drop(id)
redis.call('HSET', KEYS[2], unpack(ARGV, 11))
if ARGV[10] ~= '' then redis.call('SET', schemas_key(id), ARGV[10], 'PX', key_ttl) end
local standing = redis.call('HMGET', standing_key(id), 'ejections', 'ejected_until',
                            'ejected_why')
if standing[1] then  -- an earlier connection's ejections (WorkerEntry.inherit)
  redis.call('HSET', KEYS[2], 'ejections', standing[1], 'ejected_until', standing[2],
             'ejected_why', standing[3])
  if tonumber(standing[2]) > tonumber(now) then redis.call('HSET', KEYS[2], 'probing', '1') end
  redis.call('DEL', standing_key(id))
end
redis.call('PEXPIRE', KEYS[2], key_ttl)
local points = {}
for _, member in ipairs(ring_members(id)) do
  points[#points + 1] = ring_point(ARGV[9], member)
  points[#points + 1] = member
end
for _, command in ipairs(cjson.decode(ARGV[6])) do
  redis.call('SADD', command_key(command), id)
  redis.call('PEXPIRE', command_key(command), key_ttl)
  redis.call('ZADD', ring_key(command), unpack(points))
  redis.call('PEXPIRE', ring_key(command), key_ttl)
end
for _, label in ipairs(label_keys(redis.call('HGET', KEYS[2], 'labels'))) do
  redis.call('SADD', label, id)
  redis.call('PEXPIRE', label, key_ttl)
end
redis.call('ZADD', beats, now, id)
redis.call('PEXPIRE', beats, key_ttl)
return old
