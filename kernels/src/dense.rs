//! Dense weights (f32, f16, bf16) and their matrix product with f32 activations on the CPU.
//! Rows of the output are split over rayon (`cpu::for_row_blocks`, writing in place). For decode-sized token counts
//! the AVX2 kernel widens f16 with F16C and bf16 with a 16-bit shift in registers (never expanding to an f32 copy)
//! and shares each loaded weight vector across up to 4 tokens; prefill-sized products run as faer GEMMs on blocks
//! of rows (`DenseWeight::matmul_gemm`). The portable kernel runs 8 independent accumulators so LLVM still emits
//! packed SIMD without fast-math; it is the fallback and the reference in tests.

use crate::bytes::SharedBytes;
use half::{bf16, f16};
use crate::cpu::{self, Isa, OutRows};

/// From this many tokens on, [`DenseWeight::matmul`] runs a GEMM: below it each weight is reused too few times for
/// packing into GEMM panels to pay off, and the row-dot kernels (memory-bound on the weights) win.
pub const GEMM_MIN_TOKENS: usize = 16;

/// Rows per GEMM block: about 1 MiB of f32 weights (the widened copy of an f16 block stays in L2), 16 to 256 rows.
fn gemm_block_rows(cols: usize) -> usize {
    ((1 << 20) / (cols.max(1) * 4)).clamp(16, 256) / 16 * 16
}

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

    /// y[t, r] = Σ_c x[t, c] · W[r, c] for `n` activation rows, with the best kernel for this CPU: the row-dot
    /// kernels for decode-sized `n`, a GEMM from [`GEMM_MIN_TOKENS`] tokens on.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        if n >= GEMM_MIN_TOKENS {
            self.matmul_gemm(x, n, y)
        } else {
            self.matmul_isa(Isa::best(), x, n, y)
        }
    }

    /// The GEMM path of [`Self::matmul`]: blocks of rows (widened to f32 first when stored as f16/bf16) times all
    /// tokens, each block one sequential faer GEMM, blocks spread over rayon. With many tokens every weight is
    /// reused `n` times, so the product is compute-bound and a register-blocked GEMM (outer products, no
    /// horizontal sums) runs several times faster than the row-dot kernels; widening a block costs one pass over
    /// its weights, which is 1/n of the block's multiply-adds.
    pub fn matmul_gemm(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), n * cols, "x must be n × cols");
        assert_eq!(y.len(), n * rows, "y must be n × rows");
        let block = gemm_block_rows(cols);
        let lhs = faer::MatRef::from_row_major_slice(x, n, cols);
        cpu::for_row_blocks(rows, block, cols * self.dtype.size(), n, y, |r0, r1, out| {
            for b0 in (r0..r1).step_by(block) {
                let b1 = (b0 + block).min(r1);
                let mut wide = cpu::Scratch::take(&cpu::ROW_SCRATCH, 0);
                let w: &[f32] = match self.dtype {
                    DType::F32 => &self.f32s()[b0 * cols..b1 * cols],
                    _ => {
                        wide.clear();
                        wide.resize((b1 - b0) * cols, 0.0);
                        match self.dtype {
                            DType::F16 => half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                &self.f16s()[b0 * cols..b1 * cols],
                                &mut wide,
                            ),
                            _ => half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                &self.bf16s()[b0 * cols..b1 * cols],
                                &mut wide,
                            ),
                        }
                        &wide
                    }
                };
                let rhs = faer::MatRef::from_row_major_slice(w, b1 - b0, cols).transpose();
                // SAFETY: rows b0..b1 lie in this task's block r0..r1, and this is the only view of them.
                let dst = unsafe { out.block_mut(b0, b1) };
                faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1.0f32, faer::Par::Seq);
            }
            cpu::clear_upper_vector_state();
        });
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
