//! A compression killed with SIGKILL half-way resumes from the layers it finished, and the result is byte for byte
//! what an uninterrupted run writes; the target folder never appears before it is complete.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn whittle() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_whittle"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// Export arguments: GPTQ 4-bit g32 (symmetric, as GPTQ v1 stores exactly) on `model` (the embedded default when
/// `None`) with `samples`×`ctx` calibration tokens.
fn export_args(model: Option<&Path>, samples: &str, ctx: &str, out: &Path) -> Vec<String> {
    let model = model.map(|m| vec!["--model".to_string(), m.display().to_string()]).unwrap_or_default();
    ["export", "--method", "gptq", "--bits", "4", "--group", "32", "--act-order", "--calib-samples", samples, "--calib-ctx", ctx, "--format", "gptq"]
        .iter()
        .map(|s| s.to_string())
        .chain(model)
        .chain(["--out".to_string(), out.display().to_string()])
        .collect()
}

fn partial(out: &Path) -> PathBuf {
    out.with_file_name(format!("{}.partial", out.file_name().unwrap().to_string_lossy()))
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        // The model card names the folder it was written to; everything else must match exactly.
        .filter(|p| p.file_name().unwrap() != "README.md")
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Kills an export of `model` with SIGKILL once two layers are finished, restarts it, and compares the result
/// byte for byte with an uninterrupted run.
fn killed_run_resumes_to_the_same_files(model: Option<&Path>, samples: &str, ctx: &str, layers: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let resumed = tmp.path().join("resumed");
    let args = |out: &Path| export_args(model, samples, ctx, out);

    let out = whittle().args(args(&whole)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!partial(&whole).exists(), "the checkpoint folder is removed after a successful export");

    // Start again elsewhere and kill -9 as soon as two layers are finished.
    let mut child = whittle().args(args(&resumed)).stderr(Stdio::null()).stdout(Stdio::null()).spawn().unwrap();
    let second = partial(&resumed).join("layer-00001.safetensors");
    let start = Instant::now();
    while !second.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        assert!(start.elapsed() < Duration::from_secs(1800), "no layer finished in 30 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix: no cleanup runs
    child.wait().unwrap();
    assert!(!resumed.exists(), "a killed run must not leave a target folder that looks complete");
    let finished = (0..layers).filter(|l| partial(&resumed).join(format!("layer-{l:05}.safetensors")).exists()).count();
    assert!((2..layers).contains(&finished), "{finished} of {layers} layers finished before the kill");

    let out = whittle().args(args(&resumed)).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming: layers 0.."), "the restart did not resume: {stderr}");
    assert!(!partial(&resumed).exists());

    let (a, b) = (files(&whole), files(&resumed));
    assert_eq!(a.iter().map(|f| &f.0).collect::<Vec<_>>(), b.iter().map(|f| &f.0).collect::<Vec<_>>());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs between the uninterrupted and the resumed run");
    }
}

/// The embedded default, with enough calibration that the run takes a few seconds (so it can be killed mid-way).
#[test]
fn killed_compression_resumes_and_equals_an_uninterrupted_run() {
    killed_run_resumes_to_the_same_files(None, "64", "256", 5);
}

/// The same on a 1B-shaped synthetic model (TinyLlama's shape, f16, 2.2 GB, 22 layers): the heavier tier, run with
/// `cargo test --release --test resume -- --ignored` (calibration from `WHITTLE_SCALE_CALIB`, default 8×256).
#[test]
#[ignore = "heavier tier: writes a 2.2 GB model and compresses it twice (minutes)"]
fn killed_1b_compression_resumes_and_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("s1b");
    let synth = whittle().args(["synth", "--shape", "1b", "--seed", "0", "--dtype", "f16", "--out"]).arg(&model).output().unwrap();
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    let calib = std::env::var("WHITTLE_SCALE_CALIB").unwrap_or_else(|_| "8x256".into());
    let (samples, ctx) = calib.split_once('x').expect("WHITTLE_SCALE_CALIB is SAMPLESxCTX");
    killed_run_resumes_to_the_same_files(Some(&model), samples, ctx, 22);
}

#[test]
fn a_checkpoint_of_another_plan_is_refused_not_mixed_in() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let dir = partial(&out);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("checkpoint.json"), r#"{"format": 1, "plan": "something else"}"#).unwrap();
    let res = whittle()
        .args(["export", "--method", "rtn", "--bits", "4", "--group", "32", "--calib-samples", "4", "--format", "gptq", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("x.partial") && stderr.contains("another model, plan or calibration"), "{stderr}");
    assert!(dir.join("checkpoint.json").exists(), "the user's folder is left as it was");
    // --restart discards it and runs.
    let res = whittle()
        .args(["export", "--method", "rtn", "--bits", "4", "--group", "32", "--calib-samples", "4", "--format", "gptq", "--restart", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(out.join("model.safetensors").exists());
}
