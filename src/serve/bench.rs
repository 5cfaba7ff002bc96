//! `guardian bench-serve`: events/s end to end through the broker, cold (every query new) and warm
//! (every query already cached), against `screen`'s uncached rate on the same queries measured in
//! the same run. The worker is this binary started as a child process (`serve`), exactly as it is
//! deployed; the clock runs from the first event produced to the last verdict consumed.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::screen::Screener;

#[derive(Debug, Clone)]
pub struct Options {
    pub brokers: String,
    pub redis_url: String,
    pub partitions: i32,
    /// Each query is sent this many times in the warm round.
    pub warm_repeats: usize,
    pub admin_port: u16,
    /// Global flags for the workers (config, model files, weights), as given to the bench.
    pub worker_args: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub events: usize,
    pub seconds: f64,
    pub events_per_sec: f64,
    /// Verdicts that said `cached: true`.
    pub cached: usize,
    pub duplicates: usize,
    /// The worker's resident memory (MiB): at the start of the round, and the peak during it.
    pub rss_start_mib: f64,
    pub rss_peak_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub queries: usize,
    /// `screen`'s streaming pipeline, cache off, in this process.
    pub screen_uncached_per_sec: f64,
    pub cold: Round,
    pub warm: Round,
    /// Ten times the events the worker can screen in a few seconds, produced at once: the
    /// consumer must pause instead of buffering, so memory stays flat.
    pub overload: Round,
    /// Times the overloaded worker paused its partitions.
    pub overload_pauses: u64,
    /// cold / screen.
    pub cold_vs_screen: f64,
}

impl Report {
    pub fn render(&self) -> String {
        format!(
            "queries: {}\n\
             screen (uncached, in-process): {:.1} q/s\n\
             serve cold (all new):  {} events in {:.2} s = {:.1} ev/s, {:.2}x screen ({} duplicates)\n\
             serve warm (repeats):  {} events in {:.2} s = {:.1} ev/s, {} served from cache ({} duplicates)\n\
             overload (all new, produced at once): {} events in {:.2} s = {:.1} ev/s, {} pauses, \
             worker RSS {:.0} MiB at start, {:.0} MiB peak\n",
            self.queries,
            self.screen_uncached_per_sec,
            self.cold.events,
            self.cold.seconds,
            self.cold.events_per_sec,
            self.cold_vs_screen,
            self.cold.duplicates,
            self.warm.events,
            self.warm.seconds,
            self.warm.events_per_sec,
            self.warm.cached,
            self.warm.duplicates,
            self.overload.events,
            self.overload.seconds,
            self.overload.events_per_sec,
            self.overload_pauses,
            self.overload.rss_start_mib,
            self.overload.rss_peak_mib,
        )
    }
}

struct Worker(Child);

impl Worker {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// Resident memory of a process in MiB (0 if unreadable).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(cfg: &Config, corpus: &[String], opts: &Options, log: &dyn Fn(&str)) -> Result<Report> {
    // Baseline: the `screen` pipeline, cache off, same queries, same process.
    let model = Arc::new(Model::load(&cfg.model_spec())?);
    let mut c = cfg.clone();
    c.screen.cache_capacity = 0;
    let screener = Screener::with_model(model, &c, None)?;
    let summary = crate::bench::stream_corpus(&screener, corpus)?;
    drop(screener);
    let screen_rate = summary.queries_per_sec();
    log(&format!("screen (uncached): {screen_rate:.1} q/s"));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Serve(format!("runtime: {e}")))?;
    rt.block_on(async {
        let stamp = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default()
        );
        let prefix = format!("guardian-bench-{stamp}");
        let topics = Topics::create(&opts.brokers, &prefix, opts.partitions).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &opts.brokers)
            .set("linger.ms", "5")
            .create()
            .map_err(|e| Error::Kafka(e.to_string()))?;
        let redis_prefix = format!("{prefix}:");

        // Cold: every query new to the worker and to Redis.
        let worker = spawn_worker(opts, &topics, &redis_prefix, &format!("{prefix}-g"))?;
        wait_ready(opts.admin_port).await?;
        let cold_ids: Vec<String> = (0..corpus.len()).map(|i| format!("c{i}")).collect();
        let cold = round(
            &producer,
            &topics,
            &cold_ids,
            corpus,
            &opts.brokers,
            worker.pid(),
        )
        .await?;
        log(&format!(
            "serve cold: {:.1} ev/s ({} events)",
            cold.events_per_sec, cold.events
        ));
        drop(worker);

        // Warm: a fresh worker (empty memory cache) in a new group on a new input topic, the
        // same queries repeated: the first copy of each comes from Redis, later ones from memory.
        let warm_topics = Topics {
            input: format!("{prefix}.queries2"),
            ..topics.clone()
        };
        create_topics(&opts.brokers, &[(&warm_topics.input, opts.partitions)]).await?;
        let worker = spawn_worker(opts, &warm_topics, &redis_prefix, &format!("{prefix}-w"))?;
        wait_ready(opts.admin_port).await?;
        let mut warm_ids = Vec::new();
        let mut warm_queries = Vec::new();
        for r in 0..opts.warm_repeats {
            for (i, q) in corpus.iter().enumerate() {
                warm_ids.push(format!("w{r}-{i}"));
                warm_queries.push(q.clone());
            }
        }
        let warm = round(
            &producer,
            &warm_topics,
            &warm_ids,
            &warm_queries,
            &opts.brokers,
            worker.pid(),
        )
        .await?;
        log(&format!(
            "serve warm: {:.1} ev/s ({} events, {} cached)",
            warm.events_per_sec, warm.events, warm.cached
        ));
        drop(worker);

        // Overload: all new, produced at once: ten times what the worker screens in 3 s, and at
        // least twice serve.max_in_flight so that the consumer must pause.
        let n = ((screen_rate * 3.0 * 10.0) as usize)
            .max(cfg.serve.max_in_flight * 2)
            .max(corpus.len());
        let over_topics = Topics {
            input: format!("{prefix}.queries3"),
            ..topics.clone()
        };
        create_topics(&opts.brokers, &[(&over_topics.input, opts.partitions)]).await?;
        let worker = spawn_worker(opts, &over_topics, &redis_prefix, &format!("{prefix}-o"))?;
        wait_ready(opts.admin_port).await?;
        let over_ids: Vec<String> = (0..n).map(|i| format!("o{i}")).collect();
        let over_queries: Vec<String> = (0..n)
            .map(|i| format!("{} {}", corpus[i % corpus.len()], i / corpus.len() + 1))
            .collect();
        let overload = round(
            &producer,
            &over_topics,
            &over_ids,
            &over_queries,
            &opts.brokers,
            worker.pid(),
        )
        .await?;
        let metrics = http_get(opts.admin_port, "/metrics")
            .await
            .unwrap_or_default();
        let overload_pauses = metrics
            .lines()
            .find(|l| l.starts_with("guardian_consumer_pauses_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        log(&format!(
            "overload: {:.1} ev/s ({} events), {} pauses, RSS {:.0} -> peak {:.0} MiB",
            overload.events_per_sec,
            overload.events,
            overload_pauses,
            overload.rss_start_mib,
            overload.rss_peak_mib
        ));
        drop(worker);
        Ok(Report {
            queries: corpus.len(),
            screen_uncached_per_sec: screen_rate,
            cold_vs_screen: cold.events_per_sec / screen_rate,
            cold,
            warm,
            overload,
            overload_pauses,
        })
    })
}

#[derive(Clone)]
struct Topics {
    input: String,
    verdict: String,
    audit: String,
    dlq: String,
}

impl Topics {
    async fn create(brokers: &str, prefix: &str, partitions: i32) -> Result<Self> {
        let t = Self {
            input: format!("{prefix}.queries"),
            verdict: format!("{prefix}.verdicts"),
            audit: format!("{prefix}.audit"),
            dlq: format!("{prefix}.dlq"),
        };
        create_topics(
            brokers,
            &[
                (&t.input, partitions),
                (&t.verdict, partitions),
                (&t.audit, partitions),
                (&t.dlq, 1),
            ],
        )
        .await?;
        Ok(t)
    }
}

async fn create_topics(brokers: &str, topics: &[(&String, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| Error::Kafka(e.to_string()))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1)))
        .collect();
    let res = admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .map_err(|e| {
            Error::Kafka(format!(
                "creating topics on {brokers}: {e}. Is the broker up? `ops/services.sh up`"
            ))
        })?;
    for r in res {
        r.map_err(|(t, e)| Error::Kafka(format!("creating topic {t}: {e}")))?;
    }
    Ok(())
}

fn spawn_worker(opts: &Options, t: &Topics, redis_prefix: &str, group: &str) -> Result<Worker> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    let child = Command::new(exe)
        .args(&opts.worker_args)
        .args(["serve", "--group", group])
        .args(["--brokers", &opts.brokers])
        .args(["--input-topic", &t.input, "--verdict-topic", &t.verdict])
        .args(["--audit-topic", &t.audit, "--dlq-topic", &t.dlq])
        .args([
            "--redis-url",
            &opts.redis_url,
            "--redis-prefix",
            redis_prefix,
        ])
        .args(["--admin-addr", &format!("127.0.0.1:{}", opts.admin_port)])
        // Quick group joins: the broker holds a join for half the session timeout.
        .args([
            "--session-timeout-ms",
            "6000",
            "--heartbeat-interval-ms",
            "500",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::Serve(format!("cannot start the worker: {e}")))?;
    Ok(Worker(child))
}

/// Waits until the worker has partitions assigned (its /readyz says so).
async fn wait_ready(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(body) = http_get(port, "/readyz").await {
            if body.contains("\"partitions_assigned\":true") {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Serve(
        "the worker did not get partitions within 60 s".into(),
    ))
}

async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Produces the events, then reads the verdict topic until every id has a verdict.
async fn round(
    producer: &FutureProducer,
    t: &Topics,
    ids: &[String],
    queries: &[String],
    brokers: &str,
    worker: u32,
) -> Result<Round> {
    let rss_start = rss_mib(worker);
    let mut rss_peak = rss_start;
    // The reader assigns itself every partition instead of joining a group: a group join would
    // take seconds and land inside the timed window.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{}-reader", t.verdict))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| Error::Kafka(e.to_string()))?;
    let md = consumer
        .fetch_metadata(Some(&t.verdict), Duration::from_secs(10))
        .map_err(|e| Error::Kafka(e.to_string()))?;
    let mut list = TopicPartitionList::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        list.add_partition_offset(&t.verdict, p.id(), Offset::Beginning)
            .map_err(|e| Error::Kafka(e.to_string()))?;
    }
    consumer
        .assign(&list)
        .map_err(|e| Error::Kafka(e.to_string()))?;
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let started = Instant::now();
    let payloads: Vec<String> = ids
        .iter()
        .zip(queries)
        .map(|(id, q)| json!({ "id": id, "query": q }).to_string())
        .collect();
    let sends = ids.iter().zip(&payloads).map(|(id, p)| {
        producer.send(
            FutureRecord::to(&t.input)
                .key(id.as_str())
                .payload(p.as_str()),
            Timeout::Never,
        )
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| Error::Kafka(format!("producing: {e}")))?;
    }
    let _ = producer.flush(Duration::from_secs(10));
    let mut seen: HashSet<String> = HashSet::new();
    let (mut cached, mut duplicates) = (0usize, 0usize);
    let deadline = Duration::from_secs(600);
    while seen.len() < wanted.len() {
        let left = deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(Error::Serve(format!(
                "only {} of {} verdicts arrived within {} s",
                seen.len(),
                wanted.len(),
                deadline.as_secs()
            )));
        }
        rss_peak = rss_peak.max(rss_mib(worker));
        let m = tokio::time::timeout(left, consumer.recv())
            .await
            .map_err(|_| Error::Serve("timed out waiting for verdicts".into()))?
            .map_err(|e| Error::Kafka(e.to_string()))?;
        let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
        else {
            continue;
        };
        let id = v["id"].as_str().unwrap_or_default().to_string();
        if !wanted.contains(id.as_str()) {
            continue;
        }
        if v["cached"] == json!(true) {
            cached += 1;
        }
        if !seen.insert(id) {
            duplicates += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Round {
        events: ids.len(),
        seconds,
        events_per_sec: ids.len() as f64 / seconds,
        cached,
        duplicates,
        rss_start_mib: rss_start,
        rss_peak_mib: rss_peak,
    })
}
