//! Packed low-bit weights (2, 3, 4 or 8 bits per weight with per-group scale and zero point, optional act-order
//! `g_idx`) and their product with f32 activations.
//!
//! # Layout, and why
//! A GEMV is bound by how fast weights stream from memory, so the layout is chosen to make *unpacking* cheap
//! enough to keep up: every 32-bit word holds codes of **one SIMD lane**, not consecutive columns.
//!
//! * Columns are first put in *stream order*: grouped by quantization group (with `g_idx`, columns are permuted so
//!   each group becomes contiguous — exllama's trick; the activations are permuted the same way once per call), and
//!   each group is padded to a multiple of 16 columns. A run of 16 columns is a *slice*.
//! * A *word* is 16 lanes × u32 (64 bytes, one AVX-512 register or two AVX2 ones). Lane `j` of word `w` holds, at
//!   bits `p·b .. p·b+b`, the code of column `16·(w·C + p) + j` for `p < C = ⌊32/b⌋` (8 codes at 4 bits, 16 at 2,
//!   4 at 8, 10 at 3 bits with 2 bits unused).
//! * So decoding slice `p` of a word is one shift and one mask for all 16 lanes, and its 16 activations are one
//!   contiguous load: no shuffles at all. The code is dropped into the mantissa of 1.0 (`(code << (23−b)) | 0x3F80_0000`
//!   = 1 + code/2^b exactly), which replaces an int→float conversion by an OR (a single `vpternlogd` on AVX-512).
//! * The scale is applied once per group and the zero point never enters the inner loop:
//!   `Σ s·(q−z)·x = 2^b·s·Σ(1+q/2^b)·x − s·(2^b+z)·Σx`, with `Σx` per group computed once per call (kernels.md).
//! * Scales are kept as f16 when every scale is exactly representable (the GPTQ case), else f32; zero points as
//!   bytes. At 4 bits with groups of 128 that is 4 + 24/128 ≈ 4.19 bits per weight, the same as the checkpoint.
//!
//! Rows are independent, so threads split rows (see `cpu::for_row_blocks`).
//!
//! `matmul_q8` runs the same layout llama.cpp-style (int8 activations, AVX-512 VNNI; `x86::vnni`): at 4 bits a lane
//! word's low nibbles are slices 0, 2, 4, 6 and its high nibbles slices 1, 3, 5, 7, so one AND (or shift + AND)
//! yields 64 u8 codes for `vpdpbusd`, with the activations laid out to match once per call. `matmul_q16` does the
//! same with int16 activations and `vpdpwssd` (a shift and an AND of `0x000F000F` give slices k and k+4 as a u16
//! pair): 258× less activation rounding than int8, well inside the runtime's 1e-3 acceptance, and still
//! memory-bound, so it is what `matmul` runs on one token (decode) on CPUs with AVX-512 VNNI.

use crate::cpu::{self, Isa, OutRows, Scratch, ACT_SCRATCH};
use crate::KernelError;
use half::f16;
use std::sync::Arc;

/// Rows the widest single-token tiles take at once (the VNNI and AVX-512 kernels' `R`). Task blocks are cut at
/// multiples of it: a block of 11 rows would run 3 of them one row at a time, without the tile's reuse of each
/// activation load and without its prefetch of the next tile, which cost ~10% of bandwidth on long rows.
const TILE_ROWS: usize = 4;

/// The plain parts of a quantized linear layer, as a compressor produces them (core's `QuantizedLinear`).
///
/// `W[o, i] = scales[o·G + g] · (codes[o·cols + i] − zeros[o·G + g])`, `g = g_idx[i]` or `i / group_size`,
/// `G = ceil(cols / group_size)`.
#[derive(Clone, Copy, Debug)]
pub struct QuantParts<'a> {
    pub rows: usize,
    pub cols: usize,
    /// 2, 3, 4 or 8.
    pub bits: u8,
    /// Columns per group; `cols` (or more) for one group per row. The last group may be shorter.
    pub group_size: usize,
    /// Row-major `rows × cols`, each in `[0, 2^bits − 1]`.
    pub codes: &'a [u8],
    /// Row-major `rows × G`.
    pub scales: &'a [f32],
    /// Row-major `rows × G`, integer zero points (any byte value is accepted).
    pub zeros: &'a [u8],
    /// Group of each input column (act-order); `None` = `i / group_size`.
    pub g_idx: Option<&'a [u32]>,
}

impl QuantParts<'_> {
    pub fn n_groups(&self) -> usize {
        self.cols.div_ceil(self.group_size.max(1))
    }

    pub(crate) fn group_of(&self, col: usize) -> usize {
        match self.g_idx {
            Some(g) => g[col] as usize,
            None => col / self.group_size,
        }
    }

    /// Checks every length and range a kernel relies on.
    pub(crate) fn validate(&self) -> Result<(), KernelError> {
        let bad = |field: &'static str, expected: String, found: String| {
            Err(KernelError::Shape { field, expected, found })
        };
        if ![2u8, 3, 4, 8].contains(&self.bits) {
            return bad("bits", "2, 3, 4 or 8".into(), self.bits.to_string());
        }
        if self.group_size == 0 {
            return bad("group_size", "≥ 1".into(), "0".into());
        }
        if self.codes.len() != self.rows * self.cols {
            return bad("codes", format!("rows·cols = {}", self.rows * self.cols), self.codes.len().to_string());
        }
        let g = self.n_groups();
        if self.scales.len() != self.rows * g {
            return bad("scales", format!("rows·n_groups = {}", self.rows * g), self.scales.len().to_string());
        }
        if self.zeros.len() != self.rows * g {
            return bad("zeros", format!("rows·n_groups = {}", self.rows * g), self.zeros.len().to_string());
        }
        if let Some(gi) = self.g_idx {
            if gi.len() != self.cols {
                return bad("g_idx", format!("cols = {}", self.cols), gi.len().to_string());
            }
            if let Some((i, &v)) = gi.iter().enumerate().find(|(_, &v)| v as usize >= g) {
                return bad("g_idx", format!("< n_groups = {g}"), format!("g_idx[{i}] = {v}"));
            }
        }
        let maxq = (1u16 << self.bits) - 1;
        if let Some((i, &c)) = self.codes.iter().enumerate().find(|(_, &c)| c as u16 > maxq) {
            return bad("codes", format!("≤ {maxq}"), format!("codes[{i}] = {c}"));
        }
        if let Some((i, s)) = self.scales.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return bad("scales", "finite".into(), format!("scales[{i}] = {s}"));
        }
        Ok(())
    }

    /// The dense f32 matrix these parts describe (the reference every kernel is tested against).
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.n_groups();
        let mut out = vec![0.0; self.rows * self.cols];
        for o in 0..self.rows {
            for i in 0..self.cols {
                let gi = self.group_of(i);
                let s = self.scales[o * g + gi];
                let z = self.zeros[o * g + gi] as f32;
                out[o * self.cols + i] = s * (self.codes[o * self.cols + i] as f32 - z);
            }
        }
        out
    }
}

/// Group scales as stored: f16 when lossless (half the bytes), else f32.
#[derive(Clone, Debug)]
pub(crate) enum Scales {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Scales {
    /// Stores `v` as f16 if every value round-trips exactly.
    pub(crate) fn new(v: Vec<f32>) -> Scales {
        if v.iter().all(|&s| f16::from_f32(s).to_f32() == s) {
            Scales::F16(v.iter().map(|&s| f16::from_f32(s)).collect())
        } else {
            Scales::F32(v)
        }
    }
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Scales::F16(v) => v.len() * 2,
            Scales::F32(v) => v.len() * 4,
        }
    }
    #[inline]
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F16(v) => v[i].to_f32(),
            Scales::F32(v) => v[i],
        }
    }
    /// Widens `[start, start+out.len())` into `out` (F16C when the caller's ISA has it).
    #[inline]
    pub(crate) fn widen(&self, isa: Isa, start: usize, out: &mut [f32]) {
        match self {
            Scales::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Scales::F16(v) => crate::x86::widen_f16(isa, &v[start..start + out.len()], out),
        }
    }
}

/// Column structure shared by every row: stream order, padding, group boundaries.
#[derive(Debug)]
pub(crate) struct ColumnLayout {
    pub(crate) bits: u32,
    /// Codes per lane word, ⌊32/b⌋.
    pub(crate) per_word: usize,
    /// Words (16 lanes each) per row.
    pub(crate) words: usize,
    /// Padded activation length per token: `words · per_word · 16`.
    pub(crate) padded: usize,
    /// Original column of each stream position; `None` when stream order is column order (no act-order).
    pub(crate) perm: Option<Vec<u32>>,
    /// Non-empty groups in stream order: their original group id.
    pub(crate) stream_groups: Vec<u32>,
    /// Range `[start, end)` of stream positions (unpadded) of each stream group.
    pub(crate) group_cols: Vec<(u32, u32)>,
    /// Slice range `[start, end)` of each stream group in the padded layout.
    pub(crate) group_slices: Vec<(u32, u32)>,
    /// Per word, bit `p` set when slice `p` of that word ends a group (the kernel then applies the group scale).
    pub(crate) flush_masks: Vec<u32>,
    /// Per word, the stream group open at its start (lets a kernel start at any word: column tiles, CUDA threads).
    pub(crate) word_group: Vec<u32>,
}

impl ColumnLayout {
    fn new(cols: usize, bits: u8, g_idx: Option<&[u32]>, group_size: usize, n_groups: usize) -> ColumnLayout {
        // Stable bucket sort of columns by group: contiguous groups, original order inside each. Without g_idx the
        // groups already are contiguous and in order, so no permutation is stored.
        let perm: Option<Vec<u32>> = g_idx.map(|gi| {
            let mut counts = vec![0usize; n_groups + 1];
            for &g in gi {
                counts[g as usize + 1] += 1;
            }
            for g in 0..n_groups {
                counts[g + 1] += counts[g];
            }
            let mut perm = vec![0u32; cols];
            for (c, &g) in gi.iter().enumerate() {
                perm[counts[g as usize]] = c as u32;
                counts[g as usize] += 1;
            }
            perm
        });
        let group_of_pos = |i: usize| match (&perm, g_idx) {
            (Some(p), Some(gi)) => gi[p[i] as usize] as usize,
            _ => i / group_size,
        };
        let per_word = 32 / bits as usize;
        let (mut stream_groups, mut group_cols, mut group_slices) = (Vec::new(), Vec::new(), Vec::new());
        let (mut i, mut slices) = (0usize, 0usize);
        while i < cols {
            let g = group_of_pos(i);
            let mut j = i + 1;
            while j < cols && group_of_pos(j) == g {
                j += 1;
            }
            let s = (j - i).div_ceil(16);
            stream_groups.push(g as u32);
            group_cols.push((i as u32, j as u32));
            group_slices.push((slices as u32, (slices + s) as u32));
            slices += s;
            i = j;
        }
        let words = slices.div_ceil(per_word);
        let padded = words * per_word * 16;
        let mut flush_masks = vec![0u32; words];
        for &(_, end) in &group_slices {
            let last = end as usize - 1;
            flush_masks[last / per_word] |= 1 << (last % per_word);
        }
        let mut word_group = Vec::with_capacity(words);
        let mut k = 0u32;
        for &m in &flush_masks {
            word_group.push(k);
            k += m.count_ones();
        }
        ColumnLayout {
            bits: bits as u32,
            per_word,
            words,
            padded,
            perm,
            stream_groups,
            group_cols,
            group_slices,
            flush_masks,
            word_group,
        }
    }

    fn bytes(&self) -> usize {
        self.perm.as_ref().map_or(0, |p| p.len() * 4) + self.stream_groups.len() * 20 + self.flush_masks.len() * 8
    }

    /// Calls `f(padded position, original column)` for every real (non-padding) position.
    pub(crate) fn for_each_position(&self, mut f: impl FnMut(usize, usize)) {
        for (&(c0, c1), &(s0, _)) in self.group_cols.iter().zip(&self.group_slices) {
            for i in c0 as usize..c1 as usize {
                let col = self.perm.as_ref().map_or(i, |p| p[i] as usize);
                f(s0 as usize * 16 + (i - c0 as usize), col);
            }
        }
    }

    /// Permutes and pads `x` (`n × cols`) into `xp` (`n × padded`) and sums each group into `sx` (`n × groups`).
    pub(crate) fn prepare(&self, x: &[f32], n: usize, cols: usize, xp: &mut [f32], sx: &mut [f32]) {
        let ng = self.group_slices.len();
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let xpt = &mut xp[t * self.padded..(t + 1) * self.padded];
            xpt.fill(0.0);
            for (k, (&(c0, c1), &(s0, _))) in self.group_cols.iter().zip(&self.group_slices).enumerate() {
                let (c0, c1, d0) = (c0 as usize, c1 as usize, s0 as usize * 16);
                let dst = &mut xpt[d0..d0 + (c1 - c0)];
                match &self.perm {
                    Some(p) => {
                        for (d, &c) in dst.iter_mut().zip(&p[c0..c1]) {
                            *d = xt[c as usize];
                        }
                    }
                    None => dst.copy_from_slice(&xt[c0..c1]),
                }
                sx[t * ng + k] = dst.iter().sum();
            }
        }
    }
}

/// A packed low-bit weight matrix; see the module docs for the layout.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    pub group_size: usize,
    pub(crate) layout: Arc<ColumnLayout>,
    /// `rows × words × 16` lane words.
    pub(crate) words: Vec<u32>,
    /// `rows × stream groups`, in stream order.
    pub(crate) scales: Scales,
    pub(crate) zeros: Vec<u8>,
}

impl PackedWeight {
    /// Packs a quantized layer. Errors name the field whose length or range is wrong.
    pub fn new(parts: QuantParts<'_>) -> Result<PackedWeight, KernelError> {
        parts.validate()?;
        let (rows, cols, bits) = (parts.rows, parts.cols, parts.bits as u32);
        let ng = parts.n_groups();
        let layout = ColumnLayout::new(cols, parts.bits, parts.g_idx, parts.group_size, ng);
        let (pw, nw) = (layout.per_word, layout.words);
        // Where each original column's code goes: (word, lane, shift), the same for every row.
        let mut place = vec![(0u32, 0u32); cols];
        layout.for_each_position(|pos, col| {
            let (slice, lane) = (pos / 16, pos % 16);
            place[col] = (((slice / pw) * 16 + lane) as u32, (slice % pw) as u32 * bits);
        });
        let mut words = vec![0u32; rows * nw * 16];
        for r in 0..rows {
            let codes = &parts.codes[r * cols..(r + 1) * cols];
            let out = &mut words[r * nw * 16..(r + 1) * nw * 16];
            for (&code, &(idx, shift)) in codes.iter().zip(&place) {
                out[idx as usize] |= (code as u32) << shift;
            }
        }
        let nsg = layout.stream_groups.len();
        let mut scales = Vec::with_capacity(rows * nsg);
        let mut zeros = Vec::with_capacity(rows * nsg);
        for r in 0..rows {
            for &g in &layout.stream_groups {
                scales.push(parts.scales[r * ng + g as usize]);
                zeros.push(parts.zeros[r * ng + g as usize]);
            }
        }
        Ok(PackedWeight {
            rows,
            cols,
            bits: parts.bits,
            group_size: parts.group_size,
            layout: Arc::new(layout),
            words,
            scales: Scales::new(scales),
            zeros,
        })
    }

    /// Bytes held in memory (codes, scales, zeros, and the shared column layout).
    pub fn resident_bytes(&self) -> usize {
        self.words.len() * 4 + self.scales.bytes() + self.zeros.len() + self.layout.bytes()
    }

    /// Bytes a GEMV must stream per call (codes, scales, zeros; the layout is small and cache-resident).
    pub fn streamed_bytes(&self) -> usize {
        self.words.len() * 4 + self.scales.bytes() + self.zeros.len()
    }

    /// y = x Wᵀ with the best kernel for this CPU. A single token (decode) with 4-bit codes on an AVX-512 VNNI CPU
    /// runs [`Self::matmul_q16`] (int16 activations: relative rounding 2⁻¹⁶ of each 128-column block's max, far
    /// below the runtime's 1e-3 acceptance, and memory-bound where f32 activations are not); `WHITTLE_KERNELS_Q8=1`
    /// asks for the faster, coarser `matmul_q8` instead. Everything else runs exact f32 activations.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        if n == 1 && self.q8_supported() {
            return self.matmul_int_act(x, n, y, !cpu::q8_decode_requested());
        }
        self.matmul_isa(Isa::best(), x, n, y)
    }

    /// Whether `matmul_q8` runs the int8 kernel for this weight on this CPU (else it is `matmul`): 4-bit codes,
    /// every quantization group starting at a 128-column word of stream order (group size a multiple of 128, or
    /// one group per row; act-order allowed), and AVX-512 VNNI.
    pub fn q8_supported(&self) -> bool {
        self.q8_layout_ok() && crate::x86::q8_supported()
    }

    pub(crate) fn q8_layout_ok(&self) -> bool {
        let l = &*self.layout;
        self.bits == 4 && l.group_slices.iter().all(|&(s0, _)| (s0 as usize).is_multiple_of(l.per_word))
    }

    /// y = x Wᵀ llama.cpp-style: each token's activations are quantized to int8 (one scale `max|x|/127` per 128
    /// columns of stream order) and multiplied with the 4-bit codes by AVX-512 VNNI `vpdpbusd`, then scaled per
    /// group in f32. About 3× fewer instructions than `matmul`, which makes the single-token GEMV memory-bound.
    ///
    /// Not exact: the activation rounding adds an error of at most `Σ_c |W[r,c]|·max|x|/254` per output (typically
    /// ~1e-3 relative to |y| on random data, see the kernel tests), so it is opt-in: `matmul` runs
    /// [`Self::matmul_q16`] on one token. Falls back to `matmul_isa` when `q8_supported()` is false.
    pub fn matmul_q8(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_int_act(x, n, y, false)
    }

    /// [`Self::matmul_q8`] with int16 activations (one scale `max|x|/32767` per 128 columns, `vpdpwssd`): the
    /// activation rounding adds at most `Σ_c |W[r,c]|·max|x|/65534` per output, 258× less than int8. Same support
    /// conditions; falls back to `matmul_isa` when `q8_supported()` is false.
    pub fn matmul_q16(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_int_act(x, n, y, true)
    }

    fn matmul_int_act(&self, x: &[f32], n: usize, y: &mut [f32], wide: bool) {
        assert_eq!(x.len(), n * self.cols, "x must be n × cols");
        assert_eq!(y.len(), n * self.rows, "y must be n × rows");
        if !self.q8_supported() {
            return self.matmul_isa(Isa::best(), x, n, y);
        }
        let l = &*self.layout;
        let ng = l.group_slices.len();
        let row_bytes = l.words * 64 + ng * 3;
        // Prepared f32 activations, then the integer form: words·32 (int16: 64) u32 + words scales + groups sums.
        let per_word = if wide { 65 } else { 33 };
        let mut scratch = Scratch::take(&ACT_SCRATCH, l.padded + ng + l.words * per_word + ng);
        let (xp, rest) = scratch.split_at_mut(l.padded);
        let (sx, q8) = rest.split_at_mut(ng);
        let mut yt = vec![0.0f32; if n > 1 { self.rows } else { 0 }];
        for t in 0..n {
            l.prepare(&x[t * self.cols..(t + 1) * self.cols], 1, self.cols, xp, sx);
            let dst: &mut [f32] = if n == 1 { &mut *y } else { &mut yt };
            let done = crate::x86::packed_q8(self, xp, q8, wide, &mut |f| {
                cpu::for_row_blocks(self.rows, TILE_ROWS, row_bytes, 1, dst, f);
            });
            debug_assert!(done, "q8_supported() checked the CPU");
            if n > 1 {
                y[t * self.rows..(t + 1) * self.rows].copy_from_slice(&yt);
            }
        }
    }

    /// y = x Wᵀ with a chosen instruction set (falls back to scalar if unsupported); tests compare them.
    pub fn matmul_isa(&self, isa: Isa, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "x must be n × cols");
        assert_eq!(y.len(), n * self.rows, "y must be n × rows");
        let isa = if isa.is_supported() { isa } else { Isa::Scalar };
        let l = &*self.layout;
        let ng = l.group_slices.len();
        let mut scratch = Scratch::take(&ACT_SCRATCH, n * (l.padded + ng));
        let (xp, sx) = scratch.split_at_mut(n * l.padded);
        let sx = &mut sx[..n * ng];
        l.prepare(x, n, self.cols, xp, sx);
        let (xp, sx) = (&*xp, &*sx);
        let row_bytes = l.words * 64 + ng * 3;
        cpu::for_row_blocks(self.rows, TILE_ROWS, row_bytes, n, y, |r0, r1, out| match isa {
            Isa::Scalar => self.rows_scalar(xp, sx, n, r0, r1, out),
            _ => crate::x86::packed_rows(isa, self, xp, sx, n, r0, r1, out),
        });
    }

    /// Reference kernel: the same layout decoded one lane at a time with exact int→float conversion.
    fn rows_scalar(&self, xp: &[f32], sx: &[f32], n: usize, r0: usize, r1: usize, out: OutRows) {
        let l = &*self.layout;
        let (b, pw, nw, ng) = (l.bits, l.per_word, l.words, l.group_slices.len());
        let mask = (1u32 << b) - 1;
        for r in r0..r1 {
            let words = &self.words[r * nw * 16..(r + 1) * nw * 16];
            for t in 0..n {
                let xt = &xp[t * l.padded..(t + 1) * l.padded];
                let (mut total, mut acc, mut k) = (0.0f32, 0.0f32, 0usize);
                for w in 0..nw {
                    let lanes = &words[w * 16..w * 16 + 16];
                    for p in 0..pw {
                        let xs = &xt[(w * pw + p) * 16..(w * pw + p) * 16 + 16];
                        for (&word, &xv) in lanes.iter().zip(xs) {
                            acc += ((word >> (p as u32 * b)) & mask) as f32 * xv;
                        }
                        if l.flush_masks[w] >> p & 1 == 1 {
                            let s = self.scales.get(r * ng + k);
                            let z = self.zeros[r * ng + k] as f32;
                            total += s * (acc - z * sx[t * ng + k]);
                            acc = 0.0;
                            k += 1;
                        }
                    }
                }
                // SAFETY: r is in this task's block, t < n.
                unsafe { out.write(t, r, total) };
            }
        }
    }
}
