//! `guardian bench`: uncached screening throughput and batch latency at several batch settings,
//! for each backbone and weight format asked for, on a fixed corpus, against the arithmetic
//! ceiling measured in the same run (a dense f32 matmul through the same candle CPU backend).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::engine::BatchStats;
use crate::error::{Error, Result};
use crate::model::{Backbone, Model, WeightFormat};
use crate::screen::Screener;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Setting {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_wait_ms: u64,
}

impl std::str::FromStr for Setting {
    type Err = String;
    /// `SIZE:TOKENS:WAIT_MS`, e.g. `32:2048:5`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let p: Vec<&str> = s.split(':').collect();
        let num = |i: usize| {
            p.get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("{s:?} is not SIZE:TOKENS:WAIT_MS"))
        };
        if p.len() != 3 {
            return Err(format!("{s:?} is not SIZE:TOKENS:WAIT_MS"));
        }
        Ok(Self {
            max_batch_size: num(0)? as usize,
            max_batch_tokens: num(1)? as usize,
            max_wait_ms: num(2)?,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub backbone: Backbone,
    pub weights: String,
    pub setting: Setting,
    pub queries_per_sec: f64,
    pub batches: usize,
    pub mean_batch: f64,
    pub p50_batch_ms: f64,
    pub p99_batch_ms: f64,
    /// Share of the ceiling reached.
    pub of_ceiling: f64,
}

/// What one backbone costs on the corpus.
#[derive(Debug, Clone, Serialize)]
pub struct BackboneStats {
    pub backbone: Backbone,
    /// Tokens per query with this backbone's tokenizer and prefix.
    pub mean_tokens: f64,
    pub flops_per_token: f64,
    pub ceiling_queries_per_sec: f64,
    /// No heads trained for this backbone were configured: untrained heads stood in (the
    /// throughput is right, the verdicts are not).
    pub stand_in_heads: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub queries: usize,
    pub matmul_gflops: f64,
    pub backbones: Vec<BackboneStats>,
    pub rows: Vec<Row>,
    /// End to end through the streaming `screen` pipeline (cache off), per backbone and weight
    /// format (`e5-small f32`).
    pub screen_stream: Vec<(String, f64)>,
    /// Cosine between the f32 and q4 e5-small embeddings of the corpus (min, mean).
    pub q4_vs_f32_cosine: Option<(f64, f64)>,
}

/// Dense f32 GFLOP/s of candle's CPU matmul at the encoder's FFN shape: the best of five rounds,
/// so a moment of contention on a shared machine does not lower the ceiling.
pub fn matmul_gflops() -> Result<f64> {
    let (m, k, n) = (1024usize, 384usize, 1536usize);
    let a = Tensor::ones((m, k), candle_core::DType::F32, &Device::Cpu)?;
    let b = Tensor::ones((n, k), candle_core::DType::F32, &Device::Cpu)?;
    let _ = a.matmul(&b.t()?)?;
    let reps = 10;
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b.t()?)?;
        }
        best = best.max(2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

pub fn run(
    cfg: &Config,
    corpus: &[String],
    settings: &[Setting],
    backbones: &[Backbone],
    formats: &[WeightFormat],
    log: &dyn Fn(&str),
) -> Result<Report> {
    if corpus.is_empty() {
        return Err(Error::Data("the benchmark corpus is empty".into()));
    }
    let gflops = matmul_gflops()?;
    let mut rows = Vec::new();
    let mut screen_stream = Vec::new();
    let mut backbone_stats: Vec<BackboneStats> = Vec::new();
    let mut embeddings: Vec<(WeightFormat, Vec<Vec<f32>>)> = Vec::new();
    for &backbone in backbones {
        let runs: Vec<WeightFormat> = formats
            .iter()
            .copied()
            .filter(|&f| backbone == Backbone::E5Small || f == WeightFormat::F32)
            .collect();
        if runs.len() < formats.len() {
            log(&format!(
                "{backbone}: f32 weights only; {} skipped",
                formats
                    .iter()
                    .filter(|f| !runs.contains(f))
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut base = cfg.clone();
        base.model.backbone = backbone;
        // Each backbone alone here; the second opinion gets its own end-to-end row below.
        base.model.second_opinion = None;
        let stand_in = Model::heads_backbone(&base.model_spec())? != Some(backbone);
        if stand_in {
            log(&format!(
                "{backbone}: no heads trained for it are configured (--heads); untrained heads \
                 stand in (throughput only)"
            ));
        }
        for &format in &runs {
            let mut c = base.clone();
            c.model.weights = format;
            let spec = c.model_spec();
            let model = Arc::new(if stand_in {
                Model::with_stand_in_heads(&spec)?
            } else {
                Model::load(&spec)?
            });
            let toks: Vec<usize> = corpus
                .iter()
                .map(|q| model.embedder.tokenizer.encode(q).map(|t| t.ids.len()))
                .collect::<Result<_>>()?;
            let mean_tokens = toks.iter().sum::<usize>() as f64 / toks.len() as f64;
            let ceiling = gflops * 1e9 / (backbone.flops_per_token() * mean_tokens);
            if !backbone_stats.iter().any(|s| s.backbone == backbone) {
                backbone_stats.push(BackboneStats {
                    backbone,
                    mean_tokens,
                    flops_per_token: backbone.flops_per_token(),
                    ceiling_queries_per_sec: ceiling,
                    stand_in_heads: stand_in,
                });
            }
            if backbone == Backbone::E5Small {
                // For the q4-vs-f32 agreement below.
                let refs: Vec<&str> = corpus.iter().map(String::as_str).collect();
                let mut emb = Vec::new();
                for chunk in refs.chunks(32) {
                    emb.extend(model.embedder.embed_texts(chunk)?);
                }
                embeddings.push((format, emb));
            }
            for s in settings {
                c.engine.max_batch_size = s.max_batch_size;
                c.engine.max_batch_tokens = s.max_batch_tokens.max(c.model.max_tokens);
                c.engine.max_wait_ms = s.max_wait_ms;
                c.screen.cache_capacity = 0;
                let stats: Arc<Mutex<Vec<BatchStats>>> = Arc::default();
                let sink = stats.clone();
                let screener = Screener::with_model(
                    model.clone(),
                    &c,
                    Some(Box::new(move |b: &BatchStats| {
                        sink.lock().expect("stats").push(*b)
                    })),
                )?;
                // One warm-up pass so allocation and page faults are not measured.
                screener.screen_all(&corpus[..corpus.len().min(64)], &|| {})?;
                stats.lock().expect("stats").clear();
                let t = Instant::now();
                screener.screen_all(corpus, &|| {})?;
                let qps = corpus.len() as f64 / t.elapsed().as_secs_f64();
                let mut st = stats.lock().expect("stats").clone();
                let mut lat: Vec<Duration> = st.iter().map(|b| b.elapsed).collect();
                lat.sort();
                st.sort_by_key(|b| b.size);
                let row = Row {
                    backbone,
                    weights: format.to_string(),
                    setting: *s,
                    queries_per_sec: qps,
                    batches: st.len(),
                    mean_batch: corpus.len() as f64 / st.len().max(1) as f64,
                    p50_batch_ms: percentile(&lat, 0.5),
                    p99_batch_ms: percentile(&lat, 0.99),
                    of_ceiling: qps / ceiling,
                };
                log(&format!(
                    "{backbone} {:<4} batch {:>3} tokens {:>5} wait {:>3}ms: {:>7.1} q/s, p50 {:.1} ms, p99 {:.1} ms",
                    row.weights, s.max_batch_size, s.max_batch_tokens, s.max_wait_ms, row.queries_per_sec, row.p50_batch_ms, row.p99_batch_ms
                ));
                rows.push(row);
            }
            // End to end through the streaming pipeline (decode, cache path, policy, JSON out),
            // with the configured batch setting and no cache.
            let mut c = base.clone();
            c.model.weights = format;
            c.screen.cache_capacity = 0;
            let screener = Screener::with_model(model.clone(), &c, None)?;
            let summary = stream_corpus(&screener, corpus)?;
            let label = format!("{backbone} {format}");
            log(&format!(
                "{label} screen pipeline (cache off): {:.1} q/s",
                summary.queries_per_sec()
            ));
            screen_stream.push((label, summary.queries_per_sec()));
        }
    }
    if cfg.model.second_opinion.is_some() {
        // The configured pair, end to end on the same corpus, beside the first model alone.
        let mut c = cfg.clone();
        c.model.backbone = Backbone::E5Small;
        c.model.weights = WeightFormat::F32;
        c.screen.cache_capacity = 0;
        let model = Arc::new(Model::load(&c.model_spec())?);
        let (escalated, observer) = crate::engine::escalation_counter();
        let screener = Screener::with_model(model, &c, Some(observer))?;
        let summary = stream_corpus(&screener, corpus)?;
        let label = "e5-small f32 + second opinion".to_string();
        log(&format!(
            "{label} screen pipeline (cache off): {:.1} q/s, {} of {} queries escalated",
            summary.queries_per_sec(),
            escalated.load(std::sync::atomic::Ordering::Relaxed),
            corpus.len()
        ));
        screen_stream.push((label, summary.queries_per_sec()));
    }
    let q4_vs_f32_cosine = match (
        embeddings.iter().find(|e| e.0 == WeightFormat::F32),
        embeddings.iter().find(|e| e.0 == WeightFormat::Q4),
    ) {
        (Some(a), Some(b)) => {
            let cos: Vec<f64> =
                a.1.iter()
                    .zip(&b.1)
                    .map(|(x, y)| {
                        x.iter()
                            .zip(y)
                            .map(|(p, q)| (*p as f64) * (*q as f64))
                            .sum()
                    })
                    .collect();
            let min = cos.iter().copied().fold(f64::MAX, f64::min);
            Some((min, cos.iter().sum::<f64>() / cos.len() as f64))
        }
        _ => None,
    };
    Ok(Report {
        queries: corpus.len(),
        matmul_gflops: gflops,
        backbones: backbone_stats,
        rows,
        screen_stream,
        q4_vs_f32_cosine,
    })
}

impl Report {
    fn ceiling(&self, b: Backbone) -> f64 {
        self.backbones
            .iter()
            .find(|s| s.backbone == b)
            .map_or(f64::NAN, |s| s.ceiling_queries_per_sec)
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "corpus: {} queries\nbaseline: candle f32 matmul {:.1} GFLOP/s on this machine\n",
            self.queries, self.matmul_gflops
        );
        for b in &self.backbones {
            s += &format!(
                "{}: {:.1} tokens per query, {:.0} MFLOP/token -> ceiling {:.1} queries/s{}\n",
                b.backbone,
                b.mean_tokens,
                b.flops_per_token / 1e6,
                b.ceiling_queries_per_sec,
                if b.stand_in_heads {
                    " (untrained stand-in heads)"
                } else {
                    ""
                }
            );
        }
        s += "\n";
        s += &format!(
            "{:<20} {:<7} {:>6} {:>7} {:>5} {:>10} {:>9} {:>8} {:>9} {:>9}\n",
            "backbone",
            "weights",
            "batch",
            "tokens",
            "wait",
            "queries/s",
            "x ceiling",
            "batches",
            "p50 ms",
            "p99 ms"
        );
        for r in &self.rows {
            s += &format!(
                "{:<20} {:<7} {:>6} {:>7} {:>5} {:>10.1} {:>9.2} {:>8} {:>9.1} {:>9.1}\n",
                r.backbone.as_str(),
                r.weights,
                r.setting.max_batch_size,
                r.setting.max_batch_tokens,
                r.setting.max_wait_ms,
                r.queries_per_sec,
                r.of_ceiling,
                r.batches,
                r.p50_batch_ms,
                r.p99_batch_ms
            );
        }
        for (label, q) in &self.screen_stream {
            let ceiling = label
                .split(' ')
                .next()
                .and_then(|b| b.parse().ok())
                .map_or(f64::NAN, |b| self.ceiling(b));
            s += &format!(
                "screen pipeline end to end, cache off, {label}: {q:.1} queries/s ({:.2} x ceiling)\n",
                q / ceiling
            );
        }
        if let Some((min, mean)) = self.q4_vs_f32_cosine {
            s += &format!("e5-small q4 vs f32 embeddings: cosine min {min:.4}, mean {mean:.4}\n");
        }
        s
    }
}

/// Runs `corpus` through `screen`'s streaming pipeline (JSONL in, verdicts discarded): the
/// baseline rate that the other measurements are compared against.
pub fn stream_corpus(screener: &Screener, corpus: &[String]) -> Result<crate::screen::Summary> {
    let input: String = corpus
        .iter()
        .map(|q| serde_json::json!({ "id": 0, "query": q }).to_string() + "\n")
        .collect();
    screener.run_stream(
        &mut input.as_bytes(),
        Box::new(std::io::sink()),
        Box::new(std::io::sink()),
        &indicatif::ProgressBar::hidden(),
    )
}
