//! Redis access for the stage and the loader: a connection (one server, or
//! a Redis Cluster with `--redis-cluster`) with connect and response
//! timeouts that is dropped and re-made after any connection error, the Lua scripts (loaded once per connection, reloaded on
//! `NOSCRIPT`), pipelines that return one reply per command, and which
//! errors are worth retrying.
//!
//! Delivery guarantee: none by itself; every script is idempotent, so a
//! caller may resend a whole pipeline after any error.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, Pipeline, RedisError, Script, Value};
use vidpulse_core::redis::{ConnectOptions, RedisClient, RedisConn, Replication};

use crate::model::Ttls;
use crate::plan::{Lifecycle, Op};

/// `room.lua`: a room lifecycle event.
pub static ROOM_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/room.lua")));
/// `profile.lua`: profile fields from a live event.
pub static PROFILE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/profile.lua")));
/// `load.lua`: a chunk of T+1 rows.
pub static LOAD_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/load.lua")));

fn scripts() -> [&'static Script; 3] {
    [&ROOM_SCRIPT, &PROFILE_SCRIPT, &LOAD_SCRIPT]
}

/// A Redis failure, with whether retrying may help.
#[derive(Debug, thiserror::Error)]
#[error("redis: {message}")]
pub struct StoreError {
    pub message: String,
    pub retriable: bool,
}

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        StoreError {
            retriable: retriable_error(&e),
            message: e.to_string(),
        }
    }
}

/// Connection-level and transient server conditions; everything else
/// (a wrong key type, a script error) would fail again.
fn retriable_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::BusyLoadingError
                | ErrorKind::NoScriptError
                | ErrorKind::TryAgain
                | ErrorKind::ClusterDown
                | ErrorKind::MasterDown
                | ErrorKind::ReadOnly
        )
        || matches!(
            e.code(),
            Some("OOM" | "BUSY" | "LOADING" | "MASTERDOWN" | "READONLY" | "NOREPLICAS")
        )
}

/// Whether a per-command error reply (by its code) is transient (resend
/// the pipeline) or about this command's data (it will fail again).
pub fn retriable_code(code: &str) -> bool {
    matches!(
        code,
        "OOM"
            | "BUSY"
            | "LOADING"
            | "MASTERDOWN"
            | "READONLY"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
            | "NOSCRIPT"
    )
}

/// One Redis server or cluster, reconnected on demand.
pub struct Store {
    client: RedisClient,
    config: ConnectOptions,
    /// Replicas that must hold a pipeline's writes before `run` returns.
    replication: Replication,
    conn: Option<RedisConn>,
    connects: u64,
}

impl Store {
    /// Parses `url` (seed nodes, comma-separated, with `cluster`); connects
    /// on first use. With `replication`, [`Store::run`] returns once that
    /// many replicas hold the writes.
    pub fn open(
        url: &str,
        cluster: bool,
        timeout: Duration,
        replication: Replication,
    ) -> Result<Store, StoreError> {
        // The URL may hold a password: the message redacts it.
        let client = RedisClient::from_url(url, cluster).map_err(|e| StoreError {
            message: e.to_string(),
            retriable: false,
        })?;
        let config = ConnectOptions::timeouts(timeout);
        Ok(Store {
            client,
            config,
            replication,
            conn: None,
            connects: 0,
        })
    }

    /// The current connection, or a new one with the scripts loaded.
    pub async fn connection(&mut self) -> Result<RedisConn, StoreError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let mut c = self.client.connect(self.config.clone()).await?;
        if self.connects == 0 {
            self.replication
                .check(&mut c)
                .await
                .map_err(|e| StoreError {
                    message: e.to_string(),
                    retriable: false,
                })?;
        }
        load_scripts(&mut c).await?;
        self.connects += 1;
        if self.connects == 1 {
            tracing::debug!("Connected to Redis; scripts loaded.");
        } else {
            tracing::info!("Reconnected to Redis; scripts loaded.");
        }
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Whether this is a Redis Cluster (a script's keys must share a slot).
    pub fn is_cluster(&self) -> bool {
        self.client.is_cluster()
    }

    /// Drops the connection; the next call reconnects.
    pub fn forget(&mut self) {
        self.conn = None;
    }

    /// Runs `pipe` and returns one reply per command (error replies
    /// included, as `Value::ServerError`). Scripts missing on the server
    /// (flushed, or a restarted server) are reloaded and the pipeline sent
    /// again. After a connection error the connection is dropped, so the
    /// next call reconnects.
    pub async fn run(&mut self, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        let mut conn = self.connection().await?;
        let written = match exec(&mut conn, pipe).await {
            Ok(v) => self
                .replication
                .wait(&mut conn)
                .await
                .map(|()| v)
                .map_err(StoreError::from),
            Err(e) => Err(e),
        };
        match written {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.retriable {
                    self.conn = None;
                }
                Err(e)
            }
        }
    }
}

/// `SCRIPT LOAD`s every script (on a cluster, on every node).
pub async fn load_scripts(conn: &mut RedisConn) -> Result<(), StoreError> {
    for s in scripts() {
        s.load_async(conn).await?;
    }
    Ok(())
}

/// Sends `pipe` on `conn`; on `NOSCRIPT` reloads the scripts and resends
/// once (every script is idempotent).
pub async fn exec(conn: &mut RedisConn, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
    if pipe.is_empty() {
        return Ok(Vec::new());
    }
    let mut replies = conn.req_packed_commands(pipe, 0, pipe.len()).await?;
    if replies.iter().any(is_noscript) {
        tracing::info!("Scripts missing on the server (restarted or flushed); reloading.");
        load_scripts(conn).await?;
        replies = conn.req_packed_commands(pipe, 0, pipe.len()).await?;
    }
    Ok(replies)
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

/// Appends the script call for `op` to `pipe`.
pub fn push_op(pipe: &mut Pipeline, op: &Op, ttls: &Ttls) {
    match op {
        Op::Room {
            key,
            lifecycle,
            time_ms,
            event_id,
            profile,
        } => {
            let kind = match lifecycle {
                Lifecycle::Started => "s",
                Lifecycle::Ended => "e",
            };
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(ROOM_SCRIPT.get_hash())
                .arg(1)
                .arg(key)
                .arg(kind)
                .arg(time_ms)
                .arg(event_id)
                .arg(ttls.live_ms)
                .arg(ttls.ended_ms);
            for (f, v) in profile {
                cmd.arg(*f).arg(v);
            }
        }
        Op::Profile {
            key,
            time_ms,
            event_id,
            fields,
        } => {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(PROFILE_SCRIPT.get_hash())
                .arg(1)
                .arg(key)
                .arg(time_ms)
                .arg(event_id)
                .arg(ttls.profile_ms);
            for (f, v) in fields {
                cmd.arg(*f).arg(v);
            }
        }
    }
}
