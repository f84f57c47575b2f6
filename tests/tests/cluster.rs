//! The first vertical slice: agents connect to a controller over QUIC with mutual TLS,
//! and `drover get-instances` lists them, follows their loss and their return.

use std::time::{Duration, Instant};

use drover_tests::{Cluster, PATIENCE, eventually};

fn instance_names(c: &Cluster, addr: std::net::SocketAddr) -> Vec<String> {
    let out = c.drover(addr, &["get-instances"]);
    assert_eq!(out.code, Some(0), "get-instances failed: {}", out.stderr);
    out.json()
        .as_object()
        .expect("get-instances prints an object")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn get_instances_lists_agents_and_drops_a_killed_one() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    let started = Instant::now();
    let mut a1 = c.start_agent("agent-1", addr);
    let _a2 = c.start_agent("agent-2", addr);

    eventually("both agents listed", PATIENCE, || {
        (instance_names(&c, addr) == ["agent-1", "agent-2"]).then_some(())
    });
    eprintln!(
        "both agents listed {:?} after their start",
        started.elapsed()
    );

    // The shape zeek-client prints: keyed by name, host observed by the controller.
    let out = c.drover(addr, &["get-instances"]);
    assert_eq!(
        out.stdout,
        "{\n  \"agent-1\": {\n    \"host\": \"127.0.0.1\"\n  },\n  \"agent-2\": {\n    \"host\": \"127.0.0.1\"\n  }\n}\n"
    );
    let log = controller.wait_log("agent 'agent-2' connected from 127.0.0.1:");
    assert!(
        log.contains("agent 'agent-1' connected from 127.0.0.1:"),
        "{log}"
    );

    let killed = Instant::now();
    a1.kill();
    eventually("agent-1 to drop out", PATIENCE, || {
        (instance_names(&c, addr) == ["agent-2"]).then_some(())
    });
    eprintln!(
        "agent-1 dropped out {:?} after SIGKILL (idle timeout {:?})",
        killed.elapsed(),
        c.idle_timeout
    );
    controller.wait_log("agent 'agent-1' lost:");
}

#[test]
fn agents_reconnect_when_the_controller_restarts() {
    let c = Cluster::new();
    let (mut controller, addr) = c.start_controller("127.0.0.1:0");
    let a1 = c.start_agent("agent-1", addr);
    eventually("agent listed", PATIENCE, || {
        (instance_names(&c, addr) == ["agent-1"]).then_some(())
    });
    controller.kill();
    a1.wait_log("lost the controller");

    // Same port: the agent keeps dialling it with backoff.
    let (_controller, addr2) = c.start_controller(&addr.to_string());
    assert_eq!(addr, addr2);
    eventually("agent back after the restart", PATIENCE, || {
        (instance_names(&c, addr) == ["agent-1"]).then_some(())
    });
    let log = a1.log_text();
    assert!(
        log.matches("connected to controller").count() >= 2,
        "agent should have connected twice:\n{log}"
    );
}

/// A controller killed and started again on its address and state dir answers the
/// agents' next keep-alive with a stateless reset they believe (its key is kept in the
/// state dir), so they dial again at once instead of waiting out their idle timeout,
/// which here is a minute.
#[test]
fn agents_learn_at_once_that_a_controller_started_again_after_a_crash_lost_them() {
    let mut c = Cluster::new();
    c.idle_timeout = Duration::from_secs(60);
    let (mut controller, addr) = c.start_controller("127.0.0.1:0");
    let a1 = c.start_agent("agent-1", addr);
    eventually("agent listed", PATIENCE, || {
        (instance_names(&c, addr) == ["agent-1"]).then_some(())
    });
    let key = c.dir.path().join("controller").join("quic-reset.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());

    controller.kill();
    let restarted = Instant::now();
    let (_controller, addr2) = c.start_controller(&addr.to_string());
    assert_eq!(addr, addr2);
    let log = a1.wait_log("reset the connection");
    let lost = log
        .lines()
        .find(|l| l.contains("lost the controller"))
        .unwrap_or_default()
        .to_owned();
    eventually("agent back after the restart", PATIENCE, || {
        (instance_names(&c, addr) == ["agent-1"]).then_some(())
    });
    // Well within the idle timeout: the reset came at the next keep-alive.
    assert!(
        restarted.elapsed() < Duration::from_secs(20),
        "back after {:?}; {lost}",
        restarted.elapsed()
    );
    assert_eq!(
        a1.log_text().matches("connected to controller").count(),
        2,
        "{}",
        a1.log_text()
    );
}

#[test]
fn agent_started_before_the_controller_connects_once_it_is_up() {
    let c = Cluster::new();
    // Find a free port by binding one and releasing it.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let a1 = c.start_agent("agent-1", addr);
    a1.wait_log("cannot connect to the controller");
    let (_controller, _) = c.start_controller(&addr.to_string());
    eventually("agent listed", PATIENCE, || {
        (instance_names(&c, addr) == ["agent-1"]).then_some(())
    });
}

#[test]
fn sigterm_stops_the_daemons_cleanly() {
    let c = Cluster::new();
    let (mut controller, addr) = c.start_controller("127.0.0.1:0");
    let mut a1 = c.start_agent("agent-1", addr);
    controller.wait_log("agent 'agent-1' connected");
    a1.signal(nix::sys::signal::Signal::SIGTERM);
    let status = a1.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "agent exit: {status:?}");
    // A clean close is seen at once, not after the idle timeout.
    controller.wait_log("agent 'agent-1' lost: agent closed the connection");
    controller.signal(nix::sys::signal::Signal::SIGTERM);
    let status = controller.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "controller exit: {status:?}");
    assert!(controller.log_text().contains("controller stopped"));
}

#[test]
fn example_cluster_files_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("deploy/examples") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            drover_proto::config::parse_toml(&path.display().to_string(), &text)
                .unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n > 0, "no example in {}", dir.display());
}
