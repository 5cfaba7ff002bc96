//! The XLM-R SentencePiece tokenizer of multilingual-e5-small, with E5's `query: ` prefix and a
//! token limit. Padding is done per batch by the engine (pad id from the model header).

use std::path::Path;

use crate::error::{Error, Result};

/// E5 models were trained with a role prefix; queries take `query: `.
pub const QUERY_PREFIX: &str = "query: ";

pub struct QueryTokenizer {
    inner: tokenizers::Tokenizer,
    max_tokens: usize,
}

/// One query's token ids, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// The query was longer than the token limit and only its prefix was kept.
    pub truncated: bool,
}

impl QueryTokenizer {
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self> {
        if max_tokens < 8 {
            return Err(Error::Config(format!(
                "max_tokens = {max_tokens} is too small; use 8 or more (default 128)"
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self { inner, max_tokens })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn encode(&self, query: &str) -> Result<Tokens> {
        let text = format!("{QUERY_PREFIX}{query}");
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let truncated = ids.len() > self.max_tokens;
        if truncated {
            // Keep the closing special token (`</s>`), as the model saw in training.
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_tokens - 1);
            ids.push(last);
        }
        Ok(Tokens { ids, truncated })
    }
}
