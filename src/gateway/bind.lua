-- BIND: an Idempotency-Key bound to its request's event, once and for the
-- key's lifetime, in one step in the entity's slot (docs/gateway.md).
--
-- KEYS: 1 the epoch marker of the entity's slot, 2 <base>:meta,
--       3 <base>:gw (next, unacked), 4 the binding <base>:gw:<key hash>,
--       5 the slot's pending set (binding keys by lease expiry)
-- ARGV: 1 the epoch the gateway knows, 2 the request's fingerprint,
--       3 topic, 4 entity, 5 the canonical body, 6 key window (ms),
--       7 lease (ms), 8 the most bound seqs not yet acknowledged, and
--       the most a new seq may be above the lowest of them
-- Reply: {'new', seq, token} | {'retake', seq, token, topic, body, waited}
--      | {'stored', seq, topic, partition, offset, waited}
--      | {'busy', ms the lease has left}
--      | {'conflict', seq} | {'full', unacked, lowest unacknowledged seq
--      or ''}; or the error
--      IDEMEPOCH <found> when Redis lost or rolled back its state. `waited`:
--      ms since this key was first answered 'busy' ('' if never, or told before).

-- (After fenced.lua: the epoch checked, `now` read.)
local until_ms = string.format('%d', now + tonumber(ARGV[7]))

local b = redis.call('HMGET', KEYS[4], 'fp', 'seq', 'state', 'partition', 'lease_until', 'topic', 'body', 'busy_since', 'offset')
if b[1] then
  if b[1] ~= ARGV[2] then
    return {'conflict', b[2]}
  end
  local left = b[3] ~= 'stored' and tonumber(b[5]) - now or 0
  if left > 0 then
    if not b[8] then
      redis.call('HSET', KEYS[4], 'busy_since', string.format('%d', now))
    end
    return {'busy', string.format('%d', left)}
  end
  -- How long ago a request with this key was first told 409 (for the
  -- metric of a client's wait to its final answer), reported once.
  local waited = ''
  if b[8] then
    waited = string.format('%d', now - tonumber(b[8]))
    redis.call('HDEL', KEYS[4], 'busy_since')
  end
  if b[3] == 'stored' then
    return {'stored', b[2], b[6], b[4], b[9], waited}
  end
  -- The holder's lease expired (it crashed, or its produce failed): this
  -- request takes it over and produces the same bound event again.
  local token = redis.call('HINCRBY', KEYS[4], 'token', 1)
  redis.call('HSET', KEYS[4], 'lease_until', until_ms)
  redis.call('ZADD', KEYS[5], until_ms, KEYS[4])
  return {'retake', b[2], token, b[6], b[7], waited}
end

local max = tonumber(ARGV[8])
local gw = redis.call('HGETALL', KEYS[3])
local fields = {}
for i = 1, #gw, 2 do fields[gw[i]] = gw[i + 1] end
local unacked = tonumber(fields.unacked or '0')
if unacked >= max then
  return {'full', unacked, ''}
end
-- The next seq continues from what idem decided, so a counter lost with
-- Redis's state reseeds itself from the meta idem rebuilt from the log.
local seq = tonumber(fields.next or '1')
local meta = redis.call('HMGET', KEYS[2], 'seq', 'dense')
local decided = tonumber(meta[1] or '0')
if decided + 1 > seq then
  seq = decided + 1
end
local mark = 0
if meta[2] then
  mark = tonumber(string.match(meta[2], ':(%d+)$') or '0')
  if mark + 1 > seq then
    seq = mark + 1
  end
end
-- Under the dense rule, 33 later seqs decided before a seq close its gap,
-- and its event is then dead-lettered when it comes (dense.lua). Only seqs
-- bound before a seq's event is in the log can be decided ahead of it. So
-- no seq is bound more than `max` above the lowest one not yet
-- acknowledged: counting them alone is not enough (while one holder is
-- slow, others are bound and acknowledged one after the other). The
-- fields u:<seq> (their value: the binding) name the unacknowledged seqs;
-- STORE removes its own, SWEEP one whose binding expired unstored. One
-- at or below the dense mark was decided, so its event is in the log
-- whoever forgot it (a gateway from before u: fields stores without
-- removing it): dropped here.
local lowest
for field in pairs(fields) do
  local u = string.match(field, '^u:(%d+)$')
  if u then
    local n = tonumber(u)
    if n <= mark then
      redis.call('HDEL', KEYS[3], field)
    elseif not lowest or n < lowest then
      lowest = n
    end
  end
end
if lowest and seq - lowest > max then
  return {'full', unacked, string.format('%d', lowest)}
end
local s = string.format('%d', seq)
redis.call('HSET', KEYS[4], 'fp', ARGV[2], 'seq', s, 'state', 'bound',
  'lease_until', until_ms, 'token', 1, 'topic', ARGV[3], 'entity', ARGV[4], 'body', ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
redis.call('HSET', KEYS[3], 'next', string.format('%d', seq + 1), 'u:' .. s, KEYS[4])
redis.call('HINCRBY', KEYS[3], 'unacked', 1)
redis.call('ZADD', KEYS[5], until_ms, KEYS[4])
return {'new', s, 1}
