-- STORE: a bound event's response kept with its key, after the broker
-- acknowledged the event; RELEASE (ARGV[2] empty): a holder whose produce
-- failed gives its lease up, so a retry or the sweeper produces at once.
-- Only the holder of the newest token does either: a stale holder (its
-- lease was taken over) cannot store over the newer one.
--
-- KEYS: 1 the binding, 2 <base>:gw, 3 the slot's pending set
-- ARGV: 1 the holder's token, 2 the response ('' to release)
-- Reply: 'stored' | 'released' | 'fenced' (another holder's token)
--      | 'done' (already stored) | 'gone' (no binding: expired, or lost)

local b = redis.call('HMGET', KEYS[1], 'token', 'state')
if not b[1] then
  return 'gone'
end
if b[2] == 'stored' then
  return 'done'
end
if b[1] ~= ARGV[1] then
  return 'fenced'
end
if ARGV[2] == '' then
  redis.call('HSET', KEYS[1], 'lease_until', '0')
  redis.call('ZADD', KEYS[3], 0, KEYS[1])
  return 'released'
end
redis.call('HSET', KEYS[1], 'state', 'stored', 'response', ARGV[2])
redis.call('HDEL', KEYS[1], 'lease_until', 'body')
if redis.call('HINCRBY', KEYS[2], 'unacked', -1) < 0 then
  redis.call('HSET', KEYS[2], 'unacked', 0)
end
redis.call('ZREM', KEYS[3], KEYS[1])
return 'stored'
