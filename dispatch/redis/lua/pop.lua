-- The channel layer's receive: everything waiting, at once.
-- KEYS[1] the channel, KEYS[2] its backup; ARGV[1] most messages to take. Puts back
-- what a cancelled receive left in the backup (as channels-redis's cleanup script
-- does), then pops the oldest messages without blocking and backs them up. Returns
-- them, oldest first (none if the channel is empty).
local backed_up = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = #backed_up, 1, -2 do
  redis.call('ZADD', KEYS[1], backed_up[i], backed_up[i - 1])
end
redis.call('DEL', KEYS[2])
local got = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
local members = {}
for i = 1, #got, 2 do
  redis.call('ZADD', KEYS[2], got[i + 1], got[i])
  members[#members + 1] = got[i]
end
return members
