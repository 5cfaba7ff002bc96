//! Encoder layers fine-tuned by `guardian train --tune-layers N`, stored in the heads file
//! beside the heads (`enc.l{L}.*` tensors, f32) and swapped in for the pretrained layers at load.
//! Only the top layers are tuned, so the file stays a few MB and the Q4 word embeddings and
//! lower layers are shared with the stock encoder.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

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
                let v = t.flatten_all()?.to_vec1::<f32>()?;
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
