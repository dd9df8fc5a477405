-- Gives the relay's lease up if it is ours (src/relay/lease.rs).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
