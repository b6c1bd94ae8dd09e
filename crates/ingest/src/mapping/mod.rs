//! Mappings from a raw JSON format to the canonical event: the TOML spec
//! (`spec`), its compiled form (`Mapping`), and applying it to one parsed
//! record. Applying is pure: the same record and source always give the
//! same event (bar `ingest_time_ms`).

pub mod doc;
pub mod spec;
pub mod time;

use chrono_tz::Tz;
use serde_json::Value;
use vidpulse_proto::{self as pb, Kind, event::Payload};

use crate::reject::{Reason, Reject};
pub use doc::Doc;
use spec::{FieldSpec, MappingSpec, RuleSpec, TimeSpec, WhenSpec};
use time::{TimeError, TimeFormat};

/// A canonical field a mapping can fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    UserId,
    VideoId,
    AuthorId,
    RoomId,
    TargetId,
    AnchorId,
    ModuleId,
    Region,
    Url,
    Resolution,
    Action,
    Title,
    RoomType,
    Client,
    Address,
    Category,
    Province,
    Ip,
    GiftType,
    Amount,
    DurationMs,
    WatchMs,
    Grade,
    ArrivedAt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    Id,
    Text,
    Count,
    Time,
}

impl Target {
    const ALL: [Target; 24] = [
        Target::UserId,
        Target::VideoId,
        Target::AuthorId,
        Target::RoomId,
        Target::TargetId,
        Target::AnchorId,
        Target::ModuleId,
        Target::Region,
        Target::Url,
        Target::Resolution,
        Target::Action,
        Target::Title,
        Target::RoomType,
        Target::Client,
        Target::Address,
        Target::Category,
        Target::Province,
        Target::Ip,
        Target::GiftType,
        Target::Amount,
        Target::DurationMs,
        Target::WatchMs,
        Target::Grade,
        Target::ArrivedAt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::UserId => "user_id",
            Target::VideoId => "video_id",
            Target::AuthorId => "author_id",
            Target::RoomId => "room_id",
            Target::TargetId => "target_id",
            Target::AnchorId => "anchor_id",
            Target::ModuleId => "module_id",
            Target::Region => "region",
            Target::Url => "url",
            Target::Resolution => "resolution",
            Target::Action => "action",
            Target::Title => "title",
            Target::RoomType => "type",
            Target::Client => "client",
            Target::Address => "address",
            Target::Category => "category",
            Target::Province => "province",
            Target::Ip => "ip",
            Target::GiftType => "gift_type",
            Target::Amount => "amount",
            Target::DurationMs => "duration_ms",
            Target::WatchMs => "watch_ms",
            Target::Grade => "grade",
            Target::ArrivedAt => "arrived_at",
        }
    }

    fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    fn value_type(self) -> ValueType {
        use Target as T;
        match self {
            T::UserId
            | T::VideoId
            | T::AuthorId
            | T::RoomId
            | T::TargetId
            | T::AnchorId
            | T::ModuleId => ValueType::Id,
            T::Amount | T::DurationMs | T::WatchMs | T::Grade => ValueType::Count,
            T::ArrivedAt => ValueType::Time,
            _ => ValueType::Text,
        }
    }

    fn is_envelope(self) -> bool {
        matches!(
            self,
            Target::UserId | Target::VideoId | Target::AuthorId | Target::RoomId
        )
    }

    /// Whether the field belongs to events of `kind`.
    fn applies_to(self, kind: Kind) -> bool {
        use Target as T;
        self.is_envelope()
            || match kind {
                Kind::VideoUploaded => matches!(self, T::Title),
                Kind::VideoMetadata => matches!(self, T::Url | T::Resolution | T::DurationMs),
                Kind::PlayRequested => false,
                Kind::VideoPlayed => matches!(self, T::WatchMs),
                Kind::UserAction => matches!(self, T::Action | T::TargetId),
                Kind::ViewerArrived => matches!(self, T::Province | T::Region | T::Grade | T::Ip),
                Kind::ViewerLeft => matches!(
                    self,
                    T::Province | T::Region | T::Grade | T::Ip | T::ArrivedAt
                ),
                Kind::GiftSent => matches!(self, T::GiftType | T::Amount | T::Ip),
                Kind::LiveRoomStarted | Kind::LiveRoomEnded => {
                    matches!(
                        self,
                        T::RoomType | T::Client | T::Title | T::Address | T::AnchorId | T::ModuleId
                    )
                }
                Kind::VideoPublished => matches!(self, T::Category),
            }
    }
}

/// The fields an event of `kind` cannot do without.
fn required(kind: Kind) -> &'static [Target] {
    match kind {
        Kind::VideoUploaded | Kind::VideoMetadata | Kind::PlayRequested | Kind::VideoPlayed => {
            &[Target::VideoId]
        }
        Kind::UserAction => &[Target::Action],
        Kind::ViewerArrived | Kind::ViewerLeft => &[Target::UserId, Target::RoomId],
        Kind::GiftSent => &[Target::UserId, Target::GiftType, Target::Amount],
        Kind::LiveRoomStarted | Kind::LiveRoomEnded => &[Target::RoomId],
        Kind::VideoPublished => &[Target::AuthorId, Target::VideoId],
    }
}

/// Error in a mapping file; names the place and the fix.
#[derive(Debug, thiserror::Error)]
#[error("mapping {mapping}: {place}: {message}")]
pub struct MappingError {
    pub mapping: String,
    pub place: String,
    pub message: String,
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Clone, Debug)]
struct Path {
    text: String,
    segs: Vec<Seg>,
}

impl Path {
    fn new(text: &str) -> Result<Path, String> {
        if text.trim().is_empty() {
            return Err("empty path".into());
        }
        let segs = text
            .split('.')
            .map(|s| match s.parse::<usize>() {
                Ok(i) => Ok(Seg::Index(i)),
                Err(_) if s.is_empty() => Err(format!("empty segment in path {text:?}")),
                Err(_) => Ok(Seg::Key(s.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Path {
            text: text.to_owned(),
            segs,
        })
    }

    /// The value at this path, decoded; null counts as absent.
    fn get(&self, doc: &Doc<'_>) -> Option<Value> {
        let (first, rest) = self.segs.split_first()?;
        let raw = match first {
            Seg::Key(k) => doc.raw(k),
            Seg::Index(i) => doc.raw(&i.to_string()),
        }?;
        if rest.is_empty()
            && let Some(v) = simple_scalar(raw.get())
        {
            return Some(v);
        }
        let top: Value = serde_json::from_str(raw.get()).ok()?;
        if rest.is_empty() {
            return (!top.is_null()).then_some(top);
        }
        Self::walk(&top, rest).cloned()
    }

    /// A top-level field's text when it is a string without escapes: read
    /// in place, without building a [`Value`] (the hot path for times).
    fn plain_str<'d>(&self, doc: &Doc<'d>) -> Option<&'d str> {
        let [Seg::Key(k)] = self.segs.as_slice() else {
            return None;
        };
        plain_string(doc.raw(k)?.get())
    }

    fn walk<'v>(root: &'v Value, segs: &[Seg]) -> Option<&'v Value> {
        let mut v = root;
        for s in segs {
            v = match (s, v) {
                (Seg::Key(k), Value::Object(m)) => m.get(k)?,
                (Seg::Index(i), Value::Array(a)) => a.get(*i)?,
                (Seg::Index(i), Value::Object(m)) => m.get(&i.to_string())?,
                _ => return None,
            };
        }
        (!v.is_null()).then_some(v)
    }
}

/// The value of a raw JSON scalar that needs no decoding: a string without
/// escapes, or an integer that fits in i64. The common case on the hot path;
/// anything else (`None`) goes through serde_json.
/// The text of a raw JSON string without escapes (what it decodes to, as
/// it lies); `None` for anything else.
fn plain_string(raw: &str) -> Option<&str> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.bytes().any(|c| c == b'\\' || c == b'"' || c < 0x20)).then_some(inner)
}

fn simple_scalar(raw: &str) -> Option<Value> {
    let b = raw.as_bytes();
    if b.len() >= 2 && b[0] == b'"' && b[b.len() - 1] == b'"' {
        return plain_string(raw).map(|inner| Value::String(inner.to_owned()));
    }
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    if !digits.is_empty() && digits.len() <= 18 && digits.iter().all(u8::is_ascii_digit) {
        // No leading zeros in JSON ("0" is fine; serde_json reads "-0" as
        // a float).
        if digits[0] == b'0' && (digits.len() > 1 || digits.len() < b.len()) {
            return None;
        }
        return raw.parse::<i64>().ok().map(|i| Value::Number(i.into()));
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IdType {
    Any,
    String,
    Number,
}

#[derive(Clone, Debug)]
enum FieldSource {
    Path(Path),
    Const(Value),
}

#[derive(Clone, Debug)]
struct Field {
    target: Target,
    source: FieldSource,
    id_type: IdType,
    scale: Option<f64>,
    required: bool,
    /// Time format when the target is a time.
    time: Option<(TimeFormat, Tz)>,
}

#[derive(Clone, Debug)]
struct TimeField {
    path: Path,
    format: TimeFormat,
    zone: Tz,
}

#[derive(Clone, Debug)]
enum When {
    Always,
    OneOf(Path, Vec<Value>),
    Present(Path),
    Later(TimeField, TimeField),
}

#[derive(Clone, Debug)]
struct Rule {
    kind: Kind,
    when: When,
    time: TimeField,
    fields: Vec<Field>,
}

/// A compiled mapping.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub name: String,
    /// Default raw topic (unprefixed).
    pub topic: String,
    /// Allowed disorder of this format's event times (ms), when the mapping
    /// sets one (else ingest's `--max-out-of-orderness`).
    pub max_out_of_orderness_ms: Option<i64>,
    event_id: Option<Field>,
    rules: Vec<Rule>,
    /// Paths named in `when` clauses, reported when no rule matches.
    discriminators: Vec<Path>,
}

/// Where a raw record came from.
#[derive(Clone, Copy, Debug)]
pub struct SourceRef<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl Mapping {
    /// Parses and compiles a TOML mapping; `default_zone` applies where the
    /// file names none.
    pub fn from_toml(text: &str, default_zone: Tz) -> Result<Mapping, MappingError> {
        let spec: MappingSpec = toml::from_str(text).map_err(|e| MappingError {
            mapping: "<file>".into(),
            place: "syntax".into(),
            message: e.to_string(),
        })?;
        compile(spec, default_zone)
    }

    /// Applies the mapping to a parsed JSON object.
    pub fn apply(
        &self,
        record: &Doc<'_>,
        src: SourceRef<'_>,
        ingest_time_ms: i64,
    ) -> Result<pb::Event, Reject> {
        let rule = self.pick_rule(record)?;
        let event_time_ms = read_time(record, &rule.time)?;
        let event_id = match &self.event_id {
            Some(f) => match read_field(record, f)? {
                Some(Val::Text(id)) => id,
                _ => format!("{}/{}/{}", src.topic, src.partition, src.offset),
            },
            None => format!("{}/{}/{}", src.topic, src.partition, src.offset),
        };
        let mut b = Builder::default();
        for f in &rule.fields {
            if let Some(v) = read_field(record, f)? {
                b.set(f.target, v);
            } else if f.required || required(rule.kind).contains(&f.target) {
                return Err(missing(f));
            }
        }
        for t in required(rule.kind) {
            if !rule.fields.iter().any(|f| f.target == *t) {
                return Err(Reject::new(
                    Reason::MissingField,
                    format!(
                        "{} needs {} and mapping {} does not provide it",
                        rule.kind,
                        t.name(),
                        self.name
                    ),
                ));
            }
        }
        Ok(b.build(
            rule.kind,
            event_id,
            event_time_ms,
            ingest_time_ms,
            src,
            &self.name,
        ))
    }

    fn pick_rule(&self, record: &Doc<'_>) -> Result<&Rule, Reject> {
        for rule in &self.rules {
            let hit = match &rule.when {
                When::Always => true,
                When::OneOf(path, values) => path
                    .get(record)
                    .is_some_and(|v| values.iter().any(|x| loose_eq(x, &v))),
                When::Present(path) => path.get(record).is_some(),
                When::Later(a, b) => match (
                    read_optional_time(record, a)?,
                    read_optional_time(record, b)?,
                ) {
                    (Some(a), Some(b)) => a > b,
                    _ => false,
                },
            };
            if hit {
                return Ok(rule);
            }
        }
        // No rule matched: say why as precisely as the record allows.
        let values: Vec<(&Path, Option<Value>)> = self
            .discriminators
            .iter()
            .map(|p| (p, p.get(record)))
            .collect();
        if !values.is_empty() && values.iter().all(|(_, v)| v.is_none()) {
            let names: Vec<&str> = values.iter().map(|(p, _)| p.text.as_str()).collect();
            return Err(Reject::new(
                Reason::MissingField,
                format!(
                    "the field deciding the event type ({}) is absent or null",
                    names.join(", ")
                ),
            ));
        }
        if let Some((p, Some(v))) = values
            .iter()
            .find(|(_, v)| matches!(v, Some(Value::Object(_) | Value::Array(_) | Value::Bool(_))))
        {
            return Err(Reject::new(
                Reason::WrongType,
                format!(
                    "the field deciding the event type ({}) must be a string or number, got {}",
                    p.text,
                    type_name(v)
                ),
            ));
        }
        let seen: Vec<String> = values
            .iter()
            .map(|(p, v)| match v {
                Some(v) => format!("{} = {}", p.text, truncate(&v.to_string(), 40)),
                None => format!("{} absent", p.text),
            })
            .collect();
        Err(Reject::new(
            Reason::UnknownEventType,
            format!(
                "no rule of mapping {} matches ({})",
                self.name,
                seen.join(", ")
            ),
        ))
    }
}

/// Compares a `when` value with a record value: numbers and strings match
/// across types ("3" equals 3) since raw producers disagree on them.
fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::Number(n)) | (Value::Number(n), Value::String(x)) => {
            *x == n.to_string()
        }
        _ => a == b,
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn missing(f: &Field) -> Reject {
    let path = match &f.source {
        FieldSource::Path(p) => p.text.as_str(),
        FieldSource::Const(_) => "<const>",
    };
    Reject::new(
        Reason::MissingField,
        format!(
            "required field {} (path {path:?}) is absent or null",
            f.target.name()
        ),
    )
}

fn read_time(record: &Doc<'_>, t: &TimeField) -> Result<i64, Reject> {
    read_optional_time(record, t)?.ok_or_else(|| {
        Reject::new(
            Reason::MissingField,
            format!(
                "required time field (path {:?}) is absent or null",
                t.path.text
            ),
        )
    })
}

fn read_optional_time(record: &Doc<'_>, t: &TimeField) -> Result<Option<i64>, Reject> {
    if let Some(text) = t.path.plain_str(record) {
        return time::parse_text(text, &t.format, t.zone)
            .map(Some)
            .map_err(|e| time_error(e, "a string", &t.path.text));
    }
    let Some(v) = t.path.get(record) else {
        return Ok(None);
    };
    time_value(&v, &t.format, t.zone, &t.path.text).map(Some)
}

fn time_value(v: &Value, format: &TimeFormat, zone: Tz, path: &str) -> Result<i64, Reject> {
    time::parse(v, format, zone).map_err(|e| time_error(e, type_name(v), path))
}

fn time_error(e: TimeError, type_name: &str, path: &str) -> Reject {
    match e {
        TimeError::Unparseable(s) => Reject::new(
            Reason::UnparseableTime,
            format!("time field {path:?} = {s:?} matches no accepted format"),
        ),
        TimeError::OutOfRange(ms) => Reject::new(
            Reason::TimeOutOfRange,
            format!("time field {path:?} is {ms} ms since epoch, outside [2000-01-01, 2100-01-01)"),
        ),
        TimeError::WrongType => Reject::new(
            Reason::WrongType,
            format!("time field {path:?} must be a string or number, got {type_name}"),
        ),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

enum Val {
    Text(String),
    Count(i64),
    Time(i64),
}

fn read_field(record: &Doc<'_>, f: &Field) -> Result<Option<Val>, Reject> {
    let found;
    let (v, path) = match &f.source {
        FieldSource::Path(p) => match p.get(record) {
            // A string is moved out as it is: no copy on the hot path.
            Some(Value::String(s)) if matches!(f.target.value_type(), ValueType::Text) => {
                return Ok(Some(Val::Text(s)));
            }
            Some(Value::String(s))
                if f.target.value_type() == ValueType::Id
                    && f.id_type != IdType::Number
                    && !s.trim().is_empty() =>
            {
                return Ok(Some(Val::Text(s)));
            }
            Some(v) => {
                found = v;
                (&found, p.text.as_str())
            }
            None => return Ok(None),
        },
        FieldSource::Const(v) => (v, "<const>"),
    };
    let name = f.target.name();
    let wrong = |expected: &str| {
        Reject::new(
            Reason::WrongType,
            format!(
                "field {name} (path {path:?}) must be {expected}, got {}",
                type_name(v)
            ),
        )
    };
    Ok(Some(match f.target.value_type() {
        ValueType::Id => {
            let id = match (v, f.id_type) {
                (Value::String(s), IdType::Any | IdType::String) => s.clone(),
                (Value::Number(n), IdType::Any | IdType::Number) => {
                    integral(n).map(|i| i.to_string()).ok_or_else(|| {
                        Reject::new(
                            Reason::InvalidId,
                            format!("id {name} (path {path:?}) = {n} is not an integer"),
                        )
                    })?
                }
                (_, IdType::String) => return Err(wrong("a string id")),
                (_, IdType::Number) => return Err(wrong("a numeric id")),
                _ => return Err(wrong("a string or integer id")),
            };
            if id.trim().is_empty() {
                return Err(Reject::new(
                    Reason::InvalidId,
                    format!("id {name} (path {path:?}) is empty"),
                ));
            }
            Val::Text(id)
        }
        ValueType::Text => match v {
            Value::String(s) => Val::Text(s.clone()),
            Value::Number(n) => Val::Text(n.to_string()),
            _ => return Err(wrong("a string or number")),
        },
        ValueType::Count => {
            let invalid = |what: String| {
                Reject::new(
                    Reason::InvalidValue,
                    format!("field {name} (path {path:?}) {what}"),
                )
            };
            let x = match v {
                Value::Number(n) => n
                    .as_f64()
                    .ok_or_else(|| invalid("is not a number".into()))?,
                Value::String(s) => s
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| invalid(format!("= {s:?} is not a number")))?,
                _ => return Err(wrong("a number")),
            };
            let x = x * f.scale.unwrap_or(1.0);
            if !x.is_finite() || !(0.0..=9.0e15).contains(&x) {
                return Err(invalid(format!("= {x} is negative or out of range")));
            }
            if f.scale.is_none() && x.fract() != 0.0 {
                return Err(invalid(format!("= {x} is not a whole number")));
            }
            if f.target == Target::Grade && x > f64::from(i32::MAX) {
                return Err(invalid(format!("= {x} is out of range")));
            }
            Val::Count(x.round() as i64)
        }
        ValueType::Time => {
            let (format, zone) = f.time.clone().unwrap_or((TimeFormat::Auto, chrono_tz::UTC));
            Val::Time(time_value(v, &format, zone, path)?)
        }
    }))
}

/// An integer id from a JSON number (floats only when integral).
fn integral(n: &serde_json::Number) -> Option<i128> {
    if let Some(i) = n.as_i64() {
        return Some(i.into());
    }
    if let Some(u) = n.as_u64() {
        return Some(u.into());
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i128)
}

/// Collects field values, then builds the event of a kind.
#[derive(Default)]
struct Builder {
    user_id: String,
    video_id: String,
    author_id: String,
    room_id: String,
    // On the stack: a record has a handful of these.
    text: smallvec::SmallVec<[(Target, String); 8]>,
    counts: smallvec::SmallVec<[(Target, i64); 8]>,
    arrived_at: i64,
}

impl Builder {
    fn set(&mut self, t: Target, v: Val) {
        match (t, v) {
            (Target::UserId, Val::Text(s)) => self.user_id = s,
            (Target::VideoId, Val::Text(s)) => self.video_id = s,
            (Target::AuthorId, Val::Text(s)) => self.author_id = s,
            (Target::RoomId, Val::Text(s)) => self.room_id = s,
            (t, Val::Text(s)) => self.text.push((t, s)),
            (t, Val::Count(n)) => self.counts.push((t, n)),
            (_, Val::Time(ms)) => self.arrived_at = ms,
        }
    }

    fn text(&self, t: Target) -> String {
        self.text
            .iter()
            .rev()
            .find(|(x, _)| *x == t)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    fn count(&self, t: Target) -> Option<i64> {
        self.counts
            .iter()
            .rev()
            .find(|(x, _)| *x == t)
            .map(|(_, n)| *n)
    }

    fn viewer(&self) -> pb::Viewer {
        pb::Viewer {
            province: self.text(Target::Province),
            region: self.text(Target::Region),
            grade: self.count(Target::Grade).unwrap_or(0) as i32,
            ip: self.text(Target::Ip),
        }
    }

    fn room(&self) -> pb::Room {
        pb::Room {
            r#type: self.text(Target::RoomType),
            client: self.text(Target::Client),
            title: self.text(Target::Title),
            address: self.text(Target::Address),
            anchor_id: self.text(Target::AnchorId),
            module_id: self.text(Target::ModuleId),
        }
    }

    fn build(
        self,
        kind: Kind,
        event_id: String,
        event_time_ms: i64,
        ingest_time_ms: i64,
        src: SourceRef<'_>,
        mapping: &str,
    ) -> pb::Event {
        let payload = match kind {
            Kind::VideoUploaded => Payload::VideoUploaded(pb::VideoUploaded {
                title: self.text(Target::Title),
            }),
            Kind::VideoMetadata => Payload::VideoMetadata(pb::VideoMetadata {
                url: self.text(Target::Url),
                resolution: self.text(Target::Resolution),
                duration_ms: self.count(Target::DurationMs).unwrap_or(0),
            }),
            Kind::PlayRequested => Payload::PlayRequested(pb::PlayRequested {}),
            Kind::VideoPlayed => Payload::VideoPlayed(pb::VideoPlayed {
                watch_ms: self.count(Target::WatchMs),
            }),
            Kind::UserAction => Payload::UserAction(pb::UserAction {
                action: self.text(Target::Action),
                target_id: self.text(Target::TargetId),
            }),
            Kind::ViewerArrived => Payload::ViewerArrived(pb::ViewerArrived {
                viewer: Some(self.viewer()),
            }),
            Kind::ViewerLeft => Payload::ViewerLeft(pb::ViewerLeft {
                viewer: Some(self.viewer()),
                arrived_at_ms: self.arrived_at,
            }),
            Kind::GiftSent => Payload::GiftSent(pb::GiftSent {
                gift_type: self.text(Target::GiftType),
                amount: self.count(Target::Amount).unwrap_or(0),
                ip: self.text(Target::Ip),
            }),
            Kind::LiveRoomStarted => Payload::LiveRoomStarted(pb::LiveRoomStarted {
                room: Some(self.room()),
            }),
            Kind::LiveRoomEnded => Payload::LiveRoomEnded(pb::LiveRoomEnded {
                room: Some(self.room()),
            }),
            Kind::VideoPublished => Payload::VideoPublished(pb::VideoPublished {
                category: self.text(Target::Category),
            }),
        };
        pb::Event {
            event_id,
            event_time_ms,
            ingest_time_ms,
            source: Some(pb::Source {
                topic: src.topic.to_owned(),
                partition: src.partition,
                offset: src.offset,
                mapping: mapping.to_owned(),
            }),
            schema_version: pb::SCHEMA_VERSION,
            user_id: self.user_id,
            video_id: self.video_id,
            author_id: self.author_id,
            room_id: self.room_id,
            payload: Some(payload),
        }
    }
}

// ---- compiling a spec ----

fn compile(spec: MappingSpec, default_zone: Tz) -> Result<Mapping, MappingError> {
    let name = spec.name.clone();
    let err = |place: &str, message: String| MappingError {
        mapping: name.clone(),
        place: place.to_owned(),
        message,
    };
    let zone = match &spec.time_zone {
        Some(z) => parse_zone(z).map_err(|m| err("time_zone", m))?,
        None => default_zone,
    };
    let max_out_of_orderness_ms = spec
        .max_out_of_orderness
        .as_deref()
        .map(|d| {
            humantime::parse_duration(d)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .map_err(|e| {
                    err(
                        "max_out_of_orderness",
                        format!("{d:?}: {e}; write a duration such as \"10s\""),
                    )
                })
        })
        .transpose()?;
    if spec.rules.is_empty() {
        return Err(err(
            "rules",
            "at least one [[rules]] entry is needed".into(),
        ));
    }
    for key in spec.fields.keys() {
        let t =
            Target::parse(key).ok_or_else(|| err(&format!("fields.{key}"), unknown_target(key)))?;
        let used = spec
            .rules
            .iter()
            .any(|r| Kind::parse(&r.kind).is_some_and(|k| t.applies_to(k)));
        if !used {
            return Err(err(
                &format!("fields.{key}"),
                format!("{key} applies to none of the rules' kinds"),
            ));
        }
    }
    let event_id = match &spec.event_id {
        Some(f) => Some(compile_field(Target::UserId, f, zone).map_err(|m| err("event_id", m))?),
        None => None,
    };
    let mut rules = Vec::new();
    let mut discriminators: Vec<Path> = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let place = format!("rules[{i}]");
        let rule = compile_rule(r, &spec, zone).map_err(|m| err(&place, m))?;
        let paths: Vec<&Path> = match &rule.when {
            When::OneOf(p, _) | When::Present(p) => vec![p],
            When::Later(a, b) => vec![&a.path, &b.path],
            When::Always => vec![],
        };
        for p in paths {
            if !discriminators.iter().any(|d| d.text == p.text) {
                discriminators.push(p.clone());
            }
        }
        rules.push(rule);
    }
    Ok(Mapping {
        topic: spec.topic.clone().unwrap_or_else(|| spec.name.clone()),
        max_out_of_orderness_ms,
        name,
        event_id,
        rules,
        discriminators,
    })
}

fn unknown_target(key: &str) -> String {
    let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
    format!(
        "unknown field {key:?}; canonical fields are {}",
        names.join(", ")
    )
}

fn parse_zone(z: &str) -> Result<Tz, String> {
    z.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {z:?}; use an IANA name such as Asia/Shanghai or UTC")
    })
}

fn compile_rule(r: &RuleSpec, spec: &MappingSpec, zone: Tz) -> Result<Rule, String> {
    let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    let kind = Kind::parse(&r.kind)
        .ok_or_else(|| format!("unknown kind {:?}; kinds are {}", r.kind, names.join(", ")))?;
    let time = match r.time.as_ref().or(spec.time.as_ref()) {
        Some(t) => compile_time(t, zone)?,
        None => return Err("no time field: set `time` on the rule or the mapping".into()),
    };
    let when = match &r.when {
        None => When::Always,
        Some(w) => compile_when(w, zone)?,
    };
    let mut fields = Vec::new();
    for (key, f) in spec
        .fields
        .iter()
        .filter(|(k, _)| !r.fields.contains_key(*k))
        .chain(r.fields.iter())
    {
        let t =
            Target::parse(key).ok_or_else(|| format!("fields.{key}: {}", unknown_target(key)))?;
        if !t.applies_to(kind) {
            if r.fields.contains_key(key) {
                return Err(format!("fields.{key}: {kind} events have no {key}"));
            }
            continue; // a shared field for other kinds
        }
        fields.push(compile_field(t, f, zone).map_err(|m| format!("fields.{key}: {m}"))?);
    }
    Ok(Rule {
        kind,
        when,
        time,
        fields,
    })
}

fn compile_time(t: &TimeSpec, zone: Tz) -> Result<TimeField, String> {
    Ok(match t {
        TimeSpec::Path(p) => TimeField {
            path: Path::new(p)?,
            format: TimeFormat::Auto,
            zone,
        },
        TimeSpec::Table(t) => TimeField {
            path: Path::new(&t.path)?,
            format: TimeFormat::parse(t.format.as_deref().unwrap_or("auto"))?,
            zone: match &t.zone {
                Some(z) => parse_zone(z)?,
                None => zone,
            },
        },
    })
}

fn compile_when(w: &WhenSpec, zone: Tz) -> Result<When, String> {
    if let Some([a, b]) = &w.later {
        let tf = |p: &str| compile_time(&TimeSpec::Path(p.to_owned()), zone);
        return Ok(When::Later(tf(a)?, tf(b)?));
    }
    let field = w
        .field
        .as_deref()
        .ok_or("`when` needs `field` (with equals, one_of or present) or `later`")?;
    let path = Path::new(field)?;
    if w.present == Some(true) {
        return Ok(When::Present(path));
    }
    let mut values: Vec<Value> = Vec::new();
    if let Some(v) = &w.equals {
        values.push(toml_to_json(v)?);
    }
    for v in w.one_of.iter().flatten() {
        values.push(toml_to_json(v)?);
    }
    if values.is_empty() {
        return Err("`when` needs `equals`, `one_of` or `present = true`".into());
    }
    Ok(When::OneOf(path, values))
}

fn toml_to_json(v: &toml::Value) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot use {v}: {e}"))
}

fn compile_field(target: Target, f: &FieldSpec, zone: Tz) -> Result<Field, String> {
    let mut field = Field {
        target,
        source: FieldSource::Const(Value::Null),
        id_type: IdType::Any,
        scale: None,
        required: false,
        time: None,
    };
    match f {
        FieldSpec::Path(p) => field.source = FieldSource::Path(Path::new(p)?),
        FieldSpec::Table(t) => {
            field.source = match (&t.path, &t.constant) {
                (Some(p), None) => FieldSource::Path(Path::new(p)?),
                (None, Some(c)) => FieldSource::Const(toml_to_json(c)?),
                _ => return Err("give exactly one of `path` or `const`".into()),
            };
            if let Some(it) = &t.id_type {
                if target.value_type() != ValueType::Id {
                    return Err("`id_type` applies to id fields only".into());
                }
                field.id_type = match it.as_str() {
                    "any" => IdType::Any,
                    "string" => IdType::String,
                    "number" => IdType::Number,
                    other => return Err(format!("id_type {other:?}: use string, number or any")),
                };
            }
            if let Some(s) = t.scale {
                if target.value_type() != ValueType::Count || !(s.is_finite() && s > 0.0) {
                    return Err("`scale` must be a positive number on a numeric field".into());
                }
                field.scale = Some(s);
            }
            field.required = t.required.unwrap_or(false);
        }
    }
    if target.value_type() == ValueType::Time {
        field.time = Some((TimeFormat::Auto, zone));
    }
    Ok(field)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_scalar_fast_path_agrees_with_serde_json() {
        let cases = [
            r#""abc""#,
            r#""""#,
            r#""浙江""#,
            r#""a\"b""#,
            r#""a\u0062""#,
            r#""tab\there""#,
            "0",
            "-0",
            "7",
            "-42",
            "123456789012345678",
            "1234567890123456789",
            "99999999999999999999",
            "1.5",
            "1e3",
            "-",
            "true",
            "null",
            "[1]",
            r#"{"a":1}"#,
        ];
        for raw in cases {
            let want: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
            if let Some(got) = simple_scalar(raw) {
                assert_eq!(got, want, "{raw}");
            }
        }
        // The common cases take the fast path.
        assert!(simple_scalar(r#""u-5""#).is_some());
        assert!(simple_scalar("20210813").is_some());
        assert!(simple_scalar(r#""a\"b""#).is_none());
        assert!(simple_scalar("1.5").is_none());
    }
}
