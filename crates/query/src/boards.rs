//! Where the leaderboards live in Redis: one sorted set per window,
//! `<prefix><key>:{<YYYY-MM-DD>}` (the seed's `rankings`, per day; a day in
//! a zone is stamped with its local date), with a
//! hash `…:parts` of per-partition partials beside it
//! (`vidpulse_aggregator::leaderboard` writes them). Names only: shared by
//! the writer and every reader.

use chrono::{DateTime, NaiveDate, Utc};

use crate::spec::Leaderboard;
use crate::zone;

const DAY_MS: i64 = 86_400_000;

/// The window part of a key: the date for day-multiple windows (the local
/// date of a day in a zone), else RFC 3339.
pub fn window_stamp(b: &Leaderboard, w: i64) -> String {
    if let Some(d) = b.zone.and_then(|z| zone::local_date(z, w)) {
        return d.format("%Y-%m-%d").to_string();
    }
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
        if let Some(z) = b.zone {
            return zone::day_start(z, d);
        }
        return d
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc().timestamp_millis());
    }
    DateTime::parse_from_rfc3339(stamp)
        .ok()
        .map(|d| d.timestamp_millis())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    #[test]
    fn a_zoned_day_is_stamped_with_its_local_date() {
        let spec = Spec::default_spec();
        let mut b = spec.leaderboard("user_gifts_daily").unwrap().clone();
        b.zone = Some(zone::parse_zone("Asia/Shanghai").unwrap());
        // 2021-08-16 23:59 and 2021-08-17 00:01 China time.
        let late = DateTime::parse_from_rfc3339("2021-08-16T23:59:00+08:00").unwrap();
        let early = DateTime::parse_from_rfc3339("2021-08-17T00:01:00+08:00").unwrap();
        let (w1, w2) = (
            b.start_of(late.timestamp_millis()),
            b.start_of(early.timestamp_millis()),
        );
        let (k1, k2) = (board_key("", &b, Some(w1)), board_key("", &b, Some(w2)));
        assert_eq!(k1, "rankings:user_gifts:{2021-08-16}");
        assert_eq!(k2, "rankings:user_gifts:{2021-08-17}");
        assert_eq!(parse_window_stamp("", &b, &k1), Some(w1));
        assert_eq!(parse_window_stamp("", &b, &k2), Some(w2));
        // In UTC both are on 2021-08-16.
        let utc = spec.leaderboard("user_gifts_daily").unwrap();
        assert_eq!(
            board_key("", utc, Some(utc.start_of(late.timestamp_millis()))),
            board_key("", utc, Some(utc.start_of(early.timestamp_millis())))
        );
    }
}
