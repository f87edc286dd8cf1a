//! Test helpers shared by the export modules: small deterministic layers and a proptest strategy for random
//! quantized layers (ragged widths, every bit width a format allows, sym/asym, act-order g_idx, masks).

use proptest::prelude::*;

use crate::compress::types::QuantizedLinear;

/// A deterministic layer: codes cycle through the code range, sym zero 2^(b−1) or asym zeros 1.., scales 0.5.
pub(crate) fn simple_layer(rows: usize, cols: usize, bits: u8, group_size: usize, sym: bool) -> QuantizedLinear {
    let maxq = (1u32 << bits) - 1;
    let ng = cols.div_ceil(group_size);
    QuantizedLinear {
        rows,
        cols,
        bits,
        group_size,
        sym,
        codes: (0..rows * cols).map(|k| (k as u32 * 7 % (maxq + 1)) as u8).collect(),
        scales: vec![0.5; rows * ng],
        zeros: (0..rows * ng).map(|k| if sym { 1u8 << (bits - 1) } else { (1 + k as u32 % maxq) as u8 }).collect(),
        g_idx: None,
        mask: None,
    }
}

/// `g_idx` equal to `i / group_size` is spelled `None` by importers.
pub(crate) fn normalize_g_idx(mut q: QuantizedLinear) -> QuantizedLinear {
    if let Some(g) = &q.g_idx {
        if g.iter().enumerate().all(|(i, &v)| v as usize == i / q.group_size) {
            q.g_idx = None;
        }
    }
    q
}

/// Random layers: 1..12 outputs, 1..80 inputs, group size 1..=cols (so ragged last groups and per-channel occur),
/// codes over the full range, zero point 0 and the top code included, positive f16-exact scales.
pub(crate) fn arb_layer(bits: &'static [u8]) -> impl Strategy<Value = QuantizedLinear> {
    (proptest::sample::select(bits), 1usize..12, 1usize..80, any::<bool>())
        .prop_flat_map(|(bits, rows, cols, sym)| {
            let maxq = ((1u32 << bits) - 1) as u8;
            (Just((bits, rows, cols, sym)), 1..=cols, proptest::collection::vec(0..=maxq, rows * cols))
        })
        .prop_flat_map(|((bits, rows, cols, sym), group_size, codes)| {
            let maxq = ((1u32 << bits) - 1) as u8;
            let ng = cols.div_ceil(group_size);
            let zeros = if sym {
                Just(vec![1u8 << (bits - 1); rows * ng]).boxed()
            } else {
                proptest::collection::vec(0..=maxq, rows * ng).boxed()
            };
            // f16 bit patterns of positive normal numbers: exactly representable by construction.
            let scales = proptest::collection::vec(
                (0x0400u16..0x7C00).prop_map(|b| half::f16::from_bits(b).to_f32()),
                rows * ng,
            );
            let g_idx = proptest::option::of(proptest::collection::vec(0..ng as u32, cols));
            let mask = proptest::option::of(proptest::collection::vec(any::<bool>(), rows * cols));
            (Just((bits, rows, cols, sym, group_size, codes)), zeros, scales, g_idx, mask)
        })
        .prop_map(|((bits, rows, cols, sym, group_size, codes), zeros, scales, g_idx, mask)| QuantizedLinear {
            rows,
            cols,
            bits,
            group_size,
            sym,
            codes,
            scales,
            zeros,
            g_idx,
            mask,
        })
}
