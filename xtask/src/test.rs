//! `cargo xtask test`: the test suite exactly as CI runs it.

use std::process::Command;

use anyhow::{Context, bail};

use crate::project_root;

pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = crate::cargo_command()
        .args(args)
        .current_dir(project_root())
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn have_nextest() -> bool {
    Command::new("cargo-nextest")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the suite; `lint` adds the format and clippy checks.
pub(crate) fn run(lint: bool) -> anyhow::Result<()> {
    if lint {
        cargo(&["fmt", "--all", "--", "--check"])?;
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    // End-to-end tests run the real binaries, so build them first.
    cargo(&["build", "--workspace", "--bins", "--locked"])?;
    if have_nextest() {
        // Doc tests first: nextest does not run them, and its summary should close the run.
        cargo(&["test", "--workspace", "--doc", "--locked", "--quiet"])?;
        cargo(&[
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--no-fail-fast",
        ])?;
    } else {
        eprintln!("cargo-nextest not found; using cargo test");
        cargo(&["test", "--workspace", "--locked", "--no-fail-fast"])?;
    }
    Ok(())
}
