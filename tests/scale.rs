//! The heavier tier (ignored by default, run with `cargo test --release --test scale -- --ignored`): a 1B-shaped
//! synthetic model (TinyLlama's shape, f16, 2.2 GB) compressed with GPTQ w4g128 by the streaming path, its peak
//! resident memory measured by the kernel (VmHWM), and the export opened again.
//!
//! Calibration is kept small (`WHITTLE_SCALE_CALIB`, default 8×256 tokens) so the tier finishes in minutes on two
//! cores; the memory that grows with calibration (the states of every window) is reported by the estimate.

use std::path::Path;
use std::process::Command;

fn whittle(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_whittle")).current_dir(env!("CARGO_MANIFEST_DIR")).args(args).output().unwrap()
}

/// Peak resident set of a finished child, from `/usr/bin/time -v` when present (kB → bytes).
fn peak_rss_of(args: &[&str]) -> (std::process::Output, Option<u64>) {
    if !Path::new("/usr/bin/time").exists() {
        return (whittle(args), None);
    }
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(env!("CARGO_BIN_EXE_whittle"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let kb = err
        .lines()
        .find(|l| l.contains("Maximum resident set size"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|v| v.trim().parse::<u64>().ok());
    (out, kb.map(|k| k * 1024))
}

#[test]
#[ignore = "heavier tier: writes a 2.2 GB model and compresses it (minutes)"]
fn one_b_streaming_compression_stays_under_6_gib_and_exports_readably() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("s1b");
    let out = tmp.path().join("s1b-w4g128");
    let synth = whittle(&["synth", "--shape", "1b", "--seed", "0", "--dtype", "f16", "--out", model.to_str().unwrap()]);
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    let calib = std::env::var("WHITTLE_SCALE_CALIB").unwrap_or_else(|_| "8x256".into());
    let (samples, ctx) = calib.split_once('x').expect("WHITTLE_SCALE_CALIB is SAMPLESxCTX");
    let args = [
        "compress", "--model", model.to_str().unwrap(), "--method", "gptq", "--bits", "4", "--group", "128",
        "--calib-samples", samples, "--calib-ctx", ctx, "--out", out.to_str().unwrap(), "--format", "gptq", "--json",
    ];
    let (res, peak) = peak_rss_of(&args);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    if let Some(peak) = peak {
        eprintln!("peak RSS {:.2} GiB", peak as f64 / (1u64 << 30) as f64);
        assert!(peak < 6 << 30, "peak RSS {peak} bytes");
    } else {
        eprintln!("skipping the RSS check: /usr/bin/time is not installed");
    }
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(v["layers"].as_array().unwrap().len(), 22 * 7);
    // Whittle opens its export again and runs it.
    let gen = whittle(&["generate", "--model", out.to_str().unwrap(), "--prompt", "Once upon a time", "--max-tokens", "4", "--greedy", "--json"]);
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
}
