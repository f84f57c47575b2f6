//! Timeouts are results, never hangs: an agent that accepts requests but never answers,
//! one lost under an operator's stop, and zeek-client's test-timeout request.

use std::time::{Duration, Instant};

use drover_tests::{Cluster, MuteAgent, PATIENCE, eventually};

#[test]
fn an_agent_that_never_answers_is_a_per_instance_timeout() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller_with("127.0.0.1:0", &["--request-timeout", "1s"]);
    let _good = c.start_agent("agent-1", addr);
    // A real agent identity over a real connection that accepts every request and
    // answers none.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _mute = MuteAgent::connect(&c, addr, &rt);
    eventually("both agents listed", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        (v.as_object().unwrap().len() == 2).then_some(())
    });

    let started = Instant::now();
    let out = c.drover(addr, &["get-nodes"]);
    let took = started.elapsed();
    assert_eq!(out.code, Some(1));
    let v = out.json();
    assert_eq!(
        v["errors"],
        serde_json::json!([{"source": "mute", "error": "request timed out"}])
    );
    assert_eq!(
        v["results"]["agent-1"]["agent-1"]["mgmt_role"], "AGENT",
        "the other agent answered"
    );
    assert!(
        took < Duration::from_secs(10),
        "answered at the controller's timeout, took {took:?}"
    );

    // The controller stays responsive, and late answers never arrive to confuse it.
    let out = c.drover(addr, &["get-instances"]);
    assert_eq!(out.code, Some(0));
}

#[test]
fn test_timeout_with_and_without_state() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller_with("127.0.0.1:0", &["--request-timeout", "1s"]);
    let out = c.drover(addr, &["test-timeout", "--with-state"]);
    assert_eq!(out.code, Some(0));
    assert_eq!(
        out.json(),
        serde_json::json!({"error": "request timed out", "success": false})
    );
    let mut cmd = std::process::Command::new(drover_tests::bin("drover"));
    cmd.args(["--controller", &addr.to_string(), "--timeout", "2s"])
        .arg("--ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--cert")
        .arg(c.pki_file("ops.crt"))
        .arg("--key")
        .arg(c.pki_file("ops.key"))
        .arg("test-timeout");
    let out = drover_tests::run_cli(cmd, Duration::from_secs(30));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("timed out after 2s"), "{}", out.stderr);
}

/// An agent paused (SIGSTOP) under a stop: its connection is lost at the idle timeout
/// (2 s here), and the stop fails saying that whether it was carried out is not known:
/// the agent may have read it before it was paused, or may read it once resumed.
#[test]
fn a_stop_whose_agent_is_lost_under_it_is_of_unknown_outcome() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    c.deploy_text(
        addr,
        "paused.toml",
        "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\n",
    );
    eventually("n running", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        (v["results"]["agent-1"]["n"]["state"] == "RUNNING").then_some(())
    });
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    let out = c.drover(addr, &["stop", "n"]);
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    let error = v["errors"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the connection to agent 'agent-1' was lost under the request, so whether it was carried out is not known"),
        "{v}"
    );
    // Back, the agent says which it was, and what it says is what runs.
    let n = eventually("the agent back with its node", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes", "--fresh"]);
        (v.code == Some(0)).then(|| v.json()["results"]["agent-1"]["n"].clone())
    });
    match n["state"].as_str() {
        Some("STOPPED") => assert!(n["pid"].is_null(), "{n}"),
        Some("RUNNING") => {
            let pid = n["pid"].as_u64().unwrap();
            assert!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "{n}"
            );
        }
        _ => panic!("neither stopped nor running: {n}"),
    }
}
