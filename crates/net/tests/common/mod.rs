//! What the net crate's integration tests share: credentials from a test CA, a server's
//! side of the handshake and Hello, and a client's dial.

use std::net::SocketAddr;
use std::time::Duration;

use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, Established};
use drover_pki::{Ca, LeafSpec};
use drover_proto::msg::{API_VERSION, Hello, PeerRole, Welcome};

/// Credentials of a `role` leaf named `name` (with these SANs) from `ca`.
pub(crate) fn creds(ca: &Ca, role: PeerRole, name: &str, sans: &[&str]) -> Credentials {
    let mut spec = LeafSpec::new(role, name);
    spec.sans = sans.iter().map(|s| (*s).to_owned()).collect();
    let leaf = ca.issue(&spec).unwrap();
    Credentials::from_pem(
        ca.pem().cert.as_bytes(),
        leaf.cert.as_bytes(),
        leaf.key.as_bytes(),
    )
    .unwrap()
}

/// Accepts `incoming` and welcomes whoever says Hello: the connection.
pub(crate) async fn welcome(incoming: quinn::Incoming) -> quinn::Connection {
    let (c, _) = conn::accept(incoming, Duration::from_secs(5))
        .await
        .unwrap();
    let (_, responder) = conn::read_hello(&c, Duration::from_secs(5)).await.unwrap();
    responder
        .welcome(Welcome {
            api_version: API_VERSION,
            name: "srv".into(),
            software: "test".into(),
            warning: None,
            term: None,
        })
        .await
        .unwrap();
    c
}

/// Dials `addr` as a client named `ops`.
pub(crate) async fn dial(
    creds: &Credentials,
    addr: SocketAddr,
    settings: &TransportSettings,
) -> Established {
    let endpoint = conn::client_endpoint(creds, settings, addr).unwrap();
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
        addr,
        "127.0.0.1",
        hello,
        PeerRole::Controller,
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}
