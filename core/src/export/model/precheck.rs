//! Checking a plan against an export format before compressing, so a plan the format cannot hold (3 bits for a
//! format without them, a group size that does not divide in_features where the format needs it) is refused in
//! a second instead of after a long compression. Each planned quantized layer is checked as a stand-in layer with
//! the planned bits, group size and symmetry by the same per-layer checks the export runs; what only the
//! compressed values decide (zero points, scale precision) is left to [`super::export_model`].

use super::super::{check_gptq, check_pack_quantized, ExportError};
use super::ModelFormat;
use crate::compress::types::QuantizedLinear;
use crate::compress::Sparsity;
use crate::error::Result;
use crate::model::LoadedModel;
use crate::plan::ResolvedPlan;

/// A layer with the planned settings and neutral values (zero codes, symmetric zero points, unit scales).
fn stand_in(rows: usize, cols: usize, spec: &crate::compress::QuantSpec, masked: bool) -> QuantizedLinear {
    let group_size = spec.group_size(cols);
    let ng = cols.div_ceil(group_size);
    let mid = 1u8 << (spec.bits.clamp(1, 8) - 1);
    QuantizedLinear {
        rows,
        cols,
        bits: spec.bits,
        group_size,
        sym: spec.sym,
        codes: vec![mid; rows * cols],
        scales: vec![1.0; rows * ng],
        zeros: vec![mid; rows * ng],
        g_idx: (spec.act_order && !spec.static_groups).then(|| (0..cols).map(|i| (i / group_size) as u32).collect()),
        mask: masked.then(|| vec![true; rows * cols]),
    }
}

/// Refuses `plan` for `format` when some planned layer cannot be stored in it, naming every such layer.
pub fn check_plan(loaded: &LoadedModel, plan: &ResolvedPlan, format: ModelFormat) -> Result<()> {
    let dtype = super::layers::model_dtype(loaded);
    let mut errors = Vec::new();
    let (mut quantized, mut sparse_24) = (0usize, 0usize);
    for m in &plan.modules {
        let Some(job) = &m.job else { continue };
        let nm_24 = matches!(job.sparsity, Some(Sparsity::NM { n: 2, m: 4 }));
        let Some(spec) = &job.quant else {
            sparse_24 += usize::from(nm_24);
            continue;
        };
        quantized += 1;
        let q = stand_in(m.rows, m.cols, spec, job.sparsity.is_some());
        let checked = match format {
            ModelFormat::Gptq => check_gptq(&m.name, &q),
            ModelFormat::CompressedTensors => check_pack_quantized(&m.name, &q, dtype),
            ModelFormat::F16 | ModelFormat::Bf16 => Ok(()),
        };
        if let Err(e) = checked {
            errors.push(e);
        }
    }
    let nothing = match format {
        ModelFormat::Gptq => quantized == 0,
        ModelFormat::CompressedTensors => quantized == 0 && sparse_24 == 0,
        ModelFormat::F16 | ModelFormat::Bf16 => false,
    };
    if nothing && errors.is_empty() {
        errors.push(ExportError::layer(
            "(plan)",
            format!(
                "quantizes no layer{}, so there is nothing for {format} to store; export it as f16 or bf16",
                if format == ModelFormat::CompressedTensors { " and makes none 2:4 sparse" } else { "" }
            ),
        ));
    }
    ExportError::collect(errors).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::load_model;
    use crate::plan::Plan;
    use std::path::Path;

    fn resolve(toml: &str) -> (LoadedModel, ResolvedPlan) {
        let m = load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/stories260k")).unwrap();
        let plan = Plan::from_toml_str(toml, Path::new("t")).unwrap();
        let r = plan.resolve(&m.model.linear_shapes(), 0, 32.0).unwrap();
        (m, r)
    }

    #[test]
    fn ragged_groups_and_missing_bit_widths_are_refused_per_format() {
        let (m, p) = resolve("[[rules]]\nmodules = \"*\"\nmethod = \"gptq\"\nbits = 4\ngroup = 32\n");
        assert!(check_plan(&m, &p, ModelFormat::Gptq).is_ok());
        let err = check_plan(&m, &p, ModelFormat::CompressedTensors).unwrap_err().to_string();
        assert!(err.contains("model.layers.0.mlp.down_proj: group size 32 does not divide in_features 172"), "{err}");
        assert!(!err.contains("q_proj"), "{err}");
        let (m, p) = resolve("[[rules]]\nmodules = \"*\"\nmethod = \"rtn\"\nbits = 5\ngroup = -1\n");
        assert!(check_plan(&m, &p, ModelFormat::Gptq).unwrap_err().to_string().contains("5 bits"));
        assert!(check_plan(&m, &p, ModelFormat::CompressedTensors).is_ok());
        assert!(check_plan(&m, &p, ModelFormat::F16).is_ok());
    }

    #[test]
    fn sparse_only_plans_fit_compressed_tensors_but_not_gptq() {
        let (m, p) = resolve("[[rules]]\nmodules = \"*\"\nmethod = \"sparsegpt\"\nnm = \"2:4\"\n");
        assert!(check_plan(&m, &p, ModelFormat::CompressedTensors).is_ok());
        let err = check_plan(&m, &p, ModelFormat::Gptq).unwrap_err().to_string();
        assert!(err.contains("quantizes no layer"), "{err}");
        let (m, p) = resolve("[[rules]]\nmodules = \"*\"\nmethod = \"sparsegpt\"\nsparsity = 0.5\n");
        assert!(check_plan(&m, &p, ModelFormat::CompressedTensors).is_err());
    }
}
