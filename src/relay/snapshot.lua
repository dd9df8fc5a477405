#!lua
-- idem changelog snapshot: one entity's current state written to its
-- slot's outbox as a change (kind "snapshot"), under the entity's next
-- change version, in one atomic step like the guard's changes
-- (write_change in guard.lua; docs/changelog.md, "Bootstrapping a consumer").
--
-- KEYS  meta, state, outbox (of the entity's slot), counters, then one set
--       key per ARGV[3..]
-- ARGV  entity, source topic, then the declared set names
-- Returns the version written, or 0 where the entity has no meta (gone).

local meta, state_key, outbox, counters_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local entity, topic = ARGV[1], ARGV[2]
if redis.call('EXISTS', meta) == 0 then return 0 end

local function hash_table(key)
  local flat = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local version = redis.call('HINCRBY', meta, 'cv', 1)
local state = hash_table(state_key)
local change = { kind = 'snapshot' }
local counters = hash_table(counters_key)
if next(counters) then change.counters = counters end
for i = 3, #ARGV do
  local members = redis.call('SMEMBERS', KEYS[i + 2])
  if #members > 0 then
    change.sets = change.sets or {}
    local set = {}
    for _, m in ipairs(members) do set[m] = true end
    change.sets[ARGV[i]] = set
  end
end
local deleted = redis.call('HGET', meta, 'deleted') == '1' and next(state) == nil
local record = cjson.encode({ id = entity .. '#' .. version, entity = entity, seq = version,
  type = deleted and 'delete' or 'idem.change', data = state, change = change })
redis.call('XADD', outbox, '*', 'e', entity, 'v', version, 'r', record, 't', topic,
  'p', '', 'o', '-1', 'at', now)
return version
