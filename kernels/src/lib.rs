//! Whittle's compute kernels behind one small interface: `Weight::matmul(x, n, y)` computes y = x Wᵀ for `n`
//! activation rows, whatever the storage of W: dense f32/f16/bf16, packed 2/3/4/8-bit groups (`PackedWeight`), or
//! 2:4 structured-sparse (`Sparse24Weight`). Core builds a `Weight` once per linear layer and only ever calls
//! `matmul`, so layouts can change here without touching the model code.
//!
//! CPU kernels pick the best instruction set at run time (`cpu::Isa`); the CUDA backend (`cuda`) compiles its
//! kernels with NVRTC when a driver is present and reports why not otherwise.

pub mod bench;
pub mod bytes;
pub mod cpu;
pub mod cuda;
pub mod dense;
pub mod packed;
pub mod sparse24;
mod x86;

pub use bench::{bench_gemv, bench_gemv_q8, measure_stream_read_gbps, GemvReport, GemvShape};
pub use bytes::SharedBytes;
pub use cpu::Isa;
pub use dense::{DType, DenseWeight};
pub use packed::{PackedWeight, QuantParts};
pub use sparse24::{Sparse24Values, Sparse24Weight};

/// A weight that cannot be built from the parts given; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{field}: expected {expected}, found {found}")]
    Shape { field: &'static str, expected: String, found: String },
    #[error("not a 2:4 pattern: row {row}, columns {col}..{}: {kept} nonzero values (at most 2 of every 4)", col + 4)]
    Not24 { row: usize, col: usize, kept: usize },
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// A linear layer's weight in whatever layout a kernel runs directly.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(DenseWeight),
    Packed(PackedWeight),
    Sparse24(Sparse24Weight),
}

impl Weight {
    pub fn rows(&self) -> usize {
        match self {
            Weight::Dense(w) => w.rows,
            Weight::Packed(w) => w.rows,
            Weight::Sparse24(w) => w.rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Weight::Dense(w) => w.cols,
            Weight::Packed(w) => w.cols,
            Weight::Sparse24(w) => w.cols,
        }
    }
    /// y[t, r] = Σ_c x[t, c] · W[r, c]; `x` is `n × cols`, `y` is `n × rows`, both row-major.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        match self {
            Weight::Dense(w) => w.matmul(x, n, y),
            Weight::Packed(w) => w.matmul(x, n, y),
            Weight::Sparse24(w) => w.matmul(x, n, y),
        }
    }
    /// `matmul` with int8 activations where a kernel for that exists (`PackedWeight::matmul_q8`: approximate,
    /// llama.cpp-style); other weights run `matmul`.
    pub fn matmul_q8(&self, x: &[f32], n: usize, y: &mut [f32]) {
        match self {
            Weight::Packed(w) => w.matmul_q8(x, n, y),
            Weight::Sparse24(w) => w.matmul_q8(x, n, y),
            Weight::Dense(w) => w.matmul(x, n, y),
        }
    }
    /// Bytes the weight occupies in memory.
    pub fn resident_bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => w.bytes().len(),
            Weight::Packed(w) => w.resident_bytes(),
            Weight::Sparse24(w) => w.resident_bytes(),
        }
    }
}
