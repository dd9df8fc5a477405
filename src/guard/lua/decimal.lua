-- Exact decimals (counters): a value is sign (1 or -1) and magnitude digits
-- without leading zeros, counted in units of 10^-scale. Doubles would round
-- money, and HINCRBY stops at 2^63, so the arithmetic is on digit strings.
local MAX_DIGITS = 38

local function strip(digits)
  digits = string.gsub(digits, '^0+', '')
  if digits == '' then return '0' end
  return digits
end

-- Parses signed digits ("-1250") as idem sends them.
local function parse_units(text)
  if string.sub(text, 1, 1) == '-' then return -1, strip(string.sub(text, 2)) end
  return 1, strip(text)
end

-- Parses a stored counter ("12.50") at `scale`; nil if it is not one.
local function parse_stored(text, scale)
  local sign = 1
  if string.sub(text, 1, 1) == '-' then sign, text = -1, string.sub(text, 2) end
  local int, frac = string.match(text, '^(%d+)%.?(%d*)$')
  if not int then return nil end
  if #frac > scale then
    if string.find(string.sub(frac, scale + 1), '[^0]') then return nil end
    frac = string.sub(frac, 1, scale)
  end
  return sign, strip(int .. frac .. string.rep('0', scale - #frac))
end

local function format_units(sign, digits, scale)
  if scale > 0 then
    if #digits <= scale then digits = string.rep('0', scale - #digits + 1) .. digits end
    digits = string.sub(digits, 1, #digits - scale) .. '.' .. string.sub(digits, #digits - scale + 1)
  end
  if sign < 0 and string.find(digits, '[1-9]') then return '-' .. digits end
  return digits
end

local function compare_magnitudes(a, b)
  if #a ~= #b then return #a > #b and 1 or -1 end
  if a == b then return 0 end
  return a > b and 1 or -1
end

-- a + b, or a - b (a >= b) with `direction` -1, on digit strings.
local function combine_magnitudes(a, b, direction)
  local out, carry = {}, 0
  local i, j = #a, #b
  while i > 0 or j > 0 do
    local d = (i > 0 and string.byte(a, i) - 48 or 0)
      + direction * (j > 0 and string.byte(b, j) - 48 or 0) + carry
    carry = 0
    if d >= 10 then d, carry = d - 10, 1 elseif d < 0 then d, carry = d + 10, -1 end
    out[#out + 1] = d
    i, j = i - 1, j - 1
  end
  if carry > 0 then out[#out + 1] = carry end
  local s = {}
  for k = #out, 1, -1 do s[#s + 1] = out[k] end
  return strip(table.concat(s))
end

local function add_signed(sa, a, sb, b)
  if sa == sb then return sa, combine_magnitudes(a, b, 1) end
  local c = compare_magnitudes(a, b)
  if c == 0 then return 1, '0' end
  if c > 0 then return sa, combine_magnitudes(a, b, -1) end
  return sb, combine_magnitudes(b, a, -1)
end

