-- Phase one of an event's mutations: every decision and every check, no
-- write. Returns the writes as commands, or nil and why.
local function prepare(mutations, newer, seq, state_key, event_head)
  local plan = {}
  local counters_seen = {}
  for _, m in ipairs(mutations) do
    if m.kind == KIND_COUNTER then
      local memo = counters_seen[m.field]
      local sign, digits
      if memo then
        sign, digits = memo[1], memo[2]
      else
        local stored = redis.call('HGET', m.key, m.field)
        if stored then
          sign, digits = parse_stored(stored, m.scale)
          if not sign then
            return nil, REASON_COUNTER_UNREADABLE .. ' counter ' .. m.field .. ' holds ' .. stored .. ', not a decimal with at most ' .. m.scale .. ' decimals'
          end
        else
          sign, digits = 1, '0'
        end
      end
      local us, ud = parse_units(m.units)
      sign, digits = add_signed(sign, digits, us, ud)
      if #digits > MAX_DIGITS then
        return nil, REASON_COUNTER_OVERFLOW .. ' counter ' .. m.field .. ' would pass ' .. MAX_DIGITS .. ' digits'
      end
      counters_seen[m.field] = { sign, digits }
      plan[#plan + 1] = { 'HSET', m.key, m.field, format_units(sign, digits, m.scale) }
    elseif m.kind == KIND_COUNTER_SET then
      if newer then
        if m.present then
          plan[#plan + 1] = { 'HSET', m.key, m.field, m.value }
        else
          plan[#plan + 1] = { 'HDEL', m.key, m.field }
        end
      end
    elseif m.kind == KIND_SET_ADD or m.kind == KIND_SET_REMOVE then
      local removes = m.kind == KIND_SET_REMOVE
      local last = redis.call('HGET', m.seqkey, m.member)
      -- Per member, the newest seq wins; at an equal seq the remove wins,
      -- so every arrival order ends in the same set.
      if not last or is_newer(seq, last) or (removes and seq == last) then
        plan[#plan + 1] = { removes and 'SREM' or 'SADD', m.key, m.member }
        plan[#plan + 1] = { 'HSET', m.seqkey, m.member, seq }
      end
    elseif m.kind == KIND_LEDGER then
      if m.max_len ~= '0' then
        plan[#plan + 1] = { 'XADD', m.key, 'MAXLEN', '=', m.max_len, '*', unpack(m.entry) }
      else
        plan[#plan + 1] = { 'XADD', m.key, '*', unpack(m.entry) }
      end
      if m.max_age_ms > 0 then
        plan[#plan + 1] = { 'XTRIM', m.key, 'MINID', string.format('%d', math.max(0, now - m.max_age_ms)) }
      end
    elseif m.kind == KIND_CUSTOM then
      local commutes = m.order == ORDER_COMMUTATIVE
      if commutes or newer then
        local event = { id = event_head[1], seq = seq, type = event_head[2], data = m.data }
        local writes, err = run_custom(m.snippet, state_key, m.key, event)
        if not writes then return nil, err end
        local target = commutes and m.key or state_key
        for _, w in ipairs(writes) do
          if w[2] == false then
            plan[#plan + 1] = { 'HDEL', target, w[1] }
          else
            plan[#plan + 1] = { 'HSET', target, w[1], w[2] }
          end
        end
      end
    end
  end
  return plan
end

-- The mutations and effect keys of an event that has none (most): one
-- table for all, never written to, so no event allocates one.
local NONE = {}

-- One reader per mutation kind: each takes ARGV from `a` (just after the
-- kind) and the event's effect keys, and returns the mutation and the
-- position after it.
local READ_MUTATION = {
  [KIND_COUNTER] = function(a, keys)
    return { key = keys[tonumber(ARGV[a])], field = ARGV[a + 1], units = ARGV[a + 2],
      scale = tonumber(ARGV[a + 3]) }, a + 4
  end,
  [KIND_LEDGER] = function(a, keys)
    local count = tonumber(ARGV[a + 3])
    return { key = keys[tonumber(ARGV[a])], max_len = ARGV[a + 1], max_age_ms = tonumber(ARGV[a + 2]),
      entry = { unpack(ARGV, a + 4, a + 3 + 2 * count) } }, a + 4 + 2 * count
  end,
  [KIND_COUNTER_SET] = function(a, keys)
    return { key = keys[tonumber(ARGV[a])], field = ARGV[a + 1], present = ARGV[a + 2] == '1',
      value = ARGV[a + 3] }, a + 4
  end,
  [KIND_SET_ADD] = function(a, keys)
    return { key = keys[tonumber(ARGV[a])], seqkey = keys[tonumber(ARGV[a + 1])], member = ARGV[a + 2] }, a + 3
  end,
  [KIND_CUSTOM] = function(a, keys)
    local count = tonumber(ARGV[a + 3])
    local data = {}
    for k = a + 4, a + 3 + 2 * count, 2 do data[ARGV[k]] = ARGV[k + 1] end
    return { snippet = tonumber(ARGV[a]), key = keys[tonumber(ARGV[a + 1])], order = ARGV[a + 2],
      data = data }, a + 4 + 2 * count
  end,
}
READ_MUTATION[KIND_SET_REMOVE] = READ_MUTATION[KIND_SET_ADD]

-- Reads the event's mutations from ARGV at `a`; returns them, the next
-- position, and whether any of them commutes (applies when late too).
local function read_mutations(a, keys)
  local n = tonumber(ARGV[a])
  a = a + 1
  if n == 0 then return NONE, a, false end
  local mutations, commutative = {}, false
  for _ = 1, n do
    local kind = ARGV[a]
    local read = READ_MUTATION[kind]
    if not read then error('IDEMPROTOCOL unknown mutation ' .. tostring(kind)) end
    local m
    m, a = read(a + 1, keys)
    m.kind = kind
    mutations[#mutations + 1] = m
    commutative = commutative or (kind ~= KIND_CUSTOM and kind ~= KIND_COUNTER_SET) or m.order == ORDER_COMMUTATIVE
  end
  return mutations, a, commutative
end

