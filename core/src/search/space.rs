//! The search space of one run: the model's linears, the units, the ladder and the exact cost table, plus the
//! translations between a level assignment and the outside world: a [`Plan`] (one rule per linear, which
//! `whittle eval/compress/export --plan` accept) and back (a start plan), and the scores shown to the user.
//! It is built, and every budget problem reported, before any calibration work starts.

use super::budget::{Budget, CostTable};
use super::ladder::Ladder;
use super::mutation::can_move;
use super::units::{build_units, Granularity, Unit};
use crate::error::{Result, WhittleError};
use crate::model::Model;
use crate::plan::{Plan, ResolvedPlan};
use whittle_kernels::DType;

#[derive(Clone, Debug)]
pub struct SearchSpace {
    /// The model's linears `(name, rows, cols)` in model order.
    pub shapes: Vec<(String, usize, usize)>,
    pub units: Vec<Unit>,
    pub ladder: Ladder,
    pub costs: CostTable,
    /// The near-uniform assignment, or the start plan's.
    pub start: Vec<usize>,
    /// Float width of the model's weights (bits), for dense levels and the bytes budget.
    pub dense_bits: f64,
    /// Parameters outside the linears.
    pub other_params: u64,
}

/// Bits of a model's float weights.
pub fn dense_bits(model: &Model) -> f64 {
    match model.embed.dtype {
        DType::F32 => 32.0,
        _ => 16.0,
    }
}

impl SearchSpace {
    /// Checks the budget against the ladder on this model and picks the start: `start` (a plan whose every linear
    /// sits on a ladder level) or the near-uniform assignment.
    pub fn new(model: &Model, ladder: Ladder, granularity: Granularity, budget: &Budget, start: Option<&Plan>) -> Result<Self> {
        let shapes = model.linear_shapes();
        let linear_params: usize = shapes.iter().map(|(_, r, c)| r * c).sum();
        let other_params = model.config.parameter_count().saturating_sub(linear_params) as u64;
        let dense_bits = dense_bits(model);
        let units = build_units(&shapes, granularity);
        let costs = CostTable::new(&units, &shapes, &ladder, budget, other_params, dense_bits)?;
        let mut space =
            SearchSpace { shapes, units, ladder, start: Vec::new(), costs, dense_bits, other_params };
        space.start = match start {
            Some(plan) => {
                let a = space.assignment_of(plan)?;
                let origin = format!("start plan{}", plan.name.as_deref().map(|n| format!(" `{n}`")).unwrap_or_default());
                space.costs.check(&a, &origin)?;
                let gap = space.costs.budget.target() - space.costs.measure_of(&a);
                if gap.abs() > space.costs.granularity() {
                    return Err(WhittleError::Invalid(format!(
                        "{origin} is at {:.4} {}, more than one level step ({:.4}) from the target {}; \
                         the search keeps the start's budget, so start from a plan near the target",
                        space.costs.measure_of(&a),
                        budget.unit(),
                        space.costs.granularity(),
                        budget.target()
                    )));
                }
                a
            }
            None => space.costs.near_uniform(),
        };
        if !can_move(&space.start, &space.costs) {
            return Err(WhittleError::Invalid(format!(
                "no level swap keeps the budget from the start (every unit at {} with nothing to trade against): \
                 pick a target strictly inside the ladder's range",
                space.ladder.levels[space.start[0]].label
            )));
        }
        Ok(space)
    }

    /// The level of every linear under a unit assignment.
    pub fn linear_levels(&self, assign: &[usize]) -> Vec<usize> {
        let mut out = vec![0; self.shapes.len()];
        for (u, &l) in self.units.iter().zip(assign) {
            for &i in &u.linears {
                out[i] = l;
            }
        }
        out
    }

    /// The level of every unit under `plan` (resolved on this model); every linear of a unit must use one and the
    /// same ladder level.
    pub fn assignment_of(&self, plan: &Plan) -> Result<Vec<usize>> {
        let resolved = plan.resolve(&self.shapes, self.other_params, self.dense_bits)?;
        self.units
            .iter()
            .map(|u| {
                let mut level = None;
                for &i in &u.linears {
                    let m = &resolved.modules[i];
                    let l = self.ladder.levels.iter().position(|lv| lv.job == m.job).ok_or_else(|| {
                        WhittleError::Invalid(format!(
                            "start plan: {} is not compressed at any level of the ladder {}",
                            m.name,
                            self.ladder.labels().join(",")
                        ))
                    })?;
                    if level.is_some_and(|p| p != l) {
                        return Err(WhittleError::Invalid(format!(
                            "start plan: the linears of {} use different levels, but the search gives a unit one level",
                            u.name
                        )));
                    }
                    level = Some(l);
                }
                level.ok_or_else(|| WhittleError::Invalid(format!("unit {} has no linear", u.name)))
            })
            .collect()
    }

    /// The plan of an assignment: one rule per linear with every field of its level set.
    pub fn plan(&self, assign: &[usize], name: &str, description: &str) -> Plan {
        let mut rules = Vec::with_capacity(self.shapes.len());
        for (u, &level) in self.units.iter().zip(assign) {
            for &i in &u.linears {
                rules.push(self.ladder.levels[level].rule(&self.shapes[i].0));
            }
        }
        Plan { name: Some(name.to_string()), description: Some(description.to_string()), rules, ..Default::default() }
    }

    /// The plan resolved on this model (for its stored `avg_bits` and size).
    pub fn resolve(&self, plan: &Plan) -> Result<ResolvedPlan> {
        plan.resolve(&self.shapes, self.other_params, self.dense_bits)
    }

    /// Average code bits of an assignment (levels without quantization count the float width).
    pub fn code_bits(&self, assign: &[usize]) -> f64 {
        let mut bits = 0.0;
        let mut params = 0.0;
        for (u, &level) in self.units.iter().zip(assign) {
            let b = self.ladder.levels[level].bits().map_or(self.dense_bits, f64::from);
            bits += b * u.params as f64;
            params += u.params as f64;
        }
        bits / params
    }

    /// Parameter-weighted nominal sparsity of an assignment.
    pub fn sparsity(&self, assign: &[usize]) -> f64 {
        let total: u64 = self.units.iter().map(|u| u.params).sum();
        self.units.iter().zip(assign).map(|(u, &l)| self.ladder.levels[l].sparsity() * u.params as f64).sum::<f64>()
            / total as f64
    }

    /// Σ relative error of the linears at their levels (the DP objective), from `rel_errors[linear][level]`.
    pub fn layer_error(&self, assign: &[usize], rel_errors: &[Vec<f64>]) -> f64 {
        self.unit_errors(rel_errors).iter().zip(assign).map(|(e, &l)| e[l]).sum()
    }

    /// Per-unit errors `[unit][level]`: the sum over the unit's linears.
    pub fn unit_errors(&self, rel_errors: &[Vec<f64>]) -> Vec<Vec<f64>> {
        self.units
            .iter()
            .map(|u| (0..self.ladder.len()).map(|l| u.linears.iter().map(|&i| rel_errors[i][l]).sum()).collect())
            .collect()
    }

    /// The level label of every unit, `unit name → label`, for tables.
    pub fn labels(&self, assign: &[usize]) -> Vec<(String, String)> {
        self.units.iter().zip(assign).map(|(u, &l)| (u.name.clone(), self.ladder.levels[l].label.clone())).collect()
    }
}
