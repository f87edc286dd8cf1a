//! The dynamic-programming baseline (algorithms.md §7): choose one level per unit minimizing the *sum* of per-unit
//! errors subject to the budget, a multiple-choice knapsack over units and budget steps. It is optimal for its
//! objective; EvoPress's point is that the objective is wrong (per-layer errors do not add up to the model's loss),
//! and the search shows by how much.
//!
//! Costs are the cost table's exact integers, shifted by each unit's cheapest level and divided by their greatest
//! common divisor, so the table usually stays small and exact. When it would not (huge models under stored-bits
//! accounting), costs are rounded *up* onto a coarser grid, which keeps the result within budget and is reported.

use super::budget::CostTable;
use crate::error::{Result, WhittleError};

/// Most table cells (units × budget steps) before the costs are coarsened.
const MAX_CELLS: usize = 40_000_000;

/// The DP's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct DpAllocation {
    /// Level per unit.
    pub assign: Vec<usize>,
    /// Σ per-unit error of `assign`.
    pub error: f64,
    /// True when costs had to be coarsened (the allocation is then feasible but possibly not optimal).
    pub coarsened: bool,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Minimizes Σ `errors[unit][level]` subject to the cost table's budget.
pub fn dp_allocation(costs: &CostTable, errors: &[Vec<f64>]) -> Result<DpAllocation> {
    dp_with_limit(costs, errors, MAX_CELLS)
}

fn dp_with_limit(costs: &CostTable, errors: &[Vec<f64>], max_cells: usize) -> Result<DpAllocation> {
    let (n, levels) = (costs.units(), costs.levels());
    if errors.len() != n || errors.iter().any(|e| e.len() != levels) {
        return Err(WhittleError::Invalid(format!(
            "DP: {} error rows for {n} units of {levels} levels",
            errors.len()
        )));
    }
    if let Some((u, l)) = (0..n).flat_map(|u| (0..levels).map(move |l| (u, l))).find(|&(u, l)| !errors[u][l].is_finite()) {
        return Err(WhittleError::Invalid(format!("DP: error of unit {u} at level {l} is {}", errors[u][l])));
    }
    let base: u64 = costs.costs.iter().map(|c| c[0]).sum();
    let slack = costs.target.checked_sub(base).ok_or_else(|| {
        WhittleError::Invalid("DP: the budget is below the cheapest level of every unit".into())
    })?;
    let extra: Vec<Vec<u64>> = costs.costs.iter().map(|c| c.iter().map(|&x| x - c[0]).collect()).collect();
    let mut step = extra.iter().flatten().fold(0, |g, &x| gcd(g, x)).max(1);
    let mut coarsened = false;
    let max_steps = (max_cells / n.max(1)).max(1) as u64;
    if slack / step > max_steps {
        step = slack.div_ceil(max_steps);
        coarsened = true;
    }
    let cap = (slack / step) as usize;
    // Rounding costs up keeps every allocation the DP accepts within the true budget.
    let w: Vec<Vec<usize>> = extra.iter().map(|e| e.iter().map(|&x| x.div_ceil(step) as usize).collect()).collect();

    // best[s]: least error of the units so far using at most s steps; choice[u][s]: the level unit u took there.
    let mut best = vec![0f64; cap + 1];
    let mut choice = vec![vec![0u16; cap + 1]; n];
    let mut next = vec![f64::INFINITY; cap + 1];
    for u in 0..n {
        next.fill(f64::INFINITY);
        for s in 0..=cap {
            for l in 0..levels {
                if w[u][l] <= s {
                    let v = best[s - w[u][l]] + errors[u][l];
                    if v < next[s] {
                        next[s] = v;
                        choice[u][s] = l as u16;
                    }
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
    }
    let mut assign = vec![0; n];
    let mut s = cap;
    for u in (0..n).rev() {
        let l = choice[u][s] as usize;
        assign[u] = l;
        s -= w[u][l];
    }
    Ok(DpAllocation { error: (0..n).map(|u| errors[u][assign[u]]).sum(), assign, coarsened })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::budget::{Accounting, Budget};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn instance(seed: u64, units: usize, levels: usize) -> (CostTable, Vec<Vec<f64>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut costs = Vec::new();
        let mut errors = Vec::new();
        for _ in 0..units {
            let mut c = rng.random_range(1..20u64);
            let mut e = rng.random_range(1.0..5.0f64);
            let (mut cr, mut er) = (Vec::new(), Vec::new());
            for _ in 0..levels {
                cr.push(c);
                er.push(e);
                c += rng.random_range(1..15u64);
                // Not monotone on purpose: the DP must not assume more budget always helps.
                e = (e * rng.random_range(0.3..1.1)).max(0.0);
            }
            costs.push(cr);
            errors.push(er);
        }
        let lo: u64 = costs.iter().map(|c| c[0]).sum();
        let hi: u64 = costs.iter().map(|c| c[levels - 1]).sum();
        let target = rng.random_range(lo..=hi);
        let budget = Budget::AvgBits { bits: 1.0, accounting: Accounting::Code };
        (CostTable { budget, costs, target, params: 1, other_bits: 0 }, errors)
    }

    fn brute_force(t: &CostTable, errors: &[Vec<f64>]) -> f64 {
        let (n, levels) = (t.units(), t.levels());
        let mut best = f64::INFINITY;
        let mut a = vec![0usize; n];
        loop {
            if t.cost(&a) <= t.target {
                best = best.min((0..n).map(|u| errors[u][a[u]]).sum());
            }
            let mut i = 0;
            while i < n {
                a[i] += 1;
                if a[i] < levels {
                    break;
                }
                a[i] = 0;
                i += 1;
            }
            if i == n {
                return best;
            }
        }
    }

    #[test]
    fn dp_matches_brute_force_on_small_instances() {
        for seed in 0..60 {
            let (t, e) = instance(seed, 5, 4);
            let dp = dp_allocation(&t, &e).unwrap();
            assert!(!dp.coarsened);
            assert!(t.cost(&dp.assign) <= t.target, "seed {seed}: over budget");
            let bf = brute_force(&t, &e);
            assert!((dp.error - bf).abs() < 1e-9, "seed {seed}: dp {} vs brute force {bf}", dp.error);
        }
    }

    #[test]
    fn coarsened_dp_stays_within_budget() {
        let mut coarsened = 0;
        for seed in 0..20 {
            let (t, e) = instance(seed, 6, 5);
            let dp = dp_with_limit(&t, &e, 6 * 8).unwrap();
            assert!(t.cost(&dp.assign) <= t.target, "seed {seed}");
            assert!(dp.error >= brute_force(&t, &e) - 1e-9);
            coarsened += usize::from(dp.coarsened);
        }
        assert!(coarsened > 10, "the small cell limit should force coarsening ({coarsened})");
    }

    #[test]
    fn dp_rejects_bad_errors() {
        let (t, mut e) = instance(1, 3, 3);
        e[1][2] = f64::NAN;
        assert!(dp_allocation(&t, &e).is_err());
        assert!(dp_allocation(&t, &e[..2]).is_err());
    }
}
