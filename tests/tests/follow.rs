//! A log follow whose follower went away is released even when the node writes nothing
//! more: nothing to relay means no failed write that would reveal the departure, so
//! only the release itself can end it.
//!
//! What a held follow costs is visible from outside: every follow is a stream from the
//! controller to the agent, and an agent admits only so many at once (its transport's
//! `max_streams`, 256). Followers of a quiet node come and go (their connections
//! closed, as a user's Ctrl-C or a dropped SSH session would) more times than that.
//! Were abandoned follows held, a follower past the limit would never get its first
//! line.

use std::net::SocketAddr;
use std::time::Duration;

use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, TlsFiles};
use drover_proto::model::{LogStream, ResultData};
use drover_proto::msg::{API_VERSION, ClientRequest, ClientResponse, Hello, PeerRole};
use drover_tests::{Cluster, PATIENCE, bin, eventually};

/// More follows than an agent admits streams from the controller at once.
const FOLLOWS: usize = 300;

/// Follows the quiet node's stdout on a connection of its own, returns the first line,
/// then goes away.
async fn follow_once(endpoint: &quinn::Endpoint, addr: SocketAddr) -> String {
    let hello = Hello {
        api_version: API_VERSION,
        role: PeerRole::Client,
        name: "ops".into(),
        software: "a follower".into(),
        lost_term: None,
    };
    let est = conn::dial(
        endpoint,
        None,
        addr,
        "127.0.0.1",
        hello,
        PeerRole::Controller,
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("the follower connects");
    let req = ClientRequest::Logs {
        node: "quiet".into(),
        lines: 1,
        follow: true,
        stream: Some(LogStream::Stdout),
        resume: None,
    };
    let mut replies = conn::call_stream(&est.conn, &req, PATIENCE)
        .await
        .expect("the follow starts");
    let first = tokio::time::timeout(PATIENCE, replies.next::<ClientResponse>())
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    est.conn.close(0u32.into(), b"gone");
    match first {
        Some(ClientResponse::Result(r)) => match r.data {
            Some(ResultData::Log(chunk)) => chunk.lines.join("\n"),
            other => panic!("not a log chunk: {other:?} ({:?})", r.error),
        },
        other => panic!("no first reply: {other:?}"),
    }
}

#[test]
fn a_departed_follower_of_a_quiet_node_is_released() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);

    // One line at start, then nothing, ever.
    let file = c.dir.path().join("quiet.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[nodes.quiet]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--print\", \"the only line\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    eventually("the quiet node deployed", PATIENCE, || {
        let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
        (out.code == Some(0)).then_some(())
    });
    let log = c.dir.path().join("agent-agent-1/nodes/quiet/stdout.log");
    eventually("the node's one line", PATIENCE, || {
        std::fs::read_to_string(&log)
            .is_ok_and(|t| t == "the only line\n")
            .then_some(())
    });
    let size = std::fs::metadata(&log).unwrap().len();

    let creds = Credentials::load(&TlsFiles {
        ca: c.pki_file("ca.crt"),
        cert: c.pki_file("ops.crt"),
        key: c.pki_file("ops.key"),
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint =
            conn::client_endpoint(&creds, &TransportSettings::default(), addr).unwrap();
        for i in 0..FOLLOWS {
            let first = tokio::time::timeout(PATIENCE, follow_once(&endpoint, addr))
                .await
                .unwrap_or_else(|_| {
                    panic!("follower {i} got no line: the agent's streams are held by followers that left")
                });
            assert_eq!(first, "the only line");
        }
        endpoint.close(0u32.into(), b"");
    });
    // Nothing was written meanwhile: no output could have revealed a departure.
    assert_eq!(std::fs::metadata(&log).unwrap().len(), size);
    assert_eq!(c.drover(addr, &["get-nodes"]).code, Some(0));
}
