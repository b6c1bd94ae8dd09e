//! The read side of vidpulse's metrics: the metrics spec (which metrics,
//! logs and leaderboards exist, their windows and aggregates), the ClickHouse
//! schema it implies (tables, DDL, final-value views), the final-value SQL,
//! where leaderboards live in Redis, and the query API that `vidpulse
//! query`, `vidpulse-api` and the dashboard call.
//!
//! The aggregator (the write side) depends on this crate for the spec and the
//! schema; readers depend on it alone and never link the aggregator's state
//! machine. Nothing here writes results.
#![forbid(unsafe_code)]

pub mod boards;
pub mod clickhouse;
pub mod field;
pub mod generation;
pub mod read;
pub mod rollup;
pub mod schema;
pub mod spec;
pub mod sql;
pub mod zone;

use std::path::PathBuf;

use clap::Args as ClapArgs;

pub use clickhouse::{ChError, ClickHouseArgs};
pub use read::{Filters, QueryError, Row, Target};
pub use schema::Tables;
pub use spec::{Spec, SpecError};

/// Which spec to use: `--spec FILE` or the built-in one.
#[derive(ClapArgs, Clone, Debug)]
pub struct SpecArgs {
    /// Metrics spec (TOML, see docs/metrics.md); default: the built-in
    /// spec of the seeds' dashboards (print it with --print-spec).
    #[arg(long = "spec", env = "VIDPULSE_AGGREGATOR_SPEC")]
    pub spec: Option<PathBuf>,
}

impl SpecArgs {
    /// Reads and validates the spec; errors name the file and the place.
    pub fn load(&self) -> Result<Spec, SpecError> {
        match &self.spec {
            None => Spec::parse(spec::DEFAULT_SPEC),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| SpecError {
                    place: format!("--spec {}", path.display()),
                    message: format!("cannot read the file: {e}"),
                })?;
                Spec::parse(&text).map_err(|mut e| {
                    e.place = format!(
                        "{}{}{}",
                        path.display(),
                        if e.place.is_empty() { "" } else { ": " },
                        e.place
                    );
                    e
                })
            }
        }
    }
}
