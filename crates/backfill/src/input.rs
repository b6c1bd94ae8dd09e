//! The backfill's input: files of raw records, one JSON object a line,
//! plain or gzip (told by the content, not the name; concatenated gzip
//! members are read through), cut into chunks of whole lines. Lines are
//! numbered from 1 in each file, as editors show them.
//!
//! Nothing is skipped here: every line of a file reaches the parser, blank
//! ones included (they are bad lines there), and a last line without its
//! newline is a line.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One input file and the mapping that reads it.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    /// The file as given on the command line: names its bad lines and
    /// makes the event id of a line without an id of its own
    /// (`<label>/0/<line>`).
    pub label: String,
    /// Index of its mapping in the run's mappings.
    pub mapping: usize,
}

/// Whole lines of one file.
#[derive(Debug)]
pub struct Chunk {
    /// Position of the chunk in the run: files in order, chunks in order.
    pub seq: u64,
    pub source: usize,
    /// Number of the chunk's first line in its file (from 1).
    pub first_line: u64,
    /// The lines, each ending in `\n` except perhaps the file's last.
    pub data: Vec<u8>,
}

impl Chunk {
    /// The chunk's lines with their numbers, without the line ending
    /// (`\n` or `\r\n`).
    pub fn lines(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut rest: &[u8] = &self.data;
        let mut n = self.first_line;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            rest = next;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            n += 1;
            Some((n - 1, line))
        })
    }
}

/// Counts the bytes read from the files (compressed bytes for gzip), for
/// the progress bar.
#[derive(Clone, Debug, Default)]
pub struct BytesRead(pub Arc<AtomicU64>);

struct Counting<R> {
    inner: R,
    counter: BytesRead,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens a file, decompressing it when it starts with the gzip magic.
pub fn open(path: &Path, counter: BytesRead) -> io::Result<Box<dyn Read + Send>> {
    let mut head = [0u8; 2];
    let mut f = File::open(path)?;
    let n = f.read(&mut head)?;
    let f = File::open(path)?;
    let counted = Counting { inner: f, counter };
    if n == 2 && head == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(
            BufReader::with_capacity(1 << 16, counted),
        )))
    } else {
        Ok(Box::new(counted))
    }
}

/// Cuts a reader into chunks of about `target` bytes of whole lines.
pub struct Chunker<R> {
    reader: R,
    carry: Vec<u8>,
    next_line: u64,
    target: usize,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    pub fn new(reader: R, target: usize) -> Chunker<R> {
        Chunker {
            reader,
            carry: Vec::new(),
            next_line: 1,
            target: target.max(1),
            eof: false,
        }
    }

    /// The next chunk: (first line number, bytes); `None` at the end.
    pub fn next_chunk(&mut self) -> io::Result<Option<(u64, Vec<u8>)>> {
        let mut data = std::mem::take(&mut self.carry);
        data.reserve(self.target);
        loop {
            if !self.eof && data.len() < self.target {
                // Appends without zeroing the buffer first.
                let want = (self.target - data.len()) as u64;
                let n = (&mut self.reader).take(want).read_to_end(&mut data)?;
                if n == 0 {
                    self.eof = true;
                }
                continue;
            }
            if self.eof {
                if data.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(self.cut(data, None)));
            }
            match memchr::memrchr(b'\n', &data) {
                Some(i) => return Ok(Some(self.cut(data, Some(i + 1)))),
                // One line longer than the target: read on.
                None => self.target = self.target.saturating_mul(2),
            }
        }
    }

    fn cut(&mut self, mut data: Vec<u8>, at: Option<usize>) -> (u64, Vec<u8>) {
        if let Some(at) = at {
            self.carry = data.split_off(at);
        }
        let first = self.next_line;
        let newlines = memchr::memchr_iter(b'\n', &data).count() as u64;
        let partial = u64::from(data.last().is_some_and(|b| *b != b'\n'));
        self.next_line += newlines + partial;
        (first, data)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunks(text: &[u8], target: usize) -> Vec<(u64, String)> {
        let mut c = Chunker::new(text, target);
        let mut out = Vec::new();
        while let Some((first, data)) = c.next_chunk().unwrap() {
            out.push((first, String::from_utf8(data).unwrap()));
        }
        out
    }

    #[test]
    fn chunks_hold_whole_lines_and_count_them() {
        let text = b"a\nbb\n\nccc\r\ndddd";
        for target in [1, 2, 3, 5, 100] {
            let got = chunks(text, target);
            let joined: String = got.iter().map(|(_, s)| s.as_str()).collect();
            assert_eq!(joined.as_bytes(), text, "target {target}");
            let mut lines = Vec::new();
            for (i, (first, data)) in got.iter().enumerate() {
                let ch = Chunk {
                    seq: i as u64,
                    source: 0,
                    first_line: *first,
                    data: data.clone().into_bytes(),
                };
                for (n, l) in ch.lines() {
                    lines.push((n, String::from_utf8(l.to_vec()).unwrap()));
                }
            }
            let want: Vec<(u64, String)> = ["a", "bb", "", "ccc", "dddd"]
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u64 + 1, (*s).to_owned()))
                .collect();
            assert_eq!(lines, want, "target {target}");
        }
        assert!(chunks(b"", 10).is_empty());
    }

    #[test]
    fn gzip_is_told_by_its_content() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("vp-backfill-gz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.log");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"one\ntwo\n").unwrap();
        let mut bytes = gz.finish().unwrap();
        // A second member, as `cat a.gz b.gz` makes.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"three\n").unwrap();
        bytes.extend(gz.finish().unwrap());
        std::fs::write(&path, &bytes).unwrap();
        let counter = BytesRead::default();
        let mut text = String::new();
        open(&path, counter.clone())
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "one\ntwo\nthree\n");
        assert_eq!(counter.0.load(Ordering::Relaxed), bytes.len() as u64);
        std::fs::write(&path, b"plain\n").unwrap();
        let mut text = String::new();
        open(&path, BytesRead::default())
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "plain\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
