-- connections: ARGV[3..] worker ids. Returns {id, connection, ...} for the live ones.
local out = {}
for i = 3, #ARGV do
  if alive(ARGV[i]) then
    out[#out + 1] = ARGV[i]
    out[#out + 1] = redis.call('HGET', worker_key(ARGV[i]), 'connection')
  end
end
return out
