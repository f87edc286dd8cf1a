//! `whittle chat` end to end (the built binary on the embedded default model, dense and compressed + packed), and
//! the claim the packed runtime rests on: running the stored codes through the kernels generates what the
//! dequantized model generates.

use std::process::Command;
use whittle_app::cli::plan_args::resolve;
use whittle_core::calib::{calibration_windows, CalibSettings};
use whittle_core::compress::Method;
use whittle_core::compress_model::compress_model;
use whittle_core::model::generate::{generate, GenerateOptions, Sampling};
use whittle_core::model::source::{default_model_dir, DEFAULT_CALIBRATION_TEXT};
use whittle_core::model::load_model;
use whittle_core::plan::{Plan, Rule};
use whittle_core::runtime::{pack_model, weight_bytes};

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
    // Without a CUDA driver the reason is given; with one, that decode still runs on the CPU.
    assert!(stderr.contains("CUDA"), "{stderr}");
}

#[test]
fn packed_greedy_ids_equal_the_dequantized_models() {
    let mut m = load_model(&default_model_dir().unwrap()).unwrap();
    let plan = Plan::uniform(Rule { method: Some(Method::Gptq), bits: Some(4), group: Some(32), ..Default::default() });
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
    let opts = GenerateOptions { max_new_tokens: 32, sampling: Sampling::Greedy, stop_ids: Vec::new() };
    let a = generate(&dequantized, &prompt, &opts, &mut |_| true).ids;
    let b = generate(&m.model, &prompt, &opts, &mut |_| true).ids;
    assert_eq!(a.len(), 32);
    assert_eq!(a, b, "packed and dequantized greedy tokens differ");
}
