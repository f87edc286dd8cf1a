//! Dense weights (f32, f16, bf16) and their matrix product with f32 activations on the CPU.
//! Rows of the output are split over rayon; each dot product runs 8 independent accumulators so LLVM emits
//! packed SIMD without fast-math, and f16/bf16 are widened in registers (never expanded to an f32 copy).

use crate::bytes::SharedBytes;
use half::{bf16, f16};
use rayon::prelude::*;

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
        let aligned = (bytes.as_slice().as_ptr() as usize) % dtype.size() == 0;
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

    /// y[t, r] = Σ_c x[t, c] · W[r, c] for `n` activation rows.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(y.len(), n * rows);
        // Parallelize over output rows in chunks big enough (~32 KiB of weights) to amortize rayon's overhead.
        let chunk_rows = (32 * 1024 / (cols * self.dtype.size()).max(1)).clamp(1, rows.max(1));
        let work = rows * cols * n;
        let run_rows = |r0: usize, r1: usize, out: &mut dyn FnMut(usize, usize, f32)| {
            for r in r0..r1 {
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let v = match self.dtype {
                        DType::F32 => dot_f32(&self.f32s()[r * cols..(r + 1) * cols], xt),
                        DType::F16 => dot_with(&self.f16s()[r * cols..(r + 1) * cols], xt, |v| v.to_f32()),
                        DType::BF16 => dot_with(&self.bf16s()[r * cols..(r + 1) * cols], xt, |v| v.to_f32()),
                    };
                    out(t, r, v);
                }
            }
        };
        if work < 64 * 1024 || rayon::current_num_threads() == 1 {
            run_rows(0, rows, &mut |t, r, v| y[t * rows + r] = v);
            return;
        }
        // Each task writes its own block of rows into a local buffer, then the blocks are scattered.
        let blocks: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(chunk_rows))
            .into_par_iter()
            .map(|b| {
                let r0 = b * chunk_rows;
                let r1 = (r0 + chunk_rows).min(rows);
                let mut local = vec![0.0f32; (r1 - r0) * n];
                run_rows(r0, r1, &mut |t, r, v| local[t * (r1 - r0) + (r - r0)] = v);
                (r0, local)
            })
            .collect();
        for (r0, local) in blocks {
            let w = local.len() / n.max(1);
            for t in 0..n {
                y[t * rows + r0..t * rows + r0 + w].copy_from_slice(&local[t * w..(t + 1) * w]);
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
