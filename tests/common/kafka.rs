//! For the `guardian serve` tests: uniquely named topics, a producer, a background reader of
//! output topics, `guardian serve` and `redis-server` child processes that die with their guard,
//! and the worker's admin endpoints. Everything is blocking: a test is a plain `#[test]`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::{json, Value};

/// The shared Redis of `ops/services.sh up`.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
const HINT: &str = "start the local broker and Redis with `bash ops/services.sh up`";

pub fn brokers() -> String {
    std::env::var("GUARDIAN_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test or earlier run uses: `t-<what>-<pid>-<nanos>`.
pub fn unique(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t-{what}-{}-{nanos}", std::process::id())
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Fails the test at once, with the fix, when nothing listens on the first broker address.
pub fn require_broker() {
    let b = brokers();
    let up = b
        .split(',')
        .next()
        .and_then(|a| a.to_socket_addrs().ok()?.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok());
    assert!(up, "no Kafka broker answers at {b}: {HINT}");
}

/// The queries of bench/corpus.jsonl (600, Korean and English, all distinct).
pub fn corpus() -> Vec<String> {
    std::fs::read_to_string("bench/corpus.jsonl")
        .expect("bench/corpus.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("corpus line is JSON");
            v["query"].as_str().expect("corpus query").to_string()
        })
        .collect()
}

/// A test's own topics: input with 4 partitions, verdicts 4, audit 2, dead letters 1.
pub struct Topics {
    pub input: String,
    pub verdict: String,
    pub audit: String,
    pub dlq: String,
}

impl Topics {
    pub fn create(test: &str) -> Self {
        let base = unique(test);
        let t = Self {
            input: format!("{base}.queries"),
            verdict: format!("{base}.verdicts"),
            audit: format!("{base}.audit"),
            dlq: format!("{base}.dlq"),
        };
        create_topics(&[(&t.input, 4), (&t.verdict, 4), (&t.audit, 2), (&t.dlq, 1)]);
        t
    }

    pub fn outputs(&self) -> [&str; 3] {
        [&self.verdict, &self.audit, &self.dlq]
    }
}

pub fn create_topics(topics: &[(&str, i32)]) {
    require_broker();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, p)| NewTopic::new(name, *p, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(20)));
    let results = block_on(admin.create_topics(&new, &opts))
        .unwrap_or_else(|e| panic!("creating topics on {}: {e}; {HINT}", brokers()));
    for r in results {
        if let Err((topic, e)) = r {
            panic!("creating topic {topic}: {e}");
        }
    }
}

/// A record to produce.
pub struct Msg {
    pub key: String,
    pub value: Vec<u8>,
    pub traceparent: Option<String>,
}

impl Msg {
    /// `{"id": id, "query": query}`, keyed by the id.
    pub fn query(id: &str, query: &str) -> Self {
        Self::raw(id, json!({ "id": id, "query": query }).to_string())
    }

    pub fn raw(key: &str, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            traceparent: None,
        }
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces the records and waits for every acknowledgement: (partition, offset) of each.
pub fn produce(p: &FutureProducer, topic: &str, msgs: &[Msg]) -> Vec<(i32, i64)> {
    let pending: Vec<_> = msgs
        .iter()
        .map(|m| {
            let mut r = FutureRecord::to(topic)
                .key(m.key.as_str())
                .payload(m.value.as_slice());
            if let Some(tp) = &m.traceparent {
                r = r.headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(tp.as_str()),
                }));
            }
            p.send_result(r)
                .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"))
        })
        .collect();
    pending
        .into_iter()
        .map(|f| match block_on(f).expect("producer dropped") {
            Ok(d) => (d.partition, d.offset),
            Err((e, _)) => panic!("producing to {topic}: {e}; {HINT}"),
        })
        .collect()
}

/// Produces in chunks with a pause after each, on a thread of its own (join it to see a panic).
pub fn produce_paced(topic: &str, msgs: Vec<Msg>, chunk: usize, pause: Duration) -> JoinHandle<()> {
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let p = producer();
        for c in msgs.chunks(chunk) {
            produce(&p, &topic, c);
            std::thread::sleep(pause);
        }
    })
}

/// A consumed record; `value` is the JSON payload (or the payload as a string, if not JSON).
#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Value,
    pub headers: HashMap<String, String>,
}

impl Rec {
    fn new(m: &BorrowedMessage<'_>) -> Self {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Self {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(text),
            value: m.payload().map_or(Value::Null, |p| {
                serde_json::from_slice(p).unwrap_or_else(|_| Value::String(text(p)))
            }),
            headers: m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_string(), h.value.map(text).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The event id: of the verdict, of an audit record's verdict, or of a dead letter.
    pub fn id(&self) -> Option<String> {
        let v = self.value.get("verdict").unwrap_or(&self.value);
        match v.get("id")? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}

/// (distinct ids of `wanted` seen, records carrying one of them).
pub fn tally(recs: &[Rec], wanted: &[String]) -> (usize, usize) {
    let wanted: HashSet<&str> = wanted.iter().map(String::as_str).collect();
    let hits: Vec<String> = recs
        .iter()
        .filter_map(Rec::id)
        .filter(|id| wanted.contains(id.as_str()))
        .collect();
    let distinct: HashSet<&String> = hits.iter().collect();
    (distinct.len(), hits.len())
}

/// The first `limit` ids of `wanted` that `seen` lacks.
pub fn missing<'a>(wanted: &'a [String], seen: &HashSet<String>, limit: usize) -> Vec<&'a str> {
    wanted
        .iter()
        .filter(|id| !seen.contains(*id))
        .take(limit)
        .map(String::as_str)
        .collect()
}

/// Reads topics from the beginning in a fresh consumer group, on a background thread.
pub struct Collector {
    recs: Arc<Mutex<Vec<Rec>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    pub fn start(topics: &[&str]) -> Self {
        require_broker();
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .expect("consumer");
        consumer.subscribe(topics).expect("subscribe");
        let recs: Arc<Mutex<Vec<Rec>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let thread = {
            let (recs, stop) = (recs.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => recs.lock().unwrap().push(Rec::new(&m)),
                        Some(Err(e)) => eprintln!("collector: {e}"),
                        None => {}
                    }
                }
            })
        };
        Self {
            recs,
            stop,
            thread: Some(thread),
        }
    }

    /// What was read from `topic` so far.
    pub fn records(&self, topic: &str) -> Vec<Rec> {
        let recs = self.recs.lock().unwrap();
        recs.iter().filter(|r| r.topic == topic).cloned().collect()
    }

    /// Waits until `done` holds for the records of `topic`, or `timeout`; whether it held.
    pub fn wait(&self, topic: &str, timeout: Duration, done: impl Fn(&[Rec]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.records(topic)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until at least `min` ids of `wanted` have a record on `topic`, or `timeout`; the
    /// ids of `wanted` seen.
    pub fn wait_ids(
        &self,
        topic: &str,
        wanted: &[String],
        min: usize,
        timeout: Duration,
    ) -> HashSet<String> {
        let want: HashSet<&str> = wanted.iter().map(String::as_str).collect();
        let seen = |recs: &[Rec]| -> HashSet<String> {
            recs.iter()
                .filter_map(Rec::id)
                .filter(|id| want.contains(id.as_str()))
                .collect()
        };
        self.wait(topic, timeout, |r| seen(r).len() >= min);
        seen(&self.records(topic))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kills (SIGKILL) and reaps a child if it still runs.
fn reap(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A `guardian serve` process; killed when dropped, its log printed if the test is failing.
pub struct Worker {
    pub name: String,
    pub admin_port: u16,
    child: Child,
    log: PathBuf,
}

impl Worker {
    /// Starts the worker (logs in `dir`) and waits until it logs that it is serving.
    pub fn start(
        name: &str,
        dir: &Path,
        t: &Topics,
        group: &str,
        redis: &str,
        prefix: &str,
    ) -> Self {
        Self::start_with(name, dir, t, group, redis, prefix, &[])
    }

    /// As `start`, with more `serve` flags.
    pub fn start_with(
        name: &str,
        dir: &Path,
        t: &Topics,
        group: &str,
        redis: &str,
        prefix: &str,
        extra: &[&str],
    ) -> Self {
        let admin_port = free_port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(super::bin())
            .args(["--log-format", "json", "serve", "--brokers", &brokers()])
            .args(["--group", group, "--input-topic", &t.input])
            .args(["--verdict-topic", &t.verdict, "--audit-topic", &t.audit])
            .args(["--dlq-topic", &t.dlq, "--redis-url", redis])
            .args(["--redis-prefix", prefix])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args([
                "--session-timeout-ms",
                "6000",
                "--heartbeat-interval-ms",
                "500",
            ])
            .args(extra)
            .env("GUARDIAN_HOME", super::home())
            .env("GUARDIAN_DEVICE", "cpu")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("worker log file"))
            .spawn()
            .expect("start guardian serve");
        let mut w = Self {
            name: name.into(),
            admin_port,
            child,
            log,
        };
        w.wait_log("\"message\":\"serving\"", Duration::from_secs(90));
        w
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics if the worker exits or `timeout` passes.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "worker {} exited ({status}) before logging {needle}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "worker {} did not log {needle} within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits (at most 30 s) for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the worker") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} still runs 30 s after SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: a crash, nothing drained or committed.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// `(status, body)` of a GET on the admin listener.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin_port, path)
    }

    /// A metric summed over its label sets, from /metrics (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").expect("GET /metrics");
        metric(&text, name)
    }

    /// Polls /readyz until `ok` holds for its JSON body (`timeout`); the last body.
    pub fn wait_ready(&self, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let body = self
                .get("/readyz")
                .and_then(|(_, b)| serde_json::from_str(&b).ok())
                .unwrap_or(Value::Null);
            if ok(&body) || Instant::now() >= deadline {
                return body;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the worker has partitions assigned (/readyz says so).
    pub fn wait_assigned(&self) {
        let body = self.wait_ready(Duration::from_secs(60), |v| {
            v["partitions_assigned"] == true
        });
        assert_eq!(
            body["partitions_assigned"], true,
            "worker {} got no partitions within 60 s: {body}",
            self.name
        );
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        reap(&mut self.child);
        if std::thread::panicking() {
            let log = self.log();
            let mut start = log.len().saturating_sub(20_000);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            eprintln!(
                "----- worker {} log ({}), last 20 kB -----\n{}",
                self.name,
                self.log.display(),
                &log[start..]
            );
        }
    }
}

/// A private `redis-server` on `port`, without persistence; killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Child,
}

impl RedisServer {
    pub fn start(dir: &Path, port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (Debian: apt-get install redis-server)");
        let mut r = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("redis-server on port {port} exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis is gone, mid-conversation.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// The keys under `prefix` in the Redis at `url`.
pub fn redis_keys(url: &str, prefix: &str) -> Vec<String> {
    let mut con = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .unwrap_or_else(|e| panic!("Redis at {url}: {e}; {HINT}"));
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut con)
        .expect("KEYS")
}

/// `(status, body)` of `GET path` on 127.0.0.1:port over HTTP/1.0; `None` if it cannot connect.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// The sum of the samples of `name` (or `name_total`) over all label sets in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = rest.strip_prefix("_total").unwrap_or(rest);
            if !rest.starts_with(['{', ' ']) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

/// `(path, body)` of each request an `OtlpSink` received.
type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An OTLP/HTTP receiver on 127.0.0.1: answers every POST with 200 and keeps `(path, body)`.
pub struct OtlpSink {
    pub port: u16,
    requests: Requests,
}

impl OtlpSink {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the OTLP sink");
        let port = listener.local_addr().unwrap().port();
        let requests: Requests = Arc::default();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let seen = seen.clone();
                std::thread::spawn(move || serve_otlp(conn, &seen));
            }
        });
        Self { port, requests }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Bodies received on `path`.
    pub fn bodies(&self, path: &str) -> Vec<Vec<u8>> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

/// Reads HTTP/1.1 requests off one (keep-alive) connection.
fn serve_otlp(conn: std::net::TcpStream, seen: &Mutex<Vec<(String, Vec<u8>)>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut out = conn.try_clone().expect("clone the connection");
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push((path, body));
        let reply =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}
