//! `cargo xtask bench deploy --store etcd`: what a deploy costs with the etcd store
//! against the state dir, in one run.
//!
//! For each store: the example cluster of `deploy/examples/local.toml` (two agents, four
//! nodes) on this machine, with one controller on a state dir, then three controllers on
//! a three-member etcd cluster; the example is deployed once, then `drover deploy` of the
//! unchanged staged configuration is timed `--store-runs` times (wall time of the CLI,
//! which connects, deploys and waits for the answer, audit record included). Prints the
//! median and quartiles of each and the difference of the medians.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::{Cluster, run_ok};
use crate::project_root;

/// Deploys of the unchanged configuration timed per store.
pub(crate) const RUNS: usize = 25;

/// The medians, in ms, of the state dir and etcd.
fn one_store(bin: &Path, dir: &Path, etcd: bool, runs: usize) -> anyhow::Result<Vec<f64>> {
    let _ = std::fs::remove_dir_all(dir);
    let cluster = Cluster::start_in(dir, bin, 2, 0, None, etcd)?;
    let example = project_root().join("deploy/examples/local.toml");
    run_ok(cluster.client().arg("deploy-config").arg(&example))
        .context("the first deploy of the example")?;
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let out = cluster
            .client()
            .arg("deploy")
            .output()
            .context("cannot run `drover deploy`")?;
        let took = t.elapsed();
        if !out.status.success() {
            bail!(
                "drover deploy failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        ms.push(took.as_secs_f64() * 1000.0);
        // Apart, as an operator's deploys are.
        std::thread::sleep(Duration::from_millis(50));
    }
    ms.sort_by(f64::total_cmp);
    drop(cluster);
    Ok(ms)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// Runs both stores with the binaries in `bin` and prints the table.
pub(crate) fn run(bin: &Path, runs: usize) -> anyhow::Result<()> {
    let base = project_root().join("target/bench/deploy-store");
    let file = one_store(bin, &base.join("file"), false, runs)?;
    let etcd = one_store(bin, &base.join("etcd"), true, runs)?;
    println!(
        "\ndeploy of an unchanged configuration (example: 2 agents, 4 nodes), {runs} runs per store, wall time of `drover deploy`"
    );
    println!("{:<32} {:>8} {:>8} {:>8}", "store", "p25", "median", "p75");
    for (name, v) in [
        ("state dir (--store file)", &file),
        ("etcd, 3 members (--store etcd)", &etcd),
    ] {
        println!(
            "{name:<32} {:>6.1}ms {:>6.1}ms {:>6.1}ms",
            quantile(v, 0.25),
            quantile(v, 0.5),
            quantile(v, 0.75)
        );
    }
    let diff = quantile(&etcd, 0.5) - quantile(&file, 0.5);
    println!("etcd costs {diff:+.1} ms per deploy (median; target: at most +10 ms)");
    Ok(())
}
