//! Dense weights (f32, f16, bf16) and their matrix product with f32 activations on the CPU.
//! Rows of the output are split over rayon (`cpu::for_row_blocks`, writing in place); the AVX2 kernel widens
//! f16 with F16C and bf16 with a 16-bit shift in registers (never expanding to an f32 copy) and shares each loaded
//! weight vector across up to 4 tokens. The portable kernel runs 8 independent accumulators so LLVM still emits
//! packed SIMD without fast-math; it is the fallback and the reference in tests.

use crate::bytes::SharedBytes;
use half::{bf16, f16};
use crate::cpu::{self, Isa, OutRows};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// A `rows × cols` row-major dense matrix in its stored dtype.
#[derive(Clone, Debug)]
pub struct DenseWeight {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    bytes: SharedBytes,
}

impl DenseWeight {
    /// `bytes` must hold exactly rows*cols little-endian values of `dtype`. Unaligned windows are copied once.
    pub fn from_bytes(rows: usize, cols: usize, dtype: DType, bytes: SharedBytes) -> Self {
        assert_eq!(bytes.len(), rows * cols * dtype.size(), "dense weight byte length");
        let aligned = (bytes.as_slice().as_ptr() as usize).is_multiple_of(dtype.size());
        let bytes = if aligned { bytes } else { SharedBytes::from_vec(bytes.as_slice().to_vec()) };
        Self { rows, cols, dtype, bytes }
    }
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols);
        Self { rows, cols, dtype: DType::F32, bytes: SharedBytes::from_vec(bytemuck::cast_slice(&data).to_vec()) }
    }
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }
    /// Row `r` widened to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match self.dtype {
            DType::F32 => out.copy_from_slice(&self.f32s()[r * c..(r + 1) * c]),
            DType::F16 => {
                for (o, v) in out.iter_mut().zip(&self.f16s()[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
            DType::BF16 => {
                for (o, v) in out.iter_mut().zip(&self.bf16s()[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
        }
    }
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, chunk) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.row_f32(r, chunk);
        }
        out
    }
    fn f32s(&self) -> &[f32] {
        bytemuck::cast_slice(self.bytes.as_slice())
    }
    fn f16s(&self) -> &[f16] {
        bytemuck::cast_slice(self.bytes.as_slice())
    }
    fn bf16s(&self) -> &[bf16] {
        bytemuck::cast_slice(self.bytes.as_slice())
    }

    /// y[t, r] = Σ_c x[t, c] · W[r, c] for `n` activation rows, with the best kernel for this CPU.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_isa(Isa::best(), x, n, y)
    }

    /// Same with a chosen instruction set (scalar if unsupported); tests compare them.
    pub fn matmul_isa(&self, isa: Isa, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), n * cols, "x must be n × cols");
        assert_eq!(y.len(), n * rows, "y must be n × rows");
        let isa = if isa.is_supported() { isa } else { Isa::Scalar };
        cpu::for_row_blocks(rows, 1, cols * self.dtype.size(), n, y, |r0, r1, out| match isa {
            Isa::Scalar => self.rows_scalar(x, n, r0, r1, out),
            _ => crate::x86::dense_rows(isa, self, x, n, r0, r1, out),
        });
    }

    fn rows_scalar(&self, x: &[f32], n: usize, r0: usize, r1: usize, out: OutRows) {
        let cols = self.cols;
        for r in r0..r1 {
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let v = match self.dtype {
                    DType::F32 => dot_f32(&self.f32s()[r * cols..(r + 1) * cols], xt),
                    DType::F16 => dot_with(&self.f16s()[r * cols..(r + 1) * cols], xt, |v| v.to_f32()),
                    DType::BF16 => dot_with(&self.bf16s()[r * cols..(r + 1) * cols], xt, |v| v.to_f32()),
                };
                // SAFETY: r is in this task's block, t < n.
                unsafe { out.write(t, r, v) };
            }
        }
    }
}

/// Dot product with 8 independent accumulators (vectorizable without reassociating a single sum).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn dot_with<T: Copy>(a: &[T], b: &[f32], widen: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += widen(x[k]) * y[k];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += widen(*x) * y;
    }
    s
}
