//! The Llama-family decoder (Llama, Mistral, Qwen2): embedding, `num_layers` pre-norm blocks of grouped-query
//! attention with RoPE and a SwiGLU MLP, final RMSNorm and the LM head. Every linear is a `kernels::Weight`, so the
//! same forward runs dense f32/f16/bf16 weights, dequantized plans, or packed low-bit weights.
//! `forward` handles any number of new tokens after what the cache holds (prefill and decode are one code path).

use super::config::ModelConfig;
use super::kv_cache::{ensure, KvCache, LayerCache, Scratch};
use super::rope::Rope;
use rayon::prelude::*;
use std::sync::Arc;
use whittle_kernels::cuda::CudaLinear;
use whittle_kernels::{DenseWeight, Weight};

/// The seven linears of a block, in the order calibration visits them.
pub const LINEAR_KINDS: [&str; 7] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

/// Which input a linear reads; linears reading the same input share a Hessian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// Attention-norm output: q, k, v.
    AttnIn,
    /// Attention output: o_proj.
    OIn,
    /// MLP-norm output: gate, up.
    MlpIn,
    /// SwiGLU product: down_proj.
    DownIn,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnIn, Site::OIn, Site::MlpIn, Site::DownIn];
    pub fn of_kind(kind: &str) -> Site {
        match kind {
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => Site::AttnIn,
            "self_attn.o_proj" => Site::OIn,
            "mlp.gate_proj" | "mlp.up_proj" => Site::MlpIn,
            _ => Site::DownIn,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
    /// The same weight in GPU memory when the runtime offloaded it (`runtime::offload_cuda`); the forward pass then
    /// runs it there. Whoever replaces `weight` afterwards must clear this.
    pub cuda: Option<Arc<CudaLinear>>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Vec<f32>>) -> Linear {
        Linear { weight, bias, cuda: None }
    }

    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        match &self.cuda {
            // A failed launch (device lost, out of memory) falls back to the host weight, which is still there, says
            // so once, and keeps that linear on the CPU from then on.
            Some(c) => {
                if let Err(why) = c.matmul(x, n, y) {
                    if c.note_failure() {
                        eprintln!("CUDA GEMV failed, running this linear on the CPU: {why}");
                    }
                    self.weight.matmul(x, n, y);
                }
            }
            None => self.weight.matmul(x, n, y),
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(b.len()) {
                for (o, bi) in row.iter_mut().zip(b) {
                    *o += bi;
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// q, k, v, o, gate, up, down (LINEAR_KINDS order).
    pub linears: [Linear; 7],
}

#[derive(Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub embed: DenseWeight,
    pub blocks: Vec<Block>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
    pub rope: Rope,
}

/// Receives each linear's input during a forward pass (calibration); returning `true` stops the block there,
/// because calibration of one stage needs nothing computed after that stage's input.
pub type Observer<'a> = &'a mut dyn FnMut(usize, Site, &[f32], usize) -> bool;

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks(d).zip(out.chunks_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), wi) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * wi;
        }
    }
}

/// x·σ(x) with [`exp_approx`] (vectorizes; libm's expf is a call per element).
fn silu(x: f32) -> f32 {
    x / (1.0 + exp_approx(-x))
}

/// gate ← silu(gate) · up, element-wise, compiled for the widest vector unit present (the portable build targets
/// SSE2, where the loop ran 4 wide and was 7% of a calibration run). Bit-identical on every path: the same
/// operations per element, none fused.
fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[inline(always)]
    fn body(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2")]
        unsafe fn avx512(gate: &mut [f32], up: &[f32]) {
            body(gate, up)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(gate: &mut [f32], up: &[f32]) {
            body(gate, up)
        }
        match whittle_kernels::Isa::best() {
            // SAFETY: `Isa::best` only returns levels this CPU supports.
            whittle_kernels::Isa::Avx512 => return unsafe { avx512(gate, up) },
            // SAFETY: as above.
            whittle_kernels::Isa::Avx2 => return unsafe { avx2(gate, up) },
            _ => {}
        }
    }
    body(gate, up)
}

/// e^x, branch-free so loops over it vectorize even with plain SSE2: x clamped to [−87, 88] (the normal f32
/// range; e^−87 ≈ 1.6e-38 stands for anything smaller, which a softmax or sigmoid cannot tell from 0), n =
/// round(x·log2 e) by the 1.5·2²³ magic-number trick, r = x − n·ln2 with a two-part (Cody–Waite) ln2 so r stays
/// exact, e^r by its degree-6 Taylor series on |r| ≤ ½ln2 (truncation ≤ 1.3e-7 relative), and 2^n by building the
/// exponent bits. libm's expf is a call per element and was a third of the attention time.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few mantissa bits, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let r = x * std::f32::consts::LOG2_E + MAGIC;
    let n = r - MAGIC;
    let f = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    // The low mantissa bits of r hold n (two's complement); shift it into the exponent field.
    let bits = (r.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32).wrapping_add(127) << 23;
    p * f32::from_bits(bits as u32)
}

impl Model {
    pub fn module_name(layer: usize, kind: &str) -> String {
        format!("model.layers.{layer}.{kind}")
    }

    /// All compressible linears as (module name, rows, cols), in model order.
    pub fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        let mut out = Vec::new();
        for (l, b) in self.blocks.iter().enumerate() {
            for (kind, lin) in LINEAR_KINDS.iter().zip(&b.linears) {
                out.push((Self::module_name(l, kind), lin.weight.rows(), lin.weight.cols()));
            }
        }
        out
    }

    pub fn linear(&self, layer: usize, kind_index: usize) -> &Linear {
        &self.blocks[layer].linears[kind_index]
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers, self.config.kv_dim())
    }

    /// Embeds `tokens` into `x` (`[n, hidden]`).
    pub fn embed_tokens(&self, tokens: &[u32], x: &mut Vec<f32>) {
        let d = self.config.hidden_size;
        x.resize(tokens.len() * d, 0.0);
        for (t, &id) in tokens.iter().enumerate() {
            self.embed.row_f32(id as usize, &mut x[t * d..(t + 1) * d]);
        }
    }

    /// Runs the new `tokens` after the cached prefix and returns logits for the last `logit_rows` of them
    /// (`[logit_rows, vocab]`). Token ids must be < vocab_size (checked by callers that take user input).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, scratch: &mut Scratch, logit_rows: usize) -> Vec<f32> {
        let n = tokens.len();
        let mut x = Vec::new();
        self.embed_tokens(tokens, &mut x);
        let pos0 = cache.len;
        self.rope.tables(pos0, n, &mut scratch.cos, &mut scratch.sin);
        for (l, block) in self.blocks.iter().enumerate() {
            self.block_forward(l, block, &mut x, n, pos0, &mut cache.layers[l], scratch, None);
        }
        cache.len += n;
        self.logits(&x, n, logit_rows.min(n))
    }

    /// Final norm and LM head on the last `rows` of `x` (`[n, hidden]`).
    pub fn logits(&self, x: &[f32], n: usize, rows: usize) -> Vec<f32> {
        let d = self.config.hidden_size;
        let last = &x[(n - rows) * d..n * d];
        let mut h = vec![0.0; rows * d];
        rms_norm(last, &self.norm, self.config.rms_norm_eps as f32, &mut h);
        let mut out = vec![0.0; rows * self.config.vocab_size];
        self.lm_head.forward(&h, rows, &mut out);
        out
    }

    /// One decoder block on `x` (`[n, hidden]`, updated in place) at positions pos0..pos0+n. `scratch.cos/sin`
    /// must hold the RoPE tables of these positions. `observe` sees every linear's input (calibration).
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward(
        &self,
        layer: usize,
        block: &Block,
        x: &mut [f32],
        n: usize,
        pos0: usize,
        cache: &mut LayerCache,
        s: &mut Scratch,
        mut observe: Option<Observer>,
    ) {
        let cfg = &self.config;
        let (d, qd, kvd, hd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let [q_proj, k_proj, v_proj, ..] = &block.linears;

        let h = ensure(&mut s.h, n * d);
        rms_norm(x, &block.attn_norm, eps, h);
        if let Some(obs) = observe.as_mut() {
            if obs(layer, Site::AttnIn, h, n) {
                return;
            }
        }
        let q = ensure(&mut s.q, n * qd);
        q_proj.forward(h, n, q);
        let k = ensure(&mut s.k, n * kvd);
        k_proj.forward(h, n, k);
        let v = ensure(&mut s.v, n * kvd);
        v_proj.forward(h, n, v);
        let half = hd / 2;
        for t in 0..n {
            let (c, sn) = (&s.cos[t * half..(t + 1) * half], &s.sin[t * half..(t + 1) * half]);
            Rope::apply(&mut q[t * qd..(t + 1) * qd], cfg.num_heads, hd, c, sn);
            Rope::apply(&mut k[t * kvd..(t + 1) * kvd], cfg.num_kv_heads, hd, c, sn);
        }
        cache.k.extend_from_slice(k);
        cache.v.extend_from_slice(v);

        let attn = ensure(&mut s.attn, n * qd);
        attention(cfg, q, &cache.k, &cache.v, pos0, n, attn, &mut s.scores);
        let attn = std::mem::take(&mut s.attn);
        self.block_forward_from_attention(layer, block, x, n, &attn[..n * qd], s, observe);
        s.attn = attn;
    }

    /// The rest of [`Self::block_forward`] given the attention output `attn` (`[n, q_dim]`, the input of o_proj):
    /// calibration computes attention once per layer and restarts from it for the later stages, since only q/k/v
    /// (fixed by then) determine it.
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward_from_attention(
        &self,
        layer: usize,
        block: &Block,
        x: &mut [f32],
        n: usize,
        attn: &[f32],
        s: &mut Scratch,
        mut observe: Option<Observer>,
    ) {
        let d = self.config.hidden_size;
        if let Some(obs) = observe.as_mut() {
            if obs(layer, Site::OIn, attn, n) {
                return;
            }
        }
        let proj = ensure(&mut s.proj, n * d);
        block.linears[3].forward(attn, n, proj);
        for (xi, p) in x.iter_mut().zip(proj.iter()) {
            *xi += p;
        }
        self.mlp_forward(layer, block, x, n, s, observe);
    }

    /// The rest of a block from `from` (see [`Resume`]). `x` holds the block's input for `Resume::Attention`, and
    /// the kept residual ([`Resume::residual`]) for the others: callers copy it where they need a copy anyway.
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward_resumed(
        &self,
        layer: usize,
        block: &Block,
        x: &mut [f32],
        n: usize,
        from: &Resume,
        s: &mut Scratch,
        observe: Option<Observer>,
    ) {
        match from {
            Resume::Attention(attn) => self.block_forward_from_attention(layer, block, x, n, attn, s, observe),
            Resume::Residual(_) => self.mlp_forward(layer, block, x, n, s, observe),
            Resume::Mlp { act, .. } => self.down_forward(layer, block, x, n, act, s, observe),
        }
    }

    /// The MLP half of a block on the residual stream `x` (after attention), updated in place.
    fn mlp_forward(&self, layer: usize, block: &Block, x: &mut [f32], n: usize, s: &mut Scratch, mut observe: Option<Observer>) {
        let cfg = &self.config;
        let (d, im) = (cfg.hidden_size, cfg.intermediate_size);
        let [_, _, _, _, gate_proj, up_proj, _] = &block.linears;
        let h = ensure(&mut s.h, n * d);
        rms_norm(x, &block.mlp_norm, cfg.rms_norm_eps as f32, h);
        if let Some(obs) = observe.as_mut() {
            if obs(layer, Site::MlpIn, h, n) {
                return;
            }
        }
        let gate = ensure(&mut s.gate, n * im);
        gate_proj.forward(h, n, gate);
        let up = ensure(&mut s.up, n * im);
        up_proj.forward(h, n, up);
        silu_mul(gate, up);
        let act = std::mem::take(&mut s.gate);
        self.down_forward(layer, block, x, n, &act[..n * im], s, observe);
        s.gate = act;
    }

    /// x += down_proj(act).
    #[allow(clippy::too_many_arguments)]
    fn down_forward(&self, layer: usize, block: &Block, x: &mut [f32], n: usize, act: &[f32], s: &mut Scratch, mut observe: Option<Observer>) {
        if let Some(obs) = observe.as_mut() {
            if obs(layer, Site::DownIn, act, n) {
                return;
            }
        }
        let proj = ensure(&mut s.proj, n * self.config.hidden_size);
        block.linears[6].forward(act, n, proj);
        for (xi, p) in x.iter_mut().zip(proj.iter()) {
            *xi += p;
        }
    }
}

/// Where a calibration pass through a block can restart instead of recomputing from the block's input: a point
/// before which every linear of the block is final. Calibration compresses a block stage by stage, so each stage
/// fixes one more point (see `calib::ResumeCache`).
#[derive(Clone, Debug)]
pub enum Resume {
    /// The attention output (o_proj's input): q/k/v are final.
    Attention(Vec<f32>),
    /// The residual stream after attention, x + o_proj(attention): o_proj is final too.
    Residual(Vec<f32>),
    /// That residual and down_proj's input: gate/up are final too.
    Mlp { residual: Vec<f32>, act: Vec<f32> },
}

impl Resume {
    /// The residual stream a resumed pass starts from (`None` from attention: it starts from the block's input).
    pub fn residual(&self) -> Option<&[f32]> {
        match self {
            Resume::Attention(_) => None,
            Resume::Residual(r) | Resume::Mlp { residual: r, .. } => Some(r),
        }
    }
}

/// Causal grouped-query attention of `n` new queries at positions pos0.. against the whole cache.
#[allow(clippy::too_many_arguments)]
fn attention(cfg: &ModelConfig, q: &[f32], kc: &[f32], vc: &[f32], pos0: usize, n: usize, out: &mut [f32], scores: &mut Vec<f32>) {
    if n > 1 {
        return attention_prefill(cfg, q, kc, vc, pos0, n, out);
    }
    let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let group = cfg.num_heads / cfg.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let total = pos0 + n;
    let one_token = |t: usize, o: &mut [f32], sc: &mut Vec<f32>| {
        let len = pos0 + t + 1;
        sc.resize(len, 0.0);
        for h in 0..cfg.num_heads {
            let kvh = h / group;
            let qh = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in sc.iter_mut().enumerate() {
                let kj = &kc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                *s = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(*s);
            }
            for s in sc.iter_mut() {
                *s = exp_approx(*s - max);
            }
            let sum: f32 = sc.iter().sum();
            let inv = 1.0 / sum;
            let oh = &mut o[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            for (j, s) in sc.iter().enumerate() {
                let w = s * inv;
                let vj = &vc[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd];
                for (a, b) in oh.iter_mut().zip(vj) {
                    *a += w * b;
                }
            }
        }
    };
    // Parallel over query tokens only when there is enough work to pay for rayon (prefill of real models).
    if n > 1 && n * total * qd > 1 << 20 {
        out.par_chunks_mut(qd).enumerate().for_each_init(Vec::new, |sc, (t, o)| one_token(t, o, sc));
    } else {
        for (t, o) in out.chunks_mut(qd).enumerate() {
            one_token(t, o, scores);
        }
    }
}

/// Attention for a batch of query tokens (prefill, calibration, evaluation). The keys and values of each KV head are
/// transposed once to [head_dim][position], so the score and output loops run over contiguous positions and
/// vectorize across keys; looping over head_dim instead (often 8–128 values) left them scalar and made attention
/// three quarters of a calibration run. Decode (one token) keeps the direct loop: it would pay the transpose for a
/// single query.
fn attention_prefill(cfg: &ModelConfig, q: &[f32], kc: &[f32], vc: &[f32], pos0: usize, n: usize, out: &mut [f32]) {
    let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
    let group = cfg.num_heads / cfg.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let total = pos0 + n;
    // Rows padded with zeros to whole 16-lane blocks, so every block of positions is a full vector.
    let stride = total.div_ceil(16) * 16;
    let transpose = |cache: &[f32]| {
        let mut t = vec![0.0f32; kvd * stride];
        for (j, row) in cache[..total * kvd].chunks_exact(kvd).enumerate() {
            for (c, v) in row.iter().enumerate() {
                t[c * stride + j] = *v;
            }
        }
        t
    };
    let (kt, vt) = (transpose(kc), transpose(vc));
    let heads = PrefillHeads { num_heads: cfg.num_heads, group, hd, stride, scale, kt: &kt, vt: &vt };
    // The kernels' instruction-set choice (run-time detection, `WHITTLE_KERNELS_ISA` to lower it).
    let isa = whittle_kernels::Isa::best();
    let one_token = |t: usize, o: &mut [f32], sc: &mut Vec<f32>| {
        let qt = &q[t * qd..(t + 1) * qd];
        let len = pos0 + t + 1;
        match isa {
            // SAFETY: `Isa::best` only returns levels this CPU supports (AVX-512F implies AVX2 and FMA there).
            #[cfg(target_arch = "x86_64")]
            whittle_kernels::Isa::Avx512 => unsafe { heads.token_avx512(qt, len, o, sc) },
            // SAFETY: as above, AVX2 and FMA were detected.
            #[cfg(target_arch = "x86_64")]
            whittle_kernels::Isa::Avx2 => unsafe { heads.token_avx2(qt, len, o, sc) },
            _ => heads.token::<false, 8, 32>(qt, len, o, sc),
        }
    };
    if let Some(tiles) = QueryTiles::for_head_dim(hd, isa) {
        tiles.run(&heads, q, qd, pos0, n, out);
        return;
    }
    if prefill_in_parallel(n, total, qd) {
        out.par_chunks_mut(qd).enumerate().with_min_len(16).for_each_init(Vec::new, |sc, (t, o)| one_token(t, o, sc));
    } else {
        let mut sc = Vec::new();
        for (t, o) in out.chunks_mut(qd).enumerate() {
            one_token(t, o, &mut sc);
        }
    }
}

/// The transposed keys and values of one prefill, and the per-token attention over them.
struct PrefillHeads<'a> {
    num_heads: usize,
    group: usize,
    hd: usize,
    /// Row length of `kt` and `vt`: the positions rounded up to 16.
    stride: usize,
    scale: f32,
    kt: &'a [f32],
    vt: &'a [f32],
}

impl PrefillHeads<'_> {
    /// Attention of one query token `qt` (all heads) over the first `len` positions, into `o`.
    ///
    /// Register-blocked: scores are built `L4` positions at a time in four `L`-lane accumulators over head_dim
    /// (each key loaded once, no pass over the score buffer per dimension), and the output sums 8 head dimensions
    /// at a time against one load of each block of probabilities. Positions run to `len` rounded up to `L` (the
    /// rows are zero-padded to 16): the probabilities past `len` are set to 0, so the padding and the causally
    /// masked keys there add nothing, and no loop has a scalar tail. The plain form (a pass over the scores per
    /// dimension, a dot product per output, scalar tails) was load-bound at about a tenth of the FMA rate.
    /// `FMA`: fuse the multiply-adds (only where the CPU has FMA; elsewhere `mul_add` would be a libm call).
    #[inline(always)]
    fn token<const FMA: bool, const L: usize, const L4: usize>(&self, qt: &[f32], len: usize, o: &mut [f32], sc: &mut Vec<f32>) {
        let (hd, stride) = (self.hd, self.stride);
        let padded = len.div_ceil(L) * L;
        debug_assert!(padded <= stride);
        sc.clear();
        sc.resize(padded, 0.0);
        for h in 0..self.num_heads {
            let kvh = h / self.group;
            let q = &qt[h * hd..(h + 1) * hd];
            let keys = &self.kt[kvh * hd * stride..(kvh + 1) * hd * stride];
            let mut p = 0;
            while p + L4 <= padded {
                self.scores::<L4, FMA>(q, keys, p, sc);
                p += L4;
            }
            while p < padded {
                self.scores::<L, FMA>(q, keys, p, sc);
                p += L;
            }
            // Softmax over whole L-blocks (no scalar tails, which cost as much as the blocks on short rows): the
            // padded positions are -inf for the maximum and 0 after the exponential. Their share of the sum is
            // e^-87 each (exp_approx's clamp), under 16·e^-87 ≈ 3e-37 in all against a sum ≥ 1 (the maximum's own
            // term): below half an ulp, so it changes nothing.
            sc[len..].fill(f32::NEG_INFINITY);
            let max = block_max::<L>(sc);
            let mut sums = [0.0f32; L];
            for block in sc.chunks_exact_mut(L) {
                for (s, sum) in block.iter_mut().zip(&mut sums) {
                    *s = exp_approx(*s - max);
                    *sum += *s;
                }
            }
            sc[len..].fill(0.0);
            let inv = 1.0 / lane_sum(sums);
            let values = &self.vt[kvh * hd * stride..(kvh + 1) * hd * stride];
            let out = &mut o[h * hd..(h + 1) * hd];
            let mut d = 0;
            while d + 8 <= hd {
                let sums = weighted_sums::<8, L, FMA>(sc, &values[d * stride..], stride);
                for (o, s) in out[d..d + 8].iter_mut().zip(sums) {
                    *o = s * inv;
                }
                d += 8;
            }
            while d < hd {
                out[d] = weighted_sums::<1, L, FMA>(sc, &values[d * stride..], stride)[0] * inv;
                d += 1;
            }
        }
    }

    /// Scaled scores of positions `p..p + B` for one head: Σ_d q_d · K[d][p..p + B], `keys` = K as
    /// [head_dim][stride].
    #[inline(always)]
    fn scores<const B: usize, const FMA: bool>(&self, q: &[f32], keys: &[f32], p: usize, sc: &mut [f32]) {
        let mut acc = [0.0f32; B];
        for (d, &qd) in q.iter().enumerate() {
            let row = &keys[d * self.stride + p..][..B];
            for (a, &k) in acc.iter_mut().zip(row) {
                *a = madd::<FMA>(qd, k, *a);
            }
        }
        for (s, a) in sc[p..p + B].iter_mut().zip(acc) {
            *s = a * self.scale;
        }
    }

    /// [`Self::token`] compiled for AVX2+FMA, so its loops over positions vectorize 8 wide (the portable build
    /// targets baseline x86-64).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn token_avx2(&self, qt: &[f32], len: usize, o: &mut [f32], sc: &mut Vec<f32>) {
        self.token::<true, 8, 32>(qt, len, o, sc)
    }

    /// [`Self::token`] for AVX-512: 16-lane blocks, so every loop (scores, softmax, outputs) runs twice as wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn token_avx512(&self, qt: &[f32], len: usize, o: &mut [f32], sc: &mut Vec<f32>) {
        self.token::<true, 16, 64>(qt, len, o, sc)
    }
}

/// Whether a prefill's attention (`n` queries over `total` positions, `qd` wide) splits its queries over the pool:
/// only when long enough to pay for rayon, and not when this already runs inside the pool (calibration runs windows
/// in parallel around it; splitting each window again only added scheduling).
fn prefill_in_parallel(n: usize, total: usize, qd: usize) -> bool {
    n * total * qd > 1 << 20 && rayon::current_thread_index().is_none()
}

/// Attention of small heads (head_dim 8 or 16) a tile of queries at a time: each vector lane is one query, so a
/// key costs head_dim multiply-adds for all the tile's scores (the key broadcast), one exponential vector and
/// head_dim multiply-adds into the outputs, with no reduction across lanes. The per-token form pays a vector
/// reduction per output dimension and a softmax per head and token, which on 8-wide heads cost more than the
/// products (attention was over a quarter of a calibration run of the default model).
#[derive(Clone, Copy)]
enum QueryTiles {
    #[cfg(target_arch = "x86_64")]
    Avx512 { hd: usize },
    #[cfg(target_arch = "x86_64")]
    Avx2 { hd: usize },
}

impl QueryTiles {
    /// The tiled form where it pays: head_dim 8 or 16 on AVX2 or AVX-512 (the lane count of a query tile).
    #[allow(unused_variables)]
    fn for_head_dim(hd: usize, isa: whittle_kernels::Isa) -> Option<Self> {
        if hd != 8 && hd != 16 {
            return None;
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            whittle_kernels::Isa::Avx512 => Some(Self::Avx512 { hd }),
            #[cfg(target_arch = "x86_64")]
            whittle_kernels::Isa::Avx2 => Some(Self::Avx2 { hd }),
            _ => None,
        }
    }

    fn lanes(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 { .. } => 16,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 { .. } => 8,
        }
    }

    /// All heads of queries `0..n` (rows of `q`, `qd` wide) into `out`, tiles in parallel when this is not already
    /// inside the pool (as in `attention_prefill`).
    fn run(self, heads: &PrefillHeads<'_>, q: &[f32], qd: usize, pos0: usize, n: usize, out: &mut [f32]) {
        let lanes = self.lanes();
        let tile = |(i, rows): (usize, &mut [f32]), scores: &mut Vec<f32>| {
            let (t0, count) = (i * lanes, rows.len() / qd);
            for h in 0..heads.num_heads {
                // SAFETY: `for_head_dim` only returns a variant whose instruction set this CPU supports.
                match self {
                    #[cfg(target_arch = "x86_64")]
                    Self::Avx512 { hd: 8 } => unsafe { heads.tile_avx512::<8>(q, qd, pos0, t0, count, h, rows, scores) },
                    #[cfg(target_arch = "x86_64")]
                    Self::Avx512 { .. } => unsafe { heads.tile_avx512::<16>(q, qd, pos0, t0, count, h, rows, scores) },
                    #[cfg(target_arch = "x86_64")]
                    Self::Avx2 { hd: 8 } => unsafe { heads.tile_avx2::<8>(q, qd, pos0, t0, count, h, rows, scores) },
                    #[cfg(target_arch = "x86_64")]
                    Self::Avx2 { .. } => unsafe { heads.tile_avx2::<16>(q, qd, pos0, t0, count, h, rows, scores) },
                }
            }
        };
        let out = &mut out[..n * qd];
        if prefill_in_parallel(n, pos0 + n, qd) {
            out.par_chunks_mut(lanes * qd).enumerate().for_each_init(Vec::new, |sc, c| tile(c, sc));
        } else {
            let mut scores = Vec::new();
            out.chunks_mut(lanes * qd).enumerate().for_each(|c| tile(c, &mut scores));
        }
    }
}

impl PrefillHeads<'_> {
    /// Head `h` of the `count` (≤ L) queries `t0..t0 + count` into `rows` (their output rows, `qd` wide), one query
    /// per lane (see [`QueryTiles`]). `scores` holds each key's L scores between the two passes (L1-sized: 16 KB
    /// for 256 keys). Masked keys (past a lane's own position) score -inf, so their weight is exp_approx's floor
    /// e^-87: below 1e-37 against a sum ≥ 1, it changes nothing.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn tile<const HD: usize, const L: usize, const FMA: bool>(
        &self,
        q: &[f32],
        qd: usize,
        pos0: usize,
        t0: usize,
        count: usize,
        h: usize,
        rows: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        debug_assert!(self.hd == HD && count <= L && count > 0);
        let stride = self.stride;
        let kvh = h / self.group;
        let keys = &self.kt[kvh * HD * stride..(kvh + 1) * HD * stride];
        let values = &self.vt[kvh * HD * stride..(kvh + 1) * HD * stride];
        let mut qv = [[0.0f32; L]; HD];
        for j in 0..count {
            let row = &q[(t0 + j) * qd + h * HD..][..HD];
            for d in 0..HD {
                qv[d][j] = row[d] * self.scale;
            }
        }
        // Keys up to the tile's first query are visible to every lane; the rest only to the lanes at or after them.
        let first = pos0 + t0;
        let last = first + count - 1;
        scores.clear();
        scores.resize((last + 1) * L, 0.0);
        let mut max = [f32::NEG_INFINITY; L];
        for (p, s) in scores.chunks_exact_mut(L).enumerate() {
            let mut acc = [0.0f32; L];
            for d in 0..HD {
                let k = keys[d * stride + p];
                for j in 0..L {
                    acc[j] = madd::<FMA>(qv[d][j], k, acc[j]);
                }
            }
            if p > first {
                for (j, a) in acc.iter_mut().enumerate() {
                    if first + j < p {
                        *a = f32::NEG_INFINITY;
                    }
                }
            }
            for j in 0..L {
                max[j] = if acc[j] > max[j] { acc[j] } else { max[j] };
            }
            s.copy_from_slice(&acc);
        }
        let mut sum = [0.0f32; L];
        let mut o = [[0.0f32; L]; HD];
        for (p, s) in scores.chunks_exact(L).enumerate() {
            let mut e = [0.0f32; L];
            for j in 0..L {
                e[j] = exp_approx(s[j] - max[j]);
                sum[j] += e[j];
            }
            for d in 0..HD {
                let v = values[d * stride + p];
                for j in 0..L {
                    o[d][j] = madd::<FMA>(e[j], v, o[d][j]);
                }
            }
        }
        for j in 0..count {
            let inv = 1.0 / sum[j];
            let row = &mut rows[j * qd + h * HD..][..HD];
            for d in 0..HD {
                row[d] = o[d][j] * inv;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx512<const HD: usize>(&self, q: &[f32], qd: usize, pos0: usize, t0: usize, count: usize, h: usize, rows: &mut [f32], sc: &mut Vec<f32>) {
        self.tile::<HD, 16, true>(q, qd, pos0, t0, count, h, rows, sc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx2<const HD: usize>(&self, q: &[f32], qd: usize, pos0: usize, t0: usize, count: usize, h: usize, rows: &mut [f32], sc: &mut Vec<f32>) {
        self.tile::<HD, 8, true>(q, qd, pos0, t0, count, h, rows, sc)
    }
}

/// a·b + c, fused when `FMA` (one rounding, one instruction on CPUs that have it).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Σ_p w[p] · V[d][p] for the `D` consecutive rows `d` of `values` (row stride `stride`), over the positions of
/// `w` (a whole number of `L`-blocks): the D sums share each load of a block of weights, and each row keeps `L`
/// partial sums (vector lanes).
#[inline(always)]
fn weighted_sums<const D: usize, const L: usize, const FMA: bool>(w: &[f32], values: &[f32], stride: usize) -> [f32; D] {
    assert!(w.len().is_multiple_of(L) && (D == 0 || values.len() >= (D - 1) * stride + w.len()));
    let mut acc = [[0.0f32; L]; D];
    for p in (0..w.len()).step_by(L) {
        let wb = &w[p..p + L];
        for (dd, a) in acc.iter_mut().enumerate() {
            // SAFETY: dd·stride + p + L ≤ (D − 1)·stride + w.len() ≤ values.len() (asserted above). Unchecked
            // because a bounds check per row and block doubled this loop's instructions.
            let row = unsafe { &*(values.as_ptr().add(dd * stride + p) as *const [f32; L]) };
            for j in 0..L {
                a[j] = madd::<FMA>(wb[j], row[j], a[j]);
            }
        }
    }
    core::array::from_fn(|dd| lane_sum(acc[dd]))
}

/// The sum of a vector's `L` lanes (a power of two) by halving: log2 L vector adds instead of a serial chain of
/// L − 1 scalar ones, which cost as much as the product loop itself on short rows.
#[inline(always)]
fn lane_sum<const L: usize>(mut v: [f32; L]) -> f32 {
    debug_assert!(L.is_power_of_two());
    let mut w = L;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            v[j] += v[j + w];
        }
    }
    v[0]
}

/// Maximum of whole `L`-blocks with `L` independent lanes (vectorizes; a single running maximum is a serial chain).
#[inline(always)]
fn block_max<const L: usize>(v: &[f32]) -> f32 {
    debug_assert!(v.len().is_multiple_of(L));
    let mut acc = [f32::NEG_INFINITY; L];
    for c in v.chunks_exact(L) {
        for k in 0..L {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Prefill attention (the query-tile form for head_dim 8 and 16, the per-token form otherwise) against a plain
    /// f64 softmax attention, for ragged query counts, a cache already holding positions, and grouped KV heads.
    /// Tolerance 2e-5 relative to the largest output: f32 sums over ≤ 70 keys and exp_approx's 1.3e-7.
    #[test]
    fn prefill_attention_matches_a_plain_f64_reference() {
        let mut rng = StdRng::seed_from_u64(11);
        for hd in [8, 16, 32] {
            let (heads, kv_heads) = (4, 2);
            let json = serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": heads * hd,
                "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "head_dim": hd, "vocab_size": 8, "max_position_embeddings": 128,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0
            });
            let cfg = ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap();
            let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
            for (pos0, n) in [(0, 1), (0, 17), (0, 40), (5, 1), (5, 23), (30, 37)] {
                let total = pos0 + n;
                let mut r = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-2.0..2.0)).collect() };
                let (q, kc, vc) = (r(n * qd), r(total * kvd), r(total * kvd));
                let mut out = vec![0.0; n * qd];
                attention_prefill(&cfg, &q, &kc, &vc, pos0, n, &mut out);
                let mut want = vec![0.0f64; n * qd];
                for t in 0..n {
                    for h in 0..heads {
                        let kvh = h / (heads / kv_heads);
                        let dot = |j: usize| -> f64 {
                            (0..hd).map(|d| q[t * qd + h * hd + d] as f64 * kc[j * kvd + kvh * hd + d] as f64).sum::<f64>() / (hd as f64).sqrt()
                        };
                        let s: Vec<f64> = (0..=pos0 + t).map(dot).collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for d in 0..hd {
                            want[t * qd + h * hd + d] = e.iter().enumerate().map(|(j, w)| w * vc[j * kvd + kvh * hd + d] as f64).sum::<f64>() / z;
                        }
                    }
                }
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                    assert!((*g as f64 - w).abs() <= 2e-5 * scale, "hd {hd}, pos0 {pos0}, n {n}, output {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn fast_exp_matches_libm_within_5e7_relative() {
        // Below about -80 the result is within a few ulps of the smallest normal float and irrelevant to a softmax;
        // 88 is the largest argument whose e^x is a finite f32.
        let mut x = -80.0f32;
        while x <= 88.0 {
            let (a, b) = (super::exp_approx(x), x.exp());
            assert!(((a - b) / b).abs() < 5e-7, "x={x}: {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(super::exp_approx(0.0), 1.0);
        // Saturation instead of overflow or NaN: SiLU of large inputs must stay finite.
        assert!(super::exp_approx(1e4).is_finite() && super::exp_approx(-1e4) >= 0.0);
        let (neg, pos) = (super::silu(-1e4), super::silu(1e4));
        assert!(neg.is_finite() && neg.abs() < 1e-30 && pos == 1e4, "silu(±1e4) = {neg}, {pos}");
    }
}
