-- idem's progress record (src/store/progress.rs, `ProgressStore::record`):
-- checks the epoch marker, then that no record went below what idem last
-- wrote, then raises each record and adds each claim to the decided
-- ranges, capped at MAX_RANGES (the prelude's, from src/consumed.rs).
-- A refusal writes nothing.
local found = redis.call('GET', KEYS[1])
if found ~= ARGV[1] then return redis.error_reply('IDEMEPOCH ' .. (found or 'missing')) end
local last = 2 + 5 * tonumber(ARGV[2])
local function record_of(i)
  local own = ARGV[i + 1] ~= '' and redis.call('HGET', KEYS[2], ARGV[i + 1])
  if own then return tonumber(own) end
  local owner = ARGV[i + 1] ~= '' and redis.call('HGET', KEYS[2], ARGV[i] .. ':id')
  if owner and owner ~= ARGV[i + 2] then return nil end
  return tonumber(redis.call('HGET', KEYS[2], ARGV[i]))
end
local current = {}
for i = 3, last, 5 do
  local cur = record_of(i)
  local expected = tonumber(ARGV[i + 4])
  if expected >= 0 and (not cur or cur < expected) then
    return redis.error_reply('IDEMROLLBACK ' .. ARGV[i] .. ' is ' .. tostring(cur) .. ', idem recorded ' .. ARGV[i + 4])
  end
  current[i] = cur
end
for i = 3, last, 5 do
  local next = tonumber(ARGV[i + 3])
  if not current[i] or current[i] < next then
    if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 3]) end
  end
  -- The plain field only rises (older versions read it); its owner says
  -- which incarnation last raised it or found it high enough.
  local plain = tonumber(redis.call('HGET', KEYS[2], ARGV[i]))
  if not plain or plain < next then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 3]) end
  if ARGV[i + 1] ~= '' and (not plain or plain <= next) then
    redis.call('HSET', KEYS[2], ARGV[i] .. ':id', ARGV[i + 2])
  end
end
for i = last + 1, #ARGV, 3 do
  local s, e = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local out = {}
  for a, b in string.gmatch(redis.call('HGET', KEYS[3], ARGV[i]) or '', '(%d+)-(%d+)') do
    a, b = tonumber(a), tonumber(b)
    if b < s or e < a then out[#out + 1] = { a, b } else s, e = math.min(s, a), math.max(e, b) end
  end
  out[#out + 1] = { s, e }
  table.sort(out, function(x, y) return x[1] < y[1] end)
  while #out > MAX_RANGES do
    local smallest = 1
    for j = 2, #out do
      if out[j][2] - out[j][1] < out[smallest][2] - out[smallest][1] then smallest = j end
    end
    table.remove(out, smallest)
  end
  local parts = {}
  for j, r in ipairs(out) do parts[j] = string.format('%d-%d', r[1], r[2]) end
  redis.call('HSET', KEYS[3], ARGV[i], table.concat(parts, ','))
end
return 1
