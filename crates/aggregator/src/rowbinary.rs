//! RowBinary encoding of the rows the engine emits, in the column order of
//! [`vidpulse_query::schema`] (`metric_columns`, `log_columns`).

use vidpulse_query::field::{FieldType, Val};
use vidpulse_query::spec::{Log, Metric};

use crate::engine::{Agg, LogRow, MetricRow};

fn varint(buf: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf.push(b);
            return;
        }
        buf.push(b | 0x80);
    }
}

fn string(buf: &mut Vec<u8>, s: &str) {
    varint(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

fn datetime(buf: &mut Vec<u8>, ms: i64) {
    let secs = u32::try_from(ms.div_euclid(1000)).unwrap_or(0);
    buf.extend_from_slice(&secs.to_le_bytes());
}

fn val(buf: &mut Vec<u8>, ty: FieldType, v: &Val) {
    match (ty, v) {
        (FieldType::Str, Val::S(s)) => string(buf, s),
        (FieldType::Str, Val::I(i)) => string(buf, &i.to_string()),
        (_, Val::I(i)) => buf.extend_from_slice(&i.to_le_bytes()),
        (_, Val::S(s)) => buf.extend_from_slice(&s.parse::<i64>().unwrap_or(0).to_le_bytes()),
    }
}

/// Appends one metric row of generation `generation` (columns as
/// [`metric_columns`]).
pub fn encode_metric_row(
    buf: &mut Vec<u8>,
    m: &Metric,
    generation: u64,
    part: i32,
    row: &MetricRow,
) {
    buf.extend_from_slice(&generation.to_le_bytes());
    datetime(buf, row.pane_start);
    for (g, v) in m.group_by.iter().zip(row.key.iter()) {
        val(buf, g.ty(), v);
    }
    buf.extend_from_slice(&(part.max(0) as u32).to_le_bytes());
    buf.extend_from_slice(&row.version.to_le_bytes());
    for a in &row.aggs {
        match a {
            Agg::Count(n) => buf.extend_from_slice(&n.to_le_bytes()),
            Agg::Sum(s) | Agg::Level(s) => buf.extend_from_slice(&s.to_le_bytes()),
            Agg::Min(x) | Agg::Max(x) => match x {
                None => buf.push(1),
                Some(x) => {
                    buf.push(0);
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            },
            Agg::Distinct(set) => {
                varint(buf, set.len() as u64);
                for s in set {
                    string(buf, s);
                }
            }
        }
    }
}

/// Appends one log row of generation `generation` (columns as
/// [`log_columns`]).
pub fn encode_log_row(buf: &mut Vec<u8>, l: &Log, generation: u64, part: i32, row: &LogRow) {
    buf.extend_from_slice(&generation.to_le_bytes());
    datetime(
        buf,
        row.event_time_ms - row.event_time_ms.rem_euclid(60_000),
    );
    buf.extend_from_slice(&row.event_time_ms.to_le_bytes());
    string(buf, &row.event_id);
    string(buf, row.kind);
    for (c, v) in l.columns.iter().zip(&row.columns) {
        val(buf, c.ty(), v);
    }
    buf.extend_from_slice(&(part.max(0) as u32).to_le_bytes());
    buf.extend_from_slice(&row.version.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidpulse_query::spec::Spec;

    #[test]
    fn row_binary_layout() {
        let spec = Spec::default_spec();
        let m = spec.metric("gifts_by_type_1m").unwrap();
        let row = MetricRow {
            metric: 0,
            pane_start: 60_000,
            key: vec![Val::S("3".into())].into_boxed_slice(),
            version: 9,
            aggs: vec![
                Agg::Sum(-2),
                Agg::Count(1),
                Agg::Distinct(["u".into()].into_iter().collect()),
            ],
        };
        let mut b = Vec::new();
        encode_metric_row(&mut b, m, 7, 5, &row);
        let mut want = 7u64.to_le_bytes().to_vec();
        want.extend_from_slice(&[60, 0, 0, 0, 1, b'3', 5, 0, 0, 0]);
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(&(-2i64).to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&[1, 1, b'u']);
        assert_eq!(b, want);
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, vec![0xac, 0x02]);
    }
}
