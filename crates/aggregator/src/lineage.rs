//! The lineage: one life of a consumer group's state over one life of its
//! input topics, the part of every generation ([`vidpulse_query::generation`])
//! that `--reset-state` renews.
//!
//! It lives in the state store (`vp:lineage:{<group>}`) next to the
//! checkpoints, and in ClickHouse's generation registry. When the store lost
//! it (FLUSHALL, a restart without persistence), the registry gives it back,
//! so a replay after the loss rewrites the same generation's rows with the
//! same values instead of starting a new one. Instances starting together
//! agree on one lineage (`SET NX`, then read back).

use std::hash::{BuildHasher, Hasher};

use redis::AsyncCommands;
use vidpulse_core::redis::RedisConn;
use vidpulse_query::generation;
use vidpulse_query::schema::Tables;

/// Key of the group's lineage in the state store.
pub fn key(group: &str) -> String {
    format!("vp:lineage:{{{group}}}")
}

/// Where the lineage came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The state store had it.
    Store,
    /// The store had lost it; the generation registry had it.
    Registry,
    /// None existed: the group's first start (or another instance's, just now).
    New,
    /// `--reset-state` started one.
    Reset,
}

impl Origin {
    /// Whether results of this lineage may exist already (a replay must
    /// then be complete to keep them exact).
    pub fn has_results(self) -> bool {
        matches!(self, Origin::Store | Origin::Registry)
    }
}

/// Why the lineage could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum LineageError {
    #[error("redis")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    ClickHouse(#[from] vidpulse_query::ChError),
}

fn fresh() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// The group's lineage: the store's, else the registry's (written back to
/// the store), else a new one; `reset`: always a new one.
pub async fn resolve(
    con: &mut RedisConn,
    ch: &clickhouse::Client,
    tables: &Tables,
    group: &str,
    reset: bool,
) -> Result<(u64, Origin), LineageError> {
    let k = key(group);
    if reset {
        let l = fresh();
        let () = con.set(&k, format!("{l:016x}")).await?;
        return Ok((l, Origin::Reset));
    }
    if let Some(l) = read(con, &k).await? {
        return Ok((l, Origin::Store));
    }
    let (candidate, origin) = match generation::lineage_of(ch, tables, group).await? {
        Some(l) => (l, Origin::Registry),
        None => (fresh(), Origin::New),
    };
    let _: bool = con.set_nx(&k, format!("{candidate:016x}")).await?;
    // Another instance may have set it first: everyone takes the stored one.
    match read(con, &k).await? {
        Some(l) if l == candidate => Ok((l, origin)),
        Some(l) => Ok((l, Origin::Store)),
        None => Ok((candidate, origin)),
    }
}

/// Writes the lineage back after the store lost it (kept if present).
pub async fn remember(con: &mut RedisConn, group: &str, lineage: u64) -> redis::RedisResult<()> {
    let _: bool = con.set_nx(key(group), format!("{lineage:016x}")).await?;
    Ok(())
}

/// The generation of everything this process writes, in spec order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generations {
    pub metrics: Vec<u64>,
    pub logs: Vec<u64>,
    /// Leaderboards' stamps ([`crate::leaderboard::stamp`]).
    pub boards: Vec<String>,
}

/// Registers the spec's generations in lineage `lineage` (each definition
/// that changed gets a new one; the others keep theirs) and returns them,
/// with the names whose generation is new.
pub async fn register(
    ch: &clickhouse::Client,
    tables: &Tables,
    spec: &vidpulse_query::Spec,
    defaults: generation::Defaults<'_>,
    group: &str,
    lineage: u64,
) -> Result<(Generations, Vec<String>), vidpulse_query::ChError> {
    let entries = generation::entries(spec, defaults);
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(0);
    let registered = generation::register(ch, tables, group, lineage, &entries, now).await?;
    let mut g = Generations::default();
    let mut new = Vec::new();
    for (e, (r, is_new)) in entries.iter().zip(&registered) {
        if *is_new {
            new.push(format!("{} {}", e.kind.as_str(), e.name));
        }
        match e.kind {
            generation::Kind::Metric => g.metrics.push(r.generation),
            generation::Kind::Log => g.logs.push(r.generation),
            generation::Kind::Leaderboard => g
                .boards
                .push(crate::leaderboard::stamp(r.registered_ms, r.generation)),
        }
    }
    Ok((g, new))
}

async fn read(con: &mut RedisConn, k: &str) -> redis::RedisResult<Option<u64>> {
    let v: Option<String> = con.get(k).await?;
    Ok(v.and_then(|s| u64::from_str_radix(s.trim(), 16).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_origins() {
        assert_eq!(
            key("t1.vidpulse-aggregator"),
            "vp:lineage:{t1.vidpulse-aggregator}"
        );
        assert!(Origin::Store.has_results() && Origin::Registry.has_results());
        assert!(!Origin::New.has_results() && !Origin::Reset.has_results());
        assert_ne!(fresh(), fresh());
    }
}
