//! The multi-task heads on the pooled sentence embedding: a shared trunk (linear + GELU), a
//! safe/unsafe head (one logit) and a ten-way category head. Trained jointly by `guardian train`,
//! stored as safetensors beside a JSON file that records what they were trained on.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lexical::{self, Lexical, LexicalMeta};
use crate::taxonomy::Category;

/// What a heads file was made from and measured at. Written by `guardian train`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadsMeta {
    /// Identifies the encoder whose embeddings the heads read (weights file and format).
    pub encoder: String,
    pub hidden: usize,
    pub trunk: usize,
    /// Category order of the category head's outputs.
    pub categories: Vec<String>,
    /// The unsafe-probability threshold calibrated on the dev split.
    pub unsafe_threshold: f32,
    /// Per-category thresholds calibrated on dev (by the top category), where they beat the
    /// global one; the default policy uses them unless the config sets thresholds.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub category_thresholds: std::collections::BTreeMap<String, f32>,
    /// Encoder layers fine-tuned with the heads and stored in the same file (`enc.l{L}.*`);
    /// empty when the encoder is the stock one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tuned_layers: Vec<usize>,
    /// The lexical model blended into the unsafe logit (`lex.*` tensors); absent when dev
    /// chose no blend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical: Option<LexicalMeta>,
    /// sha256 (first 12 hex digits) of the safetensors file; part of the model id. Computed
    /// when the heads are loaded, not stored.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
}

pub struct Heads {
    trunk: Linear,
    unsafe_head: Linear,
    category_head: Linear,
    pub lexical: Option<Lexical>,
    pub meta: HeadsMeta,
}

/// Head outputs for one query.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadScores {
    /// Probability that the query is unsafe.
    pub unsafe_prob: f32,
    /// Probability of each category (in `Category::ALL` order) given that it is unsafe.
    pub category_probs: [f32; Category::COUNT],
}

/// Tensor names in the safetensors file (shared with the trainer).
pub const TRUNK: &str = "trunk";
pub const UNSAFE: &str = "unsafe";
pub const CATEGORY: &str = "category";

impl Heads {
    pub fn build(vb: VarBuilder, meta: HeadsMeta) -> Result<Self> {
        if meta.categories.len() != Category::COUNT
            || meta
                .categories
                .iter()
                .zip(Category::ALL)
                .any(|(a, b)| a != b.id())
        {
            return Err(Error::Heads(format!(
                "category order {:?} does not match this build's taxonomy; retrain the heads",
                meta.categories
            )));
        }
        let trunk = candle_nn::linear(meta.hidden, meta.trunk, vb.pp(TRUNK))?;
        let unsafe_head = candle_nn::linear(meta.trunk, 1, vb.pp(UNSAFE))?;
        let category_head = candle_nn::linear(meta.trunk, Category::COUNT, vb.pp(CATEGORY))?;
        let lexical = match meta.lexical {
            Some(m) => {
                let mut tensors = std::collections::HashMap::new();
                for (name, len) in [
                    (lexical::WEIGHTS, m.buckets),
                    (lexical::IDF, m.buckets),
                    (lexical::BIAS, 1),
                ] {
                    let t = vb.get(len, name).map_err(|e| {
                        Error::Heads(format!(
                            "heads.json describes a lexical model but {name} cannot be read \
                             ({e}); retrain the heads"
                        ))
                    })?;
                    tensors.insert(name.to_string(), t.to_device(&Device::Cpu)?);
                }
                Some(Lexical::from_tensors(&tensors, m)?)
            }
            None => None,
        };
        Ok(Self {
            trunk,
            unsafe_head,
            category_head,
            lexical,
            meta,
        })
    }

    pub fn from_bytes(safetensors: &[u8], meta_json: &[u8], device: &Device) -> Result<Self> {
        let mut meta: HeadsMeta = serde_json::from_slice(meta_json)
            .map_err(|e| Error::Heads(format!("heads.json is invalid: {e}")))?;
        meta.digest = crate::util::sha256_hex(safetensors)[..12].to_string();
        let vb = VarBuilder::from_buffered_safetensors(safetensors.to_vec(), DType::F32, device)?;
        Self::build(vb, meta)
    }

    /// Logits for training: `(unsafe [b], category [b, C])`. `dropout_mask` (already scaled by
    /// 1/(1-p)) is applied to the trunk's output during training.
    pub fn logits(
        &self,
        emb: &Tensor,
        dropout_mask: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut z = self.trunk.forward(emb)?.gelu_erf()?;
        if let Some(m) = dropout_mask {
            z = (z * m)?;
        }
        let u = self.unsafe_head.forward(&z)?.squeeze(D::Minus1)?;
        let c = self.category_head.forward(&z)?;
        Ok((u, c))
    }

    /// What the lexical model adds to each sequence's unsafe logit (`None` without one).
    pub fn lexical_offsets(&self, batch: &[&[u32]]) -> Option<Vec<f32>> {
        self.lexical.as_ref().map(|l| l.offsets(batch))
    }

    /// Scores from embeddings; `unsafe_offset` (from [`Heads::lexical_offsets`]) is added to
    /// each unsafe logit before the sigmoid.
    pub fn scores(&self, emb: &Tensor, unsafe_offset: Option<&[f32]>) -> Result<Vec<HeadScores>> {
        let (u, c) = self.logits(emb, None)?;
        let mut u = u.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        if let Some(off) = unsafe_offset {
            if off.len() != u.len() {
                return Err(Error::Heads(format!(
                    "{} lexical offsets for a batch of {}",
                    off.len(),
                    u.len()
                )));
            }
            u.iter_mut().zip(off).for_each(|(z, o)| *z += o);
        }
        let u = u.into_iter().map(lexical::sigmoid);
        let c = candle_nn::ops::softmax_last_dim(&c)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        Ok(u.into_iter()
            .zip(c)
            .map(|(unsafe_prob, cats)| {
                let mut category_probs = [0f32; Category::COUNT];
                category_probs.copy_from_slice(&cats);
                HeadScores {
                    unsafe_prob,
                    category_probs,
                }
            })
            .collect())
    }
}
