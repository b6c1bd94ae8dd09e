-- vidpulse dims load: write a chunk of T+1 profile rows (one key each),
-- never overwriting a field that live events changed more recently, nor a
-- newer load (see docs/dims.md; model.rs `apply_load` is the same rule in
-- Rust, and the tests check that both agree).
--
-- KEYS[k]  the hash of row k
-- ARGV[1]  the load's version: its as-of time T, ms (kept in `_ld`)
-- ARGV[2]  T - 0.5 as text: the version a shared field gets, so that a live
--          event at exactly T wins the tie and a later row of the same T
--          replaces an earlier one
-- ARGV[3]  TTL, ms (0: leave TTLs alone); set on keys without one or with
--          a shorter one
-- ARGV[4]  'r' for room hashes (their lifecycle owns the TTL), else 'p'
-- ARGV[5]  number S of shared fields, then S names: fields live events also
--          write, versioned per field in `_v.<field>`
-- then     number F of field names, then F names
-- then     per row, F values ('' = the row has no value for that field)
-- Returns { rows written, fields kept because newer data was there,
--           { indexes (1-based) of rows whose key is not a hash } }.
local ts = ARGV[1]
local as_of = tonumber(ts)
local fvs = ARGV[2]
local fver = tonumber(fvs)
local ttl = tonumber(ARGV[3])
local room = ARGV[4] == 'r'
local nshared = tonumber(ARGV[5])
local shared = {}
for i = 1, nshared do shared[ARGV[5 + i]] = true end
local p = 6 + nshared
local nf = tonumber(ARGV[p])
p = p + 1

-- What to read per row: the load version, then each shared field's version
-- (the same for every row of the call).
local names = {}
local q = { '_ld' }
local vat = {}
for i = 1, nf do
  local f = ARGV[p + i - 1]
  names[i] = f
  if shared[f] then q[#q + 1] = '_v.' .. f; vat[i] = #q end
end
p = p + nf
local lc = #q + 1
if room and ttl > 0 then q[lc] = 'started_at'; q[lc + 1] = 'ended_at' end

local rows, kept = 0, 0
local failed = {}
for k = 1, #KEYS do
  local key = KEYS[k]
  local cur = redis.pcall('HMGET', key, unpack(q))
  local set, s = {}, 0
  local ld = nil
  if cur.err then
    -- Not a hash (WRONGTYPE): report the row, go on with the others.
    failed[#failed + 1] = k
  else
    ld = tonumber(cur[1])
    local older = ld ~= nil and as_of < ld
    for i = 1, nf do
      local val = ARGV[p + i - 1]
      if val ~= '' then
        local j = vat[i]
        if older then
          kept = kept + 1
        elseif j then
          local fv = tonumber(cur[j])
          if fv == nil or fver >= fv then
            set[s + 1] = names[i]; set[s + 2] = val
            set[s + 3] = q[j]; set[s + 4] = fvs
            s = s + 4
          else
            kept = kept + 1
          end
        else
          set[s + 1] = names[i]; set[s + 2] = val
          s = s + 2
        end
      end
    end
  end
  if s > 0 then
    if ld == nil or as_of > ld then set[s + 1] = '_ld'; set[s + 2] = ts end
    local pttl = 0
    if ttl > 0 then pttl = redis.call('PTTL', key) end
    redis.call('HSET', key, unpack(set))
    rows = rows + 1
    if ttl > 0 and pttl < ttl and not (room and (cur[lc] or cur[lc + 1])) then
      redis.call('PEXPIRE', key, ttl)
    end
  end
  p = p + nf
end
return { rows, kept, failed }
