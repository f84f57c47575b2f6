//! A connection whose peer stops answering is closed after the silence limit, though
//! QUIC's own idle timeout is far longer; a live peer that merely has nothing to say is
//! never taken for a silent one, as the keep-alives it acknowledges keep coming.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::creds;
use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, silence};
use drover_pki::Ca;
use drover_proto::msg::PeerRole;

mod common;

/// A server on a runtime of its own thread that welcomes one peer and serves it, then
/// freezes its whole runtime (no acknowledgement goes out, as from a stopped process)
/// when told to.
fn frozen_later(creds: Credentials, settings: TransportSettings) -> (SocketAddr, mpsc::Sender<()>) {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (freeze_tx, freeze_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let endpoint =
                conn::server_endpoint(&creds, "127.0.0.1:0".parse().unwrap(), &settings).unwrap();
            addr_tx.send(endpoint.local_addr().unwrap()).unwrap();
            let incoming = endpoint.accept().await.unwrap();
            let _c = common::welcome(incoming).await;
            // Serve (acknowledge keep-alives) until told to freeze, then block the
            // runtime's only thread.
            loop {
                if freeze_rx.try_recv().is_ok() {
                    std::thread::sleep(Duration::from_secs(30));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    });
    (addr_rx.recv().unwrap(), freeze_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_given_up_after_the_limit_and_a_quiet_live_one_never() {
    let ca = Ca::generate("t").unwrap();
    let srv = creds(&ca, PeerRole::Controller, "ctl", &["127.0.0.1"]);
    let cli = creds(&ca, PeerRole::Client, "ops", &[]);
    // QUIC alone would wait a minute.
    let settings = TransportSettings {
        keep_alive: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(60),
        ..TransportSettings::default()
    };
    let (addr, freeze) = frozen_later(srv, settings);
    let est = common::dial(&cli, addr, &settings).await;
    let limit = Duration::from_millis(600);

    // Live and quiet: still open after several limits.
    let watch = tokio::spawn(silence::close_when_silent(est.conn.clone(), limit));
    tokio::time::sleep(limit * 4).await;
    assert!(
        !watch.is_finished(),
        "a live peer was taken for a silent one"
    );
    assert!(est.conn.close_reason().is_none());

    // Frozen: closed within the limit and a generous margin.
    freeze.send(()).unwrap();
    let frozen_at = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the silent peer was not given up within 10 s")
        .unwrap();
    let after = frozen_at.elapsed();
    assert!(closed, "the connection ended otherwise");
    // The silence began with the last acknowledgement, up to a keep-alive before the
    // freeze.
    assert!(
        after + settings.keep_alive * 2 >= limit,
        "closed after {after:?}, well before the limit"
    );
    assert!(
        matches!(
            est.conn.close_reason(),
            Some(quinn::ConnectionError::LocallyClosed)
        ),
        "{:?}",
        est.conn.close_reason()
    );
}
