-- idem reconcile --repair: rewrite one entity to the state computed from the log.
-- KEYS[1] the entity base "<prefix>:{<entity>}"
-- ARGV    seq, last_id, applied, deleted ("0"|"1"), nfields, field1, value1, ...
-- Never lowers a seq: if Redis holds a newer seq than the log's, nothing is
-- written and 0 is returned; otherwise 1.
local base = KEYS[1]
local seq = ARGV[1]
local recorded = redis.call('HGET', base .. ':meta', 'seq')
local function is_newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
if recorded and is_newer(recorded, seq) then
  return 0
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('DEL', base .. ':state')
local n = tonumber(ARGV[5])
for from = 6, 5 + 2 * n, 1000 do
  redis.call('HSET', base .. ':state', unpack(ARGV, from, math.min(from + 1000, 6 + 2 * n) - 1))
end
redis.call('HSET', base .. ':meta', 'seq', seq, 'last_id', ARGV[2], 'applied', ARGV[3],
  'deleted', ARGV[4], 'updated_ms', now)
return 1
