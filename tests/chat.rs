//! `whittle chat` end to end (the built binary on the embedded default model, dense and compressed + packed), and
//! the claim the packed runtime rests on: running the stored codes through the kernels generates what the
//! dequantized model generates, with logits within 1e-3.

use std::process::Command;
use whittle_app::cli::plan_args::resolve;
use whittle_core::calib::{calibration_windows, CalibSettings};
use whittle_core::compress::Method;
use whittle_core::compress_model::compress_model;
use whittle_core::model::generate::{generate, GenerateOptions, Sampling};
use whittle_core::model::source::{default_model_dir, DEFAULT_CALIBRATION_TEXT};
use whittle_core::model::{load_model, KvCache, Model, Scratch};
use whittle_core::plan::{Plan, Rule};
use whittle_core::runtime::{offload_cuda, pack_model, weight_bytes};

fn chat(extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
        .args(["chat", "--prompt", "Once upon a time", "--greedy", "--max-tokens", "16", "--calib-samples", "16"])
        .args(extra)
        .output()
        .expect("run whittle chat");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "whittle chat {extra:?} failed:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn chat_answers_one_prompt_on_the_default_model() {
    let (stdout, stderr) = chat(&[]);
    assert!(!stdout.trim().is_empty(), "no reply; stderr:\n{stderr}");
    assert!(stderr.contains("dense weights (no plan)") && stderr.contains("CPU ("), "{stderr}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn chat_compresses_packs_and_answers_with_the_kernels() {
    let (stdout, stderr) = chat(&["--method", "gptq", "--bits", "4", "--group", "32", "--device", "cuda"]);
    assert!(!stdout.trim().is_empty(), "no reply; stderr:\n{stderr}");
    assert!(stderr.contains("packed 35 linears"), "{stderr}");
    // Without a CUDA driver the reason is given and the CPU answers; with one, the 35 packed 4-bit linears run on the
    // GPU (the f32 LM head has no CUDA kernel and says so).
    match whittle_kernels::cuda::cuda_available() {
        Err(why) => {
            eprintln!("skipped the GPU check: {why}");
            assert!(stderr.contains(&why) && stderr.contains("falling back to the CPU"), "{stderr}");
        }
        Ok(_) => {
            assert!(stderr.contains("35 linears on the GPU"), "{stderr}");
            assert!(stderr.contains("lm_head"), "{stderr}");
        }
    }
}

/// The acceptance for the packed runtime, on the default model: decode logits within 1e-3 (relative to the
/// largest logit) of the dequantized dense forward at every step, and the same 64 greedy tokens. Groups of 32 run
/// the f32-activation kernels; groups of 128 (one group per row here: 64 and 172 inputs) the int16-activation
/// kernel that single tokens use on AVX-512 VNNI CPUs.
#[test]
fn packed_runtime_matches_the_dequantized_model() {
    for group in [32, 128] {
        let mut m = load_model(&default_model_dir().unwrap()).unwrap();
        let plan = Plan::uniform(Rule { method: Some(Method::Gptq), bits: Some(4), group: Some(group), ..Default::default() });
        let resolved = resolve(&plan, &m).unwrap();
        let calib = CalibSettings { samples: 16, ctx: 128 };
        let windows = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &calib, "calibration text").unwrap();
        let out = compress_model(&mut m.model, &resolved, &windows, &mut |_| {}, &|| false).unwrap();
        let dequantized = m.model.clone();
        let report = pack_model(&mut m.model, &out.quantized);
        assert_eq!(report.packed, 35);
        assert!(weight_bytes(&m.model) < weight_bytes(&dequantized), "packed weights take less memory");

        let mut prompt = vec![m.bos_id().unwrap()];
        prompt.extend(m.tokenizer.encode("Once upon a time").unwrap());
        matches_dequantized(&dequantized, &m.model, &prompt, &format!("g{group} CPU"));
        // The same model with its 4-bit linears on the GPU (the CUDA kernel computes in f32).
        match whittle_kernels::cuda::cuda_available() {
            Ok(dev) => {
                let report = offload_cuda(&mut m.model, &std::sync::Arc::new(dev));
                assert_eq!(report.on_gpu, 35, "every packed linear goes to the GPU: {:?}", report.on_cpu);
                matches_dequantized(&dequantized, &m.model, &prompt, &format!("g{group} CUDA"));
            }
            Err(why) => eprintln!("skipped the CUDA half: {why}"),
        }
    }
}

/// The acceptance: the same 64 greedy tokens, and logits within 1e-3 of the largest at every step.
fn matches_dequantized(dequantized: &Model, packed: &Model, prompt: &[u32], what: &str) {
    let opts = GenerateOptions { max_new_tokens: 64, sampling: Sampling::Greedy, stop_ids: Vec::new() };
    let a = generate(dequantized, prompt, &opts, &mut |_| true).ids;
    let b = generate(packed, prompt, &opts, &mut |_| true).ids;
    assert_eq!(a.len(), 64);
    assert_eq!(a, b, "{what}: packed and dequantized greedy tokens differ");

    // Step by step along the greedy sequence, both models with their own KV cache.
    let cfg = &dequantized.config;
    let (mut ca, mut cb) = (KvCache::new(cfg.num_layers, cfg.kv_dim()), KvCache::new(cfg.num_layers, cfg.kv_dim()));
    let (mut sa, mut sb) = (Scratch::default(), Scratch::default());
    let mut worst = 0f32;
    for &tok in prompt.iter().chain(&a) {
        let la = dequantized.forward(&[tok], &mut ca, &mut sa, 1);
        let lb = packed.forward(&[tok], &mut cb, &mut sb, 1);
        let scale = la.iter().fold(0f32, |x, v| x.max(v.abs()));
        let diff = la.iter().zip(&lb).fold(0f32, |x, (p, q)| x.max((p - q).abs()));
        worst = worst.max(diff / scale);
    }
    eprintln!("{what}: worst logit difference / max |logit| = {worst:.2e}");
    assert!(worst <= 1e-3, "{what}: packed logits differ by {worst:.2e} of the largest logit");
}

/// `whittle bench gemv --device cuda`: with a GPU, the JSON keys plus the f16 comparison; without one, a
/// failed run that says why.
#[test]
fn bench_gemv_on_cuda_measures_or_says_why() {
    let out = Command::new(env!("CARGO_BIN_EXE_whittle"))
        .args(["bench", "gemv", "--shape", "512x1024", "--bits", "4", "--group", "128", "--device", "cuda", "--json"])
        .output()
        .expect("run whittle bench gemv");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match whittle_kernels::cuda::cuda_available() {
        Err(why) => {
            eprintln!("skipped the GPU measurement: {why}");
            assert!(!out.status.success() && stderr.contains(&why), "{stderr}");
        }
        Ok(_) => {
            assert!(out.status.success(), "{stderr}");
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
            for key in ["seconds", "bytes_read", "gbps", "stream_gbps", "fraction_of_bandwidth", "speedup_over_f16"] {
                assert!(v[key].as_f64().is_some_and(|f| f > 0.0), "{key} in {v}");
            }
        }
    }
}
