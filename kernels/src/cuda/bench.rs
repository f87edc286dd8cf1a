//! `whittle bench gemv --device cuda`: a GEMV of a random weight on the GPU against the device-memory read bandwidth
//! measured in the same run, and against the f16 GEMV of the same shape (the speedup Marlin reports ~3.9× for at
//! batch 1–16). Layers are timed round-robin over copies so the working set exceeds the L2 cache, as decoding a
//! model does.

use super::{CudaDevice, CudaLinear};
use crate::bench::{bench_weight, copies_for, GemvShape, SplitMix};
use crate::Weight;
use std::sync::Arc;

/// Result of [`bench_gemv_cuda`].
#[derive(Clone, Debug)]
pub struct CudaGemvReport {
    /// Median seconds per single-token GEMV, kernel only (input resident on the device).
    pub seconds: f64,
    /// Bytes the kernel reads per call (codes or values, scales, zeros).
    pub bytes_read: usize,
    pub gbps: f64,
    /// Device-memory read bandwidth measured in the same run, GB/s.
    pub stream_gbps: f64,
    pub fraction_of_bandwidth: f64,
    /// The dense f16 GEMV of the same shape.
    pub f16_seconds: f64,
    pub speedup_over_f16: f64,
    pub device: String,
    pub label: String,
}

/// Median seconds per call and bytes read per call of `w` on `dev`.
fn time_weight(dev: &Arc<CudaDevice>, w: &Weight, x: &[f32]) -> Result<(f64, usize), String> {
    let first = CudaLinear::upload(dev, w)?;
    let bytes = first.streamed_bytes();
    let mut lins = vec![first];
    for _ in 1..copies_for(bytes) {
        lins.push(CudaLinear::upload(dev, w)?);
    }
    let mut runs = Vec::new();
    for _ in 0..7 {
        runs.push(CudaLinear::time_resident(&lins, x, 200)?);
    }
    runs.sort_by(|a, b| a.total_cmp(b));
    Ok((runs[runs.len() / 2], bytes))
}

/// Times the GEMV of a random `shape` weight (`bits` 4 with groups of `group`, or 2:4 with 4-bit values) and the
/// f16 GEMV of the same shape on `dev`.
pub fn bench_gemv_cuda(
    dev: &Arc<CudaDevice>,
    shape: GemvShape,
    bits: u8,
    group: usize,
    sparse24: bool,
) -> Result<CudaGemvReport, String> {
    let w = bench_weight(shape, bits, group, sparse24).map_err(|e| e.to_string())?;
    let mut rng = SplitMix(7);
    let x: Vec<f32> = (0..shape.cols).map(|_| rng.f32()).collect();
    let (seconds, bytes_read) = time_weight(dev, &w, &x)?;
    let f16 = bench_weight(shape, 16, 0, false).map_err(|e| e.to_string())?;
    let (f16_seconds, _) = time_weight(dev, &f16, &x)?;
    let stream_gbps = dev.stream_read_gbps(1 << 30)?;
    let gbps = bytes_read as f64 / seconds / 1e9;
    let kind = match (bits, sparse24) {
        (16, _) => "f16 dense".to_string(),
        (_, true) => format!("2:4 + int{bits} g{group}"),
        _ => format!("int{bits} g{group}"),
    };
    Ok(CudaGemvReport {
        seconds,
        bytes_read,
        gbps,
        stream_gbps,
        fraction_of_bandwidth: gbps / stream_gbps,
        f16_seconds,
        speedup_over_f16: f16_seconds / seconds,
        device: dev.name().to_string(),
        label: format!("{kind} {}x{} (CUDA)", shape.rows, shape.cols),
    })
}
