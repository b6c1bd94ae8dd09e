//! Config blocks shared by the binaries, flattened into each one's clap flags.
//! Every flag has a `VIDPULSE_…` environment twin. Values that may hold
//! secrets (librdkafka properties) can come from a file and are never logged.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

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
}

/// Where Redis is, for every binary that uses it.
#[derive(Args, Clone)]
pub struct RedisArgs {
    /// Redis server: `redis://[:password@]host:port[/db]`, or `rediss://…`
    /// for TLS. Never logged.
    #[arg(
        long = "redis-url",
        env = "VIDPULSE_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
}

impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisArgs")
            .field("redis_url", &redact_url(&self.redis_url))
            .finish()
    }
}

/// A URL with its credentials (`user:password@`) replaced by `***`, for
/// logs and errors.
pub fn redact_url(url: &str) -> String {
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

/// The admin HTTP port and logging.
#[derive(Args, Clone, Debug)]
pub struct AdminArgs {
    /// Address of the admin HTTP server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "VIDPULSE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "VIDPULSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
        };
        let shown = format!("{args:?}");
        assert!(shown.contains("sasl.password"));
        assert!(!shown.contains("hunter2"));
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
    fn redis_args_debug_hides_the_password() {
        let a = RedisArgs {
            redis_url: "redis://:hunter2@r:6379".into(),
        };
        let shown = format!("{a:?}");
        assert!(
            shown.contains("r:6379") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
