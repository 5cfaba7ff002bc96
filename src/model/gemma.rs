//! EmbeddingGemma-300M: Gemma3 text layers run bidirectionally (no causal mask, only the padding
//! mask and, on the sliding layers, a symmetric window), no LM head, then the
//! sentence-transformers head of the snapshot: mean pooling over the real tokens (prompt
//! included), 2_Dense (768 -> 3072), 3_Dense (3072 -> 768), L2 normalisation.
//!
//! Read from the snapshot that `guardian models fetch --backbone embeddinggemma-300m` extracts:
//! `config.json`, `model.safetensors` (fp32), `2_Dense/` and `3_Dense/`, `modules.json` and
//! `config_sentence_transformers.json` (the prompts). f32 throughout; every op is a candle op, so
//! the same code runs on a GPU.
//!
//! Gemma specifics, after Hugging Face's `Gemma3TextModel`: token embeddings are scaled by
//! sqrt(hidden); RMSNorm multiplies by (1 + weight); q and k are RMS-normalised per head before
//! RoPE; every layer has four norms (input, post-attention, pre- and post-feedforward); sliding
//! layers use `rope_local_base_freq`, full ones `rope_theta`; scores are scaled by
//! `query_pre_attn_scalar^-1/2`; the MLP is gated with tanh-approximated GELU.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The prompt the snapshot's sentence-transformers config gives classification inputs.
pub const PROMPT_NAME: &str = "Classification";

/// Added to the scores of keys a query may not attend to. Finite, so that a row with every key
/// masked (a padding row on a sliding layer) stays a number; such rows are never pooled.
const MASKED: f32 = -1e9;

/// The fields of `config.json` the forward pass reads.
#[derive(Debug, Clone, Deserialize)]
pub struct GemmaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub query_pre_attn_scalar: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_local_base_freq: f64,
    pub sliding_window: usize,
    #[serde(default)]
    pub layer_types: Vec<String>,
    /// Older configs give the pattern instead of `layer_types`: every Nth layer is full.
    #[serde(
        default,
        rename = "_sliding_window_pattern",
        alias = "sliding_window_pattern"
    )]
    pub sliding_window_pattern: Option<usize>,
    pub hidden_activation: String,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub use_bidirectional_attention: bool,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
}

impl GemmaConfig {
    /// Whether layer `l` is a sliding-window (local) layer.
    pub fn is_sliding(&self, l: usize) -> bool {
        match self.layer_types.get(l) {
            Some(t) => t == "sliding_attention",
            None => (l + 1) % self.sliding_window_pattern.unwrap_or(6) != 0,
        }
    }

    /// How far a sliding layer looks: positions i and j see each other when |i - j| < this.
    /// Hugging Face turns the configured (causal) window W into a symmetric one of W/2 + 1
    /// (exclusive) when attention is bidirectional.
    pub fn bidirectional_window(&self) -> usize {
        self.sliding_window / 2 + 1
    }

    fn check(&self) -> std::result::Result<(), String> {
        if !self.use_bidirectional_attention {
            return Err(
                "use_bidirectional_attention is not true: this is a causal Gemma, not \
                        EmbeddingGemma"
                    .into(),
            );
        }
        if !matches!(
            self.hidden_activation.as_str(),
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new"
        ) {
            return Err(format!(
                "hidden_activation {:?} is not supported (gelu_pytorch_tanh is)",
                self.hidden_activation
            ));
        }
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0
        {
            return Err(format!(
                "{} attention heads do not split into {} key/value groups",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.layer_types.is_empty() && self.layer_types.len() != self.num_hidden_layers {
            return Err(format!(
                "layer_types lists {} layers, num_hidden_layers is {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        Ok(())
    }
}

/// One sentence-transformers Dense module (`N_Dense/config.json` + `model.safetensors`).
#[derive(Debug, Deserialize)]
struct DenseConfig {
    in_features: usize,
    out_features: usize,
    bias: bool,
    activation_function: String,
}

#[derive(Debug, Deserialize)]
struct StModule {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

fn format_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::ModelFormat {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| format_err(path, e.to_string()))
}

/// The classification prompt from `config_sentence_transformers.json`, e.g.
/// `task: classification | query: `.
pub fn prompt(dir: &Path) -> Result<String> {
    let path = dir.join("config_sentence_transformers.json");
    let v: serde_json::Value = read_json(&path)?;
    v.get("prompts")
        .and_then(|p| p.get(PROMPT_NAME))
        .and_then(|p| p.as_str())
        .map(str::to_string)
        .ok_or_else(|| format_err(&path, format!("no prompts.{PROMPT_NAME}")))
}

/// `[batch, seq (queries), seq (keys)]` additive mask, flattened: padding keys are masked, and
/// with a window also keys at distance >= window (in both directions).
fn additive_mask(mask: &[f32], batch: usize, seq: usize, window: Option<usize>) -> Vec<f32> {
    let mut v = Vec::with_capacity(batch * seq * seq);
    for keys in mask.chunks(seq).take(batch) {
        for i in 0..seq {
            v.extend(keys.iter().enumerate().map(|(j, &k)| {
                if k == 0.0 || window.is_some_and(|w| i.abs_diff(j) >= w) {
                    MASKED
                } else {
                    0.0
                }
            }));
        }
    }
    v
}

struct RmsNorm {
    /// 1 + weight: Gemma's norm scales by (1 + w).
    alpha: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let w = vb.get(dim, "weight")?;
        Ok(Self {
            alpha: (w + 1.0)?,
            eps: eps as f32,
        })
    }

    /// Normalises over the last dimension.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.alpha, self.eps)
    }
}

/// cos and sin tables `[positions, head_dim / 2]` for rotate-half RoPE.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(base: f64, head_dim: usize, positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), device)?,
            sin: Tensor::from_vec(sin, (positions, half), device)?,
        })
    }

    /// The tables' rows for `positions` (packed sequences, each counting from 0).
    fn gather(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// `x` is `[batch, heads, seq, head_dim]`.
    fn apply(&self, x: &Tensor, seq: usize) -> candle_core::Result<Tensor> {
        let cos = self.cos.narrow(0, 0, seq)?;
        let sin = self.sin.narrow(0, 0, seq)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    pre_ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    sliding: bool,
}

fn linear(vb: VarBuilder, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let w = vb.get((out, inp), "weight")?;
    let b = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

impl Layer {
    fn load(vb: VarBuilder, c: &GemmaConfig, sliding: bool) -> Result<Self> {
        let (h, hd) = (c.hidden_size, c.head_dim);
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        let eps = c.rms_norm_eps;
        let bias = c.attention_bias;
        Ok(Self {
            q: linear(a.pp("q_proj"), c.num_attention_heads * hd, h, bias)?,
            k: linear(a.pp("k_proj"), c.num_key_value_heads * hd, h, bias)?,
            v: linear(a.pp("v_proj"), c.num_key_value_heads * hd, h, bias)?,
            o: linear(a.pp("o_proj"), h, c.num_attention_heads * hd, bias)?,
            q_norm: RmsNorm::load(a.pp("q_norm"), hd, eps)?,
            k_norm: RmsNorm::load(a.pp("k_norm"), hd, eps)?,
            gate: linear(m.pp("gate_proj"), c.intermediate_size, h, false)?,
            up: linear(m.pp("up_proj"), c.intermediate_size, h, false)?,
            down: linear(m.pp("down_proj"), h, c.intermediate_size, false)?,
            input_norm: RmsNorm::load(vb.pp("input_layernorm"), h, eps)?,
            post_attn_norm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, eps)?,
            pre_ffn_norm: RmsNorm::load(vb.pp("pre_feedforward_layernorm"), h, eps)?,
            post_ffn_norm: RmsNorm::load(vb.pp("post_feedforward_layernorm"), h, eps)?,
            sliding,
        })
    }
}

/// The encoder and its sentence-transformers head, ready to embed token batches.
pub struct GemmaEncoder {
    cfg: GemmaConfig,
    embed: Tensor,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    dense: Vec<Linear>,
    rope_local: Rope,
    rope_global: Rope,
    out_dim: usize,
    device: Device,
}

/// The modules the snapshot must chain (modules.json), in order, after the transformer.
const ST_CHAIN: [&str; 4] = ["Pooling", "Dense", "Dense", "Normalize"];

impl GemmaEncoder {
    /// Loads the snapshot in `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: GemmaConfig = read_json(&cfg_path)?;
        cfg.check().map_err(|r| format_err(&cfg_path, r))?;

        // The sentence-transformers chain this code implements; refuse anything else rather
        // than embed differently from the reference.
        let modules_path = dir.join("modules.json");
        let modules: Vec<StModule> = read_json(&modules_path)?;
        let kinds: Vec<&str> = modules
            .iter()
            .map(|m| m.kind.rsplit('.').next().unwrap_or(&m.kind))
            .collect();
        if kinds.len() != 1 + ST_CHAIN.len() || kinds[0] != "Transformer" || kinds[1..] != ST_CHAIN
        {
            return Err(format_err(
                &modules_path,
                format!("expected Transformer, Pooling, Dense, Dense, Normalize; found {kinds:?}"),
            ));
        }
        let pooling_path = dir.join(&modules[1].path).join("config.json");
        let pooling: serde_json::Value = read_json(&pooling_path)?;
        let flag = |k: &str| pooling.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        if !flag("pooling_mode_mean_tokens") || !flag("include_prompt") {
            return Err(format_err(
                &pooling_path,
                "only mean pooling over all tokens (prompt included) is supported",
            ));
        }

        let weights = dir.join("model.safetensors");
        // SAFETY: the file is a verified download that nothing rewrites while it is mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)? };
        let embed = vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| Layer::load(vb.pp(format!("layers.{l}")), &cfg, cfg.is_sliding(l)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;

        let mut dense = Vec::new();
        let mut width = cfg.hidden_size;
        for m in &modules[2..4] {
            let d = dir.join(&m.path);
            let dc: DenseConfig = read_json(&d.join("config.json"))?;
            if dc.in_features != width || !dc.activation_function.ends_with("Identity") {
                return Err(format_err(
                    &d.join("config.json"),
                    format!(
                        "expected a {width}-input Dense without activation, found {} inputs and {}",
                        dc.in_features, dc.activation_function
                    ),
                ));
            }
            let p = d.join("model.safetensors");
            // SAFETY: as above.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&p], DType::F32, device)? };
            dense.push(linear(
                vb.pp("linear"),
                dc.out_features,
                dc.in_features,
                dc.bias,
            )?);
            width = dc.out_features;
        }

        let positions = cfg.max_position_embeddings;
        Ok(Self {
            rope_local: Rope::new(cfg.rope_local_base_freq, cfg.head_dim, positions, device)?,
            rope_global: Rope::new(cfg.rope_theta, cfg.head_dim, positions, device)?,
            embed_scale: (cfg.hidden_size as f32).sqrt() as f64,
            embed,
            layers,
            norm,
            dense,
            out_dim: width,
            device: device.clone(),
            cfg,
        })
    }

    pub fn config(&self) -> &GemmaConfig {
        &self.cfg
    }

    /// Size of the sentence embedding (3_Dense's output).
    pub fn hidden_size(&self) -> usize {
        self.out_dim
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Additive attention masks `[batch, 1, seq, seq]` for the full and the sliding layers;
    /// `None` where nothing is masked.
    fn masks(
        &self,
        mask: &[f32],
        batch: usize,
        seq: usize,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let window = self.cfg.bidirectional_window();
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, (batch, 1, seq, seq), &self.device);
        let global = if mask.contains(&0.0) {
            Some(tensor(additive_mask(mask, batch, seq, None))?)
        } else {
            None
        };
        let local = if seq > window {
            Some(tensor(additive_mask(mask, batch, seq, Some(window)))?)
        } else {
            global.clone()
        };
        Ok((global, local))
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        batch: usize,
        seq: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let groups = nh / nkv;
        let rope = if layer.sliding {
            &self.rope_local
        } else {
            &self.rope_global
        };
        let heads = |t: Tensor, n: usize| t.reshape((batch, seq, n, hd))?.transpose(1, 2);
        let q = layer.q_norm.forward(&heads(layer.q.forward(x)?, nh)?)?;
        let k = layer.k_norm.forward(&heads(layer.k.forward(x)?, nkv)?)?;
        let v = heads(layer.v.forward(x)?, nkv)?.contiguous()?;
        let q = (rope.apply(&q, seq)? * (1.0 / c.query_pre_attn_scalar.sqrt()))?;
        let k = rope.apply(&k, seq)?;
        // Heads sharing a key/value head are stacked along the sequence: one matmul per group.
        let q = q.reshape((batch, nkv, groups * seq, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match c.attn_logit_softcapping {
            Some(cap) => ((scores / cap)?.tanh()? * cap)?,
            None => scores,
        };
        let scores = scores.reshape((batch, nh, seq, seq))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .reshape((batch, nkv, groups * seq, seq))?
            .matmul(&v)?
            .reshape((batch, nh, seq, hd))?
            .transpose(1, 2)?
            .reshape((batch * seq, nh * hd))?;
        layer.o.forward(&out)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = layer.gate.forward(x)?.gelu()?;
        let up = layer.up.forward(x)?;
        layer.down.forward(&(gate * up)?)
    }

    /// Token states after the final norm, `[batch * seq, hidden]`.
    fn hidden_states(&self, ids: &[u32], mask: &[f32], batch: usize, seq: usize) -> Result<Tensor> {
        if seq > self.cfg.max_position_embeddings {
            return Err(Error::Tokenizer(format!(
                "{seq} tokens exceed the encoder's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let ids_t = Tensor::from_slice(ids, batch * seq, &self.device)?;
        let mut x = (self.embed.index_select(&ids_t, 0)? * self.embed_scale)?;
        let (global, local) = self.masks(mask, batch, seq)?;
        for layer in &self.layers {
            let m = if layer.sliding { &local } else { &global };
            let a = self.attention(
                layer,
                &layer.input_norm.forward(&x)?,
                batch,
                seq,
                m.as_ref(),
            )?;
            x = (x + layer.post_attn_norm.forward(&a)?)?;
            let f = self.mlp(layer, &layer.pre_ffn_norm.forward(&x)?)?;
            x = (x + layer.post_ffn_norm.forward(&f)?)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Sentence embeddings `[batch, out_dim]`, L2-normalised. `ids` and `mask` are
    /// `batch * seq`, right-padded (mask 1 for real tokens, 0 for padding).
    pub fn embed(&self, ids: &[u32], mask: &[f32], batch: usize, seq: usize) -> Result<Tensor> {
        let h = self.cfg.hidden_size;
        let states = self
            .hidden_states(ids, mask, batch, seq)?
            .reshape((batch, seq, h))?;
        let m = Tensor::from_slice(mask, (batch, 1, seq), &self.device)?;
        let counts = m.sum_keepdim(D::Minus1)?.clamp(1.0, f64::MAX)?;
        let pooled = m
            .matmul(&states)?
            .broadcast_div(&counts)?
            .reshape((batch, h))?;
        self.project(pooled)
    }

    /// 2_Dense, 3_Dense and L2 normalisation of mean-pooled states `[batch, hidden]`.
    fn project(&self, pooled: Tensor) -> Result<Tensor> {
        let mut x = pooled;
        for d in &self.dense {
            x = d.forward(&x)?;
        }
        let norm = x
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(x.broadcast_div(&norm)?)
    }

    /// Sentence embeddings `[batch, out_dim]` of unpadded sequences, packed end to end: the
    /// projections and the MLP run on the real tokens only, attention runs per sequence. The
    /// same function as [`Self::embed`] without the padding's cost (the CPU path).
    pub fn embed_packed(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let c = &self.cfg;
        let longest = batch.iter().map(|t| t.len()).max().unwrap_or(0);
        if batch.is_empty() || batch.iter().any(|t| t.is_empty()) {
            return Err(Error::Tokenizer("empty sequence in the batch".into()));
        }
        if longest > c.max_position_embeddings {
            return Err(Error::Tokenizer(format!(
                "{longest} tokens exceed the encoder's {} positions",
                c.max_position_embeddings
            )));
        }
        let total: usize = batch.iter().map(|t| t.len()).sum();
        let ids: Vec<u32> = batch.iter().flat_map(|t| t.iter().copied()).collect();
        let positions: Vec<u32> = batch.iter().flat_map(|t| 0..t.len() as u32).collect();
        let positions = Tensor::from_vec(positions, total, &self.device)?;
        let rope_local = self.rope_local.gather(&positions)?;
        let rope_global = self.rope_global.gather(&positions)?;
        let mut spans = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for t in batch {
            spans.push((offset, t.len()));
            offset += t.len();
        }
        // Window masks, one per distinct length that passes the window.
        let window = c.bidirectional_window();
        let mut window_masks = std::collections::HashMap::new();
        for &(_, n) in &spans {
            if n > window && !window_masks.contains_key(&n) {
                let m = additive_mask(&vec![1.0; n], 1, n, Some(window));
                window_masks.insert(n, Tensor::from_vec(m, (1, 1, n, n), &self.device)?);
            }
        }

        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = (self.embed.index_select(&ids, 0)? * self.embed_scale)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let groups = nh / nkv;
        let scale = 1.0 / c.query_pre_attn_scalar.sqrt();
        for layer in &self.layers {
            let (cos, sin) = if layer.sliding {
                &rope_local
            } else {
                &rope_global
            };
            let h = layer.input_norm.forward(&x)?;
            let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
                t.reshape((1, total, n, hd))?.transpose(1, 2)
            };
            let rope = |t: Tensor| candle_nn::rotary_emb::rope(&t.contiguous()?, cos, sin);
            let q = rope(layer.q_norm.forward(&heads(layer.q.forward(&h)?, nh)?)?)?;
            let q = (q * scale)?;
            let k = rope(layer.k_norm.forward(&heads(layer.k.forward(&h)?, nkv)?)?)?;
            let v = heads(layer.v.forward(&h)?, nkv)?.contiguous()?;
            let mut outs = Vec::with_capacity(spans.len());
            for &(o, n) in &spans {
                let qi = q.narrow(2, o, n)?.reshape((1, nkv, groups * n, hd))?;
                let ki = k.narrow(2, o, n)?;
                let vi = v.narrow(2, o, n)?;
                let scores = qi.matmul(&ki.t()?)?;
                let scores = match c.attn_logit_softcapping {
                    Some(cap) => ((scores / cap)?.tanh()? * cap)?,
                    None => scores,
                };
                let scores = match (layer.sliding, window_masks.get(&n)) {
                    (true, Some(m)) => scores
                        .reshape((1, nh, n, n))?
                        .broadcast_add(m)?
                        .reshape((1, nkv, groups * n, n))?,
                    _ => scores,
                };
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let out = probs
                    .matmul(&vi.contiguous()?)?
                    .reshape((nh, n, hd))?
                    .transpose(0, 1)?
                    .reshape((n, nh * hd))?;
                outs.push(out);
            }
            let a = layer.o.forward(&Tensor::cat(&outs, 0)?)?;
            x = (x + layer.post_attn_norm.forward(&a)?)?;
            let f = self.mlp(layer, &layer.pre_ffn_norm.forward(&x)?)?;
            x = (x + layer.post_ffn_norm.forward(&f)?)?;
        }
        let x = self.norm.forward(&x)?;
        // Mean pooling as one matmul: row b averages the tokens of sequence b.
        let mut pool = vec![0f32; batch.len() * total];
        for (b, &(o, n)) in spans.iter().enumerate() {
            pool[b * total + o..b * total + o + n].fill(1.0 / n as f32);
        }
        let pool = Tensor::from_vec(pool, (batch.len(), total), &self.device)?;
        self.project(pool.matmul(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window: usize) -> GemmaConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "query_pre_attn_scalar": 4, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "rope_local_base_freq": 1e4, "sliding_window": window,
            "layer_types": ["sliding_attention", "full_attention"],
            "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 10,
            "max_position_embeddings": 32, "use_bidirectional_attention": true
        }))
        .unwrap()
    }

    #[test]
    fn layer_types_and_window_follow_the_config() {
        let c = config(512);
        assert!(c.is_sliding(0) && !c.is_sliding(1));
        assert_eq!(c.bidirectional_window(), 257);
        c.check().unwrap();
        let mut causal = c.clone();
        causal.use_bidirectional_attention = false;
        assert!(causal.check().unwrap_err().contains("causal"));
        let mut pattern = c.clone();
        pattern.layer_types.clear();
        pattern.sliding_window_pattern = Some(6);
        assert!(pattern.is_sliding(4) && !pattern.is_sliding(5));
    }

    #[test]
    fn masks_hide_padding_and_far_keys_in_both_directions() {
        // One sequence of 4 real tokens and one of 2 (padded to 4), window 2 (|i - j| < 2).
        let mask = [1., 1., 1., 1., 1., 1., 0., 0.];
        let full = additive_mask(&mask, 2, 4, None);
        let local = additive_mask(&mask, 2, 4, Some(2));
        let at = |v: &[f32], b: usize, i: usize, j: usize| v[b * 16 + i * 4 + j];
        assert_eq!(at(&full, 0, 0, 3), 0.0, "no causal mask: 0 sees 3");
        assert_eq!(at(&full, 0, 3, 0), 0.0);
        assert_eq!(at(&full, 1, 0, 2), MASKED, "padding key");
        assert_eq!(at(&full, 1, 1, 0), 0.0);
        assert_eq!(at(&local, 0, 0, 1), 0.0);
        assert_eq!(at(&local, 0, 1, 0), 0.0, "the window looks backwards too");
        assert_eq!(at(&local, 0, 0, 2), MASKED);
        assert_eq!(at(&local, 0, 3, 1), MASKED);
        assert_eq!(at(&local, 1, 1, 2), MASKED, "padding inside the window");
    }

    #[test]
    fn rms_norm_scales_by_one_plus_weight() {
        let dev = Device::Cpu;
        let n = RmsNorm {
            alpha: (Tensor::new(&[0f32, 1.0], &dev).unwrap() + 1.0).unwrap(),
            eps: 0.0,
        };
        let y = n
            .forward(&Tensor::new(&[[3f32, 4.0]], &dev).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // rms = sqrt((9 + 16) / 2); weights 0 and 1 scale by 1 and 2.
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 3.0 / rms).abs() < 1e-6 && (y[0][1] - 8.0 / rms).abs() < 1e-6);
    }
}
