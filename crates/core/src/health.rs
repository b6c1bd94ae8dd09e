//! Readiness as typed components. A stage is ready when it has started,
//! is not stopping, and every component it depends on (Kafka, Redis,
//! ClickHouse, the pool gate, …) is ready. `/readyz` answers 200 or 503 and
//! lists why; informational details (say, which upstream source holds the
//! watermark) are listed too but never make the stage unready.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A dependency of a stage whose health decides readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The Kafka consumer group and producer.
    Kafka,
    /// Redis (dimensions, enrichment, checkpoints, leaderboards, streams).
    Redis,
    /// ClickHouse (metric rows).
    ClickHouse,
    /// The checkpoint store (Redis, as a state store).
    Checkpoints,
    /// The monitor's pool data.
    Pools,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Kafka => "kafka",
            Component::Redis => "redis",
            Component::ClickHouse => "clickhouse",
            Component::Checkpoints => "checkpoints",
            Component::Pools => "pools",
        }
    }
}

impl Component {
    /// The name for a sentence ("Redis call failed").
    pub fn title(self) -> &'static str {
        match self {
            Component::Kafka => "Kafka",
            Component::Redis => "Redis",
            Component::ClickHouse => "ClickHouse",
            Component::Checkpoints => "Checkpoint store",
            Component::Pools => "Pool data",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Default)]
struct State {
    /// `None` once started; why not ready otherwise ("starting", "draining").
    phase: Option<String>,
    /// Components that are not ready, with why.
    failing: BTreeMap<Component, String>,
    /// Informational lines (key → text).
    details: BTreeMap<String, String>,
}

/// Readiness shared between a stage and its admin server.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Mutex<State>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Starts not ready ("starting").
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                phase: Some("starting".into()),
                ..State::default()
            })),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        let out = self.inner.lock().ok().map(|mut s| f(&mut s));
        self.publish();
        out
    }

    /// Mirrors readiness into the `vidpulse_stage_ready` gauge.
    pub fn publish(&self) {
        let ready = self
            .inner
            .lock()
            .map(|s| s.phase.is_none() && s.failing.is_empty())
            .unwrap_or(false);
        metrics::gauge!(crate::metrics::STAGE_READY).set(if ready { 1.0 } else { 0.0 });
    }

    /// The stage is up and doing its job (components still count).
    pub fn set_started(&self) {
        self.with(|s| s.phase = None);
    }

    /// The stage is stopping or has stopped: `why` ("draining", "failed: …").
    pub fn set_phase(&self, why: impl Into<String>) {
        let why = why.into();
        self.with(|s| s.phase = Some(why));
    }

    /// `component` works again. Returns whether it had failed.
    pub fn set_ok(&self, component: Component) -> bool {
        self.with(|s| s.failing.remove(&component).is_some())
            .unwrap_or(false)
    }

    /// `component` fails: `why` says how (shown on `/readyz`).
    pub fn set_failing(&self, component: Component, why: impl Into<String>) {
        let why = why.into();
        self.with(|s| s.failing.insert(component, why));
    }

    /// Whether `component` is currently failing.
    pub fn is_failing(&self, component: Component) -> bool {
        self.with(|s| s.failing.contains_key(&component))
            .unwrap_or(true)
    }

    /// Sets (or with `None` clears) an informational line.
    pub fn set_detail(&self, key: &str, text: Option<String>) {
        self.with(|s| match text {
            Some(t) => {
                s.details.insert(key.to_owned(), t);
            }
            None => {
                s.details.remove(key);
            }
        });
    }

    /// `None` when ready, else why not (every failing component).
    pub fn not_ready_reason(&self) -> Option<String> {
        self.with(|s| {
            let mut why: Vec<String> = s.phase.iter().cloned().collect();
            why.extend(s.failing.iter().map(|(c, w)| format!("{c}: {w}")));
            (!why.is_empty()).then(|| why.join("; "))
        })
        .unwrap_or_else(|| Some("poisoned".into()))
    }

    /// The `/readyz` body: the verdict, then one line per detail.
    pub fn report(&self) -> (bool, String) {
        let reason = self.not_ready_reason();
        let mut text = match &reason {
            None => "ready\n".to_owned(),
            Some(r) => format!("not ready: {r}\n"),
        };
        self.with(|s| {
            for (k, v) in &s.details {
                text.push_str(&format!("{k}: {v}\n"));
            }
        });
        (reason.is_none(), text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_started_and_every_component_works() {
        let h = Health::new();
        assert_eq!(h.not_ready_reason().as_deref(), Some("starting"));
        h.set_started();
        assert_eq!(h.not_ready_reason(), None);
        h.set_failing(Component::ClickHouse, "clickhouse unavailable: refused");
        h.set_failing(Component::Redis, "redis unavailable: timeout");
        let (ready, text) = h.report();
        assert!(!ready);
        assert_eq!(
            text,
            "not ready: redis: redis unavailable: timeout; clickhouse: clickhouse unavailable: refused\n"
        );
        assert!(h.set_ok(Component::Redis));
        assert!(!h.set_ok(Component::Redis), "already ok");
        h.set_ok(Component::ClickHouse);
        h.set_detail("watermark", Some("held by raw/3".into()));
        assert_eq!(
            h.report(),
            (true, "ready\nwatermark: held by raw/3\n".into())
        );
        h.set_phase("draining");
        assert_eq!(h.not_ready_reason().as_deref(), Some("draining"));
    }
}
