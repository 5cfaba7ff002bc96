//! Which pretrained sentence encoder sits under the heads: multilingual-e5-small (the default:
//! small, fast) or EmbeddingGemma-300M (stronger across Korean and English, about 5x the
//! compute per token).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Backbone {
    /// intfloat/multilingual-e5-small: 12 BERT layers, 384 dims, Q4_0 weights from the E5S1
    /// container (`query: ` prefix).
    #[default]
    #[serde(rename = "e5-small", alias = "multilingual-e5-small")]
    E5Small,
    /// google/embeddinggemma-300m: 24 bidirectional Gemma3 layers, 768 dims, fp32 safetensors
    /// (`task: classification | query: ` prompt).
    #[serde(rename = "embeddinggemma-300m", alias = "embeddinggemma")]
    EmbeddingGemma300m,
}

impl Backbone {
    pub const ALL: [Backbone; 2] = [Backbone::E5Small, Backbone::EmbeddingGemma300m];

    /// The name used in config, flags and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Backbone::E5Small => "e5-small",
            Backbone::EmbeddingGemma300m => "embeddinggemma-300m",
        }
    }

    /// The first part of [`super::Embedder::encoder_id`] (`FAMILY/format`), as recorded in the
    /// `encoder` field of heads.json.
    pub fn family(self) -> &'static str {
        match self {
            Backbone::E5Small => "multilingual-e5-small",
            Backbone::EmbeddingGemma300m => "embeddinggemma-300m",
        }
    }

    /// The backbone an encoder id (e.g. `multilingual-e5-small/f32`) belongs to.
    pub fn from_encoder_id(id: &str) -> Option<Self> {
        let family = id.split('/').next().unwrap_or(id);
        Self::ALL.into_iter().find(|b| b.family() == family)
    }

    /// Size of the sentence embedding.
    pub fn hidden_size(self) -> usize {
        match self {
            Backbone::E5Small => 384,
            Backbone::EmbeddingGemma300m => 768,
        }
    }

    /// Multiply-adds x 2 per token of the transformer layers (embedding lookups excluded), for
    /// the benchmark's arithmetic ceiling. e5-small: 21M non-embedding parameters. EmbeddingGemma:
    /// 24 layers of q 768x768, k and v 768x256, o 768x768 and a gated FFN 3 x 768x1152, i.e.
    /// 101M parameters (the 2_Dense/3_Dense projections, 4.7M, run once per query).
    pub fn flops_per_token(self) -> f64 {
        match self {
            Backbone::E5Small => 42e6,
            Backbone::EmbeddingGemma300m => 203e6,
        }
    }

    /// The command that downloads this backbone's files.
    pub fn fetch_command(self) -> &'static str {
        match self {
            Backbone::E5Small => "guardian models fetch",
            Backbone::EmbeddingGemma300m => "guardian models fetch --backbone embeddinggemma-300m",
        }
    }
}

impl std::str::FromStr for Backbone {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "e5-small" | "multilingual-e5-small" => Ok(Self::E5Small),
            "embeddinggemma-300m" | "embeddinggemma" => Ok(Self::EmbeddingGemma300m),
            other => Err(format!(
                "unknown backbone {other:?}; use e5-small or embeddinggemma-300m"
            )),
        }
    }
}

impl std::fmt::Display for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_families_resolve() {
        for b in Backbone::ALL {
            assert_eq!(b.as_str().parse::<Backbone>().unwrap(), b);
            assert_eq!(
                Backbone::from_encoder_id(&format!("{}/f32", b.family())),
                Some(b)
            );
            let t: toml::Value = toml::from_str(&format!("b = \"{b}\"")).unwrap();
            let back: Backbone = t["b"].clone().try_into().unwrap();
            assert_eq!(back, b);
        }
        assert_eq!(
            Backbone::from_encoder_id("multilingual-e5-small/q4"),
            Some(Backbone::E5Small)
        );
        assert_eq!(Backbone::from_encoder_id("bert-base/f32"), None);
        let e = "gemma".parse::<Backbone>().unwrap_err();
        assert!(e.contains("embeddinggemma-300m"), "{e}");
    }
}
