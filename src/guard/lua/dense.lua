-- Dense seqs (dedupe.dense_seq_topics, docs/guarantees.md, "Dense seqs"):
-- where an entity's seqs are 1, 2, 3, … the seq itself says whether an
-- event was decided, whatever the window. In meta:
--   dense         "<base>:<mark>": every seq from base to mark was decided
--                 (or closed, below); base is where the rule began for the
--                 entity (1, or one past its seq when it was first decided
--                 under the rule); seqs below base follow the other rules
--   dense_above   "<seq>=<fingerprint hex>,…": decided seqs above mark + 1,
--                 at most MAX_DENSE_ABOVE
--   dense_closed  "<from>-<to>,…": gaps closed at that cap, at most
--                 MAX_DENSE_CLOSED ranges (at the cap the two oldest merge)
-- A dead-lettered event (a rejection, a conflict) decides no seq, so its
-- redrive applies once.
local MAX_DENSE_ABOVE = 32
local MAX_DENSE_CLOSED = 8
-- Dense seqs are counted with Lua numbers (doubles): exact below 2^53.
local MAX_DENSE_DIGITS = 15

-- The entity's dense record, or nil where the rule cannot start (its seq
-- is beyond what the rule counts exactly).
local function read_dense(meta, recorded)
  local m = redis.call('HMGET', meta, 'dense', 'dense_above', 'dense_closed', 'fingerprint')
  if not m[1] and recorded and #recorded > MAX_DENSE_DIGITS then return nil end
  local d = { above = {}, closed = {}, fingerprint = m[4] }
  if m[1] then
    local base, mark = string.match(m[1], '^(%d+):(%d+)$')
    d.base, d.mark = tonumber(base), tonumber(mark)
  else
    d.mark = tonumber(recorded or '0')
    d.base = d.mark + 1
    d.fresh = true
  end
  if m[2] then
    for s, fp in string.gmatch(m[2], '(%d+)=(%x+)') do d.above[tonumber(s)] = fp end
  end
  if m[3] then
    for from, to in string.gmatch(m[3], '(%d+)%-(%d+)') do
      d.closed[#d.closed + 1] = { tonumber(from), tonumber(to) }
    end
  end
  return d
end

-- The dense rule's verdict on a seq it has seen (code, detail), or nil to
-- decide the event as usual.
local function dense_verdict(e, d, recorded)
  local s = tonumber(e.seq)
  if s < d.base then return nil end
  for _, r in ipairs(d.closed) do
    if s >= r[1] and s <= r[2] then
      return REJECTED, REASON_SEQ_GAP_CLOSED .. ' seq ' .. e.seq .. ' falls in ' .. r[1] .. '-' .. r[2]
        .. ', a gap closed when ' .. MAX_DENSE_ABOVE .. ' later seqs were waiting above it: not applied'
    end
  end
  local known = d.above[s]
  if not known and e.seq == recorded then known = d.fingerprint end
  if known and known ~= e.fp_hex then return SEQ_REUSED, known end
  if known or s <= d.mark then return DUPLICATE_BY_SEQ, 0 end
  return nil
end

local function format_dense(d)
  local above, closed = {}, {}
  local seqs = {}
  for s in pairs(d.above) do seqs[#seqs + 1] = s end
  table.sort(seqs)
  for _, s in ipairs(seqs) do above[#above + 1] = string.format('%d=%s', s, d.above[s]) end
  for _, r in ipairs(d.closed) do closed[#closed + 1] = string.format('%d-%d', r[1], r[2]) end
  return string.format('%d:%d', d.base, d.mark), table.concat(above, ','), table.concat(closed, ','), #seqs
end

-- Moves the mark past `s`, decided; at the cap closes the gap below the
-- lowest waiting seq. Returns how many seqs it closed.
local function dense_decided(e, d)
  local s = tonumber(e.seq)
  if s == d.mark + 1 then d.mark = s else d.above[s] = e.fp_hex end
  local closed, waiting = 0, 0
  for _ in pairs(d.above) do waiting = waiting + 1 end
  while true do
    while d.above[d.mark + 1] do
      d.above[d.mark + 1] = nil
      d.mark, waiting = d.mark + 1, waiting - 1
    end
    if waiting <= MAX_DENSE_ABOVE then break end
    local lowest
    for seq in pairs(d.above) do
      if not lowest or seq < lowest then lowest = seq end
    end
    d.closed[#d.closed + 1] = { d.mark + 1, lowest - 1 }
    closed = closed + lowest - 1 - d.mark
    d.mark = lowest - 1
  end
  while #d.closed > MAX_DENSE_CLOSED do
    d.closed[1][2] = d.closed[2][2]
    table.remove(d.closed, 2)
  end
  local mark, above, closed_ranges = format_dense(d)
  redis.call('HSET', e.meta, 'dense', mark)
  if above ~= '' then redis.call('HSET', e.meta, 'dense_above', above) else redis.call('HDEL', e.meta, 'dense_above') end
  if closed_ranges ~= '' then redis.call('HSET', e.meta, 'dense_closed', closed_ranges) end
  return closed
end

