//! `vidpulse backfill`: archived raw logs into the metric tables and
//! leaderboards without Kafka (the work is in `vidpulse-backfill`). Prints
//! the report on stderr and, with `--dry-run`, the final values on stdout as
//! `vidpulse query --format json` prints them. Bad lines are reported, not
//! fatal: the exit code is 0 once everything else is written.

use std::io::Write;

use serde_json::Value;
use vidpulse_backfill::{BAD_SAMPLE, BackfillArgs, Report};
use vidpulse_core::config::KafkaArgs;

pub async fn run(kafka: &KafkaArgs, args: BackfillArgs) -> anyhow::Result<()> {
    let report = vidpulse_backfill::run(&args, &kafka.topic_prefix).await?;
    if args.dry_run {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let named = report.values.len() > 1;
        match print_values(&mut out, &report, named) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other?,
        }
    }
    summary(&report, &args);
    Ok(())
}

fn print_values(out: &mut impl Write, report: &Report, named: bool) -> std::io::Result<()> {
    for (name, rows) in &report.values {
        for r in rows {
            let mut fields: Vec<String> = Vec::with_capacity(r.len() + 1);
            if named {
                fields.push(format!("\"name\":{}", Value::String(name.clone())));
            }
            // Keys in column order, as `vidpulse query --format json`.
            fields.extend(
                r.iter()
                    .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v)),
            );
            writeln!(out, "{{{}}}", fields.join(","))?;
        }
    }
    out.flush()
}

fn summary(r: &Report, args: &BackfillArgs) {
    let secs = r.compute.as_secs_f64().max(1e-9);
    eprintln!(
        "backfill {}: {} lines in {} file(s), {} events ({} counted, {} duplicates, {} taken by no metric), {} bad; {:.2} s ({:.0} lines/s)",
        args.name,
        r.lines,
        r.files,
        r.events,
        r.counts.counted,
        r.counts.duplicates,
        r.counts.ignored,
        r.bad,
        secs,
        r.lines as f64 / secs,
    );
    if r.bad > 0 {
        let by: Vec<String> = r
            .bad_by_reason
            .iter()
            .map(|(reason, n)| format!("{} {n}", reason.code()))
            .collect();
        eprintln!("bad lines: {} ({})", r.bad, by.join(", "));
        for (file, line, reason, detail) in &r.bad_sample {
            eprintln!("  {file}:{line}: {}: {detail}", reason.code());
        }
        if r.bad > BAD_SAMPLE as u64 {
            match &args.bad_lines {
                Some(p) => eprintln!("  … every bad line is in {}", p.display()),
                None => eprintln!("  … (--bad-lines FILE writes them all)"),
            }
        }
    }
    if !args.dry_run {
        let tables: Vec<String> = r
            .written
            .rows
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        eprintln!(
            "written: {} rows ({}), {} leaderboard partials, in {:.2} s",
            r.written.rows.iter().map(|(_, n)| n).sum::<usize>(),
            if tables.is_empty() {
                "none".to_owned()
            } else {
                tables.join(", ")
            },
            r.written.partials,
            r.write.as_secs_f64()
        );
    }
}
