-- A point per whole unit deposited, at most 1000 per account.
local points = tonumber(counters.points or "0")
local amount = tonumber(event.data.amount)
if amount == nil then
  error("amount is not a number: " .. tostring(event.data.amount))
end
return { points = math.min(1000, points + math.floor(amount)) }
