//! The checkpoint store: one Redis hash per (consumer group, input topic,
//! partition) holding that partition's aggregator state as fields (`meta`
//! with the next offset and the watermark, one field per open pane, per
//! leaderboard window, per remembered-id bucket, and the room table), like a
//! Kafka Streams changelog but written as a delta after every flush.
//!
//! Guarantee: a checkpoint is written only after every row and partial its
//! state emitted was acknowledged, in one atomic script, and only by the
//! current owner of the partition: each assignment increments the
//! partition's epoch, and a write carrying an older epoch is refused
//! (fencing a zombie that was thrown out of the group while it waited on a
//! sink).

use std::collections::HashMap;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use crate::engine::CheckpointDelta;

/// Hash key of a partition's checkpoint (`group` and `topic` are full names,
/// prefix included).
pub fn key(group: &str, topic: &str, partition: i32) -> String {
    format!("vp:ckpt:{{{group}|{topic}|{partition}}}")
}

fn epoch_key(key: &str) -> String {
    format!("{key}:epoch")
}

/// What a new owner finds.
#[derive(Debug)]
pub struct Loaded {
    /// This owner's epoch.
    pub epoch: i64,
    pub fields: HashMap<String, Vec<u8>>,
}

/// Takes ownership (new epoch) and reads the checkpoint.
pub async fn load(con: &mut ConnectionManager, key: &str) -> redis::RedisResult<Loaded> {
    let epoch: i64 = con.incr(epoch_key(key), 1).await?;
    let fields: HashMap<String, Vec<u8>> = con.hgetall(key).await?;
    Ok(Loaded { epoch, fields })
}

/// Deletes a checkpoint that cannot be used (other spec, `--reset-state`),
/// so the deltas written from now on start from an empty hash. Refused when
/// another owner took over meanwhile.
pub async fn clear(con: &mut ConnectionManager, key: &str, epoch: i64) -> redis::RedisResult<bool> {
    let done: i64 = redis::Script::new(CLEAR)
        .key(key)
        .key(epoch_key(key))
        .arg(epoch)
        .invoke_async(con)
        .await?;
    Ok(done == 1)
}

const CLEAR: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// KEYS: hash, epoch. ARGV: epoch, number of fields to delete, those fields,
/// then field/value pairs to set.
const WRITE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
for i = 3, 2 + n do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
for i = 3 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
";

/// The write script (load once, reuse).
pub fn write_script() -> redis::Script {
    redis::Script::new(WRITE)
}

/// Writes a delta atomically. `Ok(false)`: fenced, another owner has the
/// partition; drop its state.
pub async fn write(
    con: &mut ConnectionManager,
    script: &redis::Script,
    key: &str,
    epoch: i64,
    delta: &CheckpointDelta,
) -> redis::RedisResult<bool> {
    let mut inv = script.key(key);
    inv.key(epoch_key(key)).arg(epoch).arg(delta.del.len());
    for f in &delta.del {
        inv.arg(f);
    }
    for (f, v) in &delta.set {
        inv.arg(f).arg(v.as_slice());
    }
    let done: i64 = inv.invoke_async(con).await?;
    Ok(done == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_slot() {
        let k = key("t1.vidpulse-aggregator", "t1.vp.events.v1", 3);
        assert_eq!(k, "vp:ckpt:{t1.vidpulse-aggregator|t1.vp.events.v1|3}");
        assert_eq!(epoch_key(&k), format!("{k}:epoch"));
    }
}
