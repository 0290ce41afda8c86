-- all: the hash of every live worker.
local out = {}
for _, id in ipairs(redis.call('ZRANGE', beats, 0, -1)) do
  local h = redis.call('HGETALL', worker_key(id))
  if #h == 0 then drop(id) else out[#out + 1] = h end
end
return out
