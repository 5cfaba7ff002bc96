//! The screening model: tokenizer, encoder and heads, loaded from the fetched cache.

pub mod backbone;
pub mod device;
pub mod e5s1;
pub mod encoder;
pub mod fetch;
pub mod gemma;
pub mod heads;
pub mod lexical;
pub mod packed;
pub mod second;
pub mod tokenizer;
pub mod tuned;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
pub use backbone::Backbone;
pub use encoder::{Encoder, WeightFormat};
pub use heads::{HeadScores, Heads};
pub use tokenizer::{QueryTokenizer, Tokens};

/// Where the model comes from and how it runs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub home: PathBuf,
    /// The pretrained encoder under the heads.
    pub backbone: Backbone,
    pub weights: WeightFormat,
    pub max_tokens: usize,
    pub device: String,
    /// A heads directory (heads.safetensors + heads.json); `None` uses the heads built into the
    /// binary.
    pub heads: Option<PathBuf>,
    /// A second model for the queries the first is unsure of; `None`: the first decides alone.
    pub second_opinion: Option<second::SecondOpinionSpec>,
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
    /// EmbeddingGemma-300M (f32, candle graph; packed sequences on the CPU, padded batches on
    /// a GPU).
    Gemma(gemma::GemmaEncoder),
}

/// Tokenizer and encoder: everything up to the sentence embedding.
pub struct Embedder {
    pub tokenizer: QueryTokenizer,
    pub backend: Backend,
    /// Names the encoder weights and how they are held, e.g. `multilingual-e5-small/q4` or
    /// `embeddinggemma-300m/f32`; the part before `/` is the backbone's family.
    pub encoder_id: String,
    pub backbone: Backbone,
    dims: e5s1::Dims,
    device: Device,
}

fn require(home: &Path, rel: &str, backbone: Backbone) -> Result<PathBuf> {
    let p = fetch::models_dir(home).join(rel);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::ModelMissing {
            home: home.to_path_buf(),
            what: rel.to_string(),
            fetch: backbone.fetch_command().to_string(),
        })
    }
}

/// Reads fine-tuned layers given the open pretrained e5-small weights file.
pub type TunedSource<'a> = dyn Fn(&e5s1::E5s1) -> Result<Vec<(usize, tuned::LayerWeights)>> + 'a;

impl Embedder {
    /// Loads the tokenizer and encoder of `spec.backbone`.
    pub fn load(spec: &ModelSpec, device: &Device) -> Result<Self> {
        Self::load_tuned(spec, device, &|_| Ok(Vec::new()))
    }

    /// As [`Embedder::load`], then swaps in the fine-tuned layers `tuned` reads (e5-small
    /// only). `tuned` gets the pretrained weights file while it is open, because tuned layers
    /// are stored as changes from it: one read of the file serves both.
    pub fn load_tuned(spec: &ModelSpec, device: &Device, tuned: &TunedSource<'_>) -> Result<Self> {
        match spec.backbone {
            Backbone::E5Small => Self::load_e5(spec, device, tuned),
            Backbone::EmbeddingGemma300m => Self::load_gemma(spec, device),
        }
    }

    fn load_gemma(spec: &ModelSpec, device: &Device) -> Result<Self> {
        let backbone = Backbone::EmbeddingGemma300m;
        if spec.weights != WeightFormat::F32 {
            return Err(Error::Config(format!(
                "{backbone} comes as f32 safetensors and runs with --weights f32 only \
                 (--weights {} applies to e5-small)",
                spec.weights
            )));
        }
        let weights = require(&spec.home, fetch::GEMMA_WEIGHTS, backbone)?;
        let tok = require(&spec.home, fetch::GEMMA_TOKENIZER, backbone)?;
        let dir = weights.parent().expect("a file in the model directory");
        let t = std::time::Instant::now();
        let enc = gemma::GemmaEncoder::load(dir, device)?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "loaded EmbeddingGemma");
        let tokenizer = QueryTokenizer::with_prefix(&tok, spec.max_tokens, &gemma::prompt(dir)?)?;
        let c = enc.config();
        let dims = e5s1::Dims {
            hidden: enc.hidden_size(),
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            ffn: c.intermediate_size,
            vocab: c.vocab_size,
            max_positions: c.max_position_embeddings,
            token_types: 0,
            pad_id: c.pad_token_id,
        };
        Ok(Self {
            tokenizer,
            backend: Backend::Gemma(enc),
            encoder_id: format!("{}/{}", backbone.family(), spec.weights),
            backbone,
            dims,
            device: device.clone(),
        })
    }

    fn load_e5(spec: &ModelSpec, device: &Device, tuned: &TunedSource<'_>) -> Result<Self> {
        let backbone = Backbone::E5Small;
        let weights = require(&spec.home, fetch::E5_WEIGHTS, backbone)?;
        let tok = require(&spec.home, fetch::E5_TOKENIZER, backbone)?;
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
        let mut embedder = Self {
            tokenizer,
            backend,
            encoder_id: format!("{}/{}", backbone.family(), spec.weights),
            backbone,
            dims: file.dims,
            device: device.clone(),
        };
        embedder.apply_tuned(&tuned(&file)?)?;
        Ok(embedder)
    }

    pub fn hidden_size(&self) -> usize {
        self.dims.hidden
    }

    pub fn dims(&self) -> e5s1::Dims {
        self.dims
    }

    /// Replaces pretrained layers with the fine-tuned ones shipped in a heads file.
    pub fn apply_tuned(&mut self, layers: &[(usize, tuned::LayerWeights)]) -> Result<()> {
        for (l, w) in layers {
            match &mut self.backend {
                Backend::Packed(p) => p.replace_layer(*l, w),
                Backend::Graph(e) => e.replace_layer(*l, w)?,
                Backend::Gemma(_) => {
                    return Err(Error::Heads(format!(
                        "the heads carry fine-tuned e5-small layers; {} cannot take them",
                        self.encoder_id
                    )))
                }
            }
        }
        Ok(())
    }

    /// Pads a batch of token sequences to its longest member and embeds it: `[batch, hidden]`.
    pub fn embed(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let seq = batch.iter().map(|t| t.len()).max().unwrap_or(0);
        if batch.is_empty() || seq == 0 {
            return Err(Error::Tokenizer("empty batch".into()));
        }
        let pad = self.dims.pad_id;
        let padded = || {
            let mut ids = Vec::with_capacity(batch.len() * seq);
            let mut mask = Vec::with_capacity(batch.len() * seq);
            for t in batch {
                ids.extend_from_slice(t);
                ids.extend(std::iter::repeat_n(pad, seq - t.len()));
                mask.extend(std::iter::repeat_n(1f32, t.len()));
                mask.extend(std::iter::repeat_n(0f32, seq - t.len()));
            }
            (ids, mask)
        };
        match &self.backend {
            Backend::Packed(p) => {
                let rows = p.embed(batch);
                let flat: Vec<f32> = rows.concat();
                Ok(Tensor::from_vec(
                    flat,
                    (batch.len(), self.dims.hidden),
                    &self.device,
                )?)
            }
            Backend::Graph(e) => {
                let (ids, mask) = padded();
                e.embed(&ids, &mask, batch.len(), seq)
            }
            // On the CPU, packed sequences (no work on padding); elsewhere one padded graph.
            Backend::Gemma(g) if g.device().is_cpu() => g.embed_packed(batch),
            Backend::Gemma(g) => {
                let (ids, mask) = padded();
                g.embed(&ids, &mask, batch.len(), seq)
            }
        }
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
    /// Traces a verdict to the exact weights: encoder id plus the heads' digest (and the second
    /// opinion's, when there is one).
    pub id: String,
    pub device: Device,
    pub second: Option<Box<second::SecondOpinion>>,
}

impl Model {
    pub fn load(spec: &ModelSpec) -> Result<Self> {
        let device = device::select(&spec.device)?;
        // One read of the heads file: the heads and the tuned encoder layers both come from it.
        let (bytes, meta) = match &spec.heads {
            Some(dir) => {
                let read = |name: &str| {
                    let p = dir.join(name);
                    std::fs::read(&p).map_err(|e| Error::io(p, e))
                };
                (
                    std::borrow::Cow::Owned(read("heads.safetensors")?),
                    std::borrow::Cow::Owned(read("heads.json")?),
                )
            }
            None => (
                std::borrow::Cow::Borrowed(EMBEDDED_HEADS),
                std::borrow::Cow::Borrowed(EMBEDDED_META),
            ),
        };
        let heads = Heads::from_bytes(&bytes, &meta, &device)?;
        let tuned = |file: &e5s1::E5s1| {
            let base = |l: usize| tuned::LayerWeights::from_e5s1(file, l);
            tuned::load_layers(&bytes, &heads.meta.tuned_layers, &file.dims, &base)
        };
        let embedder = Embedder::load_tuned(spec, &device, &tuned)?;
        check_heads_backbone(&heads.meta.encoder, &embedder, spec.heads.as_deref())?;
        if heads.meta.hidden != embedder.hidden_size() {
            return Err(Error::Heads(format!(
                "heads expect {}-dim embeddings, the encoder gives {}",
                heads.meta.hidden,
                embedder.hidden_size()
            )));
        }
        let mut id = format!("{}+heads-{}", embedder.encoder_id, heads.meta.digest);
        let second = match &spec.second_opinion {
            Some(s) => {
                let so = second::SecondOpinion::load(spec, heads.meta.unsafe_threshold, s)?;
                // The band and weights change verdicts, so they are part of the id (and the
                // cache key) too.
                let rule = format!("{}|{}|{}|{}", s.band_low, s.band_high, s.weight, s.offset);
                id.push_str(&format!(
                    "+second-{}-{}",
                    so.model.id,
                    &crate::util::sha256_hex(rule.as_bytes())[..8]
                ));
                Some(Box::new(so))
            }
            None => None,
        };
        Ok(Self {
            embedder,
            heads,
            id,
            device,
            second,
        })
    }

    /// The backbone the heads of `spec` (its heads directory, or the built-in heads) were
    /// trained for, from their heads.json; `None` if it names no known encoder.
    pub fn heads_backbone(spec: &ModelSpec) -> Result<Option<Backbone>> {
        let json = match &spec.heads {
            Some(dir) => {
                let p = dir.join("heads.json");
                std::borrow::Cow::Owned(std::fs::read(&p).map_err(|e| Error::io(p, e))?)
            }
            None => std::borrow::Cow::Borrowed(EMBEDDED_META),
        };
        let v: serde_json::Value = serde_json::from_slice(&json)
            .map_err(|e| Error::Heads(format!("heads.json is invalid: {e}")))?;
        Ok(v.get("encoder")
            .and_then(|e| e.as_str())
            .and_then(Backbone::from_encoder_id))
    }

    /// The embedder of `spec` under untrained (all-zero) heads of the right width, for
    /// throughput measurements of a backbone that has no trained heads yet: the heads cost the
    /// same, but every verdict is the same meaningless one.
    pub fn with_stand_in_heads(spec: &ModelSpec) -> Result<Self> {
        let device = device::select(&spec.device)?;
        let embedder = Embedder::load(spec, &device)?;
        let meta: heads::HeadsMeta = serde_json::from_value(serde_json::json!({
            "encoder": embedder.encoder_id,
            "hidden": embedder.hidden_size(),
            "trunk": 512,
            "categories": crate::taxonomy::Category::ALL.map(|c| c.id()),
            "unsafe_threshold": 0.5,
            "digest": "stand-in",
        }))
        .map_err(|e| Error::Heads(format!("stand-in heads: {e}")))?;
        let vb = candle_nn::VarBuilder::zeros(candle_core::DType::F32, &device);
        let heads = Heads::build(vb, meta)?;
        let id = format!("{}+heads-stand-in", embedder.encoder_id);
        Ok(Self {
            embedder,
            heads,
            id,
            device,
            second: None,
        })
    }

    /// The first model's scores of a batch of token ids.
    pub fn score(&self, batch: &[&[u32]]) -> Result<Vec<HeadScores>> {
        let emb = self.embedder.embed(batch)?;
        let offsets = self.heads.lexical_offsets(batch);
        self.heads.scores(&emb, offsets.as_deref())
    }

    /// The verdict scores of a batch: the first model's, revised by the second opinion (which
    /// tokenizes `texts` itself) where it is configured. Also returns how many queries were
    /// escalated to it.
    pub fn screen(&self, batch: &[&[u32]], texts: &[&str]) -> Result<(Vec<HeadScores>, usize)> {
        let mut scores = self.score(batch)?;
        let escalated = match &self.second {
            Some(s) => s.revise(&mut scores, texts)?,
            None => 0,
        };
        Ok((scores, escalated))
    }
}

/// Heads read the embeddings of the encoder they were trained on: refuse any other backbone.
/// (f32 and q4 of one backbone share heads.)
fn check_heads_backbone(
    heads_encoder: &str,
    embedder: &Embedder,
    dir: Option<&Path>,
) -> Result<()> {
    let trained = Backbone::from_encoder_id(heads_encoder);
    if trained == Some(embedder.backbone) {
        return Ok(());
    }
    let which = match dir {
        Some(d) => format!("the heads in {}", d.display()),
        None => "the heads built into this binary".to_string(),
    };
    let run = embedder.backbone;
    Err(Error::Heads(match trained {
        Some(b) => format!(
            "{which} were trained for the {b} backbone (encoder {heads_encoder}), but the model \
             runs {run} ({}). Use --backbone {b} (GUARDIAN_BACKBONE, model.backbone), or train \
             heads for {run} with `guardian train --backbone {run} --out DIR` and pass --heads DIR",
            embedder.encoder_id
        ),
        None => format!(
            "{which} were trained on encoder {heads_encoder:?}, which is no known backbone; the \
             model runs {run} ({}). Train heads for it with `guardian train --backbone {run}`",
            embedder.encoder_id
        ),
    }))
}
