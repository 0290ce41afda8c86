-- reserve: one slot of worker ARGV[3] for command ARGV[4], at time ARGV[5]. Returns
-- the updated hash, or take()'s 0 or 1.
local got = take(ARGV[3], ARGV[4], tonumber(ARGV[5]))
if got ~= 2 then return got end
return redis.call('HGETALL', worker_key(ARGV[3]))
