//! Tidy checks, run as ordinary tests so `cargo test` enforces them.

use std::fs;
use std::path::{Path, PathBuf};

use crate::project_root;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && name != ".git" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let root = project_root();
    for dir in ["crates", "xtask", "tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "found too few files: {files:?}");
    files
}

#[test]
fn every_file_starts_with_module_docs() {
    let missing: Vec<_> = all_rust_files()
        .into_iter()
        .filter(|p| {
            let text = fs::read_to_string(p).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a `//!` header: {missing:?}"
    );
}

#[test]
fn no_allow_attributes_ignored_or_should_panic_tests() {
    // Spelled in pieces so this file does not trip its own check.
    let banned = [
        concat!("#[", "allow("),
        concat!("#![", "allow("),
        concat!("#[", "ignore"),
        concat!("#[", "should_panic"),
    ];
    let mut offenders = Vec::new();
    for p in all_rust_files() {
        let text = fs::read_to_string(&p).unwrap();
        for b in banned {
            if text.contains(b) {
                offenders.push(format!("{}: {b}", p.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "use #[expect(lint, reason = \"...\")], and no ignored or should_panic tests: {offenders:?}"
    );
}

#[test]
fn only_the_ring_crypto_provider_is_built() {
    // Two rustls providers in one build make rustls' default builders panic.
    let lock = fs::read_to_string(project_root().join("Cargo.lock")).unwrap();
    for banned in [
        "name = \"aws-lc-rs\"",
        "name = \"aws-lc-sys\"",
        "name = \"openssl-sys\"",
    ] {
        assert!(!lock.contains(banned), "Cargo.lock contains {banned}");
    }
    assert!(lock.contains("name = \"ring\""));
}

#[test]
fn no_trailing_whitespace() {
    let mut offenders = Vec::new();
    for p in all_rust_files() {
        let text = fs::read_to_string(&p).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.ends_with(' ') || line.ends_with('\t') {
                offenders.push(format!("{}:{}", p.display(), i + 1));
            }
        }
    }
    assert!(offenders.is_empty(), "trailing whitespace: {offenders:?}");
}

#[test]
fn docs_mention_every_crate() {
    let arch = fs::read_to_string(project_root().join("ARCHITECTURE.md")).unwrap();
    for e in fs::read_dir(project_root().join("crates"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().into_string().unwrap();
        assert!(
            arch.contains(&format!("crates/{name}")),
            "ARCHITECTURE.md does not describe crates/{name}"
        );
    }
}
