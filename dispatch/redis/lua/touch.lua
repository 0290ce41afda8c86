-- touch: a heartbeat. ARGV[3] id, ARGV[4] heartbeat time, ARGV[5] key TTL (ms), ARGV[6]
-- claim TTL (ms). Refreshes the score and every key's TTL. Returns 1, or 0 if the worker is not live:
-- once dead (pruned or not), it stays dead until added again.
local id, now, key_ttl = ARGV[3], ARGV[4], ARGV[5]
if not alive(id) then
  drop(id)
  return 0
end
local key = worker_key(id)
redis.call('ZADD', beats, now, id)
redis.call('HSET', key, 'last_heartbeat', now)
redis.call('PEXPIRE', key, key_ttl)
redis.call('PEXPIRE', schemas_key(id), key_ttl)
redis.call('PEXPIRE', beats, key_ttl)
redis.call('PEXPIRE', claim_key(id), ARGV[6])
for _, command in ipairs(cjson.decode(redis.call('HGET', key, 'commands'))) do
  redis.call('PEXPIRE', command_key(command), key_ttl)
  redis.call('PEXPIRE', ring_key(command), key_ttl)
end
for _, label in ipairs(label_keys(redis.call('HGET', key, 'labels'))) do
  redis.call('PEXPIRE', label, key_ttl)
end
return 1
