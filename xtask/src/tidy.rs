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

#[test]
fn inner_cargo_runs_without_the_package_variables_of_cargo_run() {
    // The test runs under cargo, which set these for this package just as `cargo run`
    // sets them for xtask.
    for must in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "CARGO_PKG_VERSION"] {
        assert!(std::env::var_os(must).is_some(), "{must} is not set");
    }
    let cmd = crate::cargo_command();
    let removed: Vec<String> = cmd
        .get_envs()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    for (name, _) in std::env::vars() {
        let package = [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_MANIFEST_LINKS",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .contains(&name.as_str())
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_");
        assert_eq!(
            removed.contains(&name),
            package,
            "{name} should {}be removed from the inner cargo's environment",
            if package { "" } else { "not " }
        );
    }
    for kept in [
        "CARGO",
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_JOBS",
    ] {
        assert!(!removed.iter().any(|r| r == kept), "{kept} was removed");
    }
}

#[test]
fn xtask_spawns_cargo_only_through_cargo_command() {
    // Spelled in pieces so this file does not trip its own check.
    let needle = concat!("var", "(\"CARGO\")");
    let needle_os = concat!("var_os", "(\"CARGO\")");
    let mut offenders = Vec::new();
    let mut files = Vec::new();
    rust_files(&project_root().join("xtask/src"), &mut files);
    for p in files {
        let text = fs::read_to_string(&p).unwrap();
        let uses = text.matches(needle).count() + text.matches(needle_os).count();
        let allowed = usize::from(p.ends_with("xtask/src/main.rs"));
        if uses > allowed {
            offenders.push(p.display().to_string());
        }
    }
    assert!(
        offenders.is_empty(),
        "spawn cargo with crate::cargo_command(), which drops cargo run's package variables: {offenders:?}"
    );
}

#[test]
fn the_agents_pure_cores_do_no_io_and_read_no_clock() {
    // What would let them touch the world; their tests are held to the same.
    const FORBIDDEN: &[&str] = &[
        "std::fs",
        "std::net",
        "std::process",
        "std::thread",
        "std::io::",
        "std::os::",
        "tokio",
        "Instant::now",
        "SystemTime",
        "libc::",
        "nix::unistd",
        "nix::sys::signal::kill",
        "crate::sys",
        "crate::cgroup",
        "crate::keeper::client",
        "crate::supervisor",
        "crate::spawner",
    ];
    let src = project_root().join("crates/agent/src");
    let mut files = Vec::new();
    for core in ["machine", "book", "converge", "apply", "ops", "waiters"] {
        files.push(src.join(format!("{core}.rs")));
        rust_files(&src.join(core), &mut files);
    }
    let mut found = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN.iter().filter(|w| code.contains(*w)) {
                found.push(format!("{}:{}: {word}", f.display(), n + 1));
            }
        }
    }
    assert!(files.len() >= 9, "the pure cores moved: {files:?}");
    assert!(
        found.is_empty(),
        "I/O or the clock in a pure core:\n{}",
        found.join("\n")
    );
}

/// Every metric a daemon serves is in docs/metrics.md, where operators look for it.
#[test]
fn every_metric_is_documented() {
    let docs = fs::read_to_string(project_root().join("docs/metrics.md")).unwrap();
    let mut missing = Vec::new();
    let (crates, own) = (
        project_root().join("crates"),
        project_root().join("crates/metrics"),
    );
    for file in all_rust_files() {
        // What the daemons serve; the metrics crate's own tests use names of their own.
        if !file.starts_with(&crates) || file.starts_with(&own) {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("\"drover_") {
            let name: String = text[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if text[i + 1 + name.len()..].starts_with('"')
                && !name.ends_with('_')
                && !docs.contains(&format!("`{name}`"))
                && !missing.contains(&name)
            {
                missing.push(name);
            }
        }
    }
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
}
