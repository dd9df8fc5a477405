-- The call: the marker first (no write where Redis lost its state), then
-- each event decided in order. `Guard::parsed_by_script` puts report.lua
-- in this file's place.
local function main()
  local marker = redis.call('GET', KEYS[1])
  if marker ~= ARGV[2] then
    return redis.error_reply('IDEMEPOCH ' .. (marker or 'missing'))
  end
  local token = ARGV[1]
  local out = {}
  local contexts, a = read_contexts()
  local e, k = {}, 3
  while a <= #ARGV do
    e, k, a = read_event(contexts, k, a, e)
    local seen = redis.call('HGET', e.current, e.idh) or redis.call('HGET', e.previous, e.idh)
    local code, detail
    if seen then
      code, detail = decide_seen_record(seen, e, token)
    else
      code, detail = decide_new(e, token)
    end
    out[#out + 1] = code
    out[#out + 1] = detail
  end
  if wrote_change then out[#out + 1] = redis.call('XLEN', KEYS[2]) end
  return out
end

return main()
