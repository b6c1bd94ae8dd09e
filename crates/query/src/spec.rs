//! The metrics spec: which windowed metrics, raw logs and leaderboards the
//! aggregator maintains (TOML, `--spec FILE`; the built-in default
//! reproduces the seeds' dashboards). See docs/metrics.md.
//!
//! A spec is parsed and validated once at start; a mistake fails with the
//! place and the fix (`metric gifts_6h: window.slide: 7m does not divide 6h`).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;
use vidpulse_core::topics;
use vidpulse_proto::Kind;

use crate::field::{Field, FieldRef, FieldType, ValRef};
use crate::zone::{self, Zone};

/// The built-in spec (seeds 000, 002, 003, 004).
pub const DEFAULT_SPEC: &str = include_str!("default_spec.toml");

/// A validated spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub metrics: Vec<Metric>,
    pub logs: Vec<Log>,
    pub leaderboards: Vec<Leaderboard>,
}

/// Which topic a metric reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Input {
    /// `vp.events.v1`: every canonical event.
    Events,
    /// `vp.monitored.v1`: events that passed a monitor pool, with `pools`
    /// and enrichment.
    Monitored,
}

impl Input {
    /// The unprefixed topic.
    pub fn topic(self) -> &'static str {
        match self {
            Input::Events => topics::EVENTS,
            Input::Monitored => topics::MONITORED,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Input::Events => "events",
            Input::Monitored => "monitored",
        }
    }
}

const DAY_MS: i64 = 86_400_000;

/// An event-time window: tumbling when `slide == size`, else hopping.
/// Windows are aligned to the epoch (UTC), except a tumbling day in a
/// zone, which starts at 00:00 there (23 to 25 hours long across daylight
/// saving changes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub size_ms: i64,
    pub slide_ms: i64,
    /// The zone of a tumbling `1d` window; `None`: UTC, epoch-aligned.
    pub zone: Option<Zone>,
}

impl Window {
    pub fn tumbling(size_ms: i64) -> Window {
        Window {
            size_ms,
            slide_ms: size_ms,
            zone: None,
        }
    }

    /// Start of the pane (a tumbling window, or a hopping window's slide)
    /// holding event time `t`.
    pub fn start_of(&self, t: i64) -> i64 {
        match self.zone {
            None => t - t.rem_euclid(self.pane_ms()),
            Some(z) => zone::start_of_day(z, t),
        }
    }

    /// End (exclusive) of the pane starting at `start`.
    pub fn end_of(&self, start: i64) -> i64 {
        match self.zone {
            None => start + self.pane_ms(),
            Some(z) => zone::next_day(z, start),
        }
    }

    pub fn is_hopping(&self) -> bool {
        self.slide_ms != self.size_ms
    }

    /// State is kept per pane (a slide-long bucket); a hopping window is the
    /// union of `size / slide` consecutive panes, formed at query time.
    pub fn pane_ms(&self) -> i64 {
        self.slide_ms
    }

    pub fn describe(&self) -> String {
        if self.is_hopping() {
            format!(
                "hopping {} every {}",
                fmt_ms(self.size_ms),
                fmt_ms(self.slide_ms)
            )
        } else if let Some(z) = self.zone {
            format!("tumbling {} in {}", fmt_ms(self.size_ms), z.name())
        } else {
            format!("tumbling {}", fmt_ms(self.size_ms))
        }
    }
}

/// Formats whole milliseconds as a short humantime duration (`1m`, `6h`).
pub fn fmt_ms(ms: i64) -> String {
    humantime::format_duration(Duration::from_millis(ms.max(0) as u64)).to_string()
}

/// A group-by column.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupBy {
    /// Column name in results.
    pub name: String,
    pub field: FieldRef,
    /// Keep events whose field is absent, under the empty value (`""` or
    /// 0); by default they are skipped for this metric.
    pub allow_empty: bool,
}

impl GroupBy {
    pub fn ty(&self) -> FieldType {
        match self.field.ty() {
            FieldType::Time => FieldType::Int,
            t => t,
        }
    }
}

/// A filter on one field.
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    pub field: FieldRef,
    /// The field must equal one of these (compared as text).
    pub one_of: Vec<String>,
}

impl Cond {
    pub fn holds(&self, v: Option<ValRef<'_>>) -> bool {
        v.is_some_and(|v| self.one_of.iter().any(|t| v.matches_text(t)))
    }
}

/// What an aggregate computes.
#[derive(Clone, Debug, PartialEq)]
pub enum AggFn {
    /// Events.
    Count,
    /// Sum of a numeric field (absent values add nothing).
    Sum(FieldRef),
    Min(FieldRef),
    Max(FieldRef),
    /// Exact number of distinct values of a field (absent values ignored).
    Distinct(FieldRef),
    /// A level at each window end: the running total, from the first
    /// window on, of +1 per `rise` event and −1 per `fall` event.
    Level {
        rise: Vec<Kind>,
        fall: Vec<Kind>,
    },
}

impl AggFn {
    pub fn name(&self) -> &'static str {
        match self {
            AggFn::Count => "count",
            AggFn::Sum(_) => "sum",
            AggFn::Min(_) => "min",
            AggFn::Max(_) => "max",
            AggFn::Distinct(_) => "distinct",
            AggFn::Level { .. } => "level",
        }
    }
}

/// One aggregate column.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    pub name: String,
    pub func: AggFn,
    /// Only these kinds count (empty: every kind of the metric).
    pub kinds: Vec<Kind>,
    pub when: Option<Cond>,
}

impl Aggregate {
    pub fn describe(&self) -> String {
        let mut s = match &self.func {
            AggFn::Count => format!("{} = count", self.name),
            AggFn::Sum(f) => format!("{} = sum({})", self.name, f.name()),
            AggFn::Min(f) => format!("{} = min({})", self.name, f.name()),
            AggFn::Max(f) => format!("{} = max({})", self.name, f.name()),
            AggFn::Distinct(f) => format!("{} = distinct({})", self.name, f.name()),
            AggFn::Level { rise, fall } => format!(
                "{} = level(+{} −{})",
                self.name,
                kinds_text(rise),
                kinds_text(fall)
            ),
        };
        if !self.kinds.is_empty() {
            let _ = write!(s, " of {}", kinds_text(&self.kinds));
        }
        if let Some(c) = &self.when {
            let _ = write!(s, " where {} in [{}]", c.field.name(), c.one_of.join(", "));
        }
        s
    }
}

fn kinds_text(kinds: &[Kind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join("|")
}

/// Rank the rows of each window by an aggregate and keep the first `n`.
#[derive(Clone, Debug, PartialEq)]
pub struct Top {
    pub n: usize,
    /// Index in `group_by` of the ranked member (e.g. `user_id`); the other
    /// group-by columns partition the ranking.
    pub field: usize,
    /// Index in `aggregates` of the value ranked by (descending; ties by
    /// member ascending).
    pub by: usize,
}

/// A windowed metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub help: String,
    pub input: Input,
    pub kinds: Vec<Kind>,
    pub when: Option<Cond>,
    pub window: Window,
    /// How long after its end a window still takes events; `None` = the
    /// stage's `--grace`.
    pub grace_ms: Option<i64>,
    pub group_by: Vec<GroupBy>,
    pub aggregates: Vec<Aggregate>,
    pub top: Option<Top>,
}

impl Metric {
    /// Whether its aggregates are levels (cumulated across windows at query time).
    pub fn is_level(&self) -> bool {
        self.aggregates
            .iter()
            .any(|a| matches!(a.func, AggFn::Level { .. }))
    }
}

/// A raw log: one row per distinct event (the seed's `live_streaming_log`
/// sink), no window.
#[derive(Clone, Debug, PartialEq)]
pub struct Log {
    pub name: String,
    pub help: String,
    pub input: Input,
    pub kinds: Vec<Kind>,
    pub when: Option<Cond>,
    /// Columns after the implicit `event_time`, `event_id`, `kind`.
    pub columns: Vec<GroupBy>,
}

/// How a leaderboard member scores.
#[derive(Clone, Debug, PartialEq)]
pub enum Score {
    Count,
    Sum(FieldRef),
}

/// A live leaderboard: one Redis sorted set per window (a UTC day by
/// default, or the day in `zone`), member → score.
#[derive(Clone, Debug, PartialEq)]
pub struct Leaderboard {
    pub name: String,
    pub help: String,
    pub input: Input,
    pub kinds: Vec<Kind>,
    pub when: Option<Cond>,
    pub window_ms: i64,
    pub grace_ms: Option<i64>,
    pub member: GroupBy,
    pub score_name: String,
    pub score: Score,
    /// Key stem: sets are `<prefix><key>:{<YYYY-MM-DD>}`.
    pub key: String,
    /// Expiry of each set after its last update.
    pub ttl_ms: i64,
    /// The zone whose midnight starts each daily window (`None`: UTC).
    pub zone: Option<Zone>,
}

impl Leaderboard {
    /// The board's tumbling window.
    pub fn window(&self) -> Window {
        Window {
            size_ms: self.window_ms,
            slide_ms: self.window_ms,
            zone: self.zone,
        }
    }

    /// Start of the window holding event time `t`.
    pub fn start_of(&self, t: i64) -> i64 {
        self.window().start_of(t)
    }

    /// End (exclusive) of the window starting at `start`.
    pub fn end_of(&self, start: i64) -> i64 {
        self.window().end_of(start)
    }
}

/// A spec that makes no sense; the message names the place and the fix.
#[derive(Debug, thiserror::Error)]
#[error("spec{}: {message}", if place.is_empty() { String::new() } else { format!(" {place}") })]
pub struct SpecError {
    pub place: String,
    pub message: String,
}

fn err(place: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        place: place.into(),
        message: message.into(),
    }
}

// ---- TOML form -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    metric: Vec<RawMetric>,
    #[serde(default)]
    log: Vec<RawLog>,
    #[serde(default)]
    leaderboard: Vec<RawLeaderboard>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawWindow {
    Tumbling(String),
    Table {
        size: String,
        #[serde(default)]
        slide: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawField {
    Name(String),
    Table {
        name: String,
        #[serde(default)]
        field: Option<String>,
        #[serde(default)]
        allow_empty: bool,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCond {
    field: String,
    #[serde(default)]
    equals: Option<toml::Value>,
    #[serde(default)]
    one_of: Option<Vec<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgg {
    name: String,
    #[serde(rename = "fn")]
    func: String,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    when: Option<RawCond>,
    #[serde(default)]
    rise: Vec<String>,
    #[serde(default)]
    fall: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTop {
    n: usize,
    field: String,
    by: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    name: String,
    #[serde(default)]
    help: String,
    #[serde(default)]
    input: Option<String>,
    kinds: Vec<String>,
    #[serde(default)]
    when: Option<RawCond>,
    window: RawWindow,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    grace: Option<String>,
    #[serde(default)]
    group_by: Vec<RawField>,
    aggregates: Vec<RawAgg>,
    #[serde(default)]
    top: Option<RawTop>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    name: String,
    #[serde(default)]
    help: String,
    #[serde(default)]
    input: Option<String>,
    kinds: Vec<String>,
    #[serde(default)]
    when: Option<RawCond>,
    columns: Vec<RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScore {
    name: String,
    #[serde(rename = "fn")]
    func: String,
    #[serde(default)]
    field: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeaderboard {
    name: String,
    #[serde(default)]
    help: String,
    #[serde(default)]
    input: Option<String>,
    kinds: Vec<String>,
    #[serde(default)]
    when: Option<RawCond>,
    #[serde(default)]
    window: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    grace: Option<String>,
    member: RawField,
    score: RawScore,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
}

/// Column names the tables and results use themselves.
const RESERVED: [&str; 7] = [
    "window_start",
    "part",
    "version",
    "rank",
    "event_time",
    "event_id",
    "kind",
];

fn check_name(place: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(err(
            place,
            format!(
                "name {name:?} must be lowercase letters, digits and _ (a ClickHouse column/table name), starting with a letter"
            ),
        ))
    }
}

fn duration_ms(place: &str, text: &str) -> Result<i64, SpecError> {
    let d = humantime::parse_duration(text).map_err(|e| {
        err(
            place,
            format!("{text:?} is not a duration like 60s, 1m, 6h: {e}"),
        )
    })?;
    i64::try_from(d.as_millis()).map_err(|_| err(place, format!("{text:?} is too long")))
}

fn parse_kinds(place: &str, names: &[String]) -> Result<Vec<Kind>, SpecError> {
    names
        .iter()
        .map(|n| {
            Kind::parse(n).ok_or_else(|| {
                let all: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                err(
                    place,
                    format!("unknown kind {n:?}; kinds are {}", all.join(", ")),
                )
            })
        })
        .collect()
}

fn parse_field(place: &str, name: &str) -> Result<FieldRef, SpecError> {
    FieldRef::parse(name).ok_or_else(|| {
        let all: Vec<&str> = Field::ALL.iter().map(|f| f.name()).collect();
        err(
            place,
            format!(
                "unknown field {name:?}; canonical fields are {}, or an enrichment key with a dot (room.type, anchor.<field>)",
                all.join(", ")
            ),
        )
    })
}

fn parse_input(place: &str, input: Option<&str>) -> Result<Input, SpecError> {
    match input.unwrap_or("events") {
        "events" => Ok(Input::Events),
        "monitored" => Ok(Input::Monitored),
        other => Err(err(
            place,
            format!(
                "input {other:?} must be \"events\" ({}) or \"monitored\" ({})",
                topics::EVENTS,
                topics::MONITORED
            ),
        )),
    }
}

fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_cond(place: &str, c: &RawCond) -> Result<Cond, SpecError> {
    let field = parse_field(&format!("{place}.field"), &c.field)?;
    let one_of = match (&c.equals, &c.one_of) {
        (Some(v), None) => vec![toml_text(v)],
        (None, Some(vs)) if !vs.is_empty() => vs.iter().map(toml_text).collect(),
        _ => {
            return Err(err(
                place,
                "give exactly one of `equals = value` or `one_of = [values]`",
            ));
        }
    };
    Ok(Cond { field, one_of })
}

fn parse_group(place: &str, f: &RawField) -> Result<GroupBy, SpecError> {
    let (name, field, allow_empty) = match f {
        RawField::Name(n) => (n.clone(), n.clone(), false),
        RawField::Table {
            name,
            field,
            allow_empty,
        } => (
            name.clone(),
            field.clone().unwrap_or_else(|| name.clone()),
            *allow_empty,
        ),
    };
    check_name(place, &name)?;
    let field = parse_field(place, &field)?;
    Ok(GroupBy {
        name,
        field,
        allow_empty,
    })
}

fn parse_window(place: &str, w: &RawWindow) -> Result<Window, SpecError> {
    let (size, slide) = match w {
        RawWindow::Tumbling(s) => (s.as_str(), None),
        RawWindow::Table { size, slide } => (size.as_str(), slide.as_deref()),
    };
    let size_ms = duration_ms(&format!("{place}.size"), size)?;
    let slide_ms = match slide {
        Some(s) => duration_ms(&format!("{place}.slide"), s)?,
        None => size_ms,
    };
    if size_ms < 1000 || size_ms % 1000 != 0 || slide_ms % 1000 != 0 || slide_ms < 1000 {
        return Err(err(
            place,
            "size and slide must be whole seconds, at least 1s",
        ));
    }
    if size_ms % slide_ms != 0 {
        return Err(err(
            format!("{place}.slide"),
            format!("{} does not divide {}", fmt_ms(slide_ms), fmt_ms(size_ms)),
        ));
    }
    if size_ms / slide_ms > 10_000 {
        return Err(err(place, "at most 10000 slides per window"));
    }
    Ok(Window {
        size_ms,
        slide_ms,
        zone: None,
    })
}

/// The `zone` of a daily window: an IANA name, only on a tumbling `1d`
/// window. UTC is the default and stored as `None`.
fn parse_window_zone(
    place: &str,
    zone: Option<&str>,
    w: &Window,
) -> Result<Option<Zone>, SpecError> {
    let Some(name) = zone else {
        return Ok(None);
    };
    let z = zone::parse_zone(name).map_err(|m| err(format!("{place}.zone"), m))?;
    if w.is_hopping() || w.size_ms != DAY_MS {
        return Err(err(
            format!("{place}.zone"),
            format!(
                "a zone sets where a day starts: it goes with a tumbling window = \"1d\" only, this window is {}",
                w.describe()
            ),
        ));
    }
    Ok((!zone::is_utc(z)).then_some(z))
}

impl Spec {
    /// The built-in spec.
    pub fn default_spec() -> Spec {
        match Spec::parse(DEFAULT_SPEC) {
            Ok(s) => s,
            // The default is checked by a unit test; reaching this is a build bug.
            Err(e) => panic!("built-in spec is invalid: {e}"),
        }
    }

    /// Parses and validates a TOML spec.
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| err("", e.to_string()))?;
        let mut names = HashSet::new();
        let mut metrics = Vec::new();
        for (i, m) in raw.metric.iter().enumerate() {
            let place = format!(
                "metric {}",
                if m.name.is_empty() {
                    format!("#{i}")
                } else {
                    m.name.clone()
                }
            );
            let metric = parse_metric(&place, m)?;
            if !names.insert(metric.name.clone()) {
                return Err(err(place, "the name is used twice"));
            }
            metrics.push(metric);
        }
        let mut logs = Vec::new();
        for l in &raw.log {
            let place = format!("log {}", l.name);
            check_name(&place, &l.name)?;
            let kinds = parse_kinds(&format!("{place}.kinds"), &l.kinds)?;
            if kinds.is_empty() {
                return Err(err(place, "kinds must name at least one kind"));
            }
            let mut columns = Vec::new();
            let mut cols = HashSet::new();
            for c in &l.columns {
                let g = parse_group(&format!("{place}.columns"), c)?;
                if g.field == FieldRef::Canon(Field::Pool) {
                    return Err(err(
                        &place,
                        "pool cannot be a log column (it has several values)",
                    ));
                }
                if RESERVED.contains(&g.name.as_str()) || !cols.insert(g.name.clone()) {
                    return Err(err(
                        &place,
                        format!("column {:?} is reserved or used twice", g.name),
                    ));
                }
                columns.push(g);
            }
            if !names.insert(l.name.clone()) {
                return Err(err(place, "the name is used twice"));
            }
            logs.push(Log {
                name: l.name.clone(),
                help: l.help.clone(),
                input: parse_input(&place, l.input.as_deref())?,
                kinds,
                when: l
                    .when
                    .as_ref()
                    .map(|c| parse_cond(&format!("{place}.when"), c))
                    .transpose()?,
                columns,
            });
        }
        let mut leaderboards = Vec::new();
        for b in &raw.leaderboard {
            let place = format!("leaderboard {}", b.name);
            check_name(&place, &b.name)?;
            let kinds = parse_kinds(&format!("{place}.kinds"), &b.kinds)?;
            if kinds.is_empty() {
                return Err(err(place, "kinds must name at least one kind"));
            }
            let member = parse_group(&format!("{place}.member"), &b.member)?;
            if member.field == FieldRef::Canon(Field::Pool) {
                return Err(err(&place, "member cannot be pool"));
            }
            check_name(&format!("{place}.score"), &b.score.name)?;
            let score = match (b.score.func.as_str(), &b.score.field) {
                ("count", None) => Score::Count,
                ("sum", Some(f)) => {
                    let f = parse_field(&format!("{place}.score.field"), f)?;
                    if f.ty() != FieldType::Int {
                        return Err(err(
                            &place,
                            format!("score sum({}) needs a numeric field", f.name()),
                        ));
                    }
                    Score::Sum(f)
                }
                _ => {
                    return Err(err(
                        format!("{place}.score"),
                        "fn must be \"count\" (no field) or \"sum\" with a numeric field",
                    ));
                }
            };
            let window_ms = match &b.window {
                Some(w) => duration_ms(&format!("{place}.window"), w)?,
                None => 86_400_000,
            };
            if window_ms < 1000 || window_ms % 1000 != 0 {
                return Err(err(&place, "window must be whole seconds, at least 1s"));
            }
            let zone = parse_window_zone(&place, b.zone.as_deref(), &Window::tumbling(window_ms))?;
            if member.name == b.score.name
                || RESERVED.contains(&member.name.as_str())
                || RESERVED.contains(&b.score.name.as_str())
            {
                return Err(err(
                    &place,
                    "member and score names must differ and not be reserved",
                ));
            }
            if !names.insert(b.name.clone()) {
                return Err(err(place, "the name is used twice"));
            }
            leaderboards.push(Leaderboard {
                name: b.name.clone(),
                help: b.help.clone(),
                input: parse_input(&place, b.input.as_deref())?,
                kinds,
                when: b
                    .when
                    .as_ref()
                    .map(|c| parse_cond(&format!("{place}.when"), c))
                    .transpose()?,
                window_ms,
                grace_ms: b
                    .grace
                    .as_deref()
                    .map(|g| duration_ms(&format!("{place}.grace"), g))
                    .transpose()?,
                member,
                score_name: b.score.name.clone(),
                score,
                key: b
                    .key
                    .clone()
                    .unwrap_or_else(|| format!("rankings:{}", b.name)),
                ttl_ms: match &b.ttl {
                    Some(t) => duration_ms(&format!("{place}.ttl"), t)?,
                    None => 8 * 86_400_000,
                },
                zone,
            });
        }
        if metrics.is_empty() && logs.is_empty() && leaderboards.is_empty() {
            return Err(err("", "no [[metric]], [[log]] or [[leaderboard]]"));
        }
        Ok(Spec {
            metrics,
            logs,
            leaderboards,
        })
    }

    /// The inputs some metric, log or leaderboard reads.
    pub fn inputs(&self) -> Vec<Input> {
        let mut v: Vec<Input> = self
            .metrics
            .iter()
            .map(|m| m.input)
            .chain(self.logs.iter().map(|l| l.input))
            .chain(self.leaderboards.iter().map(|l| l.input))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.name == name)
    }

    pub fn log(&self, name: &str) -> Option<&Log> {
        self.logs.iter().find(|m| m.name == name)
    }

    pub fn leaderboard(&self, name: &str) -> Option<&Leaderboard> {
        self.leaderboards.iter().find(|m| m.name == name)
    }

    /// A stable fingerprint of everything that decides results (with the
    /// stage's defaults): a checkpoint taken under another spec is not
    /// restored.
    pub fn fingerprint(&self, default_grace_ms: i64, out_of_orderness_ms: i64) -> String {
        // Zones came later: a spec without any keeps the fingerprint it had,
        // so upgrading does not throw its checkpoints away.
        let text = format!("{self:?}|{default_grace_ms}|{out_of_orderness_ms}")
            .replace(", zone: None", "");
        // FNV-1a: stable across builds, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

fn parse_metric(place: &str, m: &RawMetric) -> Result<Metric, SpecError> {
    check_name(place, &m.name)?;
    let input = parse_input(place, m.input.as_deref())?;
    let kinds = parse_kinds(&format!("{place}.kinds"), &m.kinds)?;
    if kinds.is_empty() {
        return Err(err(place, "kinds must name at least one kind"));
    }
    let mut window = parse_window(&format!("{place}.window"), &m.window)?;
    window.zone = parse_window_zone(place, m.zone.as_deref(), &window)?;
    let grace_ms = m
        .grace
        .as_deref()
        .map(|g| duration_ms(&format!("{place}.grace"), g))
        .transpose()?;
    let mut cols = HashSet::new();
    let mut group_by = Vec::new();
    for g in &m.group_by {
        let g = parse_group(&format!("{place}.group_by"), g)?;
        if RESERVED.contains(&g.name.as_str()) || !cols.insert(g.name.clone()) {
            return Err(err(
                place,
                format!("column {:?} is reserved or used twice", g.name),
            ));
        }
        group_by.push(g);
    }
    if group_by
        .iter()
        .filter(|g| g.field == FieldRef::Canon(Field::Pool))
        .count()
        > 1
    {
        return Err(err(place, "pool may appear once in group_by"));
    }
    if m.aggregates.is_empty() {
        return Err(err(place, "aggregates must not be empty"));
    }
    let mut aggregates = Vec::new();
    for a in &m.aggregates {
        let ap = format!("{place}.aggregates.{}", a.name);
        check_name(&ap, &a.name)?;
        if RESERVED.contains(&a.name.as_str()) || !cols.insert(a.name.clone()) {
            return Err(err(&ap, "the name is reserved or used twice"));
        }
        let field = |need_int: bool| -> Result<FieldRef, SpecError> {
            let name = a
                .field
                .as_deref()
                .ok_or_else(|| err(&ap, format!("fn = \"{}\" needs `field`", a.func)))?;
            let f = parse_field(&ap, name)?;
            if f == FieldRef::Canon(Field::Pool) {
                return Err(err(&ap, "pool cannot be aggregated"));
            }
            if need_int && f.ty() == FieldType::Str {
                return Err(err(
                    &ap,
                    format!(
                        "fn = \"{}\" needs a numeric field, {name:?} is text",
                        a.func
                    ),
                ));
            }
            Ok(f)
        };
        let func = match a.func.as_str() {
            "count" => AggFn::Count,
            "sum" => AggFn::Sum(field(true)?),
            "min" => AggFn::Min(field(true)?),
            "max" => AggFn::Max(field(true)?),
            "distinct" => AggFn::Distinct(field(false)?),
            "level" => {
                let rise = parse_kinds(&format!("{ap}.rise"), &a.rise)?;
                let fall = parse_kinds(&format!("{ap}.fall"), &a.fall)?;
                if rise.is_empty() && fall.is_empty() {
                    return Err(err(&ap, "a level needs `rise` and/or `fall` kinds"));
                }
                AggFn::Level { rise, fall }
            }
            other => {
                return Err(err(
                    &ap,
                    format!("unknown fn {other:?}; use count, sum, min, max, distinct or level"),
                ));
            }
        };
        if !matches!(func, AggFn::Level { .. }) && (!a.rise.is_empty() || !a.fall.is_empty()) {
            return Err(err(&ap, "rise/fall only go with fn = \"level\""));
        }
        let akinds = parse_kinds(&format!("{ap}.kinds"), &a.kinds)?;
        if let Some(k) = akinds.iter().find(|k| !kinds.contains(k)) {
            return Err(err(
                &ap,
                format!("kind {k} is not one of the metric's kinds"),
            ));
        }
        aggregates.push(Aggregate {
            name: a.name.clone(),
            func,
            kinds: akinds,
            when: a
                .when
                .as_ref()
                .map(|c| parse_cond(&format!("{ap}.when"), c))
                .transpose()?,
        });
    }
    let levels = aggregates
        .iter()
        .filter(|a| matches!(a.func, AggFn::Level { .. }))
        .count();
    if levels > 0 && (levels != aggregates.len() || window.is_hopping() || m.top.is_some()) {
        return Err(err(
            place,
            "a metric with a level aggregate takes only level aggregates, a tumbling window and no top",
        ));
    }
    let top = match &m.top {
        None => None,
        Some(t) => {
            let field = group_by
                .iter()
                .position(|g| g.name == t.field)
                .ok_or_else(|| {
                    err(
                        format!("{place}.top.field"),
                        format!("{:?} is not a group_by column", t.field),
                    )
                })?;
            let by = aggregates
                .iter()
                .position(|a| a.name == t.by)
                .ok_or_else(|| {
                    err(
                        format!("{place}.top.by"),
                        format!("{:?} is not an aggregate", t.by),
                    )
                })?;
            if matches!(
                aggregates[by].func,
                AggFn::Distinct(_) | AggFn::Level { .. }
            ) {
                return Err(err(
                    format!("{place}.top.by"),
                    "rank by a count, sum, min or max",
                ));
            }
            if t.n == 0 {
                return Err(err(format!("{place}.top.n"), "must be at least 1"));
            }
            Some(Top { n: t.n, field, by })
        }
    };
    Ok(Metric {
        name: m.name.clone(),
        help: m.help.clone(),
        input,
        kinds,
        when: m
            .when
            .as_ref()
            .map(|c| parse_cond(&format!("{place}.when"), c))
            .transpose()?,
        window,
        grace_ms,
        group_by,
        aggregates,
        top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_has_the_fixed_names() {
        let s = Spec::default_spec();
        let names: Vec<&str> = s
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .chain(s.logs.iter().map(|l| l.name.as_str()))
            .chain(s.leaderboards.iter().map(|l| l.name.as_str()))
            .collect();
        for want in [
            "video_plays_1m",
            "user_video_plays_1m",
            "live_viewer_log",
            "viewers_by_province_grade_1m",
            "members_by_grade_1m",
            "online_users_1m",
            "gifts_by_type_1m",
            "gifts_by_module_1m",
            "gifts_6h",
            "top_gifters_1h",
            "pool_production_1m",
            "pool_consumption_1m",
            "user_actions_1m",
            "actions_daily",
            "video_likes_daily",
            "user_gifts_daily",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let g = s.metric("gifts_6h").unwrap();
        assert_eq!(
            g.window,
            Window {
                size_ms: 6 * 3_600_000,
                slide_ms: 60_000,
                zone: None,
            }
        );
        let t = s.metric("top_gifters_1h").unwrap().top.clone().unwrap();
        assert_eq!(t.n, 10);
        assert!(s.metric("online_users_1m").unwrap().is_level());
        assert_eq!(s.inputs(), vec![Input::Events, Input::Monitored]);
    }

    #[test]
    fn mistakes_name_the_place_and_the_fix() {
        let e = Spec::parse(
            r#"[[metric]]
name = "x"
kinds = ["video_played"]
window = { size = "6h", slide = "7m" }
aggregates = [{ name = "n", fn = "count" }]"#,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("metric x.window.slide: 7m does not divide 6h"),
            "{e}"
        );
        let e = Spec::parse(
            r#"[[metric]]
name = "x"
kinds = ["video_playd"]
window = "1m"
aggregates = [{ name = "n", fn = "count" }]"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("unknown kind \"video_playd\""),
            "{e}"
        );
        let e = Spec::parse(
            r#"[[metric]]
name = "x"
kinds = ["gift_sent"]
window = "1m"
aggregates = [{ name = "n", fn = "sum", field = "province" }]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("needs a numeric field"), "{e}");
        let e = Spec::parse(
            r#"[[metric]]
name = "x"
kinds = ["gift_sent"]
window = "1m"
group_by = ["colour"]
aggregates = [{ name = "n", fn = "count" }]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field \"colour\""), "{e}");
        assert!(Spec::parse("").is_err());
    }

    #[test]
    fn daily_windows_take_a_zone() {
        let s = Spec::parse(
            r#"[[metric]]
name = "gifts_daily"
kinds = ["gift_sent"]
window = "1d"
zone = "Asia/Shanghai"
aggregates = [{ name = "amount", fn = "sum", field = "amount" }]

[[leaderboard]]
name = "gifts_cn"
kinds = ["gift_sent"]
member = "user_id"
score = { name = "amount", fn = "sum", field = "amount" }
zone = "Asia/Shanghai"

[[leaderboard]]
name = "gifts_utc"
kinds = ["gift_sent"]
member = "user_id"
score = { name = "amount", fn = "sum", field = "amount" }
zone = "UTC""#,
        )
        .unwrap();
        let w = s.metric("gifts_daily").unwrap().window;
        assert_eq!(w.zone.unwrap().name(), "Asia/Shanghai");
        assert_eq!(w.describe(), "tumbling 1day in Asia/Shanghai");
        // 2021-08-16 00:00 China time is 2021-08-15 16:00 UTC.
        let t = 1_629_075_600_000; // 2021-08-16T01:00:00Z, 09:00 in China
        assert_eq!(w.start_of(t), 1_629_043_200_000);
        assert_eq!(w.end_of(1_629_043_200_000), 1_629_129_600_000);
        let b = s.leaderboard("gifts_cn").unwrap();
        assert_eq!(b.start_of(t), 1_629_043_200_000);
        assert_eq!(
            s.leaderboard("gifts_utc").unwrap().zone,
            None,
            "UTC is the default"
        );
        assert_eq!(
            s.leaderboard("gifts_utc").unwrap().start_of(t),
            1_629_072_000_000
        );
        // Without a zone nothing changes: epoch-aligned panes.
        let m = Spec::default_spec();
        let g = m.metric("gifts_6h").unwrap().window;
        assert_eq!(g.start_of(t + 61_000), t + 60_000);
        assert_eq!(g.end_of(t + 60_000), t + 120_000);
    }

    #[test]
    fn zone_mistakes_name_the_place_and_the_fix() {
        let e = Spec::parse(
            r#"[[leaderboard]]
name = "x"
kinds = ["gift_sent"]
member = "user_id"
score = { name = "n", fn = "count" }
zone = "Asia/Shangai""#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("leaderboard x.zone") && e.contains("unknown time zone \"Asia/Shangai\""),
            "{e}"
        );
        let e = Spec::parse(
            r#"[[metric]]
name = "x"
kinds = ["gift_sent"]
window = "1h"
zone = "Asia/Shanghai"
aggregates = [{ name = "n", fn = "count" }]"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("metric x.zone") && e.contains("window = \"1d\" only"),
            "{e}"
        );
    }

    #[test]
    fn a_spec_without_zones_keeps_its_fingerprint() {
        // The values before zones existed: deployments that upgrade keep
        // their checkpoints (a new fingerprint means a full replay).
        let s = Spec::default_spec();
        assert_eq!(s.fingerprint(60_000, 5_000), "c9425fc837e8ae4f");
        assert_eq!(s.fingerprint(3_600_000, 5_000), "2de62255528c8914");
        let mut z = s.clone();
        z.leaderboards[0].zone = Some(crate::zone::parse_zone("Asia/Shanghai").unwrap());
        assert_ne!(z.fingerprint(60_000, 5_000), s.fingerprint(60_000, 5_000));
    }

    #[test]
    fn fingerprint_changes_with_the_spec_and_defaults() {
        let s = Spec::default_spec();
        let a = s.fingerprint(60_000, 5_000);
        assert_eq!(a, Spec::default_spec().fingerprint(60_000, 5_000));
        assert_ne!(a, s.fingerprint(30_000, 5_000));
        let mut t = s.clone();
        t.metrics.pop();
        assert_ne!(a, t.fingerprint(60_000, 5_000));
    }
}
