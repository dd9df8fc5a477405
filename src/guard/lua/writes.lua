-- A newer event's state and bookkeeping (`applied`: the count before it).
-- Writes in the order state, meta; the effects and the id mark follow.
-- For an event without effects (`no_effects`) the meta write also moves
-- the offset mark: the state is written by then, so the mark never covers
-- a record without its effects, and the call saves a write.
local function write_newer(e, applied, no_effects)
  -- A number: Redis writes it as its digits, with no Lua string made.
  local count = (tonumber(applied) or 0) + 1
  local mark_field, mark = nil, nil
  if no_effects and e.mark_field ~= '' and not is_held(e) then
    mark_field, mark = e.mark_field, e.mark
    e.marked = true
  end
  if known[e.meta] then
    known_seq[e.meta], known_applied[e.meta] = e.seq, count
    if mark then known_field[e.meta], known_mark[e.meta] = mark_field, mark end
  end
  if e.op == 'delete' or e.op == 'replace' then
    redis.call('DEL', e.state)
  end
  if e.op == 'merge' or e.op == 'replace' then
    for from = e.set_from, e.set_from + 2 * e.nset - 1, UNPACK_CHUNK do
      redis.call('HSET', e.state, unpack(ARGV, from, math.min(from + UNPACK_CHUNK, e.set_from + 2 * e.nset) - 1))
    end
    for from = e.unset_from, e.unset_from + e.nunset - 1, UNPACK_CHUNK do
      redis.call('HDEL', e.state, unpack(ARGV, from, math.min(from + UNPACK_CHUNK, e.unset_from + e.nunset) - 1))
    end
  end
  if e.op == 'keep' then
    -- "keep" changes no state: a tombstone stays one.
    if mark then
      redis.call('HSET', e.meta, 'seq', e.seq, 'last_id', e.id, 'fingerprint', e.fp_hex, 'updated_ms', now_str,
        'applied', count, mark_field, mark)
    else
      redis.call('HSET', e.meta, 'seq', e.seq, 'last_id', e.id, 'fingerprint', e.fp_hex, 'updated_ms', now_str,
        'applied', count)
    end
  else
    local deleted = e.op == 'delete' and '1' or '0'
    if mark then
      redis.call('HSET', e.meta, 'seq', e.seq, 'last_id', e.id, 'fingerprint', e.fp_hex, 'updated_ms', now_str,
        'applied', count, 'deleted', deleted, mark_field, mark)
    else
      redis.call('HSET', e.meta, 'seq', e.seq, 'last_id', e.id, 'fingerprint', e.fp_hex, 'updated_ms', now_str,
        'applied', count, 'deleted', deleted)
    end
  end
end

-- The change an event made, appended to the call's outbox (KEYS[2]) for
-- the relay to publish (docs/change-stream.md). Its version is the entity's
-- `cv`, one more per change: late and per-field events apply out of seq
-- order, so the seq cannot number the changes. The entry holds the parts
-- of the record as fields (src/store/outbox/entry.lua lays them out), and
-- the relay writes the JSON: encoding it here cost Redis, the one busy
-- core, twice what storing the parts does.
local CHANGE_KIND = { a = 'applied', l = 'late', p = 'partial' }

local function change_effect_pairs(plan, base, args)
  local counters_key = base .. COUNTERS_SUFFIX
  for _, w in ipairs(plan) do
    local cmd, key = w[1], w[2]
    if key == counters_key and cmd == 'HSET' then
      args[#args + 1], args[#args + 2] = 'c' .. w[3], w[4]
    elseif key == counters_key and cmd == 'HDEL' then
      args[#args + 1], args[#args + 2] = 'C' .. w[3], ''
    elseif cmd == 'SADD' or cmd == 'SREM' then
      args[#args + 1] = (cmd == 'SADD' and 's+' or 's-') .. string.sub(key, #base + #SET_INFIX + 1)
      args[#args + 1] = w[3]
    elseif cmd == 'XADD' then
      local stream = string.sub(key, #base + #LEDGER_INFIX + 1)
      for i = (w[3] == 'MAXLEN') and 7 or 4, #w, 2 do
        args[#args + 1], args[#args + 2] = 'l' .. stream .. '\0' .. w[i], w[i + 1]
      end
    end
  end
end

-- Whether this call wrote a change: its reply then ends with the outbox's
-- length, which idem holds against changelog.max_outbox.
local wrote_change = false

local function write_change(e, plan, decided)
  wrote_change = true
  local base = string.sub(e.meta, 1, #e.meta - #META_SUFFIX)
  local entity = string.sub(base, string.find(base, '{', 1, true) + 1, -2)
  local version = redis.call('HINCRBY', e.meta, 'cv', 1)
  local state = redis.call('HGETALL', e.state)
  local fx = {}
  if plan then change_effect_pairs(plan, base, fx) end
  add_outbox_entry(KEYS[2], {
    entity = entity, version = version, topic = e.changelog,
    partition = string.match(e.mark_field, ':(%d+)$') or '', offset = e.offset, at = now_str,
    kind = CHANGE_KIND[decided], type = (e.op == 'delete' and #state == 0) and 'delete' or 'idem.change',
    event_id = e.id, event_seq = e.seq, event_type = e.type, ts = e.ts,
  }, state, fx)
end

-- The id mark's tail after the fingerprint (first-seen ms, batch token,
-- outcome) is the same for every event of the call with one outcome:
-- made once per outcome.
local id_mark_tails = {}

local function id_mark(fp, token, decided)
  local tail = id_mark_tails[decided]
  if not tail then
    tail = now_packed .. token .. decided
    id_mark_tails[decided] = tail
  end
  return fp .. tail
end

-- The last writes of a decided event, after its state and meta: its
-- effects, its change (for a changelog topic), then its id (stale and late ids too, so that a redelivery is a
-- duplicate), then its offset mark. A failure before the id leaves the
-- event to be decided again, never remembered without its effects.
local function finish_decision(e, token, plan, decided)
  if plan then
    for _, w in ipairs(plan) do
      redis.call(unpack(w))
    end
  end
  if e.changelog ~= '' and decided ~= 's' then write_change(e, plan, decided) end
  redis.call('HSET', e.current, e.idh, id_mark(e.fp, token, decided))
  if not expiring[e.current] then
    if redis.call('HLEN', e.current) == 1 then
      redis.call('PEXPIREAT', e.current, e.expire_at)
    end
    expiring[e.current] = true
  end
  mark_decided(e)
end

