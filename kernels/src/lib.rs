//! Whittle's compute kernels behind one small interface: `Weight::matmul(x, n, y)` computes y = x Wᵀ for `n`
//! activation rows, whatever the storage of W (dense f32/f16/bf16 today; packed low-bit and 2:4 sparse layouts and
//! the CUDA backend plug in as further `Weight` variants).

pub mod bytes;
pub mod dense;

pub use bytes::SharedBytes;
pub use dense::{DType, DenseWeight};

/// A linear layer's weight in whatever layout a kernel runs directly.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(DenseWeight),
}

impl Weight {
    pub fn rows(&self) -> usize {
        match self {
            Weight::Dense(w) => w.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Weight::Dense(w) => w.cols,
        }
    }
    /// y[t, r] = Σ_c x[t, c] · W[r, c]; `x` is `n × cols`, `y` is `n × rows`, both row-major.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        match self {
            Weight::Dense(w) => w.matmul(x, n, y),
        }
    }
    /// Bytes the weight occupies in memory.
    pub fn resident_bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => w.bytes().len(),
        }
    }
}
