-- Sets the epoch marker to ARGV[2] if it still is ARGV[1] ('' for absent);
-- answers the marker (src/store/progress.rs).
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or (not cur and ARGV[1] == '') then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return cur
