//! Budgets and the cost table. Every (unit, level) pair gets an exact integer cost in the budget's own unit, so
//! "the budget holds exactly" is an integer equality, not a float comparison:
//!
//! * average bits, **code** accounting (the default): cost = Σ params × code bits (`bits` of the level; dense
//!   levels count the model's float bits). Scales and zero points are left out, the way EvoPress and most papers
//!   state "3 bits", so `--target-bits 3` means the same budget as uniform 3-bit and lowering a layer by one bit
//!   while raising another with the same parameter count leaves the total unchanged.
//! * average bits, **stored** accounting: cost = params × `plan::job_bits` (codes plus an f16 scale and a `bits`-wide
//!   zero per group, N:M masks), exactly what `Plan::resolve` reports as `avg_bits`. Swaps then pair layers whose
//!   scale overhead also matches (gate with up, but not with down_proj, whose groups differ).
//! * total bytes of the model: stored accounting of the linears plus every other parameter at the float width.
//! * average sparsity: cost = params × kept fraction in units of 1/10000 (nominal: the levels' settings).
//!
//! The budget is a maximum (bits, bytes, kept fraction): the start assignment is the most uniform one that fits,
//! within one level step of one unit of the target, and mutations keep its cost exactly.

use super::ladder::Ladder;
use super::units::Unit;
use crate::error::{Result, WhittleError};
use crate::plan::job_bits;
use serde::{Deserialize, Serialize};

/// How bits are counted for a bits budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accounting {
    /// Code bits only (level bits × weights).
    #[default]
    Code,
    /// Stored bits: codes, scales, zero points and masks (`plan::job_bits`).
    Stored,
}

impl std::str::FromStr for Accounting {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "code" => Ok(Accounting::Code),
            "stored" => Ok(Accounting::Stored),
            _ => Err(format!("accounting `{s}`: expected `code` or `stored`")),
        }
    }
}

/// What the search must not exceed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Budget {
    /// Average bits per weight over the searched linears.
    AvgBits {
        bits: f64,
        #[serde(default)]
        accounting: Accounting,
    },
    /// Size of the whole model in bytes (linears as stored, every other parameter at the float width).
    TotalBytes { bytes: u64 },
    /// Average fraction of zero weights over the searched linears, in [0, 1).
    AvgSparsity { sparsity: f64 },
}

/// Kept-fraction resolution of the sparsity budget (1/10000 = 0.01%).
const DENSITY_SCALE: f64 = 10_000.0;

impl Budget {
    /// The unit the measure is shown in.
    pub fn unit(&self) -> &'static str {
        match self {
            Budget::AvgBits { .. } => "bits/weight",
            Budget::TotalBytes { .. } => "bytes",
            Budget::AvgSparsity { .. } => "sparsity",
        }
    }

    /// The target in its own measure.
    pub fn target(&self) -> f64 {
        match *self {
            Budget::AvgBits { bits, .. } => bits,
            Budget::TotalBytes { bytes } => bytes as f64,
            Budget::AvgSparsity { sparsity } => sparsity,
        }
    }
}

/// Exact integer costs of every (unit, level) and the budget they must fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostTable {
    pub budget: Budget,
    /// `costs[unit][level]`, strictly increasing along the ladder for every unit.
    pub costs: Vec<Vec<u64>>,
    /// Largest total cost allowed.
    pub target: u64,
    /// Weights over all searched units.
    pub params: u64,
    /// Bits outside the searched linears (only counted by the bytes budget).
    pub other_bits: u64,
}

fn cost_of(budget: &Budget, level: &super::ladder::Level, rows: usize, cols: usize, dense_bits: f64) -> u64 {
    let params = (rows * cols) as f64;
    let job = level.job.as_ref();
    match budget {
        Budget::AvgBits { accounting: Accounting::Code, .. } => {
            let bits = job.and_then(|j| j.quant.as_ref()).map_or(dense_bits, |q| q.bits as f64);
            (bits * params).round() as u64
        }
        // job_bits × params is an integer by construction (bits × weights + group bits); rounding only removes the
        // float noise of the division inside job_bits.
        Budget::AvgBits { accounting: Accounting::Stored, .. } | Budget::TotalBytes { .. } => {
            (job_bits(job, rows, cols, dense_bits) * params).round() as u64
        }
        Budget::AvgSparsity { .. } => ((1.0 - level.sparsity()) * DENSITY_SCALE).round() as u64 * (rows * cols) as u64,
    }
}

impl CostTable {
    /// Builds the table for `units` over the linears `shapes` and checks, before any work starts, that the target is
    /// a number inside the range the ladder reaches and that the ladder's levels differ in cost.
    /// `other_params` are the weights outside the linears (bytes budget only); `dense_bits` the float width.
    pub fn new(
        units: &[Unit],
        shapes: &[(String, usize, usize)],
        ladder: &Ladder,
        budget: &Budget,
        other_params: u64,
        dense_bits: f64,
    ) -> Result<Self> {
        let costs: Vec<Vec<u64>> = units
            .iter()
            .map(|u| {
                ladder
                    .levels
                    .iter()
                    .map(|lv| u.linears.iter().map(|&i| cost_of(budget, lv, shapes[i].1, shapes[i].2, dense_bits)).sum())
                    .collect()
            })
            .collect();
        for (u, row) in units.iter().zip(&costs) {
            if let Some(j) = (1..row.len()).find(|&j| row[j] <= row[j - 1]) {
                return Err(WhittleError::Invalid(format!(
                    "levels {} and {} cost the same under a {} budget on {} (unstructured zeros are stored, so \
                     sparsity levels need --target-sparsity; quantization levels need a bits or bytes budget)",
                    ladder.levels[j - 1].label,
                    ladder.levels[j].label,
                    budget.unit(),
                    u.name
                )));
            }
        }
        let params: u64 = units.iter().map(|u| u.params).sum();
        if params == 0 {
            return Err(WhittleError::Invalid("the model has no linear weights to search over".into()));
        }
        let other_bits = (other_params as f64 * dense_bits).round() as u64;
        let target = match *budget {
            Budget::AvgBits { bits, .. } => {
                if !(bits.is_finite() && bits > 0.0) {
                    return Err(WhittleError::Invalid(format!("target bits must be a positive number, found {bits}")));
                }
                (bits * params as f64 + 1e-6).floor() as u64
            }
            Budget::TotalBytes { bytes } => (bytes.saturating_mul(8)).saturating_sub(other_bits),
            Budget::AvgSparsity { sparsity } => {
                if !(sparsity.is_finite() && (0.0..1.0).contains(&sparsity)) {
                    return Err(WhittleError::Invalid(format!("target sparsity must be in [0, 1), found {sparsity}")));
                }
                ((1.0 - sparsity) * DENSITY_SCALE * params as f64 + 1e-6).floor() as u64
            }
        };
        let table = CostTable { budget: budget.clone(), costs, target, params, other_bits };
        let (lo, hi) = (table.uniform_cost(0), table.uniform_cost(ladder.len() - 1));
        let (a, b) = (table.measure(lo), table.measure(hi));
        let (a, b) = if a <= b { (a, b) } else { (b, a) };
        let t = budget.target();
        let outside = t < a - 1e-9 * a.abs().max(1.0) || t > b + 1e-9 * b.abs().max(1.0) || target < lo;
        if outside {
            return Err(WhittleError::Invalid(format!(
                "target {} {} is outside what the ladder {} reaches on this model: {} … {} {} \
                 (uniform {} … uniform {})",
                fmt_measure(budget.target(), budget),
                budget.unit(),
                ladder.labels().join(","),
                fmt_measure(a, budget),
                fmt_measure(b, budget),
                budget.unit(),
                ladder.levels[0].label,
                ladder.levels[ladder.len() - 1].label,
            )));
        }
        Ok(table)
    }

    pub fn units(&self) -> usize {
        self.costs.len()
    }

    pub fn levels(&self) -> usize {
        self.costs.first().map_or(0, Vec::len)
    }

    /// Total cost of an assignment (level index per unit).
    pub fn cost(&self, assign: &[usize]) -> u64 {
        assign.iter().zip(&self.costs).map(|(&l, c)| c[l]).sum()
    }

    fn uniform_cost(&self, level: usize) -> u64 {
        self.costs.iter().map(|c| c[level]).sum()
    }

    /// A total cost in the budget's measure: average bits, model bytes, or average sparsity.
    pub fn measure(&self, cost: u64) -> f64 {
        match self.budget {
            Budget::AvgBits { .. } => cost as f64 / self.params as f64,
            Budget::TotalBytes { .. } => ((cost + self.other_bits) as f64 / 8.0).ceil(),
            Budget::AvgSparsity { .. } => 1.0 - cost as f64 / (DENSITY_SCALE * self.params as f64),
        }
    }

    /// The measure of an assignment.
    pub fn measure_of(&self, assign: &[usize]) -> f64 {
        self.measure(self.cost(assign))
    }

    /// The largest one-level step of any unit, in the budget's measure: how close to the target an assignment of
    /// discrete levels can be guaranteed to get.
    pub fn granularity(&self) -> f64 {
        let step = self.costs.iter().flat_map(|c| c.windows(2).map(|w| w[1] - w[0])).max().unwrap_or(0);
        match self.budget {
            Budget::AvgBits { .. } => step as f64 / self.params as f64,
            Budget::TotalBytes { .. } => step as f64 / 8.0,
            Budget::AvgSparsity { .. } => step as f64 / (DENSITY_SCALE * self.params as f64),
        }
    }

    /// The most uniform assignment that fits: every unit at the highest level whose uniform cost fits, then units
    /// raised one level (larger steps first, then model order) while the total still fits. What is left of the
    /// budget is smaller than the step of every unit not raised.
    pub fn near_uniform(&self) -> Vec<usize> {
        let top = self.levels() - 1;
        let base = (0..=top).rev().find(|&l| self.uniform_cost(l) <= self.target).unwrap_or(0);
        let mut assign = vec![base; self.units()];
        if base == top {
            return assign;
        }
        let mut order: Vec<usize> = (0..self.units()).collect();
        order.sort_by_key(|&u| std::cmp::Reverse(self.costs[u][base + 1] - self.costs[u][base]));
        let mut total = self.cost(&assign);
        for u in order {
            let step = self.costs[u][base + 1] - self.costs[u][base];
            if total + step <= self.target {
                assign[u] = base + 1;
                total += step;
            }
        }
        assign
    }

    /// Checks an assignment given by the user (a start plan): right length, levels in range, within the budget.
    pub fn check(&self, assign: &[usize], origin: &str) -> Result<()> {
        if assign.len() != self.units() || assign.iter().any(|&l| l >= self.levels()) {
            return Err(WhittleError::Invalid(format!("{origin}: the assignment does not fit the ladder and units")));
        }
        let cost = self.cost(assign);
        if cost > self.target {
            return Err(WhittleError::Invalid(format!(
                "{origin} uses {} {}, over the target {}",
                fmt_measure(self.measure(cost), &self.budget),
                self.budget.unit(),
                fmt_measure(self.budget.target(), &self.budget)
            )));
        }
        Ok(())
    }
}

/// A measure with the precision its unit deserves.
pub fn fmt_measure(v: f64, budget: &Budget) -> String {
    match budget {
        Budget::AvgBits { .. } => format!("{v:.4}"),
        Budget::TotalBytes { .. } => format!("{v:.0}"),
        Budget::AvgSparsity { .. } => format!("{v:.4}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Model, LINEAR_KINDS};
    use crate::search::ladder::GridArgs;
    use crate::search::units::{build_units, Granularity};

    /// The stories260k linears (5 blocks).
    pub fn shapes() -> Vec<(String, usize, usize)> {
        let dims = [(64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)];
        (0..5)
            .flat_map(|l| LINEAR_KINDS.iter().zip(dims).map(move |(k, (r, c))| (Model::module_name(l, k), r, c)))
            .collect()
    }

    pub fn table(spec: &str, budget: Budget) -> Result<CostTable> {
        let ladder = Ladder::parse(spec, &GridArgs { group: Some(32), ..Default::default() }).unwrap();
        let s = shapes();
        CostTable::new(&build_units(&s, Granularity::Linear), &s, &ladder, &budget, 0, 32.0)
    }

    fn bits(b: f64) -> Budget {
        Budget::AvgBits { bits: b, accounting: Accounting::Code }
    }

    #[test]
    fn code_bits_cost_is_bits_times_params() {
        let t = table("gptq:2,3,4,5,6", bits(3.0)).unwrap();
        assert_eq!(t.params, 226_560);
        assert_eq!(t.costs[0], vec![2 * 4096, 3 * 4096, 4 * 4096, 5 * 4096, 6 * 4096]);
        assert_eq!(t.target, 3 * 226_560);
        let start = t.near_uniform();
        assert!(start.iter().all(|&l| l == 1), "uniform 3 bits fits exactly: {start:?}");
        assert_eq!(t.measure_of(&start), 3.0);
    }

    #[test]
    fn stored_bits_match_plan_resolve() {
        let t = table("gptq:2,3,4", Budget::AvgBits { bits: 3.6, accounting: Accounting::Stored }).unwrap();
        let plan = crate::plan::Plan::from_toml_str(
            "[[rules]]\nmodules = \"*\"\nbits = 3\ngroup = 32\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        let r = plan.resolve(&shapes(), 0, 32.0).unwrap();
        assert!((t.measure_of(&vec![1; 35]) - r.avg_bits).abs() < 1e-12, "{} vs {}", t.measure_of(&vec![1; 35]), r.avg_bits);
    }

    #[test]
    fn near_uniform_fills_within_one_step() {
        for target in [2.2, 2.5, 3.3, 4.75, 5.99] {
            let t = table("gptq:2,3,4,5,6", bits(target)).unwrap();
            let a = t.near_uniform();
            let m = t.measure_of(&a);
            assert!(m <= target + 1e-12 && target - m < t.granularity(), "{target}: {m}");
            let lo = a.iter().min().unwrap();
            assert!(a.iter().all(|l| l - lo <= 1), "{a:?}");
        }
    }

    #[test]
    fn impossible_targets_name_the_range() {
        for target in [1.5, 6.5] {
            let err = table("gptq:2,3,4,5,6", bits(target)).unwrap_err().to_string();
            assert!(err.contains("2.0000 … 6.0000"), "{err}");
        }
        let err = table("sparsegpt:0,10,20,30", Budget::AvgSparsity { sparsity: 0.5 }).unwrap_err().to_string();
        assert!(err.contains("0.0000 … 0.3000"), "{err}");
        let err = table("sparsegpt:0,10,20", bits(20.0)).unwrap_err().to_string();
        assert!(err.contains("cost the same"), "{err}");
        assert!(table("gptq:2,3", bits(f64::NAN)).is_err());
        assert!(table("gptq:2,3", bits(2.0)).is_ok());
        assert!(table("gptq:2,3", bits(3.0)).is_ok());
    }

    #[test]
    fn sparsity_budget_counts_kept_fraction() {
        let t = table("sparsegpt:0,10,20,30,40,50,60,70", Budget::AvgSparsity { sparsity: 0.5 }).unwrap();
        let a = t.near_uniform();
        assert!(a.iter().all(|&l| l == 2), "{a:?}"); // s70, s60, s50 → index 2
        assert!((t.measure_of(&a) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn bytes_budget_includes_other_parameters() {
        let ladder = Ladder::parse("gptq:2,3,4", &GridArgs { group: Some(32), ..Default::default() }).unwrap();
        let s = shapes();
        let units = build_units(&s, Granularity::Linear);
        let w3 = crate::plan::Plan::from_toml_str("[[rules]]\nmodules = \"*\"\nbits = 3\ngroup = 32\n", std::path::Path::new("t"))
            .unwrap()
            .resolve(&s, 1000, 32.0)
            .unwrap();
        let t = CostTable::new(&units, &s, &ladder, &Budget::TotalBytes { bytes: w3.size_bytes }, 1000, 32.0).unwrap();
        let a = t.near_uniform();
        assert!(a.iter().all(|&l| l == 1), "{a:?}");
        assert!((t.measure_of(&a) - w3.size_bytes as f64).abs() <= 1.0);
        assert!(CostTable::new(&units, &s, &ladder, &Budget::TotalBytes { bytes: 10 }, 1000, 32.0).is_err());
    }
}
