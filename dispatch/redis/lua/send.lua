-- The channel layer's send, in one round trip (channels-redis takes four).
-- KEYS[1] the channel's sorted set; ARGV[1] expired-before (s), ARGV[2] capacity,
-- ARGV[3] the message, ARGV[4] its score (now), ARGV[5] the key's expiry (s).
-- Returns 0 when the channel is full, as channels-redis raises ChannelFull.
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
if redis.call('ZCOUNT', KEYS[1], '-inf', '+inf') >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
