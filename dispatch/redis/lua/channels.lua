-- channels: ARGV[3..] worker ids. Returns {id, channel, ...} for the live ones.
local out = {}
for i = 3, #ARGV do
  if alive(ARGV[i]) then
    out[#out + 1] = ARGV[i]
    out[#out + 1] = redis.call('HGET', worker_key(ARGV[i]), 'channel')
  end
end
return out
