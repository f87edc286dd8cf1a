//! 2:4 structured-sparse weights: in every run of 4 consecutive inputs of a row at most 2 weights are nonzero, so
//! only those 2 values and their 2-bit positions are stored, with values as f32, f16 or 4-bit codes with per-group
//! scale and zero point (3 bits per weight + scales, vs 4.19 for dense int4 g128).
//!
//! # Layout, and why
//! The kernel must fetch, for every kept value, the activation at its position. A general gather is slow, so rows
//! are stored **in pairs** and the kept values of a 16-column *window* are laid out so that the gather becomes one
//! in-lane permute (`vpermilps`, which picks one of 4 floats inside each 128-bit lane by the low 2 bits of an index):
//!
//! * Lane `j` (0..16) of a window holds group `L = j/4` (columns `4L..4L+4` of the window), row `j/2 % 2` of the
//!   pair, slot `j % 2`. So each 128-bit lane holds the 4 kept values of one column group — 2 per row — and the
//!   activations it needs are exactly the 4 floats of that group, i.e. the plain 16-float load of the window.
//! * The 2-bit positions need no masking (the permute ignores higher bits), so fetching 16 activations costs one
//!   shift and one permute. Values decode like `packed` (code into the mantissa of 1.0); the zero point is
//!   subtracted per lane in float, `(1+q/16) − (1+z/16) = (q−z)/16` exactly, because Σx differs per row here.
//! * A *block* is 16 windows (256 columns): one word of positions (16 lanes × 16 windows × 2 bits, window `W` at
//!   bit `pos_shift(W)`), then the
//!   values (two words of 4-bit codes, or 256 f16/f32), contiguous so a task streams one array.
//!
//! A ragged tail (cols not a multiple of 256, or of 4) is padded with zero values and zero activations; an odd row
//! count pads one zero row.

use crate::cpu::{self, Isa, OutRows, Scratch, ACT_SCRATCH};
use crate::packed::{QuantParts, Scales};
use crate::KernelError;
use half::f16;

/// How kept values are stored.
#[derive(Clone, Copy, Debug)]
pub enum Sparse24Values<'a> {
    /// Exact f32 values.
    F32,
    /// Values rounded to f16 (half the bytes; the product then uses the rounded values).
    F16,
    /// 2-, 3- or 4-bit codes with group scales and zero points (zero points ≤ 15). `parts.codes` must cover the
    /// whole matrix; only codes at kept positions are used. Groups must be whole 16-column windows
    /// (`group_size` a multiple of 16, or ≥ cols) and `g_idx`, if given, must be the plain `i / group_size`.
    Quant(QuantParts<'a>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueKind {
    F32,
    F16,
    Q4,
}

/// Bit offset of window `win`'s 2-bit position in a position lane: byte `(win % 8) / 2`, field `2·(win / 8) +
/// win % 2` of it. So the windows whose codes share a nibble parity and code word (the 4 windows one VNNI
/// `vpdpbusd` covers, see `x86::vnni`) have their positions in the 4 bytes of a lane at the same offset: one shift
/// and one mask give their byte indices. The f32 kernels just shift by this constant.
pub(crate) const fn pos_shift(win: usize) -> u32 {
    (8 * ((win % 8) / 2) + 2 * (2 * (win / 8) + win % 2)) as u32
}

/// Columns per window and per block (see module docs).
pub(crate) const WINDOW: usize = 16;
pub(crate) const BLOCK_COLS: usize = 256;

/// A 2:4 sparse matrix; see the module docs for the layout.
#[derive(Clone, Debug)]
pub struct Sparse24Weight {
    pub rows: usize,
    pub cols: usize,
    kind: ValueKind,
    pub(crate) blocks: usize,
    /// u32 per block record: 16 position lanes, then the values.
    pub(crate) rec: usize,
    /// `row pairs × blocks × rec`.
    pub(crate) data: Vec<u32>,
    /// Quantized values: groups per row, scales and zeros (`padded rows × groups`), and per block the windows that
    /// end a group (bit k = window k).
    pub(crate) groups: usize,
    pub(crate) scales: Option<Scales>,
    pub(crate) zeros: Vec<u8>,
    pub(crate) flush: Vec<u32>,
    /// Quantized values: group index of each 16-column window (for the scalar decode).
    win_group: Vec<u32>,
    /// Quantized values: columns per group (≥ cols for one group per row).
    group_size: usize,
}

/// The kept positions of one group of 4 and how many there are.
fn kept_of(row_mask: impl Fn(usize) -> bool, c0: usize, cols: usize) -> ([usize; 2], usize) {
    let mut pos = [0usize; 2];
    let mut k = 0;
    for p in 0..4 {
        if c0 + p < cols && row_mask(c0 + p) {
            if k < 2 {
                pos[k] = p;
            }
            k += 1;
        }
    }
    (pos, k)
}

impl Sparse24Weight {
    /// Builds from a dense `rows × cols` matrix whose nonzeros follow a 2:4 pattern (at most 2 nonzero in every
    /// group of 4 consecutive columns of a row; a trailing partial group counts too). With `Sparse24Values::Quant`,
    /// the nonzeros of `dense` give the pattern and the parts give the values.
    pub fn new(rows: usize, cols: usize, dense: &[f32], values: Sparse24Values<'_>) -> Result<Self, KernelError> {
        if dense.len() != rows * cols {
            return Err(KernelError::Shape {
                field: "dense",
                expected: format!("rows·cols = {}", rows * cols),
                found: dense.len().to_string(),
            });
        }
        let keep = |r: usize, c: usize| dense[r * cols + c] != 0.0;
        match values {
            Sparse24Values::Quant(parts) => Self::build(rows, cols, keep, None, Some(parts)),
            Sparse24Values::F32 => Self::build(rows, cols, keep, Some((dense, ValueKind::F32)), None),
            Sparse24Values::F16 => Self::build(rows, cols, keep, Some((dense, ValueKind::F16)), None),
        }
    }

    /// Builds from quantized parts and a keep-mask (core's `QuantizedLinear { mask: Some(..) }`): weights where the
    /// mask is false are zero whatever their code.
    pub fn from_quantized(parts: QuantParts<'_>, mask: &[bool]) -> Result<Self, KernelError> {
        if mask.len() != parts.rows * parts.cols {
            return Err(KernelError::Shape {
                field: "mask",
                expected: format!("rows·cols = {}", parts.rows * parts.cols),
                found: mask.len().to_string(),
            });
        }
        let cols = parts.cols;
        Self::build(parts.rows, cols, |r, c| mask[r * cols + c], None, Some(parts))
    }

    fn build(
        rows: usize,
        cols: usize,
        keep: impl Fn(usize, usize) -> bool,
        dense: Option<(&[f32], ValueKind)>,
        quant: Option<QuantParts<'_>>,
    ) -> Result<Self, KernelError> {
        // Validate the pattern first: it is the error a user most likely hits.
        for r in 0..rows {
            for c0 in (0..cols).step_by(4) {
                let (_, k) = kept_of(|c| keep(r, c), c0, cols);
                if k > 2 {
                    return Err(KernelError::Not24 { row: r, col: c0, kept: k });
                }
            }
        }
        let kind = match (dense, &quant) {
            (Some((_, kind)), _) => kind,
            (None, Some(_)) => ValueKind::Q4,
            (None, None) => unreachable!("build is called with values or quant parts"),
        };
        let mut groups = 0;
        let mut group_size = cols.max(1);
        if let Some(q) = &quant {
            q.validate()?;
            if q.rows != rows || q.cols != cols {
                return Err(KernelError::Shape {
                    field: "quant parts shape",
                    expected: format!("{rows}×{cols}"),
                    found: format!("{}×{}", q.rows, q.cols),
                });
            }
            if q.bits > 4 {
                return Err(KernelError::Unsupported(format!(
                    "2:4 sparse with {}-bit values (kept values are stored as 4-bit codes)",
                    q.bits
                )));
            }
            if let Some((i, z)) = q.zeros.iter().enumerate().find(|(_, &z)| z > 15) {
                return Err(KernelError::Shape {
                    field: "zeros",
                    expected: "≤ 15 for 4-bit sparse values".into(),
                    found: format!("zeros[{i}] = {z}"),
                });
            }
            if q.group_size < cols && q.group_size % WINDOW != 0 {
                return Err(KernelError::Unsupported(format!(
                    "2:4 sparse with group_size {} (needs a multiple of {WINDOW}, or one group per row)",
                    q.group_size
                )));
            }
            if let Some(gi) = q.g_idx {
                if gi.iter().enumerate().any(|(i, &g)| g as usize != i / q.group_size) {
                    return Err(KernelError::Unsupported(
                        "2:4 sparse with act-order g_idx (permuting columns would break the 2:4 groups)".into(),
                    ));
                }
            }
            groups = q.n_groups();
            group_size = q.group_size.min(cols.max(1));
        }

        let blocks = cols.div_ceil(BLOCK_COLS);
        let rec = 16
            + match kind {
                ValueKind::Q4 => 32,
                ValueKind::F16 => 128,
                ValueKind::F32 => 256,
            };
        let pairs = rows.div_ceil(2);
        let mut data = vec![0u32; pairs * blocks * rec];
        for r in 0..rows {
            let (pair, rr) = (r / 2, r % 2);
            for c0 in (0..cols).step_by(4) {
                let (pos, k) = kept_of(|c| keep(r, c), c0, cols);
                let (b, win, l) = (c0 / BLOCK_COLS, (c0 % BLOCK_COLS) / WINDOW, (c0 % WINDOW) / 4);
                let base = (pair * blocks + b) * rec;
                #[allow(clippy::needless_range_loop)] // slot also picks the lane
                for slot in 0..2 {
                    let lane = 4 * l + 2 * rr + slot;
                    let kept = slot < k;
                    let col = c0 + pos[slot];
                    data[base + lane] |= (if kept { pos[slot] as u32 } else { 0 }) << pos_shift(win);
                    match kind {
                        ValueKind::Q4 => {
                            let q = quant.as_ref().expect("Q4 has parts");
                            let g = col / group_size;
                            // An empty slot gets code = zero point, which decodes to exactly 0.
                            let code =
                                if kept { q.codes[r * cols + col] } else { q.zeros[r * groups + g] } as u32;
                            let word = base + 16 + (win / 8) * 16 + lane;
                            data[word] |= code << (4 * (win % 8));
                        }
                        ValueKind::F16 => {
                            let v = if kept { dense.expect("values").0[r * cols + col] } else { 0.0 };
                            let h = f16::from_f32(v).to_bits() as u32;
                            let idx = win * 16 + lane; // f16 index within the block's values
                            data[base + 16 + idx / 2] |= h << (16 * (idx % 2));
                        }
                        ValueKind::F32 => {
                            let v = if kept { dense.expect("values").0[r * cols + col] } else { 0.0 };
                            data[base + 16 + win * 16 + lane] = v.to_bits();
                        }
                    }
                }
            }
        }

        let (mut scales_v, mut zeros, mut flush, mut win_group) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if let Some(q) = &quant {
            // A padded odd row gets scale 0 and zero point 0, so it stays exactly 0.
            scales_v = q.scales.to_vec();
            zeros = q.zeros.to_vec();
            scales_v.resize(pairs * 2 * groups, 0.0);
            zeros.resize(pairs * 2 * groups, 0);
            flush = vec![0u32; blocks];
            let windows = cols.div_ceil(WINDOW);
            for g in 0..groups {
                // Last window of group g (groups are whole windows, the last one possibly ragged).
                let end_col = ((g + 1) * group_size).min(cols);
                let last = end_col.div_ceil(WINDOW).min(windows) - 1;
                flush[last / 16] |= 1 << (last % 16);
            }
            win_group = (0..windows).map(|w| ((w * WINDOW) / group_size) as u32).collect();
        }
        Ok(Sparse24Weight {
            rows,
            cols,
            kind,
            blocks,
            rec,
            data,
            groups,
            scales: quant.map(|_| Scales::new(scales_v)),
            zeros,
            flush,
            win_group,
            group_size,
        })
    }

    /// Whether values are stored as 4-bit codes.
    pub fn is_quantized(&self) -> bool {
        self.kind == ValueKind::Q4
    }

    /// Bytes held in memory.
    pub fn resident_bytes(&self) -> usize {
        self.streamed_bytes() + self.flush.len() * 4 + self.win_group.len() * 4
    }

    /// Bytes a GEMV streams per call.
    pub fn streamed_bytes(&self) -> usize {
        self.data.len() * 4 + self.scales.as_ref().map_or(0, |s| s.bytes()) + self.zeros.len()
    }

    /// The dense matrix this weight represents (values as stored, e.g. rounded to f16).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            let (pair, rr) = (r / 2, r % 2);
            for c0 in (0..self.cols).step_by(4) {
                let (b, win, l) = (c0 / BLOCK_COLS, (c0 % BLOCK_COLS) / WINDOW, (c0 % WINDOW) / 4);
                let base = (pair * self.blocks + b) * self.rec;
                for slot in 0..2 {
                    let lane = 4 * l + 2 * rr + slot;
                    let pos = (self.data[base + lane] >> pos_shift(win)) as usize & 3;
                    let v = self.value(r, base, win, lane, c0);
                    if v != 0.0 {
                        out[r * self.cols + c0 + pos] += v;
                    }
                }
            }
        }
        out
    }

    /// Decoded value of one lane of one window (scalar reference decode).
    fn value(&self, r: usize, base: usize, win: usize, lane: usize, col: usize) -> f32 {
        match self.kind {
            ValueKind::F32 => f32::from_bits(self.data[base + 16 + win * 16 + lane]),
            ValueKind::F16 => {
                let idx = win * 16 + lane;
                f16::from_bits((self.data[base + 16 + idx / 2] >> (16 * (idx % 2))) as u16).to_f32()
            }
            ValueKind::Q4 => {
                let q = (self.data[base + 16 + (win / 8) * 16 + lane] >> (4 * (win % 8))) & 15;
                let g = self.group_of_col(col);
                let s = self.scales.as_ref().expect("Q4 has scales").get(r * self.groups + g);
                s * (q as f32 - self.zeros[r * self.groups + g] as f32)
            }
        }
    }

    /// Group of 16-column window `win` (quantized values).
    #[inline]
    pub(crate) fn win_group_of(&self, win: usize) -> usize {
        self.win_group.get(win).map_or(self.groups.saturating_sub(1), |&g| g as usize)
    }

    /// Whether `matmul_q8` runs the int8 kernel for this weight on this CPU (else it is `matmul`): 4-bit values
    /// whose groups are whole 128-column halves of a block (group size a multiple of 128, or one group per row),
    /// and AVX-512 VNNI + BW.
    pub fn q8_supported(&self) -> bool {
        self.kind == ValueKind::Q4 && (self.groups <= 1 || self.group_size.is_multiple_of(128)) && crate::x86::q8_sparse_supported()
    }

    /// y = x Wᵀ with int8 activations (one scale `max|x|/127` per 128 columns) and VNNI, like
    /// `PackedWeight::matmul_q8` (same error bound); `matmul` where `q8_supported()` is false.
    pub fn matmul_q8(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_int_act(x, n, y, false)
    }

    /// [`Self::matmul_q8`] with int16 activations (one scale `max|x|/32767` per 128 columns, `vpdpwssd` after a
    /// `vpermw` gather), the same error bound as `PackedWeight::matmul_q16`; `matmul_isa` where `q8_supported()`
    /// is false.
    pub fn matmul_q16(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_int_act(x, n, y, true)
    }

    fn matmul_int_act(&self, x: &[f32], n: usize, y: &mut [f32], wide: bool) {
        assert_eq!(x.len(), n * self.cols, "x must be n × cols");
        assert_eq!(y.len(), n * self.rows, "y must be n × rows");
        if !self.q8_supported() {
            return self.matmul_isa(Isa::best(), x, n, y);
        }
        let per_block = if wide { 128 } else { 64 };
        let mut scratch = Scratch::take(&ACT_SCRATCH, self.blocks * (per_block + 2));
        let (xq, sxh) = scratch.split_at_mut(self.blocks * per_block);
        let xq: &mut [u32] = bytemuck::cast_slice_mut(xq);
        let pair_bytes = self.blocks * self.rec * 4;
        let mut yt = vec![0.0f32; if n > 1 { self.rows } else { 0 }];
        for t in 0..n {
            let xt = &x[t * self.cols..(t + 1) * self.cols];
            if wide {
                crate::x86::quantize_sparse_q16(xt, self.cols, self.blocks, xq, sxh);
            } else {
                crate::x86::quantize_sparse_q8(xt, self.cols, self.blocks, xq, sxh);
            }
            let (xq, sxh) = (&*xq, &*sxh);
            let dst: &mut [f32] = if n == 1 { &mut *y } else { &mut yt };
            cpu::for_row_blocks(self.rows, 2, pair_bytes / 2, 1, dst, |r0, r1, out| {
                let (p0, p1) = (r0 / 2, r1.div_ceil(2));
                if wide {
                    crate::x86::sparse_pairs_q16(self, xq, sxh, p0, p1, out)
                } else {
                    crate::x86::sparse_pairs_q8(self, xq, sxh, p0, p1, out)
                }
            });
            if n > 1 {
                y[t * self.rows..(t + 1) * self.rows].copy_from_slice(&yt);
            }
        }
    }

    fn group_of_col(&self, col: usize) -> usize {
        self.win_group[col / WINDOW] as usize
    }

    /// y = x Wᵀ with the best kernel for this CPU: on a single token (decode) with 4-bit values on a VNNI CPU the
    /// int16-activation kernel ([`Self::matmul_q16`]), or `matmul_q8` when `WHITTLE_KERNELS_Q8=1`; exact f32
    /// activations otherwise (see `PackedWeight::matmul`).
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        if n == 1 && self.q8_supported() {
            return self.matmul_int_act(x, n, y, !cpu::q8_decode_requested());
        }
        self.matmul_isa(Isa::best(), x, n, y)
    }

    /// y = x Wᵀ with a chosen instruction set (scalar if unsupported).
    pub fn matmul_isa(&self, isa: Isa, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "x must be n × cols");
        assert_eq!(y.len(), n * self.rows, "y must be n × rows");
        let isa = if isa.is_supported() { isa } else { Isa::Scalar };
        let padded = self.blocks * BLOCK_COLS;
        // Zeroed: the padding past `cols` must multiply as 0.
        let mut xp = Scratch::take_zeroed(&ACT_SCRATCH, n * padded);
        for t in 0..n {
            xp[t * padded..t * padded + self.cols].copy_from_slice(&x[t * self.cols..(t + 1) * self.cols]);
        }
        let xp = &xp[..n * padded];
        let pair_bytes = self.blocks * self.rec * 4;
        // Tasks own whole row pairs (row_align 2), so no two tasks write the same pair's rows.
        cpu::for_row_blocks(self.rows, 2, pair_bytes / 2, n, y, |r0, r1, out| {
            let (p0, p1) = (r0 / 2, r1.div_ceil(2));
            match isa {
                Isa::Scalar => self.pairs_scalar(xp, n, p0, p1, out),
                _ => crate::x86::sparse_pairs(isa, self, xp, n, p0, p1, out),
            }
        });
    }

    /// Reference kernel over row pairs `p0..p1`: the same layout decoded lane by lane.
    fn pairs_scalar(&self, xp: &[f32], n: usize, p0: usize, p1: usize, out: OutRows) {
        let padded = self.blocks * BLOCK_COLS;
        for pair in p0..p1 {
            for rr in 0..2 {
                let r = 2 * pair + rr;
                if r >= self.rows {
                    continue;
                }
                for t in 0..n {
                    let xt = &xp[t * padded..(t + 1) * padded];
                    let mut total = 0.0f32;
                    for b in 0..self.blocks {
                        let base = (pair * self.blocks + b) * self.rec;
                        for win in 0..16 {
                            let c0 = b * BLOCK_COLS + win * WINDOW;
                            if c0 >= self.cols {
                                break;
                            }
                            for l in 0..4 {
                                for slot in 0..2 {
                                    let lane = 4 * l + 2 * rr + slot;
                                    let pos = (self.data[base + lane] >> pos_shift(win)) as usize & 3;
                                    total += self.value(r, base, win, lane, c0) * xt[c0 + 4 * l + pos];
                                }
                            }
                        }
                    }
                    // SAFETY: r < rows belongs to this task's pairs; t < n.
                    unsafe { out.write(t, r, total) };
                }
            }
        }
    }

    pub(crate) fn is_f16(&self) -> bool {
        self.kind == ValueKind::F16
    }
}
