-- STORE: a bound event's response kept with its key, after the broker
-- acknowledged the event; RELEASE (ARGV[2] empty): a holder whose produce
-- failed gives its lease up, so a retry or the sweeper produces at once.
-- Only the holder of the newest token does either: a stale holder (its
-- lease was taken over) cannot store over the newer one.
--
-- KEYS: 1 the binding, 2 <base>:gw, 3 the slot's pending set
-- ARGV: 1 the holder's token, 2 the partition and 3 the offset the
--       brokers acknowledged ('' to release)
-- The stored binding is written again, compact: only what a replay needs
-- (the 202 is rebuilt from it byte for byte), every value short enough
-- for Redis's small-hash encoding (a few hundred bytes less per key).
-- Reply: 'stored' | 'released' | 'fenced' (another holder's token)
--      | 'done' (already stored) | 'gone' (no binding: expired, or lost)

-- A stored binding keeps no token (it is written again compactly below):
-- its state says it is done.
local b = redis.call('HMGET', KEYS[1], 'state', 'token')
if not b[1] then
  return 'gone'
end
if b[1] == 'stored' then
  return 'done'
end
if b[2] ~= ARGV[1] then
  return 'fenced'
end
if ARGV[2] == '' then
  redis.call('HSET', KEYS[1], 'lease_until', '0')
  redis.call('ZADD', KEYS[3], 0, KEYS[1])
  return 'released'
end
local kept = redis.call('HMGET', KEYS[1], 'fp', 'seq', 'topic', 'busy_since')
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', kept[1], 'seq', kept[2], 'topic', kept[3],
  'state', 'stored', 'partition', ARGV[2], 'offset', ARGV[3])
if kept[4] then
  redis.call('HSET', KEYS[1], 'busy_since', kept[4])
end
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if redis.call('HINCRBY', KEYS[2], 'unacked', -1) < 0 then
  redis.call('HSET', KEYS[2], 'unacked', 0)
end
-- Acknowledged: no longer the lowest unacknowledged seq (bind.lua).
redis.call('HDEL', KEYS[2], 'u:' .. kept[2])
redis.call('ZREM', KEYS[3], KEYS[1])
return 'stored'
