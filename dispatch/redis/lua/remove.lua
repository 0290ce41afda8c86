-- remove: only if ARGV[4] is still the worker's connection (a takeover keeps the entry).
-- ARGV[3] id, ARGV[5] claim TTL (ms): the owner keeps the id that long. Returns the
-- removed hash (empty if nothing was removed).
if redis.call('HGET', worker_key(ARGV[3]), 'connection') ~= ARGV[4] then return {} end
redis.call('PEXPIRE', claim_key(ARGV[3]), ARGV[5])
return drop(ARGV[3])
