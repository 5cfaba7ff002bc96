//! A cross-fitted teacher for distillation: heads on a second, frozen backbone, trained K
//! times, each time without one fold of the train split, score the fold they did not see.
//! Every train item so gets an unsafe probability from a model that never trained on it, which
//! is what makes it worth mixing into that item's target: a teacher scoring its own training
//! items would mostly echo their labels, including the noisy ones.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::dataset::Example;
use super::trainer::{self, Target, TrainOptions};
use super::{bar, embed_cache};
use crate::error::{Error, Result};
use crate::model::{Backbone, Embedder, ModelSpec, WeightFormat};
use crate::policy::Label;

/// Distillation from a teacher backbone.
#[derive(Debug, Clone)]
pub struct TeacherOptions {
    pub backbone: Backbone,
    /// Share of each train item's unsafe target taken from the teacher (the rest from its
    /// label), in the heads' loss and while fine-tuning.
    pub share: f32,
    /// Folds of the train split (at least 2); the teacher is trained once per fold.
    pub folds: usize,
}

impl TeacherOptions {
    pub const DEFAULT_SHARE: f32 = 0.5;
    pub const DEFAULT_FOLDS: usize = 4;
}

/// The teacher's out-of-fold unsafe probability of every train item, in `train` order, with
/// a line for the log and the model card on how good the teacher is.
pub fn out_of_fold_probs(
    teacher: &TeacherOptions,
    spec: &ModelSpec,
    train: &[&Example],
    dev: &[&Example],
    opts: &TrainOptions,
) -> Result<(Vec<f32>, String)> {
    let started = std::time::Instant::now();
    let spec = ModelSpec {
        backbone: teacher.backbone,
        weights: WeightFormat::F32,
        heads: None,
        second_opinion: None,
        ..spec.clone()
    };
    let embedder = Embedder::load(&spec, &Device::Cpu).map_err(|e| {
        Error::Config(format!(
            "the teacher backbone {} could not be loaded ({e}); fetch it with `{}`",
            teacher.backbone,
            teacher.backbone.fetch_command()
        ))
    })?;
    let hidden = embedder.hidden_size();
    let mut cache = embed_cache::EmbeddingCache::open(
        &spec.home.join("embeddings"),
        &embedder.encoder_id,
        spec.max_tokens,
        hidden,
    )?;
    let texts: Vec<&str> = train.iter().chain(dev).map(|e| e.text.as_str()).collect();
    let pb = bar(0, "teacher");
    let x = cache.embed_all(&embedder, &texts, 32, &pb)?;
    pb.finish_and_clear();
    drop(embedder);
    let (train_x, dev_x) = x.split_at(train.len());
    let dev_y: Vec<Target> = dev.iter().map(|e| Target::of(e, opts)).collect();

    // Seeded folds, dealt round-robin over a shuffled order so each holds 1/K of the items.
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0x7eac));
    let mut fold_of = vec![0usize; train.len()];
    for (rank, &i) in order.iter().enumerate() {
        fold_of[i] = rank % teacher.folds;
    }
    let mut probs = vec![0f32; train.len()];
    let mut dev_f1 = Vec::with_capacity(teacher.folds);
    for k in 0..teacher.folds {
        let (fit, held): (Vec<usize>, Vec<usize>) =
            (0..train.len()).partition(|&i| fold_of[i] != k);
        let fit_x: Vec<Vec<f32>> = fit.iter().map(|&i| train_x[i].clone()).collect();
        let fit_y: Vec<Target> = fit.iter().map(|&i| Target::of(train[i], opts)).collect();
        let meta = trainer::fresh_meta(
            format!("{} (teacher)", teacher.backbone),
            hidden,
            opts.trunk,
        );
        let pb = bar(
            opts.epochs as u64,
            &format!("teacher {}/{}", k + 1, teacher.folds),
        );
        let trained = trainer::train(meta, &fit_x, &fit_y, dev_x, &dev_y, opts, &pb)?;
        pb.finish_and_clear();
        dev_f1.push(trained.best_dev_f1);
        let held_x: Vec<f32> = held.iter().flat_map(|&i| train_x[i].clone()).collect();
        let held_x = Tensor::from_vec(held_x, (held.len(), hidden), &Device::Cpu)?;
        for (&i, p) in held
            .iter()
            .zip(trainer::unsafe_probs(&trained.heads, &held_x)?)
        {
            probs[i] = p;
        }
    }
    let gold: Vec<Label> = train.iter().map(|e| e.label).collect();
    let summary = format!(
        "teacher {} (frozen, heads trained {} times on {} of {} folds): out-of-fold train \
         weighted F1 {:.4} at 0.5; dev weighted F1 {} (calibrated, per fold); {:.0}s",
        teacher.backbone,
        teacher.folds,
        teacher.folds - 1,
        teacher.folds,
        trainer::weighted_f1(&probs, &gold, 0.5),
        dev_f1
            .iter()
            .map(|f| format!("{f:.4}"))
            .collect::<Vec<_>>()
            .join(" / "),
        started.elapsed().as_secs_f64()
    );
    Ok((probs, summary))
}
