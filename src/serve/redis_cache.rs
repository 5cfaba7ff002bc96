//! The shared verdict cache in Redis: one MGET per batch before inference, one pipelined
//! `SET .. EX` per batch after it. Redis only makes repeated queries cheaper; it is never needed
//! for correctness. Every call has a timeout, an error drops the connection, and reconnection is
//! tried with exponential backoff, so a dead or slow Redis costs a batch at most `timeout` and
//! then nothing until it is back.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use crate::cache::{CachedVerdict, Key};
use crate::config::RedisConfig;
use crate::error::{Error, Result};

/// Redis as `/readyz` and the metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisState {
    Disabled,
    Up,
    Down,
}

impl RedisState {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Disabled => "disabled",
            RedisState::Up => "up",
            RedisState::Down => "down",
        }
    }
}

/// Called with the operation name when a Redis call fails or times out.
pub type ErrorHook = Box<dyn Fn(&'static str) + Send + Sync>;

const UP: u8 = 1;
const DOWN: u8 = 2;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

struct Conn {
    conn: Option<MultiplexedConnection>,
    /// No connection attempt before this instant (backoff after failures).
    next_attempt: Instant,
    backoff: Duration,
}

impl Conn {
    /// After a failure: no new attempt before the backoff passes, and the next backoff doubles.
    fn back_off(&mut self, max: Duration) -> Duration {
        let wait = self.backoff;
        self.next_attempt = Instant::now() + wait;
        self.backoff = (wait * 2).min(max);
        wait
    }
}

pub struct RedisCache {
    client: redis::Client,
    conn: Mutex<Conn>,
    state: AtomicU8,
    prefix: String,
    ttl_s: u64,
    /// Per command.
    timeout: Duration,
    /// Connecting and PING: a TLS handshake needs more than a tight command timeout.
    connect_timeout: Duration,
    max_backoff: Duration,
    on_error: ErrorHook,
}

impl RedisCache {
    /// `None` when the URL is empty (no Redis). The URL is checked here; the connection is made
    /// lazily, so a worker starts even while Redis is down.
    pub fn new(cfg: &RedisConfig, on_error: ErrorHook) -> Result<Option<Arc<Self>>> {
        if cfg.url.is_empty() {
            return Ok(None);
        }
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| {
            Error::Config(format!(
                "redis.url: {e} (expected redis://[USER:PASSWORD@]HOST:PORT[/DB] or rediss://...)"
            ))
        })?;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        Ok(Some(Arc::new(Self {
            client,
            conn: Mutex::new(Conn {
                conn: None,
                next_attempt: Instant::now(),
                backoff: FIRST_BACKOFF,
            }),
            state: AtomicU8::new(DOWN),
            prefix: cfg.key_prefix.clone(),
            ttl_s: cfg.ttl_s,
            timeout,
            connect_timeout: timeout.max(Duration::from_millis(500)),
            max_backoff: Duration::from_millis(cfg.reconnect_max_ms.max(100)),
            on_error,
        })))
    }

    pub fn state(&self) -> RedisState {
        match self.state.load(Ordering::Relaxed) {
            UP => RedisState::Up,
            _ => RedisState::Down,
        }
    }

    fn redis_key(&self, key: &Key) -> String {
        format!("{}{}", self.prefix, hex::encode(key))
    }

    /// A live connection, or `None` while Redis is down and the backoff has not passed.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        let mut g = self.conn.lock().await;
        if let Some(c) = &g.conn {
            return Some(c.clone());
        }
        if Instant::now() < g.next_attempt {
            return None;
        }
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.timeout));
        let attempt = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg);
        let why = match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(c)) => {
                g.conn = Some(c.clone());
                g.backoff = FIRST_BACKOFF;
                if self.state.swap(UP, Ordering::Relaxed) != UP {
                    tracing::info!(target: "guardian::redis", "redis: connected");
                }
                return Some(c);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connection timed out".to_string(),
        };
        (self.on_error)("connect");
        let wait = g.back_off(self.max_backoff);
        self.state.store(DOWN, Ordering::Relaxed);
        tracing::warn!(
            target: "guardian::redis",
            error = why,
            retry_in_ms = wait.as_millis() as u64,
            "redis: cannot connect; screening without the shared cache"
        );
        None
    }

    /// Runs one command with `timeout`. On an error or a timeout: counts it, drops the
    /// connection so the next call reconnects (after the backoff), and returns `None`.
    async fn call<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let why = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        (self.on_error)(op);
        let mut g = self.conn.lock().await;
        if g.conn.take().is_some() {
            tracing::warn!(
                target: "guardian::redis",
                op,
                error = why,
                "redis: call failed; screening without the shared cache until it is back"
            );
        }
        g.back_off(self.max_backoff);
        self.state.store(DOWN, Ordering::Relaxed);
        None
    }

    /// Connects (or reconnects, after the backoff) and pings. Run at start and periodically, so
    /// health reflects Redis even while no events arrive.
    pub async fn probe(&self) -> RedisState {
        if let Some(mut conn) = self.connection().await {
            let cmd = redis::cmd("PING");
            self.call(
                "ping",
                self.connect_timeout,
                cmd.query_async::<String>(&mut conn),
            )
            .await;
        }
        self.state()
    }

    /// Looks the keys up in one MGET. `None` (all misses) when Redis is down or slow.
    pub async fn get_many(&self, keys: &[Key]) -> Option<Vec<Option<CachedVerdict>>> {
        if keys.is_empty() {
            return Some(Vec::new());
        }
        let mut conn = self.connection().await?;
        let names: Vec<String> = keys.iter().map(|k| self.redis_key(k)).collect();
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&names);
        let values = self
            .call(
                "mget",
                self.timeout,
                cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut conn),
            )
            .await?;
        Some(
            values
                .into_iter()
                // An entry that does not parse (another version wrote it) is a miss.
                .map(|v| v.and_then(|b| serde_json::from_slice(&b).ok()))
                .collect(),
        )
    }

    /// Stores verdicts with the TTL in one pipeline. Failures are counted, never raised.
    pub async fn put_many(&self, items: &[(Key, Arc<CachedVerdict>)]) {
        if items.is_empty() {
            return;
        }
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let mut pipe = redis::pipe();
        for (k, v) in items {
            let bytes = serde_json::to_vec(v.as_ref()).expect("verdicts serialise");
            pipe.cmd("SET")
                .arg(self.redis_key(k))
                .arg(bytes)
                .arg("EX")
                .arg(self.ttl_s)
                .ignore();
        }
        self.call("set", self.timeout, pipe.query_async::<()>(&mut conn))
            .await;
    }
}
