//! The T+1 profile loader behind `vidpulse dims load`: reads anchor or
//! viewer profiles, or the room → module map, from CSV (with a header) or
//! JSON lines, and writes them to Redis hashes in pipelined chunks through
//! `load.lua`, which never overwrites a field that live events changed more
//! recently than the load's as-of time, nor a newer load.
//!
//! Delivery guarantee: every row read is either written, found older than
//! what Redis holds (skipped), or reported as bad with its line number. The
//! script is idempotent, so a chunk is resent after a connection error and
//! a failed load can simply be run again.

use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use redis::{Pipeline, Value};
use serde::Serialize;

use crate::model::load_field_version;
use crate::plan::{ROOM_SHARED, VIEWER_SHARED};
use crate::store::{self, LOAD_SCRIPT, Store, StoreError};
use crate::{REDIS_SECONDS, STAGE};

/// What a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DimKind {
    /// Anchor profiles → `anchor:{anchor_id}`.
    Anchor,
    /// Viewer profiles → `viewer:{user_id}`.
    Viewer,
    /// The room → module map → field `module_id` of `room:{room_id}`.
    RoomModule,
}

impl DimKind {
    pub fn default_prefix(self) -> &'static str {
        match self {
            DimKind::Anchor => "anchor:",
            DimKind::Viewer => "viewer:",
            DimKind::RoomModule => "room:",
        }
    }

    /// Columns that may hold the row's id, by preference.
    pub fn id_columns(self) -> &'static [&'static str] {
        match self {
            DimKind::Anchor => &["anchor_id", "id"],
            DimKind::Viewer => &["user_id", "viewer_id", "id"],
            DimKind::RoomModule => &["room_id", "id"],
        }
    }

    /// Fields live events also write: versioned per field.
    pub fn shared(self) -> &'static [&'static str] {
        match self {
            DimKind::Anchor => &[],
            DimKind::Viewer => VIEWER_SHARED,
            DimKind::RoomModule => ROOM_SHARED,
        }
    }
}

/// Input format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// From a file name: `.csv`; `.jsonl`, `.ndjson` or `.json`.
    pub fn detect(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

/// A valid row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// 1-based line of the input.
    pub line: u64,
    pub id: String,
    pub fields: Vec<(String, String)>,
}

/// A row that was not loaded, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BadRow {
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Input(String),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("line {}: {} (--strict stops at the first bad row; rows of earlier chunks are loaded, and loading again is safe)", .0.line, .0.reason)]
    Strict(BadRow),
}

/// Counts the bytes read through it (for progress).
struct Counting<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

enum Source<R: BufRead> {
    Csv {
        rdr: csv::Reader<R>,
        headers: Vec<String>,
        id_col: usize,
        record: csv::StringRecord,
    },
    Jsonl {
        r: Counting<R>,
        line: u64,
        buf: String,
    },
}

/// Rows of one input, parsed and checked for `kind`.
pub struct Rows<R: BufRead> {
    kind: DimKind,
    src: Source<R>,
}

impl<R: BufRead> Rows<R> {
    /// Reads the CSV header now (a header without an id column, or with a
    /// reserved column name, is an error).
    pub fn new(kind: DimKind, format: Format, reader: R) -> Result<Rows<R>, LoadError> {
        let src = match format {
            Format::Jsonl => Source::Jsonl {
                r: Counting {
                    inner: reader,
                    bytes: 0,
                },
                line: 0,
                buf: String::new(),
            },
            Format::Csv => {
                let mut rdr = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(false)
                    .trim(csv::Trim::All)
                    .from_reader(reader);
                let headers: Vec<String> = rdr
                    .headers()
                    .map_err(|e| LoadError::Input(format!("CSV header: {e}")))?
                    .iter()
                    .map(|h| h.trim_start_matches('\u{feff}').to_owned())
                    .collect();
                let id_col = kind
                    .id_columns()
                    .iter()
                    .find_map(|c| headers.iter().position(|h| h == c))
                    .ok_or_else(|| {
                        LoadError::Input(format!(
                            "CSV header has no id column (one of {}); found {}",
                            kind.id_columns().join(", "),
                            headers.join(",")
                        ))
                    })?;
                if let Some(h) = headers.iter().find(|h| h.starts_with('_')) {
                    return Err(LoadError::Input(format!(
                        "CSV column {h:?}: names starting with '_' are reserved for bookkeeping fields"
                    )));
                }
                if kind == DimKind::RoomModule && !headers.iter().any(|h| h == "module_id") {
                    return Err(LoadError::Input(
                        "CSV header has no module_id column".into(),
                    ));
                }
                Source::Csv {
                    rdr,
                    headers,
                    id_col,
                    record: csv::StringRecord::new(),
                }
            }
        };
        Ok(Rows { kind, src })
    }

    /// Bytes of input consumed so far.
    pub fn bytes_read(&self) -> u64 {
        match &self.src {
            Source::Csv { rdr, .. } => rdr.position().byte(),
            Source::Jsonl { r, .. } => r.bytes,
        }
    }

    /// The next row, a bad row, or `None` at the end. An I/O error is fatal.
    pub fn next_row(&mut self) -> Result<Option<Result<Row, BadRow>>, LoadError> {
        let kind = self.kind;
        match &mut self.src {
            Source::Csv {
                rdr,
                headers,
                id_col,
                record,
            } => match rdr.read_record(record) {
                Ok(false) => Ok(None),
                Ok(true) => {
                    let line = record.position().map_or(0, |p| p.line());
                    let id = record.get(*id_col).unwrap_or("");
                    let pairs = headers
                        .iter()
                        .zip(record.iter())
                        .enumerate()
                        .filter(|(i, _)| i != id_col)
                        .map(|(_, (h, v))| (h.as_str(), v));
                    Ok(Some(make_row(kind, line, id, pairs)))
                }
                Err(e) => {
                    if let csv::ErrorKind::Io(_) = e.kind() {
                        return Err(LoadError::Input(format!("read failed: {e}")));
                    }
                    let line = e.position().map_or(0, |p| p.line());
                    let reason = match e.kind() {
                        csv::ErrorKind::UnequalLengths {
                            expected_len, len, ..
                        } => {
                            format!("{len} fields, the header has {expected_len}")
                        }
                        csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_owned(),
                        _ => e.to_string(),
                    };
                    Ok(Some(Err(BadRow { line, reason })))
                }
            },
            Source::Jsonl { r, line, buf } => loop {
                buf.clear();
                let n = match r.inner.read_line(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        // Not UTF-8: skip the rest of the line, report it.
                        *line += 1;
                        let mut raw = Vec::new();
                        let skipped = r.inner.read_until(b'\n', &mut raw)?;
                        r.bytes += skipped as u64;
                        return Ok(Some(Err(BadRow {
                            line: *line,
                            reason: "not UTF-8".into(),
                        })));
                    }
                    Err(e) => return Err(e.into()),
                };
                if n == 0 {
                    return Ok(None);
                }
                r.bytes += n as u64;
                *line += 1;
                let text = buf.trim();
                if text.is_empty() {
                    continue;
                }
                return Ok(Some(json_row(kind, *line, text)));
            },
        }
    }
}

fn json_row(kind: DimKind, line: u64, text: &str) -> Result<Row, BadRow> {
    let bad = |reason: String| BadRow { line, reason };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let serde_json::Value::Object(obj) = v else {
        return Err(bad("not a JSON object".into()));
    };
    let mut pairs: Vec<(&str, String)> = Vec::with_capacity(obj.len());
    for (k, v) in &obj {
        let s = match v {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(bad(format!(
                    "field {k:?} is not a string, number or boolean"
                )));
            }
        };
        pairs.push((k.as_str(), s));
    }
    let id_name = kind
        .id_columns()
        .iter()
        .find(|c| pairs.iter().any(|(k, _)| k == *c))
        .copied();
    let id = id_name
        .and_then(|c| pairs.iter().find(|(k, _)| *k == c))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    make_row(
        kind,
        line,
        &id,
        pairs
            .iter()
            .filter(|(k, _)| Some(*k) != id_name)
            .map(|(k, v)| (*k, v.as_str())),
    )
}

/// Checks one row: an id, at least one value, no reserved names; the
/// room-module kind takes `module_id` only.
fn make_row<'a>(
    kind: DimKind,
    line: u64,
    id: &str,
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<Row, BadRow> {
    let bad = |reason: String| Err(BadRow { line, reason });
    let id = id.trim();
    if id.is_empty() {
        return bad(format!("no id (column {})", kind.id_columns().join(" or ")));
    }
    let mut fields = Vec::new();
    for (k, v) in pairs {
        let v = v.trim();
        if kind == DimKind::RoomModule && k != "module_id" {
            continue;
        }
        if k.starts_with('_') {
            return bad(format!("field {k:?}: names starting with '_' are reserved"));
        }
        if k.is_empty() {
            return bad("a field without a name".into());
        }
        if !v.is_empty() {
            fields.push((k.to_owned(), v.to_owned()));
        }
    }
    if fields.is_empty() {
        return bad(if kind == DimKind::RoomModule {
            "no module_id".into()
        } else {
            "no values besides the id".into()
        });
    }
    Ok(Row {
        line,
        id: id.to_owned(),
        fields,
    })
}

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadSettings {
    pub kind: DimKind,
    pub key_prefix: String,
    /// The rows' version: the snapshot time, ms. Live changes newer than it
    /// win.
    pub as_of_ms: i64,
    /// TTL in ms (0: none).
    pub ttl_ms: i64,
    /// Rows per pipeline (one round trip).
    pub chunk: usize,
    /// Rows per script call inside a pipeline.
    pub rows_per_call: usize,
    /// Pipelines sent and not yet answered.
    pub in_flight: usize,
    pub strict: bool,
    /// Resends of a chunk after a connection error before giving up.
    pub retries: u32,
}

/// Where the load is (for a progress bar).
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub rows_done: u64,
    pub bytes_read: u64,
}

/// Most bad rows kept for the report (all are counted).
pub const MAX_BAD_ROWS_REPORTED: usize = 1000;

/// The outcome of a load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Valid rows read.
    pub rows: u64,
    /// Rows with at least one field written.
    pub loaded: u64,
    /// Rows with nothing written: every field older than what Redis holds.
    pub skipped: u64,
    /// Fields not written because live data (or a newer load) was newer.
    pub fields_kept: u64,
    /// Bad rows (including keys that hold a non-hash value).
    pub bad: u64,
    /// The first bad rows, by line.
    pub bad_rows: Vec<BadRow>,
    pub seconds: f64,
}

impl Summary {
    fn add_bad(&mut self, b: BadRow) {
        self.bad += 1;
        if self.bad_rows.len() < MAX_BAD_ROWS_REPORTED {
            self.bad_rows.push(b);
        }
    }
}

struct Chunk {
    pipe: Pipeline,
    /// Per script call: the lines of its rows.
    calls: Vec<Vec<u64>>,
}

type Pending = (
    Chunk,
    tokio::task::JoinHandle<Result<Vec<Value>, StoreError>>,
);

/// Loads every row of `rows`; calls `progress` after each chunk.
pub async fn load<R: BufRead>(
    store: &mut Store,
    s: &LoadSettings,
    rows: &mut Rows<R>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Summary, LoadError> {
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut done = Progress::default();
    let chunk_rows = s.chunk.max(1);
    let mut batch: Vec<Row> = Vec::with_capacity(chunk_rows);
    let mut strict_error = None;
    let mut conn = connect(store, s.retries).await?;
    'read: loop {
        batch.clear();
        while batch.len() < chunk_rows {
            match rows.next_row()? {
                None => break,
                Some(Ok(row)) => batch.push(row),
                Some(Err(bad)) => {
                    if s.strict {
                        strict_error = Some(bad);
                        break 'read;
                    }
                    summary.add_bad(bad);
                }
            }
        }
        if batch.is_empty() {
            break;
        }
        summary.rows += batch.len() as u64;
        let chunk = build_chunk(s, &batch, store.is_cluster());
        let mut c = conn.clone();
        let pipe = chunk.pipe.clone();
        let handle = tokio::spawn(async move { store::exec(&mut c, &pipe).await });
        pending.push_back((chunk, handle));
        done.bytes_read = rows.bytes_read();
        while pending.len() >= s.in_flight.max(1) {
            if let Some(p) = pending.pop_front() {
                finish(store, &mut conn, s, p, &mut summary, &mut done).await?;
                progress(done);
            }
        }
    }
    while let Some(p) = pending.pop_front() {
        finish(store, &mut conn, s, p, &mut summary, &mut done).await?;
        progress(done);
    }
    if let Some(bad) = strict_error {
        return Err(LoadError::Strict(bad));
    }
    summary.bad_rows.sort_by_key(|b| b.line);
    if s.strict
        && let Some(bad) = summary.bad_rows.first()
    {
        // A row Redis refused (its key is not a hash) surfaces only now.
        return Err(LoadError::Strict(bad.clone()));
    }
    done.bytes_read = rows.bytes_read();
    progress(done);
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn connect(
    store: &mut Store,
    retries: u32,
) -> Result<vidpulse_core::redis::RedisConn, LoadError> {
    let mut attempt = 0;
    loop {
        match store.connection().await {
            Ok(c) => return Ok(c),
            Err(e) if e.retriable && attempt < retries => {
                attempt += 1;
                let wait = backoff(attempt);
                tracing::warn!(error = %e, retry_in = ?wait, "Redis unavailable; retrying.");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64 << attempt.min(5))
}

/// Waits for a chunk; resends it (on a new connection) after a connection
/// error; adds its replies to the summary.
async fn finish(
    store: &mut Store,
    conn: &mut vidpulse_core::redis::RedisConn,
    s: &LoadSettings,
    (chunk, handle): Pending,
    summary: &mut Summary,
    done: &mut Progress,
) -> Result<(), LoadError> {
    let sent = Instant::now();
    let mut result = handle.await.unwrap_or_else(|e| {
        Err(StoreError {
            message: format!("load task failed: {e}"),
            retriable: false,
        })
    });
    let mut attempt = 0;
    while let Err(e) = &result {
        if !e.retriable || attempt >= s.retries {
            break;
        }
        attempt += 1;
        let wait = backoff(attempt);
        tracing::warn!(error = %e, retry_in = ?wait, "Chunk failed; resending.");
        tokio::time::sleep(wait).await;
        store.forget();
        result = match connect(store, s.retries).await {
            Ok(c) => {
                *conn = c;
                store::exec(conn, &chunk.pipe).await
            }
            Err(LoadError::Store(e)) => Err(e),
            Err(other) => return Err(other),
        };
    }
    let replies = result?;
    metrics::histogram!(REDIS_SECONDS, "stage" => STAGE, "op" => "load")
        .record(sent.elapsed().as_secs_f64());
    if replies.len() != chunk.calls.len() {
        return Err(LoadError::Store(StoreError {
            message: format!("{} replies to {} calls", replies.len(), chunk.calls.len()),
            retriable: false,
        }));
    }
    for (lines, reply) in chunk.calls.iter().zip(replies) {
        let (written, kept, failed) = parse_reply(&reply).map_err(|m| {
            LoadError::Store(StoreError {
                message: format!(
                    "rows at lines {}..{}: {m}",
                    lines.first().unwrap_or(&0),
                    lines.last().unwrap_or(&0)
                ),
                retriable: false,
            })
        })?;
        summary.loaded += written;
        summary.fields_kept += kept;
        for i in &failed {
            if let Some(line) = lines.get(i.saturating_sub(1)) {
                summary.rows -= 1;
                summary.add_bad(BadRow {
                    line: *line,
                    reason: "the key holds a value that is not a hash".into(),
                });
            }
        }
        summary.skipped += lines.len() as u64 - written - failed.len() as u64;
        done.rows_done += lines.len() as u64;
    }
    Ok(())
}

fn parse_reply(v: &Value) -> Result<(u64, u64, Vec<usize>), String> {
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).map_err(|_| format!("negative count {n}")),
        other => Err(format!("unexpected reply {other:?}")),
    };
    match v {
        Value::Array(items) if items.len() == 3 => {
            let failed = match &items[2] {
                Value::Array(f) => f
                    .iter()
                    .map(|x| int(x).map(|n| n as usize))
                    .collect::<Result<Vec<_>, _>>()?,
                Value::Nil => Vec::new(),
                other => return Err(format!("unexpected reply {other:?}")),
            };
            Ok((int(&items[0])?, int(&items[1])?, failed))
        }
        Value::ServerError(e) => Err(format!("{} {}", e.code(), e.details().unwrap_or(""))),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// The rows of each script call: `rows_per_call` at a time, in file order;
/// `by_slot` (Redis Cluster: a script's keys must share a hash slot): rows
/// of one slot together, a slot's rows in file order.
fn call_groups<'a>(s: &LoadSettings, rows: &'a [Row], by_slot: bool) -> Vec<Vec<&'a Row>> {
    let per_call = s.rows_per_call.max(1);
    if !by_slot {
        return rows.chunks(per_call).map(|c| c.iter().collect()).collect();
    }
    let mut slots: Vec<Vec<&Row>> = Vec::new();
    let mut at: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    for r in rows {
        let slot = vidpulse_core::redis::slot(format!("{}{}", s.key_prefix, r.id).as_bytes());
        let i = *at.entry(slot).or_insert_with(|| {
            slots.push(Vec::new());
            slots.len() - 1
        });
        slots[i].push(r);
    }
    slots
        .iter()
        .flat_map(|g| g.chunks(per_call).map(<[&Row]>::to_vec))
        .collect()
}

fn build_chunk(s: &LoadSettings, rows: &[Row], by_slot: bool) -> Chunk {
    let mut pipe = redis::pipe();
    let mut calls = Vec::new();
    let fvs = load_field_version(s.as_of_ms);
    let shared = s.kind.shared();
    let mode = if s.kind == DimKind::RoomModule {
        "r"
    } else {
        "p"
    };
    for group in call_groups(s, rows, by_slot) {
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(LOAD_SCRIPT.get_hash())
            .arg(group.len());
        for r in &group {
            cmd.arg(format!("{}{}", s.key_prefix, r.id));
        }
        cmd.arg(s.as_of_ms)
            .arg(&fvs)
            .arg(s.ttl_ms)
            .arg(mode)
            .arg(shared.len());
        for f in shared {
            cmd.arg(*f);
        }
        // The call's field names once (rows of one file nearly always have
        // the same), then each row's values in that order, '' for none.
        let mut names: Vec<&str> = Vec::new();
        for r in &group {
            for (k, _) in &r.fields {
                if !names.contains(&k.as_str()) {
                    names.push(k);
                }
            }
        }
        cmd.arg(names.len());
        for n in &names {
            cmd.arg(*n);
        }
        for r in &group {
            for n in &names {
                let v = r
                    .fields
                    .iter()
                    .find(|(k, _)| k == n)
                    .map_or("", |(_, v)| v.as_str());
                cmd.arg(v);
            }
        }
        calls.push(group.iter().map(|r| r.line).collect());
    }
    Chunk { pipe, calls }
}

/// Parses `--as-of`: `now`, epoch milliseconds, or RFC 3339 with an offset
/// (`2021-08-16T00:00:00+08:00`).
pub fn parse_as_of(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("now") {
        return Ok(chrono::Utc::now().timestamp_millis());
    }
    if let Ok(ms) = s.parse::<i64>() {
        return if ms >= 0 {
            Ok(ms)
        } else {
            Err("must not be negative".into())
        };
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| format!("{s:?} is not `now`, epoch milliseconds or an RFC 3339 time such as 2021-08-16T00:00:00+08:00"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn all(kind: DimKind, format: Format, text: &str) -> Vec<Result<Row, BadRow>> {
        let mut rows = Rows::new(kind, format, text.as_bytes()).unwrap();
        let mut out = Vec::new();
        while let Some(r) = rows.next_row().unwrap() {
            out.push(r);
        }
        assert_eq!(rows.bytes_read(), text.len() as u64);
        out
    }

    fn f(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).into(), (*b).into()))
            .collect()
    }

    #[test]
    fn csv_rows_and_bad_rows_with_lines() {
        let text = "user_id,province,grade,region\n\
                    3165,浙江,1,1122\n\
                    3166,江苏,2\n\
                    ,上海,3,1\n\
                    3167, 北京 ,,\n\
                    3168,,,\n";
        let got = all(DimKind::Viewer, Format::Csv, text);
        assert_eq!(
            got[0],
            Ok(Row {
                line: 2,
                id: "3165".into(),
                fields: f(&[("province", "浙江"), ("grade", "1"), ("region", "1122")])
            })
        );
        assert_eq!(
            got[1],
            Err(BadRow {
                line: 3,
                reason: "3 fields, the header has 4".into()
            })
        );
        assert!(matches!(&got[2], Err(BadRow { line: 4, reason }) if reason.starts_with("no id")));
        assert_eq!(
            got[3],
            Ok(Row {
                line: 5,
                id: "3167".into(),
                fields: f(&[("province", "北京")])
            })
        );
        assert_eq!(
            got[4],
            Err(BadRow {
                line: 6,
                reason: "no values besides the id".into()
            })
        );
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn csv_header_errors() {
        let e = Rows::new(DimKind::Anchor, Format::Csv, "name,level\nx,1\n".as_bytes())
            .err()
            .unwrap();
        assert!(e.to_string().contains("no id column"), "{e}");
        let e = Rows::new(DimKind::Anchor, Format::Csv, "id,_v\n1,2\n".as_bytes())
            .err()
            .unwrap();
        assert!(e.to_string().contains("reserved"), "{e}");
        let e = Rows::new(
            DimKind::RoomModule,
            Format::Csv,
            "room_id,mod\n1,2\n".as_bytes(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("module_id"), "{e}");
    }

    #[test]
    fn jsonl_rows() {
        let text = "{\"anchor_id\":\"a-1\",\"name\":\"Ann\",\"level\":5,\"vip\":true,\"x\":null}\n\
                    \n\
                    not json\n\
                    {\"anchor_id\":7,\"tags\":[1]}\n\
                    [1,2]\n\
                    {\"id\":\"a-2\",\"name\":\"Bo\"}";
        let got = all(DimKind::Anchor, Format::Jsonl, text);
        assert_eq!(
            got[0],
            Ok(Row {
                line: 1,
                id: "a-1".into(),
                // serde_json objects iterate in key order.
                fields: f(&[("level", "5"), ("name", "Ann"), ("vip", "true")])
            })
        );
        assert!(
            matches!(&got[1], Err(BadRow { line: 3, reason }) if reason.starts_with("invalid JSON"))
        );
        assert!(matches!(&got[2], Err(BadRow { line: 4, reason }) if reason.contains("tags")));
        assert!(
            matches!(&got[3], Err(BadRow { line: 5, reason }) if reason == "not a JSON object")
        );
        assert_eq!(
            got[4],
            Ok(Row {
                line: 6,
                id: "a-2".into(),
                fields: f(&[("name", "Bo")])
            })
        );
    }

    #[test]
    fn room_module_takes_module_id_only() {
        let got = all(
            DimKind::RoomModule,
            Format::Jsonl,
            "{\"room_id\":20210813,\"module_id\":1001,\"title\":\"x\"}\n{\"room_id\":1}\n{\"room_id\":1,\"_ld\":2,\"module_id\":3}\n",
        );
        assert_eq!(
            got[0],
            Ok(Row {
                line: 1,
                id: "20210813".into(),
                fields: f(&[("module_id", "1001")])
            })
        );
        assert_eq!(
            got[1],
            Err(BadRow {
                line: 2,
                reason: "no module_id".into()
            })
        );
        // Fields other than module_id are ignored, reserved ones included.
        assert!(got[2].is_ok());
        let got = all(DimKind::Anchor, Format::Jsonl, "{\"id\":1,\"_ld\":2}\n");
        assert!(matches!(&got[0], Err(BadRow { reason, .. }) if reason.contains("reserved")));
    }

    #[test]
    fn formats_and_as_of() {
        assert_eq!(Format::detect(Path::new("a/b.CSV")), Some(Format::Csv));
        assert_eq!(Format::detect(Path::new("x.ndjson")), Some(Format::Jsonl));
        assert_eq!(Format::detect(Path::new("x.txt")), None);
        assert_eq!(parse_as_of("1629043200000"), Ok(1_629_043_200_000));
        assert_eq!(
            parse_as_of("2021-08-16T00:00:00+08:00"),
            Ok(1_629_043_200_000)
        );
        assert!(parse_as_of("yesterday").is_err());
        assert!(parse_as_of("now").unwrap() > 1_600_000_000_000);
    }

    /// On a Redis Cluster a script call's keys share one hash slot; rows of
    /// one slot keep their file order, and every row is in one call.
    #[test]
    fn cluster_calls_hold_keys_of_one_slot() {
        use vidpulse_core::redis::{same_slot, slot};
        let s = LoadSettings {
            kind: DimKind::Anchor,
            key_prefix: "a:".into(),
            as_of_ms: 1000,
            ttl_ms: 0,
            chunk: 1000,
            rows_per_call: 3,
            in_flight: 1,
            strict: false,
            retries: 0,
        };
        // Ids 0..200, plus hash-tagged ids that share a slot.
        let mut rows: Vec<Row> = (0..200)
            .map(|i| Row {
                line: i + 1,
                id: i.to_string(),
                fields: f(&[("name", "n")]),
            })
            .collect();
        for i in 0..7 {
            rows.push(Row {
                line: 201 + i,
                id: format!("{{t}}{i}"),
                fields: f(&[("name", "n")]),
            });
        }
        let key = |r: &Row| format!("a:{}", r.id);
        let calls = call_groups(&s, &rows, true);
        let mut lines: Vec<u64> = Vec::new();
        for c in &calls {
            assert!(c.len() <= 3);
            let keys: Vec<String> = c.iter().map(|r| key(r)).collect();
            assert!(same_slot(&keys), "{keys:?}");
            assert!(c.windows(2).all(|w| w[0].line < w[1].line), "file order");
            lines.extend(c.iter().map(|r| r.line));
        }
        lines.sort_unstable();
        assert_eq!(lines, (1..=207).collect::<Vec<u64>>());
        // The tagged rows: one slot, so calls of 3, 3 and 1.
        let tagged: Vec<usize> = calls
            .iter()
            .filter(|c| slot(key(c[0]).as_bytes()) == slot(b"{t}"))
            .map(Vec::len)
            .collect();
        assert_eq!(tagged, vec![3, 3, 1]);
        let c = build_chunk(&s, &rows, true);
        assert_eq!(c.pipe.len(), calls.len());
    }

    #[test]
    fn chunks_group_rows_per_call() {
        let s = LoadSettings {
            kind: DimKind::Viewer,
            key_prefix: "v:".into(),
            as_of_ms: 1000,
            ttl_ms: 0,
            chunk: 1000,
            rows_per_call: 2,
            in_flight: 1,
            strict: false,
            retries: 0,
        };
        let rows: Vec<Row> = (1..=5)
            .map(|i| Row {
                line: i,
                id: i.to_string(),
                fields: f(&[("province", "p")]),
            })
            .collect();
        let c = build_chunk(&s, &rows, false);
        assert_eq!(c.calls, vec![vec![1, 2], vec![3, 4], vec![5]]);
        assert_eq!(c.pipe.len(), 3);
        assert_eq!(
            parse_reply(&Value::Array(vec![
                Value::Int(1),
                Value::Int(2),
                Value::Array(vec![Value::Int(2)])
            ])),
            Ok((1, 2, vec![2]))
        );
    }
}
