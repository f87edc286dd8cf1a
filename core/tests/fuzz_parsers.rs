//! Robustness of every parser a user's files reach: random and mutated inputs must give an `Err` or a value, never
//! a panic or an out-of-bounds read. Each parser gets at least 10,000 cases (proptest), most of them mutations of a
//! valid file (byte flips, truncations, insertions, JSON/TOML values swapped for hostile ones), since purely random
//! bytes are rejected by the first check and exercise little.
//!
//! A panic anywhere fails the case; proptest then shrinks it to a minimal input and prints it.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};
use std::cell::Cell;
use std::path::Path;
use whittle_core::export::config::parse_quantization_config;
use whittle_core::model::{ModelConfig, Tokenizer};
use whittle_core::model::weights::WeightStore;
use whittle_core::plan::Plan;

const CASES: u32 = 10_000;

fn assets() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/stories260k")
}

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..12)).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let len = b.len();
        match e {
            Edit::Set(i, v) if len > 0 => b[i % len] = *v,
            Edit::Insert(i, v) => {
                let at = i % (len + 1);
                b.splice(at..at, v.iter().copied());
            }
            Edit::Delete(i, n) if len > 0 => {
                let at = i % len;
                b.drain(at..(at + n).min(len));
            }
            Edit::Truncate(i) => b.truncate(i % (len + 1)),
            _ => {}
        }
    }
    b
}

/// Values that break naive parsers: wrong types, negatives, huge and fractional numbers, odd strings.
fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|v| json!(v)),
        any::<u64>().prop_map(|v| json!(v)),
        prop_oneof![Just(0u64), Just(1), Just(2), Just(3), Just(7), Just(1 << 31), Just(u64::MAX)].prop_map(|v| json!(v)),
        any::<f64>().prop_filter("JSON has no NaN/Inf", |v| v.is_finite()).prop_map(|v| json!(v)),
        "[a-z_:.*+\\-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replaces the value found by walking `path` (child indices, taken modulo the children present) with `new`.
fn replace_at(v: &mut Value, path: &[usize], new: Value) {
    let child = match (path.split_first(), &mut *v) {
        (Some((i, _)), Value::Object(m)) if !m.is_empty() => {
            let k = m.keys().nth(i % m.len()).cloned().expect("index in range");
            m.get_mut(&k)
        }
        (Some((i, _)), Value::Array(a)) if !a.is_empty() => {
            let n = a.len();
            a.get_mut(i % n)
        }
        _ => None,
    };
    match child {
        Some(c) if path.len() > 1 => replace_at(c, &path[1..], new),
        Some(c) => *c = new,
        None => *v = new,
    }
}

/// A JSON document mutated at the value level (valid JSON, hostile contents) or at the byte level.
fn mutated_json(seed: Value) -> impl Strategy<Value = Vec<u8>> {
    let bytes = serde_json::to_vec_pretty(&seed).expect("seed serializes");
    let structural = proptest::collection::vec((proptest::collection::vec(any::<usize>(), 1..4), hostile_value()), 1..4)
        .prop_map(move |swaps| {
            let mut v = seed.clone();
            for (path, new) in swaps {
                replace_at(&mut v, &path, new);
            }
            serde_json::to_vec(&v).expect("value serializes")
        });
    let byte_level = proptest::collection::vec(edit(), 1..6).prop_map(move |edits| apply(&bytes, &edits));
    prop_oneof![3 => structural, 2 => byte_level, 1 => proptest::collection::vec(any::<u8>(), 0..64)]
}

/// A fixed seed, so CI runs the same cases every time (a failure found once is found again).
fn runner() -> TestRunner {
    let config = Config { cases: CASES, failure_persistence: None, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

#[test]
fn config_json_never_panics() {
    let seed: Value = serde_json::from_slice(&std::fs::read(assets().join("config.json")).unwrap()).unwrap();
    let ok = Cell::new(0usize);
    runner()
        .run(&mutated_json(seed), |bytes| {
            let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { return Ok(()) };
            if let Ok(cfg) = ModelConfig::from_json(v, Path::new("config.json")) {
                // Everything derived from the sizes must be computable.
                let _ = (cfg.parameter_count(), cfg.q_dim(), cfg.kv_dim());
                ok.set(ok.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    // The mutations keep some configs valid, so the accepting path is exercised too.
    eprintln!("accepted: {}", ok.get());
    assert!(ok.get() > 100, "only {} mutated configs parsed", ok.get());
}

/// A small valid safetensors file: float tensors of three dtypes and an integer one.
fn small_safetensors() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let f32s: Vec<u8> = (0..24).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..12).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
    let bf16s: Vec<u8> = (0..8).flat_map(|i| half::bf16::from_f32(-(i as f32)).to_le_bytes()).collect();
    let i32s: Vec<u8> = (0..6).flat_map(|i: i32| (i * 7).to_le_bytes()).collect();
    let tensors = vec![
        ("a.weight", TensorView::new(Dtype::F32, vec![4, 6], &f32s).unwrap()),
        ("b.weight", TensorView::new(Dtype::F16, vec![3, 4], &f16s).unwrap()),
        ("c.weight", TensorView::new(Dtype::BF16, vec![8], &bf16s).unwrap()),
        ("d.qweight", TensorView::new(Dtype::I32, vec![2, 3], &i32s).unwrap()),
    ];
    safetensors::serialize(tensors, None).unwrap()
}

#[test]
fn safetensors_headers_never_panic_or_read_out_of_bounds() {
    let seed = small_safetensors();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // Header edits matter most: bias edits toward the first bytes (length prefix and JSON header).
    let header_len = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let in_header = proptest::collection::vec(
        (0..header_len, any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1..4,
    );
    let strategy = prop_oneof![2 => in_header, 2 => proptest::collection::vec(edit(), 1..6)];
    let opened = Cell::new(0usize);
    runner()
        .run(&strategy, |edits| {
            std::fs::write(&path, apply(&seed, &edits)).unwrap();
            let Ok(store) = WeightStore::open_files(std::slice::from_ref(&path)) else { return Ok(()) };
            opened.set(opened.get() + 1);
            let names: Vec<String> = store.names().cloned().collect();
            for name in names {
                let entry = store.entry(&name).unwrap().clone();
                // Every byte range the store hands out lies inside the file and matches dtype × shape.
                let (_, _, bytes) = store.raw(&name).unwrap();
                let _ = bytes.as_slice().iter().fold(0u8, |a, b| a ^ b);
                let _ = store.f32_vec(&name, &entry.shape);
                if let [r, c] = entry.shape[..] {
                    let _ = store.dense(&name, r, c).map(|d| d.to_f32_vec());
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("accepted: {}", opened.get());
    assert!(opened.get() > 100, "only {} mutated files opened", opened.get());
}

#[test]
fn tokenizer_json_never_panics() {
    let seed: Value = serde_json::from_slice(&std::fs::read(assets().join("tokenizer.json")).unwrap()).unwrap();
    // The tokenizers crate panics on some malformed decoders and Whittle catches it; keep those expected panics
    // from printing a backtrace per case, and let every other panic through to the default hook.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.location().is_some_and(|l| l.file().contains("tokenizers")) {
            default_hook(info);
        }
    }));
    let ok = Cell::new(0usize);
    runner()
        .run(&mutated_json(seed), |bytes| {
            if let Ok(t) = Tokenizer::from_bytes(&bytes, Path::new("tokenizer.json")) {
                ok.set(ok.get() + 1);
                if let Ok(ids) = t.encode("Once upon a time, Lily saw a cat.") {
                    let _ = t.decode(&ids);
                }
                let _ = t.vocab_size();
            }
            Ok(())
        })
        .unwrap();
    eprintln!("accepted: {}", ok.get());
    assert!(ok.get() > 100, "only {} mutated tokenizers parsed", ok.get());
}

/// The default model's linears, as plans resolve against them.
fn linears() -> Vec<(String, usize, usize)> {
    let cfg = ModelConfig::from_file(&assets().join("config.json")).unwrap();
    let mut out = Vec::new();
    for l in 0..cfg.num_layers {
        for (k, (r, c)) in [
            ("self_attn.q_proj", (cfg.q_dim(), cfg.hidden_size)),
            ("self_attn.k_proj", (cfg.kv_dim(), cfg.hidden_size)),
            ("self_attn.v_proj", (cfg.kv_dim(), cfg.hidden_size)),
            ("self_attn.o_proj", (cfg.hidden_size, cfg.q_dim())),
            ("mlp.gate_proj", (cfg.intermediate_size, cfg.hidden_size)),
            ("mlp.up_proj", (cfg.intermediate_size, cfg.hidden_size)),
            ("mlp.down_proj", (cfg.hidden_size, cfg.intermediate_size)),
        ] {
            out.push((format!("model.layers.{l}.{k}"), r, c));
        }
    }
    out
}

#[test]
fn plans_never_panic() {
    let presets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets");
    let mut seeds: Vec<Value> = Vec::new();
    for entry in std::fs::read_dir(&presets).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let plan = Plan::from_file(&p).unwrap();
            seeds.push(serde_json::to_value(&plan).unwrap());
        }
    }
    assert!(seeds.len() >= 7, "presets missing");
    let linears = linears();
    let strategy = proptest::sample::select(seeds).prop_flat_map(mutated_json);
    let resolved = Cell::new(0usize);
    runner()
        .run(&(strategy, any::<bool>()), |(bytes, as_toml)| {
            // The same document through both front ends: JSON as is, and TOML re-encoded from it when possible.
            let plan = if as_toml {
                let Ok(v) = serde_json::from_slice::<toml::Value>(&bytes) else { return Ok(()) };
                let Ok(text) = toml::to_string(&v) else { return Ok(()) };
                Plan::from_toml_str(&text, Path::new("plan.toml"))
            } else {
                serde_json::from_slice::<Plan>(&bytes).map_err(|e| whittle_core::WhittleError::Invalid(e.to_string()))
            };
            if let Ok(plan) = plan {
                if let Ok(r) = plan.resolve(&linears, 1000, 32.0) {
                    resolved.set(resolved.get() + 1);
                    prop_assert!(r.avg_bits.is_finite(), "avg bits {}", r.avg_bits);
                }
                let _ = plan.to_toml();
            }
            Ok(())
        })
        .unwrap();
    eprintln!("accepted: {}", resolved.get());
    assert!(resolved.get() > 50, "only {} mutated plans resolved", resolved.get());
}

#[test]
fn quantization_configs_never_panic() {
    let gptq = json!({"architectures": ["LlamaForCausalLM"], "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true,
        "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": true, "static_groups": false,
        "dynamic": {"+:.*down_proj": {"bits": 8, "group_size": 64}, "-:.*layers\\.0\\..*": {}}}});
    let ct = json!({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": true,
                "strategy": "group", "group_size": 128, "dynamic": false, "actorder": null, "observer": "minmax"},
                "input_activations": null, "output_activations": null, "format": "pack-quantized"},
            "group_1": {"targets": ["re:.*layers\\.3\\..*down_proj"], "weights": {"num_bits": 8, "type": "int",
                "symmetric": false, "strategy": "channel", "group_size": null, "dynamic": false, "actorder": "group"},
                "format": "pack-quantized"}},
        "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "global_sparsity": 0.5,
            "targets": ["Linear"], "ignore": ["lm_head"]},
        "ignore": ["lm_head"], "kv_cache_scheme": null}});
    let strategy = prop_oneof![mutated_json(gptq), mutated_json(ct)];
    let parsed = Cell::new(0usize);
    runner()
        .run(&strategy, |bytes| {
            let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
            if let Ok(Some(_)) = parse_quantization_config(&text) {
                parsed.set(parsed.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    eprintln!("accepted: {}", parsed.get());
    assert!(parsed.get() > 100, "only {} mutated quantization configs parsed", parsed.get());
}
