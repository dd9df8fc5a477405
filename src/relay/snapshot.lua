-- idem changelog snapshot: one entity's current state written to its
-- slot's outbox as a change (kind "snapshot"), under the entity's next
-- change version, in one atomic step like the guard's changes. The entry
-- has the fields of write_change in src/guard/lua/writes.lua (docs/change-stream.md,
-- "Bootstrapping a consumer"), without an event; its counters are all of
-- them (c<name> value), its sets every member (s+<set> member), as one
-- JSON list `fj` when too many to pass as pairs.
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
local args = { 'XADD', outbox, '*', 'e', entity, 'v', version, 't', topic, 'p', '', 'o', '-1',
  'at', now, 'k', 'snapshot', 'ty', deleted and 'delete' or 'idem.change' }
local function push(field, value) args[#args + 1], args[#args + 2] = field, value end
local fx = {}
local counters = redis.call('HGETALL', counters_key)
for i = 1, #counters, 2 do fx[#fx + 1], fx[#fx + 2] = 'c' .. counters[i], counters[i + 1] end
for i = 3, #ARGV do
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[i + 2])) do fx[#fx + 1], fx[#fx + 2] = 's+' .. ARGV[i], m end
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
redis.call(unpack(args))
return version
