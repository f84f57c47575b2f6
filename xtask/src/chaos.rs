//! `cargo xtask chaos --minutes N`: the chaos run of `tests/tests/chaos.rs` for as long as
//! asked, with its report printed (CI runs a bounded one as part of the suite). With
//! `--ha`, the failover history check of `tests/tests/ha_history.rs` instead: leaders
//! SIGKILLed and paused past their lease while clients deploy.

use anyhow::{Context, bail};

use crate::project_root;

/// Builds the binaries, then runs the chaos test (with `ha`, the failover history
/// check, with `lease` when given) for `minutes` with `seed` (random when absent; the
/// run prints it either way).
pub(crate) fn run(
    minutes: u64,
    seed: Option<u64>,
    ha: bool,
    lease: Option<String>,
) -> anyhow::Result<()> {
    crate::test::cargo(&["build", "--workspace", "--bins", "--locked"])?;
    let mut cmd = crate::cargo_command();
    cmd.args([
        "test",
        "--locked",
        "-p",
        "drover-tests",
        "--test",
        if ha { "ha_history" } else { "chaos" },
        "--",
        "--nocapture",
    ])
    .env("DROVER_CHAOS_SECS", (minutes.max(1) * 60).to_string())
    .current_dir(project_root());
    if let Some(seed) = seed {
        cmd.env("DROVER_CHAOS_SEED", seed.to_string());
    }
    if let Some(lease) = lease {
        cmd.env("DROVER_CHAOS_LEASE", lease);
    }
    let status = cmd.status().context("cannot run cargo test")?;
    if !status.success() {
        bail!("the chaos run found violations or failed ({status})");
    }
    Ok(())
}
