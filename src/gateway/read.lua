-- READ: an entity as the gateway answers it, in one step (state and
-- bookkeeping from the same moment), and what idem decided of one seq.
--
-- KEYS: 1 <base>:meta, 2 <base>:state, 3 <base>:counters,
--       4 <base>:ids:<g> (current generation), 5 <base>:ids:<g-1>
-- ARGV: 1 the 8-byte hash of the seq's event id ('' for none)
-- Reply: {seq, deleted, dense, dense_above, dense_closed,
--         state pairs, counter pairs, id mark (current), id mark (previous)}
-- (absent values are false).

local meta = redis.call('HMGET', KEYS[1], 'seq', 'deleted', 'dense', 'dense_above', 'dense_closed')
local marks = {false, false}
if ARGV[1] ~= '' then
  marks[1] = redis.call('HGET', KEYS[4], ARGV[1])
  marks[2] = redis.call('HGET', KEYS[5], ARGV[1])
end
return {meta[1], meta[2], meta[3], meta[4], meta[5],
  redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]), marks[1], marks[2]}
