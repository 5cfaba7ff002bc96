//! Safety responses shown instead of an answer for unsafe queries: a catalogue of templates per
//! category and language (`config/responses.toml`), one variant chosen per query so the same
//! query always gets the same text.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::taxonomy::Category;
use crate::util::Lang;

pub const EMBEDDED_RESPONSES: &str = include_str!("../config/responses.toml");

#[derive(Debug, Deserialize)]
struct Variants {
    ko: Vec<String>,
    en: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Catalogue {
    version: String,
    #[serde(flatten)]
    tables: BTreeMap<String, Variants>,
}

pub struct Responses {
    pub version: String,
    by_category: Vec<Variants>,
}

impl Responses {
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_RESPONSES, "embedded config/responses.toml").expect("valid catalogue")
    }

    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            None => Ok(Self::embedded()),
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                Self::parse(&t, &p.display().to_string())
            }
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut cat: Catalogue =
            toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        let mut by_category = Vec::with_capacity(Category::COUNT);
        for c in Category::ALL {
            let v = cat.tables.remove(c.id()).ok_or_else(|| {
                Error::Config(format!("{origin}: no [{}] table of responses", c.id()))
            })?;
            if v.ko.iter().chain(&v.en).any(|s| s.trim().is_empty())
                || v.ko.is_empty()
                || v.en.is_empty()
            {
                return Err(Error::Config(format!(
                    "{origin}: [{}] needs at least one non-empty `ko` and `en` response",
                    c.id()
                )));
            }
            by_category.push(v);
        }
        cat.tables.remove("fallback");
        if let Some(extra) = cat.tables.keys().next() {
            return Err(Error::Config(format!(
                "{origin}: [{extra}] is not a category"
            )));
        }
        Ok(Self {
            version: cat.version,
            by_category,
        })
    }

    /// The response for `category` in `lang`, the variant picked by the normalised query.
    pub fn pick(&self, category: Category, lang: Lang, normalised_query: &str) -> &str {
        let v = &self.by_category[category.index()];
        let list = match lang {
            Lang::Ko => &v.ko,
            Lang::En => &v.en,
        };
        let h = crate::util::sha256_hex(normalised_query.as_bytes());
        let n = u64::from_str_radix(&h[..8], 16).unwrap_or(0) as usize;
        &list[n % list.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_has_both_languages_and_picks_are_stable() {
        let r = Responses::embedded();
        for c in Category::ALL {
            let ko = r.pick(c, Lang::Ko, "q");
            assert!(crate::util::detect_lang(ko) == Lang::Ko, "{c}: {ko}");
            let en = r.pick(c, Lang::En, "q");
            assert!(crate::util::detect_lang(en) == Lang::En, "{c}: {en}");
            assert_eq!(r.pick(c, Lang::En, "q"), en);
        }
        let sh = r.pick(Category::SelfHarmSuicide, Lang::Ko, "x");
        assert!(sh.contains("109"), "{sh}");
    }

    #[test]
    fn missing_table_is_named() {
        let e = Responses::parse("version = \"1\"\n", "t")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("[crime_advice]"), "{e}");
    }
}
