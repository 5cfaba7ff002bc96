//! Sentence embeddings cached on disk, keyed by encoder id, token limit and text, so training
//! runs after the first cost seconds instead of minutes. One append-only file per encoder:
//! records of a 32-byte key followed by `hidden` little-endian f32s.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::Embedder;

/// The record key of `text` in a cache file: sha256 of the cache's salt (encoder, limits) and
/// the text, so a file can never serve vectors of another encoder.
pub fn cache_key(salt: &str, text: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.finalize().into()
}

pub struct EmbeddingCache {
    path: PathBuf,
    hidden: usize,
    salt: String,
    map: HashMap<[u8; 32], Vec<f32>>,
}

impl EmbeddingCache {
    pub fn open(dir: &Path, encoder_id: &str, max_tokens: usize, hidden: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let salt = format!("{encoder_id}|{max_tokens}");
        let file = format!("{}-{max_tokens}.bin", encoder_id.replace(['/', ' '], "_"));
        let path = dir.join(file);
        let mut map = HashMap::new();
        if let Ok(mut f) = std::fs::File::open(&path) {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(|e| Error::io(&path, e))?;
            let rec = 32 + hidden * 4;
            // A torn last record (interrupted run) is ignored.
            for r in bytes.chunks_exact(rec) {
                let key: [u8; 32] = r[..32].try_into().expect("32 bytes");
                let v = r[32..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                map.insert(key, v);
            }
        }
        Ok(Self {
            path,
            hidden,
            salt,
            map,
        })
    }

    fn key(&self, text: &str) -> [u8; 32] {
        cache_key(&self.salt, text)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, text: &str) -> Option<&Vec<f32>> {
        self.map.get(&self.key(text))
    }

    /// Stores embeddings computed elsewhere (the fine-tuning pass) and appends them to the file.
    pub fn insert_many(&mut self, items: Vec<(&str, Vec<f32>)>) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let mut buf = Vec::with_capacity(items.len() * (32 + self.hidden * 4));
        for (text, v) in items {
            let k = self.key(text);
            buf.extend_from_slice(&k);
            for x in &v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            self.map.insert(k, v);
        }
        file.write_all(&buf).map_err(|e| Error::io(&self.path, e))
    }

    /// Embeddings for `texts` in order, computing (and appending to the file) the missing ones.
    pub fn embed_all(
        &mut self,
        embedder: &Embedder,
        texts: &[&str],
        batch: usize,
        progress: &indicatif::ProgressBar,
    ) -> Result<Vec<Vec<f32>>> {
        let mut missing: Vec<(usize, Vec<u32>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, t) in texts.iter().enumerate() {
            let k = self.key(t);
            if !self.map.contains_key(&k) && seen.insert(k) {
                missing.push((i, embedder.tokenizer.encode(t)?.ids));
            }
        }
        progress.set_length(missing.len() as u64);
        // Similar lengths together: far less padding.
        missing.sort_by_key(|(_, ids)| ids.len());
        for chunk in missing.chunks(batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(|(_, ids)| ids.as_slice()).collect();
            let emb = embedder
                .embed(&refs)?
                .to_device(&candle_core::Device::Cpu)?
                .to_vec2::<f32>()?;
            self.insert_many(chunk.iter().map(|(i, _)| texts[*i]).zip(emb).collect())?;
            progress.inc(chunk.len() as u64);
        }
        Ok(texts
            .iter()
            .map(|t| self.map[&self.key(t)].clone())
            .collect())
    }
}
