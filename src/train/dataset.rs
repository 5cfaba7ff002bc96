//! Labelled examples (`text, label, category, lang[, source, license, group]`) and their seeded,
//! stratified train/dev/test split.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::policy::Label;
use crate::taxonomy::Category;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: Label,
    pub category: Option<Category>,
    pub lang: String,
    #[serde(default)]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub license: String,
    /// Items written from one template share a group and always land in the same split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A split fixed by the data file rather than dealt by the seed. Items written after
    /// studying the model's dev errors are pinned to train, so dev and test stay the sets
    /// the earlier models were measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

/// Sources of safe items written to look unsafe ("kill a process", "free alternatives to
/// final cut pro") carry this marker in their name.
pub const HARD_NEGATIVE_MARKER: &str = "hard-negative";

impl Example {
    /// A safe item written to look unsafe: its source is named with [`HARD_NEGATIVE_MARKER`].
    pub fn is_hard_negative(&self) -> bool {
        self.label == Label::Safe && self.source.contains(HARD_NEGATIVE_MARKER)
    }
}

pub fn load(path: &Path) -> Result<Vec<Example>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(&line)
            .map_err(|e| Error::Data(format!("{}:{}: {e}", path.display(), i + 1)))?;
        if ex.text.trim().is_empty() {
            return Err(Error::Data(format!(
                "{}:{}: empty text",
                path.display(),
                i + 1
            )));
        }
        if (ex.label == Label::Unsafe) != ex.category.is_some() {
            return Err(Error::Data(format!(
                "{}:{}: unsafe examples need a category and safe ones must have none",
                path.display(),
                i + 1
            )));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::Data(format!("{} holds no examples", path.display())));
    }
    Ok(out)
}

/// Loads several files (a directory stands for its `*.jsonl` files, in name order) and removes
/// duplicates by normalised text: the first copy is kept, and a text whose copies disagree on
/// label or category is dropped entirely. Returns the examples and the number of conflicts.
pub fn load_many(paths: &[std::path::PathBuf]) -> Result<(Vec<Example>, usize)> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<_> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "jsonl"))
                .collect();
            inner.sort();
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(Error::Data("no data files given".into()));
    }
    let mut all = Vec::new();
    for f in &files {
        all.extend(load(f)?);
    }
    let mut first: std::collections::HashMap<String, (usize, bool)> = Default::default();
    for (i, e) in all.iter().enumerate() {
        let key = crate::util::normalise(&e.text);
        match first.get_mut(&key) {
            None => {
                first.insert(key, (i, false));
            }
            Some((j, conflict)) => {
                let f = &all[*j];
                if f.label != e.label || f.category != e.category {
                    *conflict = true;
                }
            }
        }
    }
    let conflicts = first.values().filter(|(_, c)| *c).count();
    let mut keep: Vec<usize> = first
        .into_values()
        .filter(|(_, c)| !c)
        .map(|(i, _)| i)
        .collect();
    keep.sort_unstable();
    Ok((
        keep.into_iter().map(|i| all[i].clone()).collect(),
        conflicts,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Dev,
    Test,
}

/// (source, label, category, language).
type Stratum = (String, Label, Option<Category>, String);

/// Assigns every example a split. Strata are (source, label, category, language); inside a
/// stratum, groups (or single examples) are shuffled by `seed` and dealt out by the fractions.
/// Pinned examples keep their split and take no part in the dealing, so adding them leaves
/// every other example's split unchanged.
pub fn split(examples: &[Example], dev: f64, test: f64, seed: u64) -> Vec<Split> {
    let mut strata: BTreeMap<Stratum, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    for (i, e) in examples
        .iter()
        .enumerate()
        .filter(|(_, e)| e.split.is_none())
    {
        let key = (e.source.clone(), e.label, e.category, e.lang.clone());
        let group = e.group.clone().unwrap_or_else(|| format!("#{i}"));
        strata
            .entry(key)
            .or_default()
            .entry(group)
            .or_default()
            .push(i);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<Split> = examples
        .iter()
        .map(|e| e.split.unwrap_or(Split::Train))
        .collect();
    for (_, groups) in strata {
        let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
        groups.shuffle(&mut rng);
        let n = groups.len() as f64;
        // Round, but keep at least one group in train when the stratum is tiny.
        let n_dev = (n * dev).round() as usize;
        let n_test = (n * test).round() as usize;
        let n_dev = n_dev.min(groups.len().saturating_sub(1));
        let n_test = n_test.min(groups.len().saturating_sub(1 + n_dev));
        for (gi, g) in groups.iter().enumerate() {
            let s = if gi < n_dev {
                Split::Dev
            } else if gi < n_dev + n_test {
                Split::Test
            } else {
                Split::Train
            };
            for &i in g {
                out[i] = s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize, label: Label, group: Option<&str>) -> Example {
        Example {
            text: format!("t{i}"),
            label,
            category: (label == Label::Unsafe).then_some(Category::CrimeAdvice),
            lang: "en".into(),
            source: "s".into(),
            license: String::new(),
            group: group.map(String::from),
            split: None,
        }
    }

    #[test]
    fn load_many_dedupes_and_drops_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let line = |t: &str, l: &str, c: &str| {
            format!("{{\"text\":\"{t}\",\"label\":\"{l}\",\"category\":{c},\"lang\":\"en\"}}\n")
        };
        std::fs::write(
            dir.path().join("a.jsonl"),
            line("Kill a process", "safe", "null") + &line("x y", "safe", "null"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.jsonl"),
            line("kill  a PROCESS", "safe", "null")
                + &line("X Y", "unsafe", "\"crime_advice\"")
                + &line("z", "safe", "null"),
        )
        .unwrap();
        let (v, conflicts) = load_many(&[dir.path().to_path_buf()]).unwrap();
        let texts: Vec<&str> = v.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts, ["Kill a process", "z"]);
        assert_eq!(conflicts, 1);
    }

    #[test]
    fn split_is_seeded_stratified_and_keeps_groups_together() {
        let mut v: Vec<Example> = (0..100).map(|i| ex(i, Label::Safe, None)).collect();
        v.extend((100..140).map(|i| ex(i, Label::Unsafe, Some(&format!("g{}", i / 4)))));
        let a = split(&v, 0.1, 0.1, 7);
        assert_eq!(a, split(&v, 0.1, 0.1, 7));
        assert_ne!(a, split(&v, 0.1, 0.1, 8));
        let safe_dev = (0..100).filter(|&i| a[i] == Split::Dev).count();
        assert_eq!(safe_dev, 10);
        for g in 0..10 {
            let idx: Vec<usize> = (100..140).filter(|i| i / 4 == 25 + g).collect();
            assert!(idx.iter().all(|&i| a[i] == a[idx[0]]));
        }
    }

    #[test]
    fn pinned_examples_keep_their_split_and_leave_the_rest_unchanged() {
        let base: Vec<Example> = (0..100).map(|i| ex(i, Label::Safe, None)).collect();
        let mut more = base.clone();
        // Same stratum as the others, so unpinned they would join the dealing.
        more.extend((100..130).map(|i| Example {
            split: Some(Split::Train),
            ..ex(i, Label::Safe, None)
        }));
        more.push(Example {
            split: Some(Split::Test),
            ..ex(130, Label::Safe, None)
        });
        let a = split(&base, 0.1, 0.1, 7);
        let b = split(&more, 0.1, 0.1, 7);
        assert_eq!(a[..], b[..100]);
        assert!(b[100..130].iter().all(|s| *s == Split::Train));
        assert_eq!(b[130], Split::Test);
        let line = r#"{"text":"t","label":"safe","category":null,"lang":"en","split":"train"}"#;
        let e: Example = serde_json::from_str(line).unwrap();
        assert_eq!(e.split, Some(Split::Train));
    }
}
