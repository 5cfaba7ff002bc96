//! The harm taxonomy of "SLM as Guardian" (Kwon et al., 2024): three groups, ten categories.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    CrimeAdvice,
    PrivacyViolation,
    CopyrightInfringement,
    DiscriminationHate,
    InsultOffensive,
    SexualMinors,
    SelfHarmSuicide,
    UncertainPrediction,
    SensitiveBiased,
    MaliciousPersonification,
}

impl Category {
    pub const COUNT: usize = 10;
    pub const ALL: [Category; Self::COUNT] = [
        Category::CrimeAdvice,
        Category::PrivacyViolation,
        Category::CopyrightInfringement,
        Category::DiscriminationHate,
        Category::InsultOffensive,
        Category::SexualMinors,
        Category::SelfHarmSuicide,
        Category::UncertainPrediction,
        Category::SensitiveBiased,
        Category::MaliciousPersonification,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Category::CrimeAdvice => "crime_advice",
            Category::PrivacyViolation => "privacy_violation",
            Category::CopyrightInfringement => "copyright_infringement",
            Category::DiscriminationHate => "discrimination_hate",
            Category::InsultOffensive => "insult_offensive",
            Category::SexualMinors => "sexual_minors",
            Category::SelfHarmSuicide => "self_harm_suicide",
            Category::UncertainPrediction => "uncertain_prediction",
            Category::SensitiveBiased => "sensitive_biased",
            Category::MaliciousPersonification => "malicious_personification",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).expect("in ALL")
    }

    pub fn group(self) -> &'static str {
        match self {
            Category::CrimeAdvice
            | Category::PrivacyViolation
            | Category::CopyrightInfringement => "legal",
            Category::DiscriminationHate
            | Category::InsultOffensive
            | Category::SexualMinors
            | Category::SelfHarmSuicide => "ethical",
            _ => "etc",
        }
    }

    pub fn parse(s: &str) -> Option<Category> {
        Self::ALL.into_iter().find(|c| c.id() == s)
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_serde_agree() {
        for (i, c) in Category::ALL.into_iter().enumerate() {
            assert_eq!(Category::parse(c.id()), Some(c));
            assert_eq!(c.index(), i);
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.id())
            );
        }
        assert_eq!(Category::parse("safe"), None);
    }
}
