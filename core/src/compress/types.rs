//! Plain data shared by every compressor: a row-major f32 matrix in the HF `[out, in]` layout, the layer Hessian,
//! the settings of a quantization grid and of a sparsity pattern, and the quantized form a compressor returns
//! (integer codes plus per-group scales and zero points), which exporters pack and kernels run.

use serde::{Deserialize, Serialize};

/// Row-major `rows × cols` f32 matrix (`rows` = out_features, `cols` = in_features, the HF `weight` layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length must be rows*cols");
        Self { rows, cols, data }
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }
}

/// Symmetric `n × n` Hessian H = 2/m Σ x xᵀ of one linear layer's inputs, kept in f64 because it is a sum over
/// many samples of values whose magnitudes differ by orders (c up to 28k).
#[derive(Clone, Debug)]
pub struct Hessian {
    pub n: usize,
    /// Row-major n×n.
    pub data: Vec<f64>,
    /// Number of input vectors accumulated so far.
    pub samples: usize,
}

impl Hessian {
    pub fn zeros(n: usize) -> Self {
        Self { n, data: vec![0.0; n * n], samples: 0 }
    }
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }
}

/// Settings of the integer grid (algorithms.md §2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantSpec {
    /// 2..=8.
    pub bits: u8,
    /// Group size along the input dimension; `None` = one group per output row (per-channel).
    pub group: Option<usize>,
    pub sym: bool,
    /// GPTQ only: process columns by descending diag(H).
    pub act_order: bool,
    /// With act-order: fit group parameters on the unpermuted weights so groups stay contiguous (no g_idx needed).
    pub static_groups: bool,
    /// Search a shrink factor of the grid range minimizing the squared error (`grid::MSE_NORM`).
    pub mse: bool,
}

impl Default for QuantSpec {
    fn default() -> Self {
        Self { bits: 4, group: Some(128), sym: true, act_order: false, static_groups: false, mse: false }
    }
}

impl QuantSpec {
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
    /// Effective group size for a layer with `cols` inputs.
    pub fn group_size(&self, cols: usize) -> usize {
        self.group.unwrap_or(cols).min(cols).max(1)
    }
}

/// Sparsity pattern: a fraction of weights per row, or N zeros in every M consecutive inputs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Sparsity {
    Unstructured(f32),
    /// `n` of every `m` consecutive weights of a row are zero (2:4 = NM { n: 2, m: 4 }).
    NM { n: usize, m: usize },
}

/// A quantized linear layer: integer codes plus per-group scale and zero point.
/// Dequantized weight: `W[o, i] = scales[o * n_groups + g] * (codes[o * cols + i] as f32 - zeros[o * n_groups + g])`
/// with `g = g_idx[i]` when `g_idx` is present, else `i / group_size`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLinear {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    /// Columns per group (== cols for per-channel). The last group may be shorter (ragged).
    pub group_size: usize,
    pub sym: bool,
    /// Unsigned codes in [0, 2^bits − 1], row-major [rows × cols].
    pub codes: Vec<u8>,
    /// Per (row, group) scale, row-major [rows × n_groups]; values are exactly representable in f16
    /// so that an f16 export dequantizes bit-identically.
    pub scales: Vec<f32>,
    /// Per (row, group) integer zero point in [0, 2^bits − 1], row-major [rows × n_groups].
    pub zeros: Vec<u8>,
    /// Group of each input column (act-order without static groups); `None` means `i / group_size`.
    pub g_idx: Option<Vec<u32>>,
    /// Keep-mask for sparse+quantized layers (true = kept), row-major; `None` = dense.
    pub mask: Option<Vec<bool>>,
}

impl QuantizedLinear {
    pub fn n_groups(&self) -> usize {
        self.cols.div_ceil(self.group_size)
    }
    pub fn group_of(&self, col: usize) -> usize {
        match &self.g_idx {
            Some(g) => g[col] as usize,
            None => col / self.group_size,
        }
    }
    pub fn dequantize(&self) -> Matrix {
        let ng = self.n_groups();
        let mut out = Matrix::zeros(self.rows, self.cols);
        for o in 0..self.rows {
            for i in 0..self.cols {
                let g = self.group_of(i);
                let s = self.scales[o * ng + g];
                let z = self.zeros[o * ng + g] as f32;
                let kept = self.mask.as_ref().is_none_or(|m| m[o * self.cols + i]);
                out.data[o * self.cols + i] = if kept { s * (self.codes[o * self.cols + i] as f32 - z) } else { 0.0 };
            }
        }
        out
    }
    /// Bits per weight as stored: codes, plus an f16 scale and a `bits`-wide zero per group.
    pub fn stored_bits_per_weight(&self) -> f64 {
        let groups = (self.rows * self.n_groups()) as f64;
        let weights = (self.rows * self.cols) as f64;
        self.bits as f64 + groups * (16.0 + self.bits as f64) / weights
    }
}

/// What a compressor returns for one layer.
#[derive(Clone, Debug)]
pub struct Compressed {
    /// The weights the model will use (dequantized, pruned weights exactly 0).
    pub weight: Matrix,
    /// The integer form, when the method quantizes.
    pub quant: Option<QuantizedLinear>,
    /// Dampening actually used (fraction of mean diag(H)), for Hessian-based methods.
    pub damp_used: Option<f64>,
}
