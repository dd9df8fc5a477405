-- idem guard: dedupe check, sequence check and effects in one atomic step.
--
-- The script is these files joined (src/guard/script.rs), after a prelude
-- idem generates from its Rust names: the verdict codes, the rejection
-- reasons, the key suffixes, the mutation kinds and the limits are each
-- written once, in Rust. The prelude's `#!lua` line (Redis >= 7) declares
-- the script's flags: none, so it may write and Redis refuses the whole
-- call up front when it is out of memory, instead of failing at the first
-- write halfway through.
--
-- One call carries one or more events. Every key of an event shares its
-- entity's hash tag; in Redis Cluster all events of one call must also share
-- a slot (standalone Redis has no such limit).
--
-- KEYS     first the epoch marker (standalone: the one; cluster: the one of
--          the call's slot), then the outbox (likewise one per slot;
--          written only for events of a changelog topic), then per event four keys and its effects' keys,
--          all with the entity's hash tag (so one slot), and all declared, so
--          that Redis Cluster runs the call only where every key is (during
--          a slot migration it answers TRYAGAIN instead):
--            <base>:meta        hash: seq, last_id, fingerprint, applied, updated_ms, deleted
--            <base>:state       hash, the materialized view (user fields only)
--            <base>:ids:<g>     hash: remembered ids of window generation g (current)
--            <base>:ids:<g-1>   the previous generation
--            then the effects' keys (docs/effects.md): <base>:counters,
--            <base>:ledger:<name>, <base>:set:<name> and <base>:set:<name>:seq
--          where <base> is "<prefix>:{<entity>}".
-- ARGV     first the batch token (4 bytes: the same for every attempt of one
--          batch, new for the next batch), then the epoch idem knows, then
--          per event a fixed head, the state fields and the mutations:
--            expire_at_ms (end of generation g+1), id, id_hash (8 bytes),
--            fingerprint (8 bytes), fingerprint_hex, seq (decimal u64),
--            mark_field (the entity's offset mark for the record's partition,
--            "o:<topic id>:<partition>"; "" for none), offset (the record's),
--            mark ("<run start>:<offset>", what this decision marks),
--            dense ("1" when the event's topic numbers its seqs densely:
--            dedupe.dense_seq_topics; "" otherwise),
--            state ("merge" | "replace" | "delete" | "keep", each also as
--            "field:<op>" under state.order = "per_field", whose event's
--            first effect key is <base>:field_seqs),
--            nset, field1, value1, ..., nunset, field1, ...,
--            nkeys (the event's keys after the four), type,
--            nmutations, then each mutation, its kind first (all key
--            numbers count from the event's fifth key, 1-based; each kind
--            has its own code, read by its own function below):
--              "counter" key field units scale        counter += units / 10^scale
--              "counter_set" key field present value  counter = value ("0": removed);
--                                                     ordered (a chained idem, docs/change-stream.md)
--              "ledger" key max_len max_age_ms n f1 v1 ...  ledger entry
--              "set_add" key seqkey member            set add
--              "set_remove" key seqkey member         set remove
--              "custom" snippet key order n f1 v1 ... custom effect (order
--                                                     "ordered" | "commutative"),
--                                                     the event's data fields
--            and last the changelog: the event's topic when its changes go to
--            the outbox (changelog.topics), "" otherwise; after a topic, the
--            event's ts ("" without one)
-- Returns  per event two values: code, detail
--            0 applied    detail: how many dense seqs the event's decision
--                         closed (0 but at the dense cap; so for 2, 6, 10)
--            1 duplicate  detail: ms since the id was first seen
--            2 stale      detail as for 0
--            3 conflict   detail: the remembered fingerprint (8 bytes)
--            4 duplicate  first seen by an earlier attempt of this batch, which
--                         applied it (its reply was lost); detail as for 1
--            5 duplicate  likewise, but that attempt found it stale
--            6 late       seq not newer: the ordered effects were skipped,
--                         the commutative ones applied; detail as for 0
--            7 rejected   an effect cannot be applied (a counter would
--                         overflow, a custom effect failed): nothing was
--                         written, not even the id; detail "<reason> <message>"
--            8 duplicate  like 4, but that attempt found it late
--            9 replayed   the record itself was decided before (its entity's
--                         offset mark covers it: a replay, a rewind, a
--                         redelivery after a crash); nothing written
--           10 partial    per-field order: some of its fields were written,
--                         others had newer writers; detail as for 0
--           11 duplicate  like 4, but that attempt found it partial
--           12 duplicate  dense seqs: its seq was decided before (a copy at
--                         a new offset, whatever the window); nothing
--                         written; detail 0
--           13 conflict   dense seqs: another event (other fingerprint) was
--                         decided at its seq; nothing written; detail: that
--                         event's fingerprint (hex)
--          then, when the call wrote a change (a changelog topic's event),
--          one more value: the outbox's length (XLEN KEYS[2]) after it
--          or, before any write, the error `IDEMEPOCH <marker>` when the
--          marker is not the epoch idem knows: Redis lost (some of) its state
--          since, and idem must find out how far it goes before it writes.
--
-- An id mark is fingerprint (8 bytes) .. first-seen ms (6) .. batch token (4)
-- .. "a", "s", "l" or "p" (applied, stale, late, partial). Marks written by earlier
-- versions have only the first 14 bytes; every version reads just the bytes
-- it knows.
--
-- The window: time is cut into generations of one window (idem computes g
-- from its clock, so the keys can be declared); an id is stored in the
-- current generation's hash, which expires at the end of the next one, and
-- looked up in the current and the previous one. So an id is remembered for
-- at least one window and at most two, and nothing ever scans for old ids.
-- (Clocks of instances that differ by s seconds can miss a duplicate within
-- s of a generation boundary; the sequence check still makes it stale.)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Number-to-string conversions are costly in Lua 5.1 (printf): make each once.
local now_str = string.format('%d', now)
local now_packed = struct.pack('>I6', now)

-- seqs are u64 in decimal without leading zeros: Lua numbers (doubles)
-- would lose precision above 2^53, so compare as strings.
local function is_newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- Lua's unpack is limited to a few thousand values: write fields in chunks
-- (an even number, so field/value pairs stay together).
local UNPACK_CHUNK = 1000
