//! The TOML mapping file format, as written by users (see docs/mapping.md).
//! Parsed with unknown keys rejected, then compiled by `super::compile`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One raw format: which topic it comes from and how its JSON becomes
/// canonical events.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    /// Name shown in `Event.source.mapping`, metrics and errors.
    pub name: String,
    /// Raw topic read by default (without prefix); defaults to `name`.
    pub topic: Option<String>,
    /// IANA zone for zone-less times (default: ingest's `--time-zone`).
    pub time_zone: Option<String>,
    /// How far out of order this format's event times may come (default:
    /// ingest's `--max-out-of-orderness`), e.g. `"10s"`.
    pub max_out_of_orderness: Option<String>,
    /// Where the payload's own event id is; when absent or missing in a
    /// record, the id is `<topic>/<partition>/<offset>`.
    pub event_id: Option<FieldSpec>,
    /// Default time field for rules that do not name one.
    pub time: Option<TimeSpec>,
    /// Fields shared by every rule (a rule's own fields override them).
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    /// Tried in order; the first whose `when` holds decides the kind.
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Canonical kind, e.g. `video_played`.
    pub kind: String,
    pub when: Option<WhenSpec>,
    pub time: Option<TimeSpec>,
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
}

/// A condition on the record.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenSpec {
    /// Path of the field compared with `equals` / `one_of`, or tested by
    /// `present`.
    pub field: Option<String>,
    pub equals: Option<toml::Value>,
    pub one_of: Option<Vec<toml::Value>>,
    /// `true`: the field is present and not null.
    pub present: Option<bool>,
    /// `[a, b]`: time field `a` is later than time field `b`.
    pub later: Option<[String; 2]>,
}

/// A field: a JSON path (`a.b.0.c`), or a table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FieldSpec {
    Path(String),
    Table(FieldTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldTable {
    pub path: Option<String>,
    /// A constant instead of a path.
    #[serde(rename = "const")]
    pub constant: Option<toml::Value>,
    /// For ids: `string`, `number` or `any` (default) JSON type accepted.
    pub id_type: Option<String>,
    /// Multiply a numeric value (e.g. 1000 for seconds → `duration_ms`).
    pub scale: Option<f64>,
    /// Reject records without this field (ids the kind needs are always
    /// required).
    pub required: Option<bool>,
}

/// A time field: a path (format `auto`), or a table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TimeSpec {
    Path(String),
    Table(TimeTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeTable {
    pub path: String,
    /// `auto` (default), `rfc3339`, `local`, `epoch_s`, `epoch_ms` or a
    /// strftime pattern.
    pub format: Option<String>,
    /// Zone for zone-less times; overrides the mapping's.
    pub zone: Option<String>,
}
