//! The HTTP routes: the dashboard and its assets, the JSON API, the live
//! stream, and the operational endpoints. Handlers validate their input
//! (`params`), then call the aggregator's query code; errors are JSON with
//! a status that says whose fault it is (400/404 the caller's, 502/503 a
//! backend's).

use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics::{counter, histogram};
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Value, json};
use vidpulse_query::clickhouse::fetch_json;
use vidpulse_query::read::{self as query, Filters, Row, Target};

use crate::error::deadline;
use crate::live::now_ms;
use crate::metrics as m;
use crate::{ApiError, AppState, assets, params};

type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{*path}", get(asset))
        .route("/api", get(api_index))
        .route("/api/metrics", get(list_metrics))
        .route("/api/metrics/{metric}", get(get_metric))
        .route("/api/rankings", get(list_boards))
        .route("/api/rankings/{board}", get(get_ranking))
        .route("/api/live", get(live_stream))
        .route("/api/live/snapshot", get(live_snapshot))
        .route("/api/pools", get(list_pools))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route_layer(middleware::from_fn(track))
        .fallback(not_found)
        .with_state(state)
}

/// Counts and times each request by route template.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    histogram!(m::REQUEST_SECONDS, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    counter!(m::REQUESTS, "route" => route, "status" => resp.status().as_u16().to_string())
        .increment(1);
    resp
}

fn params_of(q: Params) -> Result<Vec<(String, String)>, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::BadRequest(format!("unreadable query string: {e}")))
}

/// A row serialized as a JSON object with its columns in result order.
struct OrderedRow(Row);

impl Serialize for OrderedRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct MetricAnswer {
    metric: String,
    #[serde(rename = "type")]
    kind: &'static str,
    columns: Vec<String>,
    /// `all`, `1h` or `1d` when the windows were rolled up.
    rollup: Option<&'static str>,
    zone: Option<&'static str>,
    from: String,
    to: String,
    filters: Vec<(String, String)>,
    limit: usize,
    limit_capped: bool,
    /// More rows matched than `limit`.
    truncated: bool,
    rows: Vec<OrderedRow>,
}

fn kind(t: &Target<'_>) -> &'static str {
    match t {
        Target::Metric(_) => "metric",
        Target::Log(_) => "log",
        Target::Board(_) => "leaderboard",
    }
}

fn permit(st: &AppState) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    st.permits.try_acquire().map_err(|_| {
        counter!(m::REJECTED, "reason" => "busy").increment(1);
        ApiError::Busy(format!(
            "{} queries are running (--max-concurrent-queries); retry shortly",
            st.settings.max_concurrent_queries
        ))
    })
}

async fn api_index() -> Json<Value> {
    Json(json!({
        "endpoints": {
            "GET /api/metrics": "the spec's metrics, logs and leaderboards",
            "GET /api/metrics/{metric}?from=&to=&limit=&rollup=&zone=&<column>=<value>": "final values (as `vidpulse query`); `rollup` (empty, 1h, 1d) folds the windows",
            "GET /api/rankings": "the leaderboards",
            "GET /api/rankings/{board}?limit=&at=": "a leaderboard's window holding `at` (default now)",
            "GET /api/live": "server-sent events: the dashboard snapshot, pushed on every refresh",
            "GET /api/live/snapshot": "the dashboard snapshot once, as JSON",
            "GET /api/pools": "the monitor's pools and their sizes",
        },
        "docs": "docs/api.md",
    }))
}

#[derive(Serialize)]
struct MetricList {
    metrics: Vec<OrderedRow>,
}

/// The spec's metrics, logs and leaderboards (`vidpulse query --list`),
/// each with its result columns and the columns it can be filtered on.
async fn list_metrics(State(st): State<AppState>) -> Json<MetricList> {
    let metrics = query::list(&st.spec)
        .into_iter()
        .map(|mut row| {
            let name = row
                .iter()
                .find(|(k, _)| k == "name")
                .and_then(|(_, v)| v.as_str())
                .unwrap_or_default()
                .to_owned();
            if let Some(t) = Target::find(&st.spec, &name) {
                row.push(("columns".into(), json!(t.columns())));
                row.push(("filters".into(), json!(params::filterable(&t))));
            }
            OrderedRow(row)
        })
        .collect();
    Json(MetricList { metrics })
}

async fn get_metric(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: Params,
) -> Result<Json<MetricAnswer>, ApiError> {
    let params = params_of(q)?;
    let target = params::target(&st.spec, &name)?;
    let req = params::metric_request(&params, &target, now_ms(), &st.settings.limits)?;
    let filters = Filters {
        from_ms: Some(req.from_ms),
        to_ms: Some(req.to_ms),
        wheres: req.wheres.clone(),
        // Leaderboards: at most `limit` members of each window.
        limit: matches!(target, Target::Board(_)).then_some(req.limit),
        rollup: req.rollup,
        zone: req.zone,
    };
    // ClickHouse stops the result one row past the limit (to tell
    // `truncated`), give or take a block.
    let ch = st
        .ch
        .clone()
        .with_setting("max_result_rows", (req.limit + 1).to_string())
        .with_setting("result_overflow_mode", "break");
    let _permit = permit(&st)?;
    let mut rows = deadline(
        st.settings.query_timeout,
        "the metric store",
        query::run(&ch, &st.redis, &st.tables, &target, &filters),
    )
    .await?;
    let truncated = rows.len() > req.limit;
    rows.truncate(req.limit);
    Ok(Json(MetricAnswer {
        metric: target.name().to_owned(),
        kind: kind(&target),
        columns: if req.rollup.is_some() {
            target.rollup_columns()
        } else {
            target.columns()
        },
        rollup: req.rollup.map(|r| r.name()),
        zone: req.zone.map(|z| z.name()),
        from: query::rfc3339(req.from_ms, true),
        to: query::rfc3339(req.to_ms, true),
        filters: req.wheres,
        limit: req.limit,
        limit_capped: req.limit_capped,
        truncated,
        rows: rows.into_iter().map(OrderedRow).collect(),
    }))
}

fn board_not_found(st: &AppState, name: &str) -> ApiError {
    let names: Vec<String> = st
        .spec
        .leaderboards
        .iter()
        .map(|b| b.name.clone())
        .collect();
    ApiError::NotFound {
        message: format!(
            "no leaderboard {name:?}; the spec has: {}",
            names.join(", ")
        ),
        key: "boards",
        names,
    }
}

async fn list_boards(State(st): State<AppState>) -> Json<Value> {
    let boards: Vec<Value> = st
        .spec
        .leaderboards
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "help": b.help,
                "member": b.member.name,
                "score": b.score_name,
                "window": vidpulse_query::spec::fmt_ms(b.window_ms),
                "zone": b.zone.map_or("UTC", |z| z.name()),
            })
        })
        .collect();
    Json(json!({ "boards": boards }))
}

async fn get_ranking(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: Params,
) -> Result<Json<Value>, ApiError> {
    let params = params_of(q)?;
    let b = st
        .spec
        .leaderboard(&name)
        .ok_or_else(|| board_not_found(&st, &name))?;
    let req = params::ranking_request(&params, now_ms(), &st.settings.limits)?;
    let filters = Filters {
        from_ms: Some(req.at_ms),
        to_ms: Some(req.at_ms.saturating_add(1)),
        wheres: Vec::new(),
        limit: Some(req.limit),
        ..Filters::default()
    };
    let _permit = permit(&st)?;
    let rows = deadline(
        st.settings.query_timeout,
        "Redis",
        query::run(&st.ch, &st.redis, &st.tables, &Target::Board(b), &filters),
    )
    .await?;
    let start = b.start_of(req.at_ms);
    let cell = |r: &Row, c: &str| {
        r.iter()
            .find(|(k, _)| k == c)
            .map(|(_, v)| v.clone())
            .unwrap_or(Value::Null)
    };
    let entries: Vec<Value> = rows
        .iter()
        .take(req.limit)
        .map(|r| {
            json!({
                "rank": cell(r, "rank"),
                "member": cell(r, &b.member.name),
                "score": cell(r, &b.score_name),
            })
        })
        .collect();
    Ok(Json(json!({
        "board": b.name,
        "help": b.help,
        "member": b.member.name,
        "score": b.score_name,
        "window_start": query::rfc3339(start, false),
        "window_end": query::rfc3339(b.end_of(start), false),
        "limit": req.limit,
        "limit_capped": req.limit_capped,
        "entries": entries,
    })))
}

async fn live_stream(State(st): State<AppState>) -> Result<Response, ApiError> {
    let sub = st.live.subscribe()?;
    let sse = Sse::new(crate::live::events(sub, st.shutdown.clone()))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    // Reverse proxies (nginx) must not buffer the stream.
    Ok(([("x-accel-buffering", "no")], sse).into_response())
}

async fn live_snapshot(State(st): State<AppState>) -> Response {
    let snap = st.live.fresh(st.settings.query_timeout).await;
    if snap.version == 0 {
        return ApiError::Unavailable("no snapshot could be built yet; retry shortly".into())
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        snap.json.clone(),
    )
        .into_response()
}

async fn list_pools(State(st): State<AppState>) -> Response {
    let Some(w) = &st.pools else {
        return ApiError::NotFound {
            message: "pool following is off (--pools false)".into(),
            key: "pools",
            names: Vec::new(),
        }
        .into_response();
    };
    let view = w.view();
    let status = if view.error.is_some() && view.pools.is_empty() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(view)).into_response()
}

async fn readyz(State(st): State<AppState>) -> (StatusCode, String) {
    let wait = Duration::from_secs(2).min(st.settings.query_timeout);
    let ch = deadline(wait, "ClickHouse", async {
        fetch_json(&st.ch, "SELECT 1 AS ok")
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    })
    .await;
    let redis = deadline(wait, "Redis", async {
        // On a cluster PING goes to every master: ready when all answer.
        let mut con = st
            .redis
            .connect(vidpulse_core::redis::ConnectOptions::default())
            .await
            .map_err(|e| ApiError::Unavailable(format!("redis: {e}")))?;
        redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .map_err(|e| ApiError::Unavailable(format!("redis: {e}")))
    })
    .await;
    // Readiness as the stages export it (`vidpulse_stage_ready`), as of
    // the last probe.
    let ready = ch.is_ok() && redis.is_ok();
    metrics::gauge!(vidpulse_core::metrics::STAGE_READY).set(if ready { 1.0 } else { 0.0 });
    match (ch, redis) {
        (Ok(_), Ok(_)) => (StatusCode::OK, "ready\n".into()),
        (a, b) => {
            let why: Vec<String> = [a.err(), b.err()]
                .into_iter()
                .flatten()
                .map(|e| e.to_string())
                .collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", why.join("; ")),
            )
        }
    }
}

async fn prometheus(State(st): State<AppState>) -> String {
    st.prom.run_upkeep();
    st.prom.render()
}

/// The page allows only its own scripts, styles and connections.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

async fn index() -> Response {
    let a = assets::INDEX;
    let mut r = (
        [
            (header::CONTENT_TYPE, a.content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        a.body,
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

async fn asset(Path(path): Path<String>) -> Response {
    match assets::get(&path) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.content_type),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

async fn not_found(uri: Uri) -> Response {
    counter!(m::REQUESTS, "route" => "unmatched", "status" => "404").increment(1);
    if uri.path().starts_with("/api") {
        ApiError::NotFound {
            message: format!("no route {}; see GET /api", uri.path()),
            key: "routes",
            names: [
                "/api/metrics",
                "/api/metrics/{metric}",
                "/api/rankings",
                "/api/rankings/{board}",
                "/api/live",
                "/api/live/snapshot",
                "/api/pools",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        }
        .into_response()
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}
