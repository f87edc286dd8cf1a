//! Export round trips (issue 6 acceptance): compress the default model in memory, measure its perplexity, export it
//! (GPTQ, compressed-tensors, f16, bf16), reopen the folder with the ordinary loader and measure again. The two must
//! agree within 1e-4 relative for 2/3/4/8 bits, sym/asym, act-order, mixed bits, dense layers, 2:4 and 2:4 + int4,
//! and the reopened layers must decode to exactly the in-memory weights. Bad input (existing folder, a plan the
//! format cannot hold) must fail before anything is written. The CLI is exercised end to end as well.
//!
//! Compression is kept cheap (8 calibration windows of 128 tokens) and perplexity uses 2048 tokens.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use whittle_core::calib::{calibration_windows, CalibSettings};
use whittle_core::compress::types::QuantizedLinear;
use whittle_core::compress_model::compress_model;
use whittle_core::eval::{evaluate, windows};
use whittle_core::export::{export_model, ExportOptions, ModelFormat};
use whittle_core::model::source::DEFAULT_CALIBRATION_TEXT;
use whittle_core::model::{load_model, LoadedModel, Model};
use whittle_core::plan::Plan;
use whittle_kernels::{DenseWeight, Weight};

const EVAL_TOKENS: usize = 2048;
const CTX: usize = 256;

fn eval_tokens() -> &'static [u32] {
    static TOKENS: OnceLock<Vec<u32>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let m = load_model(&default_model()).expect("default model");
        let text = std::fs::read_to_string(val_text()).expect("validation text");
        m.tokenizer.encode(&text).expect("tokenize")
    })
}

fn ppl(model: &Model) -> f64 {
    let wins = windows(eval_tokens(), CTX, Some(EVAL_TOKENS));
    assert_eq!(wins.len(), EVAL_TOKENS / CTX);
    evaluate(model, None, &wins, &|_, _| {}, &|| false).expect("evaluate").ppl
}

/// Loads the default model and compresses it in memory under `plan_toml`.
fn compress(plan_toml: &str) -> (LoadedModel, BTreeMap<String, QuantizedLinear>) {
    let mut m = load_model(&default_model()).expect("default model");
    let plan = Plan::from_toml_str(plan_toml, Path::new("(test plan)")).expect("plan parses");
    let linears = m.model.linear_shapes();
    let linear_params: usize = linears.iter().map(|(_, r, c)| r * c).sum();
    let other = m.model.config.parameter_count().saturating_sub(linear_params) as u64;
    let resolved = plan.resolve(&linears, other, 32.0).expect("plan resolves");
    let settings = CalibSettings { samples: 8, ctx: 128 };
    let calib = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &settings, "calib").expect("calib");
    let out = compress_model(&mut m.model, &resolved, &calib, &mut |_| {}, &|| false).expect("compress");
    (m, out.quantized)
}

/// GPTQ on every linear with `bits`/`group`/`sym`/`act_order`, down_proj per-channel (its 172 inputs take no
/// group size that compressed-tensors accepts except 2, 4, 43, 86).
fn quant_plan(bits: u8, group: i64, sym: bool, act_order: bool) -> String {
    format!(
        "[[rules]]\nmodules = \"*\"\nmethod = \"gptq\"\nbits = {bits}\ngroup = {group}\nsym = {sym}\n\
         act_order = {act_order}\n\n[[rules]]\nmodules = \"*.down_proj\"\ngroup = -1\n"
    )
}

fn rel(a: f64, b: f64) -> f64 {
    (a / b - 1.0).abs()
}

/// Exports the compressed model in each format, reopens it, and checks ppl and the decoded weights.
fn round_trip(tag: &str, plan_toml: &str, formats: &[ModelFormat]) {
    let (m, quantized) = compress(plan_toml);
    let want = ppl(&m.model);
    let root = tempfile::tempdir().unwrap();
    for &format in formats {
        let out = root.path().join(format.name());
        let mut opts = ExportOptions::new(format, &out);
        // Small shards so the sharded layout is exercised too.
        opts.max_shard_bytes = 300_000;
        let report = export_model(&m, &quantized, &opts, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{tag} {format}: export failed: {e}"));
        assert!(out.join("model.safetensors.index.json").exists(), "{tag} {format}: expected shards");
        assert!(report.bytes > 0 && report.bits_per_weight_estimate > 0.0);
        let back = load_model(&out).unwrap_or_else(|e| panic!("{tag} {format}: reopen failed: {e}"));
        let got = ppl(&back.model);
        eprintln!("{tag} {format}: in-memory ppl {want:.6}, reopened {got:.6}, rel {:.1e}", rel(got, want));
        assert!(rel(got, want) < 1e-4, "{tag} {format}: reopened ppl {got} vs in-memory {want}");
        for (name, q) in &quantized {
            let b = back.quantized.get(name).unwrap_or_else(|| panic!("{tag} {format}: {name} not reimported"));
            assert!(b.dequantize() == q.dequantize(), "{tag} {format}: {name} decodes differently");
        }
        assert_eq!(back.quantized.len(), quantized.len(), "{tag} {format}");
    }
}

fn both() -> [ModelFormat; 2] {
    [ModelFormat::Gptq, ModelFormat::CompressedTensors]
}

#[test]
fn two_bit_symmetric() {
    round_trip("w2g32 sym", &quant_plan(2, 32, true, false), &both());
}

#[test]
fn three_bit_asymmetric() {
    round_trip("w3g32 asym", &quant_plan(3, 32, false, false), &both());
}

#[test]
fn four_bit_act_order_sym_and_asym() {
    round_trip("w4g32 sym act-order", &quant_plan(4, 32, true, true), &both());
    round_trip("w4g32 asym act-order", &quant_plan(4, 32, false, true), &both());
    // Groups of 16 make an all-positive group (zero point 0 using the top code) likely, which GPTQ v1 cannot
    // store (see export::gptq); compressed-tensors can.
    round_trip("w4g16 asym act-order", &quant_plan(4, 16, false, true), &[ModelFormat::CompressedTensors]);
}

#[test]
fn eight_bit_per_channel_asymmetric() {
    round_trip("w8 asym", &quant_plan(8, -1, false, false), &both());
}

#[test]
fn gptq_pads_ragged_down_proj() {
    // Groups of 32 on down_proj's 172 inputs: GPTQ pads to 176 (compressed-tensors refuses, see below).
    let plan = "[[rules]]\nmodules = \"*\"\nmethod = \"gptq\"\nbits = 4\ngroup = 32\n";
    round_trip("w4g32 ragged", plan, &[ModelFormat::Gptq]);
}

#[test]
fn mixed_bits_and_a_dense_layer() {
    let plan = format!(
        "{}\n[[rules]]\nmodules = \"*.mlp.*\"\nbits = 8\n\n[[rules]]\nmodules = \"model.layers.0.self_attn.q_proj\"\n\
         keep_dense = true\n",
        quant_plan(4, 32, true, false)
    );
    round_trip("mixed", &plan, &both());
    // The configs say so: GPTQModel `dynamic` overrides, several compressed-tensors groups, the dense layer excluded.
    let (m, q) = compress(&plan);
    let root = tempfile::tempdir().unwrap();
    let gptq = root.path().join("gptq");
    export_model(&m, &q, &ExportOptions::new(ModelFormat::Gptq, &gptq), &mut |_, _| {}).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gptq.join("config.json")).unwrap()).unwrap();
    let dynamic = cfg["quantization_config"]["dynamic"].as_object().expect("dynamic overrides");
    assert!(dynamic.contains_key("-:^model\\.layers\\.0\\.self_attn\\.q_proj$"), "{dynamic:?}");
    assert!(dynamic.values().any(|v| v["bits"] == 8), "{dynamic:?}");
    let ct = root.path().join("ct");
    export_model(&m, &q, &ExportOptions::new(ModelFormat::CompressedTensors, &ct), &mut |_, _| {}).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ct.join("config.json")).unwrap()).unwrap();
    let qc = &cfg["quantization_config"];
    assert!(qc["config_groups"].as_object().unwrap().len() >= 2, "{qc}");
    assert!(qc["ignore"].as_array().unwrap().iter().any(|v| v == "model.layers.0.self_attn.q_proj"), "{qc}");
}

#[test]
fn two_four_sparse_as_bitmask_and_f16() {
    let plan = "[[rules]]\nmodules = \"*\"\nmethod = \"sparsegpt\"\nnm = \"2:4\"\n";
    round_trip("2:4", plan, &[ModelFormat::CompressedTensors]);
    let (m, q) = compress(plan);
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("ct");
    let report =
        export_model(&m, &q, &ExportOptions::new(ModelFormat::CompressedTensors, &out), &mut |_, _| {}).unwrap();
    assert_eq!(report.sparse24_layers, 35);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["sparsity_config"]["format"], "sparse-24-bitmask");
    // GPTQ holds no sparse-only model: refused before writing.
    let gptq = root.path().join("gptq");
    let err = export_model(&m, &q, &ExportOptions::new(ModelFormat::Gptq, &gptq), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("export it as a dense model"), "{err}");
    assert!(!gptq.exists());
}

#[test]
fn two_four_sparse_with_int4() {
    let plan = "[[rules]]\nmodules = \"*\"\nmethod = \"sparsegpt\"\nnm = \"2:4\"\nbits = 4\ngroup = -1\n";
    round_trip("2:4+int4", plan, &both());
    // compressed-tensors announces the 2:4 structure; the reopened layers run on the 2:4 kernel again.
    let (m, q) = compress(plan);
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("ct");
    export_model(&m, &q, &ExportOptions::new(ModelFormat::CompressedTensors, &out), &mut |_, _| {}).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["sparsity_config"]["sparsity_structure"], "2:4");
    let back = load_model(&out).unwrap();
    assert!(matches!(back.model.blocks[2].linears[6].weight, Weight::Sparse24(_)));
}

/// The in-memory model with every weight rounded to `round` (what a dense f16/bf16 checkpoint holds).
fn rounded(model: &Model, round: fn(f32) -> f32) -> Model {
    let mut m = model.clone();
    let dense = |w: &Weight| -> Weight {
        let Weight::Dense(d) = w else { panic!("in-memory compressed weights are dense") };
        Weight::Dense(DenseWeight::from_f32(d.rows, d.cols, d.to_f32_vec().into_iter().map(round).collect()))
    };
    for b in &mut m.blocks {
        for l in &mut b.linears {
            l.weight = dense(&l.weight);
        }
        b.attn_norm.iter_mut().for_each(|v| *v = round(*v));
        b.mlp_norm.iter_mut().for_each(|v| *v = round(*v));
    }
    m.norm.iter_mut().for_each(|v| *v = round(*v));
    m.lm_head.weight = dense(&m.lm_head.weight);
    let Weight::Dense(e) = dense(&Weight::Dense(m.embed.clone())) else { unreachable!() };
    m.embed = e;
    m
}

#[test]
fn f16_and_bf16_exports_of_original_and_compressed_models() {
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
    let original = load_model(&default_model()).unwrap();
    let (compressed, q) = compress(&quant_plan(4, 32, true, false));
    let root = tempfile::tempdir().unwrap();
    for (tag, m, q) in [("original", &original, BTreeMap::new()), ("w4g32", &compressed, q)] {
        for (format, round) in [(ModelFormat::F16, f16 as fn(f32) -> f32), (ModelFormat::Bf16, bf16)] {
            let want = ppl(&rounded(&m.model, round));
            let out = root.path().join(format!("{tag}-{format}"));
            let report = export_model(m, &q, &ExportOptions::new(format, &out), &mut |_, _| {}).unwrap();
            assert_eq!(report.quantized_layers, 0);
            let back = load_model(&out).unwrap();
            let got = ppl(&back.model);
            assert!(rel(got, want) < 1e-4, "{tag} {format}: reopened ppl {got} vs rounded in-memory {want}");
        }
    }
}

#[test]
fn imported_exports_re_export_in_another_format() {
    let (m, q) = compress(&quant_plan(4, 32, false, true));
    let want = ppl(&m.model);
    let root = tempfile::tempdir().unwrap();
    let gptq = root.path().join("gptq");
    export_model(&m, &q, &ExportOptions::new(ModelFormat::Gptq, &gptq), &mut |_, _| {}).unwrap();
    let imported = load_model(&gptq).unwrap();
    // No plan: the imported integer forms are exported as they are.
    let ct = root.path().join("ct");
    let opts = ExportOptions::new(ModelFormat::CompressedTensors, &ct);
    export_model(&imported, &imported.quantized, &opts, &mut |_, _| {}).unwrap();
    let again = load_model(&ct).unwrap();
    let got = ppl(&again.model);
    assert!(rel(got, want) < 1e-4, "gptq → compressed-tensors: {got} vs {want}");
    // And dequantized to f16 for tools that take no quantized checkpoints.
    let dense = root.path().join("f16");
    let r =
        export_model(&again, &again.quantized, &ExportOptions::new(ModelFormat::F16, &dense), &mut |_, _| {}).unwrap();
    assert_eq!(r.quantized_layers, 0);
    let cfg = std::fs::read_to_string(dense.join("config.json")).unwrap();
    assert!(!cfg.contains("quantization_config"), "a dense export must not keep the imported quantization_config");
    assert!(load_model(&dense).unwrap().quantized.is_empty());
}

/// Rewrites an exported folder the way another tool would have written it: `quantization_config` replaced, and
/// each tensor kept, changed or dropped by `edit`.
fn as_foreign(
    dir: &Path,
    qc: serde_json::Value,
    edit: impl Fn(&str, &safetensors::tensor::TensorView<'_>) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().filter_map(|(n, t)| edit(&n, &t).map(|(d, s, b)| (n, d, s, b))).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] = qc;
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
}

fn unchanged(_: &str, t: &safetensors::tensor::TensorView<'_>) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    Some((t.dtype(), t.shape().to_vec(), t.data().to_vec()))
}

#[test]
fn checkpoints_in_other_tools_conventions_import() {
    let root = tempfile::tempdir().unwrap();
    // AutoGPTQ style: a bare config without checkpoint_format or dynamic, and no g_idx tensors (no act-order).
    let (m, q) = compress("[[rules]]\nmodules = \"*\"\nmethod = \"gptq\"\nbits = 4\ngroup = 32\n");
    let want = ppl(&m.model);
    let gptq = root.path().join("autogptq");
    export_model(&m, &q, &ExportOptions::new(ModelFormat::Gptq, &gptq), &mut |_, _| {}).unwrap();
    as_foreign(
        &gptq,
        serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": false, "sym": true}),
        |n, t| if n.ends_with(".g_idx") { None } else { unchanged(n, t) },
    );
    let back = load_model(&gptq).unwrap();
    assert_eq!(back.quantized.len(), 35);
    let got = ppl(&back.model);
    assert!(rel(got, want) < 1e-4, "AutoGPTQ style: {got} vs {want}");

    // llm-compressor style: one group targeting the class name "Linear", shapes stored as I32.
    let (m, q) = compress(&quant_plan(8, -1, false, false));
    let want = ppl(&m.model);
    let ct = root.path().join("llmcompressor");
    export_model(&m, &q, &ExportOptions::new(ModelFormat::CompressedTensors, &ct), &mut |_, _| {}).unwrap();
    let qc = serde_json::json!({
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int",
            "symmetric": false, "strategy": "channel", "group_size": null, "dynamic": false, "actorder": null}}},
        "ignore": ["lm_head"]});
    as_foreign(&ct, qc, |n, t| {
        if n.ends_with(".weight_shape") {
            let v: Vec<u8> = t
                .data()
                .chunks_exact(8)
                .flat_map(|b| (i64::from_le_bytes(b.try_into().unwrap()) as i32).to_le_bytes())
                .collect();
            Some((safetensors::Dtype::I32, t.shape().to_vec(), v))
        } else {
            unchanged(n, t)
        }
    });
    let back = load_model(&ct).unwrap();
    assert_eq!(back.quantized.len(), 35);
    let got = ppl(&back.model);
    assert!(rel(got, want) < 1e-4, "llm-compressor style: {got} vs {want}");

    // A tensor that disagrees with the config is an error naming the file and the tensor.
    as_foreign(
        &ct,
        serde_json::json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
            "symmetric": false, "strategy": "channel"}}}, "ignore": ["lm_head"]}),
        unchanged,
    );
    let Err(err) = load_model(&ct) else { panic!("a 4-bit config over 8-bit tensors must not load") };
    let err = err.to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("model.layers.0.self_attn.q_proj.weight_packed"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------------------------
// The CLI

fn s(p: &Path) -> &str {
    path_str(p)
}

const CHEAP: [&str; 4] = ["--calib-samples", "8", "--calib-ctx", "128"];

#[test]
fn cli_export_measures_and_reopens_with_the_same_ppl() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("w4");
    let model = default_model();
    let val = val_text();
    let mut args = vec!["export", "--model", s(&model), "--method", "gptq", "--bits", "4", "--group", "32"];
    args.extend(CHEAP);
    args.extend(["--format", "gptq", "--out", s(&out), "--shard-size", "200KB", "--eval-data", s(&val)]);
    args.extend(["--eval-max-tokens", "2048", "--json"]);
    let v = whittle_json(&args);
    assert_eq!(v["out"].as_str(), Some(s(&out)));
    assert!(v["files"].as_array().unwrap().len() >= 8, "{v}");
    assert!(v["bytes"].as_u64().unwrap() > 100_000, "{v}");
    let bpw = v["bits_per_weight"].as_f64().unwrap();
    assert!((4.0..6.0).contains(&bpw), "{v}");
    assert!(v["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("padded to 176")), "{v}");
    assert!(v["seconds"].as_f64().is_some() && v["kl"].as_f64().unwrap() > 0.0, "{v}");
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(readme.contains("perplexity, this model") && readme.contains("bits = 4"), "{readme}");

    let e = whittle_json(&[
        "eval",
        "--model",
        s(&out),
        "--data",
        s(&val),
        "--ctx",
        "256",
        "--max-tokens",
        "2048",
        "--json",
    ]);
    let (a, b) = (e["ppl"].as_f64().unwrap(), v["ppl"].as_f64().unwrap());
    assert!(rel(a, b) < 1e-4, "reopened {a} vs exported-from-memory {b}");
}

#[test]
fn cli_refuses_an_existing_folder_without_force() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let model = default_model();
    let r = whittle(&["export", "--model", s(&model), "--format", "f16", "--out", s(&out)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("already exists") && r.stderr.contains("force"), "{}", r.stderr);
    let entries: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1, "no temp folder left beside it");

    let v = whittle_json(&["export", "--model", s(&model), "--format", "f16", "--out", s(&out), "--force", "--json"]);
    assert!(v["files"].as_array().unwrap().iter().any(|f| f.as_str().unwrap().ends_with("config.json")));
    assert!(!out.join("notes.txt").exists());
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
}

#[test]
fn cli_refuses_a_plan_the_format_cannot_hold_before_writing() {
    let root = tempfile::tempdir().unwrap();
    let model = default_model();
    // compressed-tensors needs the group size to divide in_features; down_proj has 172.
    let out = root.path().join("ct");
    let mut args = vec!["export", "--model", s(&model), "--method", "gptq", "--bits", "4", "--group", "32"];
    args.extend(CHEAP);
    args.extend(["--format", "compressed-tensors", "--out", s(&out)]);
    let r = whittle(&args);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("model.layers.0.mlp.down_proj: group size 32 does not divide in_features 172"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
    // GPTQ has no 5-bit layout.
    let out = root.path().join("gptq5");
    let mut args = vec!["export", "--model", s(&model), "--method", "rtn", "--bits", "5", "--group", "32"];
    args.extend(CHEAP);
    args.extend(["--format", "gptq", "--out", s(&out)]);
    let r = whittle(&args);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("model.layers.0.self_attn.q_proj: 5 bits"), "{}", r.stderr);
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "nothing written at all");
}
