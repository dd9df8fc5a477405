-- In main.lua's place for the benchmark's floor (IDEM_BENCH_GUARD_STUB,
-- docs/performance.md): the same KEYS and ARGV, and the commands a new
-- plain merge event runs, with no decision: the id looked up in both
-- generations, meta read, state, meta and id written (the steady state:
-- the id hash's expiry known from meta's idg). Every event is answered
-- applied. Only events without mutations are supported.
local token = ARGV[1]
local out = {}
local contexts, a = read_contexts()
local k = 3
while a <= #ARGV do
  local meta, state, current, previous = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local c = contexts[tonumber(ARGV[a])]
  local idh = ARGV[a + 2]
  redis.call('HGET', current, idh)
  redis.call('HGET', previous, idh)
  redis.call('HMGET', meta, 'seq', 'applied', 'idg', c.mark_field)
  local nset = tonumber(ARGV[a + 8])
  local set_from = a + 9
  redis.call('HSET', state, unpack(ARGV, set_from, set_from + 2 * nset - 1))
  redis.call('HSET', meta, 'seq', ARGV[a + 5], 'last_id', ARGV[a + 1], 'fingerprint', ARGV[a + 4],
    'updated_ms', now_str, 'applied', 1, 'deleted', '0', c.mark_field, c.mark_prefix .. ARGV[a + 6])
  redis.call('HSET', current, idh, ARGV[a + 3] .. now_packed .. token .. 'a')
  local nunset = tonumber(ARGV[set_from + 2 * nset])
  a = set_from + 2 * nset + 1 + nunset
  local nkeys = tonumber(ARGV[a])
  if tonumber(ARGV[a + 2]) ~= 0 then error('IDEMPROTOCOL the stub takes no mutations') end
  k = k + 4 + nkeys
  a = a + 3
  if c.changelog ~= '' then a = a + 1 end
  out[#out + 1] = APPLIED
  out[#out + 1] = 0
end
return out
