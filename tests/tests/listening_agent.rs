//! The controller dials agents that listen (Zeek's controller-to-agent mode).

use std::net::SocketAddr;
use std::time::Duration;

use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, TlsFiles};
use drover_proto::msg::{API_VERSION, Hello, PeerRole};
use drover_tests::{Cluster, PATIENCE, bin, eventually, free_udp_port};

#[test]
fn controller_dials_a_listening_agent_deploys_and_redials_after_restart() {
    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let port = free_udp_port();
    let agent_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let agent = c.start_listening_agent("agent-1", agent_addr);
    agent.wait_log("listening for the controller");

    let file = c.dir.path().join("listen.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\nhost = \"127.0.0.1\"\nport = {port}\n[nodes.n1]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    let out = c.drover(addr, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let instances = eventually("controller dialled the agent", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        v.get("agent-1").cloned()
    });
    assert_eq!(
        instances,
        serde_json::json!({"host": "127.0.0.1", "port": port}),
        "zeek-client shows the port of agents the controller dials"
    );
    let out = c.drover(addr, &["deploy"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    let pid = eventually("node running", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        v["results"]["agent-1"]["n1"]["pid"].as_u64()
    });

    // A restarted controller dials the deployed configuration's agents again.
    ctl.kill();
    let (_ctl2, addr2) = c.start_controller(&addr.to_string());
    let again = eventually("node seen again", PATIENCE, || {
        let v = c.drover(addr2, &["get-nodes"]).json();
        v["results"]["agent-1"]["n1"]["pid"].as_u64()
    });
    assert_eq!(again, pid);
    drop(agent);
}

/// A listening agent killed and started again on its address and state dir answers the
/// controller's next keep-alive with a stateless reset the controller believes (the
/// agent keeps its key in its state dir), so the controller dials it again at once
/// rather than after its idle timeout, which here is a minute.
#[test]
fn a_controller_learns_at_once_that_a_listening_agent_started_again_lost_it() {
    let mut c = Cluster::new();
    c.idle_timeout = Duration::from_secs(60);
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let port = free_udp_port();
    let agent_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut agent = c.start_listening_agent("agent-1", agent_addr);
    agent.wait_log("listening for the controller");
    let file = c.dir.path().join("listen.toml");
    std::fs::write(
        &file,
        format!("[instances.agent-1]\nhost = \"127.0.0.1\"\nport = {port}\n"),
    )
    .unwrap();
    let out = c.drover(addr, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    ctl.wait_log("agent 'agent-1' connected");

    agent.kill();
    let restarted = std::time::Instant::now();
    let agent = c.start_listening_agent("agent-1", agent_addr);
    agent.wait_log("listening for the controller");
    let log = ctl.wait_log("reset the connection");
    eventually("the controller dialled the new agent", PATIENCE, || {
        (ctl.log_text().matches("agent 'agent-1' connected").count() == 2).then_some(())
    });
    assert!(
        restarted.elapsed() < Duration::from_secs(20),
        "back after {:?}:\n{log}",
        restarted.elapsed()
    );
}

/// A listening agent the controller cannot connect to (here another agent answers at
/// its address) is warned of in the controller's log, naming the cause, once: the
/// repeats of the same cause are at debug level.
#[test]
fn a_dialled_agent_that_cannot_be_reached_is_warned_of_once() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let port = free_udp_port();
    let agent = c.start_listening_agent("agent-2", ([127, 0, 0, 1], port).into());
    agent.wait_log("listening for the controller");
    let file = c.dir.path().join("listen.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\nhost = \"127.0.0.1\"\nport = {port}\n[nodes.n1]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    let out = c.drover(addr, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let attempts = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("cannot connect to agent") && l.contains("agent-1"))
            .map(str::to_owned)
            .collect()
    };
    let lines = eventually("three failed dials", PATIENCE, || {
        let lines = attempts(&ctl.log_text());
        (lines.len() >= 3).then_some(lines)
    });
    let warned: Vec<&String> = lines.iter().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warned.len(), 1, "{lines:#?}");
    assert!(
        warned[0].contains("certificate not valid"),
        "the cause is named: {}",
        warned[0]
    );
}

#[test]
fn only_the_controller_may_connect_to_a_listening_agent() {
    let c = Cluster::new();
    let agent_addr: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
    let agent = c.start_listening_agent("agent-1", agent_addr);
    agent.wait_log("listening for the controller");
    let creds = Credentials::load(&TlsFiles {
        ca: c.pki_file("ca.crt"),
        cert: c.pki_file("ops.crt"),
        key: c.pki_file("ops.key"),
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        let settings = TransportSettings::default();
        let endpoint = conn::client_endpoint(&creds, &settings, agent_addr).unwrap();
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Client,
            name: "ops".into(),
            software: "test".into(),
            lost_term: None,
        };
        conn::dial(
            &endpoint,
            None,
            agent_addr,
            "agent-1",
            hello,
            PeerRole::Agent,
            Some("agent-1"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string()
    });
    assert!(
        err.contains("only the controller may connect to an agent"),
        "{err}"
    );
    agent.wait_log("refused connection: only the controller may connect to an agent, not a client");
}
