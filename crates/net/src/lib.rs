//! drover-net: how drover processes talk to each other.
//!
//! QUIC (quinn) with mutual TLS 1.3 (rustls, ring provider) against the cluster CA; ALPN
//! [`drover_proto::msg::ALPN`]; one long-lived connection per peer with explicit
//! keep-alive and idle timeout ([`TransportSettings`]); one bidirectional stream per
//! request, carrying length-prefixed JSON frames ([`frame`]) with a hard size limit and a
//! deadline ([`conn::call`], [`conn::serve`]); the peer's identity (role and name) read
//! from its verified certificate ([`tls::Identity`]), and a client's scope
//! ([`scope`]). The same mutual TLS over TCP
//! ([`tls::TcpTlsAcceptor`]) protects the controller's `wss://` front for zeek-client.
//! Credentials and the deny list reload while connections live ([`trust::Trust`]).
//!
//! Architecture invariant: this is the only crate that knows about quinn and rustls. The
//! daemons see connections, identities, requests and replies.

pub mod conn;
pub mod frame;
mod live;
pub mod peers;
pub mod refusal;
pub mod reset_key;
pub mod scope;
pub mod silence;
pub mod state_lock;
pub mod tls;
pub mod trust;

use std::time::Duration;

pub use conn::{Established, TransportSettings};
pub use tls::{Credentials, Identity, TlsFiles};
pub use trust::Trust;

/// Errors of the transport layer. Messages are one line and name the cause.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Certificates or keys could not be loaded or used.
    #[error("{0}")]
    Credentials(String),
    /// A peer's certificate carries no usable identity.
    #[error("peer identity: {0}")]
    Identity(String),
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The connection failed or was lost; the message explains why.
    #[error("{0}")]
    Connection(String),
    /// The peer refused our Hello or our request as a whole.
    #[error("{0}")]
    Refused(drover_proto::msg::WireError),
    /// No answer in time.
    #[error("{what} timed out after {}", humanize(*after))]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A frame could not be read or written.
    #[error("{0}")]
    Frame(#[from] frame::FrameError),
    /// The peer answered something that does not fit the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Formats a duration for messages (`1.5s`, `250ms`).
pub fn humanize(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
