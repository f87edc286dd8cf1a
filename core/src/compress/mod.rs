//! Layer-wise compressors (algorithms.md): each method is one file behind the `Compressor` trait, working on one
//! linear layer's weight and its calibration Hessian. Calibration (collecting Hessians layer by layer) lives in
//! `crate::calib`; plans (which method where) in `crate::plan`.
//!
//! This module is the edge: [`LayerJob`] is the serde setting a plan carries, [`validate`] checks it once with a
//! clear message, and [`compress_layer`] dispatches to a method. Inner code trusts a validated job.

pub mod error;
pub mod error_feedback;
pub mod gptq;
pub mod grid;
pub mod hessian;
pub mod linalg;
pub mod magnitude;
pub mod obc;
pub mod rtn;
pub mod sparsegpt;
mod sweep;
pub mod types;

#[cfg(test)]
mod testutil;

pub use error::relative_error;
pub use gptq::Gptq;
pub use grid::Grid;
pub use hessian::HessianAccumulator;
pub use magnitude::Magnitude;
pub use obc::Obc;
pub use rtn::Rtn;
pub use sparsegpt::SparseGpt;
pub use types::*;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Largest layer (input columns) OBC accepts: it costs O(c³) per output row.
pub const OBC_MAX_COLS: usize = 1024;

/// Which layer-wise algorithm compresses a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Round to nearest (algorithms.md §6), no error feedback.
    Rtn,
    /// Prune smallest |w| per row (algorithms.md §6).
    Magnitude,
    /// GPTQ (algorithms.md §3).
    Gptq,
    /// SparseGPT (algorithms.md §4), optionally joint with quantization.
    #[serde(rename = "sparsegpt")]
    SparseGpt,
    /// Exact greedy OBS (algorithms.md §5); small layers only.
    Obc,
}

impl Method {
    /// Whether the method reads the calibration Hessian (GPTQ, SparseGPT, OBC); RTN and magnitude read only the
    /// weights, so they need no calibration pass and ignore error feedback.
    pub fn uses_hessian(self) -> bool {
        matches!(self, Method::Gptq | Method::SparseGpt | Method::Obc)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Rtn => "rtn",
            Method::Magnitude => "magnitude",
            Method::Gptq => "gptq",
            Method::SparseGpt => "sparsegpt",
            Method::Obc => "obc",
        })
    }
}

fn default_damp() -> f64 {
    0.01
}
fn default_block_size() -> usize {
    128
}

/// Everything needed to compress one layer: the method and its settings.
///
/// `quant.act_order` and `quant.static_groups` only change GPTQ; the other methods ignore them, so one QuantSpec
/// can drive GPTQ and its RTN baseline alike.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerJob {
    pub method: Method,
    #[serde(default)]
    pub quant: Option<QuantSpec>,
    #[serde(default)]
    pub sparsity: Option<Sparsity>,
    /// Dampening as a fraction of mean diag(H) (algorithms.md §3.3); raised automatically if Cholesky fails.
    #[serde(default = "default_damp")]
    pub damp: f64,
    /// Columns per lazy batch update (GPTQ/SparseGPT).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
}

impl LayerJob {
    /// A job with the default damp (0.01) and block size (128).
    pub fn new(method: Method, quant: Option<QuantSpec>, sparsity: Option<Sparsity>) -> Self {
        Self { method, quant, sparsity, damp: default_damp(), block_size: default_block_size() }
    }
}

/// What can go wrong compressing a layer. Messages name the field and the value found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompressError {
    #[error("compression cancelled")]
    Cancelled,
    #[error("invalid compression settings: {0}")]
    InvalidSpec(String),
    /// Weight and Hessian (or calibration batch) sizes disagree.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// NaN/Inf in an input; the message says which tensor and where.
    #[error("numerical problem: {0}")]
    Numerical(String),
    /// H + λI was not positive definite even at the largest dampening tried.
    #[error("Cholesky factorization of the damped Hessian failed (last damp tried: {damp})")]
    CholeskyFailed { damp: f64 },
}

/// One layer-wise compression method. Every method shares this call so a plan can run any of them.
pub trait Compressor {
    /// Compress `w` (rows = out, cols = in) against the Hessian `h` of its inputs (`h.n == w.cols`).
    /// `cancel` is polled at safe points (between blocks / rows); when it returns true the call returns
    /// [`CompressError::Cancelled`].
    fn compress(&self, w: &Matrix, h: &Hessian, cancel: &dyn Fn() -> bool) -> Result<Compressed, CompressError>;
}

fn validate_quant(q: &QuantSpec) -> Result<(), CompressError> {
    if !(2..=8).contains(&q.bits) {
        return Err(CompressError::InvalidSpec(format!("quant.bits must be in 2..=8, found {}", q.bits)));
    }
    if q.group == Some(0) {
        return Err(CompressError::InvalidSpec("quant.group must be at least 1 (or absent for per-channel), found 0".into()));
    }
    Ok(())
}

fn validate_sparsity(s: &Sparsity) -> Result<(), CompressError> {
    match *s {
        Sparsity::Unstructured(p) => {
            if !(p.is_finite() && (0.0..1.0).contains(&p)) {
                return Err(CompressError::InvalidSpec(format!(
                    "sparsity fraction must be in [0, 1), found {p}"
                )));
            }
        }
        Sparsity::NM { n, m } => {
            if n == 0 || m == 0 {
                return Err(CompressError::InvalidSpec(format!("N:M sparsity needs N ≥ 1 and M ≥ 1, found {n}:{m}")));
            }
            if n >= m {
                return Err(CompressError::InvalidSpec(format!(
                    "N:M sparsity prunes N of every M weights and needs N < M, found {n}:{m}"
                )));
            }
        }
    }
    Ok(())
}

/// Check a job once at the edge, so compressors can trust their settings.
pub fn validate(job: &LayerJob) -> Result<(), CompressError> {
    if let Some(q) = &job.quant {
        validate_quant(q)?;
    }
    if let Some(s) = &job.sparsity {
        validate_sparsity(s)?;
    }
    if !(job.damp.is_finite() && job.damp >= 0.0) {
        return Err(CompressError::InvalidSpec(format!("damp must be a finite number ≥ 0, found {}", job.damp)));
    }
    if job.block_size == 0 {
        return Err(CompressError::InvalidSpec("block_size must be at least 1, found 0".into()));
    }
    let m = job.method;
    // Act-order is the order GPTQ/SparseGPT visit columns in; round-to-nearest and magnitude have no order.
    if !m.uses_hessian() && job.quant.as_ref().is_some_and(|q| q.act_order) {
        return Err(CompressError::InvalidSpec(format!("act_order applies to gptq, sparsegpt and obc, not to {m}")));
    }
    match (m, &job.quant, &job.sparsity) {
        (Method::Rtn | Method::Gptq, None, _) => {
            Err(CompressError::InvalidSpec(format!("method {m} needs a quant spec")))
        }
        (Method::Gptq, Some(_), Some(_)) => Err(CompressError::InvalidSpec(
            "method gptq does not prune; use sparsegpt for joint sparsity + quantization".into(),
        )),
        (Method::Magnitude | Method::SparseGpt, _, None) => {
            Err(CompressError::InvalidSpec(format!("method {m} needs a sparsity setting")))
        }
        (Method::Obc, None, None) => {
            Err(CompressError::InvalidSpec("method obc needs a quant spec, a sparsity setting, or both".into()))
        }
        _ => Ok(()),
    }
}

/// Compresses one layer with a method that reads no calibration data (RTN, magnitude), or `None` for the
/// Hessian-based methods. A plan of only such methods can be applied linear by linear at load, with no
/// calibration pass (see `runtime::pack_data_free`).
pub fn compress_data_free(job: &LayerJob, w: &Matrix) -> Option<Result<Compressed, CompressError>> {
    if let Err(e) = validate(job) {
        return Some(Err(e));
    }
    match (job.method, &job.quant, job.sparsity) {
        (Method::Rtn, Some(quant), sparsity) => Some(Ok(Rtn { quant: quant.clone(), sparsity }.apply(w))),
        (Method::Magnitude, quant, Some(sparsity)) => Some(Ok(Magnitude { sparsity, quant: quant.clone() }.apply(w))),
        _ => None,
    }
}

/// Validate `job`, then compress one layer with its method.
pub fn compress_layer(
    job: &LayerJob,
    w: &Matrix,
    h: &Hessian,
    cancel: &dyn Fn() -> bool,
) -> Result<Compressed, CompressError> {
    validate(job)?;
    // validate() guarantees the Options each arm unwraps are present; `ok_or` keeps that a typed error anyway.
    let missing = |what: &str| CompressError::InvalidSpec(format!("method {} needs {what}", job.method));
    match job.method {
        Method::Rtn => Rtn { quant: job.quant.clone().ok_or_else(|| missing("a quant spec"))?, sparsity: job.sparsity }
            .compress(w, h, cancel),
        Method::Magnitude => {
            Magnitude { sparsity: job.sparsity.ok_or_else(|| missing("a sparsity setting"))?, quant: job.quant.clone() }
                .compress(w, h, cancel)
        }
        Method::Gptq => Gptq {
            quant: job.quant.clone().ok_or_else(|| missing("a quant spec"))?,
            damp: job.damp,
            block_size: job.block_size,
        }
        .compress(w, h, cancel),
        Method::SparseGpt => SparseGpt {
            sparsity: job.sparsity.ok_or_else(|| missing("a sparsity setting"))?,
            quant: job.quant.clone(),
            damp: job.damp,
            block_size: job.block_size,
        }
        .compress(w, h, cancel),
        Method::Obc => Obc { quant: job.quant.clone(), sparsity: job.sparsity, damp: job.damp }.compress(w, h, cancel),
    }
}

/// Shared input checks: shapes agree and nothing is NaN/Inf. Every compressor calls this first.
pub(crate) fn check_inputs(w: &Matrix, h: &Hessian) -> Result<(), CompressError> {
    if w.rows == 0 || w.cols == 0 {
        return Err(CompressError::Shape(format!("layer weight is empty ({}×{})", w.rows, w.cols)));
    }
    if w.data.len() != w.rows * w.cols {
        return Err(CompressError::Shape(format!(
            "weight has {} values but claims {}×{}",
            w.data.len(),
            w.rows,
            w.cols
        )));
    }
    if h.n != w.cols || h.data.len() != h.n * h.n {
        return Err(CompressError::Shape(format!(
            "Hessian is {}×{} ({} values) but the weight has {} input columns",
            h.n,
            h.n,
            h.data.len(),
            w.cols
        )));
    }
    // Parallel scans first (H can be 28k² values); positions are looked up only on failure.
    let finite = |v: &[f64]| v.par_chunks(1 << 16).all(|c| c.iter().all(|x| x.is_finite()));
    if w.data.par_chunks(1 << 16).all(|c| c.iter().all(|x| x.is_finite())) && finite(&h.data) {
        return Ok(());
    }
    if let Some(i) = w.data.iter().position(|x| !x.is_finite()) {
        return Err(CompressError::Numerical(format!(
            "weight value at row {}, column {} is {}",
            i / w.cols.max(1),
            i % w.cols.max(1),
            w.data[i]
        )));
    }
    if let Some(i) = h.data.iter().position(|x| !x.is_finite()) {
        return Err(CompressError::Numerical(format!(
            "Hessian entry ({}, {}) is {}",
            i / h.n.max(1),
            i % h.n.max(1),
            h.data[i]
        )));
    }
    Ok(())
}

/// Hessian-based methods additionally need calibration: an all-zero diagonal means no input was ever seen, and
/// the dead-input rule would silently zero the whole layer.
pub(crate) fn check_calibrated(h: &Hessian) -> Result<(), CompressError> {
    if (0..h.n).all(|i| h.data[i * h.n + i] == 0.0) {
        return Err(CompressError::Numerical(format!(
            "Hessian diagonal is all zero ({} samples accumulated): no calibration input reached this layer",
            h.samples
        )));
    }
    Ok(())
}

/// Number of weights to prune out of `n` at fraction `p` (rounded, so 50% of 172 is 86).
pub(crate) fn prune_count(p: f32, n: usize) -> usize {
    ((p as f64 * n as f64).round() as usize).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(quant: Option<QuantSpec>, sparsity: Option<Sparsity>, method: Method) -> LayerJob {
        LayerJob::new(method, quant, sparsity)
    }

    #[test]
    fn validate_rejects_bits_1_and_9() {
        for bits in [1u8, 9] {
            let q = QuantSpec { bits, ..Default::default() };
            let err = validate(&job(Some(q), None, Method::Gptq)).unwrap_err();
            assert!(matches!(&err, CompressError::InvalidSpec(m) if m.contains("bits")), "{err}");
        }
        for bits in 2u8..=8 {
            let q = QuantSpec { bits, ..Default::default() };
            assert!(validate(&job(Some(q), None, Method::Gptq)).is_ok());
        }
    }

    #[test]
    fn validate_rejects_group_zero() {
        let q = QuantSpec { group: Some(0), ..Default::default() };
        let err = validate(&job(Some(q), None, Method::Rtn)).unwrap_err();
        assert!(matches!(&err, CompressError::InvalidSpec(m) if m.contains("group")), "{err}");
    }

    #[test]
    fn validate_rejects_sparsity_at_or_above_one() {
        for p in [1.0f32, 1.5, -0.1, f32::NAN] {
            let err = validate(&job(None, Some(Sparsity::Unstructured(p)), Method::SparseGpt)).unwrap_err();
            assert!(matches!(&err, CompressError::InvalidSpec(m) if m.contains("[0, 1)")), "{err}");
        }
        assert!(validate(&job(None, Some(Sparsity::Unstructured(0.0)), Method::SparseGpt)).is_ok());
        assert!(validate(&job(None, Some(Sparsity::Unstructured(0.99)), Method::SparseGpt)).is_ok());
    }

    #[test]
    fn validate_rejects_n_greater_than_m_and_zero_n() {
        for (n, m) in [(5, 4), (4, 4), (0, 4), (1, 0)] {
            let err = validate(&job(None, Some(Sparsity::NM { n, m }), Method::Magnitude)).unwrap_err();
            assert!(matches!(err, CompressError::InvalidSpec(_)), "{n}:{m}");
        }
        assert!(validate(&job(None, Some(Sparsity::NM { n: 2, m: 4 }), Method::Magnitude)).is_ok());
    }

    #[test]
    fn validate_checks_method_needs() {
        assert!(validate(&job(None, None, Method::Gptq)).is_err());
        assert!(validate(&job(Some(QuantSpec::default()), None, Method::SparseGpt)).is_err());
        assert!(validate(&job(None, None, Method::Obc)).is_err());
        let mut j = job(Some(QuantSpec::default()), None, Method::Gptq);
        j.damp = -1.0;
        assert!(validate(&j).is_err());
        j.damp = 0.01;
        j.block_size = 0;
        assert!(validate(&j).is_err());
    }

    #[test]
    fn method_serde_uses_lowercase_names() {
        for (m, s) in [
            (Method::Rtn, "\"rtn\""),
            (Method::Magnitude, "\"magnitude\""),
            (Method::Gptq, "\"gptq\""),
            (Method::SparseGpt, "\"sparsegpt\""),
            (Method::Obc, "\"obc\""),
        ] {
            assert_eq!(serde_json::to_string(&m).unwrap(), s);
            assert_eq!(serde_json::from_str::<Method>(s).unwrap(), m);
        }
        let j: LayerJob = serde_json::from_str(r#"{"method":"gptq","quant":{"bits":3,"group":null,"sym":false,"act_order":false,"static_groups":false,"mse":false}}"#).unwrap();
        assert_eq!(j.damp, 0.01);
        assert_eq!(j.block_size, 128);
    }

    #[test]
    fn hessian_methods_reject_uncalibrated_layer() {
        let w = Matrix::from_vec(2, 4, vec![0.5; 8]);
        let h = Hessian::zeros(4);
        for job in [
            job(Some(QuantSpec::default()), None, Method::Gptq),
            job(None, Some(Sparsity::Unstructured(0.5)), Method::SparseGpt),
            job(Some(QuantSpec::default()), None, Method::Obc),
        ] {
            let err = compress_layer(&job, &w, &h, &|| false).unwrap_err();
            assert!(matches!(&err, CompressError::Numerical(m) if m.contains("no calibration")), "{err}");
        }
        // RTN needs no Hessian values.
        assert!(compress_layer(&job(Some(QuantSpec::default()), None, Method::Rtn), &w, &h, &|| false).is_ok());
    }

    #[test]
    fn compress_layer_reports_nan_weight_position() {
        let mut w = Matrix::zeros(2, 3);
        w.data[4] = f32::NAN;
        let mut h = Hessian::zeros(3);
        for i in 0..3 {
            h.data[i * 3 + i] = 1.0;
        }
        let err = compress_layer(&job(Some(QuantSpec::default()), None, Method::Rtn), &w, &h, &|| false).unwrap_err();
        assert!(matches!(&err, CompressError::Numerical(m) if m.contains("row 1, column 1")), "{err}");
        let w = Matrix::zeros(2, 3);
        h.data[1] = f64::INFINITY;
        let err = compress_layer(&job(Some(QuantSpec::default()), None, Method::Rtn), &w, &h, &|| false).unwrap_err();
        assert!(matches!(&err, CompressError::Numerical(m) if m.contains("Hessian")), "{err}");
    }
}
