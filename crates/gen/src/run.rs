//! Sending a run: the generator's records go to the raw Kafka topics (or to
//! a JSON-lines file), paced to `--rate`; then the truth file is written.
//!
//! Delivery: every produce is awaited (idempotent producer, `acks=all`)
//! before the truth is written, and any failed delivery fails the run
//! without writing a truth. On shutdown the run stops producing, awaits what
//! is in flight and writes the truth of the records actually sent.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use tracing::{info, warn};
use vidpulse_core::CancellationToken;
use vidpulse_core::config::{ConfigError, KafkaArgs};

use crate::config::{GenConfig, GenError};
use crate::generator::Generator;
use crate::model::{Format, RawRecord};
use crate::truth::{Truth, TruthBuilder};

/// Deliveries awaited at most at once; beyond this the loop waits for the
/// oldest (bounded memory whatever the rate).
const MAX_IN_FLIGHT: usize = 100_000;
/// How long to wait for topic metadata at start.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the final flush may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a run needs, validated by [`run`].
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub config: GenConfig,
    /// Records per second; 0 = as fast as possible.
    pub rate: u64,
    pub sink: Sink,
    /// Where the truth JSON goes.
    pub truth_path: PathBuf,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Where records go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// The raw topics `{prefix}{raw topic}`; creates missing ones with
    /// `create_topics` partitions when set.
    Kafka {
        args: KafkaArgs,
        create_topics: Option<i32>,
    },
    /// JSON lines `{"topic","key","payload"}`; `-` is stdout.
    File(PathBuf),
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub sent: u64,
    pub elapsed: Duration,
    /// Shutdown was requested before every record was sent.
    pub stopped_early: bool,
    pub truth: Truth,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] GenError),
    #[error(transparent)]
    KafkaConfig(#[from] ConfigError),
    #[error("topic {topic} does not exist; create it (vidpulse-ctl, or --create-topics)")]
    MissingTopic { topic: String },
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{failed} of {sent} records were not delivered; first error: {first}")]
    Undelivered {
        failed: u64,
        sent: u64,
        first: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl RunError {
    /// A bad flag (exit code 2) rather than a failure while running (1).
    pub fn is_usage(&self) -> bool {
        matches!(self, RunError::Config(_) | RunError::KafkaConfig(_))
    }

    /// Whether running again unchanged may succeed (broker or disk trouble).
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            RunError::Kafka(_) | RunError::Undelivered { .. } | RunError::Io { .. }
        )
    }
}

/// Generates and sends every record of `settings`, then writes the truth.
pub async fn run(settings: RunSettings, shutdown: CancellationToken) -> Result<Summary, RunError> {
    settings.config.validate()?;
    let formats = settings.config.chosen_formats();
    let mut out = match &settings.sink {
        Sink::Kafka {
            args,
            create_topics,
        } => Out::Kafka(KafkaOut::new(args, &formats, *create_topics).await?),
        Sink::File(path) => Out::File(FileOut::new(path)?),
    };
    let bar = progress_bar(settings.progress, settings.config.count);
    let mut truth = TruthBuilder::new(&settings.config);
    let started = Instant::now();
    let tick = (settings.rate > 0).then(|| Duration::from_secs_f64(1.0 / settings.rate as f64));
    let mut sent = 0u64;
    let mut stopped_early = false;

    let mut generator = Generator::new(&settings.config);
    let wall_clock = settings.config.wall_clock;
    while sent < settings.config.count {
        if shutdown.is_cancelled() {
            stopped_early = true;
            break;
        }
        if let Some(tick) = tick {
            let due = started + tick.mul_f64(sent as f64);
            if due > Instant::now() + Duration::from_millis(1) {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = shutdown.cancelled() => { stopped_early = true; break; }
                }
            }
        }
        // Stamped once its turn has come, so no record is dated after the
        // moment it is sent.
        if wall_clock {
            generator.set_clock(chrono::Utc::now().timestamp_millis());
        }
        let Some(record) = generator.next() else {
            break;
        };
        out.send(&record).await?;
        truth.observe(&record);
        sent += 1;
        bar.inc(1);
    }
    out.finish().await?;
    bar.finish_and_clear();

    let truth = truth.finish();
    write_truth(&settings.truth_path, &truth)?;
    let elapsed = started.elapsed();
    if stopped_early {
        warn!(
            sent,
            "Stopped early on shutdown; the truth covers the records sent."
        );
    }
    info!(
        sent,
        valid = truth.expected.distinct_events,
        duplicates = truth.expected.events - truth.expected.distinct_events,
        malformed = truth.expected.dlq,
        elapsed_ms = elapsed.as_millis() as u64,
        records_per_sec = (sent as f64 / elapsed.as_secs_f64().max(1e-9)) as u64,
        truth = %settings.truth_path.display(),
        "Done."
    );
    Ok(Summary {
        sent,
        elapsed,
        stopped_early,
        truth,
    })
}

fn progress_bar(show: bool, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len).with_style(style)
}

/// Writes the truth as pretty JSON.
pub fn write_truth(path: &Path, truth: &Truth) -> Result<(), RunError> {
    let io = |source| RunError::Io {
        path: path.to_owned(),
        source,
    };
    let mut text = serde_json::to_string_pretty(truth).map_err(|e| io(e.into()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(io)
}

enum Out {
    Kafka(KafkaOut),
    File(FileOut),
}

impl Out {
    async fn send(&mut self, record: &RawRecord) -> Result<(), RunError> {
        match self {
            Out::Kafka(k) => k.send(record).await,
            Out::File(f) => f.send(record),
        }
    }

    async fn finish(&mut self) -> Result<(), RunError> {
        match self {
            Out::Kafka(k) => k.finish().await,
            Out::File(f) => f.finish(),
        }
    }
}

struct KafkaOut {
    producer: FutureProducer,
    /// Prefixed topic per format, indexed by `Format as usize`.
    topics: Vec<String>,
    deliveries: Deliveries,
}

/// Produced records whose delivery is not yet known, and the outcome of
/// those that settled.
#[derive(Default)]
struct Deliveries {
    in_flight: VecDeque<DeliveryFuture>,
    sent: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Deliveries {
    async fn settle_oldest(&mut self) -> bool {
        let Some(delivery) = self.in_flight.pop_front() else {
            return false;
        };
        let error = match delivery.await {
            Ok(Ok(_)) => return true,
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "delivery canceled (producer closed)".to_owned(),
        };
        self.failed += 1;
        if self.first_error.is_none() {
            warn!(%error, "Delivery failed.");
            self.first_error = Some(error);
        }
        true
    }
}

impl KafkaOut {
    async fn new(
        args: &KafkaArgs,
        formats: &[Format],
        create: Option<i32>,
    ) -> Result<KafkaOut, RunError> {
        let topics: Vec<String> = Format::ALL.iter().map(|f| args.topic(f.topic())).collect();
        if let Some(partitions) = create {
            let admin: AdminClient<DefaultClientContext> =
                vidpulse_core::kafka::base_config(args)?.create()?;
            for f in formats {
                let topic = &topics[*f as usize];
                if vidpulse_core::kafka::ensure_topic(&admin, topic, partitions, &[]).await? {
                    info!(topic, partitions, "Created topic.");
                }
            }
        }
        let producer: FutureProducer = vidpulse_core::kafka::producer_config(args)?.create()?;
        let wanted: Vec<String> = formats
            .iter()
            .map(|f| topics[*f as usize].clone())
            .collect();
        let probe = producer.clone();
        let missing = tokio::task::spawn_blocking(move || -> Result<Option<String>, KafkaError> {
            for topic in wanted {
                let md = probe
                    .client()
                    .fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
                let ok = md.topics().iter().any(|t| {
                    t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                });
                if !ok {
                    return Ok(Some(topic));
                }
            }
            Ok(None)
        })
        .await??;
        if let Some(topic) = missing {
            return Err(RunError::MissingTopic { topic });
        }
        Ok(KafkaOut {
            producer,
            topics,
            deliveries: Deliveries::default(),
        })
    }

    async fn send(&mut self, record: &RawRecord) -> Result<(), RunError> {
        let format = Format::from_topic(record.topic).unwrap_or(Format::VideoEvents);
        let topic = &self.topics[format as usize];
        let d = &mut self.deliveries;
        loop {
            let mut fr = FutureRecord::<[u8], [u8]>::to(topic).payload(&record.payload[..]);
            if let Some(key) = &record.key {
                fr = fr.key(key.as_bytes());
            }
            match self.producer.send_result(fr) {
                Ok(delivery) => {
                    d.in_flight.push_back(delivery);
                    d.sent += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The local queue is full: wait for the oldest delivery.
                    if !d.settle_oldest().await {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        while d.in_flight.len() > MAX_IN_FLIGHT {
            d.settle_oldest().await;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), RunError> {
        let d = &mut self.deliveries;
        while d.settle_oldest().await {}
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(FLUSH_TIMEOUT)).await??;
        match d.first_error.take() {
            None => Ok(()),
            Some(first) => Err(RunError::Undelivered {
                failed: d.failed,
                sent: d.sent,
                first,
            }),
        }
    }
}

struct FileOut {
    path: PathBuf,
    out: BufWriter<Box<dyn Write + Send>>,
}

/// One line of `--out-file`.
#[derive(Serialize)]
struct Line<'a> {
    topic: &'a str,
    key: Option<&'a str>,
    /// The payload as text, or `base64:…` when it is not UTF-8.
    payload: Cow<'a, str>,
}

impl FileOut {
    fn new(path: &Path) -> Result<FileOut, RunError> {
        let sink: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(File::create(path).map_err(|source| RunError::Io {
                path: path.to_owned(),
                source,
            })?)
        };
        Ok(FileOut {
            path: path.to_owned(),
            out: BufWriter::with_capacity(1 << 20, sink),
        })
    }

    fn send(&mut self, record: &RawRecord) -> Result<(), RunError> {
        let line = Line {
            topic: record.topic,
            key: record.key.as_deref(),
            payload: payload_text(&record.payload),
        };
        let io = |source| RunError::Io {
            path: self.path.clone(),
            source,
        };
        serde_json::to_writer(&mut self.out, &line).map_err(|e| io(e.into()))?;
        self.out.write_all(b"\n").map_err(io)
    }

    fn finish(&mut self) -> Result<(), RunError> {
        self.out.flush().map_err(|source| RunError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// The payload as text, or `base64:<standard base64>` when not UTF-8.
pub fn payload_text(payload: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(payload) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(payload)
        )),
    }
}
