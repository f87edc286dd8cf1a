//! The forward pass, generation and evaluation against independent figures: the numpy reference logits and greedy
//! ids in shared/fixtures/reference.safetensors, and the perplexities in shared/data/README.md.

mod common;
use common::*;
use safetensors::SafeTensors;
use whittle_core::eval::{evaluate, read_text, window_logits, windows};
use whittle_core::model::generate::{generate, GenerateOptions, Sampling};
use whittle_core::model::load_model;

fn reference() -> (Vec<u32>, Vec<f32>, Vec<u32>) {
    let bytes = std::fs::read(shared().join("fixtures/reference.safetensors")).expect("reference file");
    let st = SafeTensors::deserialize(&bytes).expect("parse reference");
    let ids = |name: &str| -> Vec<u32> {
        st.tensor(name).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    };
    let logits: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids("input_ids"), logits, ids("greedy_ids"))
}

#[test]
fn logits_match_numpy_reference_within_1e4() {
    let (input, expected, _) = reference();
    let m = load_model(&default_model()).unwrap();
    let got = window_logits(&m.model, &input);
    assert_eq!(got.len(), expected.len());
    let max = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // 1e-4 abs: the reference is f32 numpy with a different summation order; logits reach ~22 in magnitude.
    assert!(max < 1e-4, "max |logit diff| = {max}");
}

#[test]
fn incremental_decode_matches_full_prefill() {
    let (input, expected, _) = reference();
    let m = load_model(&default_model()).unwrap();
    let mut cache = m.model.new_cache();
    let mut scratch = Default::default();
    let vocab = m.model.config.vocab_size;
    // Prefill half, then decode the rest one token at a time through the KV cache.
    let half = input.len() / 2;
    let first = m.model.forward(&input[..half], &mut cache, &mut scratch, half);
    let mut all = first;
    for &t in &input[half..] {
        all.extend(m.model.forward(&[t], &mut cache, &mut scratch, 1));
    }
    assert_eq!(all.len(), input.len() * vocab);
    let max = all.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max < 1e-4, "max |logit diff| = {max}");
}

#[test]
fn greedy_from_bos_reproduces_reference_ids() {
    let (_, _, greedy) = reference();
    let m = load_model(&default_model()).unwrap();
    let opts = GenerateOptions { max_new_tokens: greedy.len() - 1, sampling: Sampling::Greedy, stop_ids: vec![] };
    let out = generate(&m.model, &greedy[..1], &opts, &mut |_| true);
    assert_eq!(out.ids, greedy[1..].to_vec());
}

#[test]
fn sampling_is_seeded_and_reproducible() {
    let m = load_model(&default_model()).unwrap();
    let run = |seed| {
        let opts = GenerateOptions {
            max_new_tokens: 40,
            sampling: Sampling::TopP { temperature: 1.0, top_p: 0.9, seed },
            stop_ids: vec![],
        };
        generate(&m.model, &[1], &opts, &mut |_| true).ids
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn generation_stops_on_eos_of_generation_config() {
    let m = load_model(&default_model()).unwrap();
    // The model ends stories by emitting BOS (id 1), which generation_config lists as an EOS id.
    assert_eq!(m.eos_ids(), vec![2, 1]);
    let opts = GenerateOptions { max_new_tokens: 400, sampling: Sampling::Greedy, stop_ids: m.eos_ids() };
    let out = generate(&m.model, &[1], &opts, &mut |_| true);
    let last = *out.ids.last().unwrap();
    assert!(m.eos_ids().contains(&last), "did not stop on EOS within 400 tokens");
    assert!(out.ids[..out.ids.len() - 1].iter().all(|t| !m.eos_ids().contains(t)));
}

fn ppl_cli(data: &std::path::Path) -> f64 {
    let v = whittle_json(&["eval", "--data", path_str(data), "--ctx", "256", "--max-tokens", "20480", "--json"]);
    assert_eq!(v["tokens"], 20480);
    v["ppl"].as_f64().unwrap()
}

#[test]
fn eval_cli_tinystories_ppl_matches_readme() {
    let ppl = ppl_cli(&val_text());
    assert!((ppl / 4.152525 - 1.0).abs() < 1e-3, "ppl {ppl}");
}

#[test]
fn eval_cli_wikitext_ppl_matches_readme() {
    let ppl = ppl_cli(&shared().join("data/wikitext2_test.txt"));
    assert!((ppl / 117.061723 - 1.0).abs() < 1e-3, "ppl {ppl}");
}

#[test]
fn eval_against_itself_has_zero_kl_and_full_agreement() {
    let m = load_model(&default_model()).unwrap();
    let text = read_text(&val_text()).unwrap();
    let toks = m.tokenizer.encode(&text).unwrap();
    let w = windows(&toks, 128, Some(1024));
    let r = evaluate(&m.model, Some(&m.model), &w, &|_, _| {}, &|| false).unwrap();
    assert!(r.kl.unwrap().abs() < 1e-9);
    assert_eq!(r.top1.unwrap(), 1.0);
}
