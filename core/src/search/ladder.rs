//! Ladders: the ordered compression levels a search picks from for every unit, e.g. GPTQ 2,3,4,5,6 bits at groups
//! of 32, or SparseGPT 70%,60%,…,0% sparsity (optionally with the kept weights quantized: "both").
//!
//! A level is exactly the [`LayerJob`] a plan would carry (or `None`: keep the linear dense), so a level found by the
//! search turns into a plan rule without translation, and `whittle eval/compress/export --plan` run the very same
//! compressor settings. Levels are ordered from the most compressed to the least compressed: "one level up" means
//! "more bits / fewer zeros", which is the direction the budget charges for.

use crate::compress::{validate, LayerJob, Method, QuantSpec, Sparsity};
use crate::plan::Rule;
use serde::{Deserialize, Serialize};

/// One rung of a ladder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Level {
    /// Short name for tables and events: "w3", "s50", "s50w4", "dense".
    pub label: String,
    /// The compression this level applies; `None` keeps the linear as it is.
    pub job: Option<LayerJob>,
}

impl Level {
    /// Unstructured sparsity of this level (0 when it does not prune).
    pub fn sparsity(&self) -> f64 {
        match self.job.as_ref().and_then(|j| j.sparsity) {
            Some(Sparsity::Unstructured(p)) => p as f64,
            Some(Sparsity::NM { n, m }) => n as f64 / m as f64,
            None => 0.0,
        }
    }

    /// Quantization bits of this level, if it quantizes.
    pub fn bits(&self) -> Option<u8> {
        self.job.as_ref().and_then(|j| j.quant.as_ref()).map(|q| q.bits)
    }

    /// The plan rule that reproduces this level exactly on `modules` (every field set, so no earlier rule leaks in).
    pub fn rule(&self, modules: &str) -> Rule {
        let Some(job) = &self.job else {
            return Rule { modules: modules.to_string(), keep_dense: Some(true), ..Default::default() };
        };
        let q = job.quant.as_ref();
        Rule {
            modules: modules.to_string(),
            method: Some(job.method),
            bits: q.map(|q| q.bits),
            group: q.map(|q| q.group.map_or(-1, |g| g as i64)),
            sym: q.map(|q| q.sym),
            act_order: q.and_then(|q| q.act_order.then_some(true)),
            static_groups: q.and_then(|q| q.static_groups.then_some(true)),
            mse: q.and_then(|q| q.mse.then_some(true)),
            sparsity: match job.sparsity {
                Some(Sparsity::Unstructured(p)) => Some(p),
                _ => None,
            },
            nm: match job.sparsity {
                Some(Sparsity::NM { n, m }) => Some(format!("{n}:{m}")),
                _ => None,
            },
            keep_dense: None,
            damp: (job.damp != LayerJob::new(job.method, None, None).damp).then_some(job.damp),
        }
    }
}

/// The levels every unit chooses from, most compressed first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ladder {
    pub levels: Vec<Level>,
}

/// Compressor settings shared by every level of a ladder.
#[derive(Clone, Debug, PartialEq)]
pub struct GridArgs {
    /// Columns per group; `None` = per output channel.
    pub group: Option<usize>,
    pub sym: bool,
    /// GPTQ act-order (a GPTQ option: other methods reject it).
    pub act_order: bool,
    /// MSE-clipped grids.
    pub mse: bool,
    /// Dampening; `None` = the compressors' default.
    pub damp: Option<f64>,
}

impl Default for GridArgs {
    fn default() -> Self {
        Self { group: Some(128), sym: true, act_order: false, mse: false, damp: None }
    }
}

impl Ladder {
    /// Parses a ladder spec:
    /// * `gptq:2,3,4,5,6` or `rtn:…`: quantization at these bit widths (2..=8);
    /// * `sparsegpt:0,10,20,…,70` or `magnitude:…`: unstructured sparsity in percent ([0, 100));
    /// * `sparsegpt:0,25,50@4`: the same with the kept weights quantized to 4 bits in the same pass.
    ///
    /// `grid` gives the group size and symmetry of every quantized level. Errors name the offending part.
    pub fn parse(spec: &str, grid: &GridArgs) -> Result<Self, String> {
        let (method, values) = spec
            .split_once(':')
            .ok_or_else(|| format!("levels `{spec}`: expected METHOD:VALUES, e.g. gptq:2,3,4,5,6 or sparsegpt:0,10,20,30"))?;
        let method: Method = serde_json::from_value(serde_json::Value::String(method.trim().to_string()))
            .map_err(|_| format!("levels `{spec}`: unknown method `{method}` (gptq, rtn, sparsegpt, magnitude)"))?;
        let (values, joint_bits) = match values.split_once('@') {
            Some((v, b)) => {
                let b: u8 = b.trim().parse().map_err(|_| format!("levels `{spec}`: `@{b}` is not a bit width"))?;
                (v, Some(b))
            }
            None => (values, None),
        };
        let quant = |bits: u8| QuantSpec {
            bits,
            group: grid.group,
            sym: grid.sym,
            act_order: grid.act_order,
            static_groups: false,
            mse: grid.mse,
        };
        let damped = |mut level: Level| {
            if let (Some(job), Some(d)) = (level.job.as_mut(), grid.damp) {
                job.damp = d;
            }
            level
        };
        let mut levels = Vec::new();
        let mut seen = Vec::new();
        for tok in values.split(',').map(str::trim) {
            if tok.is_empty() {
                return Err(format!("levels `{spec}`: empty value in the list"));
            }
            let level = match method {
                Method::Gptq | Method::Rtn => {
                    if joint_bits.is_some() {
                        return Err(format!("levels `{spec}`: `@BITS` is for sparsity ladders (sparsegpt, magnitude)"));
                    }
                    let bits: u8 =
                        tok.parse().map_err(|_| format!("levels `{spec}`: `{tok}` is not a bit width"))?;
                    if !(2..=8).contains(&bits) {
                        return Err(format!("levels `{spec}`: bits must be 2..8, found {bits}"));
                    }
                    Level { label: format!("w{bits}"), job: Some(LayerJob::new(method, Some(quant(bits)), None)) }
                }
                Method::SparseGpt | Method::Magnitude => {
                    let pct: f64 =
                        tok.parse().map_err(|_| format!("levels `{spec}`: `{tok}` is not a percentage"))?;
                    if !(pct.is_finite() && (0.0..100.0).contains(&pct)) {
                        return Err(format!("levels `{spec}`: sparsity must be in [0, 100) percent, found {tok}"));
                    }
                    sparsity_level(method, pct, joint_bits.map(quant))
                }
                Method::Obc => {
                    return Err(format!(
                        "levels `{spec}`: obc is too slow to build a levels database; use gptq or sparsegpt"
                    ))
                }
            };
            let level = damped(level);
            if let Some(job) = &level.job {
                validate(job).map_err(|e| format!("levels `{spec}`, value {tok}: {e}"))?;
            }
            if seen.contains(&level.label) {
                return Err(format!("levels `{spec}`: `{tok}` appears twice"));
            }
            seen.push(level.label.clone());
            levels.push(level);
        }
        if levels.len() < 2 {
            return Err(format!("levels `{spec}`: a search needs at least two levels"));
        }
        let mut ladder = Ladder { levels };
        ladder.sort_most_compressed_first();
        Ok(ladder)
    }

    /// Quantized levels by ascending bits; sparsity levels by descending sparsity (then ascending bits).
    fn sort_most_compressed_first(&mut self) {
        self.levels.sort_by(|a, b| {
            b.sparsity()
                .total_cmp(&a.sparsity())
                .then(a.bits().unwrap_or(u8::MAX).cmp(&b.bits().unwrap_or(u8::MAX)))
        });
    }

    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    pub fn labels(&self) -> Vec<String> {
        self.levels.iter().map(|l| l.label.clone()).collect()
    }
}

/// A sparsity level; 0% without quantization is the dense weight, 0% with quantization is plain GPTQ/RTN.
fn sparsity_level(method: Method, pct: f64, quant: Option<QuantSpec>) -> Level {
    let bits_label = quant.as_ref().map(|q| format!("w{}", q.bits)).unwrap_or_default();
    if pct == 0.0 {
        let job = quant.map(|q| {
            let m = if method == Method::SparseGpt { Method::Gptq } else { Method::Rtn };
            LayerJob::new(m, Some(q), None)
        });
        let label = if job.is_some() { bits_label } else { "dense".to_string() };
        return Level { label, job };
    }
    let p = (pct / 100.0) as f32;
    Level {
        label: format!("s{}{bits_label}", trim_pct(pct)),
        job: Some(LayerJob::new(method, quant, Some(Sparsity::Unstructured(p)))),
    }
}

fn trim_pct(pct: f64) -> String {
    if pct.fract() == 0.0 {
        format!("{}", pct as u64)
    } else {
        format!("{pct}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g32() -> GridArgs {
        GridArgs { group: Some(32), ..Default::default() }
    }

    #[test]
    fn gptq_ladder_is_sorted_by_bits_and_carries_the_grid() {
        let l = Ladder::parse("gptq:6,2,4,3,5", &g32()).unwrap();
        assert_eq!(l.labels(), ["w2", "w3", "w4", "w5", "w6"]);
        let q = l.levels[0].job.as_ref().unwrap().quant.as_ref().unwrap();
        assert_eq!((q.bits, q.group, q.sym), (2, Some(32), true));
        assert_eq!(l.levels[0].job.as_ref().unwrap().method, Method::Gptq);
    }

    #[test]
    fn sparsity_ladder_goes_from_most_to_least_sparse_and_zero_is_dense() {
        let l = Ladder::parse("sparsegpt:0,10,20,30,40,50,60,70", &g32()).unwrap();
        assert_eq!(l.labels(), ["s70", "s60", "s50", "s40", "s30", "s20", "s10", "dense"]);
        assert!(l.levels.last().unwrap().job.is_none());
        let joint = Ladder::parse("sparsegpt:0,50@4", &g32()).unwrap();
        assert_eq!(joint.labels(), ["s50w4", "w4"]);
        assert_eq!(joint.levels[1].job.as_ref().unwrap().method, Method::Gptq);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, want) in [
            ("gptq", "METHOD:VALUES"),
            ("foo:2,3", "unknown method"),
            ("gptq:1,2", "bits must be 2..8"),
            ("gptq:2,x", "not a bit width"),
            ("gptq:3,3", "appears twice"),
            ("gptq:3", "at least two levels"),
            ("sparsegpt:0,100", "[0, 100)"),
            ("gptq:2,3@4", "for sparsity ladders"),
            ("obc:2,3", "too slow"),
            ("gptq:2,,3", "empty value"),
        ] {
            let err = Ladder::parse(spec, &g32()).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn rules_reproduce_the_level_job() {
        let l = Ladder::parse("sparsegpt:0,25,50@3", &GridArgs { group: None, sym: false, ..Default::default() }).unwrap();
        let dense = Ladder::parse("sparsegpt:0,50", &g32()).unwrap();
        let tuned = GridArgs { group: Some(32), sym: false, act_order: true, mse: true, damp: Some(0.05) };
        let gptq = Ladder::parse("gptq:2,3", &tuned).unwrap();
        assert_eq!(gptq.levels[0].job.as_ref().unwrap().damp, 0.05);
        assert!(Ladder::parse("rtn:2,3", &tuned).unwrap_err().contains("act_order"));
        for level in l.levels.iter().chain(&dense.levels).chain(&gptq.levels) {
            let plan = crate::plan::Plan { rules: vec![level.rule("*")], ..Default::default() };
            let r = plan.resolve(&[("m".into(), 8, 64)], 0, 32.0).unwrap();
            assert_eq!(r.modules[0].job, level.job, "{}", level.label);
        }
    }
}
