//! multilingual-e5-small: a 12-layer BERT encoder, read from the E5S1 container by this code
//! (no model hub, no stock loader), mean-pooled over the attention mask and L2-normalised.
//!
//! The big matrices arrive as Q4_0 blocks. They are either kept as candle quantized tensors
//! (`WeightFormat::Q4`, quantized matmuls) or dequantized to f32 once at load (`WeightFormat::F32`,
//! dense gemm). Both go through the same `QMatMul`, so there is one forward pass to trust.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::LayerNorm;
use serde::{Deserialize, Serialize};

use super::e5s1::{Dims, E5s1};
use super::tuned::LayerWeights;
use crate::error::Result;

/// How the encoder keeps its big matrices in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// Dequantize the Q4_0 blocks to f32 at load; dense f32 matmuls.
    #[default]
    F32,
    /// Keep the Q4_0 blocks; quantized matmuls (activations quantized to 8 bits).
    Q4,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "q4" | "q4_0" => Ok(Self::Q4),
            other => Err(format!("unknown weight format {other:?}; use f32 or q4")),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Q4 => "q4",
        })
    }
}

struct Linear {
    weight: QMatMul,
    bias: Tensor,
}

impl Linear {
    fn load(
        file: &E5s1,
        name: &str,
        rows: usize,
        cols: usize,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let q = file.q4(&format!("{name}.w"), rows, cols, &Device::Cpu)?;
        let weight = match format {
            WeightFormat::F32 => QMatMul::Tensor(q.dequantize(device)?),
            WeightFormat::Q4 => {
                let q = if device.is_cpu() {
                    q
                } else {
                    file.q4(&format!("{name}.w"), rows, cols, device)?
                };
                QMatMul::QTensor(std::sync::Arc::new(q))
            }
        };
        let bias = file.f32(&format!("{name}.b"), &[rows], device)?;
        Ok(Self { weight, bias })
    }

    /// `x` is `[tokens, in]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.weight.forward(x)?.broadcast_add(&self.bias)
    }
}

fn layer_norm(file: &E5s1, name: &str, hidden: usize, device: &Device) -> Result<LayerNorm> {
    let w = file.f32(&format!("{name}.w"), &[hidden], device)?;
    let b = file.f32(&format!("{name}.b"), &[hidden], device)?;
    Ok(LayerNorm::new(w, b, file.layer_norm_eps))
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    out_norm: LayerNorm,
}

/// The encoder, ready to embed token batches.
pub struct Encoder {
    word: QTensor,
    positions: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    dims: Dims,
    eps: f64,
    device: Device,
    format: WeightFormat,
}

impl Encoder {
    pub fn load(file: &E5s1, format: WeightFormat, device: &Device) -> Result<Self> {
        let d = file.dims;
        let h = d.hidden;
        // Word embeddings stay Q4_0 on the CPU whatever the format: a lookup dequantizes only
        // the rows it touches, where a dense copy would cost 384 MB.
        let word = file.q4("emb.word", d.vocab, h, &Device::Cpu)?;
        let positions = file.f32("emb.pos", &[d.max_positions, h], device)?;
        let token_type = file.f32("emb.type", &[d.token_types, h], device)?.get(0)?;
        let emb_norm = layer_norm(file, "emb.ln", h, device)?;
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let lin = |n: &str, rows, cols| {
                Linear::load(file, &format!("l{l}.{n}"), rows, cols, format, device)
            };
            layers.push(Layer {
                q: lin("q", h, h)?,
                k: lin("k", h, h)?,
                v: lin("v", h, h)?,
                attn_out: lin("ao", h, h)?,
                attn_norm: layer_norm(file, &format!("l{l}.aln"), h, device)?,
                ffn_in: lin("fi", d.ffn, h)?,
                ffn_out: lin("fo", h, d.ffn)?,
                out_norm: layer_norm(file, &format!("l{l}.oln"), h, device)?,
            });
        }
        Ok(Self {
            word,
            positions,
            token_type,
            emb_norm,
            layers,
            dims: d,
            eps: file.layer_norm_eps,
            device: device.clone(),
            format,
        })
    }

    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Swaps in fine-tuned f32 weights for layer `l` (see [`super::tuned`]).
    pub fn replace_layer(&mut self, l: usize, w: &LayerWeights) -> Result<()> {
        let (h, ffn) = (self.dims.hidden, self.dims.ffn);
        let dev = &self.device;
        let lin = |p: &(Vec<f32>, Vec<f32>), rows: usize, cols: usize| -> Result<Linear> {
            Ok(Linear {
                weight: QMatMul::Tensor(Tensor::from_slice(&p.0, (rows, cols), dev)?),
                bias: Tensor::from_slice(&p.1, rows, dev)?,
            })
        };
        let norm = |p: &(Vec<f32>, Vec<f32>)| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                Tensor::from_slice(&p.0, h, dev)?,
                Tensor::from_slice(&p.1, h, dev)?,
                self.eps,
            ))
        };
        self.layers[l] = Layer {
            q: lin(&w.q, h, h)?,
            k: lin(&w.k, h, h)?,
            v: lin(&w.v, h, h)?,
            attn_out: lin(&w.attn_out, h, h)?,
            attn_norm: norm(&w.attn_norm)?,
            ffn_in: lin(&w.ffn_in, ffn, h)?,
            ffn_out: lin(&w.ffn_out, h, ffn)?,
            out_norm: norm(&w.out_norm)?,
        };
        Ok(())
    }

    pub fn hidden_size(&self) -> usize {
        self.dims.hidden
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds a padded batch: `ids` and `mask` are row-major `[batch, seq]` (mask 1 for real
    /// tokens, 0 for padding). Returns L2-normalised sentence embeddings `[batch, hidden]`.
    pub fn embed(&self, ids: &[u32], mask: &[f32], batch: usize, seq: usize) -> Result<Tensor> {
        let hidden = self.last_hidden(ids, mask, batch, seq)?;
        let mask = Tensor::from_slice(mask, (batch, seq, 1), &self.device)?;
        // Mean pooling over real tokens only.
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f64, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12f64, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?)
    }

    /// The last hidden state `[batch, seq, hidden]`.
    pub fn last_hidden(
        &self,
        ids: &[u32],
        mask: &[f32],
        batch: usize,
        seq: usize,
    ) -> Result<Tensor> {
        let d = self.dims;
        let (h, heads) = (d.hidden, d.heads);
        let head_dim = h / heads;
        let ids_t = Tensor::from_slice(ids, batch * seq, &Device::Cpu)?;
        let words = self.word.embedding(&ids_t)?.to_device(&self.device)?;
        let words = words.reshape((batch, seq, h))?;
        let pos = self.positions.narrow(0, 0, seq)?;
        let x = words.broadcast_add(&pos)?.broadcast_add(&self.token_type)?;
        let mut x = self.emb_norm.forward(&x)?.reshape((batch * seq, h))?;

        // Additive attention mask: 0 for real keys, a large negative for padding.
        let mask_t = Tensor::from_slice(mask, (batch, 1, 1, seq), &self.device)?;
        let bias = ((mask_t - 1.0)? * 1e4)?;
        let scale = 1.0 / (head_dim as f64).sqrt();

        for layer in &self.layers {
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((batch, seq, heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = split((layer.q.forward(&x)? * scale)?)?;
            let k = split(layer.k.forward(&x)?)?;
            let v = split(layer.v.forward(&x)?)?;
            let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((batch * seq, h))?;
            let attn = layer.attn_out.forward(&ctx)?;
            x = layer.attn_norm.forward(&(attn + &x)?)?;
            let ff = layer.ffn_in.forward(&x)?.gelu_erf()?;
            let ff = layer.ffn_out.forward(&ff)?;
            x = layer.out_norm.forward(&(ff + &x)?)?;
        }
        Ok(x.reshape((batch, seq, h))?.to_dtype(DType::F32)?)
    }
}
