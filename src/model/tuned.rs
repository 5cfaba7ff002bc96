//! Encoder layers fine-tuned by `guardian train --tune-layers N`, stored in the heads file
//! beside the heads (`enc.l{L}.*` tensors, f32) and swapped in for the pretrained layers at load.
//! Only the top layers are tuned and their matrices are stored as int8, so the file stays a few MB and the Q4 word embeddings and
//! lower layers are shared with the stock encoder.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::e5s1::{dequantize_q4_0, Dims, E5s1};
use crate::error::{Error, Result};

/// Prefix of the tuned encoder tensors in the heads safetensors file.
pub const PREFIX: &str = "enc";

/// One BERT layer's weights as plain f32 vectors (`[out, in]` row-major, as stored).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub q: (Vec<f32>, Vec<f32>),
    pub k: (Vec<f32>, Vec<f32>),
    pub v: (Vec<f32>, Vec<f32>),
    pub attn_out: (Vec<f32>, Vec<f32>),
    pub attn_norm: (Vec<f32>, Vec<f32>),
    pub ffn_in: (Vec<f32>, Vec<f32>),
    pub ffn_out: (Vec<f32>, Vec<f32>),
    pub out_norm: (Vec<f32>, Vec<f32>),
}

/// The tensor names of one layer: `(short name, rows, cols)`; cols 0 marks a LayerNorm.
pub fn layer_shapes(d: &Dims) -> [(&'static str, usize, usize); 8] {
    let h = d.hidden;
    [
        ("q", h, h),
        ("k", h, h),
        ("v", h, h),
        ("ao", h, h),
        ("aln", h, 0),
        ("fi", d.ffn, h),
        ("fo", h, d.ffn),
        ("oln", h, 0),
    ]
}

impl LayerWeights {
    /// The pretrained layer `l`, dequantized: the starting point of fine-tuning.
    pub fn from_e5s1(file: &E5s1, l: usize) -> Result<Self> {
        let cpu = Device::Cpu;
        let mut parts = Vec::with_capacity(8);
        for (name, rows, cols) in layer_shapes(&file.dims) {
            let n = format!("l{l}.{name}");
            let w = if cols == 0 {
                file.f32(&format!("{n}.w"), &[rows], &cpu)?.to_vec1()?
            } else {
                dequantize_q4_0(file.q4_raw(&format!("{n}.w"), rows * cols)?)
            };
            let b = file.f32(&format!("{n}.b"), &[rows], &cpu)?.to_vec1()?;
            parts.push((w, b));
        }
        Ok(Self::from_parts(parts))
    }

    fn from_parts(mut p: Vec<(Vec<f32>, Vec<f32>)>) -> Self {
        let mut next = || p.remove(0);
        Self {
            q: next(),
            k: next(),
            v: next(),
            attn_out: next(),
            attn_norm: next(),
            ffn_in: next(),
            ffn_out: next(),
            out_norm: next(),
        }
    }

    /// Layer `l` from the tensors of a heads file, checked against the encoder's shapes.
    pub fn from_tensors(tensors: &HashMap<String, Tensor>, l: usize, d: &Dims) -> Result<Self> {
        let mut parts = Vec::with_capacity(8);
        for (name, rows, cols) in layer_shapes(d) {
            let get = |suffix: &str, len: usize| -> Result<Vec<f32>> {
                let key = format!("{PREFIX}.l{l}.{name}.{suffix}");
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Heads(format!(
                        "heads.json lists tuned layer {l} but the heads file has no {key}; \
                         retrain with `guardian train`"
                    ))
                })?;
                let v = if t.dtype() == DType::U8 {
                    // int8 rows with one f32 scale each (see `to_tensors`).
                    let scales = tensors.get(&format!("{key}s")).ok_or_else(|| {
                        Error::Heads(format!("the heads file has {key} but no scales {key}s"))
                    })?;
                    dequantize_rows(
                        &t.flatten_all()?.to_vec1::<u8>()?,
                        &scales.flatten_all()?.to_vec1::<f32>()?,
                    )
                } else {
                    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?
                };
                if v.len() != len {
                    return Err(Error::Heads(format!(
                        "{key} has {} values, this encoder needs {len}",
                        v.len()
                    )));
                }
                Ok(v)
            };
            let w = get("w", rows * cols.max(1))?;
            let b = get("b", rows)?;
            parts.push((w, b));
        }
        Ok(Self::from_parts(parts))
    }
}

impl LayerWeights {
    /// The eight parts in [`layer_shapes`] order.
    pub fn parts(&self) -> [&(Vec<f32>, Vec<f32>); 8] {
        [
            &self.q,
            &self.k,
            &self.v,
            &self.attn_out,
            &self.attn_norm,
            &self.ffn_in,
            &self.ffn_out,
            &self.out_norm,
        ]
    }

    /// The tensors of layer `l` as stored in a heads file: each matrix as int8 rows (offset by
    /// 128 into u8) plus one f32 scale per row; biases and LayerNorms as f32. Four tuned layers
    /// then take 7 MB instead of 28.
    pub fn to_tensors(&self, l: usize, d: &Dims) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let mut out = Vec::new();
        for ((name, rows, cols), p) in layer_shapes(d).into_iter().zip(self.parts()) {
            let key = format!("{PREFIX}.l{l}.{name}");
            if cols == 0 {
                out.push((format!("{key}.w"), Tensor::from_slice(&p.0, rows, &cpu)?));
            } else {
                let (q, scales) = quantize_rows(&p.0, rows);
                out.push((format!("{key}.w"), Tensor::from_vec(q, (rows, cols), &cpu)?));
                out.push((format!("{key}.ws"), Tensor::from_vec(scales, rows, &cpu)?));
            }
            out.push((format!("{key}.b"), Tensor::from_slice(&p.1, rows, &cpu)?));
        }
        Ok(out)
    }

    /// The weights as they will be after storing and loading: matrices through int8.
    pub fn as_stored(&self, d: &Dims) -> Self {
        let mut parts: Vec<(Vec<f32>, Vec<f32>)> = Vec::with_capacity(8);
        for ((_, rows, cols), p) in layer_shapes(d).into_iter().zip(self.parts()) {
            let w = if cols == 0 {
                p.0.clone()
            } else {
                let (q, scales) = quantize_rows(&p.0, rows);
                dequantize_rows(&q, &scales)
            };
            parts.push((w, p.1.clone()));
        }
        Self::from_parts(parts)
    }
}

/// Symmetric int8 per row: `q = round(w / scale) + 128`, `scale = max|w| / 127`.
fn quantize_rows(w: &[f32], rows: usize) -> (Vec<u8>, Vec<f32>) {
    let cols = w.len() / rows.max(1);
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(rows);
    for row in w.chunks(cols.max(1)) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        scales.push(scale);
        q.extend(
            row.iter()
                .map(|v| ((v / scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8),
        );
    }
    (q, scales)
}

fn dequantize_rows(q: &[u8], scales: &[f32]) -> Vec<f32> {
    let cols = q.len() / scales.len().max(1);
    q.chunks(cols.max(1))
        .zip(scales)
        .flat_map(|(row, s)| row.iter().map(move |&v| (v as i32 - 128) as f32 * s))
        .collect()
}

/// Reads every tuned layer listed in `layers` from a heads safetensors buffer.
pub fn load_layers(
    safetensors: &[u8],
    layers: &[usize],
    d: &Dims,
) -> Result<Vec<(usize, LayerWeights)>> {
    if layers.is_empty() {
        return Ok(Vec::new());
    }
    let tensors = candle_core::safetensors::load_buffer(safetensors, &Device::Cpu)?;
    layers
        .iter()
        .map(|&l| {
            if l >= d.layers {
                return Err(Error::Heads(format!(
                    "heads.json lists tuned layer {l}, the encoder has {} layers",
                    d.layers
                )));
            }
            Ok((l, LayerWeights::from_tensors(&tensors, l, d)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_rows_round_trip_within_half_a_step() {
        let w: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.013)
            .collect();
        let (q, scales) = quantize_rows(&w, 4);
        assert_eq!((q.len(), scales.len()), (64, 4));
        let back = dequantize_rows(&q, &scales);
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            assert!(
                (a - b).abs() <= scales[i / 16] / 2.0 + 1e-7,
                "{i}: {a} vs {b}"
            );
        }
        let zeros = quantize_rows(&[0.0; 8], 2);
        assert_eq!(dequantize_rows(&zeros.0, &zeros.1), vec![0.0; 8]);
    }
}
