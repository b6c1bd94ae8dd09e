//! Retry with exponential backoff, the one policy every stage uses for
//! Redis, ClickHouse and Kafka failures: the first retry after `min`, each
//! next one twice as late, never later than `max`. A retriable failure marks
//! its health component failing; the first success marks it ready again.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::health::{Component, Health};

/// Default first retry delay.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(200);
/// Default longest retry delay.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Exponential backoff between `min` and `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            next: min,
            failures: 0,
        }
    }

    /// The delay before the next attempt; doubles each call up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
        self.failures = 0;
    }

    /// Records a failure of `component`: counts it, marks it failing on
    /// `/readyz` and sleeps the next delay. Returns `false` when `shutdown`
    /// came first (give up, nothing more is attempted).
    pub async fn failed(
        &mut self,
        health: &Health,
        component: Component,
        error: &(dyn std::fmt::Display + Sync),
        shutdown: &CancellationToken,
    ) -> bool {
        let delay = self.next_delay();
        metrics::counter!(crate::metrics::RETRIES, "component" => component.as_str()).increment(1);
        tracing::warn!(%component, %error, attempt = self.failures, retry_in = ?delay, "{} call failed; retrying.", component.title());
        health.set_failing(component, format!("{component} unavailable: {error}"));
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Records a success of `component` after failures.
    pub fn succeeded(&mut self, health: &Health, component: Component) {
        if health.set_ok(component) {
            tracing::info!(%component, "Recovered.");
        }
        self.reset();
    }
}

/// Runs `attempt` until it succeeds, backing off between failures that
/// `retriable` accepts; `None` when `shutdown` came first, `Some(Err)` for a
/// failure that is not retriable.
pub async fn retry<T, E, F, Fut>(
    backoff: &mut Backoff,
    health: &Health,
    component: Component,
    shutdown: &CancellationToken,
    retriable: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Option<Result<T, E>>
where
    E: std::fmt::Display + Sync,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = attempt() => r,
        };
        match result {
            Ok(v) => {
                backoff.succeeded(health, component);
                return Some(Ok(v));
            }
            Err(e) if retriable(&e) => {
                if !backoff.failed(health, component, &e, shutdown).await {
                    return None;
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, vec![100, 200, 350, 350]);
        assert_eq!(b.failures(), 4);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_marks_the_component_until_it_recovers() {
        let health = Health::new();
        health.set_started();
        let stop = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(20));
        let mut calls = 0;
        let h = health.clone();
        let r: Option<Result<u32, String>> = retry(
            &mut b,
            &health,
            Component::Redis,
            &stop,
            |_| true,
            || {
                calls += 1;
                let n = calls;
                let h = h.clone();
                async move {
                    if n < 3 {
                        Err("refused".to_owned())
                    } else {
                        assert!(h.is_failing(Component::Redis));
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Some(Ok(3)));
        assert!(!health.is_failing(Component::Redis));
        let fatal: Option<Result<(), String>> = retry(
            &mut b,
            &health,
            Component::Redis,
            &stop,
            |e: &String| e != "bad",
            || async { Err("bad".to_owned()) },
        )
        .await;
        assert_eq!(fatal, Some(Err("bad".into())));
        stop.cancel();
        let stopped: Option<Result<(), String>> = retry(
            &mut b,
            &health,
            Component::Redis,
            &stop,
            |_| true,
            || async { Err("x".to_owned()) },
        )
        .await;
        assert_eq!(stopped, None);
    }
}
