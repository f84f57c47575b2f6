//! A bounded chaos run (about a minute; `cargo xtask chaos --minutes N` runs it longer):
//! random SIGKILLs of agents, the controller and nodes, deploys cut short and network
//! partitions, with the invariant checked after every heal. See `drover_tests::chaos`.

use std::time::Duration;

use drover_tests::chaos::{Options, run};

#[test]
fn random_faults_never_leave_hosts_running_other_than_a_deploy_in_effect() {
    let (secs, seed) = drover_tests::chaos::secs_and_seed_from_env(45);
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
