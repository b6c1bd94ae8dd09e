//! The ClickHouse client every vidpulse binary shares: where the server is
//! (flags with `VIDPULSE_CLICKHOUSE_*` twins; the password is never logged),
//! whether it is one node or a cluster (`--clickhouse-cluster`), errors that
//! know whether they are retriable, quoting, `SELECT` into JSON rows and
//! `INSERT` of pre-encoded RowBinary. Every request has a timeout.

use std::time::Duration;

use bytes::Bytes;
use clap::Args;

/// Where ClickHouse is.
#[derive(Args, Clone)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP URL.
    #[arg(
        long = "clickhouse-url",
        env = "VIDPULSE_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub clickhouse_url: String,

    /// Database of the metric tables (created if missing).
    #[arg(
        long = "clickhouse-database",
        env = "VIDPULSE_CLICKHOUSE_DATABASE",
        default_value = "vidpulse"
    )]
    pub clickhouse_database: String,

    /// ClickHouse user.
    #[arg(long = "clickhouse-user", env = "VIDPULSE_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,

    /// ClickHouse password (prefer the environment variable).
    #[arg(
        long = "clickhouse-password",
        env = "VIDPULSE_CLICKHOUSE_PASSWORD",
        hide_env_values = true
    )]
    pub clickhouse_password: Option<String>,

    /// ClickHouse cluster (a name in the servers' `remote_servers`): tables
    /// are created `ON CLUSTER` as `ReplicatedReplacingMergeTree` (`<table>_local`,
    /// needing the `shard` and `replica` macros and ZooKeeper or ClickHouse
    /// Keeper) behind a `Distributed` table under the metric's own name,
    /// which inserts and queries go through. Unset: one server, plain
    /// `ReplacingMergeTree` tables. See docs/deploy.md.
    #[arg(long = "clickhouse-cluster", env = "VIDPULSE_CLICKHOUSE_CLUSTER")]
    pub clickhouse_cluster: Option<String>,
}

impl std::fmt::Debug for ClickHouseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseArgs")
            .field("url", &self.clickhouse_url)
            .field("database", &self.clickhouse_database)
            .field("user", &self.clickhouse_user)
            .field("cluster", &self.clickhouse_cluster)
            .field(
                "password",
                &self.clickhouse_password.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

impl ClickHouseArgs {
    /// The client. In cluster mode an `INSERT` into a `Distributed` table
    /// returns only once every shard has the rows (`insert_distributed_sync`,
    /// not the server's default background queue, which an acknowledged
    /// batch could die in), and a `SELECT` fails rather than leave out a
    /// shard that does not answer (`skip_unavailable_shards=0`, whatever the
    /// server's profile says).
    pub fn client(&self) -> clickhouse::Client {
        let mut c = clickhouse::Client::default()
            .with_url(&self.clickhouse_url)
            .with_validation(false);
        if let Some(u) = &self.clickhouse_user {
            c = c.with_user(u);
        }
        if let Some(p) = &self.clickhouse_password {
            c = c.with_password(p);
        }
        if self.cluster().is_some() {
            c = c
                .with_setting("insert_distributed_sync", "1")
                .with_setting("skip_unavailable_shards", "0");
        }
        c
    }

    /// The table names of a deployment with topic prefix `topic_prefix`,
    /// in this database and (when set) cluster.
    pub fn tables(&self, topic_prefix: &str) -> crate::schema::Tables {
        crate::schema::Tables::new(&self.clickhouse_database, topic_prefix)
            .with_cluster(self.cluster())
    }

    /// `--clickhouse-cluster`, unless unset or empty.
    pub fn cluster(&self) -> Option<&str> {
        self.clickhouse_cluster
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
    }
}

/// A ClickHouse failure; `retriable` when the server may answer later
/// (connection refused, timeout, 5xx), not for SQL the server rejects.
#[derive(Debug, thiserror::Error)]
#[error("clickhouse: {message}")]
pub struct ChError {
    pub message: String,
    pub retriable: bool,
}

impl From<clickhouse::error::Error> for ChError {
    fn from(e: clickhouse::error::Error) -> Self {
        // With its causes: "network error: client error (Connect)" alone
        // does not say that a TLS certificate failed to verify.
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = c.source();
        }
        // Server-side exceptions come back as "bad response: Code: N, ...":
        // retried when the code says the server (or a shard or replica
        // behind it, or ZooKeeper) may manage later, not for SQL it rejects.
        let rejected = server_code(&message).is_some_and(|c| !TRANSIENT_CODES.contains(&c));
        ChError {
            message,
            retriable: !rejected,
        }
    }
}

/// Server error codes that may clear by themselves: end of stream and
/// network errors (a shard or replica restarting: 3, 32, 209, 210, 279,
/// 1000), timeouts and load (159, 202, 203, 241, 252), ZooKeeper or Keeper
/// away (225, 242, 999), replicas too few or an insert's fate unknown (285,
/// 286, 319), a cancelled query (394).
const TRANSIENT_CODES: [u32; 19] = [
    3, 32, 159, 202, 203, 209, 210, 225, 241, 242, 252, 279, 285, 286, 319, 394, 999, 1000, 425,
];

/// The first `Code: N` of a server exception.
fn server_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// How long one ClickHouse request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
) -> Result<T, ChError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(ChError::from),
        Err(_) => Err(ChError {
            message: format!("no answer within {REQUEST_TIMEOUT:?}"),
            retriable: true,
        }),
    }
}

/// Quotes an identifier.
pub fn ident(s: &str) -> String {
    format!("`{}`", s.replace('\\', "\\\\").replace('`', "\\`"))
}

/// Quotes a string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

pub async fn exec(client: &clickhouse::Client, sql: &str) -> Result<(), ChError> {
    timed(client.query_raw(sql).execute()).await
}

/// Runs a SELECT and returns its rows as JSON objects (64-bit integers as numbers).
pub async fn fetch_json(
    client: &clickhouse::Client,
    sql: &str,
) -> Result<Vec<serde_json::Value>, ChError> {
    let fetch = async {
        let mut cursor = client
            .query_raw(sql)
            .with_setting("output_format_json_quote_64bit_integers", "0")
            .fetch_bytes("JSONEachRow")?;
        cursor.collect().await
    };
    let bytes = timed(fetch).await?;
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        out.push(serde_json::from_slice(line).map_err(|e| ChError {
            message: format!("unreadable answer: {e}"),
            retriable: false,
        })?);
    }
    Ok(out)
}

/// Sends `INSERT INTO table FORMAT RowBinary` with pre-encoded rows.
pub async fn insert(client: &clickhouse::Client, table: &str, data: Bytes) -> Result<(), ChError> {
    let sql = format!("INSERT INTO {table} FORMAT RowBinary");
    let send = async {
        let mut ins = client.insert_formatted_with(sql);
        ins.send(data).await?;
        ins.end().await
    };
    timed(send).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_server_errors_are_retried() {
        assert_eq!(
            server_code(
                "bad response: Code: 32, e.displayText() = DB::Exception: Attempt to read after eof"
            ),
            Some(32)
        );
        assert_eq!(server_code("no code"), None);
        assert!(TRANSIENT_CODES.contains(&32) && !TRANSIENT_CODES.contains(&320));
        assert_eq!(
            server_code("Code: 60. DB::Exception: Table x doesn't exist"),
            Some(60)
        );
    }
}
