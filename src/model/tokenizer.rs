//! The backbone's tokenizer with its role prefix and a token limit: multilingual-e5-small's XLM-R
//! SentencePiece with E5's `query: `, or EmbeddingGemma's Gemma tokenizer with the snapshot's
//! classification prompt. Padding is done per batch by the engine (pad id from the model).

use std::path::Path;

use crate::error::{Error, Result};

/// E5 models were trained with a role prefix; queries take `query: `.
pub const QUERY_PREFIX: &str = "query: ";

pub struct QueryTokenizer {
    inner: tokenizers::Tokenizer,
    max_tokens: usize,
    prefix: String,
}

/// One query's token ids, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// The query was longer than the token limit and only its prefix was kept.
    pub truncated: bool,
}

impl QueryTokenizer {
    /// multilingual-e5-small's tokenizer: queries take [`QUERY_PREFIX`].
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self> {
        Self::with_prefix(path, max_tokens, QUERY_PREFIX)
    }

    /// A tokenizer whose queries are prefixed with `prefix` (a role or task prompt).
    pub fn with_prefix(path: &Path, max_tokens: usize, prefix: &str) -> Result<Self> {
        if max_tokens < 8 {
            return Err(Error::Config(format!(
                "max_tokens = {max_tokens} is too small; use 8 or more (default 128)"
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self {
            inner,
            max_tokens,
            prefix: prefix.to_string(),
        })
    }

    /// What each query is prefixed with before tokenizing.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn encode(&self, query: &str) -> Result<Tokens> {
        let text = format!("{}{query}", self.prefix);
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let truncated = ids.len() > self.max_tokens;
        if truncated {
            // Keep the closing special token (`</s>`, `<eos>`), as the model saw in training.
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_tokens - 1);
            ids.push(last);
        }
        Ok(Tokens { ids, truncated })
    }
}
