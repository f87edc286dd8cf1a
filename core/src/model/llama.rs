//! The Llama-family decoder (Llama, Mistral, Qwen2): embedding, `num_layers` pre-norm blocks of grouped-query
//! attention with RoPE and a SwiGLU MLP, final RMSNorm and the LM head. Every linear is a `kernels::Weight`, so the
//! same forward runs dense f32/f16/bf16 weights, dequantized plans, or packed low-bit weights.
//! `forward` handles any number of new tokens after what the cache holds (prefill and decode are one code path).

use super::config::ModelConfig;
use super::kv_cache::{ensure, KvCache, LayerCache, Scratch};
use super::rope::Rope;
use rayon::prelude::*;
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
}

impl Linear {
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.weight.matmul(x, n, y);
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

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// e^x for x ≤ 0 (softmax after subtracting the max), branch-free so the loop over scores vectorizes even with
/// plain SSE2: n = round(x·log2 e) by the 1.5·2²³ magic-number trick, r = x − n·ln2 with a two-part (Cody–Waite)
/// ln2 so r stays exact, e^r by its degree-6 Taylor series on |r| ≤ ½ln2 (truncation ≤ 1.3e-7 relative), and 2^n
/// by building the exponent bits. libm's expf is a call per element and was a third of the attention time.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few mantissa bits, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
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
        let cfg = &self.config;
        let d = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let [_, _, _, o_proj, gate_proj, up_proj, down_proj] = &block.linears;
        if let Some(obs) = observe.as_mut() {
            if obs(layer, Site::OIn, attn, n) {
                return;
            }
        }
        let proj = ensure(&mut s.proj, n * d);
        o_proj.forward(attn, n, proj);
        for (xi, p) in x.iter_mut().zip(proj.iter()) {
            *xi += p;
        }

        let h = ensure(&mut s.h, n * d);
        rms_norm(x, &block.mlp_norm, eps, h);
        if let Some(obs) = observe.as_mut() {
            if obs(layer, Site::MlpIn, h, n) {
                return;
            }
        }
        let im = cfg.intermediate_size;
        let gate = ensure(&mut s.gate, n * im);
        gate_proj.forward(h, n, gate);
        let up = ensure(&mut s.up, n * im);
        up_proj.forward(h, n, up);
        for (g, u) in gate.iter_mut().zip(up.iter()) {
            *g = silu(*g) * u;
        }
        if let Some(obs) = observe.as_mut() {
            if obs(layer, Site::DownIn, gate, n) {
                return;
            }
        }
        let proj = ensure(&mut s.proj, n * d);
        down_proj.forward(gate, n, proj);
        for (xi, p) in x.iter_mut().zip(proj.iter()) {
            *xi += p;
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
                *s = exp_nonpositive(*s - max);
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
    let transpose = |cache: &[f32]| {
        let mut t = vec![0.0f32; kvd * total];
        for (j, row) in cache[..total * kvd].chunks_exact(kvd).enumerate() {
            for (c, v) in row.iter().enumerate() {
                t[c * total + j] = *v;
            }
        }
        t
    };
    let (kt, vt) = (transpose(kc), transpose(vc));
    let heads = PrefillHeads { num_heads: cfg.num_heads, group, hd, total, scale, kt: &kt, vt: &vt };
    let avx2 = avx2_fma();
    let one_token = |t: usize, o: &mut [f32], sc: &mut Vec<f32>| {
        let qt = &q[t * qd..(t + 1) * qd];
        let len = pos0 + t + 1;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { heads.token_avx2(qt, len, o, sc) };
        }
        let _ = avx2;
        heads.token(qt, len, o, sc)
    };
    if n * total * qd > 1 << 20 {
        out.par_chunks_mut(qd).enumerate().for_each_init(Vec::new, |sc, (t, o)| one_token(t, o, sc));
    } else {
        let mut sc = Vec::new();
        for (t, o) in out.chunks_mut(qd).enumerate() {
            one_token(t, o, &mut sc);
        }
    }
}

/// Whether this CPU runs AVX2 and FMA (checked once; the std macro caches the answer).
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The transposed keys and values of one prefill, and the per-token attention over them.
struct PrefillHeads<'a> {
    num_heads: usize,
    group: usize,
    hd: usize,
    total: usize,
    scale: f32,
    kt: &'a [f32],
    vt: &'a [f32],
}

impl PrefillHeads<'_> {
    /// Attention of one query token `qt` (all heads) over the first `len` positions, into `o`.
    #[inline(always)]
    fn token(&self, qt: &[f32], len: usize, o: &mut [f32], sc: &mut Vec<f32>) {
        let (hd, total) = (self.hd, self.total);
        for h in 0..self.num_heads {
            let kvh = h / self.group;
            sc.clear();
            sc.resize(len, 0.0);
            for (d, qv) in qt[h * hd..(h + 1) * hd].iter().enumerate() {
                let qv = qv * self.scale;
                let row = &self.kt[(kvh * hd + d) * total..][..len];
                for (s, k) in sc.iter_mut().zip(row) {
                    *s += qv * k;
                }
            }
            let max = max8(sc);
            for s in sc.iter_mut() {
                *s = exp_nonpositive(*s - max);
            }
            let inv = 1.0 / sum8(sc);
            for d in 0..hd {
                let row = &self.vt[(kvh * hd + d) * total..][..len];
                o[h * hd + d] = whittle_kernels::dense::dot_f32(sc, row) * inv;
            }
        }
    }

    /// [`Self::token`] compiled for AVX2+FMA, so its loops over positions vectorize 8 wide (the portable build
    /// targets baseline x86-64).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn token_avx2(&self, qt: &[f32], len: usize, o: &mut [f32], sc: &mut Vec<f32>) {
        self.token(qt, len, o, sc)
    }
}

/// Maximum with 8 independent lanes (vectorizable; a single running maximum is a serial chain).
#[inline(always)]
fn max8(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter().fold(rest, |m, &s| if s > m { s } else { m })
}

/// Sum with 8 independent accumulators (vectorizable).
#[inline(always)]
fn sum8(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_matches_libm_within_5e7_relative() {
        // Below about -80 the result is within a few ulps of the smallest normal float and irrelevant to a softmax.
        let mut x = -80.0f32;
        while x <= 0.0 {
            let (a, b) = (super::exp_nonpositive(x), x.exp());
            assert!(((a - b) / b).abs() < 5e-7, "x={x}: {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(super::exp_nonpositive(0.0), 1.0);
    }
}
