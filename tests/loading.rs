//! Loading variants of the default model (F16, BF16, sharded, tied) and every kind of bad input: each must give a
//! clear error naming the file and the field, a non-zero exit code, and no panic.

mod common;
use common::*;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::path::Path;

/// Rewrites the folder's model.safetensors with every tensor converted by `f`.
fn rewrite(dir: &Path, f: impl Fn(&str, &[f32]) -> (Dtype, Vec<u8>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let vals: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let (dt, data) = f(&name, &vals);
        out.push((name, dt, t.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> =
        out.iter().map(|(n, dt, s, d)| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn ppl(model: &Path) -> f64 {
    let v = whittle_json(&[
        "eval", "--model", path_str(model), "--data", path_str(&val_text()), "--ctx", "256", "--max-tokens", "4096", "--json",
    ]);
    v["ppl"].as_f64().unwrap()
}

#[test]
fn f16_and_bf16_copies_load_and_stay_within_1_percent() {
    let base = ppl(&default_model());
    let f16 = copy_model(&default_model());
    rewrite(f16.path(), |_, v| (Dtype::F16, v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()));
    let bf16 = copy_model(&default_model());
    rewrite(bf16.path(), |_, v| (Dtype::BF16, v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()));
    let (p16, pb16) = (ppl(f16.path()), ppl(bf16.path()));
    assert!((p16 / base - 1.0).abs() < 0.01, "f16 ppl {p16} vs {base}");
    assert!((pb16 / base - 1.0).abs() < 0.01, "bf16 ppl {pb16} vs {base}");
    assert!(p16 != base || pb16 != base, "conversion should change the weights");
}

#[test]
fn sharded_copy_loads_with_identical_ppl() {
    let dir = copy_model(&default_model());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        for n in part.iter() {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(&path).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(ppl(dir.path()), ppl(&default_model()));
}

#[test]
fn tied_embeddings_load_without_lm_head() {
    let dir = copy_model(&default_model());
    // The fixture's lm_head is a bit-identical copy of the embedding, so tying must give the same ppl.
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "lm_head.weight").collect();
    let tmp = dir.path().join("new.safetensors");
    safetensors::serialize_to_file(views, None, &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    edit_config(dir.path(), |c| c["tie_word_embeddings"] = true.into());
    assert_eq!(ppl(dir.path()), ppl(&default_model()));
}

fn edit_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Runs `eval` on a broken model and checks exit code and that stderr names every given fragment.
fn expect_error(model: &Path, data: Option<&Path>, ctx: &str, fragments: &[&str]) {
    let data = data.map(Path::to_path_buf).unwrap_or_else(val_text);
    let out = whittle(&["eval", "--model", path_str(model), "--data", path_str(&data), "--ctx", ctx, "--max-tokens", "1024"]);
    assert_ne!(out.code, 0, "expected failure, got success: {}", out.stdout);
    assert!(!out.stderr.contains("panicked"), "panic: {}", out.stderr);
    for f in fragments {
        assert!(out.stderr.contains(f), "stderr lacks `{f}`: {}", out.stderr);
    }
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = copy_model(&default_model());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    expect_error(dir.path(), None, "256", &["model.safetensors", "truncated"]);
}

#[test]
fn header_length_larger_than_file_is_reported() {
    let dir = copy_model(&default_model());
    let p = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(10_000_000u64).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    expect_error(dir.path(), None, "256", &["model.safetensors", "header length"]);
}

fn rewrite_header(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
}

#[test]
fn unknown_dtype_is_reported() {
    let dir = copy_model(&default_model());
    rewrite_header(dir.path(), |h| h["model.norm.weight"]["dtype"] = "Q9".into());
    expect_error(dir.path(), None, "256", &["model.safetensors", "dtype"]);
}

#[test]
fn missing_tensor_is_reported() {
    let dir = copy_model(&default_model());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "model.layers.2.mlp.up_proj.weight").collect();
    let tmp = dir.path().join("x.safetensors");
    safetensors::serialize_to_file(views, None, &tmp).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    expect_error(dir.path(), None, "256", &["model.layers.2.mlp.up_proj.weight", "missing"]);
}

#[test]
fn shape_disagreeing_with_config_is_reported() {
    let dir = copy_model(&default_model());
    edit_config(dir.path(), |c| c["intermediate_size"] = 176.into());
    expect_error(dir.path(), None, "256", &["model.safetensors", "gate_proj.weight", "shape"]);
}

#[test]
fn unknown_architecture_is_reported() {
    let dir = copy_model(&default_model());
    edit_config(dir.path(), |c| c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]));
    expect_error(dir.path(), None, "256", &["config.json", "architectures", "GPTNeoXForCausalLM"]);
}

#[test]
fn missing_tokenizer_is_reported() {
    let dir = copy_model(&default_model());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    expect_error(dir.path(), None, "256", &["tokenizer.json", "missing"]);
}

#[test]
fn corrupt_tokenizer_is_reported() {
    let dir = copy_model(&default_model());
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": {\"type\": \"BPE\", \"vocab\": 3").unwrap();
    expect_error(dir.path(), None, "256", &["tokenizer.json", "cannot parse"]);
}

#[test]
fn non_utf8_text_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("latin1.txt");
    std::fs::write(&data, b"caf\xe9 au lait").unwrap();
    expect_error(&default_model(), Some(&data), "256", &["latin1.txt", "UTF-8", "offset 3"]);
}

#[test]
fn ctx_larger_than_max_positions_is_reported() {
    expect_error(&default_model(), None, "1024", &["--ctx 1024", "max_position_embeddings"]);
}

#[test]
fn text_shorter_than_one_window_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("short.txt");
    std::fs::write(&data, "Once upon a time").unwrap();
    expect_error(&default_model(), Some(&data), "256", &["short.txt", "shorter than one window"]);
}

#[test]
fn not_a_folder_is_reported() {
    expect_error(Path::new("/nonexistent/model/dir"), None, "256", &["/nonexistent/model/dir"]);
}

#[test]
fn hub_id_offline_fails_fast_with_a_readable_message() {
    let t = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whittle"))
        .args(["eval", "--model", "nobody-here/no-such-model", "--data", path_str(&val_text())])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("nobody-here/no-such-model") && err.contains("open its folder"), "{err}");
    assert!(t.elapsed().as_secs() < 30);
}
