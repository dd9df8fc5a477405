-- idem guard: dedupe check, sequence check and effect in one atomic step.
--
-- One call carries one or more events. Every key of an event shares its
-- entity's hash tag; in Redis Cluster all events of one call must also share
-- a slot (standalone Redis has no such limit).
--
-- KEYS     first the epoch marker (standalone: the one; cluster: the one of
--          the call's slot), then four per event, all with the entity's hash tag (so one slot), and
--          all declared, so that Redis Cluster runs the call only where every
--          key is (during a slot migration it answers TRYAGAIN instead):
--            <base>:meta        hash: seq, last_id, fingerprint, applied, updated_ms, deleted
--            <base>:state       hash, the materialized view (user fields only)
--            <base>:ids:<g>     hash: remembered ids of window generation g (current)
--            <base>:ids:<g-1>   the previous generation
--          where <base> is "<prefix>:{<entity>}".
-- ARGV     first the batch token (4 bytes: the same for every attempt of one
--          batch, new for the next batch), then the epoch idem knows, then
--          per event a fixed head and the fields:
--            expire_at_ms (end of generation g+1), id, id_hash (8 bytes),
--            fingerprint (8 bytes), fingerprint_hex, seq (decimal u64),
--            op ("u" | "d"), nset, field1, value1, ..., nunset, field1, ...
-- Returns  per event two values: code, detail
--            0 applied    detail 0
--            1 duplicate  detail: ms since the id was first seen
--            2 stale      detail: the entity's recorded seq
--            3 conflict   detail: the remembered fingerprint (8 bytes)
--            4 duplicate  first seen by an earlier attempt of this batch, which
--                         applied it (its reply was lost); detail as for 1
--            5 duplicate  likewise, but that attempt found it stale
--          or, before any write, the error `IDEMEPOCH <marker>` when the
--          marker is not the epoch idem knows: Redis lost (some of) its state
--          since, and idem must find out how far it goes before it writes.
--
-- An id mark is fingerprint (8 bytes) .. first-seen ms (6) .. batch token (4)
-- .. "a" or "s" (applied or stale). Marks written by earlier versions have
-- only the first 14 bytes; every version reads just the bytes it knows.
--
-- The window: time is cut into generations of one window (idem computes g
-- from its clock, so the keys can be declared); an id is stored in the
-- current generation's hash, which expires at the end of the next one, and
-- looked up in the current and the previous one. So an id is remembered for
-- at least one window and at most two, and nothing ever scans for old ids.
-- (Clocks of instances that differ by s seconds can miss a duplicate within
-- s of a generation boundary; the sequence check still makes it stale.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Number-to-string conversions are costly in Lua 5.1 (printf): make each once.
local now_str = string.format('%d', now)
local now_packed = struct.pack('>I6', now)

-- seqs are u64 in decimal without leading zeros: Lua numbers (doubles)
-- would lose precision above 2^53, so compare as strings.
local function is_newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- Lua's unpack is limited to a few thousand values: write fields in chunks
-- (an even number, so field/value pairs stay together).
local UNPACK_CHUNK = 1000

-- Verdict codes (src/guard/reply.rs names the same numbers; a unit test
-- compares the two).
local APPLIED = 0
local DUPLICATE = 1
local STALE = 2
local CONFLICT = 3
local DUPLICATE_APPLIED_BY_EARLIER_ATTEMPT = 4
local DUPLICATE_STALE_BY_EARLIER_ATTEMPT = 5

local marker = redis.call('GET', KEYS[1])
if marker ~= ARGV[2] then
  return redis.error_reply('IDEMEPOCH ' .. (marker or 'missing'))
end

local token = ARGV[1]
local out = {}
local a = 3
for i = 1, (#KEYS - 1) / 4 do
  local k = 4 * i - 2
  local meta, state, current, previous = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local expire_at = ARGV[a]
  local id, idh, fp, fp_hex, seq, op = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local nset = tonumber(ARGV[a + 7])
  local set_from = a + 8
  local nunset = tonumber(ARGV[set_from + 2 * nset])
  local unset_from = set_from + 2 * nset + 1
  a = unset_from + nunset

  local seen = redis.call('HGET', current, idh)
  if not seen then
    seen = redis.call('HGET', previous, idh)
  end

  if seen then
    local seen_fp = string.sub(seen, 1, 8)
    if seen_fp == fp then
      local code = DUPLICATE
      if string.sub(seen, 15, 18) == token then
        code = string.sub(seen, 19, 19) == 'a' and DUPLICATE_APPLIED_BY_EARLIER_ATTEMPT
          or DUPLICATE_STALE_BY_EARLIER_ATTEMPT
      end
      out[#out + 1] = code
      out[#out + 1] = now - struct.unpack('>I6', seen, 9)
    else
      out[#out + 1] = CONFLICT
      out[#out + 1] = seen_fp
    end
  else
    local m = redis.call('HMGET', meta, 'seq', 'applied')
    local recorded, applied = m[1], m[2]
    local decided = 's'
    if recorded and not is_newer(seq, recorded) then
      out[#out + 1] = STALE
      out[#out + 1] = recorded
    else
      decided = 'a'
      -- Writes in the order state, meta, id mark: Redis does not roll back a
      -- script that fails halfway, and a failure must never leave the id
      -- remembered without its effect (a retry then re-applies the merge,
      -- which is idempotent).
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
      out[#out + 1] = APPLIED
      out[#out + 1] = 0
    end
    -- Stale ids are remembered too, so their redelivery is a duplicate.
    redis.call('HSET', current, idh, fp .. now_packed .. token .. decided)
    if redis.call('HLEN', current) == 1 then
      redis.call('PEXPIREAT', current, expire_at)
    end
  end
end
return out
