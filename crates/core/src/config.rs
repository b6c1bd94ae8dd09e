//! Config blocks shared by the binaries, flattened into each one's clap flags.
//! Every flag has a `VIDPULSE_…` environment twin. Values that may hold
//! secrets (librdkafka properties) can come from a file and are never logged.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Command, CommandFactory, FromArgMatches};

use crate::telemetry::LogFormat;

/// Where Kafka is and how to talk to it.
#[derive(Args, Clone)]
pub struct KafkaArgs {
    /// Bootstrap brokers, comma-separated host:port.
    #[arg(
        long = "kafka-brokers",
        env = "VIDPULSE_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,

    /// Prefix prepended to every topic and consumer-group name this process
    /// uses (raw, pipeline and pool topics). Lets several pipelines, or
    /// tests, share one cluster without colliding.
    #[arg(long, env = "VIDPULSE_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Extra librdkafka property `key=value` for every client (SASL, TLS,
    /// tuning). Repeatable; comma-separated in the env var.
    #[arg(long = "kafka-option", env = "VIDPULSE_KAFKA_OPTIONS", hide_env_values = true, value_delimiter = ',', value_parser = parse_kv)]
    pub options: Vec<(String, String)>,

    /// A Java-style properties file (`key=value` lines, `#` comments) of
    /// librdkafka properties, read at start; for secrets mounted as files.
    #[arg(long = "kafka-options-file", env = "VIDPULSE_KAFKA_OPTIONS_FILE")]
    pub options_file: Option<PathBuf>,

    /// Static membership of the consumer group (librdkafka's
    /// `group.instance.id`): a stable name per instance, such as a
    /// StatefulSet's pod name. An instance restarted under the same name
    /// within the session timeout gets its own partitions back without a
    /// rebalance; one that stops does not leave the group, so its partitions
    /// wait out the session timeout. Never give two live instances one name.
    #[arg(long, env = "VIDPULSE_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
}

/// Where Redis is, for every binary that uses it.
#[derive(Args, Clone)]
pub struct RedisArgs {
    /// Redis server: `redis://[:password@]host:port[/db]`, or `rediss://…`
    /// for TLS. With `--redis-cluster`: one or more seed nodes of the
    /// cluster, comma-separated (the others are discovered). Never logged.
    #[arg(
        long = "redis-url",
        env = "VIDPULSE_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Talk to a Redis Cluster (keys spread over its masters by hash slot)
    /// instead of one server. Keys used together by a script are hash-tagged
    /// (docs/deploy.md, "Redis Cluster").
    #[arg(long = "redis-cluster", env = "VIDPULSE_REDIS_CLUSTER")]
    pub redis_cluster: bool,
}

impl RedisArgs {
    /// The client for these flags (connects on first use); the error names
    /// the flag.
    pub fn client(&self) -> Result<crate::redis::RedisClient, ConfigError> {
        crate::redis::RedisClient::open(self)
    }
}

/// How many Redis replicas must hold a stage's writes before it counts
/// them done ([`crate::redis::Replication`]); for the stages whose Redis
/// writes are results (aggregator, dim-builder, the T+1 loader).
#[derive(Args, Clone, Debug)]
pub struct ReplicationArgs {
    /// Replicas that must acknowledge a batch of writes (Redis `WAIT`)
    /// before the stage commits the input they cover; fewer within
    /// `--redis-wait-timeout` and the batch is retried. 0: do not wait
    /// (a failover may lose the writes its master acknowledged last). Every
    /// master must have at least this many replicas: checked at start.
    #[arg(
        long = "redis-wait-replicas",
        env = "VIDPULSE_REDIS_WAIT_REPLICAS",
        default_value_t = 0
    )]
    pub replicas: u32,

    /// How long a batch waits for those replicas (keep it below the Redis
    /// response timeout).
    #[arg(
        long = "redis-wait-timeout",
        env = "VIDPULSE_REDIS_WAIT_TIMEOUT",
        default_value = "2s",
        value_parser = humantime::parse_duration
    )]
    pub timeout: Duration,
}

impl ReplicationArgs {
    pub fn replication(&self) -> crate::redis::Replication {
        crate::redis::Replication {
            replicas: self.replicas,
            timeout: self.timeout,
        }
    }
}

impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisArgs")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_cluster", &self.redis_cluster)
            .finish()
    }
}

/// A URL with its credentials (`user:password@`) replaced by `***`, for
/// logs and errors.
pub fn redact_url(url: &str) -> String {
    // Seed lists (`--redis-cluster`): each URL on its own, unless a part is
    // no URL (a comma inside a password): then the whole as one.
    if url.contains(',') {
        let parts: Vec<&str> = url.split(',').collect();
        if parts
            .iter()
            .all(|p| p.trim().is_empty() || p.contains("://"))
        {
            return parts
                .iter()
                .map(|p| redact_one(p))
                .collect::<Vec<_>>()
                .join(",");
        }
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl std::fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Option values may be passwords: show keys only.
        let keys: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaArgs")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("option_keys", &keys)
            .field("options_file", &self.options_file)
            .field("group_instance_id", &self.group_instance_id)
            .finish()
    }
}

impl KafkaArgs {
    /// The name of `topic` with this process's prefix.
    pub fn topic(&self, topic: &str) -> String {
        format!("{}{}", self.topic_prefix, topic)
    }

    /// Every librdkafka property from flags, env and the options file
    /// (the file first, so flags override it).
    pub fn all_options(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out = Vec::new();
        if let Some(path) = &self.options_file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                field: "--kafka-options-file".into(),
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let kv = parse_kv(line).map_err(|e| ConfigError::Invalid {
                    field: "--kafka-options-file".into(),
                    message: format!("{}:{}: {e}", path.display(), n + 1),
                })?;
                out.push(kv);
            }
        }
        out.extend(self.options.iter().cloned());
        Ok(out)
    }
}

/// Parses `key=value`.
pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// How a stage logs.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "VIDPULSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The flags every stage's Kafka loop takes. Their defaults and
/// environment names are set per binary with [`LoopDefaults`] (say
/// `VIDPULSE_INGEST_GROUP`, default `vidpulse-ingest`); parse a stage's
/// flags with [`parse_stage_args`].
#[derive(Args, Clone, Debug)]
pub struct LoopArgs {
    /// Consumer group (the topic prefix is added).
    #[arg(long)]
    pub group: String,

    /// Most records handed to the stage at once.
    #[arg(long)]
    pub max_batch: usize,

    /// Longest a batch waits to fill after its first record (0s: take what
    /// has arrived).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_wait: Duration,

    /// Most records produced but not yet acknowledged by the broker; past
    /// it nothing more is read (back-pressure).
    #[arg(long)]
    pub max_in_flight: usize,

    /// First retry delay after a failed call to Redis, ClickHouse or Kafka;
    /// doubles up to --max-backoff.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_backoff: Duration,

    /// Longest retry delay.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,

    /// How long shutdown waits for in-flight work (acknowledgements, the
    /// last flush) before exiting; what is not done is re-read on restart.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Dead-letter topic for records the stage cannot handle.
    #[arg(long)]
    pub dlq_topic: String,

    /// Address of the admin HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long)]
    pub admin_addr: SocketAddr,
}

/// A binary's defaults for [`LoopArgs`].
#[derive(Clone, Debug)]
pub struct LoopDefaults {
    /// Prefix of the environment twins, e.g. `VIDPULSE_INGEST`.
    pub env_prefix: &'static str,
    pub group: &'static str,
    pub admin_addr: &'static str,
    pub max_batch: usize,
    pub max_wait: &'static str,
    pub max_in_flight: usize,
    pub min_backoff: &'static str,
    pub max_backoff: &'static str,
    pub drain_timeout: &'static str,
}

impl LoopDefaults {
    /// Sets the defaults and environment names of the loop flags of `cmd`.
    pub fn apply(&self, cmd: Command) -> Command {
        let p = self.env_prefix;
        let flags: [(&str, String, String); 9] = [
            ("group", format!("{p}_GROUP"), self.group.into()),
            (
                "max_batch",
                format!("{p}_MAX_BATCH"),
                self.max_batch.to_string(),
            ),
            ("max_wait", format!("{p}_MAX_WAIT"), self.max_wait.into()),
            (
                "max_in_flight",
                format!("{p}_MAX_IN_FLIGHT"),
                self.max_in_flight.to_string(),
            ),
            (
                "min_backoff",
                format!("{p}_MIN_BACKOFF"),
                self.min_backoff.into(),
            ),
            (
                "max_backoff",
                format!("{p}_MAX_BACKOFF"),
                self.max_backoff.into(),
            ),
            (
                "drain_timeout",
                format!("{p}_DRAIN_TIMEOUT"),
                self.drain_timeout.into(),
            ),
            (
                "dlq_topic",
                format!("{p}_DLQ_TOPIC"),
                crate::topics::DLQ.into(),
            ),
            // One name for every stage: a pod sets its own.
            (
                "admin_addr",
                "VIDPULSE_ADMIN_ADDR".into(),
                self.admin_addr.into(),
            ),
        ];
        flags.into_iter().fold(cmd, |cmd, (id, env, default)| {
            cmd.mut_arg(id, |a| a.env(env).default_value(default).required(false))
        })
    }
}

/// The flags of a stage binary: its own, with a flattened [`LoopArgs`]
/// whose defaults are [`Self::LOOP_DEFAULTS`].
pub trait StageArgs: CommandFactory + FromArgMatches + Sized {
    const LOOP_DEFAULTS: LoopDefaults;

    /// The command with the loop flags' defaults and environment names set.
    fn stage_command() -> Command {
        Self::LOOP_DEFAULTS.apply(Self::command())
    }

    /// Parses the command line (exits with clap's message on a bad flag).
    fn parse_args() -> Self {
        let mut cmd = Self::stage_command();
        let matches = cmd.get_matches_mut();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
    }

    /// Parses `args` (the first is the program name).
    fn try_parse_args<I, S>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString> + Clone,
    {
        let matches = Self::stage_command().try_get_matches_from(args)?;
        Self::from_arg_matches(&matches)
    }
}

impl LoopArgs {
    /// Checks the values and turns them into the runtime's settings.
    pub fn settings(&self) -> Result<LoopSettings, ConfigError> {
        let invalid = |field: &str, message: &str| ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        };
        if self.max_batch == 0 {
            return Err(invalid("--max-batch", "must be at least 1"));
        }
        if self.max_in_flight < self.max_batch {
            return Err(invalid(
                "--max-in-flight",
                "must be at least --max-batch (a batch's outputs are in flight together)",
            ));
        }
        if self.group.trim().is_empty() {
            return Err(invalid("--group", "must not be empty"));
        }
        Ok(LoopSettings {
            max_batch: self.max_batch,
            max_wait: self.max_wait,
            max_in_flight: self.max_in_flight,
            min_backoff: self.min_backoff.max(Duration::from_millis(1)),
            max_backoff: self.max_backoff.max(self.min_backoff),
            drain_timeout: self.drain_timeout,
        })
    }
}

/// The loop's validated numbers (see [`LoopArgs`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopSettings {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub max_in_flight: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub drain_timeout: Duration,
}

/// A flag or config file value that makes no sense; the message names the
/// field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kv_parsing() {
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_kv("novalue").is_err());
        assert!(parse_kv("=x").is_err());
    }

    #[test]
    fn debug_hides_option_values() {
        let args = KafkaArgs {
            brokers: "b:1".into(),
            topic_prefix: String::new(),
            options: vec![("sasl.password".into(), "hunter2".into())],
            options_file: None,
            group_instance_id: None,
        };
        let shown = format!("{args:?}");
        assert!(shown.contains("sasl.password"));
        assert!(!shown.contains("hunter2"));
    }

    #[derive(clap::Parser, Debug)]
    struct Demo {
        #[command(flatten)]
        lp: LoopArgs,
    }

    impl StageArgs for Demo {
        const LOOP_DEFAULTS: LoopDefaults = D;
    }

    const D: LoopDefaults = LoopDefaults {
        env_prefix: "VIDPULSE_DEMO_TEST",
        group: "vidpulse-demo",
        admin_addr: "127.0.0.1:9199",
        max_batch: 500,
        max_wait: "20ms",
        max_in_flight: 1000,
        min_backoff: "100ms",
        max_backoff: "5s",
        drain_timeout: "30s",
    };

    #[test]
    fn loop_flags_take_per_binary_defaults_and_env_names() {
        let d = Demo::try_parse_args(["demo"]).unwrap();
        assert_eq!(d.lp.group, "vidpulse-demo");
        assert_eq!(d.lp.max_batch, 500);
        assert_eq!(d.lp.max_wait, Duration::from_millis(20));
        assert_eq!(d.lp.dlq_topic, "vp.dlq.v1");
        let d = Demo::try_parse_args(["demo", "--max-batch", "7", "--group", "g"]).unwrap();
        assert_eq!((d.lp.max_batch, d.lp.group.as_str()), (7, "g"));
        let help = Demo::stage_command().render_long_help().to_string();
        assert!(help.contains("VIDPULSE_DEMO_TEST_MAX_BATCH"), "{help}");
        assert!(help.contains("[default: vidpulse-demo]"), "{help}");
        let e = Demo::try_parse_args(["demo", "--max-batch", "x"]).unwrap_err();
        assert!(e.to_string().contains("--max-batch"), "{e}");
        let bad = LoopArgs {
            max_in_flight: 1,
            ..d.lp.clone()
        };
        assert!(
            bad.settings()
                .unwrap_err()
                .to_string()
                .contains("--max-in-flight")
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:s3cret@r:6379/0"),
            "redis://***@r:6379/0"
        );
        assert_eq!(redact_url("rediss://u:p@r"), "rediss://***@r");
        assert_eq!(redact_url("redis://r:6379"), "redis://r:6379");
    }

    #[test]
    fn seed_lists_are_redacted_url_by_url() {
        assert_eq!(
            redact_url("redis://:a@h1:7101,redis://h2:7102"),
            "redis://***@h1:7101,redis://h2:7102"
        );
        // A comma inside a password: redacted as one URL.
        assert_eq!(redact_url("redis://:p,w@h1:7101"), "redis://***@h1:7101");
    }

    #[derive(clap::Parser, Debug)]
    struct WithRedis {
        #[command(flatten)]
        redis: RedisArgs,
    }

    #[test]
    fn redis_cluster_flag_and_env() {
        use clap::Parser;
        let a = WithRedis::try_parse_from(["x"]).unwrap();
        assert!(!a.redis.redis_cluster);
        assert!(!a.redis.client().unwrap().is_cluster());
        let a = WithRedis::try_parse_from([
            "x",
            "--redis-cluster",
            "--redis-url",
            "redis://127.0.0.1:7101,redis://127.0.0.1:7102",
        ])
        .unwrap();
        assert!(a.redis.redis_cluster);
        assert!(a.redis.client().unwrap().is_cluster());
        // Several seeds without the flag: an error naming it.
        let a = WithRedis::try_parse_from([
            "x",
            "--redis-url",
            "redis://127.0.0.1:7101,redis://127.0.0.1:7102",
        ])
        .unwrap();
        let e = a.redis.client().unwrap_err().to_string();
        assert!(e.contains("--redis-cluster"), "{e}");
        let help = {
            use clap::CommandFactory;
            WithRedis::command().render_long_help().to_string()
        };
        assert!(help.contains("VIDPULSE_REDIS_CLUSTER"), "{help}");
    }

    #[test]
    fn redis_args_debug_hides_the_password() {
        let a = RedisArgs {
            redis_url: "redis://:hunter2@r:6379".into(),
            redis_cluster: false,
        };
        let shown = format!("{a:?}");
        assert!(
            shown.contains("r:6379") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
