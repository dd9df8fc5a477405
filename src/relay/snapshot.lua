-- idem changelog snapshot: one entity's current state written to its
-- slot's outbox as a change (kind "snapshot"), under the entity's next
-- change version, in one atomic step like the guard's changes. The entry
-- is laid out by src/store/outbox/entry.lua, joined before this file
-- (docs/change-stream.md, "Bootstrapping a consumer"), without an event;
-- its counters are all of them (c<name> value), its sets every member
-- (s+<set> member).
--
-- KEYS  meta, state, outbox (of the entity's slot), counters, then one set
--       key per ARGV[3..]
-- ARGV  entity, source topic, then the declared set names
-- Returns the version written, or 0 where the entity has no meta (gone).
-- The prelude idem generates gives MAX_PAIRS (src/store/script.rs).

local meta, state_key, outbox, counters_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local entity, topic = ARGV[1], ARGV[2]
if redis.call('EXISTS', meta) == 0 then return 0 end

local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local version = redis.call('HINCRBY', meta, 'cv', 1)
local state = redis.call('HGETALL', state_key)
local deleted = redis.call('HGET', meta, 'deleted') == '1' and #state == 0
local fx = {}
local counters = redis.call('HGETALL', counters_key)
for i = 1, #counters, 2 do fx[#fx + 1], fx[#fx + 2] = 'c' .. counters[i], counters[i + 1] end
for i = 3, #ARGV do
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[i + 2])) do fx[#fx + 1], fx[#fx + 2] = 's+' .. ARGV[i], m end
end
add_outbox_entry(outbox, {
  entity = entity, version = version, topic = topic, partition = '', offset = '-1', at = now,
  kind = 'snapshot', type = deleted and 'delete' or 'idem.change',
}, state, fx)
return version
