-- count: how many workers are live (a fresh heartbeat implies a hash: its TTL is longer).
return redis.call('ZCARD', beats)
