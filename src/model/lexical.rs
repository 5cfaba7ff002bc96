//! The lexical model: a logistic regression on hashed token n-grams, blended into the unsafe
//! logit of the heads. It sees the same token ids as the encoder, so it needs no extra input
//! and costs microseconds per query.
//!
//! Why a second model: the encoder judges meaning and is weakest where the signal is a
//! surface form — a swear word spelt to dodge filters, a slur in a comment, a stock phrase of
//! a data source. Token n-grams catch those directly, and their mistakes differ from the
//! encoder's, so the blend beats either alone on dev. `guardian train` fits it on the train
//! split and picks the blend weight on dev (weight 0 ships no lexical model).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Tensor names in the heads file.
pub const WEIGHTS: &str = "lex.w";
pub const IDF: &str = "lex.idf";
pub const BIAS: &str = "lex.b";

/// Shape of the lexical model and its weight in the blend, recorded in heads.json.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LexicalMeta {
    /// Hash buckets of the n-gram features.
    pub buckets: usize,
    /// Longest n-gram (1 = single tokens).
    pub max_n: usize,
    /// Unsafe logit = heads' logit + `blend` x lexical logit.
    pub blend: f32,
}

#[derive(Debug, Clone)]
pub struct Lexical {
    pub meta: LexicalMeta,
    pub weights: Vec<f32>,
    /// Inverse document frequency of each bucket on the train split.
    pub idf: Vec<f32>,
    pub bias: f32,
}

/// FNV-1a over the n-gram's ids, seeded by its length: stable across builds and platforms,
/// which the stored weights depend on.
fn bucket(gram: &[u32], buckets: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ gram.len() as u64;
    for id in gram {
        for b in id.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (h % buckets as u64) as usize
}

/// Distinct buckets of a token sequence's n-grams with their counts, in bucket order.
pub fn bucket_counts(ids: &[u32], max_n: usize, buckets: usize) -> Vec<(usize, u32)> {
    let mut all: Vec<usize> = (1..=max_n)
        .flat_map(|n| ids.windows(n).map(move |g| bucket(g, buckets)))
        .collect();
    all.sort_unstable();
    let mut out: Vec<(usize, u32)> = Vec::with_capacity(all.len());
    for b in all {
        match out.last_mut() {
            Some((last, c)) if *last == b => *c += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// Sublinear term frequency times idf, scaled to unit length.
pub fn features(ids: &[u32], max_n: usize, idf: &[f32]) -> Vec<(usize, f32)> {
    let mut v: Vec<(usize, f32)> = bucket_counts(ids, max_n, idf.len())
        .into_iter()
        .map(|(b, c)| (b, (1.0 + (c as f32).ln()) * idf[b]))
        .collect();
    let norm = v.iter().map(|(_, x)| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|(_, x)| *x /= norm);
    }
    v
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl Lexical {
    /// The lexical logit of one token sequence (before the blend weight).
    pub fn logit(&self, ids: &[u32]) -> f32 {
        self.bias
            + features(ids, self.meta.max_n, &self.idf)
                .iter()
                .map(|(b, x)| self.weights[*b] * x)
                .sum::<f32>()
    }

    /// What the blend adds to the heads' unsafe logit for each sequence.
    pub fn offsets(&self, batch: &[&[u32]]) -> Vec<f32> {
        batch
            .iter()
            .map(|ids| self.meta.blend * self.logit(ids))
            .collect()
    }

    /// The tensors as stored: weights and idf as f16, the bias as f32.
    pub fn to_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let half = |v: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, v.len(), &Device::Cpu)?.to_dtype(DType::F16)?)
        };
        Ok(vec![
            (WEIGHTS.to_string(), half(&self.weights)?),
            (IDF.to_string(), half(&self.idf)?),
            (
                BIAS.to_string(),
                Tensor::from_slice(&[self.bias], 1, &Device::Cpu)?,
            ),
        ])
    }

    /// The model as `screen` will load it from `tensors` (f16 rounding included).
    pub fn from_tensors(tensors: &HashMap<String, Tensor>, meta: LexicalMeta) -> Result<Self> {
        let get = |name: &str, len: usize| -> Result<Vec<f32>> {
            let t = tensors.get(name).ok_or_else(|| {
                Error::Heads(format!(
                    "heads.json describes a lexical model but the heads file has no {name}; \
                     retrain the heads"
                ))
            })?;
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != len {
                return Err(Error::Heads(format!(
                    "{name} holds {} values, heads.json implies {len}; retrain the heads",
                    v.len()
                )));
            }
            Ok(v)
        };
        if meta.buckets == 0 || meta.max_n == 0 {
            return Err(Error::Heads(format!(
                "lexical model with {} buckets and n-grams up to {}: both must be positive",
                meta.buckets, meta.max_n
            )));
        }
        Ok(Self {
            weights: get(WEIGHTS, meta.buckets)?,
            idf: get(IDF, meta.buckets)?,
            bias: get(BIAS, 1)?[0],
            meta,
        })
    }

    /// Rounds the weights as storing them does, so dev is scored on what `screen` loads.
    pub fn stored(&self) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = self.to_tensors()?.into_iter().collect();
        Self::from_tensors(&tensors, self.meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_count_repeats() {
        // Pinned values: a change here would silently break every stored lexical model.
        assert_eq!(bucket(&[0], 1 << 18), bucket(&[0], 1 << 18));
        assert_ne!(bucket(&[5], 1 << 18), bucket(&[5, 5], 1 << 18));
        assert_eq!(bucket(&[1, 2, 3], 1 << 18), 261_702);
        let c = bucket_counts(&[7, 7, 7], 2, 1 << 18);
        let unigram = c.iter().find(|(b, _)| *b == bucket(&[7], 1 << 18)).unwrap();
        let bigram = c
            .iter()
            .find(|(b, _)| *b == bucket(&[7, 7], 1 << 18))
            .unwrap();
        assert_eq!((unigram.1, bigram.1), (3, 2));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn features_have_unit_length_and_weight_by_idf() {
        let mut idf = vec![1.0f32; 64];
        let rare = bucket(&[9], 64);
        idf[rare] = 4.0;
        let f = features(&[9, 10, 11], 1, &idf);
        let norm: f32 = f.iter().map(|(_, x)| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        let weight = |b: usize| f.iter().find(|(x, _)| *x == b).unwrap().1;
        assert!(weight(rare) > 3.0 * weight(bucket(&[10], 64)));
        assert!(features(&[], 3, &idf).is_empty());
    }

    #[test]
    fn stored_model_round_trips_through_f16() {
        let meta = LexicalMeta {
            buckets: 32,
            max_n: 2,
            blend: 0.5,
        };
        let lex = Lexical {
            meta,
            weights: (0..32).map(|i| i as f32 / 7.0 - 2.0).collect(),
            idf: (0..32).map(|i| 1.0 + i as f32 / 10.0).collect(),
            bias: -0.25,
        };
        let back = lex.stored().unwrap();
        for ids in [&[1u32, 2, 3][..], &[4, 4], &[31]] {
            assert!((lex.logit(ids) - back.logit(ids)).abs() < 1e-2);
        }
        assert_eq!(back.offsets(&[&[1, 2]])[0], 0.5 * back.logit(&[1, 2]));
        let mut missing: HashMap<String, Tensor> = lex.to_tensors().unwrap().into_iter().collect();
        missing.remove(IDF);
        let err = Lexical::from_tensors(&missing, meta)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lex.idf") && err.contains("retrain"), "{err}");
    }
}
