#!lua
-- idem guard: dedupe check, sequence check and effects in one atomic step.
--
-- The `#!lua` line (Redis >= 7) declares the script's flags: none, so it
-- may write and Redis refuses the whole call up front when it is out of
-- memory, instead of failing at the first write halfway through.
--
-- One call carries one or more events. Every key of an event shares its
-- entity's hash tag; in Redis Cluster all events of one call must also share
-- a slot (standalone Redis has no such limit).
--
-- KEYS     first the epoch marker (standalone: the one; cluster: the one of
--          the call's slot), then the outbox (likewise one per slot;
--          written only for events of a changelog topic), then per event four keys and its effects' keys,
--          all with the entity's hash tag (so one slot), and all declared, so
--          that Redis Cluster runs the call only where every key is (during
--          a slot migration it answers TRYAGAIN instead):
--            <base>:meta        hash: seq, last_id, fingerprint, applied, updated_ms, deleted
--            <base>:state       hash, the materialized view (user fields only)
--            <base>:ids:<g>     hash: remembered ids of window generation g (current)
--            <base>:ids:<g-1>   the previous generation
--            then the effects' keys (docs/effects.md): <base>:counters,
--            <base>:ledger:<name>, <base>:set:<name> and <base>:set:<name>:seq
--          where <base> is "<prefix>:{<entity>}".
-- ARGV     first the batch token (4 bytes: the same for every attempt of one
--          batch, new for the next batch), then the epoch idem knows, then
--          per event a fixed head, the state fields and the mutations:
--            expire_at_ms (end of generation g+1), id, id_hash (8 bytes),
--            fingerprint (8 bytes), fingerprint_hex, seq (decimal u64),
--            mark_field (the entity's offset mark for the record's partition,
--            "o:<topic id>:<partition>"; "" for none), offset (the record's),
--            mark ("<run start>:<offset>", what this decision marks),
--            dense ("1" when the event's topic numbers its seqs densely:
--            dedupe.dense_seq_topics; "" otherwise),
--            state ("merge" | "replace" | "delete" | "keep", each also as
--            "field:<op>" under state.order = "per_field", whose event's
--            first effect key is <base>:field_seqs),
--            nset, field1, value1, ..., nunset, field1, ...,
--            nkeys (the event's keys after the four), type,
--            nmutations, then each mutation, its kind first (all key
--            numbers count from the event's fifth key, 1-based; each kind
--            has its own code, read by its own function below):
--              "counter" key field units scale        counter += units / 10^scale
--              "counter_set" key field present value  counter = value ("0": removed);
--                                                     ordered (a chained idem, docs/change-stream.md)
--              "ledger" key max_len max_age_ms n f1 v1 ...  ledger entry
--              "set_add" key seqkey member            set add
--              "set_remove" key seqkey member         set remove
--              "custom" snippet key order n f1 v1 ... custom effect (order
--                                                     "ordered" | "commutative"),
--                                                     the event's data fields
--            and last the changelog: the event's topic when its changes go to
--            the outbox (changelog.topics), "" otherwise; after a topic, the
--            event's ts ("" without one)
-- Returns  per event two values: code, detail
--            0 applied    detail: how many dense seqs the event's decision
--                         closed (0 but at the dense cap; so for 2, 6, 10)
--            1 duplicate  detail: ms since the id was first seen
--            2 stale      detail as for 0
--            3 conflict   detail: the remembered fingerprint (8 bytes)
--            4 duplicate  first seen by an earlier attempt of this batch, which
--                         applied it (its reply was lost); detail as for 1
--            5 duplicate  likewise, but that attempt found it stale
--            6 late       seq not newer: the ordered effects were skipped,
--                         the commutative ones applied; detail as for 0
--            7 rejected   an effect cannot be applied (a counter would
--                         overflow, a custom effect failed): nothing was
--                         written, not even the id; detail "<reason> <message>"
--            8 duplicate  like 4, but that attempt found it late
--            9 replayed   the record itself was decided before (its entity's
--                         offset mark covers it: a replay, a rewind, a
--                         redelivery after a crash); nothing written
--           10 partial    per-field order: some of its fields were written,
--                         others had newer writers; detail as for 0
--           11 duplicate  like 4, but that attempt found it partial
--           12 duplicate  dense seqs: its seq was decided before (a copy at
--                         a new offset, whatever the window); nothing
--                         written; detail 0
--           13 conflict   dense seqs: another event (other fingerprint) was
--                         decided at its seq; nothing written; detail: that
--                         event's fingerprint (hex)
--          then, when the call wrote a change (a changelog topic's event),
--          one more value: the outbox's length (XLEN KEYS[2]) after it
--          or, before any write, the error `IDEMEPOCH <marker>` when the
--          marker is not the epoch idem knows: Redis lost (some of) its state
--          since, and idem must find out how far it goes before it writes.
--
-- An id mark is fingerprint (8 bytes) .. first-seen ms (6) .. batch token (4)
-- .. "a", "s", "l" or "p" (applied, stale, late, partial). Marks written by earlier
-- versions have only the first 14 bytes; every version reads just the bytes
-- it knows.
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
local LATE = 6
local REJECTED = 7
local DUPLICATE_LATE_BY_EARLIER_ATTEMPT = 8
local REPLAYED = 9
local PARTIAL = 10
local DUPLICATE_PARTIAL_BY_EARLIER_ATTEMPT = 11
local DUPLICATE_BY_SEQ = 12
local SEQ_REUSED = 13

-- Exact decimals (counters): a value is sign (1 or -1) and magnitude digits
-- without leading zeros, counted in units of 10^-scale. Doubles would round
-- money, and HINCRBY stops at 2^63, so the arithmetic is on digit strings.
local MAX_DIGITS = 38

local function strip(digits)
  digits = string.gsub(digits, '^0+', '')
  if digits == '' then return '0' end
  return digits
end

-- Parses signed digits ("-1250") as idem sends them.
local function parse_units(text)
  if string.sub(text, 1, 1) == '-' then return -1, strip(string.sub(text, 2)) end
  return 1, strip(text)
end

-- Parses a stored counter ("12.50") at `scale`; nil if it is not one.
local function parse_stored(text, scale)
  local sign = 1
  if string.sub(text, 1, 1) == '-' then sign, text = -1, string.sub(text, 2) end
  local int, frac = string.match(text, '^(%d+)%.?(%d*)$')
  if not int then return nil end
  if #frac > scale then
    if string.find(string.sub(frac, scale + 1), '[^0]') then return nil end
    frac = string.sub(frac, 1, scale)
  end
  return sign, strip(int .. frac .. string.rep('0', scale - #frac))
end

local function format_units(sign, digits, scale)
  if scale > 0 then
    if #digits <= scale then digits = string.rep('0', scale - #digits + 1) .. digits end
    digits = string.sub(digits, 1, #digits - scale) .. '.' .. string.sub(digits, #digits - scale + 1)
  end
  if sign < 0 and string.find(digits, '[1-9]') then return '-' .. digits end
  return digits
end

local function compare_magnitudes(a, b)
  if #a ~= #b then return #a > #b and 1 or -1 end
  if a == b then return 0 end
  return a > b and 1 or -1
end

-- a + b, or a - b (a >= b) with `direction` -1, on digit strings.
local function combine_magnitudes(a, b, direction)
  local out, carry = {}, 0
  local i, j = #a, #b
  while i > 0 or j > 0 do
    local d = (i > 0 and string.byte(a, i) - 48 or 0)
      + direction * (j > 0 and string.byte(b, j) - 48 or 0) + carry
    carry = 0
    if d >= 10 then d, carry = d - 10, 1 elseif d < 0 then d, carry = d + 10, -1 end
    out[#out + 1] = d
    i, j = i - 1, j - 1
  end
  if carry > 0 then out[#out + 1] = carry end
  local s = {}
  for k = #out, 1, -1 do s[#s + 1] = out[k] end
  return strip(table.concat(s))
end

local function add_signed(sa, a, sb, b)
  if sa == sb then return sa, combine_magnitudes(a, b, 1) end
  local c = compare_magnitudes(a, b)
  if c == 0 then return 1, '0' end
  if c > 0 then return sa, combine_magnitudes(a, b, -1) end
  return sb, combine_magnitudes(b, a, -1)
end

-- Custom effects (docs/effects.md), inserted by idem where the next line
-- is: CUSTOM[i] = { file = ..., offset = ..., fn = function(state, counters, event) ... end }
local CUSTOM = {}
-- @CUSTOM

local function hash_table(key)
  local flat = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

-- Runs custom effect `index` (pure: it gets values, returns fields); its
-- writes as a flat list, or nil and why.
local function run_custom(index, state_key, counters_key, event)
  local custom = CUSTOM[index]
  local ok, result = pcall(custom.fn, hash_table(state_key), hash_table(counters_key), event)
  local where = custom.file
  if not ok then
    local message = string.gsub(tostring(result), 'user_script:(%d+):', function(n)
      return where .. ':' .. (tonumber(n) - custom.offset) .. ':'
    end)
    return nil, 'effect_failed ' .. message
  end
  if type(result) ~= 'table' then
    return nil, 'effect_invalid_output ' .. where .. ' returned a ' .. type(result) .. ', not a table of fields'
  end
  local writes = {}
  for field, value in pairs(result) do
    if type(field) ~= 'string' or not custom.writes[field] then
      return nil, 'effect_invalid_output ' .. where .. ' returned field ' .. tostring(field) .. ', not one of its declared writes'
    end
    if type(value) == 'number' then
      if value ~= math.floor(value) or math.abs(value) >= 2 ^ 53 then
        return nil, 'effect_invalid_output ' .. where .. ' returned ' .. field .. ' = ' .. tostring(value) .. ': a number must be an integer below 2^53 (return a string for decimals)'
      end
      value = string.format('%d', value)
    elseif value ~= false and type(value) ~= 'string' then
      return nil, 'effect_invalid_output ' .. where .. ' returned ' .. field .. ' as a ' .. type(value) .. ' (a string, an integer or false to remove it)'
    end
    writes[#writes + 1] = { field, value }
  end
  return writes
end

-- Phase one of an event's mutations: every decision and every check, no
-- write. Returns the writes as commands, or nil and why.
local function prepare(mutations, newer, seq, state_key, event_head)
  local plan = {}
  local counters_seen = {}
  for _, m in ipairs(mutations) do
    if m.kind == 'counter' then
      local memo = counters_seen[m.field]
      local sign, digits
      if memo then
        sign, digits = memo[1], memo[2]
      else
        local stored = redis.call('HGET', m.key, m.field)
        if stored then
          sign, digits = parse_stored(stored, m.scale)
          if not sign then
            return nil, 'counter_unreadable counter ' .. m.field .. ' holds ' .. stored .. ', not a decimal with at most ' .. m.scale .. ' decimals'
          end
        else
          sign, digits = 1, '0'
        end
      end
      local us, ud = parse_units(m.units)
      sign, digits = add_signed(sign, digits, us, ud)
      if #digits > MAX_DIGITS then
        return nil, 'counter_overflow counter ' .. m.field .. ' would pass ' .. MAX_DIGITS .. ' digits'
      end
      counters_seen[m.field] = { sign, digits }
      plan[#plan + 1] = { 'HSET', m.key, m.field, format_units(sign, digits, m.scale) }
    elseif m.kind == 'counter_set' then
      if newer then
        if m.present then
          plan[#plan + 1] = { 'HSET', m.key, m.field, m.value }
        else
          plan[#plan + 1] = { 'HDEL', m.key, m.field }
        end
      end
    elseif m.kind == 'set_add' or m.kind == 'set_remove' then
      local removes = m.kind == 'set_remove'
      local last = redis.call('HGET', m.seqkey, m.member)
      -- Per member, the newest seq wins; at an equal seq the remove wins,
      -- so every arrival order ends in the same set.
      if not last or is_newer(seq, last) or (removes and seq == last) then
        plan[#plan + 1] = { removes and 'SREM' or 'SADD', m.key, m.member }
        plan[#plan + 1] = { 'HSET', m.seqkey, m.member, seq }
      end
    elseif m.kind == 'ledger' then
      if m.max_len ~= '0' then
        plan[#plan + 1] = { 'XADD', m.key, 'MAXLEN', '=', m.max_len, '*', unpack(m.entry) }
      else
        plan[#plan + 1] = { 'XADD', m.key, '*', unpack(m.entry) }
      end
      if m.max_age_ms > 0 then
        plan[#plan + 1] = { 'XTRIM', m.key, 'MINID', string.format('%d', math.max(0, now - m.max_age_ms)) }
      end
    elseif m.kind == 'custom' then
      local commutes = m.order == 'commutative'
      if commutes or newer then
        local event = { id = event_head[1], seq = seq, type = event_head[2], data = m.data }
        local writes, err = run_custom(m.snippet, state_key, m.key, event)
        if not writes then return nil, err end
        local target = commutes and m.key or state_key
        for _, w in ipairs(writes) do
          if w[2] == false then
            plan[#plan + 1] = { 'HDEL', target, w[1] }
          else
            plan[#plan + 1] = { 'HSET', target, w[1], w[2] }
          end
        end
      end
    end
  end
  return plan
end

-- The mutations and effect keys of an event that has none (most): one
-- table for all, never written to, so no event allocates one.
local NONE = {}

-- One reader per mutation kind: each takes ARGV from `a` (just after the
-- kind) and the event's effect keys, and returns the mutation and the
-- position after it.
local READ_MUTATION = {
  counter = function(a, keys)
    return { key = keys[tonumber(ARGV[a])], field = ARGV[a + 1], units = ARGV[a + 2],
      scale = tonumber(ARGV[a + 3]) }, a + 4
  end,
  ledger = function(a, keys)
    local count = tonumber(ARGV[a + 3])
    return { key = keys[tonumber(ARGV[a])], max_len = ARGV[a + 1], max_age_ms = tonumber(ARGV[a + 2]),
      entry = { unpack(ARGV, a + 4, a + 3 + 2 * count) } }, a + 4 + 2 * count
  end,
  counter_set = function(a, keys)
    return { key = keys[tonumber(ARGV[a])], field = ARGV[a + 1], present = ARGV[a + 2] == '1',
      value = ARGV[a + 3] }, a + 4
  end,
  set_add = function(a, keys)
    return { key = keys[tonumber(ARGV[a])], seqkey = keys[tonumber(ARGV[a + 1])], member = ARGV[a + 2] }, a + 3
  end,
  custom = function(a, keys)
    local count = tonumber(ARGV[a + 3])
    local data = {}
    for k = a + 4, a + 3 + 2 * count, 2 do data[ARGV[k]] = ARGV[k + 1] end
    return { snippet = tonumber(ARGV[a]), key = keys[tonumber(ARGV[a + 1])], order = ARGV[a + 2],
      data = data }, a + 4 + 2 * count
  end,
}
READ_MUTATION.set_remove = READ_MUTATION.set_add

-- Reads the event's mutations from ARGV at `a`; returns them, the next
-- position, and whether any of them commutes (applies when late too).
local function read_mutations(a, keys)
  local n = tonumber(ARGV[a])
  a = a + 1
  if n == 0 then return NONE, a, false end
  local mutations, commutative = {}, false
  for _ = 1, n do
    local kind = ARGV[a]
    local read = READ_MUTATION[kind]
    if not read then error('IDEMPROTOCOL unknown mutation ' .. tostring(kind)) end
    local m
    m, a = read(a + 1, keys)
    m.kind = kind
    mutations[#mutations + 1] = m
    commutative = commutative or (kind ~= 'custom' and kind ~= 'counter_set') or m.order == 'commutative'
  end
  return mutations, a, commutative
end

-- The state ops under state.order = "per_field" ("field:<op>"), by name:
-- a lookup, not a substring per event.
local PER_FIELD_OPS = {
  ['field:merge'] = 'merge', ['field:replace'] = 'replace',
  ['field:delete'] = 'delete', ['field:keep'] = 'keep',
}

-- Reads one event of the call into `e`: its keys from KEYS at `k`, its
-- arguments from ARGV at `a`. Returns it and the positions of the next
-- event. The main loop passes the same table for every event: filling a
-- table that has its fields already costs Redis no allocation per event.
local function read_event(k, a, e)
  e.meta, e.state, e.current, e.previous = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  e.expire_at, e.id, e.idh, e.fp, e.fp_hex, e.seq =
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  e.mark_field, e.offset, e.mark = ARGV[a + 6], tonumber(ARGV[a + 7]), ARGV[a + 8]
  e.marked = false
  e.dense = ARGV[a + 9] == '1'
  local op = ARGV[a + 10]
  local per_field_op = PER_FIELD_OPS[op]
  e.per_field = per_field_op ~= nil
  e.op = per_field_op or op
  -- The state fields stay in ARGV (written from there in chunks).
  e.nset = tonumber(ARGV[a + 11])
  e.set_from = a + 12
  e.nunset = tonumber(ARGV[e.set_from + 2 * e.nset])
  e.unset_from = e.set_from + 2 * e.nset + 1
  a = e.unset_from + e.nunset
  local nkeys = tonumber(ARGV[a])
  e.type = ARGV[a + 1]
  e.keys = nkeys == 0 and NONE or { unpack(KEYS, k + 4, k + 3 + nkeys) }
  e.mutations, a, e.commutative = read_mutations(a + 2, e.keys)
  e.changelog = ARGV[a]
  if e.changelog == '' then
    e.ts = ''
    return e, k + 4 + nkeys, a + 1
  end
  e.ts = ARGV[a + 1]
  return e, k + 4 + nkeys, a + 2
end

-- Every event of the call, in order, each in a table of its own.
local function read_call()
  local events, k, a = {}, 3, 3
  while a <= #ARGV do
    events[#events + 1], k, a = read_event(k, a, {})
  end
  return events
end

-- What this call knows of each entity's meta: seq, applied and the offset
-- marks by field (false: none), read once and kept in step with the call's
-- own writes, so an entity with several events in one call reads its meta
-- once. Per-entity order's writes keep an entry; per-field order's drop it.
local known_meta = {}

local function remember_mark(meta, field, mark)
  local known = known_meta[meta]
  if known then known.marks[field] = mark end
end

-- The entity's offset mark for the record's partition (false: none).
local function offset_mark(e)
  local known = known_meta[e.meta]
  local mark = known and known.marks[e.mark_field]
  if mark == nil then
    mark = redis.call('HGET', e.meta, e.mark_field)
    remember_mark(e.meta, e.mark_field, mark)
  end
  return mark
end

-- The entity's seq, applied count and offset mark for the record's
-- partition (each false where there is none).
local function read_meta(e)
  local known = known_meta[e.meta]
  if known and (e.mark_field == '' or known.marks[e.mark_field] ~= nil) then
    return known.seq, known.applied, known.marks[e.mark_field] or false
  end
  local m
  if e.mark_field ~= '' then
    m = redis.call('HMGET', e.meta, 'seq', 'applied', e.mark_field)
  else
    m = redis.call('HMGET', e.meta, 'seq', 'applied')
  end
  known = { seq = m[1], applied = m[2], marks = {} }
  if e.mark_field ~= '' then known.marks[e.mark_field] = m[3] end
  known_meta[e.meta] = known
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

-- A newer event's state and bookkeeping (`applied`: the count before it).
-- Writes in the order state, meta; the effects and the id mark follow.
-- For an event without effects (`no_effects`) the meta write also moves
-- the offset mark: the state is written by then, so the mark never covers
-- a record without its effects, and the call saves a write.
local function write_newer(e, applied, no_effects)
  local count = string.format('%d', (tonumber(applied) or 0) + 1)
  local mark_field, mark = nil, nil
  if no_effects and e.mark_field ~= '' and not is_held(e) then
    mark_field, mark = e.mark_field, e.mark
    e.marked = true
  end
  local known = known_meta[e.meta]
  if known then
    known.seq, known.applied = e.seq, count
    if mark then known.marks[mark_field] = mark end
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
-- of the record as fields, and the relay writes the JSON (src/relay/entry.rs):
-- encoding it here cost Redis, the one busy core, twice what storing the
-- parts does.
--   e v t p o at    entity, version, source topic, partition, offset, time
--   k ty            kind (applied, late, partial), type (idem.change, delete)
--   ei es [et] [ts] the event's id, seq, type and time
--   n               how many state pairs follow; then the state after, pairs
--                   (or n = 0 and `dj` the state as JSON, when too many to pass)
--   then one pair per effect: c<counter> value, C<counter> '' (removed),
--   s+<set> member, s-<set> member, l<stream>\0<field> value (the entry);
--   or, when too many to pass, `fj` before `n`: those pairs as one JSON list
local CHANGE_KIND = { a = 'applied', l = 'late', p = 'partial' }
-- Lua passes at most ~8000 values to a call (unpack): a state or effects
-- larger than this are sent as one JSON field each instead of pairs.
local MAX_PAIRS = 3000

local function change_effect_pairs(plan, base, args)
  local counters_key = base .. ':counters'
  for _, w in ipairs(plan) do
    local cmd, key = w[1], w[2]
    if key == counters_key and cmd == 'HSET' then
      args[#args + 1], args[#args + 2] = 'c' .. w[3], w[4]
    elseif key == counters_key and cmd == 'HDEL' then
      args[#args + 1], args[#args + 2] = 'C' .. w[3], ''
    elseif cmd == 'SADD' or cmd == 'SREM' then
      args[#args + 1] = (cmd == 'SADD' and 's+' or 's-') .. string.sub(key, #base + 6)
      args[#args + 1] = w[3]
    elseif cmd == 'XADD' then
      local stream = string.sub(key, #base + 9)
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
  local base = string.sub(e.meta, 1, #e.meta - 5)
  local entity = string.sub(base, string.find(base, '{', 1, true) + 1, -2)
  local version = redis.call('HINCRBY', e.meta, 'cv', 1)
  local state = redis.call('HGETALL', e.state)
  local args = { 'XADD', KEYS[2], '*', 'e', entity, 'v', version, 't', e.changelog,
    'p', string.match(e.mark_field, ':(%d+)$') or '', 'o', e.offset, 'at', now_str,
    'k', CHANGE_KIND[decided], 'ty', (e.op == 'delete' and #state == 0) and 'delete' or 'idem.change',
    'ei', e.id, 'es', e.seq }
  if e.type ~= '' then args[#args + 1], args[#args + 2] = 'et', e.type end
  if e.ts ~= '' then args[#args + 1], args[#args + 2] = 'ts', e.ts end
  local fx = {}
  if plan then change_effect_pairs(plan, base, fx) end
  if #fx > 2 * MAX_PAIRS then
    args[#args + 1], args[#args + 2] = 'fj', cjson.encode(fx)
    fx = {}
  end
  if #state > 2 * MAX_PAIRS then
    args[#args + 1], args[#args + 2] = 'dj', cjson.encode(hash_table(e.state))
    args[#args + 1], args[#args + 2] = 'n', 0
  else
    args[#args + 1], args[#args + 2] = 'n', #state / 2
    for i = 1, #state do args[#args + 1] = state[i] end
  end
  for i = 1, #fx do args[#args + 1] = fx[i] end
  redis.call(unpack(args))
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
  redis.call('HSET', e.current, e.idh, e.fp .. now_packed .. token .. decided)
  if not expiring[e.current] then
    if redis.call('HLEN', e.current) == 1 then
      redis.call('PEXPIREAT', e.current, e.expire_at)
    end
    expiring[e.current] = true
  end
  mark_decided(e)
end

-- Dense seqs (dedupe.dense_seq_topics, docs/guarantees.md, "Dense seqs"):
-- where an entity's seqs are 1, 2, 3, … the seq itself says whether an
-- event was decided, whatever the window. In meta:
--   dense         "<base>:<mark>": every seq from base to mark was decided
--                 (or closed, below); base is where the rule began for the
--                 entity (1, or one past its seq when it was first decided
--                 under the rule); seqs below base follow the other rules
--   dense_above   "<seq>=<fingerprint hex>,…": decided seqs above mark + 1,
--                 at most MAX_DENSE_ABOVE
--   dense_closed  "<from>-<to>,…": gaps closed at that cap, at most
--                 MAX_DENSE_CLOSED ranges (at the cap the two oldest merge)
-- A dead-lettered event (a rejection, a conflict) decides no seq, so its
-- redrive applies once.
local MAX_DENSE_ABOVE = 32
local MAX_DENSE_CLOSED = 8
-- Dense seqs are counted with Lua numbers (doubles): exact below 2^53.
local MAX_DENSE_DIGITS = 15

-- The entity's dense record, or nil where the rule cannot start (its seq
-- is beyond what the rule counts exactly).
local function read_dense(meta, recorded)
  local m = redis.call('HMGET', meta, 'dense', 'dense_above', 'dense_closed', 'fingerprint')
  if not m[1] and recorded and #recorded > MAX_DENSE_DIGITS then return nil end
  local d = { above = {}, closed = {}, fingerprint = m[4] }
  if m[1] then
    local base, mark = string.match(m[1], '^(%d+):(%d+)$')
    d.base, d.mark = tonumber(base), tonumber(mark)
  else
    d.mark = tonumber(recorded or '0')
    d.base = d.mark + 1
    d.fresh = true
  end
  if m[2] then
    for s, fp in string.gmatch(m[2], '(%d+)=(%x+)') do d.above[tonumber(s)] = fp end
  end
  if m[3] then
    for from, to in string.gmatch(m[3], '(%d+)%-(%d+)') do
      d.closed[#d.closed + 1] = { tonumber(from), tonumber(to) }
    end
  end
  return d
end

-- The dense rule's verdict on a seq it has seen (code, detail), or nil to
-- decide the event as usual.
local function dense_verdict(e, d, recorded)
  local s = tonumber(e.seq)
  if s < d.base then return nil end
  for _, r in ipairs(d.closed) do
    if s >= r[1] and s <= r[2] then
      return REJECTED, 'seq_gap_closed seq ' .. e.seq .. ' falls in ' .. r[1] .. '-' .. r[2]
        .. ', a gap closed when ' .. MAX_DENSE_ABOVE .. ' later seqs were waiting above it: not applied'
    end
  end
  local known = d.above[s]
  if not known and e.seq == recorded then known = d.fingerprint end
  if known and known ~= e.fp_hex then return SEQ_REUSED, known end
  if known or s <= d.mark then return DUPLICATE_BY_SEQ, 0 end
  return nil
end

local function format_dense(d)
  local above, closed = {}, {}
  local seqs = {}
  for s in pairs(d.above) do seqs[#seqs + 1] = s end
  table.sort(seqs)
  for _, s in ipairs(seqs) do above[#above + 1] = string.format('%d=%s', s, d.above[s]) end
  for _, r in ipairs(d.closed) do closed[#closed + 1] = string.format('%d-%d', r[1], r[2]) end
  return string.format('%d:%d', d.base, d.mark), table.concat(above, ','), table.concat(closed, ','), #seqs
end

-- Moves the mark past `s`, decided; at the cap closes the gap below the
-- lowest waiting seq. Returns how many seqs it closed.
local function dense_decided(e, d)
  local s = tonumber(e.seq)
  if s == d.mark + 1 then d.mark = s else d.above[s] = e.fp_hex end
  local closed, waiting = 0, 0
  for _ in pairs(d.above) do waiting = waiting + 1 end
  while true do
    while d.above[d.mark + 1] do
      d.above[d.mark + 1] = nil
      d.mark, waiting = d.mark + 1, waiting - 1
    end
    if waiting <= MAX_DENSE_ABOVE then break end
    local lowest
    for seq in pairs(d.above) do
      if not lowest or seq < lowest then lowest = seq end
    end
    d.closed[#d.closed + 1] = { d.mark + 1, lowest - 1 }
    closed = closed + lowest - 1 - d.mark
    d.mark = lowest - 1
  end
  while #d.closed > MAX_DENSE_CLOSED do
    d.closed[1][2] = d.closed[2][2]
    table.remove(d.closed, 2)
  end
  local mark, above, closed_ranges = format_dense(d)
  redis.call('HSET', e.meta, 'dense', mark)
  if above ~= '' then redis.call('HSET', e.meta, 'dense_above', above) else redis.call('HDEL', e.meta, 'dense_above') end
  if closed_ranges ~= '' then redis.call('HSET', e.meta, 'dense_closed', closed_ranges) end
  return closed
end

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

-- An id not seen in the window, under per-entity order: applied, late,
-- stale or rejected, with every write of it. Returns code, detail.
local function decide_per_entity(e, token, recorded, applied)
  local newer = not recorded or is_newer(e.seq, recorded)
  local plan, why = nil, nil
  if (newer or e.commutative) and #e.mutations > 0 then
    plan, why = prepare(e.mutations, newer, e.seq, e.state, { e.id, e.type })
  end
  if why then
    -- Nothing written, not even the id or the mark: a redelivery is
    -- decided again (and dead-lettered again).
    hold_mark(e)
    return REJECTED, why
  end
  local code, decided = STALE, 's'
  if newer then
    -- A failure must never leave the id remembered without its effect:
    -- state and meta first, then the effects, the id mark last.
    write_newer(e, applied, plan == nil or #plan == 0)
    code, decided = APPLIED, 'a'
  elseif e.commutative then
    code, decided = LATE, 'l'
  end
  finish_decision(e, token, plan, decided)
  return code, 0
end

-- The outcomes that decide a seq (its event's effects are in).
local DECIDES_SEQ = { [APPLIED] = true, [STALE] = true, [LATE] = true, [PARTIAL] = true }

-- An id not seen in the window: replayed (its record was decided), a seq
-- the dense rule has seen, or decided by the entity's order mode.
-- Returns code, detail.
local function decide_new(e, token)
  local recorded, applied, mark = read_meta(e)
  if covers(mark, e.offset) then return REPLAYED, 0 end
  local dense
  if e.dense and #e.seq <= MAX_DENSE_DIGITS then
    dense = read_dense(e.meta, recorded)
    local code, detail
    if dense then code, detail = dense_verdict(e, dense, recorded) end
    if code then
      if code == DUPLICATE_BY_SEQ then mark_decided(e) else hold_mark(e) end
      return code, detail
    end
  end
  local code, detail
  if e.per_field then
    code, detail = decide_per_field(e, token, recorded, applied)
    known_meta[e.meta] = nil
  else
    code, detail = decide_per_entity(e, token, recorded, applied)
  end
  if dense and DECIDES_SEQ[code] and tonumber(e.seq) >= dense.base then
    detail = dense_decided(e, dense)
  end
  return code, detail
end

-- An id seen in the window: a re-read of this very record is `replayed`
-- (a retried batch's own records keep the earlier attempt's code, so its
-- counts stay what that attempt decided); another record with the id is a
-- duplicate or a conflict, and moves the mark.
local function decide_seen_record(seen, e, token)
  local code, detail = decide_seen(seen, e, token)
  if e.mark_field == '' then return code, detail end
  if code == CONFLICT then
    -- Dead-lettered: decided again on every re-read within the window.
    hold_mark(e)
    return code, detail
  end
  if covers(offset_mark(e), e.offset) then
    if code == DUPLICATE then return REPLAYED, 0 end
    return code, detail
  end
  mark_decided(e)
  return code, detail
end

local function main()
  local marker = redis.call('GET', KEYS[1])
  if marker ~= ARGV[2] then
    return redis.error_reply('IDEMEPOCH ' .. (marker or 'missing'))
  end
  local token = ARGV[1]
  local out = {}
  local e, k, a = {}, 3, 3
  while a <= #ARGV do
    e, k, a = read_event(k, a, e)
    local seen = redis.call('HGET', e.current, e.idh) or redis.call('HGET', e.previous, e.idh)
    local code, detail
    if seen then
      code, detail = decide_seen_record(seen, e, token)
    else
      code, detail = decide_new(e, token)
    end
    out[#out + 1] = code
    out[#out + 1] = detail
  end
  if wrote_change then out[#out + 1] = redis.call('XLEN', KEYS[2]) end
  return out
end

-- @MAIN (idem's parse test puts a report of read_call() here instead)
return main()
