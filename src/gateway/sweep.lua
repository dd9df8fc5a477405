-- SWEEP: takes over the bindings of one slot's pending set whose lease
-- expired without a stored response (their holder crashed or failed), so
-- the sweeper produces each bound event again and stores its response.
--
-- KEYS: 1 the epoch marker of the slot, 2 the slot's pending set
-- ARGV: 1 the epoch the gateway knows, 2 lease (ms), 3 the most to take
-- Reply: {binding key, seq, token, topic, entity, body, ...} (6 per binding);
--        or the error IDEMEPOCH <found>. The bindings are in the pending
--        set's slot (it is named by that slot's tag).

-- (After fenced.lua: the epoch checked, `now` read.)
local until_ms = string.format('%d', now + tonumber(ARGV[2]))
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%d', now), 'LIMIT', 0, tonumber(ARGV[3]))
local taken = {}
for _, key in ipairs(due) do
  local b = redis.call('HMGET', key, 'state', 'seq', 'topic', 'entity', 'body')
  if not b[1] then
    -- Expired while bound (its event never acknowledged within the key's
    -- window): it no longer counts against the entity's unacknowledged.
    local counters = string.match(key, '^(.*):[^:]+$')
    if redis.call('HINCRBY', counters, 'unacked', -1) < 0 then
      redis.call('HSET', counters, 'unacked', 0)
    end
    -- Nor is its seq the lowest unacknowledged (bind.lua's u:<seq>): the
    -- dense rule will close its gap. The binding, and its seq with it, is
    -- gone, so the field is found by its value, the binding's key.
    local fields = redis.call('HGETALL', counters)
    for i = 1, #fields, 2 do
      if fields[i + 1] == key and string.sub(fields[i], 1, 2) == 'u:' then
        redis.call('HDEL', counters, fields[i])
      end
    end
    redis.call('ZREM', KEYS[2], key)
  elseif b[1] == 'stored' then
    redis.call('ZREM', KEYS[2], key)
  else
    local token = redis.call('HINCRBY', key, 'token', 1)
    redis.call('HSET', key, 'lease_until', until_ms)
    redis.call('ZADD', KEYS[2], until_ms, key)
    for _, v in ipairs({key, b[2], token, b[3], b[4], b[5]}) do
      taken[#taken + 1] = v
    end
  end
end
return taken
