//! Encoder layers fine-tuned by `guardian train --tune-layers N`, stored in the heads file
//! beside the heads (`enc.l{L}.*` tensors) and swapped in for the pretrained layers at load.
//! Only the top layers are tuned, and each matrix is stored as its change from the pinned
//! pretrained weights in int4 (groups of 32 with an f16 scale): fine-tuning moves the weights
//! little, so the change quantizes far more finely than the weights would, and six tuned layers
//! take about 6 MB. The Q4 word embeddings and the lower layers are the stock encoder's.

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
    /// Matrices stored as changes (`.d4`) are added to `base(l)`, the pretrained layer.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        l: usize,
        d: &Dims,
        base: &dyn Fn(usize) -> Result<LayerWeights>,
    ) -> Result<Self> {
        let mut pretrained: Option<LayerWeights> = None;
        let mut parts = Vec::with_capacity(8);
        for (i, (name, rows, cols)) in layer_shapes(d).into_iter().enumerate() {
            let key = format!("{PREFIX}.l{l}.{name}");
            let tensor = |suffix: &str| {
                tensors.get(&format!("{key}.{suffix}")).ok_or_else(|| {
                    Error::Heads(format!(
                        "heads.json lists tuned layer {l} but the heads file has no \
                         {key}.{suffix}; retrain with `guardian train`"
                    ))
                })
            };
            let f32s = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            };
            let check = |v: Vec<f32>, what: &str, len: usize| {
                if v.len() == len {
                    Ok(v)
                } else {
                    Err(Error::Heads(format!(
                        "{key}.{what} has {} values, this encoder needs {len}",
                        v.len()
                    )))
                }
            };
            let w = if tensors.contains_key(&format!("{key}.d4")) {
                let packed = tensor("d4")?.flatten_all()?.to_vec1::<u8>()?;
                let scales = f32s(tensor("d4s")?)?;
                if packed.len() != rows * cols.div_ceil(2)
                    || scales.len() != rows * cols.div_ceil(GROUP)
                {
                    return Err(Error::Heads(format!(
                        "{key}.d4 does not fit a {rows}x{cols} matrix of this encoder"
                    )));
                }
                if pretrained.is_none() {
                    pretrained = Some(base(l)?);
                }
                let from = &pretrained.as_ref().expect("set above").parts()[i].0;
                let delta = dequantize_int4(&packed, &scales, cols);
                from.iter().zip(delta).map(|(w, d)| w + d).collect()
            } else {
                let t = tensor("w")?;
                if t.dtype() == DType::U8 {
                    return Err(Error::Heads(format!(
                        "{key}.w is int8, a layout this version no longer reads; retrain with \
                         `guardian train`"
                    )));
                }
                check(f32s(t)?, "w", rows * cols.max(1))?
            };
            let b = check(f32s(tensor("b")?)?, "b", rows)?;
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

    /// The tensors of layer `l` as stored in a heads file: each matrix as its change from
    /// `base` (the pretrained layer) in int4, two to a byte (`.d4`), with one f16 scale per
    /// group of [`GROUP`] values of a row (`.d4s`); biases and LayerNorms as f32.
    pub fn encode(&self, base: &LayerWeights, l: usize, d: &Dims) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let mut out = Vec::new();
        let parts = layer_shapes(d)
            .into_iter()
            .zip(self.parts())
            .zip(base.parts());
        for (((name, rows, cols), p), from) in parts {
            let key = format!("{PREFIX}.l{l}.{name}");
            if cols == 0 {
                out.push((format!("{key}.w"), Tensor::from_slice(&p.0, rows, &cpu)?));
            } else {
                let delta: Vec<f32> = p.0.iter().zip(&from.0).map(|(w, b)| w - b).collect();
                let (packed, scales) = quantize_int4(&delta, cols);
                let scales = Tensor::from_vec(scales, (rows, cols.div_ceil(GROUP)), &cpu)?
                    .to_dtype(DType::F16)?;
                out.push((
                    format!("{key}.d4"),
                    Tensor::from_vec(packed, (rows, cols.div_ceil(2)), &cpu)?,
                ));
                out.push((format!("{key}.d4s"), scales));
            }
            out.push((format!("{key}.b"), Tensor::from_slice(&p.1, rows, &cpu)?));
        }
        Ok(out)
    }
}

/// Values per int4 scale: small groups keep one large change from coarsening its whole row.
pub const GROUP: usize = 32;

/// Symmetric int4 per group of each row of `w` (`cols` wide): `q = round(v / scale) + 8` in
/// 1..=15, `scale = max|v| / 7` rounded to f16 (as stored), two values to a byte (low nibble
/// first), each row starting on a byte.
fn quantize_int4(w: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut packed = Vec::with_capacity(w.len() / 2 + 1);
    let mut scales = Vec::with_capacity(w.len() / GROUP + 1);
    for row in w.chunks(cols.max(1)) {
        let mut codes = Vec::with_capacity(row.len());
        for group in row.chunks(GROUP) {
            let max = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = half::f16::from_f32(max / 7.0).to_f32();
            scales.push(scale);
            codes.extend(group.iter().map(|v| {
                let q = if scale > 0.0 {
                    (v / scale).round()
                } else {
                    0.0
                };
                (q.clamp(-7.0, 7.0) as i32 + 8) as u8
            }));
        }
        packed.extend(
            codes
                .chunks(2)
                .map(|c| c[0] | (c.get(1).copied().unwrap_or(8) << 4)),
        );
    }
    (packed, scales)
}

fn dequantize_int4(packed: &[u8], scales: &[f32], cols: usize) -> Vec<f32> {
    let row_bytes = cols.div_ceil(2);
    let row_groups = cols.div_ceil(GROUP);
    let mut out = Vec::with_capacity(packed.len() * 2);
    for (r, bytes) in packed.chunks(row_bytes.max(1)).enumerate() {
        let codes = bytes.iter().flat_map(|b| [b & 0x0f, b >> 4]).take(cols);
        for (c, q) in codes.enumerate() {
            out.push((q as i32 - 8) as f32 * scales[r * row_groups + c / GROUP]);
        }
    }
    out
}

/// Reads every tuned layer listed in `layers` from a heads safetensors buffer.
/// `base(l)` gives the pretrained layer `l`, to which stored changes are added.
pub fn load_layers(
    safetensors: &[u8],
    layers: &[usize],
    d: &Dims,
    base: &dyn Fn(usize) -> Result<LayerWeights>,
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
            Ok((l, LayerWeights::from_tensors(&tensors, l, d, base)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_changes_round_trip_within_half_a_step_per_group() {
        // Rows of 69: neither a multiple of the group nor of two values per byte.
        let cols = 69;
        let w: Vec<f32> = (0..cols * 2)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.0013 * (1 + i / 40) as f32)
            .collect();
        let (packed, scales) = quantize_int4(&w, cols);
        assert_eq!(packed.len(), 2 * 35);
        assert_eq!(scales.len(), 2 * 3);
        let back = dequantize_int4(&packed, &scales, cols);
        assert_eq!(back.len(), w.len());
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            let s = scales[(i / cols) * 3 + (i % cols) / GROUP];
            assert!((a - b).abs() <= s / 2.0 + 1e-6, "{i}: {a} vs {b}");
        }
        let zeros = quantize_int4(&[0.0; 8], 4);
        assert_eq!(dequantize_int4(&zeros.0, &zeros.1, 4), vec![0.0; 8]);
    }

    #[test]
    fn stored_layers_decode_onto_their_base() {
        let d = Dims {
            hidden: 4,
            layers: 2,
            heads: 1,
            ffn: 8,
            vocab: 1,
            max_positions: 1,
            token_types: 0,
            pad_id: 0,
        };
        let make = |shift: f32| {
            LayerWeights::from_parts(
                layer_shapes(&d)
                    .iter()
                    .map(|(_, rows, cols)| {
                        let n = rows * cols.max(&1);
                        (
                            (0..n).map(|i| i as f32 * 0.01 + shift).collect(),
                            vec![shift; *rows],
                        )
                    })
                    .collect(),
            )
        };
        let base = make(0.0);
        let tuned = make(0.003);
        let tensors: HashMap<String, Tensor> =
            tuned.encode(&base, 1, &d).unwrap().into_iter().collect();
        assert!(tensors.contains_key("enc.l1.fi.d4") && !tensors.contains_key("enc.l1.fi.w"));
        let back = LayerWeights::from_tensors(&tensors, 1, &d, &|l| {
            assert_eq!(l, 1);
            Ok(base.clone())
        })
        .unwrap();
        for (a, b) in tuned.parts().iter().zip(back.parts()) {
            assert_eq!(a.1, b.1, "biases are exact");
            for (x, y) in a.0.iter().zip(&b.0) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
        let missing = LayerWeights::from_tensors(&tensors, 0, &d, &|_| Ok(base.clone()));
        assert!(missing.unwrap_err().to_string().contains("retrain"));
    }
}
