//! The live snapshot behind `/api/live` and the dashboard: seed 002's five
//! charts as the seed defines them — running totals for *today so far*
//! (gift totals by type, members per grade, viewers by province × grade,
//! the top 10 gifters; the day starts at 00:00 in `--day-zone`), each with
//! a small per-minute trend where it helps, and the gifts of the last 6
//! hours — plus online users per room, seed 003's monitored pools and seed
//! 004's leaderboards, rebuilt from ClickHouse and Redis every
//! `--live-interval` while anyone watches, and pushed to every open stream.
//!
//! One poller builds each snapshot once for all viewers, so the load on
//! ClickHouse does not grow with the number of screens; a `watch` channel
//! holds only the newest snapshot, so a slow client skips to it instead of
//! queueing old ones. With nobody watching (no stream, no snapshot request
//! in the last 30 s) nothing is queried.
//!
//! "Now" is the wall clock, or `--live-at` to look at old data. Panels use
//! the same query code as `/api/metrics` with bounded time ranges.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::response::sse::Event;
use futures::Stream;
use metrics::{counter, gauge, histogram};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, watch};
use vidpulse_core::CancellationToken;
use vidpulse_query::read::{self as query, Filters, Row, Target};
use vidpulse_query::rollup::{self, Rollup};
use vidpulse_query::spec::{AggFn, Spec};
use vidpulse_query::zone::{self, Zone};

use crate::error::deadline;
use crate::metrics as m;
use crate::{ApiError, AppState, Inner};

/// How long a snapshot request keeps the poller busy without a stream.
const WANTED_FOR: i64 = 30_000;

/// Settings of the live snapshot.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    pub interval: Duration,
    /// Pinned "now" (epoch ms); `None` = the wall clock.
    pub at_ms: Option<i64>,
    pub max_clients: usize,
    /// Where "today" starts (`None`: 00:00 UTC).
    pub day_zone: Option<Zone>,
}

/// One built snapshot, serialized once for every viewer.
#[derive(Debug)]
pub struct Snapshot {
    /// 0 = nothing built yet.
    pub version: u64,
    pub built_ms: i64,
    pub json: String,
}

/// The newest snapshot and who watches it.
pub struct Live {
    cfg: LiveConfig,
    tx: watch::Sender<Arc<Snapshot>>,
    wake: Notify,
    clients: AtomicUsize,
    wanted_ms: AtomicI64,
}

/// An open stream; counted until dropped.
pub struct Subscription {
    rx: watch::Receiver<Arc<Snapshot>>,
    live: Arc<Live>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let n = self.live.clients.fetch_sub(1, Ordering::SeqCst) - 1;
        gauge!(m::LIVE_CLIENTS).set(n as f64);
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Live {
    pub fn new(cfg: LiveConfig) -> Live {
        let (tx, _) = watch::channel(Arc::new(Snapshot {
            version: 0,
            built_ms: 0,
            json: "{}".into(),
        }));
        Live {
            cfg,
            tx,
            wake: Notify::new(),
            clients: AtomicUsize::new(0),
            wanted_ms: AtomicI64::new(i64::MIN / 2),
        }
    }

    pub fn config(&self) -> &LiveConfig {
        &self.cfg
    }

    /// The time the snapshot shows.
    pub fn anchor(&self) -> i64 {
        self.cfg.at_ms.unwrap_or_else(now_ms)
    }

    fn watched(&self) -> bool {
        self.clients.load(Ordering::SeqCst) > 0
            || now_ms() - self.wanted_ms.load(Ordering::SeqCst) < WANTED_FOR
    }

    /// Opens a stream, or 503 when `--max-live-clients` are open.
    pub fn subscribe(self: &Arc<Self>) -> Result<Subscription, ApiError> {
        let n = self.clients.fetch_add(1, Ordering::SeqCst) + 1;
        let sub = Subscription {
            rx: self.tx.subscribe(),
            live: self.clone(),
        };
        if n > self.cfg.max_clients {
            counter!(m::REJECTED, "reason" => "live_clients").increment(1);
            drop(sub);
            return Err(ApiError::Busy(format!(
                "{} live streams are open (--max-live-clients); retry later",
                self.cfg.max_clients
            )));
        }
        gauge!(m::LIVE_CLIENTS).set(n as f64);
        self.wake.notify_one();
        Ok(sub)
    }

    /// The newest snapshot, rebuilt first (waiting up to `wait`) when it is
    /// older than the interval.
    pub async fn fresh(&self, wait: Duration) -> Arc<Snapshot> {
        let now = now_ms();
        self.wanted_ms.store(now, Ordering::SeqCst);
        let mut rx = self.tx.subscribe();
        let stale = {
            let cur = rx.borrow_and_update();
            cur.version == 0 || now - cur.built_ms > self.cfg.interval.as_millis() as i64
        };
        if stale {
            self.wake.notify_one();
            let _ = tokio::time::timeout(wait, rx.changed()).await;
        }
        rx.borrow().clone()
    }
}

/// The server-sent events of one stream: the current snapshot at once (if
/// any), then each new one, as `event: snapshot` with `id: <version>`. Ends
/// at shutdown.
pub fn events(
    sub: Subscription,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    futures::stream::unfold(
        (sub, true, shutdown),
        |(mut sub, first, shutdown)| async move {
            let have = sub.rx.borrow().version > 0;
            if !(first && have) {
                tokio::select! {
                    r = sub.rx.changed() => r.ok()?,
                    () = shutdown.cancelled() => return None,
                }
            }
            let snap = sub.rx.borrow_and_update().clone();
            let ev = Event::default()
                .event("snapshot")
                .id(snap.version.to_string())
                .data(snap.json.as_str());
            Some((Ok(ev), (sub, false, shutdown)))
        },
    )
}

/// The poller: rebuilds the snapshot every interval while watched, and at
/// once when a first viewer arrives.
pub async fn poll(state: AppState, shutdown: CancellationToken) {
    let live = state.live.clone();
    let mut version = 0u64;
    let mut last_errors: HashMap<&'static str, String> = HashMap::new();
    loop {
        if live.watched() {
            let started = Instant::now();
            let anchor = live.anchor();
            let mut snap = build(&state, anchor).await;
            version += 1;
            histogram!(m::LIVE_BUILD_SECONDS).record(started.elapsed().as_secs_f64());
            if let Some(panels) = snap["panels"].as_object() {
                for p in PANELS {
                    let err = panels
                        .get(p.id)
                        .and_then(|v| v["error"].as_str())
                        .map(str::to_owned);
                    match err {
                        Some(e) => {
                            counter!(m::LIVE_PANEL_ERRORS, "panel" => p.id).increment(1);
                            if last_errors.get(p.id) != Some(&e) {
                                tracing::warn!(panel = p.id, error = %e, "Live panel failed; retrying every interval.");
                                last_errors.insert(p.id, e);
                            }
                        }
                        None => {
                            if last_errors.remove(p.id).is_some() {
                                tracing::info!(panel = p.id, "Live panel recovered.");
                            }
                        }
                    }
                }
            }
            snap["version"] = json!(version);
            snap["build_ms"] = json!(started.elapsed().as_millis() as u64);
            live.tx.send_replace(Arc::new(Snapshot {
                version,
                built_ms: now_ms(),
                json: snap.to_string(),
            }));
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(live.cfg.interval) => {}
            () = live.wake.notified() => {}
        }
    }
}

/// How a panel reads its metric.
#[derive(Clone, Copy, Debug)]
pub enum How {
    /// A line: the first aggregate, summed over groups, of the `points`
    /// windows ending at the end of the window holding "now" (for a
    /// hopping window such as `gifts_6h`: the total over the window's size
    /// as it was at each slide).
    Series { points: i64 },
    /// The rows of the newest window among the last `windows`; with
    /// `complete`, the newest one that has ended, when there is one.
    Latest { windows: i64, complete: bool },
    /// Each group's newest row within the last `windows` windows (levels:
    /// online users per room).
    PerGroup { windows: i64 },
    /// Count and sum aggregates summed per group over the last `windows`
    /// windows; the `n` largest groups.
    SumTop { windows: i64, n: usize },
    /// The first `n` members of the leaderboard window holding "now".
    Board { n: usize },
    /// Today so far: the windows since 00:00 (in the dashboard's zone)
    /// rolled up, one row per group (exact: see `vidpulse_query::rollup`),
    /// and the first aggregate summed over groups for each of the last
    /// `trend` windows of today (0: no trend).
    Today { trend: i64 },
}

/// One dashboard panel.
#[derive(Clone, Copy, Debug)]
pub struct Panel {
    pub id: &'static str,
    /// Metric or leaderboard of the spec (default names).
    pub metric: &'static str,
    pub how: How,
}

/// The dashboard's panels, in page order.
pub const PANELS: [Panel; 11] = [
    Panel {
        id: "gifts_6h",
        metric: "gifts_6h",
        how: How::Series { points: 60 },
    },
    Panel {
        id: "gifts_by_type",
        metric: "gifts_by_type_1m",
        how: How::Today { trend: 60 },
    },
    Panel {
        id: "members_by_grade",
        metric: "members_by_grade_1m",
        how: How::Today { trend: 60 },
    },
    Panel {
        id: "viewers_by_province_grade",
        metric: "viewers_by_province_grade_1m",
        how: How::Today { trend: 0 },
    },
    Panel {
        id: "top_gifters",
        metric: "top_gifters_1h",
        how: How::Today { trend: 0 },
    },
    Panel {
        id: "online_users",
        metric: "online_users_1m",
        how: How::PerGroup { windows: 60 },
    },
    Panel {
        id: "pool_videos",
        metric: "pool_consumption_1m",
        how: How::SumTop { windows: 5, n: 8 },
    },
    Panel {
        id: "pool_authors",
        metric: "pool_production_1m",
        how: How::SumTop { windows: 5, n: 8 },
    },
    Panel {
        id: "board_actions",
        metric: "actions_daily",
        how: How::Board { n: 10 },
    },
    Panel {
        id: "board_video_likes",
        metric: "video_likes_daily",
        how: How::Board { n: 10 },
    },
    Panel {
        id: "board_user_gifts",
        metric: "user_gifts_daily",
        how: How::Board { n: 10 },
    },
];

/// Checks that a day in `zone` is made of whole windows of every "today"
/// panel's metric, so its totals are exact (a UTC+05:30 day cannot be
/// summed from UTC hours); the message says which metric and why.
pub fn check_day_zone(spec: &Spec, zone: Option<Zone>) -> Result<(), String> {
    for p in PANELS.iter().filter(|p| matches!(p.how, How::Today { .. })) {
        if let Some(t) = Target::find(spec, p.metric) {
            rollup::check(&t, Rollup::Day, zone, None, None).map_err(|e| {
                format!(
                    "the dashboard's \"today\" panel {} reads {}: {}",
                    p.id,
                    p.metric,
                    e.to_string().replace("--zone ", "")
                )
            })?;
        }
    }
    Ok(())
}

/// Start of "today" (epoch ms) at `anchor` in `zone` (`None`: UTC).
pub fn day_start(zone: Option<Zone>, anchor: i64) -> i64 {
    match zone {
        Some(z) => zone::start_of_day(z, anchor),
        None => anchor - anchor.rem_euclid(86_400_000),
    }
}

/// Builds one snapshot (every panel at once).
pub async fn build(st: &Inner, anchor: i64) -> Value {
    let results = futures::future::join_all(PANELS.iter().map(|p| panel(st, p, anchor))).await;
    let mut panels = Map::new();
    for (p, v) in PANELS.iter().zip(results) {
        panels.insert(p.id.to_owned(), v);
    }
    let pools = match &st.pools {
        Some(w) => serde_json::to_value(w.view()).unwrap_or(Value::Null),
        None => {
            json!({"pools": [], "loaded": false, "error": "pool following is off (--pools false)"})
        }
    };
    json!({
        "at": query::rfc3339(anchor, true),
        "pinned": st.live.cfg.at_ms.is_some(),
        "built_at": query::rfc3339(now_ms(), true),
        "interval_ms": st.live.cfg.interval.as_millis() as u64,
        "panels": panels,
        "pools": pools,
    })
}

async fn panel(st: &Inner, p: &Panel, anchor: i64) -> Value {
    let started = Instant::now();
    let result = match Target::find(&st.spec, p.metric) {
        None => Err(ApiError::NotFound {
            message: format!("{} is not in the spec this API was started with", p.metric),
            key: "metrics",
            names: Vec::new(),
        }),
        Some(t) => run_panel(st, p, &t, anchor).await,
    };
    let took = started.elapsed();
    histogram!(m::LIVE_PANEL_SECONDS, "panel" => p.id).record(took.as_secs_f64());
    let mut v = match result {
        Ok(mut v) => {
            v["metric"] = json!(p.metric);
            v["error"] = Value::Null;
            v
        }
        Err(e) => json!({"metric": p.metric, "error": e.to_string(), "rows": []}),
    };
    v["build_ms"] = json!(took.as_millis() as u64);
    v
}

/// Milliseconds of a row's `window_start`.
fn window_ms(row: &Row) -> Option<i64> {
    let v = row.iter().find(|(k, _)| k == "window_start")?;
    chrono::DateTime::parse_from_rfc3339(v.1.as_str()?)
        .ok()
        .map(|d| d.timestamp_millis())
}

fn cell<'a>(row: &'a Row, col: &str) -> Option<&'a Value> {
    row.iter().find(|(k, _)| k == col).map(|(_, v)| v)
}

fn number(v: Option<&Value>) -> i64 {
    v.and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
        .unwrap_or(0)
}

fn object(row: &Row) -> Value {
    Value::Object(row.iter().cloned().collect())
}

async fn fetch(st: &Inner, t: &Target<'_>, f: Filters) -> Result<Vec<Row>, ApiError> {
    let ch = st
        .ch
        .clone()
        .with_setting("max_result_rows", st.settings.limits.max_rows.to_string())
        .with_setting("result_overflow_mode", "break");
    deadline(
        st.settings.query_timeout,
        "the metric store",
        query::run(&ch, &st.redis, &st.tables, t, &f),
    )
    .await
}

/// Window size and slide of a panel's target (leaderboards: tumbling).
fn window_of(t: &Target<'_>) -> Result<(i64, i64), ApiError> {
    match t {
        Target::Metric(m) => Ok((m.window.size_ms, m.window.slide_ms)),
        Target::Board(b) => Ok((b.window_ms, b.window_ms)),
        Target::Log(l) => Err(ApiError::BadRequest(format!(
            "{} is a log, not a windowed metric",
            l.name
        ))),
    }
}

/// Start of the pane (window, or hopping slide) holding `anchor`.
fn pane_start(t: &Target<'_>, anchor: i64) -> i64 {
    rollup::pane_of(t).map_or(anchor, |w| w.start_of(anchor))
}

/// Start of the first trend window of today: `trend` windows back from the
/// current one, not before the day's start.
fn trend_from(t: &Target<'_>, slide: i64, trend: i64, day: i64, anchor: i64) -> i64 {
    (pane_start(t, anchor) - (trend - 1).max(0) * slide).max(day)
}

/// What a panel queries: windows starting in `[from, to)`, and for
/// leaderboards how many members per window.
pub fn panel_range(how: How, size: i64, slide: i64, anchor: i64) -> (i64, i64, Option<usize>) {
    // Start of the window (pane) holding "now".
    let cur = anchor.div_euclid(slide) * slide;
    match how {
        // The day's range is the caller's (see `day_start`).
        How::Today { .. } => (anchor, anchor + 1, None),
        // Windows starting before the end of the current pane: the panes up
        // to "now" are read; windows after the last plotted one are dropped
        // by `shape`.
        How::Series { points } => {
            let end = cur + slide;
            (end - size - (points - 1) * slide, end, None)
        }
        How::Latest { windows, .. } | How::PerGroup { windows } | How::SumTop { windows, .. } => {
            (cur - (windows - 1) * slide, anchor + 1, None)
        }
        How::Board { n } => (anchor, anchor + 1, Some(n)),
    }
}

async fn run_panel(st: &Inner, p: &Panel, t: &Target<'_>, anchor: i64) -> Result<Value, ApiError> {
    let (size, slide) = window_of(t)?;
    if let How::Today { trend } = p.how {
        let zone = st.live.cfg.day_zone;
        let day = day_start(zone, anchor);
        let totals = Filters {
            from_ms: Some(day),
            to_ms: Some(anchor + 1),
            rollup: Some(Rollup::All),
            zone,
            ..Filters::default()
        };
        let (rows, trend_rows) = if trend > 0 {
            let f = Filters {
                from_ms: Some(trend_from(t, slide, trend, day, anchor)),
                to_ms: Some(anchor + 1),
                ..Filters::default()
            };
            let (rows, trend_rows) =
                futures::future::join(fetch(st, t, totals), fetch(st, t, f)).await;
            (rows?, trend_rows?)
        } else {
            (fetch(st, t, totals).await?, Vec::new())
        };
        return shape_today(t, &rows, &trend_rows, trend, zone, anchor);
    }
    let (from, to, limit) = panel_range(p.how, size, slide, anchor);
    let f = Filters {
        from_ms: Some(from),
        to_ms: Some(to),
        limit,
        ..Filters::default()
    };
    let rows = fetch(st, t, f).await?;
    shape(p.how, t, &rows, anchor)
}

/// Shapes a "today" panel: the rolled-up rows of the day so far, the total
/// of the first aggregate over them, and its per-window trend.
pub fn shape_today(
    t: &Target<'_>,
    rows: &[Row],
    trend_rows: &[Row],
    trend: i64,
    zone: Option<Zone>,
    anchor: i64,
) -> Result<Value, ApiError> {
    let Target::Metric(m) = t else {
        return Err(ApiError::BadRequest("not a metric".into()));
    };
    let (_, slide) = window_of(t)?;
    let stamp = |t: i64| query::rfc3339(t, false);
    let day = day_start(zone, anchor);
    let value = m
        .aggregates
        .first()
        .map(|a| a.name.clone())
        .unwrap_or_default();
    let total: i64 = rows.iter().map(|r| number(cell(r, &value))).sum();
    let mut points = Vec::new();
    if trend > 0 {
        let mut by_start: HashMap<i64, i64> = HashMap::new();
        for r in trend_rows {
            if let Some(w) = window_ms(r) {
                *by_start.entry(w).or_default() += number(cell(r, &value));
            }
        }
        let mut w = trend_from(t, slide, trend, day, anchor);
        let cur = pane_start(t, anchor);
        while w <= cur {
            points.push(json!({
                "window_start": stamp(w),
                "value": by_start.get(&w).copied().unwrap_or(0),
            }));
            w = m.window.end_of(w);
        }
    }
    let date = zone
        .and_then(|z| zone::local_date(z, day))
        .map_or_else(|| stamp(day)[..10].to_owned(), |d| d.to_string());
    Ok(json!({
        "day": date,
        "zone": zone.map_or("UTC", |z| z.name()),
        "window_start": stamp(day),
        "window_end": query::rfc3339(anchor, true),
        "complete": false,
        "value_name": value,
        "total": total,
        "rows": rows.iter().map(object).collect::<Vec<_>>(),
        "trend": points,
    }))
}

/// Shapes a panel's rows for the page (see [`How`]).
pub fn shape(how: How, t: &Target<'_>, rows: &[Row], anchor: i64) -> Result<Value, ApiError> {
    let metric = match t {
        Target::Metric(m) => Some(*m),
        _ => None,
    };
    let (size, slide) = window_of(t)?;
    let stamp = |t: i64| query::rfc3339(t, false);
    let cur = pane_start(t, anchor);
    match how {
        // Rows already rolled up over today (UTC), without a trend.
        How::Today { .. } => shape_today(t, rows, &[], 0, None, anchor),
        How::Series { points } => {
            let m = metric.ok_or_else(|| ApiError::BadRequest("not a metric".into()))?;
            let value = m
                .aggregates
                .first()
                .map(|a| a.name.clone())
                .unwrap_or_default();
            let end = cur + slide;
            let first = end - size - (points - 1) * slide;
            let mut by_start: HashMap<i64, i64> = HashMap::new();
            for r in rows {
                if let Some(w) = window_ms(r) {
                    *by_start.entry(w).or_default() += number(cell(r, &value));
                }
            }
            let series: Vec<Value> = (0..points)
                .map(|k| {
                    let ws = first + k * slide;
                    json!({
                        "window_start": stamp(ws),
                        "window_end": stamp(ws + size),
                        "value": by_start.get(&ws).copied().unwrap_or(0),
                    })
                })
                .collect();
            let latest = by_start.get(&(end - size)).copied().unwrap_or(0);
            Ok(json!({
                "value_name": value,
                "window": m.window.describe(),
                "window_start": stamp(end - size),
                "window_end": stamp(end),
                "latest": latest,
                "rows": series,
            }))
        }
        How::Latest { complete, .. } => {
            let starts: Vec<i64> = rows.iter().filter_map(window_ms).collect();
            let newest = starts.iter().max().copied();
            let ended = starts
                .iter()
                .filter(|w| **w + size <= anchor)
                .max()
                .copied();
            let pick = if complete { ended.or(newest) } else { newest };
            let Some(ws) = pick else {
                return Ok(
                    json!({"window_start": null, "window_end": null, "complete": false, "rows": []}),
                );
            };
            let chosen: Vec<Value> = rows
                .iter()
                .filter(|r| window_ms(r) == Some(ws))
                .map(object)
                .collect();
            Ok(json!({
                "window_start": stamp(ws),
                "window_end": stamp(ws + size),
                "complete": ws + size <= anchor,
                "rows": chosen,
            }))
        }
        How::PerGroup { .. } => {
            let m = metric.ok_or_else(|| ApiError::BadRequest("not a metric".into()))?;
            let keys: Vec<&str> = m.group_by.iter().map(|g| g.name.as_str()).collect();
            let value = m.aggregates.first().map(|a| a.name.as_str()).unwrap_or("");
            let mut newest: BTreeMap<String, (i64, &Row)> = BTreeMap::new();
            for r in rows {
                let Some(w) = window_ms(r) else { continue };
                let key = keys
                    .iter()
                    .map(|k| cell(r, k).map(Value::to_string).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\u{1f}");
                let e = newest.entry(key).or_insert((w, r));
                if w > e.0 {
                    *e = (w, r);
                }
            }
            let mut out: Vec<&Row> = newest.values().map(|(_, r)| *r).collect();
            out.sort_by_key(|r| std::cmp::Reverse(number(cell(r, value))));
            let total: i64 = out.iter().map(|r| number(cell(r, value))).sum();
            Ok(json!({
                "value_name": value,
                "total": total,
                "window_start": stamp(cur),
                "window_end": stamp(cur + slide),
                "rows": out.into_iter().map(object).collect::<Vec<_>>(),
            }))
        }
        How::SumTop { windows, n } => {
            let m = metric.ok_or_else(|| ApiError::BadRequest("not a metric".into()))?;
            let keys: Vec<&str> = m.group_by.iter().map(|g| g.name.as_str()).collect();
            // Only counts and sums add up across windows.
            let sums: Vec<&str> = m
                .aggregates
                .iter()
                .filter(|a| matches!(a.func, AggFn::Count | AggFn::Sum(_)))
                .map(|a| a.name.as_str())
                .collect();
            let mut groups: BTreeMap<Vec<String>, (Vec<Value>, Vec<i64>)> = BTreeMap::new();
            for r in rows {
                let kv: Vec<Value> = keys
                    .iter()
                    .map(|k| cell(r, k).cloned().unwrap_or(Value::Null))
                    .collect();
                let ks: Vec<String> = kv.iter().map(Value::to_string).collect();
                let e = groups
                    .entry(ks)
                    .or_insert_with(|| (kv, vec![0; sums.len()]));
                for (i, s) in sums.iter().enumerate() {
                    e.1[i] += number(cell(r, s));
                }
            }
            let mut list: Vec<(Vec<Value>, Vec<i64>)> = groups.into_values().collect();
            // Largest first; the BTreeMap order (by key) breaks ties.
            list.sort_by(|a, b| b.1.cmp(&a.1));
            let out: Vec<Value> = list
                .into_iter()
                .take(n)
                .map(|(kv, sv)| {
                    let mut o = Map::new();
                    for (k, v) in keys.iter().zip(kv) {
                        o.insert((*k).to_owned(), v);
                    }
                    for (s, v) in sums.iter().zip(sv) {
                        o.insert((*s).to_owned(), json!(v));
                    }
                    Value::Object(o)
                })
                .collect();
            Ok(json!({
                "window_start": stamp(cur - (windows - 1) * slide),
                "window_end": stamp(cur + slide),
                "rows": out,
            }))
        }
        How::Board { .. } => {
            let Target::Board(b) = t else {
                return Err(ApiError::BadRequest("not a leaderboard".into()));
            };
            let entries: Vec<Value> = rows
                .iter()
                .map(|r| {
                    json!({
                        "rank": cell(r, "rank"),
                        "member": cell(r, &b.member.name),
                        "score": cell(r, &b.score_name),
                    })
                })
                .collect();
            Ok(json!({
                "member_name": b.member.name,
                "score_name": b.score_name,
                "window_start": stamp(cur),
                "window_end": stamp(b.end_of(cur)),
                "day": vidpulse_query::boards::window_stamp(b, cur),
                "zone": b.zone.map_or("UTC", |z| z.name()),
                "rows": entries,
            }))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vidpulse_query::spec::Spec;

    const T0: i64 = 1_629_075_600_000; // 2021-08-16T01:00:00Z
    const MIN: i64 = 60_000;

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn ws(t: i64) -> Value {
        json!(query::rfc3339(t, false))
    }

    #[test]
    fn the_6h_line_has_every_minute_and_reads_up_to_now() {
        let spec = Spec::default_spec();
        let t = Target::find(&spec, "gifts_6h").unwrap();
        let anchor = T0 + 5 * MIN + 30_000; // 01:05:30
        let (from, to, _) = panel_range(How::Series { points: 60 }, 6 * 60 * MIN, MIN, anchor);
        // Newest plotted window: 19:06 (the day before) to 01:06.
        assert_eq!(to, T0 + 6 * MIN);
        assert_eq!(from, T0 + 6 * MIN - 6 * 60 * MIN - 59 * MIN);
        let newest = T0 + 6 * MIN - 6 * 60 * MIN;
        let rows = vec![
            row(&[("window_start", ws(newest)), ("amount", json!(70))]),
            row(&[("window_start", ws(newest - MIN)), ("amount", json!(40))]),
            // A window after the newest plotted one: not shown.
            row(&[("window_start", ws(newest + MIN)), ("amount", json!(99))]),
        ];
        let v = shape(How::Series { points: 60 }, &t, &rows, anchor).unwrap();
        assert_eq!(v["latest"], json!(70));
        let pts = v["rows"].as_array().unwrap();
        assert_eq!(pts.len(), 60);
        assert_eq!(pts[59]["value"], json!(70));
        assert_eq!(pts[58]["value"], json!(40));
        assert_eq!(pts[0]["value"], json!(0));
        assert_eq!(pts[59]["window_end"], ws(T0 + 6 * MIN));
    }

    #[test]
    fn latest_prefers_the_newest_ended_window() {
        let spec = Spec::default_spec();
        let t = Target::find(&spec, "gifts_by_type_1m").unwrap();
        let anchor = T0 + 5 * MIN + 30_000;
        let rows = vec![
            row(&[
                ("window_start", ws(T0 + 4 * MIN)),
                ("gift_type", json!("1")),
                ("amount", json!(5)),
            ]),
            row(&[
                ("window_start", ws(T0 + 5 * MIN)),
                ("gift_type", json!("1")),
                ("amount", json!(2)),
            ]),
            row(&[
                ("window_start", ws(T0 + 4 * MIN)),
                ("gift_type", json!("2")),
                ("amount", json!(7)),
            ]),
        ];
        let how = How::Latest {
            windows: 10,
            complete: true,
        };
        let v = shape(how, &t, &rows, anchor).unwrap();
        assert_eq!(v["window_start"], ws(T0 + 4 * MIN));
        assert_eq!(v["complete"], json!(true));
        assert_eq!(v["rows"].as_array().unwrap().len(), 2);
        let how = How::Latest {
            windows: 10,
            complete: false,
        };
        let v = shape(how, &t, &rows, anchor).unwrap();
        assert_eq!(v["window_start"], ws(T0 + 5 * MIN));
        assert_eq!(v["complete"], json!(false));
        // Only the current (open) window: shown, marked so.
        let v = shape(
            How::Latest {
                windows: 10,
                complete: true,
            },
            &t,
            &rows[1..2],
            anchor,
        )
        .unwrap();
        assert_eq!(v["window_start"], ws(T0 + 5 * MIN));
        let v = shape(
            How::Latest {
                windows: 10,
                complete: true,
            },
            &t,
            &[],
            anchor,
        )
        .unwrap();
        assert!(v["window_start"].is_null());
    }

    #[test]
    fn online_users_take_each_rooms_newest_level() {
        let spec = Spec::default_spec();
        let t = Target::find(&spec, "online_users_1m").unwrap();
        let rows = vec![
            row(&[
                ("window_start", ws(T0)),
                ("room_id", json!("r1")),
                ("online", json!(3)),
            ]),
            row(&[
                ("window_start", ws(T0 + MIN)),
                ("room_id", json!("r1")),
                ("online", json!(1)),
            ]),
            row(&[
                ("window_start", ws(T0)),
                ("room_id", json!("r2")),
                ("online", json!(4)),
            ]),
        ];
        let v = shape(How::PerGroup { windows: 60 }, &t, &rows, T0 + 2 * MIN).unwrap();
        assert_eq!(v["total"], json!(5));
        let got: Vec<(Value, Value)> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["room_id"].clone(), r["online"].clone()))
            .collect();
        assert_eq!(got, vec![(json!("r2"), json!(4)), (json!("r1"), json!(1))]);
    }

    #[test]
    fn pool_panels_sum_counts_over_windows_and_keep_the_largest() {
        let spec = Spec::default_spec();
        let t = Target::find(&spec, "pool_consumption_1m").unwrap();
        let r = |w: i64, v: &str, plays: i64| {
            row(&[
                ("window_start", ws(w)),
                ("pool", json!("p")),
                ("video_id", json!(v)),
                ("plays", json!(plays)),
                ("likes", json!(1)),
                ("comments", json!(0)),
                ("shares", json!(0)),
            ])
        };
        let rows = vec![
            r(T0, "a", 2),
            r(T0 + MIN, "a", 2),
            r(T0, "b", 3),
            r(T0, "c", 1),
        ];
        let v = shape(How::SumTop { windows: 5, n: 2 }, &t, &rows, T0 + MIN).unwrap();
        let got = v["rows"].as_array().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (
                got[0]["video_id"].clone(),
                got[0]["plays"].clone(),
                got[0]["likes"].clone()
            ),
            (json!("a"), json!(4), json!(2))
        );
        assert_eq!(got[1]["video_id"], json!("b"));
    }

    #[test]
    fn boards_read_the_window_holding_now() {
        let spec = Spec::default_spec();
        let t = Target::find(&spec, "user_gifts_daily").unwrap();
        assert_eq!(
            panel_range(How::Board { n: 10 }, 86_400_000, 86_400_000, T0),
            (T0, T0 + 1, Some(10))
        );
        let rows = vec![row(&[
            ("window_start", json!("2021-08-16T00:00:00Z")),
            ("rank", json!(1)),
            ("user_id", json!("u1")),
            ("amount", json!(9)),
        ])];
        let v = shape(How::Board { n: 10 }, &t, &rows, T0).unwrap();
        assert_eq!(v["rows"], json!([{"rank": 1, "member": "u1", "score": 9}]));
        assert_eq!(v["window_start"], json!("2021-08-16T00:00:00Z"));
    }

    #[test]
    fn today_starts_at_midnight_in_the_day_zone_and_trends_by_minute() {
        let spec = Spec::default_spec();
        let t = Target::find(&spec, "gifts_by_type_1m").unwrap();
        let cn = Some(zone::parse_zone("Asia/Shanghai").unwrap());
        // 00:02:30 China time on the 16th: today began 2.5 minutes ago.
        let anchor = 1_629_043_200_000 + 2 * MIN + 30_000;
        assert_eq!(day_start(cn, anchor), 1_629_043_200_000);
        assert_eq!(day_start(None, anchor), 1_628_985_600_000);
        let totals = vec![
            row(&[
                ("window_start", json!("2021-08-15T16:00:00Z")),
                ("window_end", json!("2021-08-15T16:02:30Z")),
                ("gift_type", json!("1")),
                ("amount", json!(30)),
                ("gifts", json!(3)),
                ("givers", json!(2)),
            ]),
            row(&[
                ("window_start", json!("2021-08-15T16:00:00Z")),
                ("window_end", json!("2021-08-15T16:02:30Z")),
                ("gift_type", json!("2")),
                ("amount", json!(12)),
                ("gifts", json!(1)),
                ("givers", json!(1)),
            ]),
        ];
        let minutes = vec![
            row(&[
                ("window_start", ws(1_629_043_200_000)),
                ("gift_type", json!("1")),
                ("amount", json!(20)),
            ]),
            row(&[
                ("window_start", ws(1_629_043_200_000)),
                ("gift_type", json!("2")),
                ("amount", json!(12)),
            ]),
            row(&[
                ("window_start", ws(1_629_043_200_000 + 2 * MIN)),
                ("gift_type", json!("1")),
                ("amount", json!(10)),
            ]),
        ];
        let v = shape_today(&t, &totals, &minutes, 60, cn, anchor).unwrap();
        assert_eq!(v["day"], json!("2021-08-16"));
        assert_eq!(v["zone"], json!("Asia/Shanghai"));
        assert_eq!(v["window_start"], json!("2021-08-15T16:00:00Z"));
        assert_eq!(v["total"], json!(42));
        assert_eq!(v["rows"].as_array().unwrap().len(), 2);
        // Only today's minutes, none from yesterday: 00:00, 00:01, 00:02.
        let trend: Vec<i64> = v["trend"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].as_i64().unwrap())
            .collect();
        assert_eq!(trend, vec![32, 0, 10]);
        assert_eq!(
            trend_from(&t, MIN, 60, day_start(cn, anchor), anchor),
            1_629_043_200_000
        );
        // Later in the day the trend is the last hour.
        let noon = 1_629_043_200_000 + 12 * 60 * MIN;
        assert_eq!(
            trend_from(&t, MIN, 60, day_start(cn, noon), noon),
            noon - 59 * MIN
        );
    }

    #[test]
    fn a_day_zone_must_split_no_window_of_a_today_panel() {
        let spec = Spec::default_spec();
        check_day_zone(&spec, None).unwrap();
        check_day_zone(&spec, Some(zone::parse_zone("Asia/Shanghai").unwrap())).unwrap();
        // UTC+05:30: its midnight falls inside top_gifters_1h's UTC hours.
        let e = check_day_zone(&spec, Some(zone::parse_zone("Asia/Kolkata").unwrap())).unwrap_err();
        assert!(e.contains("top_gifters") && e.contains("+05:30"), "{e}");
    }

    #[test]
    fn a_board_in_china_time_shows_the_china_day() {
        let spec = Spec::default_spec();
        let mut b = spec.leaderboard("user_gifts_daily").unwrap().clone();
        b.zone = Some(zone::parse_zone("Asia/Shanghai").unwrap());
        let t = Target::Board(&b);
        // 2021-08-16T17:00:00Z is 01:00 on the 17th in China.
        let anchor = 1_629_133_200_000;
        let v = shape(How::Board { n: 10 }, &t, &[], anchor).unwrap();
        assert_eq!(v["day"], json!("2021-08-17"));
        assert_eq!(v["window_start"], json!("2021-08-16T16:00:00Z"));
        assert_eq!(v["window_end"], json!("2021-08-17T16:00:00Z"));
    }
}
