//! Fused CPU ops with a backward pass, for fine-tuning on cached token states. candle's own
//! layer norm has no backward, and written out in elementwise ops it (like the erf GELU's
//! backward) costs a dozen passes and allocations over its tensor; these do one pass forward
//! and one backward, spread over the cores by rows. Attention is fused too: candle runs a
//! batched matmul as one small gemm per text and head, one after another. So is the linear
//! layers' bias, whose gradient candle sums on one core. The GELU's erf and the exponentials
//! are polynomial approximations within rounding of libm's, written so that the loops over a
//! row vectorize.
//!
//! Each op works on contiguous f32 tensors whose last dimension is the row; the tuned layers
//! hold nothing else.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task when a reduction over rows is needed (the weight gradients of the
/// layer norm): large enough that the partial sums cost little to merge.
const ROWS_PER_TASK: usize = 64;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 expected")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input has to be contiguous"),
    }
}

fn to_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// `acc[i] += x[i]`: how a bias is added to a row, and how partial sums over rows merge.
fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, x)| *a += x);
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// `LayerNorm(x) * w + b` over the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(w, b, LayerNorm { eps: eps as f32 })
}

/// `x * Φ(x)`, the exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

/// `x + b` for `x` `[.., n]` and a bias `b` `[n]`, as a linear layer adds it. candle's
/// `broadcast_add` differentiates through a `[rows, n]`-sized broadcast of `b`: a zero-filled
/// gradient, an addition and then a sum over the rows on one core, for each of the tuned
/// layers' 36 linear maps per step. Here the bias gradient is one parallel pass of column sums.
pub fn add_bias(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "guardian-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "bias add x")?;
        let b = contiguous_f32(s2, l2, "bias add bias")?;
        let n = last_dim(l1);
        if b.len() != n {
            candle_core::bail!("bias add: the bias must have {n} values, not {}", b.len());
        }
        let mut y = x.to_vec();
        y.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
            for row in rows.chunks_mut(n) {
                add_into(row, b);
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = last_dim(x.layout());
        let gs = to_vec(grad)?;
        // Partial sums per block of rows, merged in row order: rayon's `reduce` would merge
        // them in whatever order the threads finish, and training must rebuild the same bits.
        let partials: Vec<Vec<f32>> = gs
            .par_chunks(n * ROWS_PER_TASK)
            .map(|rows| {
                let mut sum = vec![0f32; n];
                for row in rows.chunks(n) {
                    add_into(&mut sum, row);
                }
                sum
            })
            .collect();
        let mut db = vec![0f32; n];
        for p in &partials {
            add_into(&mut db, p);
        }
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of one row (two passes, as the elementwise form computes them).
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, (var + eps).sqrt().recip())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "guardian-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm x")?;
        let w = contiguous_f32(s2, l2, "layer norm weight")?;
        let b = contiguous_f32(s3, l3, "layer norm bias")?;
        let h = last_dim(l1);
        if w.len() != h || b.len() != h {
            candle_core::bail!("layer norm: weight and bias must have {h} values");
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let (mean, inv) = row_stats(x, self.eps);
            for i in 0..h {
                y[i] = (x[i] - mean) * inv * w[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = last_dim(x.layout());
        let xs = to_vec(x)?;
        let ws = to_vec(w)?;
        let gs = to_vec(grad)?;
        let eps = self.eps;
        let mut dx = vec![0f32; xs.len()];
        // Each task handles a block of rows: it writes their input gradient and returns its
        // partial sums of the weight and bias gradients.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(h * ROWS_PER_TASK)
            .zip(xs.par_chunks(h * ROWS_PER_TASK))
            .zip(gs.par_chunks(h * ROWS_PER_TASK))
            .map(|((dx, x), g)| {
                let mut dw = vec![0f32; h];
                let mut db = vec![0f32; h];
                let mut xhat = vec![0f32; h];
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let (mean, inv) = row_stats(x, eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for i in 0..h {
                        xhat[i] = (x[i] - mean) * inv;
                        let d = g[i] * ws[i];
                        m1 += d;
                        m2 += d * xhat[i];
                        dw[i] += g[i] * xhat[i];
                        db[i] += g[i];
                    }
                    let (m1, m2) = (m1 / h as f32, m2 / h as f32);
                    for i in 0..h {
                        dx[i] = inv * (g[i] * ws[i] - m1 - xhat[i] * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let mut dw = vec![0f32; h];
        let mut db = vec![0f32; h];
        for (pw, pb) in &partials {
            add_into(&mut dw, pw);
            add_into(&mut db, pb);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

struct GeluErf;

/// erf(x) as a rational function of x (the single-precision approximation of Eigen and XLA;
/// within 5e-7 of libm's, as a test checks). Unlike a libm call it
/// is straight-line arithmetic, so the loops over a row below run it on whole SIMD registers:
/// the GELU's erf was the largest share of a tuning step outside the matrix products.
#[inline(always)]
fn erf(x: f32) -> f32 {
    // Odd numerator and even denominator coefficients, highest power first.
    const P: [f64; 7] = [
        -2.726_142_258_013_06e-10,
        2.770_681_424_959_02e-8,
        -2.101_024_020_825_08e-6,
        -5.692_506_394_623_46e-5,
        -7.349_906_303_268_55e-4,
        -2.954_599_808_540_25e-3,
        -1.609_603_332_624_15e-2,
    ];
    const Q: [f64; 5] = [
        -1.456_607_184_649_96e-5,
        -2.133_740_552_789_05e-4,
        -1.682_826_974_382_03e-3,
        -7.373_329_167_204_68e-3,
        -1.426_473_905_141_89e-2,
    ];
    // Beyond ±4, erf is ±1 in single precision.
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = P[1..]
        .iter()
        .fold(P[0] as f32, |acc, &c| x2.mul_add(acc, c as f32));
    let q = Q[1..]
        .iter()
        .fold(Q[0] as f32, |acc, &c| x2.mul_add(acc, c as f32));
    x * p / q
}

/// e^t (Cephes' single-precision polynomial; within 5e-7 of libm's, relative, as a test checks), as
/// straight-line arithmetic for the same reason as [`erf`]. Exactly 0 below −87, where e^t
/// leaves the normal range of f32 (so −∞ gives 0, as a masked attention score needs).
#[inline(always)]
fn exp(t: f32) -> f32 {
    // ln 2 split in two, so that t − n·ln 2 keeps its low bits.
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512 exactly, as an f32
    const LN2_LO: f64 = -2.121_944_400_546_905_8e-4;
    // e^r ≈ 1 + r + p(r)·r² on |r| ≤ ln 2 / 2; p's coefficients, r⁵ first.
    const C: [f64; 6] = [
        1.987_569_150_0e-4,
        1.398_199_950_7e-3,
        8.333_451_907_3e-3,
        4.166_579_589_4e-2,
        1.666_666_545_9e-1,
        5.000_000_120_1e-1,
    ];
    let c = t.clamp(-87.0, 88.0);
    let n = (c * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(-LN2_HI, c);
    let r = n.mul_add(-(LN2_LO as f32), r);
    let p = C[1..]
        .iter()
        .fold(C[0] as f32, |acc, &k| acc.mul_add(r, k as f32));
    let y = (p * r).mul_add(r, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if t < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// Φ(x), the standard normal distribution function.
#[inline(always)]
fn phi(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "guardian-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        let h = last_dim(l);
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * phi(x);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let h = last_dim(x.layout());
        let xs = to_vec(x)?;
        let gs = to_vec(grad)?;
        // d/dx x·Φ(x) = Φ(x) + x·φ(x), φ the standard normal density.
        let inv_sqrt_2pi = 0.398_942_3_f32;
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(h)
            .zip(xs.par_chunks(h))
            .zip(gs.par_chunks(h))
            .for_each(|((dx, x), g)| {
                for i in 0..x.len() {
                    let v = x[i];
                    dx[i] = g[i] * (phi(v) + v * inv_sqrt_2pi * exp(-0.5 * v * v));
                }
            });
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Multi-head self-attention of one layer, `softmax(q·kᵀ·scale + mask) · v` per head, on the
/// packed projections `q`, `k`, `v` (`[batch · seq, hidden]`, heads side by side in the columns)
/// with `mask` `[batch, seq]` (1 real token, 0 padding: padding keys get no attention). The
/// result has the same packing, so no transposes are needed around it. Texts are independent,
/// so each core takes whole texts; the attention weights are recomputed in the backward pass
/// rather than kept.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (batch, seq) = mask.dims2()?;
    let op = Attention {
        seq,
        heads,
        scale: scale as f32,
        mask: to_vec(mask)?,
    };
    let rows = batch * seq;
    for t in [q, k, v] {
        if t.dims2()?.0 != rows {
            candle_core::bail!("attention: q, k and v must have batch x seq = {rows} rows");
        }
    }
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    seq: usize,
    heads: usize,
    scale: f32,
    mask: Vec<f32>,
}

/// Eight partial sums, so that the products run on SIMD registers (a single running sum
/// must add in order, one value at a time).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] = a[i].mul_add(b[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// The values of token `t`'s head that starts at column `off` and is `hd` wide, in rows `h`
/// wide.
fn head_cols(t: usize, h: usize, off: usize, hd: usize) -> std::ops::Range<usize> {
    t * h + off..t * h + off + hd
}

impl Attention {
    /// The attention weights of the head at column `off` (`hd` wide) of one text: `p` gets
    /// `seq × seq` values, row `t` the weights of query token `t`.
    #[allow(clippy::too_many_arguments)]
    fn weights(
        &self,
        q: &[f32],
        k: &[f32],
        m: &[f32],
        h: usize,
        off: usize,
        hd: usize,
        p: &mut [f32],
    ) {
        let seq = self.seq;
        for t in 0..seq {
            let qt = &q[head_cols(t, h, off, hd)];
            let row = &mut p[t * seq..(t + 1) * seq];
            let mut max = f32::NEG_INFINITY;
            for u in 0..seq {
                row[u] = if m[u] > 0.0 {
                    dot(qt, &k[head_cols(u, h, off, hd)]) * self.scale
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(row[u]);
            }
            if max == f32::NEG_INFINITY {
                // A text of padding only attends to nothing.
                row.fill(0.0);
                continue;
            }
            // Padding keys score −∞ and get exactly 0.
            row.iter_mut().for_each(|x| *x = exp(*x - max));
            let sum: f32 = row.iter().sum();
            let inv = sum.recip();
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "guardian-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, "attention q")?;
        let k = contiguous_f32(s2, l2, "attention k")?;
        let v = contiguous_f32(s3, l3, "attention v")?;
        let h = last_dim(l1);
        let (seq, heads) = (self.seq, self.heads);
        let hd = h / heads;
        let text = seq * h;
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(text).enumerate().for_each(|(b, out)| {
            let (q, k, v) = (&q[b * text..], &k[b * text..], &v[b * text..]);
            let m = &self.mask[b * seq..(b + 1) * seq];
            let mut p = vec![0f32; seq * seq];
            for head in 0..heads {
                let off = head * hd;
                self.weights(q, k, m, h, off, hd, &mut p);
                for t in 0..seq {
                    let o = &mut out[head_cols(t, h, off, hd)];
                    for u in 0..seq {
                        let w = p[t * seq + u];
                        if w != 0.0 {
                            axpy(w, &v[head_cols(u, h, off, hd)], o);
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, h) = q.dims2()?;
        let (qs, ks, vs, gs) = (to_vec(q)?, to_vec(k)?, to_vec(v)?, to_vec(grad)?);
        let (seq, heads) = (self.seq, self.heads);
        let hd = h / heads;
        let text = seq * h;
        let mut dq = vec![0f32; rows * h];
        let mut dk = vec![0f32; rows * h];
        let mut dv = vec![0f32; rows * h];
        dq.par_chunks_mut(text)
            .zip(dk.par_chunks_mut(text))
            .zip(dv.par_chunks_mut(text))
            .enumerate()
            .for_each(|(b, ((dq, dk), dv))| {
                let (q, k, v, g) = (
                    &qs[b * text..],
                    &ks[b * text..],
                    &vs[b * text..],
                    &gs[b * text..],
                );
                let m = &self.mask[b * seq..(b + 1) * seq];
                let mut p = vec![0f32; seq * seq];
                let mut ds = vec![0f32; seq];
                for head in 0..heads {
                    let off = head * hd;
                    let col = |t: usize| head_cols(t, h, off, hd);
                    self.weights(q, k, m, h, off, hd, &mut p);
                    for t in 0..seq {
                        let gt = &g[col(t)];
                        // dS[t, u] = P[t, u] (dP[t, u] − Σ_u' P[t, u'] dP[t, u']),
                        // dP[t, u] = ⟨dO[t], v[u]⟩.
                        let mut row_dot = 0f32;
                        for u in 0..seq {
                            let w = p[t * seq + u];
                            ds[u] = if w != 0.0 { dot(gt, &v[col(u)]) } else { 0.0 };
                            row_dot += w * ds[u];
                        }
                        for u in 0..seq {
                            let w = p[t * seq + u];
                            if w == 0.0 {
                                continue;
                            }
                            // dV[u] += P[t, u] dO[t]
                            axpy(w, gt, &mut dv[col(u)]);
                            let s = w * (ds[u] - row_dot) * self.scale;
                            // dQ[t] += dS[t, u] k[u] · scale; dK[u] += dS[t, u] q[t] · scale
                            axpy(s, &k[col(u)], &mut dq[col(t)]);
                            axpy(s, &q[col(t)], &mut dk[col(u)]);
                        }
                    }
                }
            });
        let dev = q.device();
        let shape = q.shape();
        Ok((
            Some(Tensor::from_vec(dq, shape, dev)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ))
    }
}

/// AdamW (decoupled weight decay, bias-corrected moments: the update of `candle_nn::AdamW`)
/// that updates each variable in one pass over its values. candle's AdamW spends about twenty
/// tensor ops, each a fresh allocation as large as the weights, per variable and step; on the
/// tuned layers' 11M weights that is a sizeable share of a CPU step.
pub struct AdamW {
    vars: Vec<(candle_core::Var, Vec<f32>, Vec<f32>)>,
    params: candle_nn::ParamsAdamW,
    step_t: i32,
}

impl AdamW {
    pub fn new(vars: Vec<candle_core::Var>, params: candle_nn::ParamsAdamW) -> Self {
        let vars = vars
            .into_iter()
            .map(|v| {
                let n = v.elem_count();
                (v, vec![0f32; n], vec![0f32; n])
            })
            .collect();
        Self {
            vars,
            params,
            step_t: 0,
        }
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
        let scale_m = (1.0 / (1.0 - p.beta1.powi(self.step_t))) as f32;
        let scale_v = (1.0 / (1.0 - p.beta2.powi(self.step_t))) as f32;
        let (lr, eps) = (p.lr as f32, p.eps as f32);
        let decay = (1.0 - p.lr * p.weight_decay) as f32;
        for (var, m, v) in self.vars.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = to_vec(g)?;
            let mut theta = to_vec(var.as_tensor())?;
            const CHUNK: usize = 16 * 1024;
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((theta, m), v), g)| {
                    for i in 0..theta.len() {
                        m[i] = m[i] * b1 + g[i] * (1.0 - b1);
                        v[i] = v[i] * b2 + g[i] * g[i] * (1.0 - b2);
                        let update = (m[i] * scale_m) / ((v[i] * scale_v).sqrt() + eps);
                        theta[i] = theta[i] * decay - update * lr;
                    }
                });
            var.set(&Tensor::from_vec(theta, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        // A small LCG keeps the test free of the rand crate's version changes.
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Forward values and every gradient of the fused op match the elementwise form, on a
    /// loss that weights each output differently (so a wrong gradient cannot cancel out).
    fn check(
        fused: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
        reference: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
        shape: &[usize],
    ) {
        let h = *shape.last().unwrap();
        let x = Var::from_tensor(&rand(shape, 1)).unwrap();
        let w = Var::from_tensor(&(rand(&[h], 2) + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&rand(&[h], 3)).unwrap();
        let weights = rand(shape, 4);
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let g = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (
                y,
                [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|t| g.get(t).cloned()),
            )
        };
        let (y1, g1) = run(&fused);
        let (y2, g2) = run(&reference);
        assert!(max_diff(&y1, &y2) < 1e-4, "forward differs");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let d = max_diff(a, b);
                    assert!(d < 1e-3, "gradient {i} differs by {d}");
                }
                (None, None) => {}
                _ => panic!("gradient {i} present in only one form"),
            }
        }
    }

    #[test]
    fn layer_norm_matches_the_elementwise_form() {
        check(
            |x, w, b| layer_norm(x, w, b, 1e-12),
            |x, w, b| {
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + 1e-12)?.sqrt()?)?
                    .broadcast_mul(w)?
                    .broadcast_add(b)
            },
            // More rows than one parallel task holds, so the partial sums are merged.
            &[3, 50, 24],
        );
    }

    #[test]
    fn bias_add_matches_the_broadcast_form() {
        check(
            |x, _, b| add_bias(x, b),
            |x, _, b| x.broadcast_add(b),
            // More rows than one parallel task holds, so the partial sums are merged.
            &[3, 50, 24],
        );
    }

    #[test]
    fn erf_is_within_rounding_of_libm() {
        let mut worst = 0f32;
        for i in -8000..=8000 {
            let x = i as f32 * 1e-3;
            let d = (erf(x) - candle_core::cpu::erf::erf_f32(x)).abs();
            worst = worst.max(d);
        }
        // A few units in the last place of values up to 1 (one ulp of 1 is 6e-8).
        assert!(worst < 5e-7, "erf differs from libm by up to {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-9.0), -1.0);
    }

    #[test]
    fn exp_is_within_rounding_of_libm() {
        let mut worst = 0f32;
        for i in 0..=86_000 {
            let t = -(i as f32) * 1e-3;
            let (a, b) = (exp(t), t.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(
            worst < 5e-7,
            "exp differs from libm by up to {worst} (relative)"
        );
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn dot_matches_the_plain_sum() {
        let a = rand(&[37], 5).to_vec1::<f32>().unwrap();
        let b = rand(&[37], 6).to_vec1::<f32>().unwrap();
        let plain: f32 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-5);
    }

    #[test]
    fn gelu_matches_candle() {
        check(|x, _, _| gelu_erf(x), |x, _, _| x.gelu_erf(), &[130, 16]);
    }

    #[test]
    fn attention_matches_the_elementwise_form() {
        let (b, seq, heads, hd) = (3, 5, 2, 4);
        let h = heads * hd;
        // Text 1 has two padding tokens, text 2 one.
        let mask: Vec<f32> = [
            [1., 1., 1., 1., 1.],
            [1., 1., 1., 0., 0.],
            [1., 1., 1., 1., 0.],
        ]
        .concat();
        let mask = Tensor::from_vec(mask, (b, seq), &Device::Cpu).unwrap();
        let vars = [5, 6, 7].map(|s| Var::from_tensor(&rand(&[b * seq, h], s)).unwrap());
        let weights = rand(&[b * seq, h], 8);
        let scale = 0.3;
        let reference = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
            let split = |t: &Tensor| {
                t.reshape((b, seq, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let bias = ((mask.reshape((b, 1, 1, seq))? - 1.0)? * 1e4)?;
            let scores = (split(q)? * scale)?
                .matmul(&split(k)?.t()?.contiguous()?)?
                .broadcast_add(&bias)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?
                .matmul(&split(v)?)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * seq, h))
        };
        let run = |fused: bool| {
            let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
            let y = if fused {
                attention(q, k, v, &mask, heads, scale).unwrap()
            } else {
                reference(q, k, v).unwrap()
            };
            let g = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, [q, k, v].map(|t| g.get(t).unwrap().clone()))
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        assert!(max_diff(&y1, &y2) < 1e-5, "forward differs");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            let d = max_diff(a, b);
            assert!(d < 1e-4, "gradient {i} differs by {d}");
        }
        // Padding keys get no attention: changing them changes no real token's output.
        let v2 = vars[2].as_tensor().clone();
        let mut vv = v2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        vv[(seq + 4) * h] += 10.0; // text 1, token 4 (padding)
        let v2 = Tensor::from_vec(vv, (b * seq, h), &Device::Cpu).unwrap();
        let y3 = attention(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            &v2,
            &mask,
            heads,
            scale,
        )
        .unwrap();
        assert!(max_diff(&y1, &y3) < 1e-6);
    }

    #[test]
    fn adamw_matches_candle() {
        use candle_nn::Optimizer;
        let params = candle_nn::ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let start = rand(&[40_000], 9);
        let target = rand(&[40_000], 10);
        let a = Var::from_tensor(&start).unwrap();
        let b = Var::from_tensor(&start).unwrap();
        let mut ours = AdamW::new(vec![a.clone()], params.clone());
        let mut theirs = candle_nn::AdamW::new(vec![b.clone()], params).unwrap();
        let loss = |v: &Var| {
            (v.as_tensor() - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        for _ in 0..5 {
            ours.step(&loss(&a).backward().unwrap()).unwrap();
            theirs.step(&loss(&b).backward().unwrap()).unwrap();
        }
        // Five steps of lr 0.01 move every weight by about 0.05: a missing term would show.
        assert!(max_diff(a.as_tensor(), &start) > 0.04);
        assert!(max_diff(a.as_tensor(), b.as_tensor()) < 1e-5);
    }
}
