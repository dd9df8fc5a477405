-- What this call knows of each entity's meta: seq, applied and the offset
-- mark of one field (false: none), read once and kept in step with the
-- call's own writes, so an entity with several events in one call reads
-- its meta once. Per-entity order's writes keep an entry; per-field
-- order's drop it (forget_meta). Flat tables keyed by the meta key: an
-- entity costs the call no table of its own.
local known = {}
local known_seq, known_applied = {}, {}
local known_field, known_mark = {}, {}

local function forget_meta(meta)
  known[meta] = nil
end

local function remember_mark(meta, field, mark)
  if known[meta] then known_field[meta], known_mark[meta] = field, mark end
end

-- The entity's offset mark for the record's partition (false: none).
local function offset_mark(e)
  if known[e.meta] and known_field[e.meta] == e.mark_field then return known_mark[e.meta] end
  local mark = redis.call('HGET', e.meta, e.mark_field)
  remember_mark(e.meta, e.mark_field, mark)
  return mark
end

-- The entity's seq, applied count and offset mark for the record's
-- partition (each false where there is none).
local function read_meta(e)
  local meta = e.meta
  if known[meta] then
    if e.mark_field == '' then return known_seq[meta], known_applied[meta], false end
    if known_field[meta] == e.mark_field then
      return known_seq[meta], known_applied[meta], known_mark[meta]
    end
  end
  local m
  if e.mark_field ~= '' then
    m = redis.call('HMGET', meta, 'seq', 'applied', e.mark_field)
  else
    m = redis.call('HMGET', meta, 'seq', 'applied')
  end
  known[meta], known_seq[meta], known_applied[meta] = true, m[1], m[2]
  known_field[meta], known_mark[meta] = e.mark_field, m[3] or false
  return m[1], m[2], m[3] or false
end

-- Id hashes this call wrote an id to: their expiry is set (when their
-- first id went in, by this call or an earlier one), so asking their
-- length once per call is enough.
local expiring = {}

-- Whether the entity's offset mark `mark` ("<run start>:<offset>") covers
-- the record at `offset`: the run that decided the entity's latest record
-- of the partition began at or before it and reached it, deciding every
-- record of the partition in between (docs/guarantees.md).
local function covers(mark, offset)
  if not mark then return false end
  local start, last = string.match(mark, '^(%d+):(%d+)$')
  return start ~= nil and tonumber(start) <= offset and offset <= tonumber(last)
end

-- The (entity, partition) pairs of this call whose mark stops where a
-- dead-lettered record (a conflict, a rejection) sits: its dead letter is
-- written after the call, so until the batch is finished a re-read of it
-- must be decided again (and dead-lettered again), not `replayed`. The
-- next batch of the partition runs only once this one is finished.
local held = {}
-- Whether `held` has any pair: most calls hold none, and then no event
-- builds the pair's name to look it up.
local any_held = false

local function is_held(e)
  return any_held and held[e.meta .. e.mark_field]
end

-- Moves the entity's offset mark to this record. Written after the
-- effects and the id mark: a failure before it leaves the record to be
-- decided again, never marked without its effects.
local function mark_decided(e)
  if e.mark_field ~= '' and not e.marked and not is_held(e) then
    redis.call('HSET', e.meta, e.mark_field, e.mark)
    remember_mark(e.meta, e.mark_field, e.mark)
  end
end

-- A dead-lettered record: the mark stays below it for the rest of the call.
local function hold_mark(e)
  if e.mark_field ~= '' then
    held[e.meta .. e.mark_field] = true
    any_held = true
  end
end

-- An id seen before in the window: a duplicate (perhaps decided by an
-- earlier attempt of this batch) or a conflict. Returns code, detail.
local function decide_seen(seen, e, token)
  local seen_fp = string.sub(seen, 1, 8)
  if seen_fp ~= e.fp then
    return CONFLICT, seen_fp
  end
  local code = DUPLICATE
  if string.sub(seen, 15, 18) == token then
    local decided = string.sub(seen, 19, 19)
    code = decided == 'a' and DUPLICATE_APPLIED_BY_EARLIER_ATTEMPT
      or decided == 'l' and DUPLICATE_LATE_BY_EARLIER_ATTEMPT
      or decided == 'p' and DUPLICATE_PARTIAL_BY_EARLIER_ATTEMPT
      or DUPLICATE_STALE_BY_EARLIER_ATTEMPT
  end
  return code, now - struct.unpack('>I6', seen, 9)
end

