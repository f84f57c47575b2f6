//! Upgrades with real processes, each daemon's binary replaced by another file: an agent
//! upgrade (`on_exit = "keep"`, SIGTERM as `systemctl restart` sends, the new binary
//! adopts) leaves every node running with its pid; a controller upgrade (SIGTERM, the
//! new binary on the same state dir and address) restarts nothing and keeps the desired
//! and deployed generations and the audit trail; a peer of another API version is
//! refused with an error naming both versions and both programs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, TlsFiles};
use drover_proto::msg::{API_VERSION, Hello, PeerRole};
use drover_tests::{Cluster, PATIENCE, Proc, addr_in_log, alive, bin, eventually, free_udp_port};
use nix::sys::signal::Signal;

/// A copy of binary `name` at `<test dir>/<release>/name`: a release being installed.
fn release(c: &Cluster, release: &str, name: &str) -> PathBuf {
    let dir = c.dir.path().join(release);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::copy(bin(name), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A cluster file with three testprog nodes on agent-1.
fn cluster_file(c: &Cluster) -> PathBuf {
    let prog = bin("drover-testprog");
    let mut text = "[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n[instances.agent-1]\n".to_owned();
    for n in ["n1", "n2", "n3"] {
        text.push_str(&format!(
            "[nodes.{n}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--sleep-forever\"]\n",
            prog.display()
        ));
    }
    let path = c.dir.path().join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// node -> (pid, restarts) once all three run, asking the agent.
fn running(c: &Cluster, addr: SocketAddr) -> BTreeMap<String, (u64, u64)> {
    eventually("three nodes running", PATIENCE, || {
        let out = c.drover(addr, &["get-nodes", "--fresh"]);
        if out.code != Some(0) {
            return None;
        }
        let v = out.json();
        let nodes = v["results"]["agent-1"].as_object()?;
        let mut found = BTreeMap::new();
        for (name, n) in nodes {
            if n["mgmt_role"].is_null() {
                if n["state"] != "RUNNING" {
                    return None;
                }
                found.insert(
                    name.clone(),
                    (n["pid"].as_u64()?, n["restarts"].as_u64().unwrap_or(0)),
                );
            }
        }
        (found.len() == 3).then_some(found)
    })
}

fn agent_from(c: &Cluster, exe: &PathBuf, addr: SocketAddr, log: &str) -> Proc {
    let mut cmd = Command::new(exe);
    c.agent_args(
        &mut cmd,
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string(), "--on-exit", "keep"],
    );
    Proc::spawn(log, cmd, c.log_path(log))
}

fn controller_from(c: &Cluster, exe: &PathBuf, listen: &str, log: &str) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(exe);
    c.controller_args(&mut cmd, listen);
    let p = Proc::spawn(log, cmd, c.log_path(log));
    let text = p.wait_log("controller listening");
    (p, addr_in_log(&text, "controller listening"))
}

#[test]
fn an_agent_upgrade_with_on_exit_keep_restarts_no_node() {
    let c = Cluster::new();
    c.issue(PeerRole::Agent, "agent-1");
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let old = release(&c, "v1", "drover-agent");
    let new = release(&c, "v2", "drover-agent");
    let mut agent = agent_from(&c, &old, addr, "agent-v1");
    agent.wait_log("connected to controller");
    let out = c.drover(addr, &["deploy-config", cluster_file(&c).to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let before = running(&c, addr);

    // What `systemctl restart drover-agent` does: SIGTERM, then the unit's ExecStart,
    // which now names the new binary.
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(PATIENCE).success());
    for (node, (pid, _)) in &before {
        assert!(alive(*pid), "{node} (pid {pid}) died with the old agent");
    }
    let agent = agent_from(&c, &new, addr, "agent-v2");
    agent.wait_log("connected to controller");
    let exe = std::fs::read_link(format!("/proc/{}/exe", agent.pid())).unwrap();
    assert_eq!(exe, new);

    let after = running(&c, addr);
    assert_eq!(after, before, "pids and restart counts must not change");
    let log = agent.log_text();
    assert!(
        !log.contains("started node"),
        "the new agent started a node:\n{log}"
    );
}

#[test]
fn a_controller_upgrade_restarts_nothing_and_keeps_its_state() {
    let c = Cluster::new();
    let old = release(&c, "v1", "drover-controller");
    let new = release(&c, "v2", "drover-controller");
    let (mut ctl, addr) = controller_from(&c, &old, "127.0.0.1:0", "controller-v1");
    let agent = c.start_agent("agent-1", addr);
    agent.wait_log("connected to controller");
    let out = c.drover(addr, &["deploy-config", cluster_file(&c).to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let before = running(&c, addr);
    let deployed = c
        .drover(addr, &["get-config", "--deployed", "--as-json"])
        .stdout;
    let audit_before = c.drover(addr, &["audit"]).stdout;
    assert_eq!(audit_before.lines().count(), 2, "{audit_before}");
    let started = agent.log_text().matches("started node").count();

    ctl.signal(Signal::SIGTERM);
    assert!(ctl.wait_exit(PATIENCE).success());
    for (node, (pid, _)) in &before {
        assert!(alive(*pid), "{node} (pid {pid}) died with the controller");
    }
    let (ctl, again) = controller_from(&c, &new, &addr.to_string(), "controller-v2");
    assert_eq!(again, addr);
    let exe = std::fs::read_link(format!("/proc/{}/exe", ctl.pid())).unwrap();
    assert_eq!(exe, new);
    ctl.wait_log("agent 'agent-1' connected");

    assert_eq!(running(&c, addr), before);
    assert_eq!(
        c.drover(addr, &["get-config", "--deployed", "--as-json"])
            .stdout,
        deployed
    );
    let status = c.drover(addr, &["status"]).stdout;
    assert!(!status.contains("lags"), "{status}");
    assert_eq!(c.drover(addr, &["audit"]).stdout, audit_before);
    assert_eq!(
        agent.log_text().matches("started node").count(),
        started,
        "the agent started a node after the controller upgrade"
    );
}

/// Dials `addr` with `file`'s certificate as `role`, speaking the next API version;
/// returns the refusal.
fn dial_next_version(
    c: &Cluster,
    file: &str,
    role: PeerRole,
    addr: SocketAddr,
    expect: PeerRole,
    name: &str,
) -> String {
    let creds = Credentials::load(&TlsFiles {
        ca: c.pki_file("ca.crt"),
        cert: c.pki_file(&format!("{file}.crt")),
        key: c.pki_file(&format!("{file}.key")),
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let settings = TransportSettings::default();
        let endpoint = conn::client_endpoint(&creds, &settings, addr).unwrap();
        let hello = Hello {
            api_version: API_VERSION + 1,
            role,
            name: file.to_owned(),
            software: "drover-next 9.0.0".into(),
            lost_term: None,
        };
        tokio::time::timeout(
            Duration::from_secs(15),
            conn::dial(
                &endpoint,
                None,
                addr,
                name,
                hello,
                expect,
                None,
                Duration::from_secs(5),
            ),
        )
        .await
        .expect("refused in time")
        .expect_err("another api version must be refused")
        .to_string()
    })
}

#[test]
fn a_peer_of_another_api_version_is_refused_naming_both_versions() {
    let c = Cluster::new();
    let version = env!("CARGO_PKG_VERSION");
    let next = API_VERSION + 1;
    // An agent of the next release dialling this controller.
    c.issue(PeerRole::Agent, "agent-9");
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let err = dial_next_version(
        &c,
        "agent-9",
        PeerRole::Agent,
        addr,
        PeerRole::Controller,
        "127.0.0.1",
    );
    let want = format!(
        "api version mismatch: peer speaks {next} (drover-next 9.0.0), this side speaks {API_VERSION} (drover-controller {version})"
    );
    assert!(err.ends_with(&want), "{err}");
    ctl.wait_log(&want);

    // A controller of the next release dialling this agent, which listens.
    let agent_addr: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
    let agent = c.start_listening_agent("agent-1", agent_addr);
    agent.wait_log("listening for the controller");
    let err = dial_next_version(
        &c,
        "controller",
        PeerRole::Controller,
        agent_addr,
        PeerRole::Agent,
        "agent-1",
    );
    let want = format!(
        "api version mismatch: peer speaks {next} (drover-next 9.0.0), this side speaks {API_VERSION} (drover-agent {version})"
    );
    assert!(err.ends_with(&want), "{err}");
    agent.wait_log(&want);
}

/// Within one API version, peers of different releases understand each other: on a live
/// controller, a field it does not know is ignored, and a request type it does not know
/// gets an error reply naming it, while the connection serves on.
#[test]
fn unknown_fields_are_ignored_and_unknown_requests_refused_within_a_version() {
    use drover_net::frame::{read_frame, write_frame};
    use serde_json::{Value, json};
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (endpoint, conn) = c.client_connection(addr).await;
        let ask = |frame: Value| {
            let conn = conn.clone();
            async move {
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                write_frame(&mut send, &frame).await.unwrap();
                send.finish().unwrap();
                tokio::time::timeout(
                    Duration::from_secs(15),
                    read_frame::<Value>(&mut recv, 16 << 20),
                )
                .await
                .expect("an answer in time")
                .unwrap()
                .expect("a reply frame")
            }
        };
        let reply = ask(json!({
            "id": "a",
            "body": {"type": "get_instances", "colour": "red"},
            "priority": 3,
        }))
        .await;
        assert_eq!(reply["id"], "a", "{reply}");
        assert!(reply["result"].get("Ok").is_some(), "{reply}");

        let reply = ask(json!({"id": "b", "body": {"type": "teleport_nodes"}})).await;
        let err = &reply["result"]["Err"];
        assert!(err.is_object(), "{reply}");
        assert!(
            err["message"]
                .as_str()
                .unwrap_or("")
                .contains("teleport_nodes"),
            "the error names the request type: {reply}"
        );

        let reply = ask(json!({"id": "c", "body": {"type": "get_instances"}})).await;
        assert!(reply["result"].get("Ok").is_some(), "still served: {reply}");
        endpoint.close(0u32.into(), b"done");
    });
}
