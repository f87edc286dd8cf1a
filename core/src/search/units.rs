//! Search units: what gets one level. Either every linear on its own (finest control, the EvoPress quantization
//! setting) or a whole decoder block (all seven linears at the same level; a smaller search space that converges
//! faster on deep models). A unit is a list of linear indices into the model's `linear_shapes()`.

use crate::model::LINEAR_KINDS;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One level per linear module.
    #[default]
    Linear,
    /// One level per decoder block.
    Block,
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Granularity::Linear),
            "block" => Ok(Granularity::Block),
            _ => Err(format!("unit `{s}`: expected `linear` or `block`")),
        }
    }
}

/// One unit of the search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    /// The module name (`model.layers.3.mlp.up_proj`) or the block prefix (`model.layers.3`).
    pub name: String,
    /// Indices into the model's linear list.
    pub linears: Vec<usize>,
    /// Weights in this unit.
    pub params: u64,
}

/// Builds the units over `shapes` (`(name, rows, cols)` in model order, seven linears per block as
/// `Model::linear_shapes` lists them).
pub fn build_units(shapes: &[(String, usize, usize)], granularity: Granularity) -> Vec<Unit> {
    let params = |i: usize| (shapes[i].1 * shapes[i].2) as u64;
    match granularity {
        Granularity::Linear => shapes
            .iter()
            .enumerate()
            .map(|(i, (name, _, _))| Unit { name: name.clone(), linears: vec![i], params: params(i) })
            .collect(),
        Granularity::Block => (0..shapes.len())
            .collect::<Vec<_>>()
            .chunks(LINEAR_KINDS.len())
            .enumerate()
            .map(|(b, idx)| Unit {
                name: format!("model.layers.{b}"),
                linears: idx.to_vec(),
                params: idx.iter().map(|&i| params(i)).sum(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    fn shapes(blocks: usize) -> Vec<(String, usize, usize)> {
        let dims = [(64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)];
        (0..blocks)
            .flat_map(|l| LINEAR_KINDS.iter().zip(dims).map(move |(k, (r, c))| (Model::module_name(l, k), r, c)))
            .collect()
    }

    #[test]
    fn linear_units_are_one_per_module() {
        let u = build_units(&shapes(2), Granularity::Linear);
        assert_eq!(u.len(), 14);
        assert_eq!(u[13].name, "model.layers.1.mlp.down_proj");
        assert_eq!((u[13].linears.clone(), u[13].params), (vec![13], 64 * 172));
    }

    #[test]
    fn block_units_group_seven_linears() {
        let u = build_units(&shapes(3), Granularity::Block);
        assert_eq!(u.len(), 3);
        assert_eq!(u[2].name, "model.layers.2");
        assert_eq!(u[2].linears, (14..21).collect::<Vec<_>>());
        assert_eq!(u[0].params, 45_312);
        assert_eq!("block".parse::<Granularity>(), Ok(Granularity::Block));
        assert!("layer".parse::<Granularity>().is_err());
    }
}
