//! Request parameters, validated once into typed requests: time ranges,
//! limits and column filters. Every refusal says which parameter and why.
//! Pure functions, tested without servers.
//!
//! Filter values reach SQL only through the aggregator's query builder,
//! which accepts only known group-by columns as names and turns values into
//! escaped string literals or re-formatted integers; on top of that, values
//! here are short and free of control characters.

use std::collections::BTreeSet;

use vidpulse_query::read::{self as query, Target};
use vidpulse_query::rollup::{self, Rollup};
use vidpulse_query::spec::Spec;
use vidpulse_query::zone::{self, Zone};

use crate::{ApiError, Limits};

/// Longest filter value accepted (bytes).
pub const MAX_FILTER_VALUE: usize = 256;
/// Most filters in one request.
pub const MAX_FILTERS: usize = 16;

/// Parameters of `/api/metrics/{metric}` other than column filters.
pub const RESERVED: [&str; 5] = ["from", "to", "limit", "rollup", "zone"];

/// A validated `/api/metrics/{metric}` request.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRequest {
    /// Windows starting at or after this time (logs: events at or after).
    pub from_ms: i64,
    /// Windows starting before this time.
    pub to_ms: i64,
    /// Most rows answered.
    pub limit: usize,
    /// Whether the asked `limit` was above the cap.
    pub limit_capped: bool,
    /// `column = value` conditions.
    pub wheres: Vec<(String, String)>,
    /// `rollup=` (empty or `all`, `1h`, `1d`): fold the windows.
    pub rollup: Option<Rollup>,
    /// `zone=`: buckets and `from`/`to` without an offset in this zone.
    pub zone: Option<Zone>,
}

/// A validated `/api/rankings/{board}` request.
#[derive(Clone, Debug, PartialEq)]
pub struct RankingRequest {
    /// A time inside the wanted window (default now).
    pub at_ms: i64,
    pub limit: usize,
    pub limit_capped: bool,
}

fn single<'a>(params: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut found = params.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
    let first = found.next();
    if found.next().is_some() {
        return Err(ApiError::BadRequest(format!(
            "parameter `{name}` given more than once"
        )));
    }
    Ok(first.map(String::as_str))
}

fn time(
    params: &[(String, String)],
    name: &str,
    zone: Option<Zone>,
) -> Result<Option<i64>, ApiError> {
    single(params, name)?
        .map(|s| {
            query::parse_time_in(s, zone)
                .map_err(|e| ApiError::BadRequest(format!("`{name}`: {e}")))
        })
        .transpose()
}

fn zone_param(params: &[(String, String)]) -> Result<Option<Zone>, ApiError> {
    single(params, "zone")?
        .map(|s| zone::parse_zone(s).map_err(|e| ApiError::BadRequest(format!("`zone`: {e}"))))
        .transpose()
}

/// `(limit, capped)`.
fn limit(
    params: &[(String, String)],
    default: usize,
    max: usize,
) -> Result<(usize, bool), ApiError> {
    match single(params, "limit")? {
        None => Ok((default, false)),
        Some(s) => {
            let n: u64 = s.trim().parse().map_err(|_| {
                ApiError::BadRequest(format!(
                    "`limit`: {s:?} is not a whole number; use 1 to {max}"
                ))
            })?;
            if n == 0 {
                return Err(ApiError::BadRequest(format!(
                    "`limit` must be at least 1 (at most {max})"
                )));
            }
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            Ok((n.min(max), n > max))
        }
    }
}

/// A duration for people: whole seconds once it is a second or more.
fn span(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    let d = if ms >= 1000 {
        std::time::Duration::from_secs(ms / 1000)
    } else {
        std::time::Duration::from_millis(ms)
    };
    humantime::format_duration(d).to_string()
}

/// Columns a target can be filtered on.
pub fn filterable(target: &Target<'_>) -> Vec<String> {
    match target {
        Target::Metric(m) => m.group_by.iter().map(|g| g.name.clone()).collect(),
        Target::Log(l) => {
            let mut v = vec!["event_id".to_owned(), "kind".to_owned()];
            v.extend(l.columns.iter().map(|c| c.name.clone()));
            v
        }
        Target::Board(b) => vec![b.member.name.clone()],
    }
}

/// Every metric, log and leaderboard name of the spec.
pub fn names(spec: &Spec) -> Vec<String> {
    let mut v: Vec<String> = spec.metrics.iter().map(|m| m.name.clone()).collect();
    v.extend(spec.logs.iter().map(|l| l.name.clone()));
    v.extend(spec.leaderboards.iter().map(|l| l.name.clone()));
    v
}

/// Finds a metric, log or leaderboard, or a 404 that lists them.
pub fn target<'a>(spec: &'a Spec, name: &str) -> Result<Target<'a>, ApiError> {
    Target::find(spec, name).ok_or_else(|| {
        let names = names(spec);
        ApiError::NotFound {
            message: format!(
                "no metric {name:?}; the spec has: {} (GET /api/metrics lists them with their columns)",
                names.join(", ")
            ),
            key: "metrics",
            names,
        }
    })
}

/// Validates the parameters of `/api/metrics/{metric}`.
pub fn metric_request(
    params: &[(String, String)],
    target: &Target<'_>,
    now_ms: i64,
    limits: &Limits,
) -> Result<MetricRequest, ApiError> {
    let zone = zone_param(params)?;
    let rollup = single(params, "rollup")?
        .map(|s| Rollup::parse(s).map_err(|e| ApiError::BadRequest(format!("`rollup`: {e}"))))
        .transpose()?;
    let from = time(params, "from", zone)?;
    let to = time(params, "to", zone)?;
    let (to_ms, from_ms) = match (from, to) {
        (Some(f), Some(t)) => (t, f),
        (Some(f), None) => (now_ms, f),
        (None, Some(t)) => (t, t.saturating_sub(limits.default_range_ms)),
        (None, None) => (now_ms, now_ms.saturating_sub(limits.default_range_ms)),
    };
    let stamp = |t: i64| query::rfc3339(t, true);
    if from_ms >= to_ms {
        return Err(ApiError::BadRequest(format!(
            "empty time range: `from` ({}) must be before `to` ({}){}",
            stamp(from_ms),
            stamp(to_ms),
            if to.is_none() {
                ", which defaults to now"
            } else {
                ""
            }
        )));
    }
    if to_ms - from_ms > limits.max_range_ms {
        return Err(ApiError::BadRequest(format!(
            "time range too long: `from` {} to `to` {}{} spans {}; one request may span at most {} (--max-range), so narrow `from`/`to` and page through the rest",
            stamp(from_ms),
            stamp(to_ms),
            if to.is_none() { " (now)" } else { "" },
            span(to_ms - from_ms),
            span(limits.max_range_ms)
        )));
    }
    let (limit, limit_capped) = limit(params, limits.default_rows, limits.max_rows)?;
    let columns = filterable(target);
    let mut wheres = Vec::new();
    let mut seen = BTreeSet::new();
    for (k, v) in params {
        if RESERVED.contains(&k.as_str()) {
            continue;
        }
        if !columns.iter().any(|c| c == k) {
            return Err(ApiError::BadRequest(format!(
                "unknown parameter `{k}` for {}: filter on {}, or use {}",
                target.name(),
                if columns.is_empty() {
                    "nothing (it has no group-by columns)".to_owned()
                } else {
                    columns.join(", ")
                },
                RESERVED.join(", ")
            )));
        }
        if !seen.insert(k.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "filter `{k}` given more than once; a row has one value per column"
            )));
        }
        if v.len() > MAX_FILTER_VALUE {
            return Err(ApiError::BadRequest(format!(
                "filter `{k}`: value is {} bytes; at most {MAX_FILTER_VALUE}",
                v.len()
            )));
        }
        if v.chars().any(char::is_control) {
            return Err(ApiError::BadRequest(format!(
                "filter `{k}`: value has control characters"
            )));
        }
        wheres.push((k.clone(), v.clone()));
    }
    if wheres.len() > MAX_FILTERS {
        return Err(ApiError::BadRequest(format!(
            "{} filters; at most {MAX_FILTERS}",
            wheres.len()
        )));
    }
    if let Some(r) = rollup {
        rollup::check(target, r, zone, Some(from_ms), Some(to_ms)).map_err(|e| {
            ApiError::BadRequest(
                e.to_string()
                    .replace("--rollup", "`rollup`")
                    .replace("--zone", "`zone`"),
            )
        })?;
    }
    Ok(MetricRequest {
        from_ms,
        to_ms,
        limit,
        limit_capped,
        wheres,
        rollup,
        zone,
    })
}

/// Validates the parameters of `/api/rankings/{board}`.
pub fn ranking_request(
    params: &[(String, String)],
    now_ms: i64,
    limits: &Limits,
) -> Result<RankingRequest, ApiError> {
    if let Some((k, _)) = params.iter().find(|(k, _)| k != "limit" && k != "at") {
        return Err(ApiError::BadRequest(format!(
            "unknown parameter `{k}`; use `limit` (1 to {}) and `at` (a time inside the wanted window, default now)",
            limits.max_ranking
        )));
    }
    let at_ms = time(params, "at", None)?.unwrap_or(now_ms);
    let (limit, limit_capped) = limit(params, limits.default_ranking, limits.max_ranking)?;
    Ok(RankingRequest {
        at_ms,
        limit,
        limit_capped,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: i64 = 1_629_075_600_000; // 2021-08-16T01:00:00Z

    fn limits() -> Limits {
        Limits {
            default_rows: 100,
            max_rows: 1000,
            default_range_ms: 3_600_000,
            max_range_ms: 7 * 86_400_000,
            default_ranking: 10,
            max_ranking: 100,
        }
    }

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn err(r: Result<MetricRequest, ApiError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{e}");
        e.to_string()
    }

    #[test]
    fn defaults_are_the_last_hour_and_the_default_rows() {
        let spec = Spec::default_spec();
        let t = target(&spec, "gifts_by_type_1m").unwrap();
        let r = metric_request(&[], &t, NOW, &limits()).unwrap();
        assert_eq!((r.from_ms, r.to_ms), (NOW - 3_600_000, NOW));
        assert_eq!((r.limit, r.limit_capped), (100, false));
        let r = metric_request(&p(&[("to", "2021-08-16T00:30:00Z")]), &t, NOW, &limits()).unwrap();
        assert_eq!(r.to_ms, NOW - 1_800_000);
        assert_eq!(r.from_ms, NOW - 5_400_000);
    }

    #[test]
    fn bad_ranges_say_why() {
        let spec = Spec::default_spec();
        let t = target(&spec, "gifts_by_type_1m").unwrap();
        let e = err(metric_request(
            &p(&[("from", "yesterday")]),
            &t,
            NOW,
            &limits(),
        ));
        assert!(e.contains("`from`") && e.contains("not a time"), "{e}");
        let e = err(metric_request(
            &p(&[
                ("from", "2021-08-16T02:00:00Z"),
                ("to", "2021-08-16T01:00:00Z"),
            ]),
            &t,
            NOW,
            &limits(),
        ));
        assert!(e.contains("must be before"), "{e}");
        let e = err(metric_request(
            &p(&[("from", "2021-08-01"), ("to", "2021-08-16")]),
            &t,
            NOW,
            &limits(),
        ));
        assert!(
            e.contains("too long") && e.contains("15days") && e.contains("7days"),
            "{e}"
        );
        let e = err(metric_request(
            &p(&[("from", "2021-08-16T01:00:00Z")]),
            &t,
            NOW,
            &limits(),
        ));
        assert!(e.contains("defaults to now"), "{e}");
        let e = err(metric_request(
            &p(&[("from", "1"), ("from", "2")]),
            &t,
            NOW,
            &limits(),
        ));
        assert!(e.contains("more than once"), "{e}");
    }

    #[test]
    fn limits_are_capped_and_checked() {
        let spec = Spec::default_spec();
        let t = target(&spec, "gifts_by_type_1m").unwrap();
        let r = metric_request(&p(&[("limit", "99999999999")]), &t, NOW, &limits()).unwrap();
        assert_eq!((r.limit, r.limit_capped), (1000, true));
        assert!(
            err(metric_request(&p(&[("limit", "0")]), &t, NOW, &limits())).contains("at least 1")
        );
        assert!(
            err(metric_request(&p(&[("limit", "ten")]), &t, NOW, &limits()))
                .contains("not a whole number")
        );
    }

    #[test]
    fn filters_must_name_columns() {
        let spec = Spec::default_spec();
        let t = target(&spec, "viewers_by_province_grade_1m").unwrap();
        let r = metric_request(
            &p(&[("province", "浙'江"), ("grade", "3")]),
            &t,
            NOW,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.wheres.len(), 2);
        let e = err(metric_request(&p(&[("colour", "red")]), &t, NOW, &limits()));
        assert!(e.contains("filter on province, grade"), "{e}");
        let e = err(metric_request(
            &p(&[("province", "a\nb")]),
            &t,
            NOW,
            &limits(),
        ));
        assert!(e.contains("control"), "{e}");
        let long = "x".repeat(MAX_FILTER_VALUE + 1);
        assert!(
            err(metric_request(
                &p(&[("province", &long)]),
                &t,
                NOW,
                &limits()
            ))
            .contains("bytes")
        );
        let t = target(&spec, "gifts_6h").unwrap();
        let e = err(metric_request(&p(&[("grade", "1")]), &t, NOW, &limits()));
        assert!(e.contains("no group-by columns"), "{e}");
    }

    #[test]
    fn rollups_and_zones_are_checked() {
        let spec = Spec::default_spec();
        let t = target(&spec, "gifts_by_type_1m").unwrap();
        let r = metric_request(
            &p(&[
                ("rollup", ""),
                ("from", "2021-08-16"),
                ("zone", "Asia/Shanghai"),
            ]),
            &t,
            NOW,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.rollup, Some(Rollup::All));
        // The day in China time: 2021-08-15T16:00:00Z.
        assert_eq!(r.from_ms, NOW - 9 * 3_600_000);
        let r = metric_request(&p(&[("rollup", "1d")]), &t, NOW, &limits()).unwrap();
        assert_eq!(r.rollup, Some(Rollup::Day));
        let e = err(metric_request(&p(&[("rollup", "2h")]), &t, NOW, &limits()));
        assert!(e.contains("`rollup`") && e.contains("1h or 1d"), "{e}");
        let e = err(metric_request(
            &p(&[("zone", "Mars/Base")]),
            &t,
            NOW,
            &limits(),
        ));
        assert!(e.contains("`zone`") && e.contains("IANA"), "{e}");
        let board = target(&spec, "user_gifts_daily").unwrap();
        let e = err(metric_request(
            &p(&[("rollup", "1h")]),
            &board,
            NOW,
            &limits(),
        ));
        assert!(
            e.contains("`rollup` 1h") && e.contains("does not divide"),
            "{e}"
        );
        let log = target(&spec, "live_viewer_log").unwrap();
        assert!(
            err(metric_request(&p(&[("rollup", "")]), &log, NOW, &limits())).contains("is a log")
        );
    }

    #[test]
    fn unknown_metrics_list_the_spec() {
        let spec = Spec::default_spec();
        let e = target(&spec, "nope").unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::NOT_FOUND);
        let names = e.body()["metrics"].as_array().unwrap().clone();
        assert!(names.iter().any(|n| n == "gifts_6h"));
        assert!(names.iter().any(|n| n == "user_gifts_daily"));
    }

    #[test]
    fn rankings_take_limit_and_at_only() {
        let r = ranking_request(&[], NOW, &limits()).unwrap();
        assert_eq!((r.at_ms, r.limit), (NOW, 10));
        let r = ranking_request(
            &p(&[("limit", "500"), ("at", "2021-08-15")]),
            NOW,
            &limits(),
        )
        .unwrap();
        assert_eq!((r.limit, r.limit_capped), (100, true));
        assert_eq!(r.at_ms, NOW - 90_000_000);
        let e = ranking_request(&p(&[("top", "5")]), NOW, &limits()).unwrap_err();
        assert!(e.to_string().contains("unknown parameter `top`"));
    }
}
