//! The screening pipeline shared by `screen`, `eval` and `bench`: decode, validate, cache,
//! batch onto the engine, apply the policy, write verdicts in input order.
//!
//! Threads: the caller's thread reads and submits (blocking on the engine's bounded queue and on
//! a bounded reorder window: backpressure, flat memory); the engine thread runs batches; a
//! writer thread turns scores into verdicts and writes them in input order.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use serde_json::{json, Value};

use crate::cache::{self, CachedVerdict, Lookup, VerdictCache};
use crate::config::{Action, Config};
use crate::engine::{BatchObserver, Engine, EngineConfig, Job};
use crate::error::{Error, Result};
use crate::event::{self, DeadLetter, QueryEvent, Reason, Rejection, Scores, Verdict};
use crate::model::{HeadScores, Model};
use crate::policy::{Label, Policy};
use crate::respond::Responses;
use crate::taxonomy::Category;
use crate::util::{self, Lang};

/// Model, engine, policy and responses: everything that turns a query into a verdict.
pub struct Screener {
    pub model: Arc<Model>,
    pub policy: Policy,
    pub responses: Responses,
    engine: Engine,
    max_query_chars: usize,
    cache_capacity: usize,
    /// Lines read but not yet written, at most.
    reorder_window: usize,
}

/// The per-event part of a verdict, carried while the query is being screened.
struct Pending {
    seq: u64,
    id: Value,
    extra: serde_json::Map<String, Value>,
    started: Instant,
    /// Input bytes read up to and including this line (for the progress bar).
    offset: u64,
    /// Set for over-long queries: screened on a prefix, and dead-lettered too.
    too_long: Option<DeadLetter>,
}

impl Screener {
    pub fn new(cfg: &Config, observer: Option<BatchObserver>) -> Result<Self> {
        let model = Arc::new(Model::load(&cfg.model_spec())?);
        Self::with_model(model, cfg, observer)
    }

    pub fn with_model(
        model: Arc<Model>,
        cfg: &Config,
        observer: Option<BatchObserver>,
    ) -> Result<Self> {
        let policy = Policy::with_calibration(
            &cfg.policy,
            model.heads.meta.unsafe_threshold,
            &model.heads.meta.category_thresholds,
        );
        let responses = match cfg.responses.path.as_str() {
            "" => Responses::embedded(),
            p => Responses::load(Some(std::path::Path::new(p)))?,
        };
        let engine = Engine::start(model.clone(), EngineConfig::from(&cfg.engine), observer);
        Ok(Self {
            model,
            policy,
            responses,
            engine,
            max_query_chars: cfg.screen.max_query_chars,
            cache_capacity: cfg.screen.cache_capacity,
            reorder_window: 2 * cfg.engine.queue_capacity + cfg.engine.max_batch_size,
        })
    }

    /// The batching engine (for callers that manage their own events, like the Kafka worker).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Applies the policy and picks the response.
    pub fn decide(
        &self,
        scores: &HeadScores,
        lang: Lang,
        normalised: &str,
        truncated: bool,
    ) -> CachedVerdict {
        let d = self.policy.decide(scores);
        let response = match (d.category, d.action) {
            (Some(c), a) if a != Action::Allow => {
                Some(self.responses.pick(c, lang, normalised).to_string())
            }
            _ => None,
        };
        CachedVerdict {
            label: d.label,
            category: d.category,
            scores: Scores::from_heads(scores),
            action: d.action,
            observed_action: d.observed_action,
            response,
            lang,
            truncated,
        }
    }

    fn verdict(&self, p: Pending, v: &CachedVerdict, cached: bool) -> Verdict {
        self.verdict_record(p.id, p.extra, v, cached, p.started)
    }

    /// The verdict record of one event: the shared verdict plus the event's id and extra fields,
    /// this screener's model and policy versions, and the latency since `started`.
    pub fn verdict_record(
        &self,
        id: serde_json::Value,
        extra: serde_json::Map<String, serde_json::Value>,
        v: &CachedVerdict,
        cached: bool,
        started: Instant,
    ) -> Verdict {
        Verdict {
            id,
            label: v.label,
            category: v.category,
            scores: v.scores.clone(),
            action: v.action,
            observed_action: v.observed_action,
            response: v.response.clone(),
            lang: v.lang,
            model: self.model.id.clone(),
            policy: self.policy.version.clone(),
            cached,
            truncated: v.truncated,
            latency_ms: (started.elapsed().as_secs_f64() * 1e5).round() / 100.0,
            extra,
        }
    }

    /// Screens a list of queries (no cache) and returns their verdicts in order. Used by `eval`.
    pub fn screen_all(
        &self,
        queries: &[String],
        on_done: &(dyn Fn() + Sync),
    ) -> Result<Vec<CachedVerdict>> {
        let (tx, rx) = unbounded::<(usize, std::result::Result<HeadScores, String>)>();
        // Tokenized once; the ids go to the engine, the rest is kept for the verdict.
        let mut prepared = Vec::with_capacity(queries.len());
        let mut ids = Vec::with_capacity(queries.len());
        for q in queries {
            let tokens = self.model.embedder.tokenizer.encode(q)?;
            prepared.push((util::detect_lang(q), util::normalise(q), tokens.truncated));
            ids.push(tokens.ids);
        }
        let mut out: Vec<Option<CachedVerdict>> = vec![None; queries.len()];
        let mut received = 0;
        let drain = |r: (usize, std::result::Result<HeadScores, String>),
                     out: &mut Vec<Option<CachedVerdict>>|
         -> Result<()> {
            let (i, res) = r;
            let s = res.map_err(|e| Error::Data(format!("query {i}: {e}")))?;
            let (lang, norm, trunc) = &prepared[i];
            out[i] = Some(self.decide(&s, *lang, norm, *trunc));
            on_done();
            Ok(())
        };
        for (i, tokens) in ids.into_iter().enumerate() {
            let tx = tx.clone();
            self.engine.submit(Job {
                tokens,
                text: queries[i].clone(),
                reply: Box::new(move |r| {
                    let _ = tx.send((i, r));
                }),
            })?;
            while let Ok(r) = rx.try_recv() {
                drain(r, &mut out)?;
                received += 1;
            }
        }
        drop(tx);
        while received < queries.len() {
            let r = rx.recv().map_err(|_| Error::EngineClosed)?;
            drain(r, &mut out)?;
            received += 1;
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every query answered"))
            .collect())
    }

    /// Screens a JSONL (or plain-text) stream: one verdict per screenable line, in input order,
    /// and one dead-letter record per bad line. `total_bytes` sizes the progress bar.
    pub fn run_stream(
        &self,
        input: &mut dyn BufRead,
        output: Box<dyn Write + Send>,
        dead_letters: Box<dyn Write + Send>,
        progress: &indicatif::ProgressBar,
    ) -> Result<Summary> {
        let started = Instant::now();
        let cache: Option<Arc<VerdictCache<Pending>>> =
            VerdictCache::new(self.cache_capacity).map(Arc::new);
        let (tx, rx) = unbounded::<Msg>();
        // The reorder window: the reader takes a slot per line, the writer frees it once the line
        // is written, so a slow query at the head cannot make the buffer grow without bound.
        let window = self.reorder_window;
        let (slot_tx, slot_rx) = bounded::<()>(window);
        let summary = std::thread::scope(|s| -> Result<Summary> {
            let writer = s.spawn({
                let cache = cache.clone();
                let progress = progress.clone();
                move || {
                    self.write_loop(
                        rx,
                        output,
                        dead_letters,
                        cache.as_deref(),
                        &slot_rx,
                        &progress,
                    )
                }
            });
            let read = self.read_loop(input, &tx, cache.as_deref(), &slot_tx);
            drop(tx);
            let written = writer
                .join()
                .map_err(|_| Error::Data("the writer thread panicked".into()))?;
            read?;
            written
        })?;
        Ok(Summary {
            elapsed: started.elapsed(),
            ..summary
        })
    }

    fn read_loop(
        &self,
        input: &mut dyn BufRead,
        tx: &Sender<Msg>,
        cache: Option<&VerdictCache<Pending>>,
        slots: &Sender<()>,
    ) -> Result<()> {
        let mut line = Vec::with_capacity(256);
        let mut offset = 0u64;
        let mut seq = 0u64;
        loop {
            line.clear();
            let n = input
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::io("<input>", e))?;
            if n == 0 {
                return Ok(());
            }
            offset += n as u64;
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            slots
                .send(())
                .map_err(|_| Error::Data("the writer stopped early".into()))?;
            let line_no = seq + 1;
            let source = json!({ "line": line_no });
            let ev = match event::decode(&line, json!(line_no), true, self.max_query_chars) {
                Ok(ev) => ev,
                Err(rej) => {
                    let dl = DeadLetter::new(rej, source, &line, false);
                    let _ = tx.send(Msg::Dead { seq, dl, offset });
                    seq += 1;
                    continue;
                }
            };
            self.submit_event(ev, seq, offset, &line, source, tx, cache)?;
            seq += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_event(
        &self,
        ev: QueryEvent,
        seq: u64,
        offset: u64,
        raw: &[u8],
        source: Value,
        tx: &Sender<Msg>,
        cache: Option<&VerdictCache<Pending>>,
    ) -> Result<()> {
        let started = Instant::now();
        let too_long = ev
            .truncated_chars
            .then(|| DeadLetter::query_too_long(&ev, self.max_query_chars, source, raw));
        let lang = ev.lang.unwrap_or_else(|| util::detect_lang(&ev.query));
        let normalised = util::normalise(&ev.query);
        let pending = Pending {
            seq,
            id: ev.id,
            extra: ev.extra,
            started,
            offset,
            too_long,
        };
        let key = cache::key(&self.model.id, &self.policy.version, lang, &normalised);
        let mut slot = Some(pending);
        if let Some(c) = cache {
            match c.lookup(key, || slot.take().expect("one waiter")) {
                Lookup::Hit(v) => {
                    let _ = tx.send(Msg::Hit {
                        p: slot.take().expect("unused"),
                        v,
                    });
                    return Ok(());
                }
                Lookup::Joined => return Ok(()),
                Lookup::Miss => {}
            }
        }
        let pending = slot.take().expect("miss keeps the pending event");
        let tokens = self.model.embedder.tokenizer.encode(&ev.query)?;
        let tx2 = tx.clone();
        let truncated = tokens.truncated || ev.truncated_chars;
        self.engine.submit(Job {
            tokens: tokens.ids,
            text: ev.query.clone(),
            reply: Box::new(move |scores| {
                let _ = tx2.send(Msg::Scored {
                    p: pending,
                    key,
                    scores,
                    lang,
                    normalised,
                    truncated,
                });
            }),
        })
    }

    fn write_loop(
        &self,
        rx: Receiver<Msg>,
        output: Box<dyn Write + Send>,
        dead_letters: Box<dyn Write + Send>,
        cache: Option<&VerdictCache<Pending>>,
        slots: &Receiver<()>,
        progress: &indicatif::ProgressBar,
    ) -> Result<Summary> {
        let mut out = std::io::BufWriter::new(output);
        let mut dlq = std::io::LineWriter::new(dead_letters);
        let mut ready: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next = 0u64;
        let mut summary = Summary::default();
        for msg in rx {
            match msg {
                Msg::Dead { seq, dl, offset } => {
                    ready.insert(
                        seq,
                        Done {
                            verdict: None,
                            dead: Some(dl),
                            offset,
                        },
                    );
                }
                Msg::Hit { p, v } => {
                    summary.cache_hits += 1;
                    let (seq, offset, dead) = (p.seq, p.offset, p.too_long.clone());
                    ready.insert(
                        seq,
                        Done {
                            verdict: Some(self.verdict(p, &v, true)),
                            dead,
                            offset,
                        },
                    );
                }
                Msg::Scored {
                    p,
                    key,
                    scores,
                    lang,
                    normalised,
                    truncated,
                } => {
                    let (v, err) = match scores {
                        Ok(s) => (
                            Some(Arc::new(self.decide(&s, lang, &normalised, truncated))),
                            None,
                        ),
                        Err(e) => (None, Some(e)),
                    };
                    let waiters = cache
                        .map(|c| c.complete(key, v.clone()))
                        .unwrap_or_default();
                    for (i, p) in std::iter::once(p).chain(waiters).enumerate() {
                        let cached = i > 0;
                        let (seq, offset) = (p.seq, p.offset);
                        let done = match (&v, &err) {
                            (Some(v), _) => {
                                if cached {
                                    summary.cache_hits += 1;
                                }
                                let dead = p.too_long.clone();
                                Done {
                                    verdict: Some(self.verdict(p, v, cached)),
                                    dead,
                                    offset,
                                }
                            }
                            (None, e) => {
                                let rej = Rejection {
                                    reason: Reason::EngineError,
                                    detail: e.clone().unwrap_or_default(),
                                    id: Some(p.id.clone()),
                                };
                                let dl =
                                    DeadLetter::new(rej, json!({ "line": seq + 1 }), b"", false);
                                Done {
                                    verdict: None,
                                    dead: Some(dl),
                                    offset,
                                }
                            }
                        };
                        ready.insert(seq, done);
                    }
                }
            }
            while let Some(done) = ready.remove(&next) {
                if let Some(v) = &done.verdict {
                    serde_json::to_writer(&mut out, v).map_err(|e| Error::Data(e.to_string()))?;
                    out.write_all(b"\n").map_err(|e| Error::io("<output>", e))?;
                    summary.count(v);
                }
                if let Some(d) = &done.dead {
                    serde_json::to_writer(&mut dlq, d).map_err(|e| Error::Data(e.to_string()))?;
                    dlq.write_all(b"\n")
                        .map_err(|e| Error::io("<dead letters>", e))?;
                    *summary.dead_letters.entry(d.error).or_default() += 1;
                }
                progress.set_position(done.offset.max(progress.position()));
                let _ = slots.recv();
                next += 1;
            }
        }
        out.flush().map_err(|e| Error::io("<output>", e))?;
        dlq.flush().map_err(|e| Error::io("<dead letters>", e))?;
        if !ready.is_empty() {
            return Err(Error::Data(format!(
                "{} verdicts were left unwritten",
                ready.len()
            )));
        }
        summary.lines = next;
        Ok(summary)
    }
}

enum Msg {
    Dead {
        seq: u64,
        dl: DeadLetter,
        offset: u64,
    },
    Hit {
        p: Pending,
        v: Arc<CachedVerdict>,
    },
    Scored {
        p: Pending,
        key: cache::Key,
        scores: std::result::Result<HeadScores, String>,
        lang: Lang,
        normalised: String,
        truncated: bool,
    },
}

struct Done {
    verdict: Option<Verdict>,
    dead: Option<DeadLetter>,
    offset: u64,
}

/// Counts for the end-of-run summary.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub lines: u64,
    pub verdicts: u64,
    pub by_label: BTreeMap<Label, u64>,
    pub by_category: BTreeMap<Category, u64>,
    pub by_action: BTreeMap<Action, u64>,
    pub dead_letters: BTreeMap<Reason, u64>,
    pub cache_hits: u64,
    pub truncated: u64,
    pub elapsed: Duration,
}

impl Summary {
    fn count(&mut self, v: &Verdict) {
        self.verdicts += 1;
        *self.by_label.entry(v.label).or_default() += 1;
        if let Some(c) = v.category {
            *self.by_category.entry(c).or_default() += 1;
        }
        *self.by_action.entry(v.action).or_default() += 1;
        self.truncated += u64::from(v.truncated);
    }

    pub fn queries_per_sec(&self) -> f64 {
        self.verdicts as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A short human-readable report.
    pub fn render(&self) -> String {
        let labels = join_counts(&self.by_label, |k| k.as_str());
        let actions = join_counts(&self.by_action, |k| k.as_str());
        let cats = join_counts(&self.by_category, |k| k.id());
        let dead = join_counts(&self.dead_letters, |k| k.as_str());
        format!(
            "screened {} of {} lines in {:.2}s ({:.1} queries/s)\n  labels:       {labels}\n  actions:      {actions}\n  categories:   {cats}\n  cache hits:   {}\n  truncated:    {}\n  dead letters: {dead}",
            self.verdicts,
            self.lines,
            self.elapsed.as_secs_f64(),
            self.queries_per_sec(),
            self.cache_hits,
            self.truncated,
        )
    }
}

/// `name count, name count, ...`, or `-` when empty.
fn join_counts<K>(counts: &BTreeMap<K, u64>, name: impl Fn(&K) -> &'static str) -> String {
    if counts.is_empty() {
        return "-".to_string();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{} {v}", name(k)))
        .collect::<Vec<_>>()
        .join(", ")
}
