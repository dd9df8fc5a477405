-- Order per field (state.order = "per_field", docs/effects.md): each data
-- field remembers the seq that wrote or removed it (<base>:field_seqs, the
-- event's first effect key), and a replace or delete sets the entity's
-- floor: fields written below it are removed, writes below it refused. A
-- delete's floor also covers its own seq ("<seq>!"), a replace's does not.
-- Every rule takes the greater of two writes, so the state is the same
-- for every arrival order of the same events.

local function format_floor(seq, strict)
  return seq .. (strict and '!' or '')
end

local function parse_floor(text)
  if not text then return nil, false end
  local seq, strict = string.match(text, '^(%d+)(!?)$')
  return seq, strict == '!'
end

-- Whether a write at `seq` falls under the floor.
local function below_floor(seq, floor, strict)
  if not floor then return false end
  if seq == floor then return strict end
  return is_newer(floor, seq)
end

-- Whether floor (a, strict_a) is above (b, strict_b); nil b is no floor.
local function floor_above(a, strict_a, b, strict_b)
  if not b then return true end
  if a == b then return strict_a and not strict_b end
  return is_newer(a, b)
end

-- Byte order (Lua's string `<` follows the server's locale).
local function bytes_after(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

-- Whether a write of `value` (nil: a removal) at `seq` wins over the
-- field's writer at `written` holding `current` (nil: absent). At an equal
-- seq the removal wins, then the greater value in byte order; the same
-- value at the same seq is already written (a copy changes nothing).
local function field_wins(seq, value, written, current)
  if not written or is_newer(seq, written) then return true end
  if seq ~= written then return false end
  if value == nil then return current ~= nil end
  return current ~= nil and value ~= current and bytes_after(value, current)
end

-- Removes the fields and field seqs the floor covers.
local function drop_below_floor(e, fseq_key, floor, strict)
  local written = hash_table(fseq_key)
  for _, field in ipairs(redis.call('HKEYS', e.state)) do
    local at = written[field]
    if not at or below_floor(at, floor, strict) then redis.call('HDEL', e.state, field) end
  end
  for field, at in pairs(written) do
    if below_floor(at, floor, strict) then redis.call('HDEL', fseq_key, field) end
  end
end

-- The event's data fields as (name, value) pairs, value nil for a removal.
local function event_fields(e)
  local out = {}
  for i = e.set_from, e.set_from + 2 * e.nset - 1, 2 do out[#out + 1] = { ARGV[i], ARGV[i + 1] } end
  for i = e.unset_from, e.unset_from + e.nunset - 1 do out[#out + 1] = { ARGV[i], nil } end
  return out
end

-- Writes the fields of `e` that win; returns how many won and lost.
local function write_fields(e, fseq_key, floor, strict)
  local fields = event_fields(e)
  if #fields == 0 then return 0, 0 end
  if below_floor(e.seq, floor, strict) then return 0, #fields end
  local won = 0
  for _, f in ipairs(fields) do
    local name, value = f[1], f[2]
    local written = redis.call('HGET', fseq_key, name)
    local current = nil
    if written == e.seq then current = redis.call('HGET', e.state, name) or nil end
    if field_wins(e.seq, value, written, current) then
      won = won + 1
      if value == nil then
        redis.call('HDEL', e.state, name)
      else
        redis.call('HSET', e.state, name, value)
      end
      redis.call('HSET', fseq_key, name, e.seq)
    end
  end
  return won, #fields - won
end

-- An id not seen in the window, under per-field order: applied (every
-- field it writes won), partial (some did), late or stale (none did, with
-- or without commutative effects), or rejected. Returns code, detail.
local function decide_per_field(e, token, recorded, applied)
  local fseq_key = e.keys[1]
  local m = redis.call('HMGET', e.meta, 'floor', 'exists_seq', 'field_seqs_at')
  local floor, strict = parse_floor(m[1])
  local exists_seq = m[2]
  local meta = {}
  if recorded and m[3] ~= recorded then
    -- Decided under per-entity order since (or ever before): the state is
    -- what that order left at `recorded`, so what is older stays stale.
    if floor_above(recorded, true, floor, strict) then floor, strict = recorded, true end
    if not exists_seq or is_newer(recorded, exists_seq) then exists_seq = recorded end
    meta[#meta + 1], meta[#meta + 2] = 'floor', format_floor(floor, strict)
    meta[#meta + 1], meta[#meta + 2] = 'exists_seq', exists_seq
  end
  local plan, why = prepare(e.mutations, false, e.seq, e.state, { e.id, e.type })
  if why then
    hold_mark(e)
    return REJECTED, why
  end
  local seq, op = e.seq, e.op
  local won, lost = 0, 0
  if op == 'replace' or op == 'delete' then
    local own_strict = op == 'delete'
    if floor_above(seq, own_strict, floor, strict) then
      won = won + 1
      floor, strict = seq, own_strict
      meta[#meta + 1], meta[#meta + 2] = 'floor', format_floor(floor, strict)
      drop_below_floor(e, fseq_key, floor, strict)
    else
      lost = lost + 1
    end
  end
  if op ~= 'keep' then
    local exists = not exists_seq or is_newer(seq, exists_seq) or (seq == exists_seq and op == 'delete')
    if exists then
      meta[#meta + 1], meta[#meta + 2] = 'exists_seq', seq
      meta[#meta + 1], meta[#meta + 2] = 'deleted', op == 'delete' and '1' or '0'
    end
    if op == 'merge' or op == 'replace' then
      local w, l = write_fields(e, fseq_key, floor, strict)
      won, lost = won + w, lost + l
      if w + l == 0 and op == 'merge' then
        -- No data: what it decides is that the entity exists.
        if exists then won = won + 1 else lost = lost + 1 end
      end
    end
  end
  local newer = not recorded or is_newer(seq, recorded)
  local code, detail, decided = APPLIED, 0, 'a'
  if (won + lost == 0 and not newer) or (won == 0 and lost > 0) then
    code, decided = STALE, 's'
    if e.commutative then code, decided = LATE, 'l' end
  elseif lost > 0 then
    code, decided = PARTIAL, 'p'
  end
  if newer then
    meta[#meta + 1], meta[#meta + 2] = 'seq', seq
    meta[#meta + 1], meta[#meta + 2] = 'last_id', e.id
    meta[#meta + 1], meta[#meta + 2] = 'fingerprint', e.fp_hex
  end
  if newer or #meta > 0 then
    meta[#meta + 1], meta[#meta + 2] = 'field_seqs_at', newer and seq or recorded
  end
  if code == APPLIED or code == PARTIAL then
    meta[#meta + 1], meta[#meta + 2] = 'applied', string.format('%d', (tonumber(applied) or 0) + 1)
    meta[#meta + 1], meta[#meta + 2] = 'updated_ms', now_str
  end
  if #meta > 0 then redis.call('HSET', e.meta, unpack(meta)) end
  finish_decision(e, token, plan, decided)
  return code, detail
end

