//! A deploy that takes longer than the request timeout succeeds as long as nodes keep
//! settling: the agent reports progress, the controller passes it on, and each side's
//! timeout runs from the last progress, not from the start. A node is waited for as
//! long as its own readiness timeout and stop_timeout allow, however short the request
//! timeout: a deploy, start, stop or restart reports what the node did, not that the
//! request gave up on it. A node that never gets ready fails at its readiness timeout.

use std::net::SocketAddr;
use std::time::Duration;

use drover_net::conn;
use drover_proto::model::MgmtResult;
use drover_proto::msg::{ClientRequest, ClientResponse, Progress};
use drover_tests::{Cluster, PATIENCE, bin};

/// The controller's request timeout in these tests; nodes take several times as long
/// in all, each settling well within it after the one before.
const REQUEST_TIMEOUT: &str = "2s";
/// Between two nodes' readiness.
const STEP_MS: u64 = 400;
const NODES: u64 = 12;

/// `NODES` nodes that become ready one after another, `STEP_MS` apart, and, with
/// `stuck`, one more that never does.
fn staggered(c: &Cluster, stuck: bool) -> std::path::PathBuf {
    let prog = bin("drover-testprog");
    let mut text = String::from(
        "[defaults]\nreadiness = { kind = \"notify\", timeout = \"120s\" }\n[instances.a]\n",
    );
    for i in 1..=NODES {
        text.push_str(&format!(
            "[nodes.n{i:02}]\ninstance = \"a\"\ncommand = [\"{}\", \"--ready-after\", \"{}ms\"]\n",
            prog.display(),
            i * STEP_MS
        ));
    }
    if stuck {
        text.push_str(&format!(
            "[nodes.stuck]\ninstance = \"a\"\ncommand = [\"{}\", \"--sleep-forever\"]\nreadiness = {{ kind = \"notify\", timeout = \"3s\" }}\n",
            prog.display()
        ));
    }
    let path = c.dir.path().join(format!("staggered-{stuck}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn start(c: &Cluster) -> (drover_tests::Proc, drover_tests::Proc, SocketAddr) {
    let (ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--request-timeout", REQUEST_TIMEOUT]);
    let agent = c.start_agent("a", addr);
    c.wait_for_agent(addr, "a");
    (ctl, agent, addr)
}

/// Sends a deploy of what is staged; returns the progress seen and the results.
fn deploy_raw(c: &Cluster, addr: SocketAddr, progress: bool) -> (Vec<Progress>, Vec<MgmtResult>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (endpoint, conn) = c.client_connection(addr).await;
        let req = ClientRequest::Deploy {
            restart_all: true,
            expect_id: None,
            expect_stage: None,
            progress,
        };
        let mut replies = conn::call_stream(&conn, &req, PATIENCE).await.unwrap();
        let mut seen = Vec::new();
        let results = loop {
            let reply = tokio::time::timeout(PATIENCE, replies.next::<ClientResponse>())
                .await
                .expect("a reply within the test's patience")
                .expect("a readable reply")
                .expect("an answer before the stream ends");
            match reply {
                ClientResponse::Progress(p) => seen.push(p),
                ClientResponse::Results(rs) => break rs,
                other => panic!("unexpected reply {other:?}"),
            }
        };
        endpoint.close(0u32.into(), b"");
        (seen, results)
    })
}

fn node_result<'a>(results: &'a [MgmtResult], node: &str) -> &'a MgmtResult {
    results
        .iter()
        .find(|r| r.node.as_deref() == Some(node))
        .unwrap_or_else(|| panic!("no result for {node}: {results:?}"))
}

#[test]
fn a_deploy_longer_than_the_request_timeout_succeeds_while_nodes_keep_settling() {
    let c = Cluster::new();
    let (_ctl, _agent, addr) = start(&c);
    let file = staggered(&c, false);

    // The CLI: every node started, although the whole took several request timeouts.
    let began = std::time::Instant::now();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    let took = began.elapsed();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        took > Duration::from_secs(3),
        "the nodes were to take longer than the request timeout; took {took:?}"
    );
    let v = out.json();
    assert_eq!(v["errors"], serde_json::json!([]), "{}", out.stdout);
    for i in 1..=NODES {
        let n = &v["results"]["nodes"][format!("n{i:02}")];
        assert_eq!(n["success"], true, "{}", out.stdout);
    }

    // The protocol: progress comes as nodes settle, counting up to all of them.
    let (seen, results) = deploy_raw(&c, addr, true);
    for i in 1..=NODES {
        let r = node_result(&results, &format!("n{i:02}"));
        assert!(r.success, "{r:?}");
    }
    assert!(
        seen.len() >= 3,
        "progress as nodes settle one after another: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].done <= w[1].done),
        "counts never go back: {seen:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(last.total, u32::try_from(NODES).unwrap(), "{seen:?}");
}

#[test]
fn without_progress_a_deploy_is_timed_out_as_a_whole() {
    let c = Cluster::new();
    let (_ctl, _agent, addr) = start(&c);
    let file = staggered(&c, false);
    let out = c.drover(addr, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // As zeek-client asks: the late nodes are reported as timed out.
    let (seen, results) = deploy_raw(&c, addr, false);
    assert!(seen.is_empty(), "no progress unless asked for: {seen:?}");
    let last = node_result(&results, &format!("n{NODES:02}"));
    assert!(!last.success, "{last:?}");
    assert!(
        last.error
            .as_deref()
            .is_some_and(|e| e.contains("timed out")),
        "{last:?}"
    );
}

#[test]
fn a_node_that_never_gets_ready_fails_the_deploy_at_its_readiness_timeout() {
    let c = Cluster::new();
    let (_ctl, _agent, addr) = start(&c);
    let file = staggered(&c, true);
    let out = c.drover(addr, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let (_, results) = deploy_raw(&c, addr, true);
    for i in 1..=NODES {
        let r = node_result(&results, &format!("n{i:02}"));
        assert!(r.success, "{r:?}");
    }
    let stuck = node_result(&results, "stuck");
    assert!(!stuck.success, "{stuck:?}");
    assert!(
        stuck
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not ready within 3s: it sent no READY=1")),
        "{stuck:?}"
    );
}

#[test]
fn stops_starts_and_restarts_wait_for_their_nodes_own_timeouts() {
    let c = Cluster::new();
    let (_ctl, agent, addr) = start(&c);
    let prog = bin("drover-testprog");
    // Each takes twice the request timeout: `slow` to get ready, `stubborn` to stop
    // (it ignores SIGTERM and is killed at its stop_timeout). `paused` would take its
    // whole stop_timeout if its stop signal waited for it to be resumed.
    let text = format!(
        r#"[instances.a]
[nodes.slow]
instance = "a"
command = ["{p}", "--ready-after", "4s"]
readiness = {{ kind = "notify", timeout = "120s" }}
[nodes.stubborn]
instance = "a"
command = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
stop_timeout = "4s"
[nodes.paused]
instance = "a"
command = ["/bin/sleep", "1000"]
stop_timeout = "60s"
"#,
        p = prog.display()
    );
    let file = c.dir.path().join("slow.toml");
    std::fs::write(&file, text).unwrap();
    let succeeded = |out: &drover_tests::CliOutput, node: &str| {
        assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
        let v = out.json();
        let r = &v["results"];
        assert!(
            r["nodes"][node]["success"] == true || r[node] == true,
            "{}",
            out.stdout
        );
    };
    let timed = |args: &[&str]| {
        let began = std::time::Instant::now();
        let out = c.drover(addr, args);
        (out, began.elapsed())
    };

    let (out, took) = timed(&["deploy-config", file.to_str().unwrap()]);
    succeeded(&out, "slow");
    assert!(
        took > Duration::from_secs(3),
        "slow was to take 4 s: {took:?}"
    );

    let (out, took) = timed(&["restart", "slow"]);
    succeeded(&out, "slow");
    assert!(
        took > Duration::from_secs(3),
        "slow was to take 4 s: {took:?}"
    );
    let (out, _) = timed(&["stop", "slow"]);
    succeeded(&out, "slow");
    let (out, took) = timed(&["start", "slow"]);
    succeeded(&out, "slow");
    assert!(
        took > Duration::from_secs(3),
        "slow was to take 4 s: {took:?}"
    );

    // By pattern: the wait is the stop_timeout of the nodes it picks.
    let (out, took) = timed(&["stop", "stub*"]);
    succeeded(&out, "stubborn");
    assert!(
        took > Duration::from_secs(3),
        "stubborn was to take 4 s: {took:?}"
    );
    assert!(
        agent.log_text().lines().any(|l| l
            .contains("killing the node: it did not end within its stop_timeout")
            && l.contains("node=stubborn")),
        "{}",
        agent.log_text()
    );

    let out = c.drover(addr, &["signal", "SIGSTOP", "paused"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let (out, _) = timed(&["stop", "paused"]);
    succeeded(&out, "paused");
    let killed = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("killing the node") && l.contains("node=paused"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(
        killed.is_empty(),
        "a paused node is resumed to see its stop signal, not killed at its stop_timeout: {killed:?}"
    );
    let v = c.drover(addr, &["get-nodes"]).json();
    for node in ["slow", "stubborn", "paused"] {
        let want = if node == "slow" { "RUNNING" } else { "STOPPED" };
        assert_eq!(v["results"]["a"][node]["state"], want, "{v}");
    }
}

/// A start asked for while a stop waits for its node to end: the node is stopped (killed
/// at its stop_timeout) and started again at once, and both requests say they succeeded
/// (before: the stop timed out, waiting for a node without a process, which the start
/// never left).
#[test]
fn a_start_during_a_stop_lets_both_succeed() {
    let c = Cluster::new();
    let (_ctl, _agent, addr) = start(&c);
    c.deploy_text(
        addr,
        "stubborn.toml",
        "[instances.a]\n[nodes.stubborn]\ninstance = \"a\"\n\
         command = [\"/bin/sh\", \"-c\", \"trap '' TERM; while :; do sleep 0.1; done\"]\n\
         stop_timeout = \"3s\"\n",
    );
    let mut stop =
        drover_tests::Background::start(&c, &addr.to_string(), &["stop", "stubborn"], "stop");
    drover_tests::eventually("the stop under way", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes", "--fresh"]).json();
        v["results"]["a"]["stubborn"]["stopping_since_ms"]
            .as_u64()
            .map(|_| ())
    });
    let out = c.drover(addr, &["start", "stubborn"]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let status = drover_tests::eventually("the stop answered", PATIENCE, || stop.ended());
    assert!(status.success(), "{}{}", stop.stdout(), stop.stderr());
    let answer: serde_json::Value = serde_json::from_str(&stop.stdout()).unwrap();
    assert_eq!(answer["results"]["stubborn"], true, "{answer}");
    let v = c.drover(addr, &["get-nodes", "--fresh"]).json();
    assert_eq!(v["results"]["a"]["stubborn"]["state"], "RUNNING", "{v}");
}
