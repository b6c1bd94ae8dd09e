//! Days in a time zone: where a platform's day starts (00:00 local time,
//! e.g. Asia/Shanghai for seed 002's live-streaming platform), as instants.
//! Pure functions of the zone's rules (chrono-tz), correct across daylight
//! saving changes: a day is 23, 24 or 25 hours long, and a day whose
//! midnight is skipped starts at the first instant that exists.

use chrono::{DateTime, Days, Duration, NaiveDate, Offset, TimeZone, Utc};
pub use chrono_tz::Tz as Zone;

/// Parses an IANA zone name (`Asia/Shanghai`, `UTC`); the error says what
/// is accepted.
pub fn parse_zone(name: &str) -> Result<Zone, String> {
    name.trim().parse::<Zone>().map_err(|_| {
        format!(
            "unknown time zone {name:?}; use an IANA name such as Asia/Shanghai, Europe/Berlin or UTC"
        )
    })
}

/// Whether the zone is UTC (no zone needed: days align to the epoch).
pub fn is_utc(z: Zone) -> bool {
    matches!(
        z,
        Zone::UTC | Zone::Etc__UTC | Zone::Etc__UCT | Zone::Etc__Universal | Zone::Etc__Zulu
    ) || z.name() == "UTC"
}

/// The local date of instant `t` (epoch ms) in `z`.
pub fn local_date(z: Zone, t: i64) -> Option<NaiveDate> {
    DateTime::<Utc>::from_timestamp_millis(t).map(|d| d.with_timezone(&z).date_naive())
}

/// The first instant (epoch ms) of local date `d` in `z`: its midnight,
/// the earlier one when midnight repeats, or the end of the gap when the
/// clocks skip it.
pub fn day_start(z: Zone, d: NaiveDate) -> Option<i64> {
    let midnight = d.and_hms_opt(0, 0, 0)?;
    match z.from_local_datetime(&midnight) {
        chrono::LocalResult::Single(t) => Some(t.timestamp_millis()),
        chrono::LocalResult::Ambiguous(a, _) => Some(a.timestamp_millis()),
        chrono::LocalResult::None => {
            // Skipped midnight: the day starts when the clocks jump, i.e.
            // at midnight read with the offset in force just before.
            let before = z
                .from_local_datetime(&(midnight - Duration::hours(6)))
                .earliest()?;
            let offset = before.offset().fix().local_minus_utc();
            Some((midnight.and_utc().timestamp() - i64::from(offset)) * 1000)
        }
    }
}

/// Start (epoch ms) of the day in `z` holding instant `t`.
pub fn start_of_day(z: Zone, t: i64) -> i64 {
    local_date(z, t)
        .and_then(|d| day_start(z, d))
        // Outside chrono's range: fall back to UTC days.
        .unwrap_or_else(|| t - t.rem_euclid(86_400_000))
}

/// Start (epoch ms) of the day in `z` after the day starting at `start`.
pub fn next_day(z: Zone, start: i64) -> i64 {
    local_date(z, start)
        .and_then(|d| d.checked_add_days(Days::new(1)))
        .and_then(|d| day_start(z, d))
        .unwrap_or(start + 86_400_000)
}

/// The zone's offset from UTC at instant `t`, in milliseconds.
pub fn offset_ms(z: Zone, t: i64) -> i64 {
    DateTime::<Utc>::from_timestamp_millis(t)
        .map(|d| {
            i64::from(
                z.offset_from_utc_datetime(&d.naive_utc())
                    .fix()
                    .local_minus_utc(),
            )
        })
        .unwrap_or(0)
        * 1000
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn china_days_start_at_16_00_utc() {
        let z = parse_zone("Asia/Shanghai").unwrap();
        // 23:59 and 00:01 China time are on two days.
        let a = at("2021-08-16T23:59:00+08:00");
        let b = at("2021-08-17T00:01:00+08:00");
        assert_eq!(start_of_day(z, a), at("2021-08-15T16:00:00Z"));
        assert_eq!(start_of_day(z, b), at("2021-08-16T16:00:00Z"));
        assert_eq!(next_day(z, start_of_day(z, a)), start_of_day(z, b));
        assert_eq!(local_date(z, b).unwrap().to_string(), "2021-08-17");
        assert_eq!(
            start_of_day(z, at("2021-08-16T16:00:00Z")),
            at("2021-08-16T16:00:00Z")
        );
        assert_eq!(offset_ms(z, a), 8 * 3_600_000);
    }

    #[test]
    fn daylight_saving_days_are_23_and_25_hours() {
        let z = parse_zone("Europe/Berlin").unwrap();
        let spring = start_of_day(z, at("2021-03-28T12:00:00+02:00"));
        assert_eq!(spring, at("2021-03-28T00:00:00+01:00"));
        assert_eq!(next_day(z, spring) - spring, 23 * 3_600_000);
        let autumn = start_of_day(z, at("2021-10-31T12:00:00+01:00"));
        assert_eq!(next_day(z, autumn) - autumn, 25 * 3_600_000);
    }

    #[test]
    fn a_skipped_midnight_starts_the_day_when_the_clocks_jump() {
        // São Paulo, 2018-11-04: 00:00 −03 became 01:00 −02.
        let z = parse_zone("America/Sao_Paulo").unwrap();
        let d = NaiveDate::from_ymd_opt(2018, 11, 4).unwrap();
        let s = day_start(z, d).unwrap();
        assert_eq!(s, at("2018-11-04T03:00:00Z"));
        assert_eq!(local_date(z, s), Some(d));
        assert_eq!(local_date(z, s - 1), d.pred_opt());
        assert_eq!(start_of_day(z, at("2018-11-04T12:00:00Z")), s);
    }

    #[test]
    fn names_are_checked() {
        assert!(parse_zone("Asia/Shangai").unwrap_err().contains("IANA"));
        assert!(is_utc(parse_zone("UTC").unwrap()));
        assert!(is_utc(parse_zone("Etc/UTC").unwrap()));
        assert!(!is_utc(parse_zone("Asia/Shanghai").unwrap()));
    }
}
