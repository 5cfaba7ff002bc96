//! In-memory verdict cache for repeated queries. Keys hash the model id, the policy version, the
//! response language and the normalised query, so a new model or policy never serves stale
//! verdicts. A query already on its way through the engine is not screened twice: later copies
//! wait for the first one's verdict.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Action;
use crate::event::Scores;
use crate::policy::Label;
use crate::taxonomy::Category;
use crate::util::Lang;

pub type Key = [u8; 32];

pub fn key(model: &str, policy: &str, lang: Lang, normalised: &str) -> Key {
    let mut h = Sha256::new();
    for part in [model, policy, lang.code(), normalised] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

/// A verdict without the per-event fields (id, extra fields, latency).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CachedVerdict {
    pub label: Label,
    pub category: Option<Category>,
    pub scores: Scores,
    pub action: Action,
    pub observed_action: Option<Action>,
    pub response: Option<String>,
    pub lang: Lang,
    pub truncated: bool,
}

pub enum Lookup {
    Hit(Arc<CachedVerdict>),
    /// Another copy of this query is being screened; the waiter was registered.
    Joined,
    /// Nobody has it: the caller must screen it and `complete` the key.
    Miss,
}

struct Inner<W> {
    ready: LruCache<Key, Arc<CachedVerdict>>,
    pending: HashMap<Key, Vec<W>>,
}

pub struct VerdictCache<W> {
    inner: Mutex<Inner<W>>,
}

impl<W> VerdictCache<W> {
    /// `None` for a capacity of 0 (cache disabled).
    pub fn new(capacity: usize) -> Option<Self> {
        let cap = NonZeroUsize::new(capacity)?;
        Some(Self {
            inner: Mutex::new(Inner {
                ready: LruCache::new(cap),
                pending: HashMap::new(),
            }),
        })
    }

    /// Looks `key` up; on a pending key registers `waiter`, on a miss marks the key pending.
    pub fn lookup(&self, key: Key, waiter: impl FnOnce() -> W) -> Lookup {
        let mut g = self.inner.lock().expect("cache lock");
        if let Some(v) = g.ready.get(&key) {
            return Lookup::Hit(v.clone());
        }
        if let Some(w) = g.pending.get_mut(&key) {
            w.push(waiter());
            return Lookup::Joined;
        }
        g.pending.insert(key, Vec::new());
        Lookup::Miss
    }

    /// Stores the verdict for a pending key (when `Some`) and returns the waiters to serve.
    pub fn complete(&self, key: Key, verdict: Option<Arc<CachedVerdict>>) -> Vec<W> {
        let mut g = self.inner.lock().expect("cache lock");
        if let Some(v) = verdict {
            g.ready.put(key, v);
        }
        g.pending.remove(&key).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("cache lock").ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Arc<CachedVerdict> {
        Arc::new(CachedVerdict {
            label: Label::Safe,
            category: None,
            scores: Scores {
                unsafe_prob: 0.1,
                categories: Default::default(),
            },
            action: Action::Allow,
            observed_action: None,
            response: None,
            lang: Lang::En,
            truncated: false,
        })
    }

    #[test]
    fn miss_then_join_then_hit_and_eviction() {
        let c: VerdictCache<u32> = VerdictCache::new(1).unwrap();
        let k1 = key("m", "p", Lang::En, "a");
        let k2 = key("m", "p", Lang::En, "b");
        assert!(matches!(c.lookup(k1, || 1), Lookup::Miss));
        assert!(matches!(c.lookup(k1, || 2), Lookup::Joined));
        assert!(matches!(c.lookup(k1, || 3), Lookup::Joined));
        assert_eq!(c.complete(k1, Some(v())), vec![2, 3]);
        assert!(matches!(c.lookup(k1, || 4), Lookup::Hit(_)));
        assert!(matches!(c.lookup(k2, || 5), Lookup::Miss));
        c.complete(k2, Some(v()));
        // Capacity 1: k2 evicted k1.
        assert!(matches!(c.lookup(k1, || 6), Lookup::Miss));
        assert!(VerdictCache::<u32>::new(0).is_none());
        assert_ne!(key("m", "p", Lang::En, "a"), key("m", "p2", Lang::En, "a"));
    }
}
