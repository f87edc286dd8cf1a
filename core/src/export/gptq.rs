//! GPTQ v1 checkpoints (AutoGPTQ / GPTQModel `checkpoint_format: "gptq"`, formats.md §1): pack a
//! [`QuantizedLinear`] into `qweight`/`qzeros`/`scales`/`g_idx` and back, with no file I/O.
//!
//! Layout decisions, and why:
//! * `qweight` is `[words, r]`: for each output column the input codes form one little-endian bit stream
//!   ([`super::bits`]). When `c·b/32` is not whole the stream is padded with zero codes to a whole cycle (b = 2, 4,
//!   8: one word; b = 3: 32 codes = 3 words, because AutoGPTQ's packer and every 3-bit kernel work in 3-word
//!   blocks). `g_idx` still covers only the real `c` inputs, so padding codes belong to no group and are never read
//!   by a decoder that follows `g_idx`; GPTQModel stores stories260k's `down_proj` (c = 172) exactly this way.
//! * `qzeros` is `[G, words(r)]`, zero points packed the same way along the output dim, padded likewise.
//! * v1 stores `zero − 1` and every v1 loader adds 1 back **without wrapping**. AutoGPTQ writes zero point 0 as
//!   −1, which reads back as 2^b (and, as it ORs an unmasked −1, corrupts the neighbouring fields). We mask to b
//!   bits so neighbours stay intact, but a stored all-ones field would still decode to 2^b, so zero point 0 is
//!   never written: such a group is shifted up by one code (codes+1, zero 1), which dequantizes identically
//!   (s·((q+1)−1) = s·q). Only a group that has zero point 0 *and* uses the top code cannot be shifted; that is
//!   an error naming the layer, row and group (compressed-tensors stores zero point 0 fine).
//! * Pruned weights (a `mask`) are written as their group's zero point, so they dequantize to exactly 0.
//! * Symmetric layers must have zero point 2^(b−1) everywhere, because Marlin/Exllama kernels ignore `qzeros` for
//!   sym checkpoints and assume it.

use half::f16;

use super::bits::{pack_stream, stream_code, stream_words};
use super::config::QuantParams;
use super::error::{ExportError, Result};
use super::tensor::{FloatDtype, Packed, RawTensor};
use super::{apply_mask, check_sym_zeros, validate_quantized};
use crate::compress::types::QuantizedLinear;

/// Bit widths GPTQ checkpoints and their kernels support.
pub const GPTQ_BITS: [u8; 4] = [2, 3, 4, 8];

/// Tensor name suffixes of one GPTQ layer (`{prefix}.{suffix}`).
pub const GPTQ_SUFFIXES: [&str; 4] = ["qweight", "qzeros", "scales", "g_idx"];

/// The packed tensors of one GPTQ layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqTensors {
    /// I32 `[words(c), r]`.
    pub qweight: Packed,
    /// I32 `[G, words(r)]`, zero points − 1.
    pub qzeros: Packed,
    /// F16 `[G, r]`.
    pub scales: RawTensor,
    /// `[c]`: group of each input.
    pub g_idx: Vec<i32>,
}

impl GptqTensors {
    /// Names and tensors as they go into the safetensors file, e.g. `model.layers.0.mlp.down_proj.qweight`.
    pub fn into_tensors(self, prefix: &str) -> Vec<(String, RawTensor)> {
        let n = self.g_idx.len();
        vec![
            (format!("{prefix}.qweight"), self.qweight.to_raw()),
            (format!("{prefix}.qzeros"), self.qzeros.to_raw()),
            (format!("{prefix}.scales"), self.scales),
            (format!("{prefix}.g_idx"), RawTensor::from_i32(vec![n], &self.g_idx)),
        ]
    }

    /// Collects a layer's tensors read from a checkpoint, checking dtypes. `g_idx` may be absent (older AutoGPTQ
    /// checkpoints without act-order); [`unpack_gptq`] then uses the trivial `i / group_size`.
    pub fn from_raw(
        prefix: &str,
        qweight: &RawTensor,
        qzeros: &RawTensor,
        scales: &RawTensor,
        g_idx: Option<&RawTensor>,
    ) -> Result<Self> {
        let qweight = Packed::from_raw(&format!("{prefix}.qweight"), qweight)?;
        let qzeros = Packed::from_raw(&format!("{prefix}.qzeros"), qzeros)?;
        let g_idx = match g_idx {
            Some(t) => {
                let name = format!("{prefix}.g_idx");
                if t.shape.len() != 1 {
                    return Err(ExportError::tensor(name, format!("shape is {:?}, expected 1 dimension", t.shape)));
                }
                t.to_i32(&name)?
            }
            None => Vec::new(),
        };
        Ok(Self { qweight, qzeros, scales: scales.clone(), g_idx })
    }
}

/// Everything [`pack_gptq`] would refuse, without packing.
pub fn check_gptq(layer: &str, q: &QuantizedLinear) -> Result<()> {
    v1_codes_and_zeros(layer, q).map(|_| ())
}

/// Packs one quantized layer as GPTQ v1.
pub fn pack_gptq(layer: &str, q: &QuantizedLinear) -> Result<GptqTensors> {
    let (codes, zeros) = v1_codes_and_zeros(layer, q)?;
    let (r, c, ng) = (q.rows, q.cols, q.n_groups());
    let b = q.bits as u32;
    let maxq = (1u32 << b) - 1;

    let kw = stream_words(c, b);
    let mut qweight = Packed::zeros(kw, r);
    let mut column = vec![0u32; kw];
    for o in 0..r {
        column.fill(0);
        pack_stream(codes[o * c..(o + 1) * c].iter().map(|&v| v as u32), b, &mut column);
        for (w, word) in column.iter().enumerate() {
            qweight.data[w * r + o] = *word as i32;
        }
    }

    let zw = stream_words(r, b);
    let mut qzeros = Packed::zeros(ng, zw);
    let mut row = vec![0u32; zw];
    for g in 0..ng {
        row.fill(0);
        // v1 stores zero − 1. Zero points here are ≥ 1 (see v1_codes_and_zeros); the mask keeps a −1 from ever
        // spilling ones into the neighbouring fields, which is what AutoGPTQ's unmasked OR does.
        pack_stream((0..r).map(|o| (zeros[o * ng + g] as u32).wrapping_sub(1) & maxq), b, &mut row);
        for (w, word) in row.iter().enumerate() {
            qzeros.data[g * zw + w] = *word as i32;
        }
    }

    let mut scales_t = vec![0f32; ng * r];
    for o in 0..r {
        for g in 0..ng {
            scales_t[g * r + o] = q.scales[o * ng + g];
        }
    }
    let scales = RawTensor::from_f32_exact(&format!("{layer}.scales"), FloatDtype::F16, vec![ng, r], &scales_t)?;
    let g_idx = (0..c).map(|i| q.group_of(i) as i32).collect();
    Ok(GptqTensors { qweight, qzeros, scales, g_idx })
}

/// Codes and zero points as v1 stores them: masked weights set to their zero point, and zero-point-0 groups shifted
/// up by one code (module docs). Also runs every check GPTQ needs.
fn v1_codes_and_zeros(layer: &str, q: &QuantizedLinear) -> Result<(Vec<u8>, Vec<u8>)> {
    validate_quantized(layer, q)?;
    if !GPTQ_BITS.contains(&q.bits) {
        return Err(ExportError::layer(
            layer,
            format!("{} bits cannot be written as GPTQ, which supports 2, 3, 4 and 8 bits", q.bits),
        ));
    }
    check_sym_zeros(layer, q)?;
    let (r, c, ng) = (q.rows, q.cols, q.n_groups());
    let maxq = ((1u32 << q.bits) - 1) as u8;
    let mut codes = q.codes.clone();
    let mut zeros = q.zeros.clone();
    apply_mask(q, &mut codes);
    let mut uses_top = vec![false; ng];
    let mut shift = vec![false; ng];
    for o in 0..r {
        let zrow = &mut zeros[o * ng..(o + 1) * ng];
        if !zrow.contains(&0) {
            continue;
        }
        let crow = &mut codes[o * c..(o + 1) * c];
        uses_top.fill(false);
        for (i, &code) in crow.iter().enumerate() {
            if code == maxq {
                uses_top[q.group_of(i)] = true;
            }
        }
        for g in 0..ng {
            shift[g] = zrow[g] == 0;
            if shift[g] && uses_top[g] {
                return Err(ExportError::layer(
                    layer,
                    format!(
                        "output row {o}, group {g} has zero point 0 and also uses the top code {maxq}; GPTQ v1 \
                         stores zero − 1 and loaders add 1 back without wrapping, so zero point 0 reads back as \
                         {} and the group cannot be shifted up by one code. Export as compressed-tensors, or \
                         requantize this layer symmetrically",
                        maxq as u32 + 1
                    ),
                ));
            }
            if shift[g] {
                zrow[g] = 1;
            }
        }
        for (i, code) in crow.iter_mut().enumerate() {
            if shift[q.group_of(i)] {
                *code += 1;
            }
        }
    }
    Ok((codes, zeros))
}

/// Unpacks one GPTQ v1 layer of `rows` outputs and `cols` inputs (from the model config) with the settings its
/// `quantization_config` gives it. Returns `g_idx: None` when the stored g_idx is the trivial `i / group_size`.
pub fn unpack_gptq(layer: &str, t: &GptqTensors, p: &QuantParams, rows: usize, cols: usize) -> Result<QuantizedLinear> {
    if !GPTQ_BITS.contains(&p.bits) {
        return Err(ExportError::layer(
            layer,
            format!("GPTQ checkpoints use 2, 3, 4 or 8 bits, the config says {}", p.bits),
        ));
    }
    let b = p.bits as u32;
    let maxq = (1u32 << b) - 1;
    let (r, c) = (rows, cols);
    if r == 0 || c == 0 {
        return Err(ExportError::layer(layer, format!("layer shape {r}×{c} is empty")));
    }
    let gs = p.group_size.unwrap_or(c).min(c);
    if gs == 0 {
        return Err(ExportError::layer(layer, "group size 0"));
    }
    let ng = c.div_ceil(gs);

    let qw = &t.qweight;
    if qw.cols != r || qw.rows * 32 < c * b as usize {
        return Err(ExportError::tensor(
            format!("{layer}.qweight"),
            format!(
                "shape is [{}, {}], expected [{}, {r}] ({c} inputs at {b} bits)",
                qw.rows,
                qw.cols,
                stream_words(c, b)
            ),
        ));
    }
    let qz = &t.qzeros;
    if qz.rows != ng || qz.cols * 32 < r * b as usize {
        return Err(ExportError::tensor(
            format!("{layer}.qzeros"),
            format!("shape is [{}, {}], expected [{ng}, {}]", qz.rows, qz.cols, stream_words(r, b)),
        ));
    }
    let scales_name = format!("{layer}.scales");
    t.scales.expect_shape(&scales_name, &[ng, r])?;
    let scales_t = t.scales.to_f32(&scales_name)?;
    check_f16_exact(&scales_name, &scales_t)?;

    let g_idx = if t.g_idx.is_empty() {
        None
    } else {
        let g = read_g_idx(&format!("{layer}.g_idx"), &t.g_idx, c, ng)?;
        // A g_idx equal to i / group_size carries no information; QuantizedLinear spells that as None.
        Some(g).filter(|g| g.iter().enumerate().any(|(i, &v)| v as usize != i / gs))
    };

    let mut zeros = vec![0u8; r * ng];
    let words: Vec<u32> = qz.data.iter().map(|&v| v as u32).collect();
    for g in 0..ng {
        let row = &words[g * qz.cols..(g + 1) * qz.cols];
        for o in 0..r {
            // Shape checked above, so the stream is long enough; `ok_or` keeps a typed error anyway.
            let stored =
                stream_code(row, b, o).ok_or_else(|| ExportError::tensor(format!("{layer}.qzeros"), "too short"))?;
            if stored == maxq {
                return Err(ExportError::tensor(
                    format!("{layer}.qzeros"),
                    format!(
                        "group {g}, output {o} stores {maxq}, which v1 loaders read as zero point {} (outside the \
                         {b}-bit code range); the writer meant zero point 0, which GPTQ v1 cannot express",
                        maxq + 1
                    ),
                ));
            }
            let z = stored + 1;
            if p.sym && z != 1 << (b - 1) {
                return Err(ExportError::tensor(
                    format!("{layer}.qzeros"),
                    format!(
                        "the config says sym, whose zero point is {} (stored {}), but group {g}, output {o} stores {stored}",
                        1u32 << (b - 1),
                        (1u32 << (b - 1)) - 1
                    ),
                ));
            }
            zeros[o * ng + g] = z as u8;
        }
    }

    let mut codes = vec![0u8; r * c];
    let mut column = vec![0u32; qw.rows];
    for o in 0..r {
        for (w, word) in column.iter_mut().enumerate() {
            *word = qw.data[w * r + o] as u32;
        }
        for i in 0..c {
            codes[o * c + i] = stream_code(&column, b, i)
                .ok_or_else(|| ExportError::tensor(format!("{layer}.qweight"), "too short"))?
                as u8;
        }
    }

    let mut scales = vec![0f32; r * ng];
    for g in 0..ng {
        for o in 0..r {
            scales[o * ng + g] = scales_t[g * r + o];
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

/// Checks a stored g_idx (length `cols`, values in `0..ng`) and converts it.
pub(crate) fn read_g_idx(name: &str, g: &[i32], cols: usize, ng: usize) -> Result<Vec<u32>> {
    if g.len() != cols {
        return Err(ExportError::tensor(name, format!("has {} entries, expected one per input ({cols})", g.len())));
    }
    if let Some((i, v)) = g.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= ng) {
        return Err(ExportError::tensor(name, format!("entry {i} is {v}, outside the {ng} groups")));
    }
    Ok(g.iter().map(|&v| v as u32).collect())
}

/// QuantizedLinear promises f16-exact scales; a checkpoint whose scales are not would silently change on re-export.
pub(crate) fn check_f16_exact(name: &str, values: &[f32]) -> Result<()> {
    match values
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || f16::from_f32(**v).to_f32().to_bits() != v.to_bits())
    {
        Some((i, v)) => {
            Err(ExportError::tensor(name, format!("scale {v:e} at flat index {i} is not a finite f16 value")))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::testutil::{arb_layer, normalize_g_idx};
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
            scales: vec![0.5; rows * ng],
            zeros,
            g_idx: None,
            mask: None,
        }
    }

    fn words(p: &Packed) -> Vec<u32> {
        p.data.iter().map(|&v| v as u32).collect()
    }

    /// 2 outputs × 8 inputs at 4 bits, groups of 4. Each column of qweight is one word holding that output's 8
    /// input codes as nibbles, input 0 in the lowest nibble: row 0 = 1..8 reads 0x87654321 in hex.
    #[test]
    fn gptq_4bit_words_match_hand_computed() {
        let codes = vec![1, 2, 3, 4, 5, 6, 7, 8, /* row 1 */ 15, 14, 13, 12, 11, 10, 9, 0];
        // zeros[o][g]: row 0 = (8, 3), row 1 = (1, 5).
        let q = layer(2, 8, 4, 4, codes, vec![8, 3, 1, 5]);
        let t = pack_gptq("l", &q).unwrap();
        assert_eq!((t.qweight.rows, t.qweight.cols), (1, 2));
        assert_eq!(words(&t.qweight), vec![0x8765_4321, 0x09AB_CDEF]);
        // qzeros [G=2, 1]: group 0 holds outputs (8−1, 1−1) = nibbles 7, 0 → 0x07; group 1 (3−1, 5−1) → 0x42.
        assert_eq!((t.qzeros.rows, t.qzeros.cols), (2, 1));
        assert_eq!(words(&t.qzeros), vec![0x0000_0007, 0x0000_0042]);
        assert_eq!(t.g_idx, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(t.scales.shape, vec![2, 2]);
        assert_eq!(t.scales.to_f32("s").unwrap(), vec![0.5; 4]);
    }

    /// Symmetric 4-bit has zero 8, stored as 7 in every nibble of its output rows.
    #[test]
    fn gptq_sym_4bit_zero_is_stored_as_7() {
        let mut q = layer(8, 8, 4, 8, vec![0; 64], vec![8; 8]);
        q.sym = true;
        let t = pack_gptq("l", &q).unwrap();
        assert_eq!(words(&t.qzeros), vec![0x7777_7777]);
    }

    /// 1 output × 32 inputs at 3 bits: 32 codes = 96 bits = exactly 3 words. Code 10 spans bits 30..32, so its
    /// two low bits are word 0's bits 30–31 and its high bit word 1's bit 0; code 21 spans bits 63..65: its low
    /// bit is word 1's bit 31, its two high bits word 2's bits 0–1.
    #[test]
    fn gptq_3bit_codes_10_and_21_straddle_words() {
        let mut codes = vec![0u8; 32];
        codes[10] = 0b011; // low bits 11 → word0 bits 30,31 = 0xC000_0000; high bit 0 → word1 bit 0 = 0
        codes[21] = 0b110; // low bit 0 → word1 bit 31 = 0; high bits 11 → word2 bits 0,1 = 0x3
        let t = pack_gptq("l", &layer(1, 32, 3, 32, codes, vec![4])).unwrap();
        assert_eq!(words(&t.qweight), vec![0xC000_0000, 0x0000_0000, 0x0000_0003]);

        // Codes 0,1,…,7 repeated: every 8 codes form the 24-bit block 0o76543210 = 0xFAC688.
        // word0 = block | low byte of the next block << 24; word1 = its top 16 bits | next block's low 16 bits << 16; …
        let codes: Vec<u8> = (0..32).map(|i| (i % 8) as u8).collect();
        let t = pack_gptq("l", &layer(1, 32, 3, 32, codes, vec![4])).unwrap();
        assert_eq!(words(&t.qweight), vec![0x88FA_C688, 0xC688_FAC6, 0xFAC6_88FA]);
    }

    /// 2 bits: 16 codes per word, two bits each, input 0 lowest.
    #[test]
    fn gptq_2bit_words_match_hand_computed() {
        // bytes (low to high): codes 0..3 = 0,1,2,3 → 0b11_10_01_00 = 0xE4; 3,2,1,0 → 0b00_01_10_11 = 0x1B;
        // four 1s → 0x55; four 2s → 0xAA.
        let codes = vec![0, 1, 2, 3, 3, 2, 1, 0, 1, 1, 1, 1, 2, 2, 2, 2];
        let t = pack_gptq("l", &layer(1, 16, 2, 16, codes, vec![2])).unwrap();
        assert_eq!(words(&t.qweight), vec![0xAA55_1BE4]);
        // zero 2 stored as 1 in the lowest 2 bits; outputs 1..15 are padding (0).
        assert_eq!(words(&t.qzeros), vec![0x0000_0001]);
    }

    /// 8 bits: 4 codes per word, one byte each.
    #[test]
    fn gptq_8bit_words_match_hand_computed() {
        let t = pack_gptq("l", &layer(1, 4, 8, 4, vec![0x01, 0x80, 0xFF, 0x10], vec![0x80])).unwrap();
        assert_eq!(words(&t.qweight), vec![0x10FF_8001]);
        assert_eq!(words(&t.qzeros), vec![0x0000_007F]);
    }

    /// c = 12 at 4 bits is 1.5 words: padded with zero codes to 16 inputs (2 words), g_idx stays 12 long.
    #[test]
    fn gptq_pads_ragged_inputs_with_zero_codes() {
        let codes: Vec<u8> = (1..=12).collect();
        let t = pack_gptq("l", &layer(1, 12, 4, 5, codes, vec![1, 1, 1])).unwrap();
        assert_eq!(words(&t.qweight), vec![0x8765_4321, 0x0000_CBA9]);
        assert_eq!(t.g_idx, vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]);
        assert_eq!(t.scales.shape, vec![3, 1]);
        // stories260k's down_proj: 172 inputs at 4 bits → 22 words, 6 groups of 32.
        let q = layer(64, 172, 4, 32, vec![0; 64 * 172], vec![8; 64 * 6]);
        let t = pack_gptq("down_proj", &q).unwrap();
        assert_eq!((t.qweight.rows, t.qweight.cols), (22, 64));
        assert_eq!((t.qzeros.rows, t.qzeros.cols), (6, 8));
        // 3 bits pad to whole 3-word blocks of 32 codes: 40 inputs → 64 → 6 words.
        let q = layer(1, 40, 3, 40, vec![0; 40], vec![4]);
        assert_eq!(pack_gptq("l", &q).unwrap().qweight.rows, 6);
    }

    /// Zero point 0 cannot be stored in v1 (−1 reads back as 2^b); the group is shifted up one code instead.
    #[test]
    fn gptq_zero_point_zero_shifts_group_up_one_code() {
        // row 0: group 0 zero 0 with codes (3, 5); group 1 zero 2.
        let q = layer(1, 4, 4, 2, vec![3, 5, 7, 9], vec![0, 2]);
        let t = pack_gptq("l", &q).unwrap();
        assert_eq!(words(&t.qweight), vec![0x0000_9764]);
        // zeros (1, 2) stored as (0, 1): qzeros is [2 groups, 1 word].
        assert_eq!(words(&t.qzeros), vec![0x0, 0x1]);
        let back = unpack_gptq("l", &t, &QuantParams::of(&q), 1, 4).unwrap();
        assert_eq!(back.dequantize(), q.dequantize());

        // With the top code 15 in the same group, there is no room to shift: a clear error.
        let q = layer(1, 4, 4, 2, vec![15, 5, 7, 9], vec![0, 2]);
        let err = pack_gptq("model.layers.1.mlp.up_proj", &q).unwrap_err().to_string();
        assert!(err.starts_with("model.layers.1.mlp.up_proj: output row 0, group 0 has zero point 0"), "{err}");
    }

    #[test]
    fn gptq_masked_weights_become_the_zero_point() {
        let mut q = layer(1, 8, 4, 8, vec![1, 2, 3, 4, 5, 6, 7, 8], vec![5]);
        q.mask = Some(vec![true, false, true, false, true, true, false, false]);
        let t = pack_gptq("l", &q).unwrap();
        assert_eq!(words(&t.qweight), vec![0x5565_5351]);
        let back = unpack_gptq("l", &t, &QuantParams::of(&q), 1, 8).unwrap();
        assert_eq!(back.dequantize(), q.dequantize());
    }

    #[test]
    fn gptq_refuses_5_bits_naming_the_layer() {
        let q = layer(1, 8, 5, 8, vec![0; 8], vec![16]);
        let err = pack_gptq("model.layers.0.self_attn.q_proj", &q).unwrap_err().to_string();
        assert_eq!(
            err,
            "model.layers.0.self_attn.q_proj: 5 bits cannot be written as GPTQ, which supports 2, 3, 4 and 8 bits"
        );
    }

    #[test]
    fn gptq_refuses_sym_layer_with_other_zero_point() {
        let mut q = layer(1, 8, 4, 8, vec![0; 8], vec![7]);
        q.sym = true;
        let err = pack_gptq("l", &q).unwrap_err().to_string();
        assert!(err.contains("symmetric") && err.contains("zero point 7"), "{err}");
    }

    #[test]
    fn gptq_unpack_rejects_all_ones_zero_field() {
        let q = layer(1, 8, 4, 8, vec![0; 8], vec![3]);
        let mut t = pack_gptq("l", &q).unwrap();
        t.qzeros.data[0] = 0xF;
        let err = unpack_gptq("l", &t, &QuantParams::of(&q), 1, 8).unwrap_err().to_string();
        assert!(err.contains("zero point 16"), "{err}");
    }

    #[test]
    fn gptq_unpack_rejects_wrong_shapes_and_g_idx() {
        let q = layer(2, 8, 4, 4, vec![0; 16], vec![1; 4]);
        let p = QuantParams::of(&q);
        let t = pack_gptq("l", &q).unwrap();
        assert!(unpack_gptq("l", &t, &p, 3, 8).unwrap_err().to_string().contains("l.qweight"));
        assert!(unpack_gptq("l", &t, &p, 2, 40).is_err());
        let mut bad = t.clone();
        bad.g_idx[3] = 7;
        assert!(unpack_gptq("l", &bad, &p, 2, 8).unwrap_err().to_string().contains("entry 3 is 7"));
        let mut bad = t;
        bad.scales = RawTensor::from_f32_rounded(FloatDtype::F16, vec![3, 2], &[0.5; 6]);
        assert!(unpack_gptq("l", &bad, &p, 2, 8).unwrap_err().to_string().contains("l.scales"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// pack → unpack gives back the same weights for bits 2/3/4/8, sym/asym, ragged c, g_idx and masks.
        /// Codes and zeros come back identical too, except where a mask or zero point 0 legitimately changed them.
        #[test]
        fn gptq_pack_unpack_round_trips(q in arb_layer(&GPTQ_BITS)) {
            let p = QuantParams::of(&q);
            match pack_gptq("l", &q) {
                Ok(t) => {
                    let names: Vec<String> = t.clone().into_tensors("p").into_iter().map(|(n, _)| n).collect();
                    prop_assert_eq!(names, vec!["p.qweight", "p.qzeros", "p.scales", "p.g_idx"]);
                    let back = unpack_gptq("l", &t, &p, q.rows, q.cols).unwrap();
                    prop_assert_eq!(back.dequantize(), q.dequantize());
                    if q.mask.is_none() && !q.zeros.contains(&0) {
                        prop_assert_eq!(back, normalize_g_idx(q));
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains("has zero point 0 and also uses the top code"), "{}", e),
            }
        }
    }
}
