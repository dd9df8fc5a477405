-- idem guard: dedupe check, sequence check and effect in one atomic step.
--
-- One call carries one or more events. Every key of an event shares its
-- entity's hash tag; in Redis Cluster all events of one call must also share
-- a slot (standalone Redis has no such limit).
--
-- KEYS[i]  the base key of event i's entity: "<prefix>:{<entity>}". The
--          script derives the entity's keys from it (same hash tag, so the
--          same slot):
--            <base>:state     hash, the materialized view (user fields only)
--            <base>:meta      hash: seq, last_id, fingerprint, applied, updated_ms, deleted
--            <base>:ids:<g>   hash: remembered ids of window generation g
-- ARGV     per event, in KEYS order, a fixed head then the fields:
--            window_ms, id, id_hash (8 bytes), fingerprint (8 bytes),
--            fingerprint_hex, seq (decimal u64), op ("u" | "d"),
--            nset, field1, value1, ..., nunset, field1, ...
-- Returns  per event two values: code, detail
--            0 applied    detail 0
--            1 duplicate  detail: ms since the id was first seen
--            2 stale      detail: the entity's recorded seq
--            3 conflict   detail: the remembered fingerprint (8 bytes)
--
-- The window: time is cut into generations of window_ms; an id is stored in
-- the current generation's hash, which expires two generations later, and
-- looked up in the current and the previous one. So an id is remembered for
-- at least one window and at most two, and nothing ever scans for old ids.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Number-to-string conversions are costly in Lua 5.1 (printf): make each once.
local now_str = string.format('%d', now)
local now_packed = struct.pack('>I6', now)
local generations = {}
local function generation(window)
  local g = generations[window]
  if not g then
    local w = tonumber(window)
    local n = math.floor(now / w)
    g = { current = ':ids:' .. string.format('%d', n), previous = ':ids:' .. string.format('%d', n - 1),
          expire_at = string.format('%d', (n + 2) * w) }
    generations[window] = g
  end
  return g
end

-- seqs are u64 in decimal without leading zeros: Lua numbers (doubles)
-- would lose precision above 2^53, so compare as strings.
local function is_newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- Lua's unpack is limited to a few thousand values: write fields in chunks
-- (an even number, so field/value pairs stay together).
local UNPACK_CHUNK = 1000

local out = {}
local a = 1
for i = 1, #KEYS do
  local base = KEYS[i]
  local window = ARGV[a]
  local id, idh, fp, fp_hex, seq, op = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local nset = tonumber(ARGV[a + 7])
  local set_from = a + 8
  local nunset = tonumber(ARGV[set_from + 2 * nset])
  local unset_from = set_from + 2 * nset + 1
  a = unset_from + nunset

  local gen = generation(window)
  local current = base .. gen.current
  local seen = redis.call('HGET', current, idh)
  if not seen then
    seen = redis.call('HGET', base .. gen.previous, idh)
  end

  if seen then
    local seen_fp = string.sub(seen, 1, 8)
    if seen_fp == fp then
      out[#out + 1] = 1
      out[#out + 1] = now - struct.unpack('>I6', seen, 9)
    else
      out[#out + 1] = 3
      out[#out + 1] = seen_fp
    end
  else
    local meta = base .. ':meta'
    local m = redis.call('HMGET', meta, 'seq', 'applied')
    local recorded, applied = m[1], m[2]
    if recorded and not is_newer(seq, recorded) then
      out[#out + 1] = 2
      out[#out + 1] = recorded
    else
      -- Writes in the order state, meta, id mark: Redis does not roll back a
      -- script that fails halfway, and a failure must never leave the id
      -- remembered without its effect (a retry then re-applies the merge,
      -- which is idempotent).
      local state = base .. ':state'
      local count = string.format('%d', (tonumber(applied) or 0) + 1)
      if op == 'd' then
        redis.call('DEL', state)
      else
        for from = set_from, set_from + 2 * nset - 1, UNPACK_CHUNK do
          redis.call('HSET', state, unpack(ARGV, from, math.min(from + UNPACK_CHUNK, set_from + 2 * nset) - 1))
        end
        for from = unset_from, unset_from + nunset - 1, UNPACK_CHUNK do
          redis.call('HDEL', state, unpack(ARGV, from, math.min(from + UNPACK_CHUNK, unset_from + nunset) - 1))
        end
      end
      redis.call('HSET', meta, 'seq', seq, 'last_id', id, 'fingerprint', fp_hex, 'updated_ms', now_str,
        'applied', count, 'deleted', op == 'd' and '1' or '0')
      out[#out + 1] = 0
      out[#out + 1] = 0
    end
    -- Stale ids are remembered too, so their redelivery is a duplicate.
    redis.call('HSET', current, idh, fp .. now_packed)
    if redis.call('HLEN', current) == 1 then
      redis.call('PEXPIREAT', current, gen.expire_at)
    end
  end
end
return out
