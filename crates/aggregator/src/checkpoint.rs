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
//! sink). A store that lost its data (FLUSHALL, a restart without
//! persistence, eviction) is told apart from a newer owner: the epoch key
//! the owner created is gone, or the hash it wrote before is; the write is
//! refused as [`Written::Lost`] and the owner replays the partition from its
//! earliest offset, never mistaking the loss for fencing.
//!
//! Each write also carries the number of writes the owner made to the hash
//! (`#seq`, one more with every write). A store that failed over to a
//! replica which had not received the last writes (Redis replicates
//! asynchronously) holds an older prefix of them: the count does not match,
//! the write is refused as [`Written::Behind`], and the owner takes the
//! partition over again from what the store holds, replaying from that
//! checkpoint's offset into the same rows. Without the count the next delta
//! would land on the older hash and a later restore would miss the lost
//! ones without a word. An epoch older than the owner's own is the same
//! case (the increment that took the partition over was lost): not a newer
//! owner, so not fenced.

use std::collections::HashMap;

use redis::AsyncCommands;
use vidpulse_core::redis::RedisConn;

use crate::engine::CheckpointDelta;

/// Hash key of a partition's checkpoint (`group` and `topic` are full names,
/// prefix included).
pub fn key(group: &str, topic: &str, partition: i32) -> String {
    format!("vp:ckpt:{{{group}|{topic}|{partition}}}")
}

fn epoch_key(key: &str) -> String {
    format!("{key}:epoch")
}

/// The field counting the writes made to a checkpoint hash (no `:`, so the
/// engine's restore skips it).
const SEQ: &str = "#seq";

/// What a new owner finds.
#[derive(Debug)]
pub struct Loaded {
    /// This owner's epoch.
    pub epoch: i64,
    /// Writes made to the hash so far (its `#seq`; 0 when none counted).
    pub seq: u64,
    pub fields: HashMap<String, Vec<u8>>,
}

/// Takes ownership (new epoch) and reads the checkpoint.
pub async fn load(con: &mut RedisConn, key: &str) -> redis::RedisResult<Loaded> {
    let epoch: i64 = con.incr(epoch_key(key), 1).await?;
    let mut fields: HashMap<String, Vec<u8>> = con.hgetall(key).await?;
    let seq = fields
        .remove(SEQ)
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
        .unwrap_or(0);
    Ok(Loaded { epoch, seq, fields })
}

/// Deletes a checkpoint that cannot be used (other spec, `--reset-state`),
/// so the deltas written from now on start from an empty hash. Refused when
/// another owner took over meanwhile.
pub async fn clear(con: &mut RedisConn, key: &str, epoch: i64) -> redis::RedisResult<bool> {
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

/// KEYS: hash, epoch. ARGV: epoch, whether the hash must exist already
/// (`1`: a checkpoint was restored or written under this epoch), the write
/// count the hash must be at, number of fields to delete, those fields,
/// then field/value pairs to set. Returns 1 (written), 0 (fenced: a newer
/// owner's epoch), -1 (the store lost it) or -2 (the store is behind: it
/// holds an older prefix of this owner's writes, or an epoch older than the
/// one this owner took).
const WRITE: &str = r"
local e = redis.call('GET', KEYS[2])
if not e then return -1 end
if tonumber(e) > tonumber(ARGV[1]) then return 0 end
if tonumber(e) < tonumber(ARGV[1]) then return -2 end
if ARGV[2] == '1' and redis.call('HEXISTS', KEYS[1], 'meta') == 0 then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[1], '#seq') or '0')
if seq ~= tonumber(ARGV[3]) then return -2 end
local n = tonumber(ARGV[4])
for i = 5, 4 + n do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
for i = 5 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], '#seq', seq + 1)
return 1
";

/// What became of a checkpoint write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Written,
    /// Another owner holds the partition now.
    Fenced,
    /// The store lost the partition's state (epoch or hash gone).
    Lost,
    /// The store holds fewer of this owner's writes than it made (a
    /// failover to a replica that lacked the last ones).
    Behind,
}

/// The write script (load once, reuse).
pub fn write_script() -> redis::Script {
    redis::Script::new(WRITE)
}

/// Writes a delta atomically. `existing`: the hash must be there already
/// (this owner restored or wrote it); `seq`: the writes it holds (the
/// loaded count plus this owner's acknowledged writes).
pub async fn write(
    con: &mut RedisConn,
    script: &redis::Script,
    key: &str,
    epoch: i64,
    existing: bool,
    seq: u64,
    delta: &CheckpointDelta,
) -> redis::RedisResult<Written> {
    let mut inv = script.key(key);
    inv.key(epoch_key(key))
        .arg(epoch)
        .arg(if existing { 1 } else { 0 })
        .arg(seq)
        .arg(delta.del.len());
    for f in &delta.del {
        inv.arg(f);
    }
    for (f, v) in &delta.set {
        inv.arg(f).arg(v.as_slice());
    }
    let done: i64 = inv.invoke_async(con).await?;
    Ok(match done {
        1 => Written::Written,
        0 => Written::Fenced,
        -2 => Written::Behind,
        _ => Written::Lost,
    })
}

/// How the store keeps data: `Ok(None)` when it keeps it (persistence on,
/// nothing evicted that has no TTL), else why not. CONFIG may be refused
/// (managed Redis): then nothing is known (`Ok(None)`, logged by the caller).
/// On a Redis Cluster every master is asked (each holds its slots'
/// checkpoints) and the reasons name the node.
pub async fn durability(con: &mut RedisConn) -> Result<Option<String>, redis::RedisError> {
    let aof = con.config_get("appendonly").await?;
    let save = con.config_get("save").await?;
    let policy = con.config_get("maxmemory-policy").await?;
    let mut why = Vec::new();
    for (i, (node, aof)) in aof.iter().enumerate() {
        let save = save.get(i).map_or("", |(_, v)| v.as_str());
        let policy = policy.get(i).map_or("", |(_, v)| v.as_str());
        let on = if node.is_empty() {
            String::new()
        } else {
            format!("master {node}: ")
        };
        if aof != "yes" && save.trim().is_empty() {
            why.push(format!(
                "{on}no persistence (appendonly no, save \"\"): a restart loses every checkpoint"
            ));
        }
        if policy.starts_with("allkeys-") {
            why.push(format!(
                "{on}maxmemory-policy {policy} evicts checkpoints under memory pressure; use noeviction"
            ));
        }
    }
    Ok((!why.is_empty()).then(|| why.join("; ")))
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
