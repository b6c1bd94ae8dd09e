//! Live leaderboards in Redis sorted sets, replay-safe.
//!
//! Each window (a UTC day by default) of a leaderboard is one sorted set,
//! `<prefix><key>:{<YYYY-MM-DD>}` (the seed's `rankings`, per day). Next to
//! it a hash `…:parts` holds, per source partition and member, the partial
//! score that partition contributed and its version (the offset after the
//! last record that changed it). A Lua script applies a batch atomically:
//! for each partial newer than the stored one it adds `new − old` to the
//! member's score (`ZINCRBY`) and stores the partial; an older or equal
//! version is a no-op. So a replayed write changes nothing, and the score
//! is always the sum of the partitions' latest partials: no plain ZINCRBY
//! on replay.

use std::collections::BTreeMap;

pub use vidpulse_query::boards::{board_key, parse_window_stamp, parts_key, window_stamp};

use crate::engine::BoardRow;
use vidpulse_query::spec::Leaderboard;

/// KEYS: set₁, parts₁, set₂, parts₂, … ARGV: for each set in turn, its ttl
/// in seconds, the number n of partials, then n (field, member, version,
/// value) quadruples. Returns how many partials were newer and applied.
const APPLY: &str = r"
local applied = 0
local a = 1
for k = 1, #KEYS, 2 do
  local set, parts = KEYS[k], KEYS[k + 1]
  local ttl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
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
return applied
";

/// The apply script (load once, reuse).
pub fn script() -> redis::Script {
    redis::Script::new(APPLY)
}

/// One script call: a window's sorted set and the partials for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub set_key: String,
    pub ttl_secs: i64,
    /// (field, member, version, value)
    pub partials: Vec<(String, String, u64, i64)>,
}

/// Groups a partition's emitted partials by sorted set.
pub fn batches(prefix: &str, boards: &[Leaderboard], part: &str, rows: &[BoardRow]) -> Vec<Batch> {
    let mut by_key: BTreeMap<String, Batch> = BTreeMap::new();
    for r in rows {
        let b = &boards[r.board];
        let set_key = board_key(prefix, b, Some(r.window_start));
        let batch = by_key.entry(set_key.clone()).or_insert_with(|| Batch {
            set_key,
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

/// Applies batches whose keys share a hash slot, in one atomic script call.
pub async fn apply(
    con: &mut redis::aio::ConnectionManager,
    script: &redis::Script,
    batches: &[Batch],
) -> Result<i64, redis::RedisError> {
    let mut inv = script.prepare_invoke();
    for b in batches {
        inv.key(&b.set_key).key(parts_key(&b.set_key));
        inv.arg(b.ttl_secs).arg(b.partials.len());
        for (field, member, version, value) in &b.partials {
            inv.arg(field).arg(member).arg(*version).arg(*value);
        }
    }
    inv.invoke_async(con).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidpulse_query::spec::Spec;

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
