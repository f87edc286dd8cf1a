//! `tokenizer.json` through the `tokenizers` crate (pure-Rust build), wrapped so errors name the file.

use crate::error::{Result, WhittleError};
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(WhittleError::file(path, "tokenizer.json missing (a Hugging Face fast tokenizer is required)"));
        }
        let bytes = std::fs::read(path).map_err(|e| WhittleError::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// A tokenizer from the bytes of a `tokenizer.json`; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        // The tokenizers crate panics on some malformed files (an `expect` in its decoder deserializer, found by
        // tests/fuzz_parsers.rs); a user's bad file must be an error naming it, not a crash.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| WhittleError::file(origin, "cannot parse tokenizer: malformed `decoder` or other section"))?;
        let inner = parsed.map_err(|e| WhittleError::file(origin, format!("cannot parse tokenizer: {e}")))?;
        Ok(Self { inner, path: origin.to_path_buf() })
    }

    /// Token ids of `text` without special tokens (the evaluation protocol prepends nothing).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| WhittleError::file(&self.path, format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| WhittleError::file(&self.path, format!("decoding failed: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
