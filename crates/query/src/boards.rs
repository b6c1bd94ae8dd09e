//! Where the leaderboards live in Redis: one sorted set per window,
//! `<prefix><key>:{<YYYY-MM-DD>}` (the seed's `rankings`, per day), with a
//! hash `…:parts` of per-partition partials beside it
//! (`vidpulse_aggregator::leaderboard` writes them). Names only: shared by
//! the writer and every reader.

use chrono::{DateTime, NaiveDate, Utc};

use crate::spec::Leaderboard;

const DAY_MS: i64 = 86_400_000;

/// The window part of a key: the date for day-multiple windows, else RFC 3339.
pub fn window_stamp(b: &Leaderboard, w: i64) -> String {
    let d = DateTime::<Utc>::from_timestamp_millis(w).unwrap_or_default();
    if b.window_ms % DAY_MS == 0 {
        d.format("%Y-%m-%d").to_string()
    } else {
        d.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }
}

/// The sorted set of window `w`; with `None`, the common stem of every
/// window's key (for scanning).
pub fn board_key(prefix: &str, b: &Leaderboard, w: Option<i64>) -> String {
    match w {
        Some(w) => format!("{prefix}{}:{{{}}}", b.key, window_stamp(b, w)),
        None => format!("{prefix}{}:{{", b.key),
    }
}

/// The hash of per-partition partials next to a window's sorted set.
pub fn parts_key(set_key: &str) -> String {
    format!("{set_key}:parts")
}

/// The window start of a sorted-set key of this leaderboard, if it is one.
pub fn parse_window_stamp(prefix: &str, b: &Leaderboard, key: &str) -> Option<i64> {
    let stamp = key
        .strip_prefix(&board_key(prefix, b, None))?
        .strip_suffix('}')?;
    if let Ok(d) = NaiveDate::parse_from_str(stamp, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc().timestamp_millis());
    }
    DateTime::parse_from_rfc3339(stamp)
        .ok()
        .map(|d| d.timestamp_millis())
}
