-- In main.lua's place for `Guard::parsed_by_script` (tests/guard.rs): what
-- read_call() made of the call, as JSON, instead of running it. Nothing
-- is written.
local function hex(bytes)
  return (string.gsub(bytes, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local report = {}
for _, e in ipairs(read_call()) do
  local set, unset = {}, {}
  for i = e.set_from, e.set_from + 2 * e.nset - 1 do set[#set + 1] = ARGV[i] end
  for i = e.unset_from, e.unset_from + e.nunset - 1 do unset[#unset + 1] = ARGV[i] end
  report[#report + 1] = { meta = e.meta, state = e.state, current = e.current, previous = e.previous,
    expire_at = e.expire_at, id = e.id, id_hash = hex(e.idh), fingerprint_bytes = hex(e.fp),
    fingerprint = e.fp_hex, seq = e.seq, mark_field = e.mark_field, offset = e.offset, mark = e.mark,
    op = e.op, per_field = e.per_field, dense = e.dense, type = e.type, set = set, unset = unset,
    keys = e.keys, mutations = e.mutations, commutative = e.commutative,
    changelog = e.changelog }
end
return cjson.encode(report)
