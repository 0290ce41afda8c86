-- get: ARGV[3] id. Returns its hash, empty if it is not live.
if not alive(ARGV[3]) then return {} end
return redis.call('HGETALL', worker_key(ARGV[3]))
