//! An agent behind a link with 20 % packet loss and 200 ms delay each way: no flapping
//! between lost and joined while keep-alives get through, requests finish or time out
//! with per-instance errors, and everything recovers when the link heals.

use std::time::{Duration, Instant};

use drover_tests::lossy::{Impairment, LossyLink};
use drover_tests::{Cluster, PATIENCE, bin, eventually};

#[test]
fn twenty_percent_loss_and_200ms_delay_cause_no_flapping() {
    let mut c = Cluster::new();
    // Liveness as a production cluster would set it: a few keep-alives per idle timeout.
    c.keep_alive = Duration::from_secs(1);
    c.idle_timeout = Duration::from_secs(6);
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let link = LossyLink::start(
        addr,
        Impairment {
            loss: 0.0,
            delay: Duration::ZERO,
        },
    );
    let _agent = c.start_agent("agent-1", link.addr);
    eventually("agent through the relay", PATIENCE, || {
        c.drover(addr, &["get-instances"])
            .json()
            .get("agent-1")
            .map(|_| ())
    });
    let file = c.dir.path().join("l.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );

    link.set(Impairment {
        loss: 0.2,
        delay: Duration::from_millis(200),
    });
    let start = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    let mut slowest = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(15) {
        let t = Instant::now();
        let out = c.drover(addr, &["get-nodes"]);
        slowest = slowest.max(t.elapsed());
        // Either the answer, or a per-instance error: never a hang, never a crash.
        let v = out.json();
        if out.code == Some(0) {
            ok += 1;
            assert_eq!(v["results"]["agent-1"]["n"]["state"], "RUNNING");
        } else {
            failed += 1;
            assert_eq!(v["errors"][0]["source"], "agent-1", "{v}");
        }
    }
    eprintln!(
        "under 20% loss and 200 ms delay: {ok} get-nodes answered, {failed} per-instance errors, slowest {slowest:?}"
    );
    assert!(ok > 0, "requests get through");
    let log = ctl.log_text();
    assert!(
        !log.contains("agent 'agent-1' lost"),
        "no flapping while keep-alives get through:\n{log}"
    );

    link.set(Impairment {
        loss: 0.0,
        delay: Duration::ZERO,
    });
    let t = Instant::now();
    let out = c.drover(addr, &["get-nodes"]);
    assert_eq!(out.code, Some(0));
    eprintln!("healed link: get-nodes in {:?}", t.elapsed());
}
