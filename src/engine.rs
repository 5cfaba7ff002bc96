//! The batching engine: one dedicated thread owns the model and screens queries in
//! micro-batches. Callers submit token ids with a reply callback into a bounded queue (a full
//! queue blocks them: that is the backpressure). A batch is cut at `max_batch_size` queries, at
//! `max_wait` after its first query, or when its padded token count would pass
//! `max_batch_tokens`; inside a cut, queries are sorted by length and split so that little
//! padding is computed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender, TrySendError};

use crate::error::{Error, Result};
use crate::model::{HeadScores, Model};

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
}

impl From<&crate::config::EngineConfig> for EngineConfig {
    fn from(c: &crate::config::EngineConfig) -> Self {
        Self {
            max_batch_size: c.max_batch_size,
            max_batch_tokens: c.max_batch_tokens,
            max_wait: Duration::from_millis(c.max_wait_ms),
            queue_capacity: c.queue_capacity,
        }
    }
}

/// Called once per query with its scores, or the engine's error message.
pub type Reply = Box<dyn FnOnce(std::result::Result<HeadScores, String>) + Send>;

pub struct Job {
    pub tokens: Vec<u32>,
    /// The query as screened (after any cut to `max_query_chars`): a second opinion on
    /// another backbone tokenizes it itself. Never logged.
    pub text: String,
    pub reply: Reply,
}

/// What one forward pass did (for benchmarks and metrics).
#[derive(Debug, Clone, Copy)]
pub struct BatchStats {
    pub size: usize,
    /// Real tokens in the batch.
    pub tokens: usize,
    /// Tokens computed, padding included (size x longest).
    pub padded_tokens: usize,
    /// Queries re-scored by the second opinion.
    pub escalated: usize,
    pub elapsed: Duration,
}

pub type BatchObserver = Box<dyn Fn(&BatchStats) + Send>;

/// An observer that adds up the queries escalated to the second opinion, and the total it
/// keeps (read it after the run).
pub fn escalation_counter() -> (Arc<AtomicU64>, BatchObserver) {
    let total = Arc::new(AtomicU64::new(0));
    let n = total.clone();
    let observer: BatchObserver = Box::new(move |b: &BatchStats| {
        n.fetch_add(b.escalated as u64, Ordering::Relaxed);
    });
    (total, observer)
}

pub struct Engine {
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    pub fn start(model: Arc<Model>, cfg: EngineConfig, observer: Option<BatchObserver>) -> Self {
        let (tx, rx) = bounded::<Job>(cfg.queue_capacity);
        let thread = std::thread::Builder::new()
            .name("guardian-engine".into())
            .spawn(move || {
                let mut pending: Vec<Job> = Vec::with_capacity(cfg.max_batch_size);
                while let Ok(first) = rx.recv() {
                    let deadline = Instant::now() + cfg.max_wait;
                    let mut tokens = first.tokens.len();
                    pending.push(first);
                    while pending.len() < cfg.max_batch_size && tokens < cfg.max_batch_tokens {
                        match rx.recv_deadline(deadline) {
                            Ok(job) => {
                                tokens += job.tokens.len();
                                pending.push(job);
                            }
                            Err(RecvTimeoutError::Timeout)
                            | Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    run_window(&model, &cfg, &mut pending, observer.as_deref());
                }
            })
            .expect("spawn engine thread");
        Self {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues a query; blocks while the queue is full.
    pub fn submit(&self, job: Job) -> Result<()> {
        let tx = self.tx.as_ref().ok_or(Error::EngineClosed)?;
        tx.send(job).map_err(|_| Error::EngineClosed)
    }

    /// Queues a query if there is room; gives the job back when the queue is full.
    pub fn try_submit(&self, job: Job) -> std::result::Result<(), Job> {
        match self.tx.as_ref() {
            Some(tx) => tx.try_send(job).map_err(|e| match e {
                TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
            }),
            None => Err(job),
        }
    }

    /// Stops taking work, finishes what is queued and joins the thread.
    pub fn shutdown(mut self) {
        self.close();
    }

    fn close(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sorts a collected window by length and runs it as padding-frugal sub-batches.
fn run_window(
    model: &Model,
    cfg: &EngineConfig,
    window: &mut Vec<Job>,
    observer: Option<&(dyn Fn(&BatchStats) + Send)>,
) {
    window.sort_by_key(|j| j.tokens.len());
    let mut jobs = std::mem::take(window).into_iter().peekable();
    while jobs.peek().is_some() {
        let mut batch: Vec<Job> = Vec::new();
        while let Some(next) = jobs.peek() {
            // Sorted ascending, so the newcomer is the longest: padded size = count x its length.
            let padded = (batch.len() + 1) * next.tokens.len();
            if !batch.is_empty()
                && (padded > cfg.max_batch_tokens || batch.len() >= cfg.max_batch_size)
            {
                break;
            }
            batch.push(jobs.next().expect("peeked"));
        }
        run_batch(model, batch, observer);
    }
}

fn run_batch(model: &Model, batch: Vec<Job>, observer: Option<&(dyn Fn(&BatchStats) + Send)>) {
    let start = Instant::now();
    let refs: Vec<&[u32]> = batch.iter().map(|j| j.tokens.as_slice()).collect();
    let texts: Vec<&str> = batch.iter().map(|j| j.text.as_str()).collect();
    let result = model.screen(&refs, &texts);
    let stats = BatchStats {
        size: batch.len(),
        tokens: refs.iter().map(|t| t.len()).sum(),
        padded_tokens: batch.len() * refs.iter().map(|t| t.len()).max().unwrap_or(0),
        escalated: result.as_ref().map_or(0, |r| r.1),
        elapsed: start.elapsed(),
    };
    match result {
        Ok((scores, _)) => {
            for (job, s) in batch.into_iter().zip(scores) {
                (job.reply)(Ok(s));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            tracing::error!(batch = stats.size, error = %msg, "engine batch failed");
            for job in batch {
                (job.reply)(Err(msg.clone()));
            }
        }
    }
    if let Some(o) = observer {
        o(&stats);
    }
}
