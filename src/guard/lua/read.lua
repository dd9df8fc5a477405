-- The state ops under state.order = "per_field" ("field:<op>"), by name:
-- a lookup, not a substring per event.
local PER_FIELD_OPS = {
  ['field:merge'] = 'merge', ['field:replace'] = 'replace',
  ['field:delete'] = 'delete', ['field:keep'] = 'keep',
}

-- The call's contexts (what its events share with others of their topic
-- and partition), from ARGV at 3; returns them and the first event's
-- position.
local function read_contexts()
  local contexts, a = {}, 4
  local n = tonumber(ARGV[3])
  if not n or 3 + 5 * n > #ARGV then error('IDEMPROTOCOL ' .. tostring(ARGV[3]) .. ' contexts') end
  for i = 1, n do
    contexts[i] = { expire_at = ARGV[a], mark_field = ARGV[a + 1], mark_prefix = ARGV[a + 2],
      dense = ARGV[a + 3] == '1', changelog = ARGV[a + 4] }
    a = a + 5
  end
  return contexts, a
end

-- Reads one event of the call into `e`: its keys from KEYS at `k`, its
-- arguments from ARGV at `a`. Returns it and the positions of the next
-- event. The main loop passes the same table for every event: filling a
-- table that has its fields already costs Redis no allocation per event.
local function read_event(contexts, k, a, e)
  e.meta, e.state, e.current, e.previous = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local c = contexts[tonumber(ARGV[a])]
  e.expire_at, e.mark_field, e.dense, e.changelog = c.expire_at, c.mark_field, c.dense, c.changelog
  e.id, e.idh, e.fp, e.fp_hex, e.seq = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local offset = ARGV[a + 6]
  e.offset = tonumber(offset)
  e.mark = c.mark_field ~= '' and c.mark_prefix .. offset or ''
  e.marked = false
  local op = ARGV[a + 7]
  local per_field_op = PER_FIELD_OPS[op]
  e.per_field = per_field_op ~= nil
  e.op = per_field_op or op
  -- The state fields stay in ARGV (written from there in chunks).
  e.nset = tonumber(ARGV[a + 8])
  e.set_from = a + 9
  e.nunset = tonumber(ARGV[e.set_from + 2 * e.nset])
  e.unset_from = e.set_from + 2 * e.nset + 1
  a = e.unset_from + e.nunset
  local nkeys = tonumber(ARGV[a])
  e.type = ARGV[a + 1]
  e.keys = nkeys == 0 and NONE or { unpack(KEYS, k + 4, k + 3 + nkeys) }
  e.mutations, a, e.commutative = read_mutations(a + 2, e.keys)
  if e.changelog == '' then
    e.ts = ''
    return e, k + 4 + nkeys, a
  end
  e.ts = ARGV[a]
  return e, k + 4 + nkeys, a + 1
end

-- Every event of the call, in order, each in a table of its own.
local function read_call()
  local contexts, a = read_contexts()
  local events, k = {}, 3
  while a <= #ARGV do
    events[#events + 1], k, a = read_event(contexts, k, a, {})
  end
  return events
end
