//! The generator's settings, validated once at start.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::model::Format;

/// What to generate. Same config (seed included) → same records and truth.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Seeds the ChaCha8 stream and every per-entity attribute.
    pub seed: u64,
    /// Records to produce (valid, late, duplicate and malformed together).
    pub count: u64,
    /// Event time of the first record, UTC (whole seconds).
    pub start: DateTime<Utc>,
    /// Event times spread increasingly over `[start, start + span)`.
    pub span: Duration,
    /// Stamp each record with the clock set by [`Generator::set_clock`]
    /// (the wall clock as it is sent) instead of spreading times over the
    /// span; `start` is then only the truth's nominal start.
    ///
    /// [`Generator::set_clock`]: crate::Generator::set_clock
    pub wall_clock: bool,
    /// Raw formats to generate; empty means all.
    pub formats: Vec<Format>,
    /// Fraction of records that are malformed.
    pub bad_fraction: f64,
    /// Fraction of records that are late.
    pub late_fraction: f64,
    /// How far back a late record's event time is set.
    pub late_by: Duration,
    /// Fraction of records that are duplicates of earlier valid ones.
    pub dup_fraction: f64,
    /// Whether valid records carry `"event_id": "g<seed>-<seq>"`.
    pub event_ids: bool,
    /// Id space sizes.
    pub users: u32,
    pub videos: u32,
    pub rooms: u32,
    pub authors: u32,
}

impl Default for GenConfig {
    fn default() -> GenConfig {
        GenConfig {
            seed: 1,
            count: 10_000,
            start: Utc
                .with_ymd_and_hms(2021, 8, 16, 1, 0, 0)
                .single()
                .unwrap_or_default(),
            span: Duration::from_secs(600),
            wall_clock: false,
            formats: Format::ALL.to_vec(),
            bad_fraction: 0.0,
            late_fraction: 0.0,
            late_by: Duration::from_secs(30),
            dup_fraction: 0.0,
            event_ids: true,
            users: 2000,
            videos: 500,
            rooms: 20,
            authors: 100,
        }
    }
}

/// A setting that makes no sense; the message names the flag and the fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenError {
    #[error("invalid {flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> GenError {
    GenError::Invalid {
        flag,
        message: message.into(),
    }
}

/// Lower bound (inclusive) of the event times ingest accepts.
pub fn valid_time_min() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

/// Upper bound (exclusive) of the event times ingest accepts.
pub fn valid_time_max() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2100, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

/// Smallest `late_by`: in-order records may already run up to 2 s behind
/// their predecessors, so a late record must be set back by more.
pub const MIN_LATE_BY: Duration = Duration::from_secs(3);

impl GenConfig {
    /// Checks every setting; the error names the flag to fix.
    pub fn validate(&self) -> Result<(), GenError> {
        for (flag, v) in [
            ("--bad-fraction", self.bad_fraction),
            ("--late-fraction", self.late_fraction),
            ("--dup-fraction", self.dup_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(flag, format!("{v} is not a fraction in [0, 1]")));
            }
        }
        let sum = self.bad_fraction + self.late_fraction + self.dup_fraction;
        if sum > 1.0 {
            return Err(invalid(
                "--bad-fraction",
                format!("--bad-fraction + --late-fraction + --dup-fraction = {sum}, more than 1"),
            ));
        }
        if !self.event_ids && self.dup_fraction > 0.0 {
            return Err(invalid(
                "--dup-fraction",
                "must be 0 with --event-ids=false: without event ids a duplicate cannot be told \
                 apart from a new event, so the truth would be wrong",
            ));
        }
        if self.late_fraction > 0.0 && self.late_by < MIN_LATE_BY {
            return Err(invalid(
                "--late-by",
                format!(
                    "{} is too small: in-order records already jitter up to 2s, use at least 3s",
                    humantime::format_duration(self.late_by)
                ),
            ));
        }
        if self.span.as_millis() == 0 {
            return Err(invalid("--span", "must be positive"));
        }
        for (flag, v) in [
            ("--users", self.users),
            ("--videos", self.videos),
            ("--rooms", self.rooms),
            ("--authors", self.authors),
        ] {
            if v == 0 {
                return Err(invalid(flag, "must be at least 1"));
            }
        }
        let earliest = self.start - chrono::Duration::from_std(self.late_by).unwrap_or_default();
        if earliest < valid_time_min() {
            return Err(invalid(
                "--start",
                format!(
                    "{} minus --late-by is before {}, where ingest rejects event times",
                    self.start,
                    valid_time_min()
                ),
            ));
        }
        let span =
            chrono::Duration::from_std(self.span).map_err(|_| invalid("--span", "too long"))?;
        if self.start + span > valid_time_max() {
            return Err(invalid(
                "--span",
                format!(
                    "{} plus the span runs past {}, where ingest rejects event times",
                    self.start,
                    valid_time_max()
                ),
            ));
        }
        Ok(())
    }

    /// The chosen formats in `RAW` order, without repeats (all when empty).
    pub fn chosen_formats(&self) -> Vec<Format> {
        let chosen: Vec<Format> = Format::ALL
            .into_iter()
            .filter(|f| self.formats.contains(f))
            .collect();
        if chosen.is_empty() {
            Format::ALL.to_vec()
        } else {
            chosen
        }
    }
}

/// Parses a comma list of raw topic names (or `all`).
pub fn parse_formats(list: &[String]) -> Result<Vec<Format>, GenError> {
    let mut out = Vec::new();
    for name in list.iter().flat_map(|s| s.split(',')).map(str::trim) {
        if name.is_empty() {
            continue;
        }
        if name == "all" {
            out.extend(Format::ALL);
            continue;
        }
        match Format::from_topic(name) {
            Some(f) => out.push(f),
            None => {
                let known: Vec<&str> = Format::ALL.iter().map(|f| f.topic()).collect();
                return Err(invalid(
                    "--formats",
                    format!("unknown raw topic {name:?}; known: {}", known.join(", ")),
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(invalid("--formats", "no format chosen"));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Parses `--start`: `now` or RFC 3339 (any offset, converted to UTC and
/// truncated to whole seconds). With `now`, the span ends at the current
/// second: event times run through `[now − span, now)`, never after `now`.
/// Only an explicit time in the future dates records in the future.
pub fn parse_start(s: &str, now: DateTime<Utc>, span: Duration) -> Result<DateTime<Utc>, GenError> {
    let t = if s.trim().eq_ignore_ascii_case("now") {
        let span_ms = i64::try_from(span.as_millis()).map_err(|_| invalid("--span", "too long"))?;
        // Whole seconds at or before `now − span`, so start + span <= now.
        (now.timestamp_millis() - span_ms).div_euclid(1000)
    } else {
        DateTime::parse_from_rfc3339(s.trim())
            .map_err(|e| invalid("--start", format!("{s:?} is not RFC 3339 or `now`: {e}")))?
            .timestamp()
    };
    Utc.timestamp_opt(t, 0)
        .single()
        .ok_or_else(|| invalid("--start", format!("{s:?} is out of range")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(GenConfig::default().validate(), Ok(()));
    }

    #[test]
    fn duplicates_need_event_ids() {
        let cfg = GenConfig {
            event_ids: false,
            dup_fraction: 0.1,
            ..GenConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("--dup-fraction"), "{err}");
        assert!(err.contains("--event-ids=false"), "{err}");
        let ok = GenConfig {
            event_ids: false,
            ..GenConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn fractions_are_checked() {
        let cfg = GenConfig {
            bad_fraction: 0.6,
            late_fraction: 0.6,
            ..GenConfig::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = GenConfig {
            dup_fraction: -0.1,
            ..GenConfig::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = GenConfig {
            late_fraction: 0.1,
            late_by: Duration::from_secs(1),
            ..GenConfig::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn time_window_is_checked() {
        let cfg = GenConfig {
            start: Utc.with_ymd_and_hms(2099, 12, 31, 23, 55, 0).unwrap(),
            ..GenConfig::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = GenConfig {
            start: Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 10).unwrap(),
            ..GenConfig::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn formats_parse() {
        let f =
            parse_formats(&["user_actions,video_events".into(), "video_events".into()]).unwrap();
        assert_eq!(f, vec![Format::VideoEvents, Format::UserActions]);
        assert_eq!(parse_formats(&["all".into()]).unwrap().len(), 9);
        assert!(parse_formats(&["nope".into()]).is_err());
    }

    #[test]
    fn start_parses() {
        let now = Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap()
            + chrono::Duration::milliseconds(750);
        let ten = Duration::from_secs(600);
        // `now` ends the span at the current second: [06:58:09, 07:08:09).
        assert_eq!(
            parse_start("now", now, ten).unwrap(),
            Utc.with_ymd_and_hms(2024, 5, 6, 6, 58, 9).unwrap()
        );
        // A span with milliseconds still ends at or before now.
        let odd = Duration::from_millis(600_250);
        let s = parse_start("now", now, odd).unwrap();
        assert!(s.timestamp_millis() + 600_250 <= now.timestamp_millis());
        assert_eq!(s.timestamp_subsec_millis(), 0);
        assert_eq!(
            parse_start("2021-08-16T09:00:00.750+08:00", now, ten).unwrap(),
            Utc.with_ymd_and_hms(2021, 8, 16, 1, 0, 0).unwrap()
        );
        assert!(parse_start("yesterday", now, ten).is_err());
    }
}
