//! Shared, read-only byte storage for weights: either owned or a window into a memory map, so that a model
//! loaded from safetensors keeps one copy of its weights (the page cache's) instead of two.

use std::ops::Deref;
use std::sync::Arc;

/// A cheaply clonable window `[start, start+len)` into bytes owned by something else (a `Vec<u8>`, an mmap).
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn Deref<Target = [u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    /// Panics if the window is outside `owner` (callers validate file offsets before building one).
    pub fn new(owner: Arc<dyn Deref<Target = [u8]> + Send + Sync>, start: usize, len: usize) -> Self {
        assert!(start.checked_add(len).is_some_and(|e| e <= owner.len()), "SharedBytes window out of range");
        Self { owner, start, len }
    }
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self { owner: Arc::new(v), start: 0, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.owner[self.start..self.start + self.len]
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len)
    }
}
