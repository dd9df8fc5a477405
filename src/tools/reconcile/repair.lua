-- idem reconcile --repair: rewrite one entity to the state computed from the log.
-- KEYS    the entity's meta and state keys (named by store::KeyLayout)
-- ARGV    seq, last_id, applied, deleted ("0"|"1"), nfields, field1, value1, ...,
--         then the fingerprint (hex) of the event at seq ("" if unknown)
-- Never lowers a seq: if Redis holds a newer seq than the log's, nothing is
-- written and 0 is returned; otherwise 1.
local meta, state = KEYS[1], KEYS[2]
local seq = ARGV[1]
local recorded = redis.call('HGET', meta, 'seq')
local function is_newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
if recorded and is_newer(recorded, seq) then
  return 0
end
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('DEL', state)
local n = tonumber(ARGV[5])
for from = 6, 5 + 2 * n, 1000 do
  redis.call('HSET', state, unpack(ARGV, from, math.min(from + 1000, 6 + 2 * n) - 1))
end
redis.call('HSET', meta, 'seq', seq, 'last_id', ARGV[2], 'applied', ARGV[3],
  'deleted', ARGV[4], 'updated_ms', now)
-- The dense-seq rule compares a copy at `seq` with this fingerprint.
local fingerprint = ARGV[6 + 2 * n]
if fingerprint and fingerprint ~= '' then
  redis.call('HSET', meta, 'fingerprint', fingerprint)
else
  redis.call('HDEL', meta, 'fingerprint')
end
-- Under state.order = "per_field" the field seqs no longer describe the
-- rewritten state: without `field_seqs_at` the next event takes the state
-- as of `seq` (events older than it are stale), as after per-entity order.
redis.call('HDEL', meta, 'field_seqs_at')
return 1
