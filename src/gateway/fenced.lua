-- The start of every gateway script that binds or takes over a seq (BIND,
-- SWEEP; joined in front of them by `binding::fenced`): nothing is written
-- under an epoch idem has not set. KEYS[1] is the epoch marker of the
-- script's slot, ARGV[1] the epoch the gateway knows; `now` is Redis's
-- clock in ms, for the leases.

local marker = redis.call('GET', KEYS[1])
if marker ~= ARGV[1] then
  return redis.error_reply('IDEMEPOCH ' .. (marker or 'missing'))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
