//! Wire schemas: the query event read from JSONL (later Kafka), the verdict written back, and the
//! dead-letter record for input that cannot be screened. Validation lives here so every source
//! rejects the same things with the same reasons.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Action;
use crate::policy::Label;
use crate::taxonomy::Category;
use crate::util::Lang;

/// A query to screen, decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryEvent {
    /// The caller's id (string or number), echoed in the verdict.
    pub id: Value,
    pub query: String,
    /// The caller's language hint (`ko`/`en`), if given and understood.
    pub lang: Option<Lang>,
    /// Other fields of the input object, kept in the verdict record.
    pub extra: Map<String, Value>,
    /// The query was longer than the limit; `query` holds its prefix.
    pub truncated_chars: bool,
}

/// Why an input could not be screened (or was screened only in part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    InvalidUtf8,
    InvalidJson,
    NotAnObject,
    MissingQuery,
    QueryNotString,
    EmptyQuery,
    BadId,
    /// `schema_version` names a version this worker does not read.
    UnknownSchemaVersion,
    /// The query was over the length limit: screened on its prefix, and reported.
    QueryTooLong,
    /// The engine failed on this query.
    EngineError,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::InvalidJson => "invalid_json",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingQuery => "missing_query",
            Reason::QueryNotString => "query_not_string",
            Reason::EmptyQuery => "empty_query",
            Reason::BadId => "bad_id",
            Reason::UnknownSchemaVersion => "unknown_schema_version",
            Reason::QueryTooLong => "query_too_long",
            Reason::EngineError => "engine_error",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
    /// The id, when the input got far enough to have one.
    pub id: Option<Value>,
}

/// Raw payloads in dead-letter records are cut to this many bytes.
const RAW_KEEP: usize = 4096;

/// A record for input that could not be screened as given. Carries the raw payload so it can be
/// fixed and replayed; dead letters are an operator's store, not a log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub error: Reason,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// Where the input came from: a line number for files, topic/partition/offset for Kafka.
    pub source: Value,
    /// The payload, lossily decoded as UTF-8 and cut to 4 KiB.
    pub raw: String,
    /// True when a verdict was still produced (over-long queries).
    pub screened: bool,
}

impl DeadLetter {
    /// The report for an event whose query was cut to `max_chars` (it is still screened).
    pub fn query_too_long(ev: &QueryEvent, max_chars: usize, source: Value, raw: &[u8]) -> Self {
        let rej = Rejection {
            reason: Reason::QueryTooLong,
            detail: format!("query longer than {max_chars} characters; screened on its prefix"),
            id: Some(ev.id.clone()),
        };
        Self::new(rej, source, raw, true)
    }

    pub fn new(rejection: Rejection, source: Value, raw: &[u8], screened: bool) -> Self {
        let cut = &raw[..raw.len().min(RAW_KEEP)];
        Self {
            error: rejection.reason,
            detail: rejection.detail,
            id: rejection.id,
            source,
            raw: String::from_utf8_lossy(cut).into_owned(),
            screened,
        }
    }
}

/// The verdict for one query, in the schema the search engine and the audit log read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub id: Value,
    pub label: Label,
    pub category: Option<Category>,
    pub scores: Scores,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_action: Option<Action>,
    pub response: Option<String>,
    pub lang: Lang,
    pub model: String,
    pub policy: String,
    pub cached: bool,
    /// The query was cut (characters or tokens) before screening.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    pub latency_ms: f64,
    /// The input's other fields.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Unsafe probability and, per category, P(unsafe and that category); rounded to 4 places.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scores {
    #[serde(rename = "unsafe")]
    pub unsafe_prob: f32,
    pub categories: std::collections::BTreeMap<Category, f32>,
}

impl Scores {
    pub fn from_heads(h: &crate::model::HeadScores) -> Self {
        let r = |x: f32| (x * 10_000.0).round() / 10_000.0;
        Self {
            unsafe_prob: r(h.unsafe_prob),
            categories: Category::ALL
                .into_iter()
                .map(|c| (c, r(h.unsafe_prob * h.category_probs[c.index()])))
                .collect(),
        }
    }
}

/// Fields of the input that the verdict sets itself, and so are not copied over.
/// The input event schema this build reads.
pub const SCHEMA_VERSION: u64 = 1;

const RESERVED: &[&str] = &[
    "id",
    "query",
    "label",
    "category",
    "scores",
    "action",
    "observed_action",
    "response",
    "lang",
    "model",
    "policy",
    "cached",
    "truncated",
    "latency_ms",
];

/// Decodes one input payload: a JSON object with `id` and `query`, or (when `allow_plain` and
/// the payload is not JSON) the whole line as the query with `fallback_id`.
pub fn decode(
    raw: &[u8],
    fallback_id: Value,
    allow_plain: bool,
    max_chars: usize,
) -> Result<QueryEvent, Rejection> {
    let reject = |reason, detail: String, id| Err(Rejection { reason, detail, id });
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            return reject(
                Reason::InvalidUtf8,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                None,
            )
        }
    };
    let trimmed = text.trim();
    let looks_json =
        trimmed.starts_with('{') || trimmed.starts_with('[') || trimmed.starts_with('"');
    let (id, query, lang, extra) = if looks_json || !allow_plain {
        let v: Value = match serde_json::from_str(trimmed) {
            Ok(v) => v,
            Err(e) => return reject(Reason::InvalidJson, format!("invalid JSON: {e}"), None),
        };
        let Value::Object(mut obj) = v else {
            return reject(
                Reason::NotAnObject,
                "expected a JSON object with \"id\" and \"query\"".into(),
                None,
            );
        };
        let id = match obj.remove("id") {
            None | Some(Value::Null) => fallback_id,
            Some(v @ (Value::String(_) | Value::Number(_))) => v,
            Some(other) => {
                return reject(
                    Reason::BadId,
                    format!("\"id\" must be a string or number, got {}", kind(&other)),
                    None,
                )
            }
        };
        // Producers may stamp events with "schema_version"; absent means version 1. A newer
        // schema may change what fields mean, so it is not guessed at.
        match obj.remove("schema_version") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64() == Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return reject(
                    Reason::UnknownSchemaVersion,
                    format!("\"schema_version\" {other} is not supported (this worker reads {SCHEMA_VERSION})"),
                    Some(id),
                )
            }
        }
        let query = match obj.remove("query") {
            None | Some(Value::Null) => {
                return reject(Reason::MissingQuery, "no \"query\" field".into(), Some(id))
            }
            Some(Value::String(s)) => s,
            Some(other) => {
                return reject(
                    Reason::QueryNotString,
                    format!("\"query\" must be a string, got {}", kind(&other)),
                    Some(id),
                )
            }
        };
        let lang = match obj.remove("lang") {
            Some(Value::String(s)) => crate::util::Lang::parse(&s),
            _ => None,
        };
        obj.retain(|k, _| !RESERVED.contains(&k.as_str()));
        (id, query, lang, obj)
    } else {
        (fallback_id, trimmed.to_string(), None, Map::new())
    };
    if query.trim().is_empty() {
        return reject(Reason::EmptyQuery, "the query is empty".into(), Some(id));
    }
    let (query, truncated_chars) = match query.char_indices().nth(max_chars) {
        Some((cut, _)) => (query[..cut].to_string(), true),
        None => (query, false),
    };
    Ok(QueryEvent {
        id,
        query,
        lang,
        extra,
        truncated_chars,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dec(s: &[u8]) -> Result<QueryEvent, Rejection> {
        decode(s, json!(7), true, 10)
    }

    #[test]
    fn accepts_objects_and_plain_lines() {
        let e = dec(br#"{"id":"a1","query":"hello","user":"u9","lang":"ko"}"#).unwrap();
        assert_eq!(e.id, json!("a1"));
        assert_eq!(e.query, "hello");
        assert_eq!(e.lang, Some(Lang::Ko));
        assert_eq!(e.extra.get("user"), Some(&json!("u9")));
        let e = dec("날씨 어때".as_bytes()).unwrap();
        assert_eq!((e.id, e.query.as_str()), (json!(7), "날씨 어때"));
    }

    #[test]
    fn rejects_each_bad_shape_with_its_reason() {
        let r = |s: &[u8]| dec(s).unwrap_err().reason;
        assert_eq!(r(b"{\"id\":1,"), Reason::InvalidJson);
        assert_eq!(r(b"[1,2]"), Reason::NotAnObject);
        assert_eq!(r(b"{\"id\":1}"), Reason::MissingQuery);
        assert_eq!(r(b"{\"id\":1,\"query\":5}"), Reason::QueryNotString);
        assert_eq!(r(b"{\"id\":1,\"query\":\"  \"}"), Reason::EmptyQuery);
        assert_eq!(r(b"{\"id\":[1],\"query\":\"x\"}"), Reason::BadId);
        assert_eq!(r(b"   "), Reason::EmptyQuery);
        assert_eq!(
            r(b"{\"id\":1,\"query\":\"x\",\"schema_version\":2}"),
            Reason::UnknownSchemaVersion
        );
        assert_eq!(
            r(b"{\"id\":1,\"query\":\"x\",\"schema_version\":\"1\"}"),
            Reason::UnknownSchemaVersion
        );
        assert!(dec(b"{\"id\":1,\"query\":\"x\",\"schema_version\":1}").is_ok());
        assert_eq!(r(b"bad \xff\xfe bytes"), Reason::InvalidUtf8);
        assert_eq!(
            decode(b"plain", json!(1), false, 10).unwrap_err().reason,
            Reason::InvalidJson
        );
    }

    #[test]
    fn truncates_long_queries_on_char_boundaries() {
        let e = dec("가나다라마바사아자차카타파하".as_bytes()).unwrap();
        assert!(e.truncated_chars);
        assert_eq!(e.query.chars().count(), 10);
    }

    #[test]
    fn dead_letter_keeps_a_bounded_lossy_payload() {
        let raw = vec![0xffu8; 10_000];
        let d = DeadLetter::new(
            Rejection {
                reason: Reason::InvalidUtf8,
                detail: "x".into(),
                id: None,
            },
            json!({"line": 3}),
            &raw,
            false,
        );
        assert_eq!(d.raw.chars().count(), 4096);
    }
}
