-- vidpulse dim-builder: apply one live-room lifecycle event to a room hash,
-- atomically and replay-safe (see docs/dims.md; crate model.rs is the same
-- logic in Rust, and the tests check that both agree).
--
-- KEYS[1]  room hash
-- ARGV[1]  's' (stream started) or 'e' (stream ended)
-- ARGV[2]  event time, ms (decimal text; written as given)
-- ARGV[3]  event id
-- ARGV[4]  live TTL, ms   ARGV[5]  ended TTL, ms
-- ARGV[6…] profile field/value pairs (non-empty values only)
-- Returns 1 when anything changed, 0 when the event was stale or a replay.
local key = KEYS[1]
local is_start = ARGV[1] == 's'
local ts = ARGV[2]
local t = tonumber(ts)
local eid = ARGV[3]
local live_ttl = tonumber(ARGV[4])
local ended_ttl = tonumber(ARGV[5])
local nf = (#ARGV - 5) / 2

local q = { 'started_at', 'ended_at', '_v', '_v.module_id' }
if not is_start then
  -- An end only fills profile fields nobody has set; it needs to see them.
  for i = 1, nf do q[4 + i] = ARGV[4 + 2 * i] end
end
local cur = redis.call('HMGET', key, unpack(q))
local sa, ea = tonumber(cur[1]), tonumber(cur[2])
local v, mv = tonumber(cur[3]), tonumber(cur[4])

local set = {}
local function put(f, val) set[#set + 1] = f; set[#set + 1] = val end
local lifecycle = false

if is_start then
  -- Only the newest start carries the profile: an older one is a replay or
  -- arrived out of order.
  if sa == nil or t > sa then
    sa = t
    lifecycle = true
    put('started_at', ts)
    for i = 1, nf do
      local f, val = ARGV[4 + 2 * i], ARGV[5 + 2 * i]
      if f == 'module_id' then
        -- module_id is also loaded T+1: the newer of the two wins.
        if mv == nil or t > mv then put(f, val); put('_v.module_id', ts) end
      else
        put(f, val)
      end
    end
  end
else
  if ea == nil or t > ea then
    ea = t
    lifecycle = true
    put('ended_at', ts)
  end
  -- An end that arrives before its start still leaves a usable profile;
  -- unversioned, so any start or load replaces it.
  for i = 1, nf do
    if not cur[4 + i] then put(ARGV[4 + 2 * i], ARGV[5 + 2 * i]) end
  end
end

if #set == 0 then return 0 end
local live = sa ~= nil and (ea == nil or sa > ea)
if lifecycle then put('status', live and 'live' or 'ended') end
if v == nil or t > v then put('_v', ts); put('_event_id', eid) end

local pttl = redis.call('PTTL', key)
redis.call('HSET', key, unpack(set))
if lifecycle then
  if live then
    -- Started (or re-announced): live TTL, never shortening a longer one.
    -- An older end on a live room leaves the TTL alone.
    if is_start and pttl < live_ttl then redis.call('PEXPIRE', key, live_ttl) end
  elseif not is_start then
    -- The newest lifecycle change is an end: cut the TTL.
    redis.call('PEXPIRE', key, ended_ttl)
  elseif pttl < 0 then
    -- A start older than the recorded end never revives the room; the key
    -- keeps its ended TTL (set here only if it somehow has none).
    redis.call('PEXPIRE', key, ended_ttl)
  end
end
return 1
