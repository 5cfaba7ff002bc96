//! Joint training of the heads on cached embeddings: weighted binary cross-entropy for
//! safe/unsafe plus class-weighted cross-entropy for the category (unsafe rows only), AdamW,
//! dropout on the trunk, the epoch with the best dev F1 kept. Weights and dropout masks come
//! from one seeded RNG, so a seed reproduces a run.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use super::dataset::Example;
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
    /// Loss weight of a safe hard negative (a safe query written to look unsafe) relative to
    /// any other item. Above 1 it spends more of the model on "sounds harmful, is not", the
    /// over-refusal the paper measures.
    pub hard_negative_weight: f32,
    pub seed: u64,
    /// Keep this epoch of the schedule instead of the one with the best dev F1 (and stop
    /// there): for a refit, where dev is in the training data and cannot choose.
    pub keep_epoch: Option<usize>,
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
            hard_negative_weight: 1.0,
            seed: 17,
            keep_epoch: None,
        }
    }
}

/// Targets of one example.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub label: Label,
    pub category: Option<Category>,
    /// The item's loss weight before class balancing (1 for most items).
    pub weight: f32,
    /// The target of the unsafe logit's cross-entropy: 1 or 0 from the label, or the label
    /// mixed with a teacher model's unsafe probability (see [`Target::distilled`]).
    pub unsafe_target: f32,
}

impl TrainOptions {
    /// An item's loss weight before class balancing: `hard_negative_weight` for a hard
    /// negative, 1 for any other item.
    pub fn item_weight(&self, e: &Example) -> f32 {
        if e.is_hard_negative() {
            self.hard_negative_weight
        } else {
            1.0
        }
    }
}

impl Target {
    /// The targets of `e`, weighted by [`TrainOptions::item_weight`].
    pub fn of(e: &Example, opts: &TrainOptions) -> Self {
        Self {
            label: e.label,
            category: e.category,
            weight: opts.item_weight(e),
            unsafe_target: label_target(e.label),
        }
    }

    /// The same targets with the unsafe target moved `share` of the way from the label to
    /// `teacher_prob`. Class balancing still counts the item under its label.
    pub fn distilled(self, teacher_prob: f32, share: f32) -> Self {
        Self {
            unsafe_target: (1.0 - share) * label_target(self.label)
                + share * teacher_prob.clamp(0.0, 1.0),
            ..self
        }
    }
}

/// The unsafe logit's target for a label alone: 1 for unsafe, 0 for safe.
pub fn label_target(label: Label) -> f32 {
    (label == Label::Unsafe) as u8 as f32
}

/// `(unsafe, safe)` class weights that give both labels the same total weight, counting each
/// item by its own weight; the heads' loss and the lexical model both balance this way.
pub fn balanced_class_weights(items: impl Iterator<Item = (Label, f32)>) -> (f32, f32) {
    let (mut mass, mut unsafe_mass) = (0f32, 0f32);
    for (label, w) in items {
        mass += w;
        if label == Label::Unsafe {
            unsafe_mass += w;
        }
    }
    let unsafe_mass = unsafe_mass.max(1.0);
    let safe_mass = (mass - unsafe_mass).max(1.0);
    (mass / (2.0 * unsafe_mass), mass / (2.0 * safe_mass))
}

/// The best epoch so far: its number, dev F1 and a copy of the weights.
type Best = (usize, f64, Vec<(String, Tensor)>);

pub struct Trained {
    pub varmap: VarMap,
    pub heads: Heads,
    pub best_epoch: usize,
    pub best_dev_f1: f64,
}

/// `n` draws from U(-bound, bound).
pub(super) fn uniform(rng: &mut rand::rngs::StdRng, n: usize, bound: f32) -> Vec<f32> {
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

/// Categories whose threshold may move below the global one but never above it. Dev F1 counts
/// a missed suicide method question or a request that sexualises a child the same as a false
/// alarm; the policy does not, so these categories never trade recall for precision.
pub const RECALL_FIRST: [Category; 2] = [Category::SelfHarmSuicide, Category::SexualMinors];

/// Per-category thresholds (by the top category) by coordinate ascent from `global` on dev
/// F1. A category moves off `global` only where that gains at least `MIN_GAIN` weighted F1 —
/// about two dev items — so thresholds do not chase noise; [`RECALL_FIRST`] categories only
/// move down.
pub fn calibrate_categories(
    probs: &[f32],
    top: &[usize],
    gold: &[Label],
    global: f32,
) -> [f32; Category::COUNT] {
    const MIN_GAIN: f64 = 5e-4;
    let f1 = |th: &[f32; Category::COUNT]| {
        let pairs = probs.iter().zip(top).zip(gold).map(|((p, t), g)| {
            (
                *g,
                if *p >= th[*t] {
                    Label::Unsafe
                } else {
                    Label::Safe
                },
            )
        });
        crate::metrics::BinaryReport::from_pairs(pairs).weighted.f1
    };
    let mut th = [global; Category::COUNT];
    let mut best = f1(&th);
    for _round in 0..2 {
        for c in 0..Category::COUNT {
            let ceiling = if RECALL_FIRST.contains(&Category::ALL[c]) {
                global
            } else {
                f32::INFINITY
            };
            let mut pick = (th[c], best);
            for i in 20..=90 {
                let mut trial = th;
                trial[c] = i as f32 / 100.0;
                if trial[c] > ceiling {
                    continue;
                }
                let f = f1(&trial);
                if f > pick.1 + 1e-12 {
                    pick = (trial[c], f);
                }
            }
            if pick.1 >= best + MIN_GAIN {
                th[c] = pick.0;
                best = pick.1;
            }
        }
    }
    th
}

pub fn unsafe_probs(heads: &Heads, x: &Tensor) -> Result<Vec<f32>> {
    Ok(heads
        .scores(x, None)?
        .into_iter()
        .map(|s| s.unsafe_prob)
        .collect())
}

/// Class weights of the joint loss: safe/unsafe balanced; categories by inverse square-root
/// frequency (clamped), so rare categories count without swamping the common ones.
#[derive(Debug)]
pub struct LossWeights {
    w_unsafe: f32,
    w_safe: f32,
    cat_w: Vec<f32>,
}

impl LossWeights {
    /// Class weights that make both labels (and, softened, the categories) count equally,
    /// counting each item by its own weight.
    pub fn from_targets(train_y: &[Target]) -> Self {
        let (w_unsafe, w_safe) =
            balanced_class_weights(train_y.iter().map(|t| (t.label, t.weight)));
        let n_unsafe: f32 = train_y
            .iter()
            .filter(|t| t.label == Label::Unsafe)
            .map(|t| t.weight)
            .sum::<f32>()
            .max(1.0);
        let mut cat_counts = [0f32; Category::COUNT];
        for t in train_y {
            if let Some(c) = t.category {
                cat_counts[c.index()] += t.weight;
            }
        }
        let mean_count = n_unsafe / Category::COUNT as f32;
        Self {
            w_unsafe,
            w_safe,
            cat_w: cat_counts
                .iter()
                .map(|&c| {
                    if c <= 0.0 {
                        0.0
                    } else {
                        (mean_count / c).sqrt().clamp(0.25, 4.0)
                    }
                })
                .collect(),
        }
    }

    /// Weighted BCE on the unsafe logit plus `category_weight` × weighted cross-entropy of the
    /// category logits over the unsafe rows.
    pub fn joint_loss(
        &self,
        u: &Tensor,
        c: &Tensor,
        targets: &[Target],
        category_weight: f64,
    ) -> Result<Tensor> {
        let dev = u.device();
        let b = targets.len();
        let y: Vec<f32> = targets.iter().map(|t| t.unsafe_target).collect();
        let wb: Vec<f32> = targets
            .iter()
            .map(|t| {
                t.weight
                    * if t.label == Label::Unsafe {
                        self.w_unsafe
                    } else {
                        self.w_safe
                    }
            })
            .collect();
        let wb_sum: f32 = wb.iter().sum();
        let y = Tensor::from_vec(y, b, dev)?;
        let wb = Tensor::from_vec(wb, b, dev)?;
        // Stable BCE with logits: max(z,0) - z*y + log(1 + exp(-|z|)).
        let bce = ((u.relu()? - (u * &y)?)? + (u.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let loss_bin = ((bce * &wb)?.sum_all()? / wb_sum as f64)?;

        let cat_t: Vec<u32> = targets
            .iter()
            .map(|t| t.category.map_or(0, |c| c.index() as u32))
            .collect();
        let wc: Vec<f32> = targets
            .iter()
            .map(|t| t.category.map_or(0.0, |c| t.weight * self.cat_w[c.index()]))
            .collect();
        let wc_sum: f32 = wc.iter().sum();
        if wc_sum <= 0.0 {
            return Ok(loss_bin);
        }
        let cat_t = Tensor::from_vec(cat_t, (b, 1), dev)?;
        let wc = Tensor::from_vec(wc, b, dev)?;
        let logp = candle_nn::ops::log_softmax(c, D::Minus1)?
            .gather(&cat_t, 1)?
            .squeeze(1)?;
        let ce = ((logp * wc)?.sum_all()?.neg()? / wc_sum as f64)?;
        Ok((loss_bin + (ce * category_weight)?)?)
    }
}

/// An inverted-dropout mask `[b, width]`, already scaled by 1/(1-p).
pub fn dropout_mask(
    rng: &mut rand::rngs::StdRng,
    b: usize,
    width: usize,
    p: f32,
    dev: &Device,
) -> Result<Tensor> {
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..b * width)
        .map(|_| {
            if rng.random::<f32>() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(mask, (b, width), dev)?)
}

/// A copy of every variable's current value, to restore the best epoch later.
pub fn snapshot(varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

pub fn restore(varmap: &VarMap, snapshot: Vec<(String, Tensor)>) -> Result<()> {
    for (k, t) in snapshot {
        varmap.data().lock().expect("varmap lock")[&k].set(&t)?;
    }
    Ok(())
}

/// The metadata of heads about to be trained on `encoder`'s embeddings: every category, a
/// 0.5 threshold until dev calibrates one, no tuned layers or lexical model yet.
pub fn fresh_meta(encoder: String, hidden: usize, trunk: usize) -> HeadsMeta {
    HeadsMeta {
        encoder,
        hidden,
        trunk,
        categories: Category::ALL.iter().map(|c| c.id().to_string()).collect(),
        unsafe_threshold: 0.5,
        tuned_layers: Vec::new(),
        lexical: None,
        category_thresholds: Default::default(),
        digest: String::new(),
    }
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

    let weights = LossWeights::from_targets(train_y);

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
            let mask = dropout_mask(&mut rng, b, opts.trunk, opts.dropout, &dev)?;
            let (u, c) = heads.logits(&x, Some(&mask))?;
            let targets: Vec<Target> = chunk.iter().map(|&i| train_y[i]).collect();
            let loss = weights.joint_loss(&u, &c, &targets, opts.category_weight)?;
            opt.backward_step(&loss)?;
        }
        let probs = unsafe_probs(&heads, &x_dev)?;
        let (_, f1) = calibrate(&probs, &dev_gold);
        progress.set_message(format!("epoch {epoch}: dev weighted F1 {f1:.4}"));
        progress.inc(1);
        match opts.keep_epoch {
            Some(keep) if keep == epoch => {
                best = Some((epoch, f1, snapshot(&varmap)?));
                break;
            }
            Some(_) => {}
            None if best.as_ref().is_none_or(|b| f1 > b.1) => {
                best = Some((epoch, f1, snapshot(&varmap)?));
            }
            None => {}
        }
    }
    let (best_epoch, best_dev_f1, snapshot) = best.expect("at least one epoch");
    restore(&varmap, snapshot)?;
    Ok(Trained {
        varmap,
        heads,
        best_epoch,
        best_dev_f1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_thresholds_move_only_where_dev_f1_gains() {
        // Category 0: unsafe items score 0.3-0.4, safe ones 0.1: it needs a low threshold.
        // Category 1: well separated around the global threshold: it keeps it.
        let mut probs = Vec::new();
        let mut top = Vec::new();
        let mut gold = Vec::new();
        for i in 0..50 {
            probs.push(0.3 + (i as f32) * 0.002);
            top.push(0);
            gold.push(Label::Unsafe);
            probs.push(0.1);
            top.push(0);
            gold.push(Label::Safe);
            probs.push(0.9);
            top.push(1);
            gold.push(Label::Unsafe);
            probs.push(0.2);
            top.push(1);
            gold.push(Label::Safe);
        }
        let th = calibrate_categories(&probs, &top, &gold, 0.5);
        assert!(th[0] > 0.1 && th[0] <= 0.3, "{th:?}");
        assert_eq!(th[1], 0.5);
        let before = weighted_f1(&probs, &gold, 0.5);
        assert!(
            before < 0.9,
            "the global threshold misses category 0: {before}"
        );
    }

    #[test]
    fn recall_first_categories_never_rise_above_the_global_threshold() {
        // Safe items of both categories score 0.6: dev F1 alone would lift both thresholds
        // above 0.6; only the ordinary category may follow it.
        let (self_harm, crime) = (
            Category::SelfHarmSuicide.index(),
            Category::CrimeAdvice.index(),
        );
        let (mut probs, mut top, mut gold) = (Vec::new(), Vec::new(), Vec::new());
        for c in [self_harm, crime] {
            for i in 0..40 {
                probs.push(0.8 + (i as f32) * 0.002);
                top.push(c);
                gold.push(Label::Unsafe);
                probs.push(0.6);
                top.push(c);
                gold.push(Label::Safe);
            }
        }
        let th = calibrate_categories(&probs, &top, &gold, 0.5);
        assert!(th[crime] > 0.6, "{th:?}");
        assert_eq!(th[self_harm], 0.5, "{th:?}");
    }

    #[test]
    fn joint_loss_is_lower_for_right_answers() {
        let targets = [
            Target {
                label: Label::Unsafe,
                category: Some(Category::ALL[2]),
                weight: 1.0,
                unsafe_target: 1.0,
            },
            Target {
                label: Label::Safe,
                category: None,
                weight: 1.0,
                unsafe_target: 0.0,
            },
        ];
        let w = LossWeights::from_targets(&targets);
        let dev = Device::Cpu;
        let loss = |u: [f32; 2], hit: f32| {
            let u = Tensor::new(&u, &dev).unwrap();
            let mut c = vec![0f32; 2 * Category::COUNT];
            c[2] = hit;
            let c = Tensor::from_vec(c, (2, Category::COUNT), &dev).unwrap();
            w.joint_loss(&u, &c, &targets, 0.5)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(loss([4.0, -4.0], 4.0) < loss([-4.0, 4.0], 4.0));
        assert!(loss([4.0, -4.0], 4.0) < loss([4.0, -4.0], -4.0));
    }

    #[test]
    fn a_heavier_item_costs_more_when_it_is_wrong() {
        let t = |label, weight| Target {
            label,
            category: (label == Label::Unsafe).then_some(Category::ALL[0]),
            weight,
            unsafe_target: label_target(label),
        };
        // A safe item, a hard negative weighted 3, and an unsafe item.
        let targets = [
            t(Label::Safe, 1.0),
            t(Label::Safe, 3.0),
            t(Label::Unsafe, 1.0),
        ];
        let w = LossWeights::from_targets(&targets);
        // Classes still balance by weighted mass: 4 safe against 1 unsafe.
        assert!((w.w_safe * 4.0 - w.w_unsafe).abs() < 1e-5, "{w:?}");
        let dev = Device::Cpu;
        let c = Tensor::zeros((3, Category::COUNT), DType::F32, &dev).unwrap();
        let loss = |u: [f32; 3]| {
            let u = Tensor::new(&u, &dev).unwrap();
            w.joint_loss(&u, &c, &targets, 0.5)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // The category loss is the same in every case; compare the extra cost of each mistake.
        let all_right = loss([-4.0, -4.0, 4.0]);
        let plain_wrong = loss([4.0, -4.0, 4.0]) - all_right;
        let hard_negative_wrong = loss([-4.0, 4.0, 4.0]) - all_right;
        assert!(
            hard_negative_wrong > 2.5 * plain_wrong,
            "{hard_negative_wrong} {plain_wrong}"
        );
    }

    #[test]
    fn a_distilled_target_moves_the_loss_minimum_toward_the_teacher() {
        let hard = Target {
            label: Label::Unsafe,
            category: Some(Category::ALL[0]),
            weight: 1.0,
            unsafe_target: 1.0,
        };
        let soft = hard.distilled(0.2, 0.5);
        assert!((soft.unsafe_target - 0.6).abs() < 1e-6, "{soft:?}");
        // Share 0 leaves the label's target alone; the label still decides class balancing.
        assert_eq!(hard.distilled(0.0, 0.0).unsafe_target, 1.0);
        assert_eq!(soft.label, Label::Unsafe);
        let dev = Device::Cpu;
        let c = Tensor::zeros((1, Category::COUNT), DType::F32, &dev).unwrap();
        let loss = |t: Target, z: f32| {
            let w = LossWeights::from_targets(&[t]);
            let u = Tensor::new(&[z], &dev).unwrap();
            w.joint_loss(&u, &c, &[t], 0.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // With the hard target a confident logit is best; with the soft one the logit of
        // p = 0.6 beats a confident one.
        let z06 = (0.6f32 / 0.4).ln();
        assert!(loss(hard, 6.0) < loss(hard, z06));
        assert!(loss(soft, z06) < loss(soft, 6.0));
        assert!(loss(soft, z06) < loss(soft, 0.0));
    }
}
