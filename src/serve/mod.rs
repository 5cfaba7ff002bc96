//! `guardian serve`: the Kafka worker. Consumes query events in a consumer group, screens them in
//! micro-batches (verdicts cached in memory and in Redis), publishes verdict, audit and
//! dead-letter records, and commits an offset only after everything before it was acknowledged.
//!
//! Threads and tasks:
//! - intake (its own OS thread and single-threaded runtime): polls the consumer, tracks offsets,
//!   pauses and resumes partitions for backpressure, commits. Rebalance callbacks run here and may
//!   block while revoked partitions drain, so nothing else shares this thread;
//! - batcher (async task): cuts micro-batches by size and wait, spawns one task per batch;
//! - batch tasks (async): caches, engine, publish, finish offsets (see `pipeline`);
//! - the engine thread (see `crate::engine`); the admin HTTP listener; the Redis prober.

pub mod admin;
pub mod bench;
pub mod kafka;
pub mod offsets;
pub mod pipeline;
pub mod redis_cache;
pub mod telemetry;
pub mod trace;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::TopicPartitionList;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::Config;
use crate::engine::BatchObserver;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::screen::Screener;
use admin::Health;
use kafka::WorkerContext;
use offsets::OffsetTracker;
use pipeline::{Incoming, Pipeline, Topics};
use redis_cache::{RedisCache, RedisState};
use telemetry::Telemetry;

/// What a run did, for the exit log line.
#[derive(Debug, Default)]
pub struct ServeSummary {
    pub events: u64,
    pub pauses: u64,
    /// Events still in flight when the shutdown timeout passed (not committed: read again).
    pub abandoned: usize,
}

/// Runs the worker until `shutdown` turns true. `kafka_extra` are librdkafka properties for both
/// clients (the CLI's --kafka-property).
pub async fn run(
    cfg: Config,
    model: Arc<Model>,
    kafka_extra: Vec<(String, String)>,
    shutdown: watch::Receiver<bool>,
) -> Result<ServeSummary> {
    let telemetry = Arc::new(Telemetry::start(&cfg.telemetry)?);
    let metrics = telemetry.metrics.clone();
    let health = Arc::new(Health::default());
    let tracker = Arc::new(OffsetTracker::new());
    let lag: telemetry::LagTable = Arc::default();

    let observer: BatchObserver = {
        let m = metrics.clone();
        Box::new(move |s| {
            m.engine_batch_size.record(s.size as u64, &[]);
            m.engine_batch_tokens.record(s.tokens as u64, &[]);
            m.inference_seconds.record(s.elapsed.as_secs_f64(), &[]);
            if s.escalated > 0 {
                m.second_opinions.add(s.escalated as u64, &[]);
            }
        })
    };
    let screener = Screener::with_model(model, &cfg, Some(observer))?;

    let redis = {
        let m = metrics.clone();
        RedisCache::new(
            &cfg.redis,
            Box::new(move |op| m.redis_errors.add(1, &[KeyValue::new("op", op)])),
        )?
    };
    health.set_redis(match &redis {
        None => RedisState::Disabled,
        Some(r) => r.probe().await,
    });
    {
        let tracker = tracker.clone();
        let redis = redis.clone();
        telemetry.observe_gauges(
            lag.clone(),
            move || tracker.in_flight() as u64,
            move || redis.as_ref().map(|r| r.state() == RedisState::Up),
        );
    }
    if let Some(r) = redis.clone() {
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                let s = if r.state() == RedisState::Up {
                    r.state()
                } else {
                    r.probe().await
                };
                health.set_redis(s);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    let producer: FutureProducer = kafka::producer_config(&cfg.kafka, &kafka_extra)
        .create()
        .map_err(|e| Error::Kafka(format!("producer for {}: {e}", cfg.kafka.brokers)))?;
    let context = WorkerContext {
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        lag,
        revoke_drain: Duration::from_millis(cfg.serve.revoke_drain_ms),
        assignment_changed: AtomicBool::new(false),
    };
    let consumer: StreamConsumer<WorkerContext> = kafka::consumer_config(&cfg.kafka, &kafka_extra)
        .create_with_context(context)
        .map_err(|e| Error::Kafka(format!("consumer for {}: {e}", cfg.kafka.brokers)))?;
    check_topics(&consumer, &cfg)?;
    consumer
        .subscribe(&[cfg.kafka.input_topic.as_str()])
        .map_err(|e| Error::Kafka(format!("subscribe to {}: {e}", cfg.kafka.input_topic)))?;

    let freed = Arc::new(Notify::new());
    let pipeline = Arc::new(Pipeline {
        screener,
        producer: producer.clone(),
        tracker: tracker.clone(),
        memory: pipeline::memory_cache(cfg.screen.cache_capacity),
        redis,
        metrics: metrics.clone(),
        tracer: telemetry.tracer.clone(),
        topics: Topics {
            verdict: cfg.kafka.verdict_topic.clone(),
            audit: cfg.kafka.audit_topic.clone(),
            dlq: cfg.kafka.dlq_topic.clone(),
        },
        audit_query: cfg.serve.audit_query,
        max_query_chars: cfg.screen.max_query_chars,
        worker: worker_name(),
        stopping: AtomicBool::new(false),
        freed: freed.clone(),
    });

    if !cfg.serve.admin_addr.is_empty() {
        let addr: SocketAddr = cfg
            .serve
            .admin_addr
            .parse()
            .map_err(|e| Error::Config(format!("serve.admin_addr: {e}")))?;
        let bound = admin::serve(addr, health.clone(), telemetry.clone()).await?;
        tracing::info!(admin = %bound, "admin listener: /metrics /healthz /readyz");
    }

    // The batcher: micro-batches by size and wait, a task per batch.
    let (batch_tx, batch_rx) = mpsc::channel::<Incoming>(cfg.serve.batch_size * 2);
    let batcher = tokio::spawn(batcher(
        batch_rx,
        pipeline.clone(),
        cfg.serve.batch_size,
        Duration::from_millis(cfg.serve.batch_wait_ms),
    ));

    // The intake loop, on its own thread (see the module comment).
    let intake_cfg = IntakeConfig {
        max_in_flight: cfg.serve.max_in_flight,
        resume_in_flight: cfg.serve.resume_in_flight,
        commit_interval: Duration::from_millis(cfg.serve.commit_interval_ms),
        shutdown_timeout: Duration::from_millis(cfg.serve.shutdown_timeout_ms),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    {
        let health = health.clone();
        let freed = freed.clone();
        let pipeline = pipeline.clone();
        let mut shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("guardian-intake".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("intake runtime");
                let r = rt.block_on(intake(
                    consumer,
                    batch_tx,
                    intake_cfg,
                    health,
                    freed,
                    pipeline,
                    &mut shutdown,
                ));
                let _ = done_tx.send(r);
            })
            .map_err(|e| Error::Serve(format!("cannot start the intake thread: {e}")))?;
    }
    tracing::info!(
        brokers = %cfg.kafka.brokers,
        group = %cfg.kafka.group,
        input = %cfg.kafka.input_topic,
        "serving"
    );
    let summary = done_rx
        .await
        .map_err(|_| Error::Serve("the intake thread stopped unexpectedly".into()))?;
    let _ = batcher.await;
    // Everything acknowledged was committed by the intake loop; flush what librdkafka still
    // holds (nothing, normally) and the telemetry.
    let _ = producer.flush(Duration::from_secs(5));
    telemetry.shutdown();
    summary
}

/// Fails early, with the fix, when a topic the worker needs is missing.
fn check_topics(consumer: &StreamConsumer<WorkerContext>, cfg: &Config) -> Result<()> {
    let md = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| {
            Error::Kafka(format!(
                "cannot reach the brokers at {}: {e}. Is a broker running? Locally: `ops/services.sh up`",
                cfg.kafka.brokers
            ))
        })?;
    let have: Vec<&str> = md.topics().iter().map(|t| t.name()).collect();
    let k = &cfg.kafka;
    let missing: Vec<&str> = [
        &k.input_topic,
        &k.verdict_topic,
        &k.audit_topic,
        &k.dlq_topic,
    ]
    .into_iter()
    .map(|s| s.as_str())
    .filter(|t| !have.contains(t))
    .collect();
    if !missing.is_empty() {
        return Err(Error::Kafka(format!(
            "topic(s) {} do not exist on {}; create them (locally: `ops/services.sh topics`)",
            missing.join(", "),
            k.brokers
        )));
    }
    Ok(())
}

fn worker_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown".into()
    };
    format!("{host}-{}", std::process::id())
}

async fn batcher(
    mut rx: mpsc::Receiver<Incoming>,
    pipeline: Arc<Pipeline>,
    size: usize,
    wait: Duration,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut batch: Vec<Incoming> = Vec::with_capacity(size);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = rx.recv() => match m {
                Some(inc) => {
                    if batch.is_empty() {
                        deadline = Some(tokio::time::Instant::now() + wait);
                    }
                    batch.push(inc);
                    if batch.len() < size {
                        continue;
                    }
                }
                None => break,
            },
            _ = timer => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        }
        if !batch.is_empty() {
            let b = std::mem::replace(&mut batch, Vec::with_capacity(size));
            tasks.spawn(pipeline.clone().process(b));
        }
        deadline = None;
    }
    if !batch.is_empty() {
        tasks.spawn(pipeline.clone().process(batch));
    }
    while tasks.join_next().await.is_some() {}
}

struct IntakeConfig {
    max_in_flight: usize,
    resume_in_flight: usize,
    commit_interval: Duration,
    shutdown_timeout: Duration,
}

async fn intake(
    consumer: StreamConsumer<WorkerContext>,
    batches: mpsc::Sender<Incoming>,
    cfg: IntakeConfig,
    health: Arc<Health>,
    freed: Arc<Notify>,
    pipeline: Arc<Pipeline>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<ServeSummary> {
    let ctx = consumer.context();
    let metrics = ctx.metrics.clone();
    let tracker = ctx.tracker.clone();
    let mut summary = ServeSummary::default();
    let mut paused = false;
    let mut next_commit = tokio::time::Instant::now() + cfg.commit_interval;
    health.consuming.store(true, Ordering::Relaxed);
    let pause_all = |pause: bool| {
        let list = consumer
            .assignment()
            .unwrap_or_else(|_| TopicPartitionList::new());
        if list.count() == 0 {
            return;
        }
        let r = if pause {
            consumer.pause(&list)
        } else {
            consumer.resume(&list)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, pause, "cannot pause/resume partitions");
        }
    };
    while !*shutdown.borrow() {
        // Backpressure: stop fetching while too much is in flight.
        let in_flight = tracker.in_flight();
        let reassigned = ctx.assignment_changed.swap(false, Ordering::Relaxed);
        if !paused && in_flight >= cfg.max_in_flight {
            pause_all(true);
            paused = true;
            summary.pauses += 1;
            metrics.pauses.add(1, &[]);
            tracing::debug!(in_flight, "paused partitions: the engine is behind");
        } else if paused && in_flight <= cfg.resume_in_flight {
            pause_all(false);
            paused = false;
            tracing::debug!(in_flight, "resumed partitions");
        } else if paused && reassigned {
            pause_all(true);
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep_until(next_commit) => {
                commit(&consumer, &tracker, false);
                next_commit = tokio::time::Instant::now() + cfg.commit_interval;
            }
            _ = freed.notified(), if paused => {}
            m = consumer.recv() => match m {
                Ok(m) => {
                    let tp = (m.topic().to_string(), m.partition());
                    if !tracker.begin(&tp, m.offset()) {
                        continue; // revoked meanwhile: the new owner reads it
                    }
                    let traceparent = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key.eq_ignore_ascii_case("traceparent"))
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .map(str::to_string)
                    });
                    let inc = Incoming {
                        tp,
                        offset: m.offset(),
                        payload: m.payload().map(<[u8]>::to_vec),
                        traceparent,
                        received: Instant::now(),
                    };
                    summary.events += 1;
                    if batches.send(inc).await.is_err() {
                        return Err(Error::Serve("the batcher stopped".into()));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    // Drain: take nothing more, let in-flight batches finish, commit, leave the group.
    health.stopping.store(true, Ordering::Relaxed);
    let in_flight = tracker.in_flight();
    tracing::info!(in_flight, "shutting down: draining in-flight events");
    drop(batches);
    let started = Instant::now();
    // Blocking is fine: this thread's runtime runs nothing else.
    let left = tracker.wait_idle(None, cfg.shutdown_timeout);
    pipeline.stopping.store(true, Ordering::Relaxed);
    commit(&consumer, &tracker, true);
    summary.abandoned = left;
    tracing::info!(
        drained_ms = started.elapsed().as_millis() as u64,
        abandoned = left,
        "offsets committed; leaving the consumer group"
    );
    consumer.unsubscribe();
    drop(consumer);
    Ok(summary)
}

fn commit(consumer: &StreamConsumer<WorkerContext>, tracker: &OffsetTracker, sync: bool) {
    let mode = if sync {
        CommitMode::Sync
    } else {
        CommitMode::Async
    };
    consumer
        .context()
        .commit(consumer, tracker.take_committable(None), mode);
}

/// Parses `KEY=VALUE` (the CLI's --kafka-property).
pub fn parse_property(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "{s:?}: expected KEY=VALUE, e.g. security.protocol=SASL_SSL"
        )),
    }
}
