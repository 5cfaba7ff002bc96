//! Turns head scores into a label, a category and an action, by per-category thresholds.

use crate::config::{Action, Mode, PolicyConfig};
use crate::model::HeadScores;
use crate::taxonomy::Category;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Safe,
    Unsafe,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Safe => "safe",
            Label::Unsafe => "unsafe",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub label: Label,
    /// The most likely category; set only for unsafe verdicts.
    pub category: Option<Category>,
    pub action: Action,
    /// In observe mode, the action enforce mode would have taken.
    pub observed_action: Option<Action>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// `<config version>-<digest of the rules>`: a threshold change is a new version.
    pub version: String,
    pub mode: Mode,
    pub unsafe_threshold: f32,
    pub caution_threshold: f32,
    thresholds: [f32; Category::COUNT],
    actions: [Action; Category::COUNT],
}

impl Policy {
    /// `calibrated` is the heads' dev-split threshold, used where the config sets none.
    pub fn new(cfg: &PolicyConfig, calibrated: f32) -> Self {
        Self::with_calibration(cfg, calibrated, &std::collections::BTreeMap::new())
    }

    /// As [`Policy::new`], plus the heads' per-category dev-split thresholds. Precedence for a
    /// category: its `threshold` in the config, else the config's `unsafe_threshold`, else the
    /// calibrated per-category threshold, else the calibrated global one.
    pub fn with_calibration(
        cfg: &PolicyConfig,
        calibrated: f32,
        calibrated_categories: &std::collections::BTreeMap<String, f32>,
    ) -> Self {
        let unsafe_threshold = cfg.unsafe_threshold.unwrap_or(calibrated);
        let mut thresholds = [unsafe_threshold; Category::COUNT];
        if cfg.unsafe_threshold.is_none() {
            for (name, t) in calibrated_categories {
                if let Some(c) = Category::parse(name) {
                    thresholds[c.index()] = *t;
                }
            }
        }
        let mut actions = [Action::Block; Category::COUNT];
        for (name, rule) in &cfg.categories {
            if let Some(c) = Category::parse(name) {
                actions[c.index()] = rule.action;
                if let Some(t) = rule.threshold {
                    thresholds[c.index()] = t;
                }
            }
        }
        let rules = format!(
            "{:?}|{unsafe_threshold}|{}|{thresholds:?}|{actions:?}",
            cfg.mode, cfg.caution_threshold
        );
        let digest = &crate::util::sha256_hex(rules.as_bytes())[..8];
        Self {
            version: format!("{}-{digest}", cfg.version),
            mode: cfg.mode,
            unsafe_threshold,
            caution_threshold: cfg.caution_threshold,
            thresholds,
            actions,
        }
    }

    pub fn decide(&self, s: &HeadScores) -> Decision {
        let top = s
            .category_probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let category = Category::ALL[top];
        let (label, action) = if s.unsafe_prob >= self.thresholds[top] {
            (Label::Unsafe, self.actions[top])
        } else if s.unsafe_prob >= self.caution_threshold.min(self.thresholds[top]) {
            (Label::Safe, Action::Caution)
        } else {
            (Label::Safe, Action::Allow)
        };
        let (action, observed_action) = match self.mode {
            Mode::Enforce => (action, None),
            Mode::Observe => (Action::Allow, Some(action)),
        };
        Decision {
            label,
            category: (label == Label::Unsafe).then_some(category),
            action,
            observed_action,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn scores(p: f32, cat: Category) -> HeadScores {
        let mut category_probs = [0.01; Category::COUNT];
        category_probs[cat.index()] = 0.91;
        HeadScores {
            unsafe_prob: p,
            category_probs,
        }
    }

    #[test]
    fn thresholds_and_actions() {
        let cfg = Config::embedded();
        let p = Policy::new(&cfg.policy, 0.5);
        let d = p.decide(&scores(0.9, Category::CrimeAdvice));
        assert_eq!(
            (d.label, d.category, d.action),
            (Label::Unsafe, Some(Category::CrimeAdvice), Action::Block)
        );
        let d = p.decide(&scores(0.9, Category::UncertainPrediction));
        assert_eq!(d.action, Action::Caution);
        let d = p.decide(&scores(0.4, Category::CrimeAdvice));
        assert_eq!(
            (d.label, d.category, d.action),
            (Label::Safe, None, Action::Caution)
        );
        let d = p.decide(&scores(0.1, Category::CrimeAdvice));
        assert_eq!((d.label, d.action), (Label::Safe, Action::Allow));
    }

    #[test]
    fn observe_mode_never_blocks_and_versions_differ() {
        let mut cfg = Config::embedded();
        let enforce = Policy::new(&cfg.policy, 0.5);
        cfg.policy.mode = Mode::Observe;
        let p = Policy::new(&cfg.policy, 0.5);
        let d = p.decide(&scores(0.99, Category::SelfHarmSuicide));
        assert_eq!(d.label, Label::Unsafe);
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.observed_action, Some(Action::Block));
        assert_ne!(p.version, enforce.version);
    }

    #[test]
    fn per_category_threshold_overrides() {
        let mut cfg = Config::embedded();
        cfg.policy
            .categories
            .get_mut("self_harm_suicide")
            .unwrap()
            .threshold = Some(0.2);
        let p = Policy::new(&cfg.policy, 0.5);
        assert_eq!(
            p.decide(&scores(0.25, Category::SelfHarmSuicide)).label,
            Label::Unsafe
        );
        assert_eq!(
            p.decide(&scores(0.25, Category::CrimeAdvice)).label,
            Label::Safe
        );
    }
}
