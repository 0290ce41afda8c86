-- eject: take worker ARGV[3] out of rotation, saying ARGV[4], for ARGV[5] seconds
-- doubled for each earlier ejection, at most ARGV[6]; unless that would put more than
-- ARGV[7] (a share, 0-1) of the live workers offering one of its commands out at once.
-- ARGV[8] is now (twin of MemoryRegistry._eject). Returns the time it is out until
-- (text), 0 if it stays in, -1 if it is gone.
local id, why, base, most, share, now = ARGV[3], ARGV[4], tonumber(ARGV[5]),
  tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if not alive(id) then return -1 end
local key = worker_key(id)
for _, command in ipairs(cjson.decode(redis.call('HGET', key, 'commands') or '[]')) do
  local live, out = 0, 0
  for _, other in ipairs(redis.call('SMEMBERS', command_key(command))) do
    if alive(other) then
      live = live + 1
      if tonumber(redis.call('HGET', worker_key(other), 'ejected_until') or '0') > now then
        out = out + 1
      end
    end
  end
  if out + 1 > share * live then return 0 end
end
local ejections = redis.call('HINCRBY', key, 'ejections', 1)
local until_ = string.format('%.17g', now + math.min(most, base * 2 ^ (ejections - 1)))
redis.call('HSET', key, 'ejected_until', until_, 'probing', '1', 'failures', '0',
           'ejected_why', why)
return until_
