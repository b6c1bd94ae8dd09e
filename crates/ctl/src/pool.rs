//! `vidpulse pool create|delete|add|rm|import|ls|sync`: edits the ID pools
//! the monitor applies. A pool is a compacted topic `vp.pool.<name>.v1`
//! (key = id, value = `{"by":…,"at":…}`, tombstone = removal) registered in
//! the compacted topic `vp.pools.v1` (key = pool name, value = definition).
//!
//! Delivery: every command waits until the broker acknowledged all its
//! records (idempotent producer, `acks=all`) and fails, naming how many
//! were not written, otherwise. Re-running a command is harmless: adding an
//! id twice or removing an absent one leaves the same pool state.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use vidpulse_core::config::{KafkaArgs, RedisArgs, redact_url};
use vidpulse_core::{kafka, topics};
use vidpulse_pools::loader::REGISTRY_TOPIC;
use vidpulse_pools::pool::{MatchField, Membership, Mode, PoolDef};

const META: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create (or redefine) a pool: its compacted topic, with as many
    /// partitions as vp.events.v1, and its entry in vp.pools.v1. Running
    /// monitors pick it up within a second.
    Create(CreateArgs),
    /// Unregister a pool (tombstone in vp.pools.v1); monitors stop applying
    /// it. Its topic is left in place.
    Delete { name: String },
    /// Add ids to a pool.
    Add {
        name: String,
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        by: By,
    },
    /// Remove ids from a pool (tombstones).
    Rm {
        name: String,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Add the ids of a file, one per line (`-` = stdin; blank lines and
    /// lines starting with # are skipped).
    Import {
        name: String,
        #[arg(long)]
        file: String,
        #[command(flatten)]
        by: By,
    },
    /// Without a name: the registered pools. With a name: its current
    /// members, one per line (read from its topic).
    Ls {
        name: Option<String>,
        /// Print only the number of members.
        #[arg(long)]
        count: bool,
    },
    /// Mirror a Redis set or an HTTP endpoint into a pool, writing only the
    /// differences; once, or every --interval.
    Sync(SyncArgs),
}

#[derive(Args)]
pub struct By {
    /// Who is editing (recorded in each membership record).
    #[arg(long, env = "USER", default_value = "vidpulse")]
    by: String,
}

#[derive(Args)]
pub struct CreateArgs {
    /// Pool name (letters, digits, `.`, `_`, `-`).
    name: String,
    /// Event field the ids are compared with: author_id, video_id,
    /// room_id, user_id, or all (every event passes; site-wide enrichment).
    /// Default: all for a pool named "all", else required.
    #[arg(long = "match")]
    match_field: Option<String>,
    /// Event kinds the pool applies to, comma-separated (default: all kinds).
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// broadcast: every monitor instance loads the whole pool (up to a few
    /// hundred thousand ids). bucketed: each instance loads only the
    /// partitions of its events partitions (millions of ids).
    #[arg(long, default_value = "broadcast")]
    mode: String,
    /// Partitions of the pool topic (default: those of vp.events.v1, which a
    /// bucketed pool requires).
    #[arg(long)]
    partitions: Option<i32>,
    /// Create a bucketed pool even though its partition count differs from
    /// vp.events.v1's (monitors will refuse to start; for tests).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct SyncArgs {
    name: String,
    /// Redis set holding the ids (SSCAN), on --redis-url.
    #[arg(long, conflicts_with = "http", required_unless_present = "http")]
    redis_set: Option<String>,
    #[command(flatten)]
    redis: RedisArgs,
    /// HTTP(S) URL answering a JSON array of ids or one id per line.
    #[arg(long)]
    http: Option<String>,
    /// Extra request header `NAME: VALUE` for --http (e.g. a bearer token;
    /// prefer the environment variable for secrets). Repeatable.
    #[arg(long, env = "VIDPULSE_POOL_HTTP_HEADER", hide_env_values = true, value_parser = parse_header)]
    http_header: Vec<(String, String)>,
    /// Time between two syncs.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Sync once and exit.
    #[arg(long)]
    once: bool,
    /// Accept an empty source (removes every member). Without it an empty
    /// answer is taken for a broken source and nothing is removed.
    #[arg(long)]
    allow_empty: bool,
    #[command(flatten)]
    by: By,
}

pub async fn run(kafka_args: &KafkaArgs, cmd: PoolCmd) -> anyhow::Result<()> {
    match cmd {
        PoolCmd::Create(a) => create(kafka_args, a).await,
        PoolCmd::Sync(a) => sync(kafka_args, a).await,
        other => {
            let kafka_args = kafka_args.clone();
            tokio::task::spawn_blocking(move || blocking(&kafka_args, other)).await?
        }
    }
}

fn blocking(kafka_args: &KafkaArgs, cmd: PoolCmd) -> anyhow::Result<()> {
    match cmd {
        PoolCmd::Delete { name } => {
            let defs = read_registry(kafka_args)?;
            if !defs.contains_key(&name) {
                bail!("pool {name} is not registered");
            }
            let w = Writer::new(kafka_args)?;
            w.send(&kafka_args.topic(REGISTRY_TOPIC), name.as_bytes(), None)?;
            w.finish()?;
            println!(
                "deleted  pool {name} (its topic {} is left in place)",
                kafka_args.topic(&topics::pool(&name))
            );
            Ok(())
        }
        PoolCmd::Add { name, ids, by } => {
            let topic = member_topic(kafka_args, &name)?;
            let w = Writer::new(kafka_args)?;
            let value = membership(&by.by);
            for id in &ids {
                w.send(&topic, clean(id)?.as_bytes(), Some(&value))?;
            }
            let n = w.finish()?;
            println!("added    {n} ids to {name}");
            Ok(())
        }
        PoolCmd::Rm { name, ids } => {
            let topic = member_topic(kafka_args, &name)?;
            let w = Writer::new(kafka_args)?;
            for id in &ids {
                w.send(&topic, clean(id)?.as_bytes(), None)?;
            }
            let n = w.finish()?;
            println!("removed  {n} ids from {name}");
            Ok(())
        }
        PoolCmd::Import { name, file, by } => import(kafka_args, &name, &file, &by.by),
        PoolCmd::Ls { name: None, .. } => {
            for d in read_registry(kafka_args)?.values() {
                let kinds = if d.kinds.is_empty() {
                    "all".to_owned()
                } else {
                    d.kinds.join(",")
                };
                println!(
                    "{}\tmatch={}\tmode={}\tkinds={}\tpartitions={}\tcreated_by={}",
                    d.name, d.match_field, d.mode, kinds, d.partitions, d.created_by
                );
            }
            Ok(())
        }
        PoolCmd::Ls {
            name: Some(name),
            count,
        } => {
            let topic = member_topic(kafka_args, &name)?;
            let consumer: BaseConsumer = kafka::reader_config(kafka_args)?.create()?;
            let mut state = Follower::new(&consumer, &topic)?;
            state.catch_up(&consumer)?;
            if count {
                println!("{}", state.ids.len());
            } else {
                let mut ids: Vec<&String> = state.ids.iter().collect();
                ids.sort();
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                for id in ids {
                    if writeln!(out, "{id}").is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        PoolCmd::Create(_) | PoolCmd::Sync(_) => unreachable!("handled in run"),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn membership(by: &str) -> Vec<u8> {
    Membership {
        by: by.to_owned(),
        at: now_ms(),
    }
    .to_json()
}

fn clean(id: &str) -> anyhow::Result<&str> {
    let id = id.trim();
    if id.is_empty() {
        bail!("empty id");
    }
    Ok(id)
}

async fn create(kafka_args: &KafkaArgs, a: CreateArgs) -> anyhow::Result<()> {
    let match_field = match (&a.match_field, a.name.as_str()) {
        (Some(f), _) => MatchField::parse(f).with_context(|| {
            format!(
                "invalid --match {f:?}; use one of {}",
                MatchField::NAMES.join(", ")
            )
        })?,
        (None, "all") => MatchField::All,
        (None, _) => bail!(
            "--match is required: one of {}",
            MatchField::NAMES.join(", ")
        ),
    };
    let mode = Mode::parse(&a.mode)
        .with_context(|| format!("invalid --mode {:?}; use broadcast or bucketed", a.mode))?;
    let probe: BaseConsumer = kafka::reader_config(kafka_args)?.create()?;
    let events = kafka_args.topic(topics::EVENTS);
    let event_partitions = kafka::partition_count(&probe, &events, META)?
        .with_context(|| format!("{events} does not exist; run `vidpulse topics create` first"))?;
    let partitions = a.partitions.unwrap_or(event_partitions);
    if partitions < 1 {
        bail!("invalid --partitions {partitions}");
    }
    let mut def = PoolDef {
        name: a.name.clone(),
        match_field,
        kinds: a.kinds.iter().map(|k| k.trim().to_owned()).collect(),
        mode,
        partitions: if match_field == MatchField::All {
            0
        } else {
            partitions
        },
        created_by: std::env::var("USER").unwrap_or_else(|_| "vidpulse".into()),
        created_at_ms: now_ms(),
    };
    def.validate()?;
    if mode == Mode::Bucketed && match_field == MatchField::UserId {
        eprintln!(
            "warning: vp.events.v1 is keyed by the event's subject (video, author, room), so a bucketed \
             user_id pool can only check events keyed by the user; use broadcast for user pools"
        );
    }
    let admin: AdminClient<DefaultClientContext> = kafka::base_config(kafka_args)?
        .create()
        .context("cannot create Kafka admin client")?;
    if match_field != MatchField::All {
        let topic = kafka_args.topic(&topics::pool(&a.name));
        if mode == Mode::Bucketed && partitions != event_partitions && !a.force {
            bail!(
                "a bucketed pool needs as many partitions as {events} ({event_partitions}), not {partitions}: \
                 pool partition N must hold the ids of events partition N"
            );
        }
        let created =
            kafka::ensure_topic(&admin, &topic, partitions, &[("cleanup.policy", "compact")])
                .await
                .with_context(|| format!("creating {topic}"))?;
        let actual = kafka::partition_count(&probe, &topic, META)?.unwrap_or(0);
        if created {
            println!("created  {topic} ({partitions} partitions, compacted)");
        } else {
            println!("exists   {topic} ({actual} partitions)");
        }
        if mode == Mode::Bucketed && actual != event_partitions && !a.force {
            bail!(
                "{topic} exists with {actual} partitions but {events} has {event_partitions}; a bucketed \
                 pool must be co-partitioned with the events. Delete {topic} and create the pool again, \
                 or use --mode broadcast"
            );
        }
        def.partitions = actual;
    }
    vidpulse_pools::ensure_registry(&admin, kafka_args).await?;
    let kafka_args2 = kafka_args.clone();
    tokio::task::spawn_blocking(move || {
        let defs = read_registry(&kafka_args2)?;
        if let Some(old) = defs.get(&def.name) {
            let mut same = old.clone();
            same.created_at_ms = def.created_at_ms;
            same.created_by = def.created_by.clone();
            if same == def {
                println!(
                    "exists   pool {} (match={}, mode={})",
                    def.name, def.match_field, def.mode
                );
                return Ok(());
            }
        }
        let w = Writer::new(&kafka_args2)?;
        w.send(
            &kafka_args2.topic(REGISTRY_TOPIC),
            def.name.as_bytes(),
            Some(&def.to_json()),
        )?;
        w.finish()?;
        let verb = if defs.contains_key(&def.name) {
            "updated"
        } else {
            "created"
        };
        println!(
            "{verb}  pool {} (match={}, mode={}, kinds={})",
            def.name,
            def.match_field,
            def.mode,
            if def.kinds.is_empty() {
                "all".to_owned()
            } else {
                def.kinds.join(",")
            }
        );
        Ok(())
    })
    .await?
}

/// The pool topic of a registered pool that has members.
fn member_topic(kafka_args: &KafkaArgs, name: &str) -> anyhow::Result<String> {
    let defs = read_registry(kafka_args)?;
    let def = defs.get(name).with_context(|| {
        format!(
            "pool {name} is not registered; create it with `vidpulse pool create {name} --match …`"
        )
    })?;
    if def.match_field == MatchField::All {
        bail!("pool {name} matches every event; it has no members");
    }
    Ok(kafka_args.topic(&topics::pool(name)))
}

/// Every pool definition in the registry (last record per name wins).
fn read_registry(kafka_args: &KafkaArgs) -> anyhow::Result<BTreeMap<String, PoolDef>> {
    let topic = kafka_args.topic(REGISTRY_TOPIC);
    let consumer: BaseConsumer = kafka::reader_config(kafka_args)?.create()?;
    if kafka::partition_count(&consumer, &topic, META)?.is_none() {
        return Ok(BTreeMap::new());
    }
    let mut f = Follower::new(&consumer, &topic)?;
    let mut defs = BTreeMap::new();
    f.catch_up_with(&consumer, |key, value| match value {
        Some(v) => match PoolDef::from_json(v) {
            Ok(d) => {
                defs.insert(key.to_owned(), d);
            }
            Err(e) => eprintln!("warning: bad pool definition for {key}: {e}"),
        },
        None => {
            defs.remove(key);
        }
    })?;
    Ok(defs)
}

/// Reads a compacted topic from the beginning and keeps its current keys.
struct Follower {
    topic: String,
    next: BTreeMap<i32, i64>,
    ids: HashSet<String>,
}

impl Follower {
    fn new(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Follower> {
        let n = kafka::partition_count(consumer, topic, META)?
            .with_context(|| format!("{topic} does not exist"))?;
        let mut tpl = TopicPartitionList::new();
        let mut next = BTreeMap::new();
        for p in 0..n {
            let (lo, _) = consumer.fetch_watermarks(topic, p, META)?;
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            next.insert(p, lo);
        }
        consumer.assign(&tpl)?;
        Ok(Follower {
            topic: topic.to_owned(),
            next,
            ids: HashSet::new(),
        })
    }

    fn catch_up(&mut self, consumer: &BaseConsumer) -> anyhow::Result<()> {
        let mut ids = std::mem::take(&mut self.ids);
        self.catch_up_with(consumer, |k, v| {
            if v.is_some() {
                ids.insert(k.to_owned());
            } else {
                ids.remove(k);
            }
        })?;
        self.ids = ids;
        Ok(())
    }

    /// Reads until every partition reaches its current high watermark.
    fn catch_up_with(
        &mut self,
        consumer: &BaseConsumer,
        mut apply: impl FnMut(&str, Option<&[u8]>),
    ) -> anyhow::Result<()> {
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        for p in self.next.keys() {
            let (_, hi) = consumer.fetch_watermarks(&self.topic, *p, META)?;
            ends.insert(*p, hi);
        }
        let started = Instant::now();
        loop {
            ends.retain(|p, hi| self.next.get(p).is_some_and(|n| n < hi));
            if ends.is_empty() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("reading {} did not reach its end in 10 minutes", self.topic);
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => eprintln!("warning: reading {}: {e}", self.topic),
                Some(Ok(msg)) => {
                    self.next.insert(msg.partition(), msg.offset() + 1);
                    if let Some(k) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) {
                        apply(k, msg.payload());
                    }
                }
            }
        }
    }
}

/// Counts deliveries; the first error is kept.
#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

struct AckCtx(Arc<Acks>);

impl ClientContext for AckCtx {}

impl ProducerContext for AckCtx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = self.0.first_error.lock() {
                    f.get_or_insert(e.to_string());
                }
            }
        }
    }
}

/// An idempotent producer that waits for every ack in `finish`.
struct Writer {
    producer: ThreadedProducer<AckCtx>,
    acks: Arc<Acks>,
    sent: AtomicU64,
}

impl Writer {
    fn new(kafka_args: &KafkaArgs) -> anyhow::Result<Writer> {
        let acks = Arc::new(Acks::default());
        let producer = kafka::producer_config(kafka_args)?
            .create_with_context(AckCtx(acks.clone()))
            .context("cannot create Kafka producer")?;
        Ok(Writer {
            producer,
            acks,
            sent: AtomicU64::new(0),
        })
    }

    fn send(&self, topic: &str, key: &[u8], value: Option<&[u8]>) -> anyhow::Result<()> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Waits for every ack; returns how many records were written.
    fn finish(self) -> anyhow::Result<u64> {
        self.producer
            .flush(Duration::from_secs(120))
            .context("waiting for the broker to acknowledge")?;
        let sent = self.sent.load(Ordering::Relaxed);
        let failed = self.acks.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let e = self.acks.first_error.lock().ok().and_then(|e| e.clone());
            bail!(
                "{failed} of {sent} records were not written ({}); run the command again",
                e.unwrap_or_default()
            );
        }
        Ok(self.acks.ok.load(Ordering::Relaxed))
    }
}

fn import(kafka_args: &KafkaArgs, name: &str, file: &str, by: &str) -> anyhow::Result<()> {
    let topic = member_topic(kafka_args, name)?;
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?,
        ))
    };
    let w = Writer::new(kafka_args)?;
    let value = membership(by);
    let started = Instant::now();
    let mut n = 0u64;
    for line in reader.lines() {
        let line = line.with_context(|| format!("reading {file}"))?;
        let id = line.trim();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        w.send(&topic, id.as_bytes(), Some(&value))?;
        n += 1;
        if n.is_multiple_of(1_000_000) {
            eprintln!("  {n} ids sent ({:.1} s)", started.elapsed().as_secs_f64());
        }
    }
    let written = w.finish()?;
    println!(
        "imported {written} ids into {name} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn sync(kafka_args: &KafkaArgs, a: SyncArgs) -> anyhow::Result<()> {
    let kafka_args = kafka_args.clone();
    let topic = {
        let k = kafka_args.clone();
        let name = a.name.clone();
        tokio::task::spawn_blocking(move || member_topic(&k, &name)).await??
    };
    let consumer: BaseConsumer = kafka::reader_config(&kafka_args)?.create()?;
    let mut state = Follower::new(&consumer, &topic)?;
    let redis =
        match &a.redis_set {
            Some(_) => Some(a.redis.client().with_context(|| {
                format!("invalid --redis-url {}", redact_url(&a.redis.redis_url))
            })?),
            None => None,
        };
    let http = reqwest::Client::builder()
        .user_agent("vidpulse")
        .timeout(Duration::from_secs(30))
        .build()
        .context("setting up the HTTP client")?;
    loop {
        let source: anyhow::Result<HashSet<String>> = match (&a.redis_set, &a.http, &redis) {
            (Some(set), _, Some(client)) => redis_set(client, set).await,
            (_, Some(url), _) => http_ids(&http, url, &a.http_header).await,
            _ => bail!("give --redis-set KEY or --http URL"),
        };
        match source {
            Err(e) if !a.once => {
                eprintln!("vidpulse pool sync: source unavailable, pool left as is: {e:#}")
            }
            Err(e) => return Err(e),
            Ok(source) => {
                state.catch_up(&consumer)?;
                if source.is_empty() && !state.ids.is_empty() && !a.allow_empty {
                    let msg = format!(
                        "source returned no ids while {} has {}; nothing removed (pass --allow-empty to empty the pool)",
                        a.name,
                        state.ids.len()
                    );
                    if a.once {
                        bail!(msg);
                    }
                    eprintln!("vidpulse pool sync: {msg}");
                } else {
                    let add: Vec<&String> = source.difference(&state.ids).collect();
                    let rm: Vec<&String> = state.ids.difference(&source).collect();
                    let w = Writer::new(&kafka_args)?;
                    let value = membership(&a.by.by);
                    for id in &add {
                        w.send(&topic, id.as_bytes(), Some(&value))?;
                    }
                    for id in &rm {
                        w.send(&topic, id.as_bytes(), None)?;
                    }
                    let (na, nr) = (add.len(), rm.len());
                    w.finish()?;
                    println!(
                        "synced   {}: {} in source, +{na} -{nr}",
                        a.name,
                        source.len()
                    );
                }
            }
        }
        if a.once {
            return Ok(());
        }
        tokio::time::sleep(a.interval).await;
    }
}

async fn redis_set(
    client: &vidpulse_core::redis::RedisClient,
    key: &str,
) -> anyhow::Result<HashSet<String>> {
    let mut conn = client
        .connect(vidpulse_core::redis::ConnectOptions::default())
        .await
        .context("connecting to Redis")?;
    let mut out = HashSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, ids): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(key)
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .with_context(|| format!("SSCAN {key}"))?;
        out.extend(
            ids.into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
        );
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// GETs `url` (http or https: the system CA store, or the one
/// `SSL_CERT_FILE` names) with the extra headers and parses its body as ids.
async fn http_ids(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
) -> anyhow::Result<HashSet<String>> {
    let mut req = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json, text/plain");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("{url} answered HTTP {}", status.as_u16());
    }
    let body = resp.bytes().await.context("reading the HTTP body")?;
    parse_ids(std::str::from_utf8(&body).context("the body is not UTF-8")?)
}

/// `NAME: VALUE` of an `--http-header`.
fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| "expected NAME: VALUE, e.g. 'Authorization: Bearer …'".to_owned())?;
    let (k, v) = (k.trim(), v.trim());
    reqwest::header::HeaderName::from_bytes(k.as_bytes())
        .map_err(|_| format!("{k:?} is not a valid header name"))?;
    reqwest::header::HeaderValue::from_str(v)
        .map_err(|_| "the header value is not valid".to_owned())?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Ids from a JSON array (strings or integers) or from lines.
fn parse_ids(body: &str) -> anyhow::Result<HashSet<String>> {
    let t = body.trim_start_matches('\u{feff}').trim();
    if t.starts_with('[') {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(t).context("the body starts with [ but is not a JSON array")?;
        v.into_iter()
            .map(|x| match x {
                serde_json::Value::String(s) => Ok(s.trim().to_owned()),
                serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
                other => bail!("not an id: {other}"),
            })
            .filter(|r| !matches!(r, Ok(s) if s.is_empty()))
            .collect()
    } else {
        Ok(t.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_from_json_arrays_and_lines() {
        let a = parse_ids(r#"["a", 12, " b ", ""]"#).unwrap();
        assert_eq!(a, ["a", "12", "b"].iter().map(|s| s.to_string()).collect());
        let b = parse_ids("x\n\n# comment\n y \r\nz").unwrap();
        assert_eq!(b, ["x", "y", "z"].iter().map(|s| s.to_string()).collect());
        assert!(parse_ids("[1.5]").is_err());
        assert!(parse_ids("").unwrap().is_empty());
    }

    #[test]
    fn http_headers_need_a_name_and_a_colon() {
        assert_eq!(
            parse_header("Authorization: Bearer abc").unwrap(),
            ("Authorization".to_owned(), "Bearer abc".to_owned())
        );
        assert!(
            parse_header("Authorization Bearer")
                .unwrap_err()
                .contains("NAME: VALUE")
        );
        assert!(
            parse_header("bad name: x")
                .unwrap_err()
                .contains("not a valid header name")
        );
    }
}
