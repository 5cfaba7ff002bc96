//! The screening model: tokenizer, encoder and heads, loaded from the fetched cache.

pub mod device;
pub mod e5s1;
pub mod encoder;
pub mod fetch;
pub mod heads;
pub mod packed;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
pub use encoder::{Encoder, WeightFormat};
pub use heads::{HeadScores, Heads};
pub use tokenizer::{QueryTokenizer, Tokens};

/// Where the model comes from and how it runs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub home: PathBuf,
    pub weights: WeightFormat,
    pub max_tokens: usize,
    pub device: String,
    /// A heads directory (heads.safetensors + heads.json); `None` uses the heads built into the
    /// binary.
    pub heads: Option<PathBuf>,
}

/// The heads committed in `models/`, built into the binary so it runs without a checkout.
const EMBEDDED_HEADS: &[u8] = include_bytes!("../../models/heads.safetensors");
const EMBEDDED_META: &[u8] = include_bytes!("../../models/heads.json");

/// Which forward pass runs the encoder.
pub enum Backend {
    /// f32 weights on the CPU: packed sequences, no padding (the fast path).
    Packed(packed::PackedEncoder),
    /// The candle graph: Q4_0 weights, or any weights on a GPU.
    Graph(Encoder),
}

/// Tokenizer and encoder: everything up to the sentence embedding.
pub struct Embedder {
    pub tokenizer: QueryTokenizer,
    pub backend: Backend,
    /// Names the encoder weights and how they are held, e.g. `multilingual-e5-small/q4`.
    pub encoder_id: String,
    dims: e5s1::Dims,
    device: Device,
}

fn require(home: &Path, rel: &str) -> Result<PathBuf> {
    let p = fetch::models_dir(home).join(rel);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::ModelMissing {
            home: home.to_path_buf(),
            what: rel.to_string(),
        })
    }
}

impl Embedder {
    pub fn load(spec: &ModelSpec, device: &Device) -> Result<Self> {
        let weights = require(&spec.home, fetch::E5_WEIGHTS)?;
        let tok = require(&spec.home, fetch::E5_TOKENIZER)?;
        let t = std::time::Instant::now();
        let file = e5s1::E5s1::open(&weights)?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "read encoder weights");
        let t = std::time::Instant::now();
        let backend = match (spec.weights, device) {
            (WeightFormat::F32, Device::Cpu) => {
                Backend::Packed(packed::PackedEncoder::load(&file)?)
            }
            _ => Backend::Graph(Encoder::load(&file, spec.weights, device)?),
        };
        tracing::debug!(ms = t.elapsed().as_millis() as u64, weights = %spec.weights, "built encoder");
        let t = std::time::Instant::now();
        let tokenizer = QueryTokenizer::load(&tok, spec.max_tokens)?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "loaded tokenizer");
        Ok(Self {
            tokenizer,
            backend,
            encoder_id: format!("multilingual-e5-small/{}", spec.weights),
            dims: file.dims,
            device: device.clone(),
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.dims.hidden
    }

    /// Pads a batch of token sequences to its longest member and embeds it: `[batch, hidden]`.
    pub fn embed(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let seq = batch.iter().map(|t| t.len()).max().unwrap_or(0);
        if batch.is_empty() || seq == 0 {
            return Err(Error::Tokenizer("empty batch".into()));
        }
        let encoder = match &self.backend {
            Backend::Packed(p) => {
                let rows = p.embed(batch);
                let flat: Vec<f32> = rows.concat();
                return Ok(Tensor::from_vec(
                    flat,
                    (batch.len(), self.dims.hidden),
                    &self.device,
                )?);
            }
            Backend::Graph(e) => e,
        };
        let pad = self.dims.pad_id;
        let mut ids = Vec::with_capacity(batch.len() * seq);
        let mut mask = Vec::with_capacity(batch.len() * seq);
        for t in batch {
            ids.extend_from_slice(t);
            ids.extend(std::iter::repeat_n(pad, seq - t.len()));
            mask.extend(std::iter::repeat_n(1f32, t.len()));
            mask.extend(std::iter::repeat_n(0f32, seq - t.len()));
        }
        encoder.embed(&ids, &mask, batch.len(), seq)
    }

    /// Convenience for one-off texts (tests, training): tokenize and embed.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let toks = texts
            .iter()
            .map(|t| self.tokenizer.encode(t).map(|t| t.ids))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
        Ok(self
            .embed(&refs)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?)
    }
}

/// Embedder plus heads: token ids in, head scores out.
pub struct Model {
    pub embedder: Embedder,
    pub heads: Heads,
    /// Traces a verdict to the exact weights: encoder id plus the heads' digest.
    pub id: String,
    pub device: Device,
}

impl Model {
    pub fn load(spec: &ModelSpec) -> Result<Self> {
        let device = device::select(&spec.device)?;
        let embedder = Embedder::load(spec, &device)?;
        let heads = match &spec.heads {
            Some(dir) => Heads::load(dir, &device)?,
            None => Heads::from_bytes(EMBEDDED_HEADS, EMBEDDED_META, &device)?,
        };
        if heads.meta.hidden != embedder.hidden_size() {
            return Err(Error::Heads(format!(
                "heads expect {}-dim embeddings, the encoder gives {}",
                heads.meta.hidden,
                embedder.hidden_size()
            )));
        }
        let id = format!("{}+heads-{}", embedder.encoder_id, heads.meta.digest);
        Ok(Self {
            embedder,
            heads,
            id,
            device,
        })
    }

    pub fn score(&self, batch: &[&[u32]]) -> Result<Vec<HeadScores>> {
        let emb = self.embedder.embed(batch)?;
        self.heads.scores(&emb)
    }
}
