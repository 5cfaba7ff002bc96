//! The CPU forward pass of the encoder on packed sequences: the tokens of a whole batch are
//! concatenated, with no padding, so every matmul works only on real tokens and a batch of
//! mixed lengths costs what its tokens cost. Matmuls go to `gemm` (the kernel candle uses) with
//! the bias pre-filled in the output; residual + LayerNorm and bias + GELU are single passes
//! over the rows, split across the cores; attention runs per sequence.
//!
//! It computes the same function as [`super::encoder::Encoder`] (the candle graph, used for
//! CUDA and Q4 weights); the tests hold both to candle-transformers' stock BERT.

use rayon::prelude::*;

use super::e5s1::{dequantize_q4_0, Dims, E5s1};
use super::tuned::LayerWeights;
use crate::error::Result;

/// Rows per parallel task in the elementwise passes: big enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

struct Linear {
    /// `[out, in]`, row-major, as stored.
    w: Vec<f32>,
    b: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Linear {
    fn load(file: &E5s1, names: &[&str], rows: usize, cols: usize) -> Result<Self> {
        let mut w = Vec::with_capacity(names.len() * rows * cols);
        let mut b = Vec::with_capacity(names.len() * rows);
        for n in names {
            w.extend(dequantize_q4_0(
                file.q4_raw(&format!("{n}.w"), rows * cols)?,
            ));
            b.extend(
                file.f32(&format!("{n}.b"), &[rows], &candle_core::Device::Cpu)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(Self {
            w,
            b,
            out: names.len() * rows,
            inp: cols,
        })
    }

    /// Several `[rows, in]` matrices stacked into one (Q, K and V side by side).
    fn from_f32(parts: &[&(Vec<f32>, Vec<f32>)], inp: usize) -> Self {
        Self {
            w: parts.iter().flat_map(|p| p.0.iter().copied()).collect(),
            b: parts.iter().flat_map(|p| p.1.iter().copied()).collect(),
            out: parts.iter().map(|p| p.1.len()).sum(),
            inp,
        }
    }

    /// `y = x W^T + b` for `x` of `m` rows.
    fn forward(&self, x: &[f32], m: usize, y: &mut Vec<f32>) {
        let (n, k) = (self.out, self.inp);
        debug_assert_eq!(x.len(), m * k);
        y.clear();
        y.reserve(m * n);
        for _ in 0..m {
            y.extend_from_slice(&self.b);
        }
        let threads = rayon::current_num_threads();
        let par = if m * n * k < 1 << 18 || threads < 2 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        // SAFETY: dst is m x n row-major (y has m*n elements), lhs is x (m x k row-major), rhs
        // is W^T read through strides from W (n x k row-major): element (kk, j) at j*k + kk.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                self.w.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
}

struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn load(file: &E5s1, name: &str, h: usize) -> Result<Self> {
        let dev = candle_core::Device::Cpu;
        Ok(Self {
            w: file.f32(&format!("{name}.w"), &[h], &dev)?.to_vec1()?,
            b: file.f32(&format!("{name}.b"), &[h], &dev)?.to_vec1()?,
        })
    }

    fn from_f32(p: &(Vec<f32>, Vec<f32>)) -> Self {
        Self {
            w: p.0.clone(),
            b: p.1.clone(),
        }
    }

    /// `x = LayerNorm(x + residual)`, row by row.
    fn add_norm(&self, x: &mut [f32], residual: &[f32], h: usize, eps: f32) {
        x.par_chunks_mut(h * ROWS_PER_TASK)
            .zip(residual.par_chunks(h * ROWS_PER_TASK))
            .for_each(|(xs, rs)| {
                for (row, res) in xs.chunks_mut(h).zip(rs.chunks(h)) {
                    for (v, r) in row.iter_mut().zip(res) {
                        *v += r;
                    }
                    self.norm_row(row, eps);
                }
            });
    }

    fn norm_row(&self, row: &mut [f32], eps: f32) {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

/// erf(x) as a rational function of x (Eigen's single-precision approximation; no exp, so it
/// vectorises). Absolute error below 1e-6 on all inputs.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.9546e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// GELU as BERT defines it: x * (1 + erf(x / sqrt 2)) / 2.
fn gelu_in_place(x: &mut [f32], width: usize) {
    x.par_chunks_mut(width * ROWS_PER_TASK).for_each(|c| {
        for v in c.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    ffn_in: Linear,
    ffn_out: Linear,
    out_norm: Norm,
}

pub struct PackedEncoder {
    dims: Dims,
    eps: f32,
    /// Word embeddings stay Q4_0 (54 MB); a lookup dequantizes the rows it needs.
    word_q4: Vec<u8>,
    positions: Vec<f32>,
    token_type: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

impl PackedEncoder {
    pub fn load(file: &E5s1) -> Result<Self> {
        let d = file.dims;
        let h = d.hidden;
        let cpu = candle_core::Device::Cpu;
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let n = |s: &str| format!("l{l}.{s}");
            layers.push(Layer {
                // One matmul for Q, K and V: three times the columns, one pass over x.
                qkv: Linear::load(file, &[&n("q"), &n("k"), &n("v")], h, h)?,
                attn_out: Linear::load(file, &[&n("ao")], h, h)?,
                attn_norm: Norm::load(file, &n("aln"), h)?,
                ffn_in: Linear::load(file, &[&n("fi")], d.ffn, h)?,
                ffn_out: Linear::load(file, &[&n("fo")], h, d.ffn)?,
                out_norm: Norm::load(file, &n("oln"), h)?,
            });
        }
        Ok(Self {
            dims: d,
            eps: file.layer_norm_eps as f32,
            word_q4: file.q4_raw("emb.word", d.vocab * h)?.to_vec(),
            positions: file
                .f32("emb.pos", &[d.max_positions, h], &cpu)?
                .to_vec2::<f32>()?
                .concat(),
            token_type: file
                .f32("emb.type", &[d.token_types, h], &cpu)?
                .to_vec2::<f32>()?
                .concat()[..h]
                .to_vec(),
            emb_norm: Norm::load(file, "emb.ln", h)?,
            layers,
        })
    }

    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Swaps in fine-tuned weights for layer `l` (see [`super::tuned`]).
    pub fn replace_layer(&mut self, l: usize, w: &LayerWeights) {
        let h = self.dims.hidden;
        self.layers[l] = Layer {
            qkv: Linear::from_f32(&[&w.q, &w.k, &w.v], h),
            attn_out: Linear::from_f32(&[&w.attn_out], h),
            attn_norm: Norm::from_f32(&w.attn_norm),
            ffn_in: Linear::from_f32(&[&w.ffn_in], h),
            ffn_out: Linear::from_f32(&[&w.ffn_out], self.dims.ffn),
            out_norm: Norm::from_f32(&w.out_norm),
        };
    }

    /// The last hidden state of each sequence, packed: `[sum of lengths, hidden]`.
    pub fn last_hidden(&self, seqs: &[&[u32]]) -> Vec<f32> {
        let mut x = self.embed_tokens(seqs);
        self.run_layers(&mut x, seqs, 0..self.layers.len());
        x
    }

    /// The hidden state after the first `n` layers, packed: `[sum of lengths, hidden]`. The
    /// trainer caches it and tunes the layers above.
    pub fn hidden_after(&self, seqs: &[&[u32]], n: usize) -> Vec<f32> {
        let mut x = self.embed_tokens(seqs);
        self.run_layers(&mut x, seqs, 0..n.min(self.layers.len()));
        x
    }

    /// Continues a packed hidden state through layers `from..` and pools it.
    pub fn embed_from(&self, mut x: Vec<f32>, seqs: &[&[u32]], from: usize) -> Vec<Vec<f32>> {
        self.run_layers(&mut x, seqs, from..self.layers.len());
        self.pool(&x, seqs)
    }

    /// Word + position + type embeddings after their LayerNorm, packed.
    fn embed_tokens(&self, seqs: &[&[u32]]) -> Vec<f32> {
        let d = self.dims;
        let h = d.hidden;
        let bytes_per_row = h / 32 * 18;
        let total: usize = seqs.iter().map(|s| s.len()).sum();
        let mut x = Vec::with_capacity(total * h);
        for s in seqs {
            for (pos, &id) in s.iter().enumerate() {
                let id = (id as usize).min(d.vocab - 1);
                let row =
                    dequantize_q4_0(&self.word_q4[id * bytes_per_row..(id + 1) * bytes_per_row]);
                let p = &self.positions[pos * h..(pos + 1) * h];
                x.extend(
                    row.iter()
                        .zip(p)
                        .zip(&self.token_type)
                        .map(|((w, p), t)| w + p + t),
                );
            }
        }
        x.par_chunks_mut(h * ROWS_PER_TASK).for_each(|c| {
            for row in c.chunks_mut(h) {
                self.emb_norm.norm_row(row, self.eps);
            }
        });

        x
    }

    /// Runs `layers` over the packed hidden state `x` in place.
    fn run_layers(&self, x: &mut Vec<f32>, seqs: &[&[u32]], layers: std::ops::Range<usize>) {
        let d = self.dims;
        let h = d.hidden;
        let total: usize = seqs.iter().map(|s| s.len()).sum();
        let offsets: Vec<usize> = seqs
            .iter()
            .scan(0, |acc, s| {
                let o = *acc;
                *acc += s.len();
                Some(o)
            })
            .collect();
        let (mut qkv, mut ctx, mut tmp, mut ffn) =
            (Vec::new(), vec![0f32; total * h], Vec::new(), Vec::new());
        for layer in &self.layers[layers] {
            layer.qkv.forward(x, total, &mut qkv);
            self.attention(&qkv, seqs, &offsets, &mut ctx);
            layer.attn_out.forward(&ctx, total, &mut tmp);
            layer.attn_norm.add_norm(&mut tmp, x, h, self.eps);
            std::mem::swap(x, &mut tmp);
            layer.ffn_in.forward(x, total, &mut ffn);
            gelu_in_place(&mut ffn, d.ffn);
            layer.ffn_out.forward(&ffn, total, &mut tmp);
            layer.out_norm.add_norm(&mut tmp, x, h, self.eps);
            std::mem::swap(x, &mut tmp);
        }
    }

    /// Multi-head self-attention of each sequence over itself (no mask needed: no padding).
    fn attention(&self, qkv: &[f32], seqs: &[&[u32]], offsets: &[usize], ctx: &mut [f32]) {
        let h = self.dims.hidden;
        let heads = self.dims.heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // Split ctx into each sequence's rows so sequences run in parallel.
        let mut parts: Vec<(&mut [f32], usize, usize)> = Vec::with_capacity(seqs.len());
        let mut rest = ctx;
        for (s, &off) in seqs.iter().zip(offsets) {
            let (head, tail) = rest.split_at_mut(s.len() * h);
            parts.push((head, off, s.len()));
            rest = tail;
        }
        parts.into_par_iter().for_each(|(out, off, len)| {
            let mut scores = vec![0f32; len];
            for head in 0..heads {
                let col = head * hd;
                for i in 0..len {
                    let q = &qkv[(off + i) * 3 * h + col..][..hd];
                    let mut max = f32::MIN;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let k = &qkv[(off + j) * 3 * h + h + col..][..hd];
                        *s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut out[i * h + col..][..hd];
                    o.fill(0.0);
                    for (j, s) in scores.iter().enumerate() {
                        let v = &qkv[(off + j) * 3 * h + 2 * h + col..][..hd];
                        let w = s / sum;
                        for (a, b) in o.iter_mut().zip(v) {
                            *a += w * b;
                        }
                    }
                }
            }
        });
    }

    /// Mean-pooled, L2-normalised embeddings, one `hidden`-vector per sequence.
    pub fn embed(&self, seqs: &[&[u32]]) -> Vec<Vec<f32>> {
        self.pool(&self.last_hidden(seqs), seqs)
    }

    /// Mean pooling of a packed hidden state per sequence, then L2 normalisation.
    fn pool(&self, x: &[f32], seqs: &[&[u32]]) -> Vec<Vec<f32>> {
        let h = self.dims.hidden;
        let mut out = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for s in seqs {
            let mut mean = vec![0f32; h];
            for r in 0..s.len() {
                for (m, v) in mean.iter_mut().zip(&x[(row + r) * h..(row + r + 1) * h]) {
                    *m += v;
                }
            }
            row += s.len();
            let n = s.len().max(1) as f32;
            mean.iter_mut().for_each(|m| *m /= n);
            let norm = mean.iter().map(|m| m * m).sum::<f32>().sqrt().max(1e-12);
            mean.iter_mut().for_each(|m| *m /= norm);
            out.push(mean);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Maclaurin series (|x| < 3) or the asymptotic bound, in f64.
    fn erf_ref(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum = 0.0;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_accurate() {
        let mut worst = 0f64;
        for i in -4000..=4000 {
            let x = i as f64 / 1000.0;
            worst = worst.max((erf(x as f32) as f64 - erf_ref(x)).abs());
        }
        assert!(worst < 1e-6, "max error {worst}");
        assert!((erf(10.0) - 1.0).abs() < 1e-6 && (erf(-10.0) + 1.0).abs() < 1e-6);
    }
}
