//! Helpers for the integration tests: run the `tern` binary, pull models through it.
#![allow(dead_code)]

pub mod engine;

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern")).args(args).output().expect("cannot run tern")
}

/// Runs tern and returns stdout, failing the test with stderr when tern fails.
pub fn tern_ok(args: &[&str]) -> String {
    let out = tern(args);
    assert!(out.status.success(), "tern {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs tern expecting a clean failure: exit code 1 and an `error:` line, no panic.
pub fn tern_err(args: &[&str]) -> String {
    let out = tern(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "tern {args:?} should fail cleanly; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "tern {args:?} panicked:\n{stderr}");
    assert!(stderr.contains("error:"), "no error message:\n{stderr}");
    stderr
}

/// The GGUF file of a known model, pulled with `tern pull` (tern's own pull code) if needed.
pub fn model_path(key: &str) -> PathBuf {
    PathBuf::from(tern_ok(&["pull", key]).trim())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
