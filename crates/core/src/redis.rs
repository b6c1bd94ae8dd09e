//! The one way every binary reaches Redis: a single server, or a Redis
//! Cluster with `--redis-cluster` ([`crate::config::RedisArgs`]).
//!
//! [`RedisConn`] is a single-node connection (a `ConnectionManager` or a
//! plain multiplexed connection) or the redis crate's async cluster
//! connection, and implements [`ConnectionLike`], so `query_async`,
//! `invoke_async` and `AsyncCommands` work on either. On a cluster the
//! crate routes each command (and each script, by its first key) to the
//! master of the key's hash slot and follows `MOVED`/`ASK` and failovers.
//! What the crate does not do is made explicit here:
//!
//! - A non-atomic pipeline may hold keys of many slots. The crate refuses
//!   those (`CROSSSLOT`), and on a cluster it turns one error reply into an
//!   error of the whole pipeline. Here such a pipeline is split by hash slot:
//!   the commands of one slot are sent one after the other, in pipeline
//!   order (so two commands on one key keep their order), the slots
//!   concurrently, and an error reply stays the reply of its command
//!   (`Value::ServerError`), as on a single server.
//! - An atomic pipeline (`MULTI`) or a script must touch keys of one slot:
//!   callers hash-tag the keys they use together (`{…}`); [`slot`] says
//!   where a key lives, so tests check the co-location.
//! - Keyspace-wide commands are run per master: [`RedisConn::scan_match`]
//!   scans every master, [`RedisConn::config_get`] asks every master.
//!
//! Delivery guarantee: none by itself; this is transport. Callers keep
//! theirs (idempotent scripts, retries).

use std::time::Duration;

use ::redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, Value,
};
use futures::FutureExt;

use crate::config::{ConfigError, RedisArgs, redact_url};

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag —
/// the part between the first `{` and the next `}`, when not empty — modulo
/// 16384, as Redis Cluster computes it (`CLUSTER KEYSLOT`).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|b| *b == b'}')
            .filter(|close| *close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for b in data {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Whether all `keys` live in one hash slot (a script or `MULTI` over them
/// works on a cluster).
pub fn same_slot<K: AsRef<[u8]>>(keys: &[K]) -> bool {
    let mut slots = keys.iter().map(|k| slot(k.as_ref()));
    match slots.next() {
        None => true,
        Some(first) => slots.all(|s| s == first),
    }
}

/// Timeouts and retries of a connection.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    pub connection_timeout: Option<Duration>,
    pub response_timeout: Option<Duration>,
    /// Single server with a `ConnectionManager`: reconnect attempts. Cluster:
    /// retries of a request (redirects, failover) within the response
    /// timeout; the crate's default (16) when `None`.
    pub retries: Option<usize>,
    /// `ConnectionManager` only: backoff factor and longest delay, ms.
    pub backoff_factor_ms: Option<u64>,
    pub backoff_max_delay_ms: Option<u64>,
}

impl ConnectOptions {
    /// Both timeouts `t`, one reconnect attempt.
    pub fn timeouts(t: Duration) -> Self {
        ConnectOptions {
            connection_timeout: Some(t),
            response_timeout: Some(t),
            retries: Some(1),
            ..Default::default()
        }
    }
}

/// Where Redis is: a server, or a cluster's seed nodes. Cheap to clone;
/// connects on [`RedisClient::connect`].
#[derive(Clone)]
pub struct RedisClient {
    mode: Mode,
}

#[derive(Clone)]
enum Mode {
    Single(::redis::Client),
    Cluster(Vec<ConnectionInfo>),
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.mode {
            Mode::Single(_) => f.write_str("RedisClient(single)"),
            Mode::Cluster(n) => write!(f, "RedisClient(cluster, {} seeds)", n.len()),
        }
    }
}

impl RedisClient {
    /// From the shared flags: `--redis-url` (comma-separated seeds with
    /// `--redis-cluster`). The error names the flag; URLs in it are redacted.
    pub fn open(args: &RedisArgs) -> Result<RedisClient, ConfigError> {
        RedisClient::from_url(&args.redis_url, args.redis_cluster)
    }

    /// As [`RedisClient::open`].
    pub fn from_url(url: &str, cluster: bool) -> Result<RedisClient, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            field: "--redis-url".into(),
            message,
        };
        let urls = parse_urls(url, cluster).map_err(invalid)?;
        let infos = urls
            .iter()
            .map(|u| {
                u.as_str()
                    .into_connection_info()
                    .map_err(|e| invalid(format!("{} ({e})", redact_url(u))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cluster {
            if let Some(db) = infos.iter().map(|i| i.redis.db).find(|db| *db != 0) {
                return Err(invalid(format!(
                    "a Redis Cluster has database 0 only; remove /{db} from the URL (--redis-cluster)"
                )));
            }
            Ok(RedisClient {
                mode: Mode::Cluster(infos),
            })
        } else {
            let info = infos
                .into_iter()
                .next()
                .ok_or_else(|| invalid("empty".into()))?;
            let client = ::redis::Client::open(info).map_err(|e| invalid(e.to_string()))?;
            Ok(RedisClient {
                mode: Mode::Single(client),
            })
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.mode, Mode::Cluster(_))
    }

    fn cluster_builder(seeds: &[ConnectionInfo], o: &ConnectOptions) -> ClusterClientBuilder {
        let mut b = ClusterClientBuilder::new(seeds.to_vec());
        if let Some(t) = o.connection_timeout {
            b = b.connection_timeout(t);
        }
        if let Some(t) = o.response_timeout {
            b = b.response_timeout(t);
        }
        b
    }

    async fn cluster(seeds: &[ConnectionInfo], o: &ConnectOptions) -> RedisResult<RedisConn> {
        let client = RedisClient::cluster_builder(seeds, o).build()?;
        Ok(RedisConn::Cluster(client.get_async_connection().await?))
    }

    /// A connection the caller re-makes after a connection error (single
    /// server: one multiplexed connection; cluster: the cluster connection,
    /// which reconnects to nodes by itself).
    pub async fn connect(&self, o: ConnectOptions) -> RedisResult<RedisConn> {
        match &self.mode {
            Mode::Single(c) => {
                let cfg = timeouts(
                    AsyncConnectionConfig::new(),
                    &o,
                    AsyncConnectionConfig::set_connection_timeout,
                    AsyncConnectionConfig::set_response_timeout,
                );
                let mut con = RedisConn::Multiplexed(
                    c.get_multiplexed_async_connection_with_config(&cfg).await?,
                );
                refuse_cluster_node(&mut con).await?;
                Ok(con)
            }
            Mode::Cluster(seeds) => RedisClient::cluster(seeds, &o).await,
        }
    }

    /// A connection that reconnects by itself (single server: a
    /// `ConnectionManager`; cluster: the cluster connection).
    pub async fn connect_managed(&self, o: ConnectOptions) -> RedisResult<RedisConn> {
        match &self.mode {
            Mode::Single(c) => {
                let mut cfg = timeouts(
                    ConnectionManagerConfig::new(),
                    &o,
                    ConnectionManagerConfig::set_connection_timeout,
                    ConnectionManagerConfig::set_response_timeout,
                );
                if let Some(n) = o.retries {
                    cfg = cfg.set_number_of_retries(n);
                }
                if let Some(f) = o.backoff_factor_ms {
                    cfg = cfg.set_factor(f);
                }
                if let Some(d) = o.backoff_max_delay_ms {
                    cfg = cfg.set_max_delay(d);
                }
                let mut con =
                    RedisConn::Manager(ConnectionManager::new_with_config(c.clone(), cfg).await?);
                refuse_cluster_node(&mut con).await?;
                Ok(con)
            }
            Mode::Cluster(seeds) => RedisClient::cluster(seeds, &o).await,
        }
    }
}

/// `cfg` with the connection and response timeouts of `o` (either config
/// type of the crate).
fn timeouts<C>(
    mut cfg: C,
    o: &ConnectOptions,
    connection: fn(C, Duration) -> C,
    response: fn(C, Duration) -> C,
) -> C {
    if let Some(t) = o.connection_timeout {
        cfg = connection(cfg, t);
    }
    if let Some(t) = o.response_timeout {
        cfg = response(cfg, t);
    }
    cfg
}

/// Without `--redis-cluster`, a cluster node answers every key of another
/// node's slots with a bare `MOVED`: say at connect what is wrong. A server
/// that refuses `INFO` (renamed on managed Redis) is taken as it is.
async fn refuse_cluster_node(con: &mut RedisConn) -> RedisResult<()> {
    let info: String = match ::redis::cmd("INFO").arg("cluster").query_async(con).await {
        Ok(i) => i,
        Err(e) if e.kind() == ErrorKind::ResponseError || e.code().is_some() => return Ok(()),
        Err(e) => return Err(e),
    };
    if info_field(&info, "cluster_enabled") == Some("1") {
        return Err(RedisError::from((
            ErrorKind::ClientError,
            "wrong Redis mode",
            NOT_CLUSTER_MODE.to_owned(),
        )));
    }
    Ok(())
}

/// The hint when a Redis Cluster node is used as a single server.
pub const NOT_CLUSTER_MODE: &str = "this Redis server is a Redis Cluster node: add --redis-cluster (VIDPULSE_REDIS_CLUSTER=true) and give its nodes as seeds in --redis-url";

/// Whether `e` says the Redis flags are wrong (not worth retrying).
pub fn is_mode_error(e: &RedisError) -> bool {
    e.kind() == ErrorKind::ClientError && e.detail() == Some(NOT_CLUSTER_MODE)
}

/// `name:value` of an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
    })
}

/// `--redis-url` as a list: one URL, or with `cluster` one or more
/// comma-separated seed nodes.
fn parse_urls(url: &str, cluster: bool) -> Result<Vec<String>, String> {
    let urls: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    match urls.len() {
        0 => Err("no Redis URL given".into()),
        1 => Ok(urls),
        _ if cluster => Ok(urls),
        n => Err(format!(
            "{n} comma-separated URLs, but several seed nodes are for a Redis Cluster: add --redis-cluster (VIDPULSE_REDIS_CLUSTER=true), or give one URL"
        )),
    }
}

/// A Redis connection: one server or a cluster (see the module doc).
#[derive(Clone)]
pub enum RedisConn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A master of a cluster: its address and one slot it serves (to route a
/// command to it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Master {
    pub addr: String,
    pub slot: u16,
    /// Replicas serving its slots (from `CLUSTER SLOTS`).
    pub replicas: usize,
}

impl Master {
    /// The one server of a single-node setup.
    fn single() -> Master {
        Master {
            addr: String::new(),
            slot: 0,
            replicas: 0,
        }
    }
}

/// Writes a stage must still find after a failover: how many replicas must
/// hold them (Redis `WAIT`) before the stage counts them done.
///
/// Redis replicates asynchronously, so a master can acknowledge a write and
/// fail before any replica has it; the promoted replica then lacks it. With
/// `replicas > 0` a stage waits after its writes (leaderboard partials, room
/// hashes, loaded rows) and before it commits what they cover; fewer
/// acknowledgements within `timeout` fail the write as retriable
/// (`NOREPLICAS`), and it is sent again. `WAIT` narrows the window, it does
/// not make Redis strongly consistent: a failover may still pick a replica
/// that had not acknowledged (docs/deploy.md, "Redis Cluster").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replication {
    pub replicas: u32,
    pub timeout: Duration,
}

impl Replication {
    /// Waits until `replicas` replicas acknowledged every write sent on
    /// `con` so far (on a cluster: every master's replicas, the fewest
    /// counting). A no-op with `replicas == 0`.
    pub async fn wait(&self, con: &mut RedisConn) -> RedisResult<()> {
        if self.replicas == 0 {
            return Ok(());
        }
        let ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let acked: i64 = ::redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(ms.max(1))
            .query_async(con)
            .await?;
        if acked < i64::from(self.replicas) {
            return Err(::redis::make_extension_error(
                "NOREPLICAS".into(),
                Some(format!(
                    "{acked} of {} replicas acknowledged the writes within {} (--redis-wait-replicas, --redis-wait-timeout)",
                    self.replicas,
                    humantime::format_duration(self.timeout)
                )),
            ));
        }
        Ok(())
    }

    /// At start: every master has the replicas asked for, else the message
    /// naming the flag (each write would time out and be retried forever).
    pub async fn check(&self, con: &mut RedisConn) -> Result<(), ConfigError> {
        if self.replicas == 0 {
            return Ok(());
        }
        let invalid = |message: String| ConfigError::Invalid {
            field: "--redis-wait-replicas".into(),
            message,
        };
        let counts = con
            .replicas()
            .await
            .map_err(|e| invalid(format!("cannot count the replicas ({e})")))?;
        for (node, n) in counts {
            if n < self.replicas as usize {
                let on = if node.is_empty() {
                    "the server".to_owned()
                } else {
                    format!("master {node}")
                };
                return Err(invalid(format!(
                    "{} replicas asked for, but {on} has {n}: lower the flag or add replicas",
                    self.replicas
                )));
            }
        }
        Ok(())
    }
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// The cluster's masters (from `CLUSTER SLOTS`); empty on a single server.
    pub async fn masters(&mut self) -> RedisResult<Vec<Master>> {
        let RedisConn::Cluster(c) = self else {
            return Ok(Vec::new());
        };
        let v = c
            .route_command(
                &::redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await?;
        parse_cluster_slots(&v)
    }

    /// Replicas of the server (`INFO replication`) or of each master
    /// (`CLUSTER SLOTS`): (node, count), node empty on a single server.
    pub async fn replicas(&mut self) -> RedisResult<Vec<(String, usize)>> {
        if self.is_cluster() {
            return Ok(self
                .masters()
                .await?
                .into_iter()
                .map(|m| (m.addr, m.replicas))
                .collect());
        }
        let info: String = ::redis::cmd("INFO")
            .arg("replication")
            .query_async(self)
            .await?;
        let n = info_field(&info, "connected_slaves")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(vec![(String::new(), n)])
    }

    /// Sends `cmd` to one master of the cluster (by a slot it serves).
    pub async fn on_master(&mut self, m: &Master, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            RedisConn::Cluster(c) => {
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                        m.slot,
                        SlotAddr::Master,
                    ))),
                )
                .await
            }
            other => other
                .req_packed_command(cmd)
                .await
                .and_then(Value::extract_error),
        }
    }

    /// Every key matching `pattern` (SCAN MATCH), on a cluster from every
    /// master (a replica holds copies, not more keys).
    pub async fn scan_match(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let masters = if self.is_cluster() {
            self.masters().await?
        } else {
            vec![Master::single()]
        };
        let mut keys = Vec::new();
        for m in &masters {
            let mut cursor: u64 = 0;
            loop {
                let cmd = ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .to_owned();
                let v = self.on_master(m, &cmd).await?;
                let (next, batch): (u64, Vec<String>) = ::redis::from_owned_redis_value(v)?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }

    /// `CONFIG GET name` of the server, or of every master of a cluster:
    /// (node, value) pairs (node empty on a single server).
    pub async fn config_get(&mut self, name: &str) -> RedisResult<Vec<(String, String)>> {
        let cmd = ::redis::cmd("CONFIG").arg("GET").arg(name).to_owned();
        let masters = if self.is_cluster() {
            self.masters().await?
        } else {
            vec![Master::single()]
        };
        let mut out = Vec::with_capacity(masters.len());
        for m in &masters {
            let v: Vec<String> = ::redis::from_owned_redis_value(self.on_master(m, &cmd).await?)?;
            out.push((m.addr.clone(), v.get(1).cloned().unwrap_or_default()));
        }
        Ok(out)
    }

    /// `DEL`s every key matching `pattern` (tests, demo cleanup); how many.
    pub async fn delete_matching(&mut self, pattern: &str) -> RedisResult<usize> {
        let keys = self.scan_match(pattern).await?;
        let mut pipe = ::redis::pipe();
        for k in &keys {
            pipe.cmd("DEL").arg(k).ignore();
        }
        if !keys.is_empty() {
            let () = pipe.query_async(self).await?;
        }
        Ok(keys.len())
    }
}

/// Masters from a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id],
/// replicas…], …]`, one entry per master (its first range).
fn parse_cluster_slots(v: &Value) -> RedisResult<Vec<Master>> {
    let bad = || RedisError::from((ErrorKind::TypeError, "unexpected CLUSTER SLOTS reply"));
    let Value::Array(ranges) = v else {
        return Err(bad());
    };
    let mut out: Vec<Master> = Vec::new();
    for r in ranges {
        let Value::Array(items) = r else {
            return Err(bad());
        };
        let (Some(Value::Int(start)), Some(Value::Array(node))) = (items.first(), items.get(2))
        else {
            return Err(bad());
        };
        let host = match node.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return Err(bad()),
        };
        let Some(Value::Int(port)) = node.get(1) else {
            return Err(bad());
        };
        let addr = format!("{host}:{port}");
        let slot = u16::try_from(*start).map_err(|_| bad())?;
        if !out.iter().any(|m| m.addr == addr) {
            let replicas = items.len().saturating_sub(3);
            out.push(Master {
                addr,
                slot,
                replicas,
            });
        }
    }
    Ok(out)
}

/// The slot a command's key lives in, for grouping a pipeline (`None`: no
/// key, or a command routed to many nodes). The crate routes each command
/// itself; this only decides what must stay in order.
fn cmd_slot(cmd: &Cmd) -> Option<u16> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            ::redis::Arg::Simple(b) => Some(b),
            ::redis::Arg::Cursor => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let key = match name.as_slice() {
        b"PING" | b"ECHO" | b"INFO" | b"TIME" | b"WAIT" | b"DBSIZE" | b"KEYS" | b"SCAN"
        | b"RANDOMKEY" | b"FLUSHDB" | b"FLUSHALL" | b"CONFIG" | b"CLIENT" | b"CLUSTER"
        | b"SCRIPT" | b"FUNCTION" | b"MULTI" | b"EXEC" | b"DISCARD" | b"SELECT" => return None,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            if args.get(2).is_some_and(|n| *n == b"0") {
                return None;
            }
            args.get(3)?
        }
        b"XREAD" | b"XREADGROUP" => {
            let at = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            args.get(at + 1)?
        }
        _ => args.get(1)?,
    };
    Some(slot(key))
}

/// An error reply of a command, as the value a single server's pipeline
/// gives for it; `None` for a failure of the transport (the whole pipeline
/// fails, as on a single server).
fn as_reply(e: &RedisError) -> Option<Value> {
    let reply = matches!(
        e.kind(),
        ErrorKind::ResponseError
            | ErrorKind::ExecAbortError
            | ErrorKind::BusyLoadingError
            | ErrorKind::NoScriptError
            | ErrorKind::Moved
            | ErrorKind::Ask
            | ErrorKind::TryAgain
            | ErrorKind::ClusterDown
            | ErrorKind::CrossSlot
            | ErrorKind::MasterDown
            | ErrorKind::ReadOnly
            | ErrorKind::NotBusy
            | ErrorKind::ExtensionError
    );
    if !reply {
        return None;
    }
    // The crate builds error values only by parsing a reply: give it one.
    let detail = e.detail().unwrap_or("").replace(['\r', '\n'], " ");
    ::redis::parse_redis_value(format!("-{} {detail}\r\n", e.code()?).as_bytes()).ok()
}

/// Groups `cmds` (index, command) by slot, keeping pipeline order in each
/// group; commands without a slot are groups of their own.
fn group_by_slot<'a>(cmds: impl Iterator<Item = (usize, &'a Cmd)>) -> Vec<Vec<(usize, &'a Cmd)>> {
    let mut groups: Vec<Vec<(usize, &'a Cmd)>> = Vec::new();
    let mut by_slot: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    for (i, c) in cmds {
        match cmd_slot(c) {
            Some(s) => match by_slot.get(&s) {
                Some(g) => groups[*g].push((i, c)),
                None => {
                    by_slot.insert(s, groups.len());
                    groups.push(vec![(i, c)]);
                }
            },
            None => groups.push(vec![(i, c)]),
        }
    }
    groups
}

async fn cluster_pipeline(
    con: &ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let cmds = pipeline.cmd_iter().skip(offset).take(count);
    let groups = group_by_slot(cmds.enumerate());
    let n = groups.iter().map(Vec::len).sum();
    let runs = groups.into_iter().map(|group| {
        let mut con = con.clone();
        async move {
            let mut out = Vec::with_capacity(group.len());
            for (i, c) in group {
                let v = match con.req_packed_command(c).await {
                    Ok(v) => v,
                    Err(e) => as_reply(&e).ok_or(e)?,
                };
                out.push((i, v));
            }
            Ok::<_, RedisError>(out)
        }
    });
    let mut replies: Vec<Value> = vec![Value::Nil; n];
    for group in futures::future::join_all(runs).await {
        for (i, v) in group? {
            replies[i] = v;
        }
    }
    Ok(replies)
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Manager(c) => c.req_packed_command(cmd),
            RedisConn::Multiplexed(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            // MULTI/EXEC: one slot (the crate routes it, or says CROSSSLOT).
            RedisConn::Cluster(c) => {
                if pipeline.is_transaction() {
                    c.req_packed_commands(pipeline, offset, count)
                } else {
                    cluster_pipeline(c, pipeline, offset, count).boxed()
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Manager(c) => c.get_db(),
            RedisConn::Multiplexed(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // CLUSTER KEYSLOT values from a Redis 7 server.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), 3443);
        assert_eq!(slot(b"foo{}{bar}"), 8363);
        assert_eq!(slot(b"vp:ckpt:{g|t|0}"), 3296);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        // Only the first `{…}` counts.
        assert_eq!(slot(b"foo{{bar}}zap"), 4015);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn pipelines_group_by_the_slot_of_each_commands_key() {
        let mut p = ::redis::pipe();
        p.cmd("HSET").arg("room:1").arg("a").arg(1);
        p.cmd("EVALSHA").arg("abc").arg(1).arg("room:2").arg("x");
        p.cmd("EXPIRE").arg("room:1").arg(10);
        p.cmd("PING");
        p.cmd("EVAL").arg("return 1").arg(0);
        p.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg("room:2")
            .arg(">");
        let groups = group_by_slot(p.cmd_iter().enumerate());
        let idx: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| g.iter().map(|(i, _)| *i).collect())
            .collect();
        assert_eq!(idx, vec![vec![0, 2], vec![1, 5], vec![3], vec![4]]);
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(
            parse_urls("redis://a:1, redis://b:2", true).unwrap(),
            vec!["redis://a:1", "redis://b:2"]
        );
        let e = parse_urls("redis://a:1,redis://b:2", false).unwrap_err();
        assert!(e.contains("--redis-cluster"), "{e}");
        assert!(parse_urls(" , ", true).is_err());
        assert!(RedisClient::from_url("redis://a:1/2", true).is_err());
        assert!(RedisClient::from_url("redis://a:1/2", false).is_ok());
        let c = RedisClient::from_url("redis://:pw@a:1,redis://:pw@b:2", true).unwrap();
        assert!(c.is_cluster());
        assert!(!format!("{c:?}").contains("pw"));
        let e = RedisClient::from_url("nope://:secret@x", true)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn error_replies_stay_replies() {
        let err = |reply: &[u8]| {
            ::redis::parse_redis_value(reply)
                .unwrap()
                .extract_error()
                .unwrap_err()
        };
        let e = err(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        match as_reply(&e) {
            Some(v @ Value::ServerError(_)) => {
                let back = v.extract_error().unwrap_err();
                assert_eq!(back.code(), Some("WRONGTYPE"));
                assert_eq!(back.detail(), e.detail());
            }
            other => panic!("{other:?}"),
        }
        let e = err(b"-NOSCRIPT No matching script\r\n");
        let back = as_reply(&e).unwrap().extract_error().unwrap_err();
        assert_eq!(back.kind(), ErrorKind::NoScriptError);
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(as_reply(&io).is_none());
    }

    #[test]
    fn info_fields() {
        let info = "# Cluster\r\ncluster_enabled:1\r\n";
        assert_eq!(info_field(info, "cluster_enabled"), Some("1"));
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=…\r\n";
        assert_eq!(info_field(info, "connected_slaves"), Some("2"));
        assert_eq!(info_field(info, "connected"), None);
        assert_eq!(info_field(info, "missing"), None);
    }

    #[test]
    fn the_cluster_mode_hint_is_not_retried() {
        let e = RedisError::from((
            ErrorKind::ClientError,
            "wrong Redis mode",
            NOT_CLUSTER_MODE.to_owned(),
        ));
        assert!(is_mode_error(&e));
        assert!(e.to_string().contains("--redis-cluster"));
        let other = RedisError::from((ErrorKind::ClientError, "other", "x".to_owned()));
        assert!(!is_mode_error(&other));
    }

    #[test]
    fn cluster_slots_reply() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![
                Value::BulkString(h.as_bytes().to_vec()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7101),
                node("127.0.0.1", 7104),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 7102),
            ]),
            Value::Array(vec![
                Value::Int(12000),
                Value::Int(12001),
                node("127.0.0.1", 7101),
            ]),
        ]);
        assert_eq!(
            parse_cluster_slots(&v).unwrap(),
            vec![
                Master {
                    addr: "127.0.0.1:7101".into(),
                    slot: 0,
                    replicas: 1,
                },
                Master {
                    addr: "127.0.0.1:7102".into(),
                    slot: 5461,
                    replicas: 0,
                },
            ]
        );
    }
}
