-- An id not seen in the window, under per-entity order: applied, late,
-- stale or rejected, with every write of it. Returns code, detail.
local function decide_per_entity(e, token, recorded, applied)
  local newer = not recorded or is_newer(e.seq, recorded)
  local plan, why = nil, nil
  if (newer or e.commutative) and #e.mutations > 0 then
    plan, why = prepare(e.mutations, newer, e.seq, e.state, { e.id, e.type })
  end
  if why then
    -- Nothing written, not even the id or the mark: a redelivery is
    -- decided again (and dead-lettered again).
    hold_mark(e)
    return REJECTED, why
  end
  local code, decided = STALE, 's'
  if newer then
    -- A failure must never leave the id remembered without its effect:
    -- state and meta first, then the effects, the id mark last.
    write_newer(e, applied, plan == nil or #plan == 0)
    code, decided = APPLIED, 'a'
  elseif e.commutative then
    code, decided = LATE, 'l'
  end
  finish_decision(e, token, plan, decided)
  return code, 0
end

-- The outcomes that decide a seq (its event's effects are in).
local DECIDES_SEQ = { [APPLIED] = true, [STALE] = true, [LATE] = true, [PARTIAL] = true }

-- An id not seen in the window: replayed (its record was decided), a seq
-- the dense rule has seen, or decided by the entity's order mode.
-- Returns code, detail.
local function decide_new(e, token)
  local recorded, applied, mark = read_meta(e)
  if covers(mark, e.offset) then return REPLAYED, 0 end
  local dense
  if e.dense and #e.seq <= MAX_DENSE_DIGITS then
    dense = read_dense(e.meta, recorded)
    local code, detail
    if dense then code, detail = dense_verdict(e, dense, recorded) end
    if code then
      if code == DUPLICATE_BY_SEQ then mark_decided(e) else hold_mark(e) end
      return code, detail
    end
  end
  local code, detail
  if e.per_field then
    code, detail = decide_per_field(e, token, recorded, applied)
    forget_meta(e.meta)
  else
    code, detail = decide_per_entity(e, token, recorded, applied)
  end
  if dense and DECIDES_SEQ[code] and tonumber(e.seq) >= dense.base then
    detail = dense_decided(e, dense)
  end
  return code, detail
end

-- An id seen in the window: a re-read of this very record is `replayed`
-- (a retried batch's own records keep the earlier attempt's code, so its
-- counts stay what that attempt decided); another record with the id is a
-- duplicate or a conflict, and moves the mark.
local function decide_seen_record(seen, e, token)
  local code, detail = decide_seen(seen, e, token)
  if e.mark_field == '' then return code, detail end
  if code == CONFLICT then
    -- Dead-lettered: decided again on every re-read within the window.
    hold_mark(e)
    return code, detail
  end
  if covers(offset_mark(e), e.offset) then
    if code == DUPLICATE then return REPLAYED, 0 end
    return code, detail
  end
  mark_decided(e)
  return code, detail
end
