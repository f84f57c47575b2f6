//! Timeouts are results, never hangs: an agent that accepts requests but never answers,
//! and zeek-client's test-timeout request.

use std::time::{Duration, Instant};

use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, TlsFiles};
use drover_proto::msg::{API_VERSION, ControllerRequest, Hello, PeerRole, Request, WireError};
use drover_tests::{Cluster, PATIENCE, eventually};

#[test]
fn an_agent_that_never_answers_is_a_per_instance_timeout() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller_with("127.0.0.1:0", &["--request-timeout", "1s"]);
    let _good = c.start_agent("agent-1", addr);
    c.issue(PeerRole::Agent, "mute");
    let creds = Credentials::load(&TlsFiles {
        ca: c.pki_file("ca.crt"),
        cert: c.pki_file("mute.crt"),
        key: c.pki_file("mute.key"),
    })
    .unwrap();
    // A real agent identity over a real connection that accepts every request and
    // answers none.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _mute = rt.block_on(async {
        let settings = TransportSettings::default();
        let endpoint = conn::client_endpoint(&creds, &settings, addr).unwrap();
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Agent,
            name: "mute".into(),
            software: "a mute agent".into(),
        };
        let est = conn::dial(
            &endpoint,
            None,
            addr,
            "127.0.0.1",
            hello,
            PeerRole::Controller,
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let conn = est.conn.clone();
        tokio::spawn(conn::serve(
            est.conn,
            settings,
            |_req: Request<ControllerRequest>| async {
                std::future::pending::<Result<(), WireError>>().await
            },
        ));
        (endpoint, conn)
    });
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
