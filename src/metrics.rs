//! Scores in the paper's format: precision, recall and F1 for the safe and unsafe classes, their
//! support-weighted average, plus per-category and per-language breakdowns and confusion
//! matrices.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::policy::Label;
use crate::taxonomy::Category;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// The paper's table for one slice of the data.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BinaryReport {
    pub safe: ClassScores,
    #[serde(rename = "unsafe")]
    pub unsafe_: ClassScores,
    pub weighted: ClassScores,
    pub accuracy: f64,
    /// [[safe->safe, safe->unsafe], [unsafe->safe, unsafe->unsafe]] (rows gold, columns predicted).
    pub confusion: [[usize; 2]; 2],
}

fn div(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

fn class(tp: usize, fp: usize, fn_: usize) -> ClassScores {
    let p = div(tp as f64, (tp + fp) as f64);
    let r = div(tp as f64, (tp + fn_) as f64);
    ClassScores {
        precision: p,
        recall: r,
        f1: div(2.0 * p * r, p + r),
        support: tp + fn_,
    }
}

impl BinaryReport {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Label, Label)>) -> Self {
        let mut m = [[0usize; 2]; 2];
        for (gold, pred) in pairs {
            m[(gold == Label::Unsafe) as usize][(pred == Label::Unsafe) as usize] += 1;
        }
        let safe = class(m[0][0], m[1][0], m[0][1]);
        let unsafe_ = class(m[1][1], m[0][1], m[1][0]);
        let n = (safe.support + unsafe_.support) as f64;
        let w = |f: fn(&ClassScores) -> f64| {
            div(
                f(&safe) * safe.support as f64 + f(&unsafe_) * unsafe_.support as f64,
                n,
            )
        };
        Self {
            weighted: ClassScores {
                precision: w(|c| c.precision),
                recall: w(|c| c.recall),
                f1: w(|c| c.f1),
                support: n as usize,
            },
            safe,
            unsafe_,
            accuracy: div((m[0][0] + m[1][1]) as f64, n),
            confusion: m,
        }
    }

    pub fn render(&self, title: &str) -> String {
        let row = |name: &str, c: &ClassScores| {
            format!(
                "  {name:<10} {:>9.3} {:>9.3} {:>9.3} {:>8}\n",
                c.precision, c.recall, c.f1, c.support
            )
        };
        let mut s = format!(
            "{title}\n  {:<10} {:>9} {:>9} {:>9} {:>8}\n",
            "class", "precision", "recall", "f1", "support"
        );
        s += &row("safe", &self.safe);
        s += &row("unsafe", &self.unsafe_);
        s += &row("weighted", &self.weighted);
        s += &format!(
            "  confusion (rows gold, cols predicted): safe->safe {} safe->unsafe {} | unsafe->safe {} unsafe->unsafe {}\n",
            self.confusion[0][0], self.confusion[0][1], self.confusion[1][0], self.confusion[1][1]
        );
        s
    }
}

/// One labelled example with the model's verdict.
#[derive(Debug, Clone)]
pub struct Scored {
    pub gold: Label,
    pub gold_category: Option<Category>,
    pub pred: Label,
    pub pred_category: Option<Category>,
    /// The most likely category even when the label is safe.
    pub top_category: Category,
    pub lang: String,
    pub source: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CategoryRow {
    /// Gold-unsafe items of this category.
    pub support: usize,
    /// Share of them labelled unsafe.
    pub unsafe_recall: f64,
    /// Share of them given this category (of those caught).
    pub category_accuracy: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FullReport {
    pub overall: BinaryReport,
    pub by_lang: BTreeMap<String, BinaryReport>,
    pub by_source: BTreeMap<String, BinaryReport>,
    pub by_category: BTreeMap<String, CategoryRow>,
    /// Category confusion on gold-unsafe items (gold category -> predicted top category -> count).
    pub category_confusion: BTreeMap<String, BTreeMap<String, usize>>,
    /// Accuracy of the top category on gold-unsafe items.
    pub category_accuracy: f64,
}

impl FullReport {
    pub fn build(items: &[Scored]) -> Self {
        let pairs = |f: &dyn Fn(&Scored) -> bool| {
            BinaryReport::from_pairs(items.iter().filter(|s| f(s)).map(|s| (s.gold, s.pred)))
        };
        let mut r = FullReport {
            overall: pairs(&|_| true),
            ..Default::default()
        };
        let langs: std::collections::BTreeSet<&str> =
            items.iter().map(|s| s.lang.as_str()).collect();
        for l in langs {
            r.by_lang.insert(l.to_string(), pairs(&|s| s.lang == l));
        }
        let sources: std::collections::BTreeSet<&str> =
            items.iter().map(|s| s.source.as_str()).collect();
        for src in sources {
            r.by_source
                .insert(src.to_string(), pairs(&|s| s.source == src));
        }
        let (mut right, mut total) = (0usize, 0usize);
        for c in Category::ALL {
            let of: Vec<&Scored> = items
                .iter()
                .filter(|s| s.gold_category == Some(c))
                .collect();
            if of.is_empty() {
                continue;
            }
            let caught = of.iter().filter(|s| s.pred == Label::Unsafe).count();
            let correct = of.iter().filter(|s| s.top_category == c).count();
            right += correct;
            total += of.len();
            r.by_category.insert(
                c.id().to_string(),
                CategoryRow {
                    support: of.len(),
                    unsafe_recall: div(caught as f64, of.len() as f64),
                    category_accuracy: div(correct as f64, of.len() as f64),
                },
            );
            let row = r.category_confusion.entry(c.id().to_string()).or_default();
            for s in of {
                *row.entry(s.top_category.id().to_string()).or_default() += 1;
            }
        }
        r.category_accuracy = div(right as f64, total as f64);
        r
    }

    pub fn render(&self) -> String {
        let mut s = self.overall.render("overall");
        for (l, b) in &self.by_lang {
            s += &b.render(&format!("language {l}"));
        }
        for (src, b) in &self.by_source {
            s += &format!(
                "source {src:<28} weighted F1 {:.3}  safe recall {:.3}  unsafe recall {:.3}  (n={})\n",
                b.weighted.f1, b.safe.recall, b.unsafe_.recall, b.weighted.support
            );
        }
        s += &format!(
            "categories (gold-unsafe items; top-category accuracy {:.3})\n",
            self.category_accuracy
        );
        s += &format!(
            "  {:<26} {:>8} {:>14} {:>12}\n",
            "category", "support", "unsafe recall", "category acc"
        );
        for (c, row) in &self.by_category {
            s += &format!(
                "  {c:<26} {:>8} {:>14.3} {:>12.3}\n",
                row.support, row.unsafe_recall, row.category_accuracy
            );
        }
        s += "category confusion (gold -> predicted top category)\n";
        for (gold, row) in &self.category_confusion {
            let cells: Vec<String> = row.iter().map(|(p, n)| format!("{p} {n}")).collect();
            s += &format!("  {gold:<26} {}\n", cells.join(", "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Label::*;

    #[test]
    fn matches_hand_computed_scores() {
        // 6 safe (5 right), 4 unsafe (3 right).
        let mut pairs = vec![(Safe, Safe); 5];
        pairs.push((Safe, Unsafe));
        pairs.extend(vec![(Unsafe, Unsafe); 3]);
        pairs.push((Unsafe, Safe));
        let r = BinaryReport::from_pairs(pairs);
        assert!((r.safe.precision - 5.0 / 6.0).abs() < 1e-12);
        assert!((r.safe.recall - 5.0 / 6.0).abs() < 1e-12);
        assert!((r.unsafe_.precision - 0.75).abs() < 1e-12);
        assert!((r.unsafe_.recall - 0.75).abs() < 1e-12);
        let wf1 = (6.0 * (5.0 / 6.0) + 4.0 * 0.75) / 10.0;
        assert!((r.weighted.f1 - wf1).abs() < 1e-12);
        assert_eq!(r.confusion, [[5, 1], [1, 3]]);
    }
}
