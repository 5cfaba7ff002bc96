//! One micro-batch of Kafka events, start to finish: decode and validate, look verdicts up
//! (in-memory, then one Redis MGET), screen the misses on the engine (each distinct query once),
//! publish a verdict and an audit record per event and a dead letter per bad one, wait for the
//! broker's acknowledgements, and only then mark the events' offsets finished.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use opentelemetry::trace::{Span, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::cache::{self, CachedVerdict, Key};
use crate::config::AuditQuery;
use crate::engine::Job;
use crate::event::{self, DeadLetter, Reason, Rejection, Verdict};
use crate::model::HeadScores;
use crate::screen::Screener;
use crate::serve::offsets::{OffsetTracker, Tp};
use crate::serve::redis_cache::RedisCache;
use crate::serve::telemetry::Metrics;
use crate::serve::trace;
use crate::util::{self, Lang};

/// An event as taken from the consumer.
pub struct Incoming {
    pub tp: Tp,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    pub traceparent: Option<String>,
    pub received: Instant,
}

pub struct Topics {
    pub verdict: String,
    pub audit: String,
    pub dlq: String,
}

/// Everything a batch needs; shared by all batches of a worker.
pub struct Pipeline {
    pub screener: Screener,
    pub producer: FutureProducer,
    pub tracker: Arc<OffsetTracker>,
    pub memory: Option<Mutex<LruCache<Key, Arc<CachedVerdict>>>>,
    pub redis: Option<Arc<RedisCache>>,
    pub metrics: Arc<Metrics>,
    pub tracer: opentelemetry_sdk::trace::SdkTracer,
    pub topics: Topics,
    pub audit_query: AuditQuery,
    pub max_query_chars: usize,
    pub worker: String,
    /// Set at shutdown: publishing stops retrying (the offsets stay uncommitted).
    pub stopping: AtomicBool,
    /// Signalled as events finish (the intake loop resumes paused partitions on it).
    pub freed: Arc<Notify>,
}

/// A decoded event that will get a verdict.
struct Screened {
    ev: event::QueryEvent,
    lang: Lang,
    normalised: String,
    key: Key,
    /// Set for over-long queries: screened on a prefix and dead-lettered too.
    too_long: Option<DeadLetter>,
}

/// A record to publish, owned so failed sends can be retried.
struct Record {
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    traceparent: Option<String>,
}

pub fn memory_cache(capacity: usize) -> Option<Mutex<LruCache<Key, Arc<CachedVerdict>>>> {
    NonZeroUsize::new(capacity).map(|c| Mutex::new(LruCache::new(c)))
}

fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Pipeline {
    pub async fn process(self: Arc<Self>, batch: Vec<Incoming>) {
        let started = Instant::now();
        let mut batch_span = self
            .tracer
            .span_builder("guardian.batch")
            .with_kind(SpanKind::Consumer)
            .start(&self.tracer);
        batch_span.set_attribute(KeyValue::new(
            "messaging.batch.message_count",
            batch.len() as i64,
        ));
        let batch_cx = Context::current_with_span(batch_span);
        self.metrics.batch_events.record(batch.len() as u64, &[]);

        // 1. Decode and validate.
        let mut decoded: Vec<Result<Screened, DeadLetter>> = Vec::with_capacity(batch.len());
        for inc in &batch {
            self.metrics
                .events_in
                .add(1, &[KeyValue::new("topic", inc.tp.0.clone())]);
            decoded.push(self.decode(inc));
        }

        // 2. Caches: memory first, then one MGET for the rest.
        let mut verdicts: HashMap<Key, (Arc<CachedVerdict>, &'static str)> = HashMap::new();
        let mut missing: Vec<Key> = Vec::new();
        let mut looked_up: HashSet<Key> = HashSet::new();
        for s in decoded.iter().flatten() {
            if !looked_up.insert(s.key) {
                continue;
            }
            let hit = self
                .memory
                .as_ref()
                .and_then(|m| m.lock().expect("memory cache").get(&s.key).cloned());
            match hit {
                Some(v) => {
                    verdicts.insert(s.key, (v, "memory"));
                }
                None => missing.push(s.key),
            }
        }
        if let (Some(redis), false) = (&self.redis, missing.is_empty()) {
            if let Some(found) = redis.get_many(&missing).await {
                let mut still = Vec::with_capacity(missing.len());
                for (k, v) in missing.into_iter().zip(found) {
                    match v {
                        Some(v) => {
                            let v = Arc::new(v);
                            self.remember(k, &v);
                            verdicts.insert(k, (v, "redis"));
                        }
                        None => still.push(k),
                    }
                }
                missing = still;
            }
        }

        // 3. Screen each distinct missing query once.
        let screened_at = Instant::now();
        let fresh = self.screen_missing(&decoded, &missing).await;
        let mut to_store = Vec::with_capacity(fresh.len());
        for (k, v) in fresh {
            if let Some(v) = &v {
                self.remember(k, v);
                to_store.push((k, v.clone()));
            }
            if let Some(v) = v {
                verdicts.insert(k, (v, "none"));
            }
        }
        if let (Some(redis), false) = (&self.redis, to_store.is_empty()) {
            // Written in the background: the cache must never hold up acknowledgements.
            let redis = redis.clone();
            tokio::spawn(async move { redis.put_many(&to_store).await });
        }

        // 4. Records: verdict + audit per event, dead letters.
        let mut records = Vec::with_capacity(batch.len() * 2);
        let mut tally: Vec<[KeyValue; 3]> = Vec::new();
        let mut dead: Vec<Reason> = Vec::new();
        let mut hits = 0u64;
        for (inc, d) in batch.iter().zip(decoded) {
            let parent = inc
                .traceparent
                .as_deref()
                .and_then(trace::parse_traceparent)
                .map(|sc| Context::new().with_remote_span_context(sc))
                .unwrap_or_else(|| batch_cx.clone());
            let mut span = self
                .tracer
                .span_builder("guardian.event")
                .with_kind(SpanKind::Consumer)
                .with_attributes([
                    KeyValue::new("messaging.destination.partition.id", i64::from(inc.tp.1)),
                    KeyValue::new("messaging.kafka.offset", inc.offset),
                ])
                .start_with_context(&self.tracer, &parent);
            let sc = span.span_context().clone();
            let traceparent = trace::format_traceparent(&sc);
            match d {
                Err(dl) => {
                    span.set_attribute(KeyValue::new("guardian.dead_letter", dl.error.as_str()));
                    dead.push(dl.error);
                    records.push(self.dead_letter_record(&dl, &traceparent));
                }
                Ok(s) => {
                    let Some((v, tier)) = verdicts.get(&s.key) else {
                        // The engine failed on this query: a dead letter, never silence.
                        let dl = DeadLetter::new(
                            Rejection {
                                reason: Reason::EngineError,
                                detail: "the model could not score this query".into(),
                                id: Some(s.ev.id.clone()),
                            },
                            source(inc),
                            inc.payload.as_deref().unwrap_or_default(),
                            false,
                        );
                        dead.push(dl.error);
                        records.push(self.dead_letter_record(&dl, &traceparent));
                        span.end();
                        continue;
                    };
                    let cached = *tier != "none";
                    if cached {
                        hits += 1;
                        self.metrics
                            .cache_hits
                            .add(1, &[KeyValue::new("tier", *tier)]);
                    } else {
                        self.metrics.cache_misses.add(1, &[]);
                    }
                    let verdict = self.verdict(&s, v, cached, inc.received);
                    span.set_attribute(KeyValue::new("guardian.label", v.label.as_str()));
                    span.set_attribute(KeyValue::new("guardian.cached", cached));
                    tally.push([
                        KeyValue::new("label", v.label.as_str()),
                        KeyValue::new("category", v.category.map_or("none", |c| c.id())),
                        KeyValue::new("action", v.action.as_str()),
                    ]);
                    let key = id_key(&verdict.id);
                    let audit = self.audit(&s, &verdict, inc, &sc, tier, started, screened_at);
                    records.push(Record {
                        topic: self.topics.verdict.clone(),
                        key: Some(key.clone()),
                        payload: serde_json::to_vec(&verdict).expect("verdicts serialise"),
                        traceparent: Some(traceparent.clone()),
                    });
                    records.push(Record {
                        topic: self.topics.audit.clone(),
                        key: Some(key),
                        payload: serde_json::to_vec(&audit).expect("audits serialise"),
                        traceparent: Some(traceparent.clone()),
                    });
                    if let Some(dl) = &s.too_long {
                        dead.push(dl.error);
                        records.push(self.dead_letter_record(dl, &traceparent));
                    }
                }
            }
            span.end();
        }

        // 5. Publish and wait for every acknowledgement (retrying what failed).
        let published = self.publish(records).await;
        let batch_span = batch_cx.span();
        batch_span.set_attribute(KeyValue::new("guardian.cache_hits", hits as i64));
        if !published {
            // Shutting down with records unacknowledged: leave the offsets unfinished, so
            // they are not committed and the events are read again.
            batch_span.set_attribute(KeyValue::new("guardian.abandoned", true));
            batch_span.end();
            return;
        }
        for t in &tally {
            self.metrics.verdicts.add(1, t);
        }
        for r in dead {
            self.metrics
                .dead_letters
                .add(1, &[KeyValue::new("reason", r.as_str())]);
        }
        // 6. Only now are the events done.
        for inc in &batch {
            self.tracker.finish(&inc.tp, inc.offset);
            self.metrics
                .end_to_end_seconds
                .record(inc.received.elapsed().as_secs_f64(), &[]);
        }
        self.freed.notify_one();
        batch_span.end();
    }

    fn remember(&self, k: Key, v: &Arc<CachedVerdict>) {
        if let Some(m) = &self.memory {
            m.lock().expect("memory cache").put(k, v.clone());
        }
    }

    fn decode(&self, inc: &Incoming) -> Result<Screened, DeadLetter> {
        let raw = inc.payload.as_deref().unwrap_or_default();
        let fallback = json!(format!("{}/{}/{}", inc.tp.0, inc.tp.1, inc.offset));
        let ev = if inc.payload.is_none() {
            Err(Rejection {
                reason: Reason::InvalidJson,
                detail: "the message has no value".into(),
                id: None,
            })
        } else {
            event::decode(raw, fallback, false, self.max_query_chars)
        };
        let ev = ev.map_err(|rej| DeadLetter::new(rej, source(inc), raw, false))?;
        let too_long = ev
            .truncated_chars
            .then(|| DeadLetter::query_too_long(&ev, self.max_query_chars, source(inc), raw));
        let lang = ev.lang.unwrap_or_else(|| util::detect_lang(&ev.query));
        let normalised = util::normalise(&ev.query);
        let model = &self.screener.model.id;
        let key = cache::key(model, &self.screener.policy.version, lang, &normalised);
        Ok(Screened {
            ev,
            lang,
            normalised,
            key,
            too_long,
        })
    }

    /// Tokenizes and screens one query per missing key; `None` where the engine failed.
    async fn screen_missing(
        self: &Arc<Self>,
        decoded: &[Result<Screened, DeadLetter>],
        missing: &[Key],
    ) -> Vec<(Key, Option<Arc<CachedVerdict>>)> {
        if missing.is_empty() {
            return Vec::new();
        }
        let mut first_of: HashMap<Key, &Screened> = HashMap::with_capacity(missing.len());
        for s in decoded.iter().flatten() {
            first_of.entry(s.key).or_insert(s);
        }
        let mut firsts: Vec<(Key, String, bool, Lang, String)> = Vec::with_capacity(missing.len());
        for k in missing {
            if let Some(s) = first_of.get(k) {
                firsts.push((
                    *k,
                    s.ev.query.clone(),
                    s.ev.truncated_chars,
                    s.lang,
                    s.normalised.clone(),
                ));
            }
        }
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(usize, Result<HeadScores, String>, bool)>();
        let me = self.clone();
        let queries: Vec<(String, bool)> = firsts.iter().map(|f| (f.1.clone(), f.2)).collect();
        let n = queries.len();
        // Tokenizing and a full engine queue both block: keep them off the async workers.
        let submitted = tokio::task::spawn_blocking(move || {
            for (i, (q, cut)) in queries.into_iter().enumerate() {
                let tx = tx.clone();
                let tokens = match me.screener.model.embedder.tokenizer.encode(&q) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.send((i, Err(e.to_string()), cut));
                        continue;
                    }
                };
                let truncated = cut || tokens.truncated;
                let job = Job {
                    tokens: tokens.ids,
                    text: q,
                    reply: Box::new(move |r| {
                        let _ = tx.send((i, r, truncated));
                    }),
                };
                if let Err(e) = me.screener.engine().submit(job) {
                    tracing::error!(error = %e, "engine refused a query");
                }
            }
        });
        let _ = submitted.await;
        let mut out: Vec<(Key, Option<Arc<CachedVerdict>>)> = Vec::with_capacity(n);
        while let Some((i, r, truncated)) = rx.recv().await {
            let (k, _, _, lang, norm) = &firsts[i];
            let v = match r {
                Ok(s) => Some(Arc::new(self.screener.decide(&s, *lang, norm, truncated))),
                Err(e) => {
                    tracing::error!(error = %e, "the engine failed on a query");
                    None
                }
            };
            out.push((*k, v));
            if out.len() == n {
                break;
            }
        }
        out
    }

    fn verdict(&self, s: &Screened, v: &CachedVerdict, cached: bool, received: Instant) -> Verdict {
        self.screener
            .verdict_record(s.ev.id.clone(), s.ev.extra.clone(), v, cached, received)
    }

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        s: &Screened,
        verdict: &Verdict,
        inc: &Incoming,
        sc: &opentelemetry::trace::SpanContext,
        tier: &str,
        batch_started: Instant,
        screened_at: Instant,
    ) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
        let mut a = json!({
            "verdict": verdict,
            "source": source(inc),
            "cache": tier,
            "timings": {
                "queued_ms": ms(batch_started.saturating_duration_since(inc.received)),
                "lookup_ms": ms(screened_at.saturating_duration_since(batch_started)),
                "verdict_ms": ms(inc.received.elapsed()),
            },
            "trace_id": sc.trace_id().to_string(),
            "span_id": sc.span_id().to_string(),
            "worker": self.worker,
        });
        match self.audit_query {
            AuditQuery::Text => a["query"] = json!(s.ev.query),
            AuditQuery::Sha256 => {
                a["query_sha256"] = json!(util::sha256_hex(s.ev.query.as_bytes()))
            }
        }
        a
    }

    fn dead_letter_record(&self, dl: &DeadLetter, traceparent: &str) -> Record {
        Record {
            topic: self.topics.dlq.clone(),
            key: dl.id.as_ref().map(id_key),
            payload: serde_json::to_vec(dl).expect("dead letters serialise"),
            traceparent: Some(traceparent.to_string()),
        }
    }

    /// Sends every record and waits for the broker's acknowledgements; failed sends are retried
    /// with backoff until they succeed or the worker stops (then `false`).
    async fn publish(&self, mut records: Vec<Record>) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let sends = records.iter().map(|r| {
                let mut rec: FutureRecord<'_, str, [u8]> =
                    FutureRecord::to(&r.topic).payload(&r.payload);
                if let Some(k) = &r.key {
                    rec = rec.key(k.as_str());
                }
                if let Some(tp) = &r.traceparent {
                    rec = rec.headers(OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some(tp.as_str()),
                    }));
                }
                self.producer.send(rec, Timeout::Never)
            });
            let results = futures::future::join_all(sends).await;
            let failed: Vec<usize> = results
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.as_ref().err().map(|(e, _)| (i, e)))
                .map(|(i, e)| {
                    tracing::warn!(error = %e, topic = %records[i].topic, "publish failed; retrying");
                    i
                })
                .collect();
            if failed.is_empty() {
                return true;
            }
            self.metrics.publish_retries.add(1, &[]);
            if self.stopping.load(Ordering::Relaxed) {
                return false;
            }
            let mut keep = Vec::with_capacity(failed.len());
            for (i, r) in records.into_iter().enumerate() {
                if failed.contains(&i) {
                    keep.push(r);
                }
            }
            records = keep;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

fn source(inc: &Incoming) -> Value {
    json!({ "topic": inc.tp.0, "partition": inc.tp.1, "offset": inc.offset })
}
