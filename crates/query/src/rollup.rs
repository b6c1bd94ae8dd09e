//! Rollups (`vidpulse query <metric> --rollup [1h|1d]`, the API's
//! `rollup=`): the windows of a range folded into one row per group — over
//! the whole range, or per hour or day bucket — exactly. Counts and sums
//! are summed over windows and partitions, distinct counts are the size of
//! the union of the stored value sets (never a sum of per-window counts),
//! mins and maxes are taken over the range, a top-N is ranked on the totals,
//! a level is its value at the end of the bucket, and a hopping metric rolls
//! up its panes (each event once). The SQL is in [`crate::sql`]; this file
//! holds the choices and checks, pure and tested without servers.
//!
//! A bucket must hold whole windows, or a window would be split between two
//! buckets and the result would not be exact: such a request is refused
//! with the reason (`--rollup 1h: ... windows are 1day long`).

use crate::read::{QueryError, Target};
use crate::spec::Window;
use crate::zone::{self, Zone};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// How windows are folded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rollup {
    /// One row per group over the whole range.
    All,
    /// One row per group and hour.
    Hour,
    /// One row per group and day (00:00 to 00:00 in the zone).
    Day,
}

impl Rollup {
    /// `""` or `all` (the whole range), `1h`, `1d`.
    pub fn parse(s: &str) -> Result<Rollup, String> {
        match s.trim() {
            "" | "all" => Ok(Rollup::All),
            "1h" | "hour" => Ok(Rollup::Hour),
            "1d" | "day" => Ok(Rollup::Day),
            other => Err(format!(
                "{other:?} is not a rollup; give no value (one row per group over the whole range), 1h or 1d"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rollup::All => "all",
            Rollup::Hour => "1h",
            Rollup::Day => "1d",
        }
    }

    fn bucket_ms(self) -> Option<i64> {
        match self {
            Rollup::All => None,
            Rollup::Hour => Some(HOUR_MS),
            Rollup::Day => Some(DAY_MS),
        }
    }
}

/// The pane (the stored unit: a tumbling window or a hopping window's
/// slide) of a target, if it has windows.
pub fn pane_of(target: &Target<'_>) -> Option<Window> {
    match target {
        Target::Metric(m) => Some(Window {
            size_ms: m.window.pane_ms(),
            slide_ms: m.window.pane_ms(),
            zone: m.window.zone,
        }),
        Target::Board(b) => Some(b.window()),
        Target::Log(_) => None,
    }
}

/// The zone of the buckets: the one asked for, else the target's own (a
/// daily window in a zone), else UTC (`None`).
pub fn bucket_zone(target: &Target<'_>, asked: Option<Zone>) -> Option<Zone> {
    asked
        .filter(|z| !zone::is_utc(*z))
        .or_else(|| pane_of(target).and_then(|w| w.zone))
}

/// Instants at which a zone's offset is checked against the window length:
/// the range's ends and a winter and a summer day (both sides of daylight
/// saving time).
fn probes(from_ms: Option<i64>, to_ms: Option<i64>) -> Vec<i64> {
    let mut v = vec![1_610_668_800_000, 1_626_307_200_000]; // 2021-01-15, 2021-07-15
    v.extend(from_ms);
    v.extend(to_ms);
    v
}

fn offset_text(ms: i64) -> String {
    let m = ms.abs() / 60_000;
    format!(
        "{}{:02}:{:02}",
        if ms < 0 { '-' } else { '+' },
        m / 60,
        m % 60
    )
}

/// Refuses a rollup that could not be exact for `target`: a log, a bucket
/// finer than the windows or not made of whole windows, a zone whose UTC
/// offset splits the windows. `asked_zone` is the zone given by the caller.
pub fn check(
    target: &Target<'_>,
    rollup: Rollup,
    asked_zone: Option<Zone>,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
) -> Result<(), QueryError> {
    let name = target.name();
    let Some(pane) = pane_of(target) else {
        return Err(QueryError::Usage(format!(
            "--rollup: {name} is a log (one row per event), it has no windows to roll up"
        )));
    };
    let Some(bucket) = rollup.bucket_ms() else {
        // The whole range: windows are taken whole when they start in it.
        return Ok(());
    };
    let r = rollup.name();
    if let Some(own) = pane.zone {
        if rollup == Rollup::Hour {
            return Err(QueryError::Usage(format!(
                "--rollup 1h: {name}'s windows are days in {}; a bucket must hold whole windows, so use --rollup 1d or no value",
                own.name()
            )));
        }
        if let Some(z) = asked_zone.filter(|z| *z != own) {
            return Err(QueryError::Usage(format!(
                "--zone {}: {name}'s days start at 00:00 in {}; days in another zone would split them (leave out --zone)",
                z.name(),
                own.name()
            )));
        }
        return Ok(());
    }
    if bucket % pane.size_ms != 0 {
        return Err(QueryError::Usage(format!(
            "--rollup {r}: {name}'s windows are {} long, which does not divide {}; use a coarser rollup or no value",
            crate::spec::fmt_ms(pane.size_ms),
            crate::spec::fmt_ms(bucket)
        )));
    }
    if let Some(z) = bucket_zone(target, asked_zone) {
        for t in probes(from_ms, to_ms) {
            let off = zone::offset_ms(z, t);
            if off % pane.size_ms != 0 {
                return Err(QueryError::Usage(format!(
                    "--zone {}: its UTC offset {} splits {name}'s {} windows (they are aligned to UTC), so {r} buckets there cannot be summed from them exactly",
                    z.name(),
                    offset_text(off),
                    crate::spec::fmt_ms(pane.size_ms)
                )));
            }
        }
    }
    Ok(())
}

/// Start of the bucket holding `t` (epoch ms; `All`: 0).
pub fn bucket_start(rollup: Rollup, z: Option<Zone>, t: i64) -> i64 {
    match (rollup, z) {
        (Rollup::All, _) => 0,
        (Rollup::Hour, None) => t - t.rem_euclid(HOUR_MS),
        (Rollup::Hour, Some(z)) => t - (t + zone::offset_ms(z, t)).rem_euclid(HOUR_MS),
        (Rollup::Day, None) => t - t.rem_euclid(DAY_MS),
        (Rollup::Day, Some(z)) => zone::start_of_day(z, t),
    }
}

/// End (exclusive) of the bucket starting at `start` (not for `All`).
pub fn bucket_end(rollup: Rollup, z: Option<Zone>, start: i64) -> i64 {
    match (rollup, z) {
        (Rollup::Day, Some(z)) => zone::next_day(z, start),
        (Rollup::Day, None) => start + DAY_MS,
        _ => start + HOUR_MS,
    }
}

/// The ClickHouse expression (UInt32 seconds) of the bucket of a DateTime
/// expression: the same instants as [`bucket_start`].
pub fn bucket_sql(rollup: Rollup, z: Option<Zone>, datetime: &str) -> String {
    let tz = crate::clickhouse::literal(z.map_or("UTC", |z| z.name()));
    match rollup {
        Rollup::All => "toUInt32(0)".to_owned(),
        Rollup::Hour => format!("toUInt32(toStartOfHour({datetime}, {tz}))"),
        Rollup::Day => format!("toUInt32(toStartOfDay({datetime}, {tz}))"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::Spec;
    use crate::zone::parse_zone;

    #[test]
    fn values_parse_and_bad_ones_say_what_is_accepted() {
        assert_eq!(Rollup::parse("").unwrap(), Rollup::All);
        assert_eq!(Rollup::parse("all").unwrap(), Rollup::All);
        assert_eq!(Rollup::parse("1h").unwrap(), Rollup::Hour);
        assert_eq!(Rollup::parse("1d").unwrap(), Rollup::Day);
        let e = Rollup::parse("2h").unwrap_err();
        assert!(
            e.contains("\"2h\" is not a rollup") && e.contains("1h or 1d"),
            "{e}"
        );
    }

    #[test]
    fn only_exact_rollups_are_accepted() {
        let spec = Spec::default_spec();
        let t = |n| Target::find(&spec, n).unwrap();
        let cn = Some(parse_zone("Asia/Shanghai").unwrap());
        let india = Some(parse_zone("Asia/Kolkata").unwrap());
        for (name, r, z) in [
            ("gifts_by_type_1m", Rollup::All, None),
            ("gifts_by_type_1m", Rollup::Day, cn),
            ("gifts_by_type_1m", Rollup::Day, india),
            ("top_gifters_1h", Rollup::Day, cn),
            ("top_gifters_1h", Rollup::Hour, None),
            ("gifts_6h", Rollup::Hour, None),
            ("online_users_1m", Rollup::Day, None),
            ("user_gifts_daily", Rollup::Day, None),
            ("user_gifts_daily", Rollup::All, cn),
        ] {
            check(&t(name), r, z, None, None).unwrap_or_else(|e| panic!("{name} {r:?}: {e}"));
        }
        let e = check(&t("live_viewer_log"), Rollup::All, None, None, None).unwrap_err();
        assert!(e.to_string().contains("is a log"), "{e}");
        let e = check(&t("user_gifts_daily"), Rollup::Hour, None, None, None).unwrap_err();
        assert!(e.to_string().contains("does not divide 1h"), "{e}");
        // India is UTC+05:30: its days split the UTC hours.
        let e = check(&t("top_gifters_1h"), Rollup::Day, india, None, None).unwrap_err();
        assert!(
            e.to_string().contains("--zone Asia/Kolkata") && e.to_string().contains("+05:30"),
            "{e}"
        );
        // A daily board in China time: its days, not UTC's.
        let mut b = spec.leaderboard("user_gifts_daily").unwrap().clone();
        b.zone = cn;
        let tb = Target::Board(&b);
        assert_eq!(bucket_zone(&tb, None), cn);
        check(&tb, Rollup::Day, None, None, None).unwrap();
        let e = check(
            &tb,
            Rollup::Day,
            Some(parse_zone("Europe/Berlin").unwrap()),
            None,
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("days start at 00:00 in Asia/Shanghai"),
            "{e}"
        );
        assert!(check(&tb, Rollup::Hour, None, None, None).is_err());
    }

    #[test]
    fn buckets_start_at_local_hours_and_days() {
        let t = 1_629_075_600_000 + 45 * 60_000; // 2021-08-16T01:45:00Z
        let cn = Some(parse_zone("Asia/Shanghai").unwrap());
        let india = Some(parse_zone("Asia/Kolkata").unwrap());
        assert_eq!(bucket_start(Rollup::Hour, None, t), 1_629_075_600_000);
        // 07:15 in India: the local hour began at 01:30 UTC.
        assert_eq!(bucket_start(Rollup::Hour, india, t), 1_629_077_400_000);
        assert_eq!(bucket_start(Rollup::Day, None, t), 1_629_072_000_000);
        let d = bucket_start(Rollup::Day, cn, t);
        assert_eq!(d, 1_629_043_200_000); // 2021-08-15T16:00:00Z
        assert_eq!(bucket_end(Rollup::Day, cn, d), d + DAY_MS);
        assert_eq!(
            bucket_sql(Rollup::Day, cn, "window_start"),
            "toUInt32(toStartOfDay(window_start, 'Asia/Shanghai'))"
        );
        assert_eq!(bucket_sql(Rollup::All, None, "x"), "toUInt32(0)");
    }
}
