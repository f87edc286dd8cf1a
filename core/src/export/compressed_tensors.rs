//! compressed-tensors checkpoints (vLLM / llm-compressor, formats.md §2): `pack-quantized` integer layers and
//! `sparse-24-bitmask` 2:4 layers with dense values, packed and unpacked with no file I/O.
//!
//! Why the code space needs no conversion: compressed-tensors quantizes to signed values q_s ∈ [−2^(b−1),
//! 2^(b−1)−1] with a signed zero point, and stores both **+2^(b−1)**. Our codes are unsigned q ∈ [0, 2^b−1] with
//! zero z, i.e. q_s = q − 2^(b−1) and z_s = z − 2^(b−1), so the stored field is exactly our q and our z, and
//! W = s·(q_s − z_s) = s·(q − z). Symmetric means z_s = 0, i.e. our z = 2^(b−1) everywhere; sym layers store no
//! zero point, so a sym layer with any other zero point is refused rather than silently changed.
//!
//! What is valid, and why:
//! * 2..=8 bits (`pack_to_int32` handles 1..8; QuantizedLinear has 2..=8). vLLM's WNA16 kernels load only 4 and
//!   8; [`super::kernel_warnings`] says so.
//! * The group size must divide in_features (or the layer is per-channel): llm-compressor refuses other layers and
//!   compressed-tensors sizes the zero point as `in_features // group_size`, so a ragged last group would be lost.
//!   GPTQ checkpoints handle such layers (`ceil` groups via `g_idx`); export those as GPTQ.
//! * Act-order with a non-trivial `g_idx` is `actorder: "group"` and writes `weight_g_idx`.
//! * Pruned weights of a quantized layer are written as their zero point (exactly 0 after dequantization).
//!
//! 2:4 sparse + quantized: compressed-tensors does **not** stack `sparse-24-bitmask` on top of `pack-quantized`.
//! Its sparsity compressors only touch parameters named `*.weight` (`BaseSparseCompressor.should_compress`), which
//! no longer exist once a layer is pack-quantized, and llm-compressor turns sparse compression off for weight-only
//! quantized models (`SparsityConfigMetadata.is_sparse24_bitmask_supported` returns false), writing a
//! `sparsity_config` with `format: "dense"` as metadata instead; the kernel-specific alternative is `marlin-24`
//! (a different layout, not implemented). So a 2:4 + int layer is exported exactly as pack-quantized (pruned
//! weights = zero point) with a `"dense"` sparsity_config naming it, and a dense-valued 2:4 layer cannot be
//! bitmask-compressed in a checkpoint that also holds quantized layers ([`check_sparse24_alongside`]).

use super::bits::{per_word, word_slot};
use super::config::QuantParams;
use super::error::{ExportError, Result};
use super::gptq::{check_f16_exact, read_g_idx};
use super::tensor::{Dtype, FloatDtype, Packed, RawTensor};
use super::{apply_mask, check_sym_zeros, validate_quantized};
use crate::compress::types::{Matrix, QuantizedLinear};

/// Tensor name suffixes of one pack-quantized layer.
pub const PACK_QUANTIZED_SUFFIXES: [&str; 5] =
    ["weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"];
/// Tensor name suffixes of one sparse-24-bitmask layer.
pub const SPARSE24_SUFFIXES: [&str; 3] = ["compressed", "bitmask", "shape"];

/// The packed tensors of one pack-quantized layer.
#[derive(Clone, Debug, PartialEq)]
pub struct CtPackedTensors {
    /// I32 `[r, ceil(c / (32 // b))]`.
    pub weight_packed: Packed,
    /// Model dtype `[r, G]`.
    pub weight_scale: RawTensor,
    /// I32 `[ceil(r / (32 // b)), G]`, asymmetric layers only.
    pub weight_zero_point: Option<Packed>,
    /// `[c]`, act-order layers only.
    pub weight_g_idx: Option<Vec<i32>>,
    /// Original `[r, c]`.
    pub weight_shape: [usize; 2],
}

impl CtPackedTensors {
    pub fn into_tensors(self, prefix: &str) -> Vec<(String, RawTensor)> {
        let mut out = vec![
            (format!("{prefix}.weight_packed"), self.weight_packed.to_raw()),
            (format!("{prefix}.weight_scale"), self.weight_scale),
        ];
        if let Some(zp) = self.weight_zero_point {
            out.push((format!("{prefix}.weight_zero_point"), zp.to_raw()));
        }
        if let Some(g) = self.weight_g_idx {
            out.push((format!("{prefix}.weight_g_idx"), RawTensor::from_i32(vec![g.len()], &g)));
        }
        let [r, c] = self.weight_shape;
        out.push((format!("{prefix}.weight_shape"), RawTensor::from_i64(vec![2], &[r as i64, c as i64])));
        out
    }

    /// Collects a layer's tensors read from a checkpoint, checking dtypes and the recorded shape.
    pub fn from_raw(
        prefix: &str,
        weight_packed: &RawTensor,
        weight_scale: &RawTensor,
        weight_zero_point: Option<&RawTensor>,
        weight_g_idx: Option<&RawTensor>,
        weight_shape: &RawTensor,
    ) -> Result<Self> {
        let shape_name = format!("{prefix}.weight_shape");
        let shape = two_dims(&shape_name, &weight_shape.to_i64(&shape_name)?)?;
        Ok(Self {
            weight_packed: Packed::from_raw(&format!("{prefix}.weight_packed"), weight_packed)?,
            weight_scale: weight_scale.clone(),
            weight_zero_point: weight_zero_point
                .map(|t| Packed::from_raw(&format!("{prefix}.weight_zero_point"), t))
                .transpose()?,
            weight_g_idx: weight_g_idx.map(|t| t.to_i32(&format!("{prefix}.weight_g_idx"))).transpose()?,
            weight_shape: shape,
        })
    }
}

/// A stored `[r, c]` pair: two positive integers.
fn two_dims(name: &str, v: &[i64]) -> Result<[usize; 2]> {
    match v {
        [r, c] if *r > 0 && *c > 0 => Ok([*r as usize, *c as usize]),
        _ => Err(ExportError::tensor(name, format!("holds {v:?}, expected two positive sizes [rows, cols]"))),
    }
}

/// Everything [`pack_compressed_tensors`] would refuse, without packing.
pub fn check_pack_quantized(layer: &str, q: &QuantizedLinear, dtype: FloatDtype) -> Result<()> {
    validate_quantized(layer, q)?;
    if !(2..=8).contains(&q.bits) {
        return Err(ExportError::layer(layer, format!("{} bits cannot be written as pack-quantized (2..=8)", q.bits)));
    }
    if q.group_size < q.cols && !q.cols.is_multiple_of(q.group_size) {
        return Err(ExportError::layer(
            layer,
            format!(
                "group size {} does not divide in_features {}, which compressed-tensors pack-quantized requires \
                 (llm-compressor refuses such layers; its zero point holds in_features // group_size groups). \
                 Export as GPTQ, which pads, or requantize with a dividing group size",
                q.group_size, q.cols
            ),
        ));
    }
    check_sym_zeros(layer, q)?;
    if let Some((i, s)) = q.scales.iter().enumerate().find(|(_, s)| dtype.round(**s).to_bits() != s.to_bits()) {
        return Err(ExportError::layer(
            layer,
            format!(
                "scale {s:e} (output row {}, group {}) is not exactly representable in {}, the chosen model dtype",
                i / q.n_groups(),
                i % q.n_groups(),
                Dtype::from(dtype)
            ),
        ));
    }
    Ok(())
}

/// Packs one quantized layer as compressed-tensors pack-quantized, scales in `dtype` (the model dtype).
pub fn pack_compressed_tensors(layer: &str, q: &QuantizedLinear, dtype: FloatDtype) -> Result<CtPackedTensors> {
    check_pack_quantized(layer, q, dtype)?;
    let (r, c, ng) = (q.rows, q.cols, q.n_groups());
    let b = q.bits as u32;
    let pf = per_word(b);
    let mut codes = q.codes.clone();
    apply_mask(q, &mut codes);

    let wc = c.div_ceil(pf);
    let mut packed = vec![0u32; r * wc];
    for o in 0..r {
        for i in 0..c {
            let (w, shift) = word_slot(i, b);
            packed[o * wc + w] |= (codes[o * c + i] as u32) << shift;
        }
    }

    let weight_zero_point = (!q.sym).then(|| {
        // Packed along the output dim: column g of the [ceil(r/pf), G] tensor holds the zero points of outputs 0..r.
        let zr = r.div_ceil(pf);
        let mut zp = vec![0u32; zr * ng];
        for o in 0..r {
            let (w, shift) = word_slot(o, b);
            for g in 0..ng {
                zp[w * ng + g] |= (q.zeros[o * ng + g] as u32) << shift;
            }
        }
        Packed { rows: zr, cols: ng, data: zp.into_iter().map(|v| v as i32).collect() }
    });

    Ok(CtPackedTensors {
        weight_packed: Packed { rows: r, cols: wc, data: packed.into_iter().map(|v| v as i32).collect() },
        weight_scale: RawTensor::from_f32_exact(&format!("{layer}.weight_scale"), dtype, vec![r, ng], &q.scales)?,
        weight_zero_point,
        weight_g_idx: q.g_idx.as_ref().map(|g| g.iter().map(|&v| v as i32).collect()),
        weight_shape: [r, c],
    })
}

/// Unpacks one pack-quantized layer with the settings its config group gives it.
pub fn unpack_compressed_tensors(layer: &str, t: &CtPackedTensors, p: &QuantParams) -> Result<QuantizedLinear> {
    if !(2..=8).contains(&p.bits) {
        return Err(ExportError::layer(layer, format!("{} bits: whittle imports 2..=8 bit layers", p.bits)));
    }
    let b = p.bits as u32;
    let mask = (1u32 << b) - 1;
    let pf = per_word(b);
    let [r, c] = t.weight_shape;
    let gs = p.group_size.unwrap_or(c).min(c);
    if gs == 0 {
        return Err(ExportError::layer(layer, "group size 0"));
    }
    let ng = c.div_ceil(gs);

    let wp = &t.weight_packed;
    let wc = c.div_ceil(pf);
    if (wp.rows, wp.cols) != (r, wc) {
        return Err(ExportError::tensor(
            format!("{layer}.weight_packed"),
            format!(
                "shape is [{}, {}], expected [{r}, {wc}] for weight_shape [{r}, {c}] at {b} bits",
                wp.rows, wp.cols
            ),
        ));
    }

    let scale_name = format!("{layer}.weight_scale");
    let raw_scales = t.weight_scale.to_f32(&scale_name)?;
    // Strategy "tensor" stores a single scale; it is the per-channel case with every row sharing it.
    let scales = if raw_scales.len() == 1 && ng == 1 {
        vec![raw_scales[0]; r]
    } else {
        t.weight_scale.expect_shape(&scale_name, &[r, ng])?;
        raw_scales
    };
    check_f16_exact(&scale_name, &scales)?;

    let zeros = if p.sym {
        vec![1u8 << (b - 1); r * ng]
    } else {
        let zp_name = format!("{layer}.weight_zero_point");
        let zp = t.weight_zero_point.as_ref().ok_or_else(|| {
            ExportError::tensor(&zp_name, "missing: the config says asymmetric, which stores zero points")
        })?;
        let zr = r.div_ceil(pf);
        if (zp.rows, zp.cols) != (zr, ng) {
            return Err(ExportError::tensor(
                zp_name,
                format!("shape is [{}, {}], expected [{zr}, {ng}]", zp.rows, zp.cols),
            ));
        }
        let mut zeros = vec![0u8; r * ng];
        for o in 0..r {
            let (w, shift) = word_slot(o, b);
            for g in 0..ng {
                zeros[o * ng + g] = ((zp.data[w * ng + g] as u32 >> shift) & mask) as u8;
            }
        }
        zeros
    };

    let g_idx = match &t.weight_g_idx {
        Some(g) => Some(read_g_idx(&format!("{layer}.weight_g_idx"), g, c, ng)?),
        None => None,
    };

    let mut codes = vec![0u8; r * c];
    for o in 0..r {
        for i in 0..c {
            let (w, shift) = word_slot(i, b);
            codes[o * c + i] = ((wp.data[o * wc + w] as u32 >> shift) & mask) as u8;
        }
    }
    Ok(QuantizedLinear {
        rows: r,
        cols: c,
        bits: p.bits,
        group_size: gs,
        sym: p.sym,
        codes,
        scales,
        zeros,
        g_idx,
        mask: None,
    })
}

/// The tensors of one sparse-24-bitmask layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Sparse24Tensors {
    /// Model dtype `[r, c/2]`: each row's kept values in column order.
    pub compressed: RawTensor,
    /// U8 `[r, ceil(c/8)]`: bit j of byte k of a row = column 8k+j kept.
    pub bitmask: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Sparse24Tensors {
    pub fn into_tensors(self, prefix: &str) -> Vec<(String, RawTensor)> {
        let bc = self.cols.div_ceil(8);
        vec![
            (format!("{prefix}.compressed"), self.compressed),
            (format!("{prefix}.bitmask"), RawTensor::from_u8(vec![self.rows, bc], self.bitmask)),
            // compressed-tensors writes torch.tensor(shape).reshape(-1, 1): [[r], [c]].
            (format!("{prefix}.shape"), RawTensor::from_i64(vec![2, 1], &[self.rows as i64, self.cols as i64])),
        ]
    }

    pub fn from_raw(prefix: &str, compressed: &RawTensor, bitmask: &RawTensor, shape: &RawTensor) -> Result<Self> {
        let shape_name = format!("{prefix}.shape");
        let [rows, cols] = two_dims(&shape_name, &shape.to_i64(&shape_name)?)?;
        let bm_name = format!("{prefix}.bitmask");
        bitmask.expect_shape(&bm_name, &[rows, cols.div_ceil(8)])?;
        Ok(Self { compressed: compressed.clone(), bitmask: bitmask.to_u8(&bm_name)?, rows, cols })
    }
}

/// Everything [`pack_sparse24_bitmask`] would refuse; returns the keep-mask (row-major) it would write.
///
/// compressed-tensors re-derives the mask as the 2 largest |w| of every 4 consecutive elements of the flattened
/// weight, and stores exactly `c/2` values per row; so every flattened group of 4 must hold exactly 2 nonzero
/// values (as stored in `dtype`), and each row exactly `c/2` of them.
pub fn check_sparse24(layer: &str, w: &Matrix, dtype: FloatDtype) -> Result<Vec<bool>> {
    let (r, c) = (w.rows, w.cols);
    if w.data.len() != r * c {
        return Err(ExportError::layer(layer, format!("weight has {} values but claims {r}×{c}", w.data.len())));
    }
    if (r * c) % 4 != 0 || c % 2 != 0 {
        return Err(ExportError::layer(
            layer,
            format!(
                "shape {r}×{c}: sparse-24-bitmask needs rows·cols divisible by 4 and an even number of columns \
                 (it stores [rows, cols/2] kept values)"
            ),
        ));
    }
    let keep: Vec<bool> = w.data.iter().map(|&v| dtype.round(v) != 0.0).collect();
    for (k, group) in keep.chunks_exact(4).enumerate() {
        let kept = group.iter().filter(|&&x| x).count();
        let (row, col) = ((4 * k) / c, (4 * k) % c);
        if kept > 2 {
            return Err(ExportError::layer(
                layer,
                format!(
                    "row {row}, columns {col}..{}: {kept} of 4 values are nonzero, so the layer is not 2:4 sparse",
                    col + 4
                ),
            ));
        }
        if kept < 2 {
            return Err(ExportError::layer(
                layer,
                format!(
                    "row {row}, columns {col}..{}: only {kept} of 4 values are nonzero in {}, so 2:4 would keep a \
                     value that is exactly 0, which compressed-tensors' mask re-derivation (2 largest |w| of 4) \
                     cannot reproduce",
                    col + 4,
                    Dtype::from(dtype)
                ),
            ));
        }
    }
    // Only reachable when c is not a multiple of 4 and groups of 4 span rows.
    for (row, m) in keep.chunks_exact(c).enumerate() {
        let kept = m.iter().filter(|&&x| x).count();
        if kept != c / 2 {
            return Err(ExportError::layer(
                layer,
                format!("row {row} keeps {kept} values, sparse-24-bitmask stores exactly {} per row", c / 2),
            ));
        }
    }
    Ok(keep)
}

/// Compresses a 2:4 sparse dense-valued layer (pruned weights exactly 0) as sparse-24-bitmask, values in `dtype`.
pub fn pack_sparse24_bitmask(layer: &str, w: &Matrix, dtype: FloatDtype) -> Result<Sparse24Tensors> {
    let keep = check_sparse24(layer, w, dtype)?;
    let (r, c) = (w.rows, w.cols);
    let bc = c.div_ceil(8);
    let mut bitmask = vec![0u8; r * bc];
    let mut values = Vec::with_capacity(r * c / 2);
    for o in 0..r {
        for i in 0..c {
            if keep[o * c + i] {
                bitmask[o * bc + i / 8] |= 1 << (i % 8);
                values.push(w.data[o * c + i]);
            }
        }
    }
    Ok(Sparse24Tensors {
        compressed: RawTensor::from_f32_rounded(dtype, vec![r, c / 2], &values),
        bitmask,
        rows: r,
        cols: c,
    })
}

/// Decompresses a sparse-24-bitmask layer the way compressed-tensors does: the kept positions, in row-major order,
/// receive the flattened compressed values in order; everything else is 0.
pub fn unpack_sparse24_bitmask(layer: &str, t: &Sparse24Tensors) -> Result<Matrix> {
    let (r, c) = (t.rows, t.cols);
    let bc = c.div_ceil(8);
    if t.bitmask.len() != r * bc {
        return Err(ExportError::tensor(
            format!("{layer}.bitmask"),
            format!("has {} bytes, expected {r}×{bc}", t.bitmask.len()),
        ));
    }
    let name = format!("{layer}.compressed");
    let values = t.compressed.to_f32(&name)?;
    let mut out = Matrix::zeros(r, c);
    let mut next = values.iter();
    for o in 0..r {
        for i in 0..c {
            if t.bitmask[o * bc + i / 8] >> (i % 8) & 1 == 1 {
                out.data[o * c + i] = *next.next().ok_or_else(|| {
                    ExportError::tensor(&name, format!("has {} values, fewer than the bitmask keeps", values.len()))
                })?;
            }
        }
    }
    if next.next().is_some() {
        return Err(ExportError::tensor(&name, format!("has {} values, more than the bitmask keeps", values.len())));
    }
    Ok(out)
}

/// compressed-tensors cannot hold bitmask-compressed dense layers next to weight-only quantized ones (module
/// docs): refuse with the way out.
pub fn check_sparse24_alongside(layer: &str, any_quantized: bool) -> Result<()> {
    if any_quantized {
        return Err(ExportError::layer(
            layer,
            "a dense-valued 2:4 layer cannot be sparse-24-bitmask compressed in a checkpoint that also holds \
             weight-only quantized layers (compressed-tensors' sparsity compressor skips pack-quantized layers and \
             llm-compressor disables sparse compression for such models); export this layer as dense instead",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::testutil::arb_layer;
    use proptest::prelude::*;

    fn layer(rows: usize, cols: usize, bits: u8, group_size: usize, codes: Vec<u8>, zeros: Vec<u8>) -> QuantizedLinear {
        let ng = cols.div_ceil(group_size);
        QuantizedLinear {
            rows,
            cols,
            bits,
            group_size,
            sym: false,
            codes,
            scales: vec![0.25; rows * ng],
            zeros,
            g_idx: None,
            mask: None,
        }
    }

    fn words(p: &Packed) -> Vec<u32> {
        p.data.iter().map(|&v| v as u32).collect()
    }

    /// 2 outputs × 8 inputs at 4 bits: weight_packed is [2, 1], one word per row, input 0 in the lowest nibble.
    #[test]
    fn ct_4bit_words_match_hand_computed() {
        let codes = vec![1, 2, 3, 4, 5, 6, 7, 8, /* row 1 */ 15, 14, 13, 12, 11, 10, 9, 0];
        let q = layer(2, 8, 4, 4, codes, vec![8, 3, 1, 5]);
        let t = pack_compressed_tensors("l", &q, FloatDtype::F16).unwrap();
        assert_eq!((t.weight_packed.rows, t.weight_packed.cols), (2, 1));
        assert_eq!(words(&t.weight_packed), vec![0x8765_4321, 0x09AB_CDEF]);
        // weight_zero_point [ceil(2/8) = 1, G = 2], packed along outputs, stored as is (no −1):
        // group 0 = outputs (8, 1) → 0x18; group 1 = (3, 5) → 0x53.
        let zp = t.weight_zero_point.clone().unwrap();
        assert_eq!((zp.rows, zp.cols), (1, 2));
        assert_eq!(words(&zp), vec![0x18, 0x53]);
        assert_eq!(t.weight_scale.shape, vec![2, 2]);
        assert_eq!(t.weight_scale.dtype, Dtype::F16);
        assert_eq!(t.weight_shape, [2, 8]);
        let names: Vec<String> = t.into_tensors("p").into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["p.weight_packed", "p.weight_scale", "p.weight_zero_point", "p.weight_shape"]);
    }

    /// 3 bits: 10 whole codes per word, bits 30–31 unused, nothing straddles. Same codes as the GPTQ straddling
    /// test: code 10 is word 1's first code, code 21 word 2's second (bits 3..5).
    #[test]
    fn ct_3bit_packs_ten_codes_per_word() {
        let mut codes = vec![0u8; 32];
        codes[10] = 0b011;
        codes[21] = 0b110;
        let t = pack_compressed_tensors("l", &layer(1, 32, 3, 32, codes, vec![4]), FloatDtype::F16).unwrap();
        assert_eq!(words(&t.weight_packed), vec![0x0000_0000, 0x0000_0003, 0x0000_0030, 0x0000_0000]);
        // codes 0..9 = 1..=7,1,2,3 fill bits 0..29 of one word: 0o3217654321 = 0x1A3F58D1.
        let codes = vec![1, 2, 3, 4, 5, 6, 7, 1, 2, 3];
        let t = pack_compressed_tensors("l", &layer(1, 10, 3, 10, codes, vec![4]), FloatDtype::F16).unwrap();
        assert_eq!(words(&t.weight_packed), vec![0x1A3F_58D1]);
    }

    #[test]
    fn ct_2bit_and_8bit_words_match_hand_computed() {
        let codes = vec![0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 1, 1, 2, 2, 2, 2];
        let t = pack_compressed_tensors("l", &layer(1, 16, 2, 16, codes, vec![2]), FloatDtype::F16).unwrap();
        assert_eq!(words(&t.weight_packed), vec![0xAA55_1BE4]);
        let t =
            pack_compressed_tensors("l", &layer(1, 4, 8, 4, vec![0x01, 0x80, 0xFF, 0x10], vec![0x80]), FloatDtype::F16)
                .unwrap();
        assert_eq!(words(&t.weight_packed), vec![0x10FF_8001]);
        // asymmetric 8-bit zero point 0x80 (signed 0) is stored as 0x80 in the lowest byte.
        assert_eq!(words(&t.weight_zero_point.unwrap()), vec![0x80]);
    }

    /// Symmetric layers store no zero point; 5 inputs at 4 bits pad the word with zero codes.
    #[test]
    fn ct_symmetric_has_no_zero_point_and_pads_with_zeros() {
        let mut q = layer(1, 5, 4, 5, vec![9, 8, 7, 6, 5], vec![8]);
        q.sym = true;
        let t = pack_compressed_tensors("l", &q, FloatDtype::BF16).unwrap();
        assert!(t.weight_zero_point.is_none());
        assert_eq!(words(&t.weight_packed), vec![0x0005_6789]);
        assert_eq!(t.weight_scale.dtype, Dtype::BF16);
    }

    #[test]
    fn ct_refuses_group_that_does_not_divide_in_features() {
        let q = layer(1, 172, 4, 32, vec![0; 172], vec![8; 6]);
        let err = pack_compressed_tensors("model.layers.0.mlp.down_proj", &q, FloatDtype::F16).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "model.layers.0.mlp.down_proj: group size 32 does not divide in_features 172, which \
                 compressed-tensors pack-quantized requires"
            ),
            "{err}"
        );
        // Per-channel (group = cols) is fine whatever cols is.
        assert!(pack_compressed_tensors("l", &layer(1, 172, 4, 172, vec![0; 172], vec![8]), FloatDtype::F16).is_ok());
    }

    #[test]
    fn ct_refuses_scale_not_representable_in_model_dtype() {
        let mut q = layer(1, 8, 4, 8, vec![0; 8], vec![8]);
        q.scales = vec![1.0 + 1.0 / 1024.0];
        assert!(pack_compressed_tensors("l", &q, FloatDtype::F16).is_ok());
        let err = pack_compressed_tensors("l", &q, FloatDtype::BF16).unwrap_err().to_string();
        assert!(err.contains("not exactly representable in BF16"), "{err}");
    }

    /// Row [1,0,0,2 | 0,3,4,0] keeps columns 0, 3, 5, 6: bits 0b0110_1001 = 0x69; values in column order.
    #[test]
    fn sparse24_bitmask_matches_hand_computed() {
        let w =
            Matrix::from_vec(2, 8, vec![1., 0., 0., 2., 0., 3., 4., 0., /* row 1 */ 0., 0., 5., 6., 7., 8., 0., 0.]);
        let t = pack_sparse24_bitmask("l", &w, FloatDtype::F16).unwrap();
        assert_eq!(t.bitmask, vec![0x69, 0b0011_1100]);
        assert_eq!(t.compressed.shape, vec![2, 4]);
        assert_eq!(t.compressed.to_f32("c").unwrap(), vec![1., 2., 3., 4., 5., 6., 7., 8.]);
        let tensors = t.clone().into_tensors("p");
        assert_eq!(tensors[2].1, RawTensor::from_i64(vec![2, 1], &[2, 8]));
        assert_eq!(unpack_sparse24_bitmask("l", &t).unwrap(), w);
    }

    #[test]
    fn sparse24_refuses_kept_zero_and_non_2_4_and_bad_shapes() {
        let w = Matrix::from_vec(1, 8, vec![1., 0., 0., 0., 0., 3., 4., 0.]);
        let err = pack_sparse24_bitmask("model.layers.2.mlp.up_proj", &w, FloatDtype::F16).unwrap_err().to_string();
        assert!(err.starts_with("model.layers.2.mlp.up_proj: row 0, columns 0..4: only 1 of 4"), "{err}");
        // 1e-8 is nonzero in f32 but 0 in f16: it would be a kept zero once stored.
        let w = Matrix::from_vec(1, 4, vec![1., 1e-8, 0., 0.]);
        assert!(pack_sparse24_bitmask("l", &w, FloatDtype::F16).is_err());
        assert!(pack_sparse24_bitmask("l", &w, FloatDtype::F32).is_ok());
        let w = Matrix::from_vec(1, 4, vec![1., 2., 3., 0.]);
        assert!(pack_sparse24_bitmask("l", &w, FloatDtype::F16).unwrap_err().to_string().contains("not 2:4"));
        let w = Matrix::from_vec(1, 6, vec![1., 2., 0., 0., 1., 2.]);
        assert!(pack_sparse24_bitmask("l", &w, FloatDtype::F16).unwrap_err().to_string().contains("divisible by 4"));
        // c = 6, r = 2: groups of 4 span rows; row 0 would keep 4 values, row 1 two.
        let w = Matrix::from_vec(2, 6, vec![1., 2., 0., 0., 3., 4., 0., 0., 5., 6., 0., 0.]);
        assert!(pack_sparse24_bitmask("l", &w, FloatDtype::F16).unwrap_err().to_string().contains("row 0 keeps 4"));
    }

    #[test]
    fn ct_unpack_rejects_missing_zero_point_and_bad_shapes() {
        let q = layer(2, 8, 4, 4, vec![0; 16], vec![1; 4]);
        let p = QuantParams::of(&q);
        let t = pack_compressed_tensors("l", &q, FloatDtype::F16).unwrap();
        let mut bad = t.clone();
        bad.weight_zero_point = None;
        assert!(unpack_compressed_tensors("l", &bad, &p).unwrap_err().to_string().contains("l.weight_zero_point"));
        let mut bad = t.clone();
        bad.weight_shape = [2, 9];
        assert!(unpack_compressed_tensors("l", &bad, &p).unwrap_err().to_string().contains("l.weight_packed"));
        let mut bad = t;
        bad.weight_g_idx = Some(vec![0; 7]);
        assert!(unpack_compressed_tensors("l", &bad, &p).unwrap_err().to_string().contains("has 7 entries"));
    }

    fn arb_2_4() -> impl Strategy<Value = Matrix> {
        (1usize..6, 1usize..6, any::<u64>()).prop_map(|(r, c4, seed)| {
            let c = 4 * c4;
            let mut s = seed | 1;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let mut data = vec![0f32; r * c];
            for g in data.chunks_exact_mut(4) {
                let a = (next() % 4) as usize;
                let b = (a + 1 + (next() % 3) as usize) % 4;
                for k in [a, b] {
                    // nonzero, f16-exact magnitudes with random sign
                    let v = (1 + next() % 2000) as f32 / 64.0;
                    g[k] = if next() % 2 == 0 { v } else { -v };
                }
            }
            Matrix::from_vec(r, c, data)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn ct_pack_unpack_round_trips(q in arb_layer(&[2, 3, 4, 5, 6, 7, 8])) {
            let p = QuantParams::of(&q);
            match pack_compressed_tensors("l", &q, FloatDtype::F16) {
                Ok(t) => {
                    let back = unpack_compressed_tensors("l", &t, &p).unwrap();
                    prop_assert_eq!(back.dequantize(), q.dequantize());
                    if q.mask.is_none() {
                        prop_assert_eq!(back, q);
                    }
                }
                Err(e) => {
                    prop_assert!(q.group_size < q.cols && q.cols % q.group_size != 0, "{}", e);
                }
            }
        }

        #[test]
        fn sparse24_bitmask_round_trips(w in arb_2_4()) {
            let t = pack_sparse24_bitmask("l", &w, FloatDtype::F16).unwrap();
            prop_assert_eq!(t.bitmask.len(), w.rows * w.cols.div_ceil(8));
            prop_assert_eq!(unpack_sparse24_bitmask("l", &t).unwrap(), w);
        }
    }
}
