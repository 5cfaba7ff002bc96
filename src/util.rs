//! Small text helpers shared by the screening path and training.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The form of a query used for cache keys and deduplication: case-folded, whitespace
/// collapsed, trimmed. Two queries that differ only in these ways get the same verdict.
/// Replaces the markdown section that starts with the line `heading` (up to the next `## `
/// heading) with `section`, or appends `section` when there is none.
pub fn replace_section(doc: &str, heading: &str, section: &str) -> String {
    let Some(start) = doc
        .match_indices(heading)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || doc[..i].ends_with('\n'))
    else {
        let sep = if doc.ends_with('\n') { "\n" } else { "\n\n" };
        return format!("{doc}{sep}{section}");
    };
    let rest = &doc[start + heading.len()..];
    let end = rest
        .find("\n## ")
        .map_or(doc.len(), |i| start + heading.len() + i);
    format!("{}{section}{}", &doc[..start], &doc[end..])
}

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

    #[test]
    fn replace_section_appends_then_replaces_in_place() {
        let doc = "# card\n\n## Dev\n\nd\n";
        let once = super::replace_section(doc, "## Test", "## Test\n\nt1\n");
        assert_eq!(once, "# card\n\n## Dev\n\nd\n\n## Test\n\nt1\n");
        let twice = super::replace_section(&(once + "\n## After\n"), "## Test", "## Test\n\nt2\n");
        assert_eq!(
            twice,
            "# card\n\n## Dev\n\nd\n\n## Test\n\nt2\n\n## After\n"
        );
    }

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
