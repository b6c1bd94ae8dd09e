//! Live leaderboards in Redis sorted sets, replay-safe and self-repairing.
//!
//! Each window (a UTC day by default) of a leaderboard is one sorted set,
//! `<prefix><key>:{<YYYY-MM-DD>}` (the seed's `rankings`, per day). Next to
//! it a hash `…:parts` holds, per source partition and member, the partial
//! score that partition contributed and its version (the offset after the
//! last record that changed it), and under `_gen` the generation that wrote
//! them (`<registered ms>:<generation>`). A Lua script applies a batch
//! atomically: for each partial newer than the stored one it adds
//! `new − old` to the member's score (`ZINCRBY`) and stores the partial; an
//! older or equal version is a no-op. So a replayed write changes nothing,
//! and the score is always the sum of the partitions' latest partials.
//!
//! Whatever part is lost, a replay restores it: a set gone while its parts
//! remain is rebuilt from them before the batch applies; parts gone (or of
//! another generation: a new spec, `--reset-state`) empty the set, and the
//! replay's partials fill both again. A writer of an older generation
//! (an instance not yet rolled out) changes nothing. Stamps of one
//! generation that differ only in their registration time (instances that
//! registered it at the same moment) are the same generation: their
//! partials add up.

use std::collections::BTreeMap;

pub use vidpulse_query::boards::{board_key, parse_window_stamp, parts_key, window_stamp};

use crate::engine::BoardRow;
use vidpulse_query::spec::Leaderboard;

/// KEYS: set₁, parts₁, set₂, parts₂, … ARGV: for each set in turn, the
/// writer's generation stamp, its ttl in seconds, the number n of partials,
/// then n (field, member, version, value) quadruples. Returns how many
/// partials were newer and applied.
const APPLY: &str = r"
local function stamp_ms(s)
  return tonumber(string.sub(s, 1, string.find(s, ':', 1, true) - 1))
end
local function stamp_gen(s)
  return string.sub(s, string.find(s, ':', 1, true) + 1)
end
local applied = 0
local a = 1
for k = 1, #KEYS, 2 do
  local set, parts = KEYS[k], KEYS[k + 1]
  local stamp, ttl, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local have = redis.call('HGET', parts, '_gen')
  local skip = false
  -- Instances that registered the same generation at once hold stamps
  -- that differ only in the time: one generation, the same partials.
  if have ~= stamp and not (have and stamp_gen(have) == stamp_gen(stamp)) then
    if have and stamp_ms(have) > stamp_ms(stamp) then
      skip = true
    else
      redis.call('DEL', set, parts)
      redis.call('HSET', parts, '_gen', stamp)
    end
  elseif redis.call('EXISTS', set) == 0 and redis.call('HLEN', parts) > 1 then
    local all = redis.call('HGETALL', parts)
    local sums = {}
    for i = 1, #all, 2 do
      local f = all[i]
      if f ~= '_gen' then
        local member = string.sub(f, string.find(f, '|', 1, true) + 1)
        local v = all[i + 1]
        local val = tonumber(string.sub(v, string.find(v, ':', 1, true) + 1))
        sums[member] = (sums[member] or 0) + val
      end
    end
    for member, score in pairs(sums) do
      if score ~= 0 then
        redis.call('ZADD', set, score, member)
      end
    end
  end
  if skip then
    a = a + 4 * n
  else
    for i = 1, n do
      local field, member = ARGV[a], ARGV[a + 1]
      local version, value = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
      local old = redis.call('HGET', parts, field)
      local oldv, oldval = -1, 0
      if old then
        local sep = string.find(old, ':', 1, true)
        oldv = tonumber(string.sub(old, 1, sep - 1))
        oldval = tonumber(string.sub(old, sep + 1))
      end
      if version > oldv then
        if value ~= oldval then
          redis.call('ZINCRBY', set, value - oldval, member)
        end
        redis.call('HSET', parts, field, ARGV[a + 2] .. ':' .. ARGV[a + 3])
        applied = applied + 1
      end
      a = a + 4
    end
    if ttl > 0 then
      redis.call('EXPIRE', set, ttl)
      redis.call('EXPIRE', parts, ttl)
    end
  end
end
return applied
";

/// A leaderboard generation's stamp in its `:parts` hashes: the
/// registration time first, so the newer of two generations is known.
pub fn stamp(registered_ms: u64, generation: u64) -> String {
    format!("{registered_ms:013}:{generation:016x}")
}

/// The apply script (load once, reuse).
pub fn script() -> redis::Script {
    redis::Script::new(APPLY)
}

/// One script call: a window's sorted set and the partials for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub set_key: String,
    /// The writer's generation ([`stamp`]).
    pub stamp: String,
    pub ttl_secs: i64,
    /// (field, member, version, value)
    pub partials: Vec<(String, String, u64, i64)>,
}

/// Groups a partition's emitted partials by sorted set.
/// `stamps`: each board's generation stamp, in spec order.
pub fn batches(
    prefix: &str,
    boards: &[Leaderboard],
    stamps: &[String],
    part: &str,
    rows: &[BoardRow],
) -> Vec<Batch> {
    let mut by_key: BTreeMap<String, Batch> = BTreeMap::new();
    for r in rows {
        let b = &boards[r.board];
        let set_key = board_key(prefix, b, Some(r.window_start));
        let batch = by_key.entry(set_key.clone()).or_insert_with(|| Batch {
            set_key,
            stamp: stamps[r.board].clone(),
            ttl_secs: b.ttl_ms / 1000,
            partials: Vec::new(),
        });
        batch.partials.push((
            format!("{part}|{}", r.member),
            r.member.to_string(),
            r.version,
            r.value,
        ));
    }
    by_key.into_values().collect()
}

/// Groups batches by hash slot (the `{window}` tag of their keys), so one
/// script call applies a group atomically, in Redis Cluster too.
pub fn by_slot(batches: Vec<Batch>) -> Vec<Vec<Batch>> {
    let mut groups: BTreeMap<String, Vec<Batch>> = BTreeMap::new();
    for b in batches {
        let tag = b
            .set_key
            .rsplit_once('{')
            .map_or(b.set_key.as_str(), |(_, t)| t)
            .to_owned();
        groups.entry(tag).or_default().push(b);
    }
    groups.into_values().collect()
}

/// The one script call that applies batches whose keys share a hash slot,
/// to invoke on any connection.
pub fn invocation<'a>(script: &'a redis::Script, batches: &[Batch]) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    for b in batches {
        inv.key(&b.set_key).key(parts_key(&b.set_key));
        inv.arg(&b.stamp).arg(b.ttl_secs).arg(b.partials.len());
        for (field, member, version, value) in &b.partials {
            inv.arg(field).arg(member).arg(*version).arg(*value);
        }
    }
    inv
}

/// Applies batches whose keys share a hash slot, in one atomic script call.
pub async fn apply(
    con: &mut vidpulse_core::redis::RedisConn,
    script: &redis::Script,
    batches: &[Batch],
) -> Result<i64, redis::RedisError> {
    invocation(script, batches).invoke_async(con).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidpulse_query::spec::Spec;

    /// Keys one script call touches share a hash slot (Redis Cluster runs
    /// a script only on keys of one slot).
    #[test]
    fn keys_used_together_share_a_hash_slot() {
        use vidpulse_core::redis::{same_slot, slot};
        let spec = Spec::default_spec();
        let boards: Vec<Leaderboard> = spec.leaderboards.clone();
        let stamps: Vec<String> = boards.iter().map(|_| stamp(1, 1)).collect();
        let day = 86_400_000;
        let mut rows = Vec::new();
        for (board, _) in boards.iter().enumerate() {
            for d in 0..5 {
                rows.push(BoardRow {
                    board,
                    window_start: 1_629_072_000_000 + d * day,
                    member: format!("m{d}").into(),
                    version: 1,
                    value: 1,
                });
            }
        }
        let groups = by_slot(batches("t1.", &boards, &stamps, "p0", &rows));
        assert!(groups.len() >= 5, "one call per window");
        for g in &groups {
            let keys: Vec<String> = g
                .iter()
                .flat_map(|b| [b.set_key.clone(), parts_key(&b.set_key)])
                .collect();
            assert!(same_slot(&keys), "{keys:?}");
        }
        // The checkpoint scripts' two keys.
        let k = crate::checkpoint::key("t1.vidpulse-aggregator", "t1.vp.events.v1", 3);
        assert_eq!(slot(k.as_bytes()), slot(format!("{k}:epoch").as_bytes()));
        // Partitions of one group spread over the slots.
        let slots: std::collections::BTreeSet<u16> = (0..12)
            .map(|p| slot(crate::checkpoint::key("g", "t", p).as_bytes()))
            .collect();
        assert!(slots.len() > 6, "{slots:?}");
    }

    #[test]
    fn keys_carry_the_window_and_parse_back() {
        let spec = Spec::default_spec();
        let b = spec.leaderboard("actions_daily").unwrap();
        let w = 1_629_072_000_000; // 2021-08-16T00:00:00Z
        let k = board_key("t1.", b, Some(w));
        assert_eq!(k, "t1.rankings:{2021-08-16}");
        assert_eq!(parts_key(&k), "t1.rankings:{2021-08-16}:parts");
        assert_eq!(parse_window_stamp("t1.", b, &k), Some(w));
        assert_eq!(parse_window_stamp("t1.", b, &parts_key(&k)), None);
        let other = spec.leaderboard("video_likes_daily").unwrap();
        let k2 = board_key("t1.", other, Some(w));
        assert_eq!(
            parse_window_stamp("t1.", b, &k2),
            None,
            "another board's key"
        );
    }
}
