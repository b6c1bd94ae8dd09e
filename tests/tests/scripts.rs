//! The scripts run under `set -o pipefail`, where a pipeline whose reader
//! stops early (`| head`, `| grep -q`, `| grep -m`) fails when the writer
//! gets SIGPIPE — exit 141, no message, as `scripts/demo` once died right
//! after "an enriched monitored event". No script may have such a
//! pipeline: read files or variables instead, or let the reader read all.
#![allow(clippy::unwrap_used)]

use vidpulse_e2e::repo_root;

/// The command of every pipeline stage after the first on a line.
fn piped_commands(line: &str) -> Vec<String> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'|' {
            if b.get(i + 1) == Some(&b'|') {
                i += 2;
                continue;
            }
            let rest = &line[i + 1..];
            let end = rest.find('|').unwrap_or(rest.len());
            out.push(rest[..end].trim().to_owned());
        }
        i += 1;
    }
    out
}

/// Whether a command may stop reading before its input ends.
fn stops_early(cmd: &str) -> bool {
    let mut words = cmd.split_whitespace();
    match words.next() {
        Some("head") => true,
        Some("grep") => words
            .take_while(|w| w.starts_with('-'))
            .any(|w| !w.starts_with("--") && (w.contains('q') || w.contains('m'))),
        _ => false,
    }
}

#[test]
fn no_script_pipes_into_a_reader_that_stops_early() {
    let dir = repo_root().join("scripts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.extend(
        std::fs::read_dir(dir.join("bench.d"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    let mut bad = Vec::new();
    let mut seen = 0;
    for f in files.iter().filter(|f| f.is_file()) {
        let text = std::fs::read_to_string(f).unwrap();
        if !text.starts_with("#!") && !text.starts_with("# shellcheck") {
            continue;
        }
        seen += 1;
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with('#') {
                continue;
            }
            if piped_commands(code).iter().any(|c| stops_early(c)) {
                bad.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(seen >= 5, "scripts found: {seen}");
    assert!(
        bad.is_empty(),
        "pipelines that die of SIGPIPE under pipefail:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_sees_what_it_must() {
    assert!(
        piped_commands("a | jq . | head -n 1")
            .iter()
            .any(|c| stops_early(c))
    );
    assert!(
        piped_commands("tr x y <f | grep -q foo || return 0")
            .iter()
            .any(|c| stops_early(c))
    );
    assert!(
        piped_commands("ls | grep -c foo")
            .iter()
            .all(|c| !stops_early(c))
    );
    assert!(
        piped_commands("a || b | sed -n '1,5p'")
            .iter()
            .all(|c| !stops_early(c))
    );
}
