-- In main.lua's place for the benchmark's floor (IDEM_BENCH_GUARD_STUB,
-- docs/performance.md): the same KEYS and ARGV, read as the real script
-- reads them, then, where STUB_COMMANDS (script.rs sets it for "1"), the
-- commands a new plain merge event runs, with no decision: the id looked
-- up in both generations, meta read, state, meta and id written, the id
-- hash's length asked once per entity of the call. Without them
-- ("arguments") it is the price of the call and of reading it alone.
-- Every event is answered applied. Only events without mutations are
-- supported.
local token = ARGV[1]
local out = {}
local contexts, a = read_contexts()
local e, k = {}, 3
local asked = {}
while a <= #ARGV do
  e, k, a = read_event(contexts, k, a, e)
  if #e.mutations > 0 then error('IDEMPROTOCOL the stub takes no mutations') end
  if STUB_COMMANDS then
    redis.call('HGET', e.current, e.idh)
    redis.call('HGET', e.previous, e.idh)
    redis.call('HMGET', e.meta, 'seq', 'applied', e.mark_field)
    redis.call('HSET', e.state, unpack(ARGV, e.set_from, e.set_from + 2 * e.nset - 1))
    redis.call('HSET', e.meta, 'seq', e.seq, 'last_id', e.id, 'fingerprint', e.fp_hex,
      'updated_ms', now_str, 'applied', 1, 'deleted', '0', e.mark_field, e.mark)
    redis.call('HSET', e.current, e.idh, e.fp .. now_packed .. token .. 'a')
    if not asked[e.current] then
      if redis.call('HLEN', e.current) == 1 then redis.call('PEXPIREAT', e.current, e.expire_at) end
      asked[e.current] = true
    end
  end
  out[#out + 1] = APPLIED
  out[#out + 1] = 0
end
return out
