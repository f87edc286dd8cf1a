//! Every kernel (every layout × every instruction set this CPU has) against a plain dequantize-then-multiply
//! reference accumulated in f64.
//!
//! Tolerance: |y − ref| ≤ 2e-5 · Σ|w·x| (+1e-30). The kernels accumulate in f32 in a different order than the
//! reference (16 lanes, per-group partial sums, the Σx zero-point fold), so each result carries rounding of about
//! 2⁻²⁴ ≈ 6e-8 times the magnitudes summed, grown by the summation depth (~√cols); the magic-number decode sums
//! (1 + q/2^b)·x and subtracts Σx, magnifying that by ≤ 2^b/|q−z| on average (~4 at 4 bits). 2e-5 of Σ|w·x| leaves
//! room for that while still catching any wrong index, scale or zero point (those give errors of order Σ|w·x|).

use whittle_kernels::{
    DType, DenseWeight, Isa, KernelError, PackedWeight, QuantParts, SharedBytes, Sparse24Values, Sparse24Weight,
    Weight,
};

/// Deterministic test data without pulling randomness into the assertions' failure messages.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; n * rows];
    let mut mag = vec![0.0; n * rows];
    for t in 0..n {
        for r in 0..rows {
            for c in 0..cols {
                let p = w[r * cols + c] as f64 * x[t * cols + c] as f64;
                y[t * rows + r] += p;
                mag[t * rows + r] += p.abs();
            }
        }
    }
    (y, mag)
}

fn check(what: &str, got: &[f32], want: &(Vec<f64>, Vec<f64>)) {
    assert_eq!(got.len(), want.0.len());
    for (i, (&g, (&w, &m))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
        let tol = 2e-5 * m + 1e-30;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}: output {i}: got {g}, want {w}, |diff| {} > tol {tol}",
            (g as f64 - w).abs()
        );
    }
}

fn activations(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols).map(|_| rng.f32()).collect()
}

struct Quant {
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<u8>,
    g_idx: Option<Vec<u32>>,
}

impl Quant {
    fn random(rng: &mut Rng, rows: usize, cols: usize, bits: u8, group: usize, sym: bool, act_order: bool) -> Quant {
        let ng = cols.div_ceil(group);
        let maxq = (1u64 << bits) - 1;
        let codes = (0..rows * cols).map(|_| rng.below(maxq + 1) as u8).collect();
        // f16-representable scales, as GPTQ produces (the kernel stores them as f16 then).
        let scales = (0..rows * ng).map(|_| half::f16::from_f32(0.001 + rng.f32().abs() * 0.1).to_f32()).collect();
        let zeros = (0..rows * ng).map(|_| if sym { 1u8 << (bits - 1) } else { rng.below(maxq + 1) as u8 }).collect();
        let g_idx = act_order.then(|| {
            // A random assignment of columns to groups with each group's size as without act-order, like GPTQ's
            // desc_act: g_idx[perm[i]] = i / group.
            let mut perm: Vec<usize> = (0..cols).collect();
            for i in (1..cols).rev() {
                perm.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut g = vec![0u32; cols];
            for (i, &c) in perm.iter().enumerate() {
                g[c] = (i / group) as u32;
            }
            g
        });
        Quant { rows, cols, bits, group, codes, scales, zeros, g_idx }
    }
    fn parts(&self) -> QuantParts<'_> {
        QuantParts {
            rows: self.rows,
            cols: self.cols,
            bits: self.bits,
            group_size: self.group,
            codes: &self.codes,
            scales: &self.scales,
            zeros: &self.zeros,
            g_idx: self.g_idx.as_deref(),
        }
    }
}

#[test]
fn packed_matches_reference_for_every_bits_group_and_isa() {
    let mut rng = Rng(1);
    // (rows, cols, group): ragged last group (172 = 5·32 + 12), per-channel (group == cols and > cols), groups
    // smaller than a word, cols not a multiple of 16, odd rows.
    let shapes = [(7, 172, 32), (5, 300, 128), (9, 64, 16), (3, 257, 257), (4, 100, 1000), (6, 1000, 64)];
    for bits in [2u8, 3, 4, 8] {
        for &(rows, cols, group) in &shapes {
            for (sym, act_order) in [(true, false), (false, false), (false, true), (true, true)] {
                let q = Quant::random(&mut rng, rows, cols, bits, group, sym, act_order);
                let w = PackedWeight::new(q.parts()).expect("valid parts");
                let dense = q.parts().dequantize();
                for n in [1usize, 3, 17] {
                    let x = activations(&mut rng, n, cols);
                    let want = reference(&dense, rows, cols, &x, n);
                    for isa in Isa::available() {
                        let mut y = vec![f32::NAN; n * rows];
                        w.matmul_isa(isa, &x, n, &mut y);
                        let what = format!(
                            "packed {rows}x{cols} b{bits} g{group} sym={sym} act_order={act_order} n={n} {}",
                            isa.name()
                        );
                        check(&what, &y, &want);
                    }
                }
            }
        }
    }
}

#[test]
fn packed_large_batch_and_parallel_paths_match_reference() {
    let mut rng = Rng(2);
    // 603 × 1000 at 4 bits is ~300 KB: above the threshold where rows are split over rayon; 603 rows leave a last
    // task block that is not a whole number of 4-row tiles.
    for (rows, cols, n) in [(603, 1000, 1), (603, 1000, 5), (33, 300, 256)] {
        let q = Quant::random(&mut rng, rows, cols, 4, 128, false, false);
        let w = Weight::Packed(PackedWeight::new(q.parts()).unwrap());
        let x = activations(&mut rng, n, cols);
        let want = reference(&q.parts().dequantize(), rows, cols, &x, n);
        let mut y = vec![f32::NAN; n * rows];
        w.matmul(&x, n, &mut y);
        check(&format!("packed {rows}x{cols} n={n}"), &y, &want);
    }
}

#[test]
fn packed_wide_rows_split_into_column_tiles_match_reference() {
    // Kernels may process long rows in column tiles (activations kept in L1) and carry partial sums across them;
    // groups of 96 and one group per row straddle tile boundaries.
    let mut rng = Rng(14);
    for (bits, group, act_order) in [(4u8, 96usize, false), (4, 9000, false), (2, 128, true), (8, 64, false)] {
        let (rows, cols) = (9, 9000);
        let q = Quant::random(&mut rng, rows, cols, bits, group, false, act_order);
        let w = PackedWeight::new(q.parts()).unwrap();
        let dense = q.parts().dequantize();
        for n in [1usize, 2, 9] {
            let x = activations(&mut rng, n, cols);
            let want = reference(&dense, rows, cols, &x, n);
            for isa in Isa::available() {
                let mut y = vec![f32::NAN; n * rows];
                w.matmul_isa(isa, &x, n, &mut y);
                check(&format!("packed wide b{bits} g{group} n={n} {}", isa.name()), &y, &want);
            }
        }
    }
}

#[test]
fn packed_int4_g128_stays_close_to_stored_bits() {
    let mut rng = Rng(3);
    let q = Quant::random(&mut rng, 256, 4096, 4, 128, true, false);
    let w = PackedWeight::new(q.parts()).unwrap();
    let bits = w.resident_bytes() as f64 * 8.0 / (256.0 * 4096.0);
    // 4 bits + (16-bit scale + 8-bit zero) / 128 = 4.19, plus the shared column layout.
    assert!(bits < 4.25, "int4 g128 uses {bits:.3} bits per weight");
    let q3 = Quant::random(&mut rng, 256, 4096, 3, 128, true, false);
    let bits3 = PackedWeight::new(q3.parts()).unwrap().resident_bytes() as f64 * 8.0 / (256.0 * 4096.0);
    // 10 codes per 32-bit lane word: 3.2 bits + scales.
    assert!(bits3 < 3.45, "int3 g128 uses {bits3:.3} bits per weight");
}

#[test]
fn packed_rejects_bad_parts_naming_the_field() {
    let mut rng = Rng(4);
    let q = Quant::random(&mut rng, 2, 40, 4, 16, false, false);
    let mut bad = q.parts();
    let codes: Vec<u8> = q.codes.iter().map(|&c| c | 16).collect();
    bad.codes = &codes;
    match PackedWeight::new(bad) {
        Err(KernelError::Shape { field: "codes", .. }) => {}
        other => panic!("expected a codes error, got {other:?}"),
    }
    let mut bad = q.parts();
    bad.scales = &q.scales[1..];
    assert!(matches!(PackedWeight::new(bad), Err(KernelError::Shape { field: "scales", .. })));
    let mut bad = q.parts();
    bad.bits = 5;
    assert!(matches!(PackedWeight::new(bad), Err(KernelError::Shape { field: "bits", .. })));
    let gi = vec![99u32; 40];
    let mut bad = q.parts();
    bad.g_idx = Some(&gi);
    assert!(matches!(PackedWeight::new(bad), Err(KernelError::Shape { field: "g_idx", .. })));
}

/// A random 2:4 mask (sometimes fewer than 2 kept) of a `rows × cols` matrix.
fn mask24(rng: &mut Rng, rows: usize, cols: usize) -> Vec<bool> {
    let mut m = vec![false; rows * cols];
    for r in 0..rows {
        for c0 in (0..cols).step_by(4) {
            let keep = [2, 2, 2, 1, 0][rng.below(5) as usize];
            let a = rng.below(4) as usize;
            let b = (a + 1 + rng.below(3) as usize) % 4;
            for &p in [a, b].iter().take(keep) {
                if c0 + p < cols {
                    m[r * cols + c0 + p] = true;
                }
            }
        }
    }
    m
}

#[test]
fn sparse24_dense_values_match_reference() {
    let mut rng = Rng(5);
    for &(rows, cols) in &[(7, 171), (4, 256), (9, 600), (1, 4), (3, 33)] {
        let mask = mask24(&mut rng, rows, cols);
        let dense: Vec<f32> = mask.iter().map(|&k| if k { rng.f32() + 1.5 } else { 0.0 }).collect();
        for values in [Sparse24Values::F32, Sparse24Values::F16] {
            let w = Sparse24Weight::new(rows, cols, &dense, values).expect("2:4 pattern");
            // f16 values are rounded at construction: the reference is what is stored.
            let stored = w.to_dense();
            if matches!(values, Sparse24Values::F32) {
                assert_eq!(stored, dense, "f32 values round-trip exactly");
            }
            for n in [1usize, 3, 17] {
                let x = activations(&mut rng, n, cols);
                let want = reference(&stored, rows, cols, &x, n);
                for isa in Isa::available() {
                    let mut y = vec![f32::NAN; n * rows];
                    w.matmul_isa(isa, &x, n, &mut y);
                    check(&format!("sparse24 {values:?} {rows}x{cols} n={n} {}", isa.name()), &y, &want);
                }
            }
        }
    }
}

#[test]
fn sparse24_quantized_values_match_reference() {
    let mut rng = Rng(6);
    // Groups of 16, 32, 128 and per-channel; cols ragged w.r.t. 4, 16 and 256; odd rows.
    for &(rows, cols, group) in &[(7, 171, 32), (5, 600, 128), (3, 64, 16), (6, 300, 300), (2, 513, 64)] {
        for bits in [2u8, 4] {
            for sym in [true, false] {
                let q = Quant::random(&mut rng, rows, cols, bits, group, sym, false);
                let mask = mask24(&mut rng, rows, cols);
                let w = Sparse24Weight::from_quantized(q.parts(), &mask).expect("2:4 quantized");
                assert!(w.is_quantized());
                let full = q.parts().dequantize();
                let dense: Vec<f32> = full.iter().zip(&mask).map(|(&v, &k)| if k { v } else { 0.0 }).collect();
                // Stored values decode to exactly the masked dequantized matrix.
                assert_eq!(w.to_dense(), dense);
                for n in [1usize, 3, 17] {
                    let x = activations(&mut rng, n, cols);
                    let want = reference(&dense, rows, cols, &x, n);
                    for isa in Isa::available() {
                        let mut y = vec![f32::NAN; n * rows];
                        w.matmul_isa(isa, &x, n, &mut y);
                        check(&format!("sparse24 q{bits} {rows}x{cols} g{group} sym={sym} n={n} {}", isa.name()), &y, &want);
                    }
                }
            }
        }
    }
}

#[test]
fn sparse24_from_dense_with_quant_parts_uses_the_dense_pattern() {
    let mut rng = Rng(7);
    let (rows, cols) = (5, 200);
    let q = Quant::random(&mut rng, rows, cols, 4, 32, false, false);
    let mask = mask24(&mut rng, rows, cols);
    let full = q.parts().dequantize();
    // The pattern comes from the nonzeros of `dense`; where a kept weight quantizes to exactly 0 it is dropped,
    // which changes nothing in the product.
    let dense: Vec<f32> = full.iter().zip(&mask).map(|(&v, &k)| if k { v } else { 0.0 }).collect();
    let w = Sparse24Weight::new(rows, cols, &dense, Sparse24Values::Quant(q.parts())).unwrap();
    assert_eq!(w.to_dense(), dense);
    let x = activations(&mut rng, 3, cols);
    let mut y = vec![0.0; 3 * rows];
    Weight::Sparse24(w).matmul(&x, 3, &mut y);
    check("sparse24 from dense + quant", &y, &reference(&dense, rows, cols, &x, 3));
}

#[test]
fn sparse24_large_batch_and_parallel_paths_match_reference() {
    let mut rng = Rng(8);
    for (rows, cols, n) in [(1001, 1024, 1), (1001, 1024, 4), (17, 300, 256)] {
        let q = Quant::random(&mut rng, rows, cols, 4, 128, false, false);
        let mask = mask24(&mut rng, rows, cols);
        let w = Sparse24Weight::from_quantized(q.parts(), &mask).unwrap();
        let dense = w.to_dense();
        let x = activations(&mut rng, n, cols);
        let mut y = vec![f32::NAN; n * rows];
        w.matmul(&x, n, &mut y);
        check(&format!("sparse24 {rows}x{cols} n={n}"), &y, &reference(&dense, rows, cols, &x, n));
    }
}

#[test]
fn sparse24_rejects_what_it_cannot_represent() {
    let mut rng = Rng(9);
    let mut dense = vec![0.0f32; 2 * 8];
    dense[8 + 4..8 + 7].copy_from_slice(&[1.0, 2.0, 3.0]);
    match Sparse24Weight::new(2, 8, &dense, Sparse24Values::F32) {
        Err(KernelError::Not24 { row: 1, col: 4, kept: 3 }) => {}
        other => panic!("expected Not24 at row 1 col 4, got {other:?}"),
    }
    let q = Quant::random(&mut rng, 2, 64, 4, 32, false, true);
    let mask = mask24(&mut rng, 2, 64);
    assert!(matches!(Sparse24Weight::from_quantized(q.parts(), &mask), Err(KernelError::Unsupported(_))));
    let q = Quant::random(&mut rng, 2, 64, 8, 32, false, false);
    assert!(matches!(Sparse24Weight::from_quantized(q.parts(), &mask), Err(KernelError::Unsupported(_))));
    let q = Quant::random(&mut rng, 2, 64, 4, 24, false, false);
    assert!(matches!(Sparse24Weight::from_quantized(q.parts(), &mask), Err(KernelError::Unsupported(_))));
}

#[test]
fn sparse24_int4_uses_about_three_bits_per_weight() {
    let mut rng = Rng(10);
    let q = Quant::random(&mut rng, 256, 4096, 4, 128, true, false);
    let mask = mask24(&mut rng, 256, 4096);
    let w = Sparse24Weight::from_quantized(q.parts(), &mask).unwrap();
    let bits = w.resident_bytes() as f64 * 8.0 / (256.0 * 4096.0);
    assert!(bits < 3.25, "2:4 int4 uses {bits:.3} bits per weight");
}

/// A random `rows × cols` weight stored as `dtype`.
fn random_dense(rng: &mut Rng, rows: usize, cols: usize, dtype: DType) -> DenseWeight {
    let vals: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
    let bytes: Vec<u8> = match dtype {
        DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        DType::BF16 => vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
    };
    DenseWeight::from_bytes(rows, cols, dtype, SharedBytes::from_vec(bytes))
}

#[test]
fn dense_f32_f16_bf16_match_reference() {
    let mut rng = Rng(11);
    for &(rows, cols) in &[(7, 171), (3, 8), (5, 16), (9, 1000), (2, 3)] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = random_dense(&mut rng, rows, cols, dtype);
            let stored = w.to_f32_vec();
            for n in [1usize, 3, 17] {
                let x = activations(&mut rng, n, cols);
                let want = reference(&stored, rows, cols, &x, n);
                for isa in Isa::available() {
                    let mut y = vec![f32::NAN; n * rows];
                    w.matmul_isa(isa, &x, n, &mut y);
                    check(&format!("dense {dtype:?} {rows}x{cols} n={n} {}", isa.name()), &y, &want);
                }
                let mut y = vec![f32::NAN; n * rows];
                w.matmul_gemm(&x, n, &mut y);
                check(&format!("dense {dtype:?} {rows}x{cols} n={n} gemm"), &y, &want);
            }
        }
    }
}

#[test]
fn dense_gemm_path_matches_reference_over_row_blocks() {
    // 600 rows of 333 columns: three GEMM row blocks (256 rows each at this width, the last ragged), run in
    // parallel, for the prefill-sized token counts `matmul` sends to the GEMM.
    let mut rng = Rng(14);
    let (rows, cols) = (600, 333);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let w = random_dense(&mut rng, rows, cols, dtype);
        let stored = w.to_f32_vec();
        for n in [whittle_kernels::dense::GEMM_MIN_TOKENS, 37] {
            let x = activations(&mut rng, n, cols);
            let mut y = vec![f32::NAN; n * rows];
            w.matmul(&x, n, &mut y);
            check(&format!("dense gemm {dtype:?} n={n}"), &y, &reference(&stored, rows, cols, &x, n));
        }
    }
}

#[test]
fn dense_parallel_path_matches_reference() {
    let mut rng = Rng(12);
    let (rows, cols, n) = (700, 500, 2);
    let vals: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
    let w = Weight::Dense(DenseWeight::from_f32(rows, cols, vals.clone()));
    let x = activations(&mut rng, n, cols);
    let mut y = vec![0.0; n * rows];
    w.matmul(&x, n, &mut y);
    check("dense parallel", &y, &reference(&vals, rows, cols, &x, n));
    assert_eq!(w.resident_bytes(), rows * cols * 4);
}

#[test]
fn isa_paths_agree_on_the_same_weight() {
    // The scalar path is the fallback on CPUs without AVX2; it must agree with the SIMD paths beyond the reference
    // tolerance (same f32 data, different summation order only).
    let mut rng = Rng(13);
    let q = Quant::random(&mut rng, 31, 517, 4, 64, false, true);
    let w = PackedWeight::new(q.parts()).unwrap();
    let x = activations(&mut rng, 2, 517);
    let mut base = vec![0.0; 62];
    w.matmul_isa(Isa::Scalar, &x, 2, &mut base);
    for isa in Isa::available() {
        let mut y = vec![0.0; 62];
        w.matmul_isa(isa, &x, 2, &mut y);
        for (a, b) in y.iter().zip(&base) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{}: {a} vs scalar {b}", isa.name());
        }
    }
    eprintln!("ISAs tested on this CPU: {:?}", Isa::available());
}

/// Whether the int8 (VNNI) kernels can run here; elsewhere `matmul_q8` falls back to the exact path.
fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `matmul_q8` against the f64 reference. Tolerance: the int8 activations are `x` rounded to a grid of
/// `s_x = max|x_word|/127`, so each product is off by at most `|w|·s_x/2 ≤ |w|·max|x|/254`; the bound used is
/// `Σ_c |W[r,c]|·max|x|/254` plus the f32 tolerance of `check` (typical errors are ~30× smaller: rounding errors
/// are independent and average down over cols, see the printed ratio).
fn check_q8(what: &str, got: &[f32], want: &(Vec<f64>, Vec<f64>), w: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
    check_int_act(what, got, want, w, x, (rows, cols), 127.0)
}

/// `check_q8` for activations rounded to `qmax` levels each side of 0 (127 for int8, 32767 for int16).
fn check_int_act(
    what: &str,
    got: &[f32],
    want: &(Vec<f64>, Vec<f64>),
    w: &[f32],
    x: &[f32],
    (rows, cols): (usize, usize),
    qmax: f64,
) -> f64 {
    let n = got.len() / rows;
    let mut worst: f64 = 0.0;
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        let amax = xt.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        for r in 0..rows {
            let i = t * rows + r;
            let wsum: f64 = w[r * cols..(r + 1) * cols].iter().map(|v| v.abs() as f64).sum();
            let bound = wsum * amax / (2.0 * qmax);
            let tol = bound * (1.0 + 1e-5) + 2e-5 * want.1[i] + 1e-30;
            let err = (got[i] as f64 - want.0[i]).abs();
            assert!(err <= tol, "{what}: output {i}: got {}, want {}, |diff| {err} > tol {tol}", got[i], want.0[i]);
            if bound > 0.0 {
                worst = worst.max(err / bound);
            }
        }
    }
    worst
}

#[test]
fn packed_q8_matches_reference_within_int8_activation_error() {
    let mut rng = Rng(15);
    // Shapes where the int8 kernel runs (4 bits; groups of 128/256, one group per row, act-order with groups of
    // 128; ragged cols; odd rows, rows not a multiple of the 4-row tile) and where it falls back (other bits,
    // groups of 32/64/96, ragged act-order groups).
    let cases = [
        (7, 300, 4u8, 128, false, true),
        (5, 257, 4, 257, true, true),
        (6, 1000, 4, 2000, false, true),
        (9, 1024, 4, 256, false, true),
        (13, 640, 4, 128, true, true),
        (3, 129, 4, 128, false, true),
        (10, 384, 4, 128, false, true),
        (5, 200, 4, 32, false, false),
        (5, 200, 4, 96, true, false),
        (4, 300, 8, 128, false, false),
        (4, 300, 2, 128, false, false),
    ];
    let mut worst: f64 = 0.0;
    for &(rows, cols, bits, group, sym, fast) in &cases {
        for act_order in [false, true] {
            let q = Quant::random(&mut rng, rows, cols, bits, group, sym, act_order);
            let w = PackedWeight::new(q.parts()).unwrap();
            // Act-order keeps groups contiguous in stream order, so it changes nothing here.
            assert_eq!(w.q8_supported(), fast && cpu_has_vnni(), "q8 kernel for {rows}x{cols} b{bits} g{group}");
            let dense = q.parts().dequantize();
            for n in [1usize, 2] {
                let x = activations(&mut rng, n, cols);
                let want = reference(&dense, rows, cols, &x, n);
                let mut y = vec![f32::NAN; n * rows];
                w.matmul_q8(&x, n, &mut y);
                let what = format!("q8 {rows}x{cols} b{bits} g{group} sym={sym} act_order={act_order} n={n}");
                worst = worst.max(check_q8(&what, &y, &want, &dense, &x, rows, cols));
                let mut y2 = vec![f32::NAN; n * rows];
                Weight::Packed(w.clone()).matmul_q8(&x, n, &mut y2);
                assert_eq!(y, y2, "{what}: Weight::matmul_q8");
            }
        }
    }
    eprintln!("q8: worst error / bound = {worst:.3}");
}

#[test]
fn packed_q8_large_parallel_and_outliers() {
    let mut rng = Rng(16);
    // 601 rows: the last task block ends in a partial 4-row tile.
    let (rows, cols) = (601, 4096);
    let q = Quant::random(&mut rng, rows, cols, 4, 128, false, false);
    let w = PackedWeight::new(q.parts()).unwrap();
    let dense = q.parts().dequantize();
    for outliers in [false, true] {
        let mut x = activations(&mut rng, 1, cols);
        if outliers {
            // A few large activations, as LLM hidden states have: they coarsen the grid of their own 128 columns.
            x[5] = 40.0;
            x[3000] = -25.0;
        }
        let want = reference(&dense, rows, cols, &x, 1);
        let mut y = vec![f32::NAN; rows];
        w.matmul_q8(&x, 1, &mut y);
        check_q8("q8 601x4096", &y, &want, &dense, &x, rows, cols);
        // Typical relative error on this data (uniform x, random codes: |y| has heavy cancellation).
        let rel = y.iter().zip(&want.0).map(|(&g, &r)| (g as f64 - r).abs()).sum::<f64>()
            / want.0.iter().map(|r| r.abs()).sum::<f64>();
        eprintln!("q8 outliers={outliers}: mean |err| / mean |y| = {rel:.2e}");
        if !outliers {
            assert!(rel < 1e-2, "q8 relative error {rel}");
        }
    }
}

/// One token through an int16-activation kernel (`q16`) against the reference within its bound, and `matmul`
/// (`default`) equal to it where the CPU runs that kernel for single tokens (the exact-path tolerance elsewhere).
/// Returns the error over the bound.
fn check_q16_and_default(
    what: &str,
    q16: impl Fn(&[f32], &mut [f32]),
    default: impl Fn(&[f32], &mut [f32]),
    x: &[f32],
    dense: &[f32],
    (rows, cols): (usize, usize),
) -> f64 {
    let want = reference(dense, rows, cols, x, 1);
    let mut y = vec![f32::NAN; rows];
    q16(x, &mut y);
    let worst = check_int_act(what, &y, &want, dense, x, (rows, cols), 32767.0);
    let mut y2 = vec![f32::NAN; rows];
    default(x, &mut y2);
    if cpu_has_vnni() {
        assert_eq!(y, y2, "{what}: matmul on one token runs the int16 kernel");
    } else {
        check(what, &y2, &want);
    }
    worst
}

/// The decode default on VNNI CPUs: int16 activations. Same shapes as the q8 test, plus outliers; the bound is
/// `Σ_c |W[r,c]|·max|x|/65534` plus the f32 tolerance, and `matmul` on one token must be this kernel.
#[test]
fn packed_q16_matches_reference_within_int16_activation_error() {
    let mut rng = Rng(18);
    let cases = [(7, 300, 128, true), (5, 257, 257, false), (9, 1024, 256, false), (13, 640, 128, true), (3, 129, 128, false)];
    let mut worst: f64 = 0.0;
    for &(rows, cols, group, sym) in &cases {
        for act_order in [false, true] {
            let q = Quant::random(&mut rng, rows, cols, 4, group, sym, act_order);
            let w = PackedWeight::new(q.parts()).unwrap();
            let dense = q.parts().dequantize();
            for outliers in [false, true] {
                let mut x = activations(&mut rng, 1, cols);
                if outliers {
                    x[cols / 3] = 40.0;
                }
                let what = format!("q16 {rows}x{cols} g{group} sym={sym} act_order={act_order} outliers={outliers}");
                let (q16, default) = (|x: &[f32], y: &mut [f32]| w.matmul_q16(x, 1, y), |x: &[f32], y: &mut [f32]| w.matmul(x, 1, y));
                worst = worst.max(check_q16_and_default(&what, q16, default, &x, &dense, (rows, cols)));
            }
        }
    }
    eprintln!("q16: worst error / bound = {worst:.3} (vnni: {})", cpu_has_vnni());
}

#[test]
fn sparse24_q8_matches_reference_within_int8_activation_error() {
    let mut rng = Rng(17);
    // Groups of 128/256 and per-channel (int8 kernel), groups of 32 (falls back); cols ragged w.r.t. 4, 16, 128
    // and 256; odd rows; a large case that runs on several threads.
    let cases = [(7, 171, 128), (5, 600, 128), (3, 300, 300), (2, 513, 256), (9, 1000, 32), (1, 4, 4), (1001, 1024, 128)];
    let mut worst: f64 = 0.0;
    for &(rows, cols, group) in &cases {
        for sym in [true, false] {
            let q = Quant::random(&mut rng, rows, cols, 4, group, sym, false);
            let mask = mask24(&mut rng, rows, cols);
            let w = Sparse24Weight::from_quantized(q.parts(), &mask).unwrap();
            let fast = group % 128 == 0 || group >= cols;
            assert_eq!(w.q8_supported(), fast && cpu_has_vnni(), "2:4 q8 kernel for {rows}x{cols} g{group}");
            let dense = w.to_dense();
            for n in [1usize, 2] {
                let mut x = activations(&mut rng, n, cols);
                if cols > 200 {
                    x[cols / 2] = 30.0; // an outlier: coarser grid for its 128 columns only
                }
                let want = reference(&dense, rows, cols, &x, n);
                let mut y = vec![f32::NAN; n * rows];
                w.matmul_q8(&x, n, &mut y);
                let what = format!("sparse24 q8 {rows}x{cols} g{group} sym={sym} n={n}");
                worst = worst.max(check_q8(&what, &y, &want, &dense, &x, rows, cols));
            }
        }
    }
    eprintln!("sparse24 q8: worst error / bound = {worst:.3}");
}

/// The 2:4 decode default on VNNI CPUs: int16 activations, bound `Σ_c |W[r,c]|·max|x|/65534`; `matmul` on one
/// token must be this kernel (exact-path tolerance where the CPU lacks VNNI).
#[test]
fn sparse24_q16_matches_reference_within_int16_activation_error() {
    let mut rng = Rng(19);
    let cases = [(7, 171, 128), (5, 600, 128), (3, 300, 300), (2, 513, 256), (1, 4, 4), (1001, 1024, 128)];
    let mut worst: f64 = 0.0;
    for &(rows, cols, group) in &cases {
        for sym in [true, false] {
            let q = Quant::random(&mut rng, rows, cols, 4, group, sym, false);
            let mask = mask24(&mut rng, rows, cols);
            let w = Sparse24Weight::from_quantized(q.parts(), &mask).unwrap();
            let dense = w.to_dense();
            let mut x = activations(&mut rng, 1, cols);
            if cols > 200 {
                x[cols / 2] = 30.0;
            }
            let what = format!("sparse24 q16 {rows}x{cols} g{group} sym={sym}");
            let (q16, default) = (|x: &[f32], y: &mut [f32]| w.matmul_q16(x, 1, y), |x: &[f32], y: &mut [f32]| w.matmul(x, 1, y));
            worst = worst.max(check_q16_and_default(&what, q16, default, &x, &dense, (rows, cols)));
        }
    }
    eprintln!("sparse24 q16: worst error / bound = {worst:.3}");
}
