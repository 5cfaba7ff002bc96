//! Reader for the "E5S1" container that carries multilingual-e5-small: a small header with the
//! BERT dimensions and the SentencePiece vocabulary, then a table of tensors, the big matrices in
//! ggml Q4_0 blocks (18 bytes per 32 weights) and the small ones in f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"E5S1";
const DTYPE_F32: u8 = 0;
const DTYPE_Q4_0: u8 = 1;
/// Bytes of one Q4_0 block: an f16 scale and 16 bytes of packed 4-bit values.
const Q4_0_BLOCK_BYTES: usize = 18;
const Q4_0_BLOCK_LEN: usize = 32;

/// The encoder's dimensions as the header states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub token_types: usize,
    pub pad_id: u32,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    dtype: u8,
    elements: usize,
    offset: usize,
    len: usize,
}

/// The whole file in memory (72 MB) plus its tensor table.
pub struct E5s1 {
    path: PathBuf,
    bytes: Vec<u8>,
    pub dims: Dims,
    pub layer_norm_eps: f64,
    entries: HashMap<String, Entry>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
    }
    fn f32(&mut self) -> Option<f32> {
        self.take(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

impl E5s1 {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, bytes)
    }

    fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let bad = |reason: &str| Error::ModelFormat {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let truncated = || bad("the file ends inside its header (truncated download?)");
        let mut c = Cursor {
            bytes: &bytes,
            pos: 0,
        };
        if c.take(4) != Some(MAGIC.as_slice()) {
            return Err(bad("wrong magic; expected E5S1"));
        }
        let version = c.i32().ok_or_else(truncated)?;
        if version != 1 {
            return Err(bad(&format!("unsupported container version {version}")));
        }
        let mut ints = [0usize; 7];
        for v in ints.iter_mut() {
            *v = usize::try_from(c.i32().ok_or_else(truncated)?)
                .map_err(|_| bad("negative dimension"))?;
        }
        let [hidden, layers, heads, ffn, vocab, max_positions, token_types] = ints;
        let eps = c.f32().ok_or_else(truncated)?;
        let block = c.i32().ok_or_else(truncated)?;
        if block as usize != Q4_0_BLOCK_LEN {
            return Err(bad(&format!("block size {block}, expected 32")));
        }
        let pieces = c.i32().ok_or_else(truncated)? as usize;
        let (_bos, _eos) = (
            c.i32().ok_or_else(truncated)?,
            c.i32().ok_or_else(truncated)?,
        );
        let pad = c.i32().ok_or_else(truncated)?;
        let _unk = c.i32().ok_or_else(truncated)?;
        // The vocabulary (offsets, scores, blob) is skipped: tokenizer.json is the tokenizer.
        let blob = c.u64().ok_or_else(truncated)? as usize;
        let vocab_bytes = (pieces + 1) * 4 + pieces * 4 + blob;
        c.take(vocab_bytes).ok_or_else(truncated)?;
        let _normalizer_kind = c.i32().ok_or_else(truncated)?;
        let normalizer_len = c.u32().ok_or_else(truncated)? as usize;
        c.take(normalizer_len).ok_or_else(truncated)?;
        let count = c.i32().ok_or_else(truncated)? as usize;
        let mut entries = HashMap::with_capacity(count);
        for _ in 0..count {
            let name_len = c.u16().ok_or_else(truncated)? as usize;
            let name = std::str::from_utf8(c.take(name_len).ok_or_else(truncated)?)
                .map_err(|_| bad("tensor name is not UTF-8"))?
                .to_string();
            let dtype = c.u8().ok_or_else(truncated)?;
            let elements = c.u32().ok_or_else(truncated)? as usize;
            let offset = c.u64().ok_or_else(truncated)? as usize;
            let len = c.u64().ok_or_else(truncated)? as usize;
            let expected = match dtype {
                DTYPE_F32 => elements * 4,
                DTYPE_Q4_0 => elements / Q4_0_BLOCK_LEN * Q4_0_BLOCK_BYTES,
                d => return Err(bad(&format!("tensor {name} has unknown dtype {d}"))),
            };
            if len != expected || offset.checked_add(len).is_none_or(|e| e > bytes.len()) {
                return Err(bad(&format!("tensor {name} has a bad size or offset")));
            }
            entries.insert(
                name,
                Entry {
                    dtype,
                    elements,
                    offset,
                    len,
                },
            );
        }
        let dims = Dims {
            hidden,
            layers,
            heads,
            ffn,
            vocab,
            max_positions,
            token_types,
            pad_id: pad as u32,
        };
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            dims,
            layer_norm_eps: eps as f64,
            entries,
        })
    }

    fn entry(&self, name: &str, dtype: u8, elements: usize) -> Result<&Entry> {
        let e = self.entries.get(name).ok_or_else(|| Error::ModelFormat {
            path: self.path.clone(),
            reason: format!("tensor {name} is missing"),
        })?;
        if e.dtype != dtype || e.elements != elements {
            return Err(Error::ModelFormat {
                path: self.path.clone(),
                reason: format!(
                    "tensor {name}: dtype {} with {} elements, expected dtype {dtype} with {elements}",
                    e.dtype, e.elements
                ),
            });
        }
        Ok(e)
    }

    /// An f32 tensor of the given shape.
    pub fn f32(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let e = self.entry(name, DTYPE_F32, n)?;
        let raw = &self.bytes[e.offset..e.offset + e.len];
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Ok(Tensor::from_vec(values, shape, device)?)
    }

    /// A Q4_0 matrix `[rows, cols]` kept as quantized blocks (the blocks are ggml's layout, which
    /// candle reads as they are).
    pub fn q4(&self, name: &str, rows: usize, cols: usize, device: &Device) -> Result<QTensor> {
        let e = self.entry(name, DTYPE_Q4_0, rows * cols)?;
        let raw = &self.bytes[e.offset..e.offset + e.len];
        let storage =
            QStorage::from_data(std::borrow::Cow::Borrowed(raw), device, GgmlDType::Q4_0)?;
        Ok(QTensor::new(storage, (rows, cols))?)
    }

    /// The raw Q4_0 bytes of a tensor (the packed encoder and the reference dequantizer).
    pub fn q4_raw(&self, name: &str, elements: usize) -> Result<&[u8]> {
        let e = self.entry(name, DTYPE_Q4_0, elements)?;
        Ok(&self.bytes[e.offset..e.offset + e.len])
    }
}

/// Dequantizes Q4_0 blocks by the format's definition, independent of candle: value =
/// (nibble - 8) * scale, low nibbles are elements 0..15 of a block, high nibbles 16..31.
pub fn dequantize_q4_0(raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(raw.len() / Q4_0_BLOCK_BYTES * Q4_0_BLOCK_LEN);
    for block in raw.chunks_exact(Q4_0_BLOCK_BYTES) {
        let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let qs = &block[2..];
        let mut vals = [0f32; Q4_0_BLOCK_LEN];
        for (i, &b) in qs.iter().enumerate() {
            vals[i] = ((b & 0x0f) as i32 - 8) as f32 * scale;
            vals[i + 16] = ((b >> 4) as i32 - 8) as f32 * scale;
        }
        out.extend_from_slice(&vals);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_magic_and_truncation() {
        let p = Path::new("x.bin");
        let e = E5s1::parse(p, b"GGUF....".to_vec()).err().unwrap();
        assert!(e.to_string().contains("wrong magic"), "{e}");
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&1i32.to_le_bytes());
        b.extend_from_slice(&384i32.to_le_bytes());
        let e = E5s1::parse(p, b).err().unwrap();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn q4_0_reference_dequantization() {
        // scale 0.5; byte 0x9F -> low nibble 15 (=> +3.5), high nibble 9 (=> +0.5)
        let mut block = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend_from_slice(&[0x9F; 16]);
        let v = dequantize_q4_0(&block);
        assert_eq!(v.len(), 32);
        assert_eq!(v[0], 3.5);
        assert_eq!(v[15], 3.5);
        assert_eq!(v[16], 0.5);
        assert_eq!(v[31], 0.5);
    }
}
