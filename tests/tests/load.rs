//! Hostile or sloppy peers: a thousand idle connections, connections that never say
//! Hello, streams opened and never written. The controller keeps answering.

use std::time::{Duration, Instant};

use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, TlsFiles};
use drover_proto::msg::{API_VERSION, Hello, PeerRole};
use drover_tests::Cluster;

#[test]
fn a_thousand_idle_connections_and_silent_streams_do_not_stall_the_controller() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let baseline = {
        let t = Instant::now();
        assert_eq!(c.drover(addr, &["get-nodes"]).code, Some(0));
        t.elapsed()
    };
    let creds = Credentials::load(&TlsFiles {
        ca: c.pki_file("ca.crt"),
        cert: c.pki_file("ops.crt"),
        key: c.pki_file("ops.key"),
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let held = rt.block_on(async {
        let settings = TransportSettings::default();
        let endpoint = conn::client_endpoint(&creds, &settings, addr).unwrap();
        let mut conns = Vec::new();
        // 1,000 connections that complete the handshake and then say nothing.
        for chunk in 0..20 {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..50 {
                let endpoint = endpoint.clone();
                set.spawn(async move { endpoint.connect(addr, "127.0.0.1").unwrap().await });
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Ok(conn)) = r {
                    conns.push(conn);
                }
            }
            assert!(conns.len() >= chunk * 50, "connections are accepted");
        }
        // One established client that opens 100 streams and never writes to them.
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Client,
            name: "ops".into(),
            software: "load test".into(),
            lost_term: None,
        };
        let est = conn::dial(
            &endpoint,
            None,
            addr,
            "127.0.0.1",
            hello,
            PeerRole::Controller,
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let mut streams = Vec::new();
        for _ in 0..100 {
            if let Ok(s) = est.conn.open_bi().await {
                streams.push(s);
            }
        }
        (endpoint, conns, est, streams)
    });
    eprintln!(
        "holding {} idle connections and {} silent streams",
        held.1.len(),
        held.3.len()
    );
    assert!(
        held.1.len() >= 900,
        "most connections were accepted: {}",
        held.1.len()
    );

    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let out = c.drover(addr, &["get-nodes"]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        worst = worst.max(t.elapsed());
    }
    eprintln!("get-nodes (whole CLI run): {baseline:?} alone, worst {worst:?} under load");
    // Connections that never said Hello are closed after the hello timeout.
    ctl.wait_log("waiting for the hello of");
    drop(held);
}

#[test]
fn oversize_and_garbage_frames_fail_their_stream_only() {
    use drover_proto::msg::{ClientRequest, ClientResponse, Reply};
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let creds = Credentials::load(&TlsFiles {
        ca: c.pki_file("ca.crt"),
        cert: c.pki_file("ops.crt"),
        key: c.pki_file("ops.key"),
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let settings = TransportSettings::default();
        let endpoint = conn::client_endpoint(&creds, &settings, addr).unwrap();
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Client,
            name: "ops".into(),
            software: "bad frames".into(),
            lost_term: None,
        };
        let est = conn::dial(
            &endpoint,
            None,
            addr,
            "127.0.0.1",
            hello,
            PeerRole::Controller,
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        // A header announcing a 1 GiB frame: refused from the header alone.
        let (mut send, mut recv) = est.conn.open_bi().await.unwrap();
        send.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let reply: Reply<ClientResponse> = drover_net::frame::read_frame(&mut recv, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        let err = reply.result.unwrap_err();
        assert!(err.message.contains("exceeds the limit"), "{err:?}");
        // Garbage JSON in a well-formed frame.
        let (mut send, mut recv) = est.conn.open_bi().await.unwrap();
        let mut frame = 5u32.to_be_bytes().to_vec();
        frame.extend_from_slice(b"{nope");
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        let reply: Reply<ClientResponse> = drover_net::frame::read_frame(&mut recv, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        assert!(
            reply
                .result
                .unwrap_err()
                .message
                .starts_with("malformed frame")
        );
        // The connection, and the controller, are fine.
        let ok: ClientResponse = conn::call(
            &est.conn,
            &ClientRequest::GetInstances,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(matches!(ok, ClientResponse::Result(r) if r.success));
    });
}
