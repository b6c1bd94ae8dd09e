-- vidpulse dim-builder: apply the profile fields a live event carries (e.g.
-- a viewer's province and grade) to a profile hash, field by field, newest
-- event time wins, atomically (see docs/dims.md and model.rs).
--
-- KEYS[1]  profile hash
-- ARGV[1]  event time, ms   ARGV[2]  event id
-- ARGV[3]  TTL, ms, for a key this creates (0: none); a shorter TTL is
--          extended to it, a key without TTL (a loaded profile) keeps none
-- ARGV[4…] field/value pairs (non-empty values only)
-- Returns the number of fields written (0: stale or a replay).
local key = KEYS[1]
local ts = ARGV[1]
local t = tonumber(ts)
local ttl = tonumber(ARGV[3])
local nf = (#ARGV - 3) / 2

local q = { '_v' }
for i = 1, nf do q[1 + i] = '_v.' .. ARGV[2 + 2 * i] end
local cur = redis.call('HMGET', key, unpack(q))

local set = {}
local n = 0
for i = 1, nf do
  local fv = tonumber(cur[1 + i])
  if fv == nil or t > fv then
    set[#set + 1] = ARGV[2 + 2 * i]; set[#set + 1] = ARGV[3 + 2 * i]
    set[#set + 1] = q[1 + i]; set[#set + 1] = ts
    n = n + 1
  end
end
if n == 0 then return 0 end
local v = tonumber(cur[1])
if v == nil or t > v then
  set[#set + 1] = '_v'; set[#set + 1] = ts
  set[#set + 1] = '_event_id'; set[#set + 1] = ARGV[2]
end
local pttl = redis.call('PTTL', key)
redis.call('HSET', key, unpack(set))
if ttl > 0 and (pttl == -2 or (pttl >= 0 and pttl < ttl)) then
  redis.call('PEXPIRE', key, ttl)
end
return n
