//! Magnitude pruning (algorithms.md §6): per row, zero the smallest |w|, either a fraction of the row or N of
//! every M consecutive weights. With N:M and cols % M ≠ 0 the ragged last chunk (< M columns) stays dense: a
//! kernel for N:M needs whole chunks, and pruning a partial chunk at N/M would be a different pattern.
//! With a quant spec the kept weights are then RTN-quantized.

use rayon::prelude::*;

use super::rtn::rtn_quantize;
use super::{check_inputs, prune_count, CompressError, Compressed, Compressor, Hessian, Matrix, QuantSpec, Sparsity};

/// Magnitude pruning, optionally followed by RTN quantization of the kept weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Magnitude {
    pub sparsity: Sparsity,
    pub quant: Option<QuantSpec>,
}

/// Indices of the `k` smallest `score(i)` among `idx` (moved to the front of `idx`). Ties break arbitrarily.
pub(crate) fn smallest_k(idx: &mut [usize], k: usize, score: impl Fn(usize) -> f32) {
    if k == 0 || k >= idx.len() {
        return;
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| score(a).total_cmp(&score(b)));
}

/// Row-major keep-mask (true = kept) choosing the pruned weights by |w| per row.
pub(crate) fn magnitude_keep_mask(w: &Matrix, s: Sparsity) -> Vec<bool> {
    let cols = w.cols;
    let mut keep = vec![true; w.rows * cols];
    keep.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, kr)| {
        let row = w.row(r);
        match s {
            Sparsity::Unstructured(p) => {
                let k = prune_count(p, cols);
                let mut idx: Vec<usize> = (0..cols).collect();
                smallest_k(&mut idx, k, |i| row[i].abs());
                idx[..k].iter().for_each(|&i| kr[i] = false);
            }
            Sparsity::NM { n, m } => {
                for start in (0..cols / m).map(|c| c * m) {
                    let mut idx: Vec<usize> = (start..start + m).collect();
                    smallest_k(&mut idx, n, |i| row[i].abs());
                    idx[..n].iter().for_each(|&i| kr[i] = false);
                }
            }
        }
    });
    keep
}

impl Compressor for Magnitude {
    fn compress(&self, w: &Matrix, h: &Hessian, cancel: &dyn Fn() -> bool) -> Result<Compressed, CompressError> {
        check_inputs(w, h)?;
        if cancel() {
            return Err(CompressError::Cancelled);
        }
        Ok(self.apply(w))
    }
}

impl Magnitude {
    /// The compression itself, which reads no calibration data.
    pub(crate) fn apply(&self, w: &Matrix) -> Compressed {
        let keep = magnitude_keep_mask(w, self.sparsity);
        if let Some(spec) = &self.quant {
            let (weight, q) = rtn_quantize(w, spec, Some(keep));
            return Compressed { weight, quant: Some(q), damp_used: None };
        }
        let mut weight = w.clone();
        weight.data.iter_mut().zip(&keep).filter(|(_, &k)| !k).for_each(|(v, _)| *v = 0.0);
        Compressed { weight, quant: None, damp_used: None }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    #[test]
    fn magnitude_prunes_exact_fraction_of_smallest_per_row() {
        let (w, h) = testutil::layer(5, 172, 31);
        let c = Magnitude { sparsity: Sparsity::Unstructured(0.5), quant: None }.compress(&w, &h, &|| false).unwrap();
        for r in 0..5 {
            let row = c.weight.row(r);
            let zeros = row.iter().filter(|&&v| v == 0.0).count();
            assert_eq!(zeros, 86);
            // Every kept |w| ≥ every pruned |w|.
            let max_pruned = (0..172).filter(|&i| row[i] == 0.0).map(|i| w.get(r, i).abs()).fold(0f32, f32::max);
            let min_kept = (0..172).filter(|&i| row[i] != 0.0).map(|i| w.get(r, i).abs()).fold(f32::MAX, f32::min);
            assert!(max_pruned <= min_kept);
        }
    }

    #[test]
    fn magnitude_two_of_four_leaves_ragged_tail_dense() {
        // 18 columns = 4 full chunks + 2 dense columns.
        let (w, h) = testutil::layer(3, 18, 32);
        let c =
            Magnitude { sparsity: Sparsity::NM { n: 2, m: 4 }, quant: None }.compress(&w, &h, &|| false).unwrap();
        for r in 0..3 {
            let row = c.weight.row(r);
            for chunk in row[..16].chunks(4) {
                assert_eq!(chunk.iter().filter(|&&v| v == 0.0).count(), 2);
            }
            assert_eq!(&row[16..], &w.row(r)[16..]);
        }
    }
}
