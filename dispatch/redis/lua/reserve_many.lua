-- reserve_many: at time ARGV[3], ARGV[4..] pairs of worker id and command. Returns
-- {statuses, hashes}: take()'s answer for each pair, and {id, hash, ...} once for each
-- worker taken.
local now = tonumber(ARGV[3])
local statuses, hashes, seen = {}, {}, {}
for i = 4, #ARGV, 2 do
  local got = take(ARGV[i], ARGV[i + 1], now)
  statuses[#statuses + 1] = got
  if got == 2 and not seen[ARGV[i]] then
    seen[ARGV[i]] = true
    hashes[#hashes + 1] = ARGV[i]
    hashes[#hashes + 1] = redis.call('HGETALL', worker_key(ARGV[i]))
  end
end
return {statuses, hashes}
