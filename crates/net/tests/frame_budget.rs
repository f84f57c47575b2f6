//! A peer that announces large frames on many streams and sends them slowly cannot make
//! the serving process hold more than the frame budget; oversize frames fail at once;
//! other connections, and later requests on the same one, are still answered.
//!
//! One test in this binary: the budget and the served-stream count are per process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::creds;
use drover_net::Credentials;
use drover_net::conn::{self, TransportSettings};
use drover_net::frame::{self, CONNECTION_BUDGET};
use drover_pki::Ca;
use drover_proto::msg::{MAX_FRAME_LEN, PeerRole, Reply};
use serde_json::{Value, json};

mod common;

const MIB: usize = 1024 * 1024;

/// A server that welcomes everyone and echoes each request's body.
fn server(creds: &Credentials, settings: TransportSettings) -> (quinn::Endpoint, SocketAddr) {
    let endpoint = conn::server_endpoint(creds, "127.0.0.1:0".parse().unwrap(), &settings).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let c = common::welcome(incoming).await;
                conn::serve(
                    c,
                    settings,
                    |req: drover_proto::msg::Request<Value>| async move { Ok(req.body) },
                )
                .await;
            });
        }
    });
    (endpoint, addr)
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Reads the one reply of a raw stream: an error message, or None for a success.
async fn reply_error(recv: &mut quinn::RecvStream) -> Option<String> {
    let reply: Reply<Value> = frame::read_frame(recv, MAX_FRAME_LEN)
        .await
        .unwrap()
        .expect("a reply frame");
    reply.result.err().map(|e| e.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_frames_cannot_take_more_memory_than_the_budget() {
    let ca = Ca::generate("t").unwrap();
    let srv = creds(&ca, PeerRole::Controller, "ctl", &["127.0.0.1"]);
    let cli = creds(&ca, PeerRole::Client, "ops", &[]);
    let settings = TransportSettings {
        // Longer than the budget's wait, so that streams fail for want of memory first.
        request_read_timeout: Duration::from_secs(12),
        idle_timeout: Duration::from_secs(60),
        ..TransportSettings::default()
    };
    let (_server, addr) = server(&srv, settings);
    let hog = common::dial(&cli, addr, &settings).await;
    let other = common::dial(&cli, addr, &settings).await;

    // Oversize: refused from the header, at once, and only that stream.
    let started = Instant::now();
    let (mut send, mut recv) = hog.conn.open_bi().await.unwrap();
    let too_big = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
    send.write_all(&too_big.to_be_bytes()).await.unwrap();
    let err = reply_error(&mut recv).await.expect("an error reply");
    assert!(err.contains("exceeds the limit"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Many streams announce 16 MiB frames and trickle them in.
    let baseline_rss = rss_bytes();
    let peak = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut peak_rss = 0;
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(frame::process_buffered(), Ordering::Relaxed);
                peak_rss = peak_rss.max(rss_bytes());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak_rss
        })
    };
    let streams = 24;
    let announced = 16 * MIB;
    let mut hogs = Vec::new();
    for _ in 0..streams {
        let (mut send, recv) = hog.conn.open_bi().await.unwrap();
        let header = u32::try_from(announced).unwrap().to_be_bytes();
        hogs.push((
            tokio::spawn(async move {
                send.write_all(&header).await.unwrap();
                let piece = vec![b'x'; 256 * 1024];
                // Up to 12 MiB each, slowly; the write stalls once the server stops
                // reading (flow control), and fails once it gave up on the stream.
                for _ in 0..48 {
                    if send.write_all(&piece).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                send
            }),
            recv,
        ));
    }

    // The budget fills up to the connection's share, never beyond.
    let deadline = Instant::now() + Duration::from_secs(60);
    while frame::process_buffered() < CONNECTION_BUDGET / 2 {
        assert!(Instant::now() < deadline, "the budget never filled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Meanwhile another connection is served promptly.
    let echoed: Value = conn::call(&other.conn, &json!({"ping": 1}), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(echoed, json!({"ping": 1}));

    // Streams that cannot get memory fail with a clear error; those that got it wait
    // for the rest of their frame until the read timeout (none completes).
    let mut budget_errors = 0;
    for (writer, mut recv) in hogs {
        let err = tokio::time::timeout(Duration::from_secs(60), reply_error(&mut recv))
            .await
            .expect("a hog's stream was never answered")
            .expect("a hog's frame succeeded");
        if err.contains("budget") {
            budget_errors += 1;
        } else {
            assert!(
                err.contains("no request frame within"),
                "unexpected error: {err}"
            );
        }
        drop(recv);
        writer.abort();
    }
    assert!(budget_errors > 0, "no stream ran out of budget");
    sampling.store(false, Ordering::Relaxed);
    let peak_rss = sampler.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    // The sampled figure is the process's: the other connection's ping (well under
    // 1 KiB) may be in it beside a full budget.
    assert!(
        peak <= CONNECTION_BUDGET + 1024,
        "{} bytes buffered, over one connection's {CONNECTION_BUDGET}",
        peak
    );
    assert!(peak >= CONNECTION_BUDGET / 2, "peak {} MiB", peak / MIB);
    // The budget, plus what QUIC itself buffers on both ends of the loopback (the
    // server's receive window, the client's send window and its pieces) and allocator
    // slack: far below the 288 MiB sent, which the server used to read whole.
    let grown = peak_rss.saturating_sub(baseline_rss);
    eprintln!(
        "peak buffered {} MiB, rss grew by {} MiB",
        peak / MIB,
        grown / MIB
    );
    assert!(
        grown < CONNECTION_BUDGET + 80 * MIB,
        "rss grew by {} MiB with {} MiB announced",
        grown / MIB,
        streams * announced / MIB
    );

    // Everything is given back, and the same connection is served again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while frame::process_buffered() != 0 {
        assert!(Instant::now() < deadline, "budget not given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let echoed: Value = conn::call(&hog.conn, &json!("again"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(echoed, json!("again"));
}
