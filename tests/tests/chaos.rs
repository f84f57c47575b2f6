//! A bounded chaos run (about a minute; `cargo xtask chaos --minutes N` runs it longer):
//! random SIGKILLs of agents, the controller and nodes, deploys cut short and network
//! partitions, with the invariant checked after every heal. See `drover_tests::chaos`.

use std::time::Duration;

use drover_tests::chaos::{Options, run};

#[test]
fn random_faults_never_leave_hosts_running_other_than_a_deploy_in_effect() {
    let secs = std::env::var("DROVER_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let seed = std::env::var("DROVER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    let report = run(Options::new(Duration::from_secs(secs), seed));
    eprintln!("chaos (seed {seed}):\n{report}");
    assert!(
        report.checks > 1,
        "the run checked nothing after its first deploy"
    );
    assert!(
        report.violations.is_empty(),
        "seed {seed}: {} invariant violations:\n{report}",
        report.violations.len()
    );
}
