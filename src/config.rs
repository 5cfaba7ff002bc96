//! Typed configuration. The embedded default is `config/guardian.toml`; `--config FILE` replaces
//! it; CLI flags (each with a GUARDIAN_* env fallback) override single keys. `validate` says
//! which key is wrong and what it accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Backbone, WeightFormat};
use crate::taxonomy::Category;

pub const EMBEDDED_DEFAULT: &str = include_str!("../config/guardian.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub engine: EngineConfig,
    pub screen: ScreenConfig,
    pub policy: PolicyConfig,
    pub responses: ResponsesConfig,
    pub serve: ServeConfig,
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub home: String,
    /// Absent in files written before there was a choice: e5-small.
    #[serde(default)]
    pub backbone: Backbone,
    pub weights: WeightFormat,
    pub max_tokens: usize,
    pub device: String,
    pub heads: String,
    /// Absent: the first model decides alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_opinion: Option<SecondOpinionConfig>,
}

/// `[model.second_opinion]`: a second model (EmbeddingGemma-300M heads) for the queries whose
/// first unsafe probability is in the band; see `model::second`. Keys left out take the
/// measured settings; an empty or missing `heads` is refused by `validate`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecondOpinionConfig {
    /// Heads directory trained for embeddinggemma-300m (e.g. `models/second-opinion`).
    pub heads: String,
    pub band_low: f32,
    pub band_high: f32,
    pub weight: f32,
    pub offset: f32,
}

impl Default for SecondOpinionConfig {
    fn default() -> Self {
        Self::measured("")
    }
}

impl SecondOpinionConfig {
    /// The measured settings, for heads in `dir`.
    pub fn measured(dir: &str) -> Self {
        let m = crate::model::second::SecondOpinionSpec::measured(dir.into());
        Self {
            heads: dir.to_string(),
            band_low: m.band_low,
            band_high: m.band_high,
            weight: m.weight,
            offset: m.offset,
        }
    }

    pub fn spec(&self) -> crate::model::second::SecondOpinionSpec {
        crate::model::second::SecondOpinionSpec {
            heads: PathBuf::from(&self.heads),
            backbone: Backbone::EmbeddingGemma300m,
            band_low: self.band_low,
            band_high: self.band_high,
            weight: self.weight,
            offset: self.offset,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_wait_ms: u64,
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenConfig {
    pub max_query_chars: usize,
    pub cache_capacity: usize,
    pub dead_letter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Observe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Caution,
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Caution => "caution",
            Action::Block => "block",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryRule {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub version: String,
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsafe_threshold: Option<f32>,
    pub caution_threshold: f32,
    pub categories: BTreeMap<String, CategoryRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResponsesConfig {
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditQuery {
    Sha256,
    Text,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub batch_size: usize,
    pub batch_wait_ms: u64,
    pub max_in_flight: usize,
    pub resume_in_flight: usize,
    pub commit_interval_ms: u64,
    pub revoke_drain_ms: u64,
    pub shutdown_timeout_ms: u64,
    pub audit_query: AuditQuery,
    pub admin_addr: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group: String,
    pub input_topic: String,
    pub verdict_topic: String,
    pub audit_topic: String,
    pub dlq_topic: String,
    pub session_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub message_timeout_ms: u64,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    pub ttl_s: u64,
    pub timeout_ms: u64,
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp_endpoint: String,
    pub service_name: String,
}

/// Lays `over` onto `base`: tables merge key by key, any other value replaces.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn bad(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("{key}: {msg}"))
}

impl Config {
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_DEFAULT, "embedded config/guardian.toml")
            .expect("the embedded default config is valid")
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The embedded default, with the keys of `path` laid over it: a file names only what it
    /// changes, and a file written for an older release still loads when new tables appear.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            None => Ok(Self::embedded()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                Self::parse_over_default(&text, &p.display().to_string())
            }
        }
    }

    pub fn parse_over_default(text: &str, origin: &str) -> Result<Self> {
        let over: toml::Table =
            toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        let mut merged: toml::Table =
            toml::from_str(EMBEDDED_DEFAULT).expect("the embedded default config is TOML");
        merge_tables(&mut merged, over);
        let cfg: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        if !(8..=512).contains(&m.max_tokens) {
            return Err(bad(
                "model.max_tokens",
                format!("{} is outside 8..=512", m.max_tokens),
            ));
        }
        crate::model::device::parse_spec(&m.device).map_err(|e| bad("model.device", e))?;
        if let Some(so) = &m.second_opinion {
            if so.heads.is_empty() {
                return Err(bad(
                    "model.second_opinion.heads",
                    "is empty: name the heads directory trained for embeddinggemma-300m",
                ));
            }
            if m.backbone != Backbone::E5Small {
                return Err(bad(
                    "model.second_opinion",
                    "asks EmbeddingGemma for a second opinion on e5-small's verdicts; with \
                     backbone embeddinggemma-300m, remove the table",
                ));
            }
            so.spec().validate()?;
        }
        if m.backbone == Backbone::EmbeddingGemma300m && m.weights != WeightFormat::F32 {
            return Err(bad(
                "model.weights",
                format!(
                    "{} with backbone {}: it comes as f32 safetensors; use weights = \"f32\"",
                    m.weights, m.backbone
                ),
            ));
        }
        let e = &self.engine;
        if e.max_batch_size == 0 || e.max_batch_size > 4096 {
            return Err(bad("engine.max_batch_size", "must be 1..=4096"));
        }
        if e.max_batch_tokens < m.max_tokens {
            return Err(bad(
                "engine.max_batch_tokens",
                format!(
                    "{} is smaller than model.max_tokens ({}): a single long query would not fit",
                    e.max_batch_tokens, m.max_tokens
                ),
            ));
        }
        if e.queue_capacity == 0 {
            return Err(bad("engine.queue_capacity", "must be at least 1"));
        }
        if self.screen.max_query_chars == 0 {
            return Err(bad("screen.max_query_chars", "must be at least 1"));
        }
        if self.screen.dead_letter.trim().is_empty() {
            return Err(bad("screen.dead_letter", "use \"stderr\" or a file path"));
        }
        let p = &self.policy;
        if p.version.trim().is_empty() {
            return Err(bad("policy.version", "must not be empty"));
        }
        let in_unit = |k: &str, v: f32| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(bad(k, format!("{v} is not a probability in [0, 1]")))
            }
        };
        if let Some(t) = p.unsafe_threshold {
            in_unit("policy.unsafe_threshold", t)?;
        }
        in_unit("policy.caution_threshold", p.caution_threshold)?;
        for (name, rule) in &p.categories {
            if Category::parse(name).is_none() {
                return Err(bad(
                    &format!("policy.categories.{name}"),
                    format!(
                        "unknown category; use one of {}",
                        Category::ALL.map(|c| c.id()).join(", ")
                    ),
                ));
            }
            if let Some(t) = rule.threshold {
                in_unit(&format!("policy.categories.{name}.threshold"), t)?;
            }
            if rule.action == Action::Allow {
                return Err(bad(
                    &format!("policy.categories.{name}.action"),
                    "an unsafe verdict must be \"block\" or \"caution\"; use mode = \"observe\" to never block",
                ));
            }
        }
        self.validate_serve()
    }

    fn validate_serve(&self) -> Result<()> {
        let s = &self.serve;
        if !(1..=8192).contains(&s.batch_size) {
            return Err(bad("serve.batch_size", "must be 1..=8192"));
        }
        if s.max_in_flight < s.batch_size {
            return Err(bad(
                "serve.max_in_flight",
                format!(
                    "{} is below serve.batch_size ({})",
                    s.max_in_flight, s.batch_size
                ),
            ));
        }
        if s.resume_in_flight >= s.max_in_flight {
            return Err(bad(
                "serve.resume_in_flight",
                "must be below serve.max_in_flight, or the consumer would never resume",
            ));
        }
        if s.commit_interval_ms == 0 {
            return Err(bad("serve.commit_interval_ms", "must be at least 1"));
        }
        if !s.admin_addr.is_empty() && s.admin_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "serve.admin_addr",
                format!(
                    "{:?} is not HOST:PORT (e.g. 0.0.0.0:9464); empty turns it off",
                    s.admin_addr
                ),
            ));
        }
        let k = &self.kafka;
        for (key, v) in [
            ("kafka.brokers", &k.brokers),
            ("kafka.group", &k.group),
            ("kafka.input_topic", &k.input_topic),
            ("kafka.verdict_topic", &k.verdict_topic),
            ("kafka.audit_topic", &k.audit_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
        ] {
            if v.trim().is_empty() {
                return Err(bad(key, "must not be empty"));
            }
        }
        let outputs = [&k.verdict_topic, &k.audit_topic, &k.dlq_topic];
        if outputs.contains(&&k.input_topic) {
            return Err(bad(
                "kafka.input_topic",
                "must differ from the verdict, audit and dead-letter topics (the worker would read its own output)",
            ));
        }
        if k.heartbeat_interval_ms == 0 || k.heartbeat_interval_ms >= k.session_timeout_ms {
            return Err(bad(
                "kafka.heartbeat_interval_ms",
                "must be above 0 and below kafka.session_timeout_ms",
            ));
        }
        let r = &self.redis;
        let redis_scheme = r.url.starts_with("redis://") || r.url.starts_with("rediss://");
        if !r.url.is_empty() && !redis_scheme {
            return Err(bad(
                "redis.url",
                "use redis://... or rediss://... (empty: no Redis)",
            ));
        }
        if r.ttl_s == 0 {
            return Err(bad("redis.ttl_s", "must be at least 1"));
        }
        if r.timeout_ms == 0 {
            return Err(bad("redis.timeout_ms", "must be at least 1"));
        }
        let t = &self.telemetry;
        let http_scheme =
            t.otlp_endpoint.starts_with("http://") || t.otlp_endpoint.starts_with("https://");
        if !t.otlp_endpoint.is_empty() && !http_scheme {
            return Err(bad(
                "telemetry.otlp_endpoint",
                "use http://HOST:4318 or https://...",
            ));
        }
        Ok(())
    }

    /// The model home: the config's, else $GUARDIAN_HOME, else the user cache dir.
    pub fn home(&self) -> PathBuf {
        if !self.model.home.is_empty() {
            return PathBuf::from(&self.model.home);
        }
        std::env::var_os("GUARDIAN_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(crate::model::fetch::default_home)
    }

    pub fn model_spec(&self) -> crate::model::ModelSpec {
        crate::model::ModelSpec {
            home: self.home(),
            backbone: self.model.backbone,
            weights: self.model.weights,
            max_tokens: self.model.max_tokens,
            device: self.model.device.clone(),
            heads: (!self.model.heads.is_empty()).then(|| PathBuf::from(&self.model.heads)),
            second_opinion: self.model.second_opinion.as_ref().map(|s| s.spec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded();
        assert_eq!(c.model.backbone, Backbone::E5Small);
        let g = Config::parse_over_default("[model]\nbackbone = \"embeddinggemma-300m\"\n", "t")
            .unwrap();
        assert_eq!(g.model_spec().backbone, Backbone::EmbeddingGemma300m);
        assert_eq!(c.policy.categories.len(), Category::COUNT);
    }

    #[test]
    fn a_file_lays_its_keys_over_the_default() {
        let c = Config::parse_over_default("[screen]\nmax_query_chars = 40\n", "t").unwrap();
        assert_eq!(c.screen.max_query_chars, 40);
        let d = Config::embedded();
        assert_eq!(c.kafka.input_topic, d.kafka.input_topic);
        assert_eq!(c.policy.categories.len(), Category::COUNT);
        let e = Config::parse_over_default("[kafka]\nbrokrs = \"x\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("brokrs"), "{e}");
        let e = Config::parse_over_default("[redis]\nttl_s = 0\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis.ttl_s"), "{e}");
    }

    #[test]
    fn rejects_with_the_key_named() {
        let bad_cat = EMBEDDED_DEFAULT.replace("crime_advice = {", "crime_advise = {");
        let e = Config::parse(&bad_cat, "t").unwrap_err().to_string();
        assert!(
            e.contains("policy.categories.crime_advise") && e.contains("unknown category"),
            "{e}"
        );
        let bad_tok = EMBEDDED_DEFAULT.replace("max_tokens = 128", "max_tokens = 4");
        let e = Config::parse(&bad_tok, "t").unwrap_err().to_string();
        assert!(e.contains("model.max_tokens"), "{e}");
        let unknown = format!("{EMBEDDED_DEFAULT}\n[extra]\nx = 1\n");
        let e = Config::parse(&unknown, "t").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let loop_topic = EMBEDDED_DEFAULT.replace(
            "verdict_topic = \"guardian.verdicts\"",
            "verdict_topic = \"guardian.queries\"",
        );
        let e = Config::parse(&loop_topic, "t").unwrap_err().to_string();
        assert!(e.contains("kafka.input_topic"), "{e}");
        let never_resume =
            EMBEDDED_DEFAULT.replace("resume_in_flight = 2048", "resume_in_flight = 4096");
        let e = Config::parse(&never_resume, "t").unwrap_err().to_string();
        assert!(e.contains("serve.resume_in_flight"), "{e}");
        let bad_redis = EMBEDDED_DEFAULT.replace(
            "url = \"redis://127.0.0.1:6379\"",
            "url = \"http://127.0.0.1:6379\"",
        );
        let e = Config::parse(&bad_redis, "t").unwrap_err().to_string();
        assert!(e.contains("redis.url"), "{e}");
        let bad_backbone =
            EMBEDDED_DEFAULT.replace("backbone = \"e5-small\"", "backbone = \"gemma-2b\"");
        let e = Config::parse(&bad_backbone, "t").unwrap_err().to_string();
        assert!(
            e.contains("gemma-2b") && e.contains("embeddinggemma-300m"),
            "{e}"
        );
        let bad_dev = EMBEDDED_DEFAULT.replace("device = \"auto\"", "device = \"gpu\"");
        let e = Config::parse(&bad_dev, "t").unwrap_err().to_string();
        assert!(e.contains("model.device"), "{e}");
    }
}
