-- One outbox entry: the one writer of its layout, for the guard's changes
-- (write_change in src/guard/lua/writes.lua) and the snapshot's
-- (src/relay/snapshot.lua); src/store/outbox/entry.rs reads it back.
-- Fields, in order:
--   e entity, v change version, t source topic, p partition ('' if none),
--   o offset (-1 if none), at when (ms, Redis's clock), k kind, ty type;
--   for a change an event made: ei its id, es its seq, et its type and ts
--   its time (each of these two only if it has one);
--   fj the effect pairs as one JSON list, when too many to pass;
--   n how many state pairs follow, then the state after (or n = 0 and dj
--   the state as JSON, when too many to pass);
--   then one pair per effect: c<counter> value, C<counter> '' (removed),
--   s+<set> member, s-<set> member, l<stream>\0<field> value (the entry).
-- A state or effects of more than MAX_PAIRS pairs (Lua passes at most
-- ~8000 values to a call) go as one JSON field each instead.
-- `c` holds the fixed fields by name (entity, version, topic, partition,
-- offset, at, kind, type; event_id, event_seq, event_type, ts for an
-- event's change), `state` what HGETALL gave, `fx` the effect pairs.
local function add_outbox_entry(outbox, c, state, fx)
  local args = { 'XADD', outbox, '*', 'e', c.entity, 'v', c.version, 't', c.topic,
    'p', c.partition, 'o', c.offset, 'at', c.at, 'k', c.kind, 'ty', c.type }
  local function push(field, value) args[#args + 1], args[#args + 2] = field, value end
  if c.event_id then
    push('ei', c.event_id)
    push('es', c.event_seq)
    if c.event_type ~= '' then push('et', c.event_type) end
    if c.ts ~= '' then push('ts', c.ts) end
  end
  if #fx > 2 * MAX_PAIRS then
    push('fj', cjson.encode(fx))
    fx = {}
  end
  if #state > 2 * MAX_PAIRS then
    local data = {}
    for i = 1, #state, 2 do data[state[i]] = state[i + 1] end
    push('dj', cjson.encode(data))
    push('n', 0)
  else
    push('n', #state / 2)
    for i = 1, #state do args[#args + 1] = state[i] end
  end
  for i = 1, #fx do args[#args + 1] = fx[i] end
  return redis.call(unpack(args))
end
