//! Small text helpers shared by the screening path and training.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The form of a query used for cache keys and deduplication: case-folded, whitespace
/// collapsed, trimmed. Two queries that differ only in these ways get the same verdict.
pub fn normalise(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for word in query.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Ko,
    En,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::Ko => "ko",
            Lang::En => "en",
        }
    }
    pub fn parse(s: &str) -> Option<Lang> {
        match s.to_ascii_lowercase().as_str() {
            "ko" | "kor" | "korean" => Some(Lang::Ko),
            "en" | "eng" | "english" => Some(Lang::En),
            _ => None,
        }
    }
}

fn is_hangul(c: char) -> bool {
    matches!(c as u32, 0xAC00..=0xD7A3 | 0x1100..=0x11FF | 0x3130..=0x318F)
}

/// Korean when at least a fifth of the letters are Hangul (Korean queries often carry English
/// brand names and terms), English otherwise: the two languages the responses are written in.
pub fn detect_lang(text: &str) -> Lang {
    let (mut hangul, mut letters) = (0usize, 0usize);
    for c in text.chars().filter(|c| c.is_alphabetic()) {
        letters += 1;
        if is_hangul(c) {
            hangul += 1;
        }
    }
    if hangul > 0 && hangul * 5 >= letters {
        Lang::Ko
    } else {
        Lang::En
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_folds_case_and_space() {
        assert_eq!(
            normalise("  How  to\tKILL a\nProcess "),
            "how to kill a process"
        );
        assert_eq!(normalise("삼성전자   주가"), "삼성전자 주가");
    }

    #[test]
    fn detects_korean_with_english_terms() {
        assert_eq!(detect_lang("아이폰 16 pro 가격"), Lang::Ko);
        assert_eq!(detect_lang("python에서 process kill 하는 법"), Lang::Ko);
        assert_eq!(detect_lang("how to bake bread"), Lang::En);
        assert_eq!(detect_lang("12345 !!!"), Lang::En);
    }
}
