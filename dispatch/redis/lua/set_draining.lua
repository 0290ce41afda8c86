-- set_draining: ARGV[3] id, ARGV[4] '1' or '0'. Returns 0 if the worker is not live.
if not alive(ARGV[3]) then return 0 end
redis.call('HSET', worker_key(ARGV[3]), 'draining', ARGV[4])
return 1
