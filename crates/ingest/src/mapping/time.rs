//! Event-time parsing for every time format in the seeds: ISO-8601 / RFC 3339
//! with `Z` or an offset, `YYYY-MM-DD HH:MM:SS[.fff]` in a configured zone,
//! epoch seconds or milliseconds as integer, float or numeric string, and
//! any chrono `strftime` pattern. Results are UTC milliseconds, checked to
//! lie in [2000-01-01, 2100-01-01) so a garbage number is not taken for a
//! date.

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use serde_json::Value;

/// 2000-01-01T00:00:00Z.
pub const MIN_MS: i64 = 946_684_800_000;
/// 2100-01-01T00:00:00Z.
pub const MAX_MS: i64 = 4_102_444_800_000;

/// How a time field is written.
#[derive(Clone, Debug, PartialEq)]
pub enum TimeFormat {
    /// Numbers are epoch seconds (below 1e11) or milliseconds; strings are
    /// RFC 3339, `YYYY-MM-DD HH:MM:SS[.fff]` (zone-less: the mapping's zone)
    /// or numeric.
    Auto,
    Rfc3339,
    /// `YYYY-MM-DD HH:MM:SS[.fff]` or `YYYY-MM-DDTHH:MM:SS[.fff]` without a
    /// zone, in the mapping's zone.
    Local,
    EpochSeconds,
    EpochMillis,
    /// A chrono strftime pattern; without `%z`/`%:z` it is read in the zone.
    Pattern(String),
}

impl TimeFormat {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "rfc3339" | "iso8601" => Self::Rfc3339,
            "local" => Self::Local,
            "epoch_s" | "epoch_seconds" => Self::EpochSeconds,
            "epoch_ms" | "epoch_millis" => Self::EpochMillis,
            p if p.contains('%') => Self::Pattern(p.to_owned()),
            other => {
                return Err(format!(
                    "unknown time format {other:?}; use auto, rfc3339, local, epoch_s, epoch_ms or a strftime pattern"
                ));
            }
        })
    }
}

/// Why a time could not be read.
#[derive(Debug, PartialEq)]
pub enum TimeError {
    Unparseable(String),
    OutOfRange(i64),
    WrongType,
}

/// Parses `v` as an event time, UTC ms.
pub fn parse(v: &Value, format: &TimeFormat, zone: Tz) -> Result<i64, TimeError> {
    let ms = match v {
        Value::Number(n) => {
            let f = n.as_f64().ok_or(TimeError::WrongType)?;
            match format {
                TimeFormat::Auto => epoch_auto(f),
                TimeFormat::EpochSeconds => epoch(f, 1000.0),
                TimeFormat::EpochMillis => epoch(f, 1.0),
                _ => return Err(TimeError::WrongType),
            }?
        }
        Value::String(s) => return parse_text(s, format, zone),
        _ => return Err(TimeError::WrongType),
    };
    in_range(ms)
}

/// Parses a JSON string's text as an event time, UTC ms (as [`parse`]).
pub fn parse_text(s: &str, format: &TimeFormat, zone: Tz) -> Result<i64, TimeError> {
    in_range(parse_str(s.trim(), format, zone)?)
}

fn in_range(ms: i64) -> Result<i64, TimeError> {
    if (MIN_MS..MAX_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(TimeError::OutOfRange(ms))
    }
}

fn epoch_auto(f: f64) -> Result<i64, TimeError> {
    if f.abs() < 1e11 {
        epoch(f, 1000.0)
    } else {
        epoch(f, 1.0)
    }
}

fn epoch(f: f64, scale: f64) -> Result<i64, TimeError> {
    let ms = (f * scale).round();
    if !ms.is_finite() || ms.abs() > 1e17 {
        return Err(TimeError::OutOfRange(if ms > 0.0 {
            i64::MAX
        } else {
            i64::MIN
        }));
    }
    Ok(ms as i64)
}

fn is_numeric(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.bytes().filter(|b| *b == b'.').count() <= 1
}

fn parse_str(s: &str, format: &TimeFormat, zone: Tz) -> Result<i64, TimeError> {
    let bad = || TimeError::Unparseable(s.chars().take(64).collect());
    let numeric = || s.parse::<f64>().map_err(|_| bad());
    match format {
        TimeFormat::Auto => {
            // The zone-less shape first: it never parses as RFC 3339 (no
            // offset), and it is seed 002's, the busiest.
            if is_numeric(s) {
                epoch_auto(numeric()?)
            } else if let Some(t) = local(s, zone) {
                t
            } else if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
                Ok(dt.timestamp_millis())
            } else {
                Err(bad())
            }
        }
        TimeFormat::Rfc3339 => DateTime::parse_from_rfc3339(s)
            .map(|d| d.timestamp_millis())
            .map_err(|_| bad()),
        TimeFormat::Local => local(s, zone).ok_or_else(bad)?,
        TimeFormat::EpochSeconds if is_numeric(s) => epoch(numeric()?, 1000.0),
        TimeFormat::EpochMillis if is_numeric(s) => epoch(numeric()?, 1.0),
        TimeFormat::EpochSeconds | TimeFormat::EpochMillis => Err(bad()),
        TimeFormat::Pattern(p) => {
            if let Ok(dt) = DateTime::parse_from_str(s, p) {
                Ok(dt.timestamp_millis())
            } else {
                let naive = NaiveDateTime::parse_from_str(s, p).map_err(|_| bad())?;
                in_zone(naive, zone, s)
            }
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS[.fff]` (or with `T`) in `zone`; `None` if it is not
/// that shape.
fn local(s: &str, zone: Tz) -> Option<Result<i64, TimeError>> {
    Some(in_zone(naive_local(s)?, zone, s))
}

/// `YYYY-MM-DD[ T]HH:MM:SS[.f…]` without a zone. Hand-parsed: this is the
/// hot path for seed 002's records, and chrono re-parses its format string
/// on every call.
fn naive_local(s: &str) -> Option<NaiveDateTime> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b' ' | b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let mut nanos = 0u32;
    if b.len() > 19 {
        let frac = b.get(20..)?;
        if b[19] != b'.'
            || frac.is_empty()
            || frac.len() > 9
            || !frac.iter().all(u8::is_ascii_digit)
        {
            return None;
        }
        nanos = num(20..b.len())? * 10u32.pow(9 - frac.len() as u32);
    }
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    date.and_hms_nano_opt(num(11..13)?, num(14..16)?, num(17..19)?, nanos)
}

fn in_zone(naive: NaiveDateTime, zone: Tz, raw: &str) -> Result<i64, TimeError> {
    match zone.from_local_datetime(&naive) {
        LocalResult::Single(t) => Ok(t.timestamp_millis()),
        // A repeated hour at a DST change: take the earlier instant.
        LocalResult::Ambiguous(a, _) => Ok(a.timestamp_millis()),
        LocalResult::None => Err(TimeError::Unparseable(format!(
            "{raw} does not exist in {zone} (DST gap)"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const SH: Tz = chrono_tz::Asia::Shanghai;

    fn auto(v: Value) -> Result<i64, TimeError> {
        parse(&v, &TimeFormat::Auto, SH)
    }

    #[test]
    fn seed_formats() {
        // seed 000 / 001: ISO-8601 with Z
        assert_eq!(auto(json!("2025-04-05T10:00:00Z")), Ok(1_743_847_200_000));
        assert_eq!(
            auto(json!("2025-04-05T10:00:00.250Z")),
            Ok(1_743_847_200_250)
        );
        // seed 002: local Asia/Shanghai (UTC+8) wall time
        assert_eq!(auto(json!("2021-08-16 09:48:01")), Ok(1_629_078_481_000));
        // seed 003: epoch ms int, epoch s float
        assert_eq!(auto(json!(1_629_075_600_123_i64)), Ok(1_629_075_600_123));
        assert_eq!(auto(json!(1_629_075_601.5)), Ok(1_629_075_601_500));
        // seed 004: time.time() float, also as a Redis-stream string
        assert_eq!(auto(json!(1_732_200_000.123)), Ok(1_732_200_000_123));
        assert_eq!(auto(json!("1732200000.123")), Ok(1_732_200_000_123));
        // integer epoch seconds
        assert_eq!(auto(json!(1_629_075_600)), Ok(1_629_075_600_000));
    }

    #[test]
    fn offsets_and_zones() {
        assert_eq!(
            auto(json!("2021-08-16T09:48:01+08:00")),
            Ok(1_629_078_481_000)
        );
        let utc = parse(
            &json!("2021-08-16 01:48:01"),
            &TimeFormat::Local,
            chrono_tz::UTC,
        );
        assert_eq!(utc, Ok(1_629_078_481_000));
        let pat = TimeFormat::parse("%d/%m/%Y %H:%M").unwrap();
        assert_eq!(
            parse(&json!("16/08/2021 09:48"), &pat, SH),
            Ok(1_629_078_480_000)
        );
    }

    #[test]
    fn explicit_formats_are_strict() {
        assert_eq!(
            parse(&json!(1_629_075_600), &TimeFormat::EpochMillis, SH),
            Err(TimeError::OutOfRange(1_629_075_600))
        );
        assert_eq!(
            parse(&json!(1_629_075_600), &TimeFormat::EpochSeconds, SH),
            Ok(1_629_075_600_000)
        );
        assert_eq!(
            parse(&json!(5), &TimeFormat::Rfc3339, SH),
            Err(TimeError::WrongType)
        );
        assert!(matches!(
            parse(&json!("2021-08-16 09:48:01"), &TimeFormat::Rfc3339, SH),
            Err(TimeError::Unparseable(_))
        ));
        assert!(TimeFormat::parse("weird").is_err());
    }

    #[test]
    fn local_fast_path_matches_chrono() {
        for t in [
            "2021-08-16 09:48:01",
            "2021-08-16T09:48:01",
            "2021-08-16 09:48:01.5",
            "2021-08-16 09:48:01.123456789",
        ] {
            let want = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(t, f).ok());
            assert_eq!(naive_local(t), want, "{t}");
        }
        for bad in [
            "2021-08-16 09:48",
            "2021-13-16 09:48:01",
            "2021-08-16 09:48:01.",
            "2021-08-16 09:48:01x",
            "2021/08/16 09:48:01",
            "2021-08-16 24:00:00",
        ] {
            assert_eq!(naive_local(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_times() {
        assert!(matches!(
            auto(json!("yesterday")),
            Err(TimeError::Unparseable(_))
        ));
        assert!(matches!(
            auto(json!("2021-13-45 99:00:00")),
            Err(TimeError::Unparseable(_))
        ));
        assert_eq!(auto(json!(0)), Err(TimeError::OutOfRange(0)));
        assert!(matches!(
            auto(json!("2300-01-01T00:00:00Z")),
            Err(TimeError::OutOfRange(_))
        ));
        assert!(matches!(auto(json!(1e300)), Err(TimeError::OutOfRange(_))));
        assert_eq!(auto(json!(true)), Err(TimeError::WrongType));
        assert_eq!(auto(json!(null)), Err(TimeError::WrongType));
    }

    #[test]
    fn dst_gap_is_an_error_not_a_shift() {
        let ny = chrono_tz::America::New_York;
        let r = parse(&json!("2021-03-14 02:30:00"), &TimeFormat::Local, ny);
        assert!(matches!(r, Err(TimeError::Unparseable(m)) if m.contains("DST")));
    }
}
