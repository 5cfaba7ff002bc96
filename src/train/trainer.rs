//! Joint training of the heads on cached embeddings: weighted binary cross-entropy for
//! safe/unsafe plus class-weighted cross-entropy for the category (unsafe rows only), AdamW,
//! dropout on the trunk, the epoch with the best dev F1 kept. Weights and dropout masks come
//! from one seeded RNG, so a seed reproduces a run.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::model::heads::{Heads, HeadsMeta, CATEGORY, TRUNK, UNSAFE};
use crate::policy::Label;
use crate::taxonomy::Category;

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub trunk: usize,
    pub dropout: f32,
    pub category_weight: f64,
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 60,
            batch_size: 128,
            learning_rate: 2e-3,
            weight_decay: 1e-4,
            trunk: 512,
            dropout: 0.1,
            category_weight: 0.5,
            seed: 17,
        }
    }
}

/// Targets of one example.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub label: Label,
    pub category: Option<Category>,
}

/// The best epoch so far: its number, dev F1 and a copy of the weights.
type Best = (usize, f64, Vec<(String, Tensor)>);

pub struct Trained {
    pub varmap: VarMap,
    pub heads: Heads,
    pub best_epoch: usize,
    pub best_dev_f1: f64,
}

fn uniform(rng: &mut rand::rngs::StdRng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

fn init(
    varmap: &VarMap,
    rng: &mut rand::rngs::StdRng,
    name: &str,
    out: usize,
    inp: usize,
) -> Result<()> {
    // PyTorch's nn.Linear default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    let b = 1.0 / (inp as f32).sqrt();
    let w = Tensor::from_vec(uniform(rng, out * inp, b), (out, inp), &Device::Cpu)?;
    let bias = Tensor::from_vec(uniform(rng, out, b), out, &Device::Cpu)?;
    let mut data = varmap.data().lock().expect("varmap lock");
    data.insert(format!("{name}.weight"), Var::from_tensor(&w)?);
    data.insert(format!("{name}.bias"), Var::from_tensor(&bias)?);
    Ok(())
}

/// Support-weighted F1 of `probs` against `gold` at `threshold`.
pub fn weighted_f1(probs: &[f32], gold: &[Label], threshold: f32) -> f64 {
    let pairs = probs.iter().zip(gold).map(|(p, g)| {
        (
            *g,
            if *p >= threshold {
                Label::Unsafe
            } else {
                Label::Safe
            },
        )
    });
    crate::metrics::BinaryReport::from_pairs(pairs).weighted.f1
}

/// The threshold in [0.05, 0.95] with the best dev F1; ties go to the one nearest 0.5.
pub fn calibrate(probs: &[f32], gold: &[Label]) -> (f32, f64) {
    let mut best = (0.5f32, weighted_f1(probs, gold, 0.5));
    for i in 5..=95 {
        let t = i as f32 / 100.0;
        let f = weighted_f1(probs, gold, t);
        if f > best.1 + 1e-12
            || ((f - best.1).abs() <= 1e-12 && (t - 0.5).abs() < (best.0 - 0.5).abs())
        {
            best = (t, f);
        }
    }
    best
}

pub fn unsafe_probs(heads: &Heads, x: &Tensor) -> Result<Vec<f32>> {
    Ok(heads
        .scores(x)?
        .into_iter()
        .map(|s| s.unsafe_prob)
        .collect())
}

pub fn train(
    meta: HeadsMeta,
    train_x: &[Vec<f32>],
    train_y: &[Target],
    dev_x: &[Vec<f32>],
    dev_y: &[Target],
    opts: &TrainOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Trained> {
    let dev = Device::Cpu;
    let hidden = meta.hidden;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let varmap = VarMap::new();
    init(&varmap, &mut rng, TRUNK, opts.trunk, hidden)?;
    init(&varmap, &mut rng, UNSAFE, 1, opts.trunk)?;
    init(&varmap, &mut rng, CATEGORY, Category::COUNT, opts.trunk)?;
    let heads = Heads::build(VarBuilder::from_varmap(&varmap, DType::F32, &dev), meta)?;

    let n = train_x.len();
    let flat: Vec<f32> = train_x.iter().flatten().copied().collect();
    let x_all = Tensor::from_vec(flat, (n, hidden), &dev)?;
    let dev_flat: Vec<f32> = dev_x.iter().flatten().copied().collect();
    let x_dev = Tensor::from_vec(dev_flat, (dev_x.len(), hidden), &dev)?;
    let dev_gold: Vec<Label> = dev_y.iter().map(|t| t.label).collect();

    // Class weights: balance safe/unsafe; categories by inverse square-root frequency.
    let n_unsafe = train_y
        .iter()
        .filter(|t| t.label == Label::Unsafe)
        .count()
        .max(1);
    let n_safe = (n - n_unsafe.min(n)).max(1);
    let w_unsafe = n as f32 / (2.0 * n_unsafe as f32);
    let w_safe = n as f32 / (2.0 * n_safe as f32);
    let mut cat_counts = [0usize; Category::COUNT];
    for t in train_y {
        if let Some(c) = t.category {
            cat_counts[c.index()] += 1;
        }
    }
    let mean_count = n_unsafe as f32 / Category::COUNT as f32;
    let cat_w: Vec<f32> = cat_counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                (mean_count / c as f32).sqrt().clamp(0.25, 4.0)
            }
        })
        .collect();

    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: opts.learning_rate,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let mut order: Vec<usize> = (0..n).collect();
    let mut best: Option<Best> = None;
    progress.set_length(opts.epochs as u64);
    for epoch in 1..=opts.epochs {
        // Cosine decay of the learning rate over the run.
        let lr = opts.learning_rate
            * 0.5
            * (1.0 + (std::f64::consts::PI * (epoch - 1) as f64 / opts.epochs as f64).cos());
        opt.set_learning_rate(lr.max(opts.learning_rate * 0.02));
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        for chunk in order.chunks(opts.batch_size) {
            let b = chunk.len();
            let idx =
                Tensor::from_vec(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(), b, &dev)?;
            let x = x_all.index_select(&idx, 0)?;
            let keep = 1.0 - opts.dropout;
            let mask: Vec<f32> = (0..b * opts.trunk)
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (b, opts.trunk), &dev)?;
            let (u, c) = heads.logits(&x, Some(&mask))?;

            let y: Vec<f32> = chunk
                .iter()
                .map(|&i| (train_y[i].label == Label::Unsafe) as u8 as f32)
                .collect();
            let wb: Vec<f32> = y
                .iter()
                .map(|&y| if y > 0.5 { w_unsafe } else { w_safe })
                .collect();
            let y = Tensor::from_vec(y, b, &dev)?;
            let wb = Tensor::from_vec(wb, b, &dev)?;
            // Stable BCE with logits: max(z,0) - z*y + log(1 + exp(-|z|)).
            let bce = ((u.relu()? - (&u * &y)?)? + (u.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
            let loss_bin = ((bce * &wb)?.sum_all()? / wb.sum_all()?.to_scalar::<f32>()? as f64)?;

            let cat_t: Vec<u32> = chunk
                .iter()
                .map(|&i| train_y[i].category.map_or(0, |c| c.index() as u32))
                .collect();
            let wc: Vec<f32> = chunk
                .iter()
                .map(|&i| train_y[i].category.map_or(0.0, |c| cat_w[c.index()]))
                .collect();
            let wc_sum: f32 = wc.iter().sum();
            let loss = if wc_sum > 0.0 {
                let cat_t = Tensor::from_vec(cat_t, (b, 1), &dev)?;
                let wc = Tensor::from_vec(wc, b, &dev)?;
                let logp = candle_nn::ops::log_softmax(&c, D::Minus1)?
                    .gather(&cat_t, 1)?
                    .squeeze(1)?;
                let ce = ((logp * wc)?.sum_all()?.neg()? / wc_sum as f64)?;
                (loss_bin + (ce * opts.category_weight)?)?
            } else {
                loss_bin
            };
            opt.backward_step(&loss)?;
        }
        let probs = unsafe_probs(&heads, &x_dev)?;
        let (_, f1) = calibrate(&probs, &dev_gold);
        if best.as_ref().is_none_or(|b| f1 > b.1) {
            let snapshot = varmap
                .data()
                .lock()
                .expect("varmap lock")
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
                .collect::<Result<Vec<_>>>()?;
            best = Some((epoch, f1, snapshot));
        }
        progress.set_message(format!("epoch {epoch}: dev weighted F1 {f1:.4}"));
        progress.inc(1);
    }
    let (best_epoch, best_dev_f1, snapshot) = best.expect("at least one epoch");
    for (k, t) in snapshot {
        varmap.data().lock().expect("varmap lock")[&k].set(&t)?;
    }
    Ok(Trained {
        varmap,
        heads,
        best_epoch,
        best_dev_f1,
    })
}
