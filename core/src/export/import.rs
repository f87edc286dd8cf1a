//! Opening quantized checkpoints (GPTQ v1, compressed-tensors `pack-quantized` and `sparse-24-bitmask`), whether
//! Whittle wrote them or another tool did, so they can be evaluated, chatted with, re-exported or recompressed.
//!
//! The model loader asks the parsed `quantization_config` how each linear is stored ([`QuantConfig::scheme_for`])
//! and, for anything but a plain `weight`, calls [`read_linear`]. Packed layers are unpacked to a
//! [`QuantizedLinear`] (kept on the loaded model, so a re-export writes the very same codes) and run by the
//! kernels' packed or 2:4 layouts ([`kernel_weight`]), never expanded to float unless no kernel layout can hold
//! them. Every failure names the file and the tensor, because the checkpoint may come from a tool the user did not
//! write and they need to know which part of it is wrong.

use std::path::Path;

use whittle_kernels::{DenseWeight, PackedWeight, QuantParts, Sparse24Weight, Weight};

use super::compressed_tensors::{unpack_compressed_tensors, unpack_sparse24_bitmask, CtPackedTensors, Sparse24Tensors};
use super::config::{parse_quantization_config, ModuleScheme, QuantConfig};
use super::gptq::{unpack_gptq, GptqTensors};
use super::tensor::{Dtype, RawTensor};
use super::ExportError;
use crate::compress::types::{Matrix, QuantizedLinear};
use crate::error::{Result, WhittleError};
use crate::model::weights::WeightStore;

/// A linear read from a packed or compressed checkpoint layout.
#[derive(Clone, Debug)]
pub enum ImportedLinear {
    /// Integer codes (GPTQ or pack-quantized).
    Quantized(QuantizedLinear),
    /// A sparse-24-bitmask layer decompressed to its dense values (pruned weights exactly 0).
    Dense(Matrix),
}

/// The `quantization_config` of a model folder's `config.json`, or `None` for a float checkpoint. `text` is the
/// file's content (parsed again here because GPTQModel's `dynamic` rules depend on key order).
pub fn quant_config_of(config_path: &Path, text: &str) -> Result<Option<QuantConfig>> {
    parse_quantization_config(text).map_err(|e| WhittleError::file(config_path, e.to_string()))
}

/// An [`ExportError`] about `tensor` as an error naming the file it lives in.
fn in_file(store: &WeightStore, tensor: &str, e: ExportError) -> WhittleError {
    WhittleError::file(store.path_of(tensor), e.to_string())
}

/// One stored tensor as a [`RawTensor`] (bytes copied out of the map; packed tensors are small).
fn raw(store: &WeightStore, name: &str) -> Result<RawTensor> {
    let (dtype, shape, bytes) = store.raw(name)?;
    let d = Dtype::from_safetensors(dtype).ok_or_else(|| {
        WhittleError::field(
            store.path_of(name),
            name,
            format!("dtype {dtype:?} is not used by GPTQ or compressed-tensors"),
        )
    })?;
    RawTensor::from_bytes(name, d, shape, bytes.as_slice().to_vec()).map_err(|e| in_file(store, name, e))
}

fn raw_opt(store: &WeightStore, name: &str) -> Result<Option<RawTensor>> {
    if store.contains(name) {
        raw(store, name).map(Some)
    } else {
        Ok(None)
    }
}

/// Reads linear `name` (`rows` outputs × `cols` inputs, from config.json) stored as `scheme`. `None` for
/// [`ModuleScheme::Dense`]: the caller reads the plain `weight` tensor as for any float checkpoint.
pub fn read_linear(
    store: &WeightStore,
    scheme: ModuleScheme,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Option<ImportedLinear>> {
    let t = |suffix: &str| format!("{name}.{suffix}");
    match scheme {
        ModuleScheme::Dense => Ok(None),
        ModuleScheme::Gptq(p) => {
            let head = t("qweight");
            let tensors = GptqTensors::from_raw(
                name,
                &raw(store, &head)?,
                &raw(store, &t("qzeros"))?,
                &raw(store, &t("scales"))?,
                raw_opt(store, &t("g_idx"))?.as_ref(),
            )
            .map_err(|e| in_file(store, &head, e))?;
            let q = unpack_gptq(name, &tensors, &p, rows, cols).map_err(|e| in_file(store, &head, e))?;
            Ok(Some(ImportedLinear::Quantized(with_derived_24_mask(q))))
        }
        ModuleScheme::PackQuantized(p) => {
            let head = t("weight_packed");
            let tensors = CtPackedTensors::from_raw(
                name,
                &raw(store, &head)?,
                &raw(store, &t("weight_scale"))?,
                raw_opt(store, &t("weight_zero_point"))?.as_ref(),
                raw_opt(store, &t("weight_g_idx"))?.as_ref(),
                &raw(store, &t("weight_shape"))?,
            )
            .map_err(|e| in_file(store, &head, e))?;
            if tensors.weight_shape != [rows, cols] {
                return Err(WhittleError::field(
                    store.path_of(&t("weight_shape")),
                    t("weight_shape"),
                    format!("holds {:?}, but config.json implies [{rows}, {cols}]", tensors.weight_shape),
                ));
            }
            let q = unpack_compressed_tensors(name, &tensors, &p).map_err(|e| in_file(store, &head, e))?;
            Ok(Some(ImportedLinear::Quantized(with_derived_24_mask(q))))
        }
        ModuleScheme::Sparse24Bitmask => {
            let head = t("compressed");
            let tensors = Sparse24Tensors::from_raw(
                name,
                &raw(store, &head)?,
                &raw(store, &t("bitmask"))?,
                &raw(store, &t("shape"))?,
            )
            .map_err(|e| in_file(store, &head, e))?;
            if (tensors.rows, tensors.cols) != (rows, cols) {
                return Err(WhittleError::field(
                    store.path_of(&t("shape")),
                    t("shape"),
                    format!("holds [{}, {}], but config.json implies [{rows}, {cols}]", tensors.rows, tensors.cols),
                ));
            }
            let m = unpack_sparse24_bitmask(name, &tensors).map_err(|e| in_file(store, &head, e))?;
            Ok(Some(ImportedLinear::Dense(m)))
        }
    }
}

/// A 2:4 sparse + quantized layer is stored as plain codes (pruned weights at their zero point, see
/// [`super::compressed_tensors`]). When every run of 4 inputs of every row has at most 2 codes off the zero point,
/// the keep-mask is recovered so the 2:4 kernel runs it. Dequantized values are identical either way (a code at the
/// zero point is 0), so this only chooses the faster layout and lets a re-export announce the 2:4 structure.
fn with_derived_24_mask(mut q: QuantizedLinear) -> QuantizedLinear {
    if q.mask.is_some() || !q.cols.is_multiple_of(4) {
        return q;
    }
    let ng = q.n_groups();
    let keep: Vec<bool> =
        (0..q.rows * q.cols).map(|k| q.codes[k] != q.zeros[(k / q.cols) * ng + q.group_of(k % q.cols)]).collect();
    if keep.chunks_exact(4).all(|g| g.iter().filter(|&&k| k).count() <= 2) {
        q.mask = Some(keep);
    }
    q
}

fn parts<'a>(q: &'a QuantizedLinear, codes: &'a [u8]) -> QuantParts<'a> {
    QuantParts {
        rows: q.rows,
        cols: q.cols,
        bits: q.bits,
        group_size: q.group_size,
        codes,
        scales: &q.scales,
        zeros: &q.zeros,
        g_idx: q.g_idx.as_deref(),
    }
}

/// The kernel layout that runs `q` directly: 2:4 for masked layers when the 2:4 kernel takes them, packed groups
/// otherwise (pruned codes set to their zero point so the packed kernel sees exact zeros), and dequantized f32 only
/// when neither layout can hold the layer.
pub fn kernel_weight(q: &QuantizedLinear) -> Weight {
    let codes: std::borrow::Cow<'_, [u8]> = match &q.mask {
        None => (&q.codes[..]).into(),
        Some(mask) => {
            if let Ok(w) = Sparse24Weight::from_quantized(parts(q, &q.codes), mask) {
                return Weight::Sparse24(w);
            }
            let ng = q.n_groups();
            let mut c = q.codes.clone();
            for (k, keep) in mask.iter().enumerate() {
                if !keep {
                    c[k] = q.zeros[(k / q.cols) * ng + q.group_of(k % q.cols)];
                }
            }
            c.into()
        }
    };
    match PackedWeight::new(parts(q, &codes)) {
        Ok(w) => Weight::Packed(w),
        Err(_) => Weight::Dense(DenseWeight::from_f32(q.rows, q.cols, q.dequantize().data)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::testutil::simple_layer;

    #[test]
    fn derived_mask_only_for_a_2_4_code_pattern() {
        let q = simple_layer(4, 8, 4, 4, false);
        assert!(with_derived_24_mask(q.clone()).mask.is_none());
        let mut s = q.clone();
        let ng = s.n_groups();
        for k in 0..s.rows * s.cols {
            if (k % 4) >= 2 {
                s.codes[k] = s.zeros[(k / s.cols) * ng + s.group_of(k % s.cols)];
            }
        }
        let d = with_derived_24_mask(s.clone());
        assert_eq!(d.dequantize(), s.dequantize());
        assert!(d.mask.is_some());
    }

    #[test]
    fn kernel_weight_matches_dequantize() {
        for masked in [false, true] {
            let mut q = simple_layer(32, 64, 4, 16, false);
            if masked {
                q.mask = Some((0..q.rows * q.cols).map(|k| k % 4 < 2).collect());
            }
            let w = kernel_weight(&q);
            let x: Vec<f32> = (0..q.cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut y = vec![0.0; q.rows];
            w.matmul(&x, 1, &mut y);
            let d = q.dequantize();
            for (o, yo) in y.iter().enumerate() {
                let want: f32 = d.row(o).iter().zip(&x).map(|(a, b)| a * b).sum();
                assert!((yo - want).abs() <= 1e-4 * (1.0 + want.abs()), "masked {masked} row {o}: {yo} vs {want}");
            }
        }
    }
}
