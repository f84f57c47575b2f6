//! `cargo xtask test`: the test suite exactly as CI runs it.

use std::process::Command;

use anyhow::{Context, bail};

use crate::project_root;

pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let mut cmd = crate::cargo_command();
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_user_setting) {
            cmd.env_remove(name);
        }
    }
    let status = cmd
        .args(args)
        .current_dir(project_root())
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The test harness's own variables (tests/src, the chaos, crash and golden tests):
/// what a contributor sets to steer the suite.
const HARNESS: &[&str] = &[
    "DROVER_BIN_DIR",
    "DROVER_KEEP_TEST_DIR",
    "DROVER_SKIP_ETCD_TESTS",
    "DROVER_SKIP_SYSTEMD_ANALYZE",
    "DROVER_ZEEK_CLIENT",
    "DROVER_ZEEK_VENV",
    "DROVER_UPDATE_GOLDEN",
    "DROVER_CRASH_SEED",
    "DROVER_CHAOS_SEED",
    "DROVER_CHAOS_SECS",
    "DROVER_CHAOS_LEASE",
];

/// Whether `name` is a setting of the daemons or the CLI that the caller's shell may
/// hold (`DROVER_CA`, `DROVER_CONTROLLER`, `DROVER_LOG_MAX_BYTES`, ...): the tests make
/// their own PKI and daemons, which must not pick those up. The test harness's own
/// variables ([`HARNESS`]) stay.
fn is_user_setting(name: &str) -> bool {
    name.starts_with("DROVER_") && !HARNESS.contains(&name)
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

#[cfg(test)]
mod tests {
    use super::is_user_setting;

    #[test]
    fn the_shells_drover_settings_are_kept_from_the_tests() {
        for name in [
            "DROVER_CA",
            "DROVER_CERT",
            "DROVER_CONTROLLER",
            "DROVER_CONFIG",
        ] {
            assert!(is_user_setting(name), "{name}");
        }
        for name in [
            "DROVER_BIN_DIR",
            "DROVER_KEEP_TEST_DIR",
            "DROVER_SKIP_ETCD_TESTS",
            "DROVER_CRASH_SEED",
            "RUST_LOG",
            "CARGO",
        ] {
            assert!(!is_user_setting(name), "{name}");
        }
    }
}
