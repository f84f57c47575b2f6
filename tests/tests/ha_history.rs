//! A short history check of deploys across leader failovers (`cargo xtask chaos --ha
//! --minutes N` runs it long): three etcd members, three controllers, two agents, three
//! clients deploying while leaders are SIGKILLed and paused past their lease. See
//! `drover_tests::ha_chaos`.

use std::time::Duration;

use drover_tests::ha_chaos::{Options, run};

#[test]
fn deploys_across_leader_failovers_lose_nothing_acknowledged() {
    if !drover_tests::etcd::available() {
        return;
    }
    let (secs, seed) = drover_tests::chaos::secs_and_seed_from_env(15);
    let mut opts = Options::new(Duration::from_secs(secs), seed);
    if let Ok(lease) = std::env::var("DROVER_CHAOS_LEASE") {
        opts.lease = lease;
    }
    eprintln!(
        "failover history check: seed {seed}, {secs} s, lease {}",
        opts.lease
    );
    let report = run(&opts);
    eprintln!("failover history (seed {seed}):\n{report}");
    assert!(
        report.total_failovers() >= 3 && report.acked > 0,
        "seed {seed}: the run did too little:\n{report}"
    );
    assert!(
        report.violations.is_empty(),
        "seed {seed}: {} violations:\n{report}",
        report.violations.len()
    );
}
