//! Fitness: the KL divergence KL(p_dense ‖ p_candidate) of the next-token distributions, averaged over every
//! position of a set of calibration windows (algorithms.md §7, §8). Lower is better.
//!
//! The dense model's distributions are computed once ([`Reference`]) and kept as probabilities with their
//! per-position Σ p log p, so a candidate costs one forward pass and, per position, a log-sum-exp and one dot
//! product: Σ p (log p − log q) = Σ p log p − (Σ p x − lse(x) Σ p) for candidate logits x. A candidate model is
//! the dense model with some linears' `Weight`s swapped for database levels (`Arc` clones, no copies), and all
//! (candidate, window) pairs of a selection stage run in parallel. Per-window sums are added in a fixed order, so
//! a fitness is the same number on every run, which the seeded search relies on.

use super::database::LevelsDb;
use super::evolve::Fitness;
use super::units::Unit;
use crate::error::{Result, WhittleError};
use crate::eval::log_softmax;
use crate::model::{KvCache, Model, Scratch};
use rayon::prelude::*;

/// One window's dense reference: next-token probabilities, and per position Σ p·log p and Σ p (for the KL).
type WindowReference = (Vec<f32>, Vec<f64>, Vec<f64>);

/// Largest dense-distribution cache accepted (windows × ctx × vocab × 4 bytes).
const MAX_REFERENCE_BYTES: usize = 4 << 30;

/// The dense model's next-token distributions on the fitness windows.
pub struct Reference {
    windows: Vec<Vec<u32>>,
    vocab: usize,
    /// Per window, `[ctx × vocab]` probabilities.
    probs: Vec<Vec<f32>>,
    /// Per window and position: Σ p log p and Σ p (of the stored f32 p, so the identity above is exact).
    neg_entropy: Vec<Vec<f64>>,
    mass: Vec<Vec<f64>>,
}

impl Reference {
    /// Runs the dense model over `windows` once. Errors before any work if the cache would not fit in memory.
    pub fn new(model: &Model, windows: Vec<Vec<u32>>, cancelled: &(dyn Fn() -> bool + Sync)) -> Result<Self> {
        let vocab = model.config.vocab_size;
        let tokens: usize = windows.iter().map(Vec::len).sum();
        if tokens.saturating_mul(vocab).saturating_mul(4) > MAX_REFERENCE_BYTES {
            return Err(WhittleError::Invalid(format!(
                "the dense reference of {tokens} fitness tokens × {vocab} vocabulary would need {:.1} GiB; \
                 use fewer --fitness-windows or a shorter --fitness-ctx",
                (tokens * vocab * 4) as f64 / (1u64 << 30) as f64
            )));
        }
        let per: Vec<Option<WindowReference>> = windows
            .par_iter()
            .map(|w| {
                if cancelled() {
                    return None;
                }
                let mut cache = model.new_cache();
                let logits = model.forward(w, &mut cache, &mut Scratch::default(), w.len());
                let mut lp = Vec::new();
                let mut probs = Vec::with_capacity(logits.len());
                let (mut ne, mut mass) = (Vec::with_capacity(w.len()), Vec::with_capacity(w.len()));
                for row in logits.chunks(vocab) {
                    log_softmax(row, &mut lp);
                    let (mut s_plogp, mut s_p) = (0f64, 0f64);
                    for &l in &lp {
                        let p = l.exp() as f32;
                        probs.push(p);
                        s_plogp += p as f64 * l;
                        s_p += p as f64;
                    }
                    ne.push(s_plogp);
                    mass.push(s_p);
                }
                Some((probs, ne, mass))
            })
            .collect();
        let mut r = Reference { windows, vocab, probs: Vec::new(), neg_entropy: Vec::new(), mass: Vec::new() };
        for p in per {
            let (probs, ne, mass) = p.ok_or(WhittleError::Cancelled)?;
            r.probs.push(probs);
            r.neg_entropy.push(ne);
            r.mass.push(mass);
        }
        Ok(r)
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Tokens in window `i`.
    pub fn window_tokens(&self, i: usize) -> usize {
        self.windows[i].len()
    }

    /// Σ KL over the positions of window `i` for `model`, and the number of positions.
    pub fn window_kl(&self, model: &Model, i: usize, cache: &mut KvCache, scratch: &mut Scratch) -> (f64, usize) {
        let w = &self.windows[i];
        cache.clear();
        let logits = model.forward(w, cache, scratch, w.len());
        let v = self.vocab;
        let mut sum = 0f64;
        for (t, row) in logits.chunks(v).enumerate() {
            let p = &self.probs[i][t * v..(t + 1) * v];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (mut z, mut dot) = (0f64, 0f64);
            for (&x, &pi) in row.iter().zip(p) {
                z += ((x - max).exp()) as f64;
                dot += pi as f64 * x as f64;
            }
            let lse = max as f64 + z.ln();
            sum += self.neg_entropy[i][t] - (dot - lse * self.mass[i][t]);
        }
        (sum, w.len())
    }
}

/// KL fitness of level assignments: the dense model with each unit's linears taken from the database.
pub struct KlFitness<'a> {
    pub dense: &'a Model,
    pub db: &'a LevelsDb,
    pub units: &'a [Unit],
    pub reference: &'a Reference,
}

impl KlFitness<'_> {
    /// The model an assignment (level per unit) describes.
    pub fn candidate(&self, assign: &[usize]) -> Model {
        let mut m = self.dense.clone();
        let kinds = m.blocks.first().map_or(1, |b| b.linears.len());
        for (unit, &level) in self.units.iter().zip(assign) {
            for &i in &unit.linears {
                m.blocks[i / kinds].linears[i % kinds].weight = self.db.weights[i][level].clone();
            }
        }
        m
    }
}

impl Fitness for KlFitness<'_> {
    fn pool(&self) -> usize {
        self.reference.len()
    }

    fn tokens(&self, windows: &[usize]) -> usize {
        windows.iter().map(|&i| self.reference.window_tokens(i)).sum()
    }

    fn evaluate(
        &self,
        candidates: &[&[usize]],
        windows: &[usize],
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<Vec<f64>> {
        let models: Vec<Model> = candidates.iter().map(|a| self.candidate(a)).collect();
        let pairs: Vec<(usize, usize)> =
            (0..models.len()).flat_map(|c| windows.iter().map(move |&w| (c, w))).collect();
        let sums: Vec<Option<(f64, usize)>> = pairs
            .par_iter()
            .map_init(
                || (self.dense.new_cache(), Scratch::default()),
                |(cache, scratch), &(c, w)| {
                    if cancelled() {
                        return None;
                    }
                    Some(self.reference.window_kl(&models[c], w, cache, scratch))
                },
            )
            .collect();
        let mut out = vec![(0f64, 0usize); models.len()];
        for ((c, _), s) in pairs.iter().zip(sums) {
            let (kl, n) = s.ok_or(WhittleError::Cancelled)?;
            out[*c].0 += kl;
            out[*c].1 += n;
        }
        Ok(out.into_iter().map(|(kl, n)| kl / n.max(1) as f64).collect())
    }
}
