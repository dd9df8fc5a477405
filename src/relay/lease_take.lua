-- Takes the relay's lease if it is free or already ours, and (re)sets
-- its expiry (src/relay/lease.rs).
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
