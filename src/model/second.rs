//! A second opinion for the queries the screening model is unsure of: a second model on another
//! backbone (EmbeddingGemma-300M under frozen-encoder heads) scores only the queries whose
//! unsafe probability falls inside a band, and the two verdicts are averaged in logit space.
//!
//! Why a band and not every query: the second backbone is about 8x slower, and on search-style
//! queries only a few percent land in the band (4 % of `bench/corpus.jsonl`), so the queries the
//! first model would most likely get wrong are decided by two models that err differently while
//! the clear ones cost what they did. The escalated few still run at small batches, where the
//! second backbone is slowest: measured end to end, the pair screens about half as many queries
//! per second as the first model alone (README, "Second opinion").

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::model::{Backbone, HeadScores, Model, ModelSpec};

/// How the second opinion is asked and weighed (`model.second_opinion` in the config).
#[derive(Debug, Clone, PartialEq)]
pub struct SecondOpinionSpec {
    /// Heads directory trained for the second backbone.
    pub heads: PathBuf,
    pub backbone: Backbone,
    /// Queries whose first unsafe probability is in `[band_low, band_high]` are escalated.
    pub band_low: f32,
    pub band_high: f32,
    /// Weight of the first model's logit in the average (the second gets `1 - weight`).
    pub weight: f32,
    /// Subtracted from the averaged logit: above 0 the pair must be surer before it flags.
    pub offset: f32,
}

impl SecondOpinionSpec {
    /// The settings measured on the dev split (see the README): band 0.02..0.98, equal weights,
    /// offset 0.25.
    pub fn measured(heads: PathBuf) -> Self {
        Self {
            heads,
            backbone: Backbone::EmbeddingGemma300m,
            band_low: 0.02,
            band_high: 0.98,
            weight: 0.5,
            offset: 0.25,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let unit = |name: &str, v: f32| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "model.second_opinion.{name} = {v} is outside 0..=1"
                )))
            }
        };
        unit("band_low", self.band_low)?;
        unit("band_high", self.band_high)?;
        unit("weight", self.weight)?;
        if self.band_low > self.band_high {
            return Err(Error::Config(format!(
                "model.second_opinion.band_low ({}) is above band_high ({}): no query would be \
                 escalated; swap them",
                self.band_low, self.band_high
            )));
        }
        if !self.offset.is_finite() || self.offset.abs() > 10.0 {
            return Err(Error::Config(format!(
                "model.second_opinion.offset = {} is outside -10..=10 (a logit shift)",
                self.offset
            )));
        }
        Ok(())
    }
}

/// The loaded second model and the rule that combines its verdict with the first one's.
pub struct SecondOpinion {
    pub model: Model,
    pub spec: SecondOpinionSpec,
    /// The first model's calibrated unsafe threshold: the combined score is put back on its
    /// scale, so that the policy's thresholds keep their meaning.
    first_threshold: f32,
}

fn logit(p: f32) -> f32 {
    let p = p.clamp(1e-4, 1.0 - 1e-4);
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The combined unsafe probability, on the first model's scale: each model's logit is measured
/// from its own calibrated threshold (`t1`, `t2`), the two are averaged with `spec.weight`, and
/// the result is shifted back so that it crosses `t1` exactly when the average is above
/// `spec.offset`.
pub fn combine(spec: &SecondOpinionSpec, t1: f32, t2: f32, first: f32, second: f32) -> f32 {
    let w = spec.weight;
    let z = w * (logit(first) - logit(t1)) + (1.0 - w) * (logit(second) - logit(t2)) - spec.offset;
    sigmoid(z + logit(t1))
}

impl SecondOpinion {
    pub fn load(first: &ModelSpec, first_threshold: f32, spec: &SecondOpinionSpec) -> Result<Self> {
        spec.validate()?;
        let model = Model::load(&ModelSpec {
            backbone: spec.backbone,
            heads: Some(spec.heads.clone()),
            weights: crate::model::WeightFormat::F32,
            second_opinion: None,
            ..first.clone()
        })
        .map_err(|e| {
            Error::Heads(format!(
                "second opinion from {}: {e}. It needs heads trained for {} (the committed ones \
                 are in models/second-opinion) and that backbone's weights (`guardian models \
                 fetch --backbone {}`)",
                spec.heads.display(),
                spec.backbone,
                spec.backbone
            ))
        })?;
        Ok(Self {
            model,
            spec: spec.clone(),
            first_threshold,
        })
    }

    /// Whether a first unsafe probability is unsure enough to ask the second model.
    pub fn escalates(&self, p: f32) -> bool {
        (self.spec.band_low..=self.spec.band_high).contains(&p)
    }

    /// The combined unsafe probability of one escalated query (see [`combine`]).
    pub fn combine(&self, first: f32, second: f32) -> f32 {
        combine(
            &self.spec,
            self.first_threshold,
            self.model.heads.meta.unsafe_threshold,
            first,
            second,
        )
    }

    /// Re-scores the escalated queries of a batch in place; returns how many were escalated.
    /// The category distribution stays the first model's (it is the fine-tuned one).
    pub fn revise(&self, scores: &mut [HeadScores], texts: &[&str]) -> Result<usize> {
        let picked: Vec<usize> = (0..scores.len())
            .filter(|&i| self.escalates(scores[i].unsafe_prob))
            .collect();
        if picked.is_empty() {
            return Ok(0);
        }
        let tokens = picked
            .iter()
            .map(|&i| Ok(self.model.embedder.tokenizer.encode(texts[i])?.ids))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[u32]> = tokens.iter().map(|t| t.as_slice()).collect();
        let second = self.model.score(&refs)?;
        for (&i, s) in picked.iter().zip(&second) {
            scores[i].unsafe_prob = self.combine(scores[i].unsafe_prob, s.unsafe_prob);
        }
        Ok(picked.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_outside_their_ranges_are_refused_with_the_field_named() {
        let ok = SecondOpinionSpec::measured("h".into());
        assert!(ok.validate().is_ok());
        let cases = [
            (
                SecondOpinionSpec {
                    band_low: 0.9,
                    band_high: 0.1,
                    ..ok.clone()
                },
                "band_low",
            ),
            (
                SecondOpinionSpec {
                    weight: 1.5,
                    ..ok.clone()
                },
                "weight",
            ),
            (
                SecondOpinionSpec {
                    band_high: -0.1,
                    ..ok.clone()
                },
                "band_high",
            ),
            (
                SecondOpinionSpec {
                    offset: f32::NAN,
                    ..ok.clone()
                },
                "offset",
            ),
        ];
        for (spec, field) in cases {
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_pair_flags_exactly_when_the_weighted_margin_passes_the_offset() {
        let spec = SecondOpinionSpec {
            offset: 0.0,
            ..SecondOpinionSpec::measured("h".into())
        };
        let (t1, t2) = (0.33, 0.43);
        // Both exactly at their own thresholds: the result sits on the first threshold.
        assert!((combine(&spec, t1, t2, t1, t2) - t1).abs() < 1e-5);
        // Equal and opposite margins cancel at equal weights.
        let up = sigmoid(logit(t1) + 1.0);
        let down = sigmoid(logit(t2) - 1.0);
        assert!((combine(&spec, t1, t2, up, down) - t1).abs() < 1e-4);
        // A confident second model overrules an unsure first one, both ways.
        assert!(combine(&spec, t1, t2, 0.30, 0.95) > t1);
        assert!(combine(&spec, t1, t2, 0.40, 0.02) < t1);
        // Weight 1 ignores the second model; the offset then only shifts the first.
        let first_only = SecondOpinionSpec {
            weight: 1.0,
            ..spec.clone()
        };
        assert!((combine(&first_only, t1, t2, 0.6, 0.0001) - 0.6).abs() < 1e-4);
        let shifted = SecondOpinionSpec {
            offset: 0.25,
            ..first_only
        };
        let p = combine(&shifted, t1, t2, 0.6, 0.5);
        assert!((logit(0.6) - logit(p) - 0.25).abs() < 1e-4, "{p}");
    }

    #[test]
    fn logit_and_sigmoid_invert_each_other() {
        for p in [0.01f32, 0.2, 0.33, 0.5, 0.9, 0.99] {
            assert!((sigmoid(logit(p)) - p).abs() < 1e-5, "{p}");
        }
    }
}
