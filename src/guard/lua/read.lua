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

