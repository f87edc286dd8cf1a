//! Per-layer key/value cache for incremental decoding, plus the scratch buffers a forward pass reuses so the decode
//! loop does not allocate.

pub struct LayerCache {
    /// `[len, kv_dim]` row-major keys (RoPE applied) and values.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Positions already cached.
    pub len: usize,
    pub kv_dim: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_dim: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| LayerCache { k: Vec::new(), v: Vec::new() }).collect(), len: 0, kv_dim }
    }
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            l.k.clear();
            l.v.clear();
        }
        self.len = 0;
    }
    pub fn resident_bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.capacity() + l.v.capacity()) * 4).sum()
    }
}

/// Activation buffers of one forward call, grown on demand and reused across calls.
#[derive(Default)]
pub struct Scratch {
    pub h: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub proj: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub scores: Vec<f32>,
}

pub fn ensure(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}
