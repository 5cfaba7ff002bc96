//! Fits the lexical model (see `model::lexical`): idf from the train split, then a
//! class-weighted logistic regression by AdaGrad over shuffled epochs. Sparse rows keep an
//! epoch over the whole corpus well under a second.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::trainer::balanced_class_weights;
use crate::model::lexical::{bucket_counts, features, sigmoid, Lexical, LexicalMeta};
use crate::policy::Label;

#[derive(Debug, Clone, Copy)]
pub struct LexicalOptions {
    pub buckets: usize,
    pub max_n: usize,
    pub epochs: usize,
    pub learning_rate: f32,
    /// L2 penalty per example seen.
    pub l2: f32,
    pub seed: u64,
}

impl Default for LexicalOptions {
    fn default() -> Self {
        Self {
            buckets: 1 << 18,
            max_n: 3,
            epochs: 8,
            learning_rate: 0.5,
            l2: 2e-6,
            seed: 17,
        }
    }
}

/// Fits on token sequences, their labels and per-item weights. Classes are weighted to count
/// equally by weighted mass, as the heads' loss weights them. The blend weight is left at 0
/// for the caller to choose on dev.
pub fn fit(ids: &[Vec<u32>], gold: &[Label], weight: &[f32], opts: &LexicalOptions) -> Lexical {
    let n = ids.len().max(1) as f32;
    let mut df = vec![0u32; opts.buckets];
    for seq in ids {
        for (b, _) in bucket_counts(seq, opts.max_n, opts.buckets) {
            df[b] += 1;
        }
    }
    // Smoothed idf, as in the usual tf-idf: never zero, highest for the rarest n-grams.
    let idf: Vec<f32> = df
        .iter()
        .map(|&d| ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0)
        .collect();
    let rows: Vec<Vec<(usize, f32)>> = ids.iter().map(|s| features(s, opts.max_n, &idf)).collect();
    let (w_unsafe, w_safe) =
        balanced_class_weights(gold.iter().copied().zip(weight.iter().copied()));
    let class_weight = |g: Label| match g {
        Label::Unsafe => w_unsafe,
        Label::Safe => w_safe,
    };

    let mut w = vec![0f32; opts.buckets];
    let mut g2 = vec![1e-8f32; opts.buckets];
    let (mut bias, mut bias_g2) = (0f32, 1e-8f32);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0x1e8);
    for _ in 0..opts.epochs {
        order.shuffle(&mut rng);
        for &i in &order {
            let z = bias + rows[i].iter().map(|(b, x)| w[*b] * x).sum::<f32>();
            let y = if gold[i] == Label::Unsafe { 1.0 } else { 0.0 };
            let err = (sigmoid(z) - y) * class_weight(gold[i]) * weight[i];
            for (b, x) in &rows[i] {
                let grad = err * x + opts.l2 * w[*b];
                g2[*b] += grad * grad;
                w[*b] -= opts.learning_rate * grad / g2[*b].sqrt();
            }
            bias_g2 += err * err;
            bias -= opts.learning_rate * err / bias_g2.sqrt();
        }
    }
    Lexical {
        meta: LexicalMeta {
            buckets: opts.buckets,
            max_n: opts.max_n,
            blend: 0.0,
        },
        weights: w,
        idf,
        bias,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_which_tokens_mark_unsafe_queries() {
        // Token 100 marks unsafe queries, 200 safe ones; 1-9 are shared filler.
        let mut ids = Vec::new();
        let mut gold = Vec::new();
        for i in 0..200u32 {
            let filler = [1 + i % 9, 1 + (i * 7) % 9];
            let (marker, label) = if i % 3 == 0 {
                (100, Label::Unsafe)
            } else {
                (200, Label::Safe)
            };
            ids.push(vec![filler[0], marker, filler[1]]);
            gold.push(label);
        }
        let opts = LexicalOptions {
            buckets: 1 << 12,
            ..Default::default()
        };
        let lex = fit(&ids, &gold, &vec![1.0; ids.len()], &opts);
        let mean = |label: Label| {
            let z: Vec<f32> = ids
                .iter()
                .zip(&gold)
                .filter(|(_, g)| **g == label)
                .map(|(s, _)| lex.logit(s))
                .collect();
            z.iter().sum::<f32>() / z.len() as f32
        };
        assert!(mean(Label::Unsafe) > 1.0, "{}", mean(Label::Unsafe));
        assert!(mean(Label::Safe) < -1.0, "{}", mean(Label::Safe));
        // Unseen context around the marker: the marker still decides.
        assert!(lex.logit(&[3, 100, 5]) > 0.0 && lex.logit(&[3, 200, 5]) < 0.0);
        let accuracy = ids
            .iter()
            .zip(&gold)
            .filter(|(s, g)| (lex.logit(s) > 0.0) == (**g == Label::Unsafe))
            .count();
        assert_eq!(accuracy, ids.len());
        assert_eq!(lex.meta.blend, 0.0);
    }

    #[test]
    fn heavier_items_pull_their_tokens_their_way() {
        // Token 300 is as often in unsafe as in safe items; 100 and 200 mark the classes.
        let mut ids = Vec::new();
        let mut gold = Vec::new();
        for i in 0..200u32 {
            let (seq, label) = match i % 4 {
                0 => (vec![100, 1 + i % 7], Label::Unsafe),
                1 => (vec![200, 1 + i % 7], Label::Safe),
                2 => (vec![300, 1 + i % 7], Label::Unsafe),
                _ => (vec![300, 1 + i % 7], Label::Safe),
            };
            ids.push(seq);
            gold.push(label);
        }
        let opts = LexicalOptions {
            buckets: 1 << 12,
            ..Default::default()
        };
        let plain = fit(&ids, &gold, &vec![1.0; ids.len()], &opts);
        // The safe items with token 300 weighted 4: the token now reads as safe.
        let weights: Vec<f32> = (0..ids.len())
            .map(|i| if i % 4 == 3 { 4.0 } else { 1.0 })
            .collect();
        let weighted = fit(&ids, &gold, &weights, &opts);
        let (p, w) = (plain.logit(&[300]), weighted.logit(&[300]));
        assert!(w < p - 0.5 && w < 0.0, "plain {p}, weighted {w}");
    }
}
