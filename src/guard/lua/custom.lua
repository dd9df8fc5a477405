-- Custom effects (docs/effects.md), each inserted by idem after the mark
-- below (src/guard/script.rs) as CUSTOM[i]: its file, its declared
-- writes, the line offset of its source, and fn(state, counters, event).
local CUSTOM = {}
-- @CUSTOM

local function hash_table(key)
  local flat = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

-- Runs custom effect `index` (pure: it gets values, returns fields); its
-- writes as a flat list, or nil and why.
local function run_custom(index, state_key, counters_key, event)
  local custom = CUSTOM[index]
  local ok, result = pcall(custom.fn, hash_table(state_key), hash_table(counters_key), event)
  local where = custom.file
  if not ok then
    local message = string.gsub(tostring(result), 'user_script:(%d+):', function(n)
      return where .. ':' .. (tonumber(n) - custom.offset) .. ':'
    end)
    return nil, REASON_EFFECT_FAILED .. ' ' .. message
  end
  if type(result) ~= 'table' then
    return nil, REASON_EFFECT_INVALID_OUTPUT .. ' ' .. where .. ' returned a ' .. type(result) .. ', not a table of fields'
  end
  local writes = {}
  for field, value in pairs(result) do
    if type(field) ~= 'string' or not custom.writes[field] then
      return nil, REASON_EFFECT_INVALID_OUTPUT .. ' ' .. where .. ' returned field ' .. tostring(field) .. ', not one of its declared writes'
    end
    if type(value) == 'number' then
      if value ~= math.floor(value) or math.abs(value) >= 2 ^ 53 then
        return nil, REASON_EFFECT_INVALID_OUTPUT .. ' ' .. where .. ' returned ' .. field .. ' = ' .. tostring(value) .. ': a number must be an integer below 2^53 (return a string for decimals)'
      end
      value = string.format('%d', value)
    elseif value ~= false and type(value) ~= 'string' then
      return nil, REASON_EFFECT_INVALID_OUTPUT .. ' ' .. where .. ' returned ' .. field .. ' as a ' .. type(value) .. ' (a string, an integer or false to remove it)'
    end
    writes[#writes + 1] = { field, value }
  end
  return writes
end

