//! Fine-tuning the top encoder layers together with the heads. The layers below stay frozen,
//! so their output (the hidden state of every token after layer `from`) is computed once and
//! cached on disk; an epoch then runs only the tuned layers, forward and backward, on the
//! cached states. Training starts from the heads trained on frozen embeddings, and the epoch
//! with the best dev F1 is kept — "epoch 0", the frozen model, included.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var, D};
use candle_nn::{Optimizer, VarMap};
use rand::{Rng, SeedableRng};

use super::fused;
use super::trainer::{self, LossWeights, Target, TrainOptions};
use crate::error::{Error, Result};
use crate::model::e5s1::{Dims, E5s1};
use crate::model::heads::Heads;
use crate::model::tuned::{layer_shapes, LayerWeights, PREFIX};
use crate::policy::Label;

/// Options of the fine-tuning stage.
#[derive(Debug, Clone)]
pub struct TuneOptions {
    /// How many of the top encoder layers to tune (0: keep the frozen model).
    pub layers: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Learning rate of the encoder layers.
    pub encoder_lr: f64,
    /// Learning rate of the heads (already trained on frozen embeddings).
    pub heads_lr: f64,
    /// Layer-wise learning-rate decay: the top tuned layer learns at `encoder_lr`, each layer
    /// below at this factor of the one above it (1: every layer at `encoder_lr`). Below 1 it
    /// keeps the lower layers closer to the pretrained multilingual encoder.
    pub layer_decay: f64,
    /// Hidden dropout on the tuned layers' attention and feed-forward outputs, before each
    /// residual add, as the encoder was pretrained with (0: none).
    pub dropout: f32,
    /// Keep the last epoch instead of the one with the best dev F1: set by `train::run` for a
    /// refit, where dev is in the training data and cannot choose.
    pub keep_last: bool,
    /// Fine-tuning runs averaged into the shipped weights (a uniform "model soup"). Every run
    /// starts from the same frozen-encoder heads and pretrained layers and differs only in
    /// batch order and dropout, so the runs stay in one basin and their mean is one model:
    /// an ensemble's variance reduction at a single model's size and speed. 1: no averaging.
    pub runs: usize,
}

impl Default for TuneOptions {
    fn default() -> Self {
        Self {
            layers: 6,
            epochs: 3,
            batch_size: 32,
            encoder_lr: 2e-4,
            heads_lr: 2e-4,
            layer_decay: 1.0,
            dropout: 0.0,
            keep_last: false,
            runs: 1,
        }
    }
}

/// Per-token hidden states of many texts, packed: text `i` owns rows
/// `offsets[i] .. offsets[i] + lens[i]` of `data` (`hidden` floats per row).
pub struct TokenStates {
    pub hidden: usize,
    pub offsets: Vec<usize>,
    pub lens: Vec<usize>,
    pub data: Vec<f32>,
}

impl TokenStates {
    fn rows(&self, i: usize) -> &[f32] {
        let h = self.hidden;
        &self.data[self.offsets[i] * h..(self.offsets[i] + self.lens[i]) * h]
    }

    /// A padded batch `[b, seq, hidden]` and its mask `[b, seq]` (1 real, 0 padding).
    fn batch(&self, idx: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
        let h = self.hidden;
        let seq = idx.iter().map(|&i| self.lens[i]).max().unwrap_or(1).max(1);
        let mut x = vec![0f32; idx.len() * seq * h];
        let mut m = vec![0f32; idx.len() * seq];
        for (r, &i) in idx.iter().enumerate() {
            let rows = self.rows(i);
            x[r * seq * h..r * seq * h + rows.len()].copy_from_slice(rows);
            m[r * seq..r * seq + self.lens[i]].fill(1.0);
        }
        Ok((
            Tensor::from_vec(x, (idx.len(), seq, h), dev)?,
            Tensor::from_vec(m, (idx.len(), seq), dev)?,
        ))
    }
}

/// Disk cache of token states after layer `from`: one append-only file per encoder, layer and
/// token limit; records of a 32-byte key, a u32 token count and the states as f32.
pub struct StateCache {
    path: PathBuf,
    salt: String,
    hidden: usize,
    map: HashMap<[u8; 32], Vec<f32>>,
}

impl StateCache {
    pub fn open(
        dir: &Path,
        encoder_id: &str,
        from: usize,
        max_tokens: usize,
        hidden: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let salt = format!("{encoder_id}|after{from}|{max_tokens}");
        let name = format!(
            "{}-after{from}-{max_tokens}.states",
            encoder_id.replace(['/', ' '], "_")
        );
        let path = dir.join(name);
        let mut map = HashMap::new();
        if let Ok(mut f) = std::fs::File::open(&path) {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(|e| Error::io(&path, e))?;
            let mut at = 0;
            // A torn last record (interrupted run) is ignored.
            while at + 36 <= bytes.len() {
                let key: [u8; 32] = bytes[at..at + 32].try_into().expect("32 bytes");
                let n = u32::from_le_bytes(bytes[at + 32..at + 36].try_into().expect("4 bytes"))
                    as usize;
                let end = at + 36 + n * hidden * 4;
                if end > bytes.len() {
                    break;
                }
                let v = bytes[at + 36..end]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                map.insert(key, v);
                at = end;
            }
        }
        Ok(Self {
            path,
            salt,
            hidden,
            map,
        })
    }

    fn key(&self, text: &str) -> [u8; 32] {
        super::embed_cache::cache_key(&self.salt, text)
    }

    pub fn get(&self, text: &str) -> Option<&[f32]> {
        self.map.get(&self.key(text)).map(|v| v.as_slice())
    }

    /// Moves a text's states out of the cache (they are then held once, by the caller).
    pub fn take(&mut self, text: &str) -> Option<Vec<f32>> {
        let key = self.key(text);
        self.map.remove(&key)
    }

    /// Stores new records in memory and appends them to the file.
    pub fn insert_many(&mut self, items: Vec<(&str, Vec<f32>)>) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let mut buf = Vec::new();
        for (text, v) in items {
            let key = self.key(text);
            buf.extend_from_slice(&key);
            buf.extend_from_slice(&((v.len() / self.hidden) as u32).to_le_bytes());
            for x in &v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            self.map.insert(key, v);
        }
        f.write_all(&buf).map_err(|e| Error::io(&self.path, e))
    }
}

/// The tuned layers as trainable variables.
struct VarLayer {
    vars: Vec<(Tensor, Tensor)>,
}

impl VarLayer {
    fn linear(&self, i: usize, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        let (w, b) = &self.vars[i];
        let y = x.matmul(&w.t()?)?;
        match kernels {
            Kernels::Fused => fused::add_bias(&y, b),
            Kernels::Elementwise => y.broadcast_add(b),
        }
    }

    fn norm(
        &self,
        i: usize,
        x: &Tensor,
        eps: f64,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let (w, b) = &self.vars[i];
        if kernels == Kernels::Fused {
            return fused::layer_norm(x, w, b, eps);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }
}

/// How the tuned layers compute their layer norms, attention and GELU (and, in the benchmark,
/// which AdamW updates them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The project's fused ops with a hand-written backward (what training uses).
    Fused,
    /// candle's elementwise ops, differentiated by candle: the reference the fused ops are
    /// checked and benchmarked against.
    Elementwise,
}

/// The trainable top of the encoder plus pooling: cached states in, sentence embeddings out.
struct Top {
    layers: Vec<VarLayer>,
    dims: Dims,
    eps: f64,
    kernels: Kernels,
}

impl Top {
    /// `x` `[b, seq, h]`, `mask` `[b, seq]` → L2-normalised mean-pooled embeddings `[b, h]`.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_dropout(x, mask, None)
    }

    /// [`Top::forward`] with hidden dropout `p` drawn from `rng` while training (`None`, or
    /// `p` 0: none, and the rng untouched).
    fn forward_dropout(
        &self,
        x: &Tensor,
        mask: &Tensor,
        mut drop: Option<(&mut rand::rngs::StdRng, f32)>,
    ) -> candle_core::Result<Tensor> {
        let (b, seq, h) = x.dims3()?;
        let mut dropout = |t: Tensor| -> candle_core::Result<Tensor> {
            match drop.as_mut() {
                Some((rng, p)) if *p > 0.0 => {
                    let m = trainer::dropout_mask(rng, b * seq, h, *p, t.device())
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    t * m
                }
                _ => Ok(t),
            }
        };
        let heads = self.dims.heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = x.reshape((b * seq, h))?;
        let kn = self.kernels;
        for l in &self.layers {
            let (q, k, v) = (
                l.linear(0, &x, kn)?,
                l.linear(1, &x, kn)?,
                l.linear(2, &x, kn)?,
            );
            let ctx = match kn {
                Kernels::Fused => fused::attention(&q, &k, &v, mask, heads, scale)?,
                Kernels::Elementwise => {
                    let split = |t: Tensor| -> candle_core::Result<Tensor> {
                        t.reshape((b, seq, heads, hd))?
                            .transpose(1, 2)?
                            .contiguous()
                    };
                    let (q, k, v) = (split((q * scale)?)?, split(k)?, split(v)?);
                    let bias = ((mask.reshape((b, 1, 1, seq))? - 1.0)? * 1e4)?;
                    let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&bias)?;
                    candle_nn::ops::softmax(&scores, D::Minus1)?
                        .matmul(&v)?
                        .transpose(1, 2)?
                        .contiguous()?
                        .reshape((b * seq, h))?
                }
            };
            let attn = dropout(l.linear(3, &ctx, kn)?)?;
            x = l.norm(4, &(attn + &x)?, self.eps, kn)?;
            let ff = l.linear(5, &x, kn)?;
            let ff = match kn {
                Kernels::Fused => fused::gelu_erf(&ff)?,
                Kernels::Elementwise => ff.gelu_erf()?,
            };
            let ff = dropout(l.linear(6, &ff, kn)?)?;
            x = l.norm(7, &(ff + &x)?, self.eps, kn)?;
        }
        let x = x.reshape((b, seq, h))?;
        let m = mask.unsqueeze(2)?;
        let mean = x
            .broadcast_mul(&m)?
            .sum(1)?
            .broadcast_div(&m.sum(1)?.clamp(1e-9f64, f64::MAX)?)?;
        let norm = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12f64, f64::MAX)?;
        mean.broadcast_div(&norm)
    }
}

/// The result: tuned layers (to ship in the heads file) and the best epoch (0 = frozen won).
pub struct Tuned {
    pub layers: Vec<(usize, LayerWeights)>,
    /// The kept epoch; with several runs, the latest any run kept.
    pub best_epoch: usize,
    /// Dev weighted F1 of the shipped weights (with several runs, of their average).
    pub best_dev_f1: f64,
    /// Each run's kept epoch and its dev weighted F1 (one entry without averaging).
    pub runs: Vec<(usize, f64)>,
}

fn var_name(l: usize, name: &str, part: &str) -> String {
    format!("{PREFIX}.l{l}.{name}.{part}")
}

/// Adds the pretrained layers `from..` to `varmap` as variables and returns them, each with
/// its own variables (for a per-layer optimizer).
fn add_layers(varmap: &VarMap, file: &E5s1, from: usize) -> Result<Vec<(VarLayer, Vec<Var>)>> {
    let d = file.dims;
    let mut out = Vec::new();
    for l in from..d.layers {
        let w = LayerWeights::from_e5s1(file, l)?;
        let mut vars = Vec::new();
        let mut own = Vec::new();
        let mut data = varmap.data().lock().expect("varmap lock");
        for ((name, rows, cols), p) in layer_shapes(&d).into_iter().zip(w.parts()) {
            let wt = if cols == 0 {
                Tensor::from_slice(&p.0, rows, &Device::Cpu)?
            } else {
                Tensor::from_slice(&p.0, (rows, cols), &Device::Cpu)?
            };
            let bt = Tensor::from_slice(&p.1, rows, &Device::Cpu)?;
            let (wv, bv) = (Var::from_tensor(&wt)?, Var::from_tensor(&bt)?);
            vars.push((wv.as_tensor().clone(), bv.as_tensor().clone()));
            own.extend([wv.clone(), bv.clone()]);
            data.insert(var_name(l, name, "w"), wv);
            data.insert(var_name(l, name, "b"), bv);
        }
        out.push((VarLayer { vars }, own));
    }
    Ok(out)
}

/// Reads the tuned layers back out of the variables.
fn extract(varmap: &VarMap, dims: &Dims, from: usize) -> Result<Vec<(usize, LayerWeights)>> {
    let data = varmap.data().lock().expect("varmap lock");
    let tensors: HashMap<String, Tensor> = data
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    (from..dims.layers)
        .map(|l| {
            // The variables hold whole f32 weights, so no pretrained base is needed.
            let no_base = |_| Err(Error::Heads("tuned variables are stored whole".into()));
            Ok((l, LayerWeights::from_tensors(&tensors, l, dims, &no_base)?))
        })
        .collect()
}

/// Unsafe probabilities of `idx` under the current weights, without dropout, in the order of
/// `idx`. The items are batched shortest first, so that a batch pads little: in dev order a
/// batch of short queries pads to its one long comment. Attention skips padding, so the
/// batching changes no item's result beyond rounding (see the tests), only the time.
fn probs(top: &Top, heads: &Heads, states: &TokenStates, idx: &[usize]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; idx.len()];
    for chunk in by_length(&states.lens, idx).chunks(64) {
        let items: Vec<usize> = chunk.iter().map(|&p| idx[p]).collect();
        let (x, m) = states.batch(&items, &Device::Cpu)?;
        let emb = top.forward(&x, &m)?.detach();
        for (&p, prob) in chunk.iter().zip(trainer::unsafe_probs(heads, &emb)?) {
            out[p] = prob;
        }
    }
    Ok(out)
}

/// Positions in `idx` ordered by the token count of their item, shortest first (ties keep
/// their order).
fn by_length(lens: &[usize], idx: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..idx.len()).collect();
    order.sort_by_key(|&p| lens[idx[p]]);
    order
}

/// Batches of similar length (less padding), in a seeded random order.
fn length_batches(
    rng: &mut rand::rngs::StdRng,
    lens: &[usize],
    idx: &[usize],
    size: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<(f32, usize)> = idx
        .iter()
        .map(|&i| (lens[i] as f32 + rng.random::<f32>() * 4.0, i))
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut batches: Vec<Vec<usize>> = order
        .chunks(size)
        .map(|c| c.iter().map(|x| x.1).collect())
        .collect();
    for i in (1..batches.len()).rev() {
        let j = rng.random_range(0..=i);
        batches.swap(i, j);
    }
    batches
}

/// The learning rate of each tuned layer `from .. layers`, bottom first: the top one at
/// `encoder_lr`, each below it `layer_decay` times the one above.
fn layer_learning_rates(opts: &TuneOptions, from: usize, layers: usize) -> Vec<f64> {
    (from..layers)
        .map(|l| opts.encoder_lr * opts.layer_decay.powi((layers - 1 - l) as i32))
        .collect()
}

/// Tunes layers `file.dims.layers - opts.layers ..` and the heads in `varmap` (already
/// trained on frozen embeddings) on cached token states. `train`/`dev` index `states`. With
/// `opts.runs` above 1, that many runs from the same start are averaged.
#[allow(clippy::too_many_arguments)]
pub fn tune(
    file: &E5s1,
    varmap: &VarMap,
    heads: &Heads,
    states: &TokenStates,
    train: &[(usize, Target)],
    dev: &[(usize, Label)],
    base: &TrainOptions,
    opts: &TuneOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Tuned> {
    let dims = file.dims;
    let from = dims.layers - opts.layers.min(dims.layers);
    let heads_vars = varmap.all_vars();
    let (layers, enc_vars): (Vec<VarLayer>, Vec<Vec<Var>>) =
        add_layers(varmap, file, from)?.into_iter().unzip();
    let top = Top {
        layers,
        dims,
        eps: file.layer_norm_eps,
        kernels: Kernels::Fused,
    };
    let targets: Vec<Target> = train.iter().map(|t| t.1).collect();
    let run = Run {
        top: &top,
        varmap,
        heads,
        heads_vars,
        enc_vars,
        layer_lr: layer_learning_rates(opts, from, dims.layers),
        states,
        weights: LossWeights::from_targets(&targets),
        train_idx: train.iter().map(|t| t.0).collect(),
        target_of: train.iter().copied().collect(),
        dev_idx: dev.iter().map(|d| d.0).collect(),
        dev_gold: dev.iter().map(|d| d.1).collect(),
        base,
        opts,
        progress,
    };
    let runs = opts.runs.max(1);
    progress.set_length((train.len().div_ceil(opts.batch_size) * opts.epochs * runs) as u64);
    let start = (runs > 1).then(|| trainer::snapshot(varmap)).transpose()?;
    // Every run starts from the same weights: score the frozen model on dev once.
    let f0 = run.dev_f1()?;
    let mut kept = Vec::with_capacity(runs);
    for r in 0..runs {
        if let Some(start) = &start {
            trainer::restore(varmap, start.clone())?;
        }
        kept.push(run.once(r, f0)?);
    }
    let results: Vec<(usize, f64)> = kept.iter().map(|k| (k.0, k.1)).collect();
    let best_epoch = results.iter().map(|r| r.0).max().unwrap_or(0);
    let best_dev_f1 = if runs == 1 {
        let (_, f1, snap) = kept.pop().expect("one run");
        trainer::restore(varmap, snap)?;
        f1
    } else {
        trainer::restore(varmap, average(kept.into_iter().map(|k| k.2).collect())?)?;
        let f1 = run.dev_f1()?;
        eprintln!(
            "average of {runs} tuning runs: dev weighted F1 {f1:.4} (runs: {})",
            results
                .iter()
                .map(|r| format!("{:.4}", r.1))
                .collect::<Vec<_>>()
                .join(", ")
        );
        f1
    };
    let layers = if best_epoch == 0 {
        Vec::new()
    } else {
        extract(varmap, &dims, from)?
    };
    if best_epoch == 0 {
        // The frozen model won: drop the layer variables so the heads file stays heads only.
        varmap
            .data()
            .lock()
            .expect("varmap lock")
            .retain(|k, _| !k.starts_with(PREFIX));
    }
    Ok(Tuned {
        layers,
        best_epoch,
        best_dev_f1,
        runs: results,
    })
}

/// The element-wise mean of snapshots of the same variables, whatever order each lists them in.
fn average(snapshots: Vec<Vec<(String, Tensor)>>) -> Result<Vec<(String, Tensor)>> {
    let n = snapshots.len() as f64;
    let mut it = snapshots.into_iter().map(|mut s| {
        s.sort_by(|a, b| a.0.cmp(&b.0));
        s
    });
    let mut sum = it.next().unwrap_or_default();
    for snap in it {
        for ((name, acc), (other, t)) in sum.iter_mut().zip(snap) {
            if *name != other {
                return Err(Error::Heads(format!(
                    "cannot average runs: variable {name} meets {other}"
                )));
            }
            *acc = (&*acc + t)?;
        }
    }
    sum.into_iter()
        .map(|(name, t)| Ok((name, (t / n)?)))
        .collect()
}

/// What every fine-tuning run shares (built once); [`Run::once`] trains from the variables'
/// current values.
struct Run<'a> {
    top: &'a Top,
    varmap: &'a VarMap,
    heads: &'a Heads,
    heads_vars: Vec<Var>,
    /// Each tuned layer's variables, bottom first, with their learning rates.
    enc_vars: Vec<Vec<Var>>,
    layer_lr: Vec<f64>,
    states: &'a TokenStates,
    /// The loss's class weights, from the train targets.
    weights: LossWeights,
    /// Train items (indices into `states`) and their targets.
    train_idx: Vec<usize>,
    target_of: HashMap<usize, Target>,
    /// Dev items (indices into `states`) and their labels.
    dev_idx: Vec<usize>,
    dev_gold: Vec<Label>,
    base: &'a TrainOptions,
    opts: &'a TuneOptions,
    progress: &'a indicatif::ProgressBar,
}

impl Run<'_> {
    /// Calibrated dev weighted F1 of the current weights.
    fn dev_f1(&self) -> Result<f64> {
        let probs = probs(self.top, self.heads, self.states, &self.dev_idx)?;
        Ok(trainer::calibrate(&probs, &self.dev_gold).1)
    }

    /// Run `r` (its own batch order and dropout; run 0 draws as a single run always has) from
    /// the start, whose dev F1 is `f0`: its kept epoch, that epoch's dev F1 and a snapshot of
    /// every variable then.
    #[allow(clippy::type_complexity)]
    fn once(&self, r: usize, f0: f64) -> Result<(usize, f64, Vec<(String, Tensor)>)> {
        let (base, opts) = (self.base, self.opts);
        let seed = base.seed ^ 0x7475_6e65 ^ (r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let params = |lr: f64| candle_nn::ParamsAdamW {
            lr,
            weight_decay: base.weight_decay,
            ..Default::default()
        };
        // One optimizer per tuned layer, each with its share of the encoder learning rate;
        // fresh moments for every run.
        let mut opt_enc: Vec<fused::AdamW> = self
            .enc_vars
            .iter()
            .zip(&self.layer_lr)
            .map(|(vars, &lr)| fused::AdamW::new(vars.clone(), params(lr)))
            .collect();
        let mut opt_heads = fused::AdamW::new(self.heads_vars.clone(), params(opts.heads_lr));

        let mut best = (0usize, f0, trainer::snapshot(self.varmap)?);
        self.progress.set_message(format!(
            "run {}, epoch 0 (frozen): dev weighted F1 {f0:.4}",
            r + 1
        ));

        let steps_per_epoch = self.train_idx.len().div_ceil(opts.batch_size);
        let total_steps = (steps_per_epoch * opts.epochs) as f64;
        let mut step = 0f64;
        let started = std::time::Instant::now();
        for epoch in 1..=opts.epochs {
            for batch in length_batches(
                &mut rng,
                &self.states.lens,
                &self.train_idx,
                opts.batch_size,
            ) {
                // Linear warm-up over the first 5% of steps, then linear decay.
                let warm = (total_steps * 0.05).max(1.0);
                let f = if step < warm {
                    (step + 1.0) / warm
                } else {
                    ((total_steps - step) / (total_steps - warm)).max(0.02)
                };
                for (opt, lr) in opt_enc.iter_mut().zip(&self.layer_lr) {
                    opt.set_learning_rate(lr * f);
                }
                opt_heads.set_learning_rate(opts.heads_lr * f);
                let (x, m) = self.states.batch(&batch, &Device::Cpu)?;
                let emb = self
                    .top
                    .forward_dropout(&x, &m, Some((&mut rng, opts.dropout)))?;
                let mask = trainer::dropout_mask(
                    &mut rng,
                    batch.len(),
                    base.trunk,
                    base.dropout,
                    &Device::Cpu,
                )?;
                let (u, c) = self.heads.logits(&emb, Some(&mask))?;
                let t: Vec<Target> = batch.iter().map(|i| self.target_of[i]).collect();
                let loss = self.weights.joint_loss(&u, &c, &t, base.category_weight)?;
                let grads = loss.backward()?;
                for opt in opt_enc.iter_mut() {
                    opt.step(&grads)?;
                }
                opt_heads.step(&grads)?;
                step += 1.0;
                self.progress.inc(1);
            }
            let f1 = self.dev_f1()?;
            let run_text = if opts.runs > 1 {
                format!("run {} ", r + 1)
            } else {
                String::new()
            };
            eprintln!(
                "{run_text}tune epoch {epoch}: dev weighted F1 {f1:.4} (best so far {:.4}; {:.0}s \
                 since tuning began)",
                best.1,
                started.elapsed().as_secs_f64()
            );
            let keep = if opts.keep_last {
                epoch == opts.epochs
            } else {
                f1 > best.1
            };
            if keep {
                best = (epoch, f1, trainer::snapshot(self.varmap)?);
            }
            self.progress
                .set_message(format!("{run_text}epoch {epoch}: dev weighted F1 {f1:.4}"));
        }
        Ok(best)
    }
}

/// What [`bench_steps`] measured.
pub struct StepTimes {
    pub elementwise_s: f64,
    pub fused_s: f64,
    pub loss_diff: f32,
}

/// Seconds per fine-tuning step (forward, backward and AdamW over the top `layers` layers) of
/// a `batch` × `seq` batch of random token states, for each kind of kernel, measured
/// alternately in the same run so that both see the same machine load. Also returns the
/// relative difference of the two kernels' first losses, which must be rounding only.
pub fn bench_steps(
    file: &E5s1,
    layers: usize,
    batch: usize,
    seq: usize,
    steps: usize,
) -> Result<StepTimes> {
    let dims = file.dims;
    let from = dims.layers - layers.clamp(1, dims.layers);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let x = Tensor::from_vec(
        trainer::uniform(&mut rng, batch * seq * dims.hidden, 1.0),
        (batch, seq, dims.hidden),
        &Device::Cpu,
    )?;
    // Real batches have padding: the last quarter of each row's tokens is masked.
    let real = (seq - seq / 4).max(1);
    let mask: Vec<f32> = (0..batch * seq)
        .map(|i| if i % seq < real { 1.0 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(mask, (batch, seq), &Device::Cpu)?;
    let target = Tensor::from_vec(
        trainer::uniform(&mut rng, batch * dims.hidden, 1.0),
        (batch, dims.hidden),
        &Device::Cpu,
    )?;
    let top = |kernels| -> Result<(Top, VarMap)> {
        let varmap = VarMap::new();
        let layers = add_layers(&varmap, file, from)?
            .into_iter()
            .map(|(layer, _)| layer)
            .collect();
        let eps = file.layer_norm_eps;
        Ok((
            Top {
                layers,
                dims,
                eps,
                kernels,
            },
            varmap,
        ))
    };
    // Each kind of kernel with the optimizer it trains with.
    let (elementwise, vars) = top(Kernels::Elementwise)?;
    let mut candle_adam = candle_nn::AdamW::new(vars.all_vars(), Default::default())?;
    let (fused, vars) = top(Kernels::Fused)?;
    let mut fused_adam = fused::AdamW::new(vars.all_vars(), Default::default());
    let mut secs = [0f64; 2];
    let mut first_loss = [0f32; 2];
    // One untimed step each warms the allocator and the thread pool.
    for step in 0..=steps {
        for (i, top) in [&elementwise, &fused].into_iter().enumerate() {
            let t = std::time::Instant::now();
            let loss = (top.forward(&x, &mask)? * &target)?.sum_all()?;
            let grads = loss.backward()?;
            match top.kernels {
                Kernels::Elementwise => candle_adam.step(&grads)?,
                Kernels::Fused => fused_adam.step(&grads)?,
            }
            if step == 0 {
                first_loss[i] = loss.to_scalar::<f32>()?;
            } else {
                secs[i] += t.elapsed().as_secs_f64();
            }
        }
    }
    // The first step's losses (before any update) differ only by rounding.
    let [a, b] = first_loss;
    let loss_diff = (a - b).abs() / a.abs().max(1e-12);
    Ok(StepTimes {
        elementwise_s: secs[0] / steps.max(1) as f64,
        fused_s: secs[1] / steps.max(1) as f64,
        loss_diff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two small random layers (hidden 16, 2 heads) with the fused kernels training uses.
    fn random_top(seed: u64) -> Top {
        let dims = Dims {
            hidden: 16,
            layers: 2,
            heads: 2,
            ffn: 32,
            vocab: 1,
            max_positions: 64,
            token_types: 1,
            pad_id: 0,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tensor = |n: usize, shape: &[usize], around: f32| {
            let v: Vec<f32> = trainer::uniform(&mut rng, n, 0.3)
                .into_iter()
                .map(|x| around + x)
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let layers = (0..dims.layers)
            .map(|_| VarLayer {
                vars: layer_shapes(&dims)
                    .into_iter()
                    .map(|(_, rows, cols)| {
                        // Layer-norm gains (no columns) start near 1, like pretrained ones.
                        let w = if cols == 0 {
                            tensor(rows, &[rows], 1.0)
                        } else {
                            tensor(rows * cols, &[rows, cols], 0.0)
                        };
                        (w, tensor(rows, &[rows], 0.0))
                    })
                    .collect(),
            })
            .collect();
        Top {
            layers,
            dims,
            eps: 1e-12,
            kernels: Kernels::Fused,
        }
    }

    fn random_states(lens: &[usize], hidden: usize, seed: u64) -> TokenStates {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let offsets = lens
            .iter()
            .scan(0, |at, &n| {
                *at += n;
                Some(*at - n)
            })
            .collect();
        let rows: usize = lens.iter().sum();
        TokenStates {
            hidden,
            offsets,
            lens: lens.to_vec(),
            data: trainer::uniform(&mut rng, rows * hidden, 1.0),
        }
    }

    #[test]
    fn hidden_dropout_changes_the_embedding_only_when_it_is_on() {
        let top = random_top(3);
        let states = random_states(&[6, 3], 16, 5);
        let (x, m) = states.batch(&[0, 1], &Device::Cpu).unwrap();
        let plain = top.forward(&x, &m).unwrap().to_vec2::<f32>().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let off = top
            .forward_dropout(&x, &m, Some((&mut rng, 0.0)))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(off, plain);
        // p 0 draws nothing, so a shipped recipe without dropout stays reproducible.
        let mut fresh = rand::rngs::StdRng::seed_from_u64(9);
        assert_eq!(rng.random::<u64>(), fresh.random::<u64>());
        let on = top
            .forward_dropout(&x, &m, Some((&mut rng, 0.5)))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let moved: f32 = on
            .iter()
            .flatten()
            .zip(plain.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .sum();
        assert!(moved > 1e-3, "dropout 0.5 left the embeddings as they were");
    }

    #[test]
    fn a_text_embeds_the_same_alone_and_padded_into_a_batch() {
        // `probs` batches dev items by length instead of in dev order; that is only sound
        // because padding leaves every real token's result unchanged.
        let top = random_top(3);
        let lens = [1, 9, 4, 17, 2];
        let states = random_states(&lens, 16, 5);
        let all: Vec<usize> = (0..lens.len()).collect();
        let (x, m) = states.batch(&all, &Device::Cpu).unwrap();
        let batched = top.forward(&x, &m).unwrap().to_vec2::<f32>().unwrap();
        for i in all {
            let (x, m) = states.batch(&[i], &Device::Cpu).unwrap();
            let alone = top.forward(&x, &m).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in alone[0].iter().zip(&batched[i]) {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "text {i}: {a} alone, {b} in the batch"
                );
            }
        }
    }

    #[test]
    fn layer_decay_shrinks_the_rate_going_down_from_the_top_layer() {
        let opts = TuneOptions {
            encoder_lr: 2e-4,
            layer_decay: 0.5,
            ..Default::default()
        };
        let lr = layer_learning_rates(&opts, 9, 12);
        let want = [0.5e-4, 1e-4, 2e-4];
        assert_eq!(lr.len(), want.len(), "{lr:?}");
        for (got, want) in lr.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{lr:?}");
        }
        let flat = layer_learning_rates(&TuneOptions::default(), 6, 12);
        assert!(
            flat.iter().all(|&r| r == TuneOptions::default().encoder_lr),
            "{flat:?}"
        );
    }

    #[test]
    fn averaging_runs_takes_the_mean_of_each_variable_whatever_the_order() {
        let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        let a = vec![
            ("x".to_string(), t(&[1.0, 2.0])),
            ("y".to_string(), t(&[0.0])),
        ];
        // The second run's snapshot lists its variables in another order.
        let b = vec![
            ("y".to_string(), t(&[4.0])),
            ("x".to_string(), t(&[3.0, -2.0])),
        ];
        let mean = average(vec![a.clone(), b]).unwrap();
        let got: Vec<(String, Vec<f32>)> = mean
            .into_iter()
            .map(|(k, v)| (k, v.to_vec1::<f32>().unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("x".to_string(), vec![2.0, 0.0]),
                ("y".to_string(), vec![2.0])
            ]
        );
        let other = vec![
            ("x".to_string(), t(&[1.0, 2.0])),
            ("z".to_string(), t(&[0.0])),
        ];
        let err = average(vec![a, other]).expect_err("different variables");
        assert!(err.to_string().contains("cannot average runs"), "{err}");
    }

    #[test]
    fn by_length_puts_short_items_first_and_keeps_ties_in_order() {
        let lens = [5, 2, 9, 2, 7];
        // Positions 0..5 hold items of 7, 2, 9, 2 and 5 tokens.
        let idx = [4, 3, 2, 1, 0];
        assert_eq!(by_length(&lens, &idx), vec![1, 3, 4, 0, 2]);
    }
}
