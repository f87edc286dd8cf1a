//! Helpers shared by the integration tests: paths to the shared fixtures, running the CLI binary, copying and
//! rewriting model folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared`, beside the checkout (CI clones next to it).
pub fn shared() -> PathBuf {
    let p = repo().join("../shared");
    assert!(p.join("fixtures").exists(), "the shared fixtures are expected at {}", p.display());
    p
}

pub fn default_model() -> PathBuf {
    repo().join("assets/stories260k")
}

pub fn val_text() -> PathBuf {
    shared().join("data/tinystories_val.txt")
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn whittle(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_whittle")).args(args).output().expect("run whittle");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command that must succeed with `--json` and returns the parsed JSON.
pub fn whittle_json(args: &[&str]) -> serde_json::Value {
    let out = whittle(args);
    assert_eq!(out.code, 0, "whittle {args:?} failed: {}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{}", out.stdout))
}

/// Copies a model folder's files into a new temp dir.
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(src).expect("read model dir") {
        let e = e.expect("entry");
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
        }
    }
    dir
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
