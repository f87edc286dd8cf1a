//! Unit tests of the model-level export: option parsing, config rewriting, shard order, and small exports of the
//! embedded default model. The full compress → export → reopen → perplexity round trips live in
//! `tests/export_roundtrip.rs`.

use super::*;
use crate::export::testutil::simple_layer;
use crate::model::{load_model, Model, LINEAR_KINDS};
use serde_json::{json, Value};
use whittle_kernels::Weight;

fn default_model() -> LoadedModel {
    load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/stories260k")).expect("default model loads")
}

#[test]
fn sizes_parse_with_decimal_and_binary_units() {
    assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
    assert_eq!(parse_size("500 MB"), Ok(500_000_000));
    assert_eq!(parse_size("1.5GiB"), Ok(1_610_612_736));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("0").is_err());
    assert!(parse_size("2 parsecs").unwrap_err().contains("unknown unit"));
    assert!(parse_size("GB").is_err());
}

#[test]
fn format_names_round_trip() {
    for f in ModelFormat::ALL {
        assert_eq!(f.name().parse::<ModelFormat>(), Ok(f));
    }
    assert_eq!(ModelFormat::parse("ct"), Some(ModelFormat::CompressedTensors));
    assert!("awq".parse::<ModelFormat>().unwrap_err().contains("gptq, compressed-tensors, f16 or bf16"));
}

#[test]
fn config_keeps_fields_and_replaces_quantization_config() {
    let raw = json!({"model_type": "llama", "hidden_size": 64, "torch_dtype": "float32",
                     "quantization_config": {"quant_method": "gptq"}});
    let qc = json!({"quant_method": "compressed-tensors"});
    let v: Value = serde_json::from_str(&files::config_json(&raw, Some(&qc), FloatDtype::F32).unwrap()).unwrap();
    assert_eq!(v["quantization_config"], qc);
    assert_eq!(v["hidden_size"], 64);
    assert_eq!(v["torch_dtype"], "float32");
    // A dense export of an imported quantized model drops the stale quantization_config.
    let v: Value = serde_json::from_str(&files::config_json(&raw, None, FloatDtype::BF16).unwrap()).unwrap();
    assert!(v.get("quantization_config").is_none());
    assert_eq!(v["torch_dtype"], "bfloat16");
}

#[test]
fn tensors_are_ordered_block_by_block() {
    let mut names = vec![
        "lm_head.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.norm.weight",
        "model.layers.2.self_attn.q_proj.qweight",
        "model.embed_tokens.weight",
        "model.layers.2.input_layernorm.weight",
    ];
    names.sort_by_cached_key(|n| layers::order_key(n));
    assert_eq!(
        names,
        vec![
            "model.embed_tokens.weight",
            "model.layers.2.input_layernorm.weight",
            "model.layers.2.self_attn.q_proj.qweight",
            "model.layers.10.mlp.up_proj.weight",
            "lm_head.weight",
            "model.norm.weight"
        ]
    );
}

#[test]
fn existing_target_is_refused_before_any_work() {
    let m = default_model();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let mut calls = 0;
    let err = export_model(&m, &BTreeMap::new(), &ExportOptions::new(ModelFormat::F16, &out), &mut |_, _| calls += 1)
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(calls, 0);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    // Force over the source folder itself is refused too.
    let mut opts = ExportOptions::new(ModelFormat::F16, &m.dir);
    opts.force = true;
    assert!(check_target(&opts, &m.dir).unwrap_err().to_string().contains("loaded from"));
}

#[test]
fn foreign_quantized_layers_are_refused_with_their_names() {
    let m = default_model();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    let q = BTreeMap::from([
        ("model.layers.9.mlp.up_proj".to_string(), simple_layer(172, 64, 4, 32, true)),
        ("model.layers.0.mlp.up_proj".to_string(), simple_layer(64, 64, 4, 32, true)),
    ]);
    let err = export_model(&m, &q, &ExportOptions::new(ModelFormat::Gptq, &out), &mut |_, _| {}).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("model.layers.9.mlp.up_proj: has a quantized form but is not a linear"), "{text}");
    assert!(text.contains("model.layers.0.mlp.up_proj: quantized form is 64×64"), "{text}");
    assert!(!out.exists());
}

#[test]
fn dense_export_of_a_float_model_is_refused_for_packed_formats() {
    let m = default_model();
    let root = tempfile::tempdir().unwrap();
    for f in [ModelFormat::Gptq, ModelFormat::CompressedTensors] {
        let out = root.path().join(f.name());
        let err = export_model(&m, &BTreeMap::new(), &ExportOptions::new(f, &out), &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("export it as a dense model"), "{f}: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn f16_export_writes_a_complete_sharded_folder_that_reloads() {
    let m = default_model();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("f16");
    let mut opts = ExportOptions::new(ModelFormat::F16, &out);
    opts.max_shard_bytes = 200_000;
    opts.card.plan_name = Some("none".into());
    let mut last = (0, 0);
    let report = export_model(&m, &BTreeMap::new(), &opts, &mut |d, t| last = (d, t)).unwrap();
    assert_eq!(last.0, last.1);
    let names: Vec<String> =
        report.files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in [
        "config.json",
        "README.md",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00004.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    assert_eq!(report.bytes, report.files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum::<u64>());
    assert!((report.bits_per_weight_estimate - 16.0).abs() < 1e-9, "{}", report.bits_per_weight_estimate);
    assert_eq!((report.dense_layers, report.quantized_layers), (36, 0));
    let back = load_model(&out).unwrap();
    assert_eq!(back.model.config.torch_dtype.as_deref(), Some("float16"));
    assert!(back.quantized.is_empty());
    let (a, b) = (&m.model.blocks[3].linears[6].weight, &back.model.blocks[3].linears[6].weight);
    let (Weight::Dense(a), Weight::Dense(b)) = (a, b) else { panic!("dense weights expected") };
    let want: Vec<f32> = a.to_f32_vec().iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    assert_eq!(b.to_f32_vec(), want);
    assert_eq!(back.model.norm, m.model.norm.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect::<Vec<_>>());
}

#[test]
fn quantized_export_reimports_the_same_codes() {
    // Quantize two layers by hand (round to nearest on a 4-bit grid) and export them in both packed formats.
    let mut m = default_model();
    let mut quantized = BTreeMap::new();
    for (l, k) in [(0usize, 0usize), (1, 4)] {
        let lin = &m.model.blocks[l].linears[k];
        let (r, c) = (lin.weight.rows(), lin.weight.cols());
        let mut q = simple_layer(r, c, 4, 32, true);
        q.scales = vec![1.0 / 64.0; q.scales.len()];
        let name = Model::module_name(l, LINEAR_KINDS[k]);
        m.model.blocks[l].linears[k].weight =
            Weight::Dense(whittle_kernels::DenseWeight::from_f32(r, c, q.dequantize().data));
        quantized.insert(name, q);
    }
    let root = tempfile::tempdir().unwrap();
    for f in [ModelFormat::Gptq, ModelFormat::CompressedTensors] {
        let out = root.path().join(f.name());
        let report = export_model(&m, &quantized, &ExportOptions::new(f, &out), &mut |_, _| {}).unwrap();
        assert_eq!(report.quantized_layers, 2, "{f}");
        let back = load_model(&out).unwrap();
        assert_eq!(back.quantized, quantized, "{f}");
        assert!(matches!(back.model.blocks[0].linears[0].weight, Weight::Packed(_)), "{f}");
        assert!(matches!(back.model.blocks[0].linears[1].weight, Weight::Dense(_)), "{f}");
        let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(readme.contains("4-bit g32 sym"), "{readme}");
    }
    assert!(root.path().join("gptq/quantize_config.json").exists());
}
