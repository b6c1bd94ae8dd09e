//! `vidpulse mapping check`: runs a preset or mapping file over sample
//! records offline (no Kafka) and prints what ingest would produce for each:
//! the canonical event and its key, or the DLQ reason.

use std::io::BufRead;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;
use vidpulse_ingest::mapping::{Mapping, SourceRef};
use vidpulse_ingest::{normalize, presets};

#[derive(Subcommand)]
pub enum MappingCmd {
    /// Normalize sample records (JSON lines) with a preset or mapping file.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// Preset name or path to a TOML mapping file.
    mapping: String,
    /// File of raw records, one per line; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    /// Zone for zone-less times when the mapping names none.
    #[arg(long, default_value = "Asia/Shanghai")]
    time_zone: String,
}

pub fn run(cmd: MappingCmd) -> anyhow::Result<()> {
    let MappingCmd::Check(a) = cmd;
    let zone = a
        .time_zone
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid --time-zone {:?}", a.time_zone))?;
    let mapping: Mapping = match presets::preset(&a.mapping, zone) {
        Some(m) => m?,
        None => {
            let text = std::fs::read_to_string(&a.mapping).with_context(|| {
                format!("{:?} is neither a preset nor a readable file", a.mapping)
            })?;
            Mapping::from_toml(&text, zone)?
        }
    };
    let reader: Box<dyn BufRead> = if a.input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&a.input).with_context(|| format!("open {}", a.input))?,
        ))
    };
    let (mut ok, mut bad) = (0, 0);
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        let src = SourceRef {
            topic: &mapping.topic,
            partition: 0,
            offset: i as i64,
        };
        let out = match normalize::normalize(&mapping, Some(&line), src, 1024 * 1024, 0) {
            Ok(ev) => {
                ok += 1;
                let mut v = serde_json::to_value(&ev)?;
                if let (Some(m), Some(k)) = (v.as_object_mut(), ev.kind()) {
                    m.insert("kind".into(), json!(k.as_str()));
                }
                json!({"line": i + 1, "ok": true, "key": ev.subject_key(), "event": v})
            }
            Err(r) => {
                bad += 1;
                json!({"line": i + 1, "ok": false, "reason": r.reason.code(), "detail": r.detail})
            }
        };
        println!("{out}");
    }
    eprintln!("{ok} normalized, {bad} rejected");
    Ok(())
}
