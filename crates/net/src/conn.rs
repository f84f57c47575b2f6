//! Endpoints, the Hello exchange, and request/response over streams.
//!
//! A dialer calls [`dial`], which returns only once the peer answered its Hello: with TLS
//! 1.3 the server verifies the client certificate after the client already considers the
//! handshake done, so a refused certificate shows on the first stream, not at connect.
//! The accepting side calls [`accept`] and then [`read_hello`], checks the Hello against
//! the certificate's identity, and answers through the returned [`HelloResponder`].
//!
//! After that, either side may [`call`] (open a stream, send one request frame, wait for
//! one reply frame with a deadline) and [`serve`] the streams its peer opens.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::model::new_id;
use drover_proto::msg::{
    ErrorCode, Hello, MAX_FRAME_LEN, PeerRole, Reply, Request, Welcome, WireError,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{FrameBudget, read_frame, read_frame_in, write_frame};
use crate::tls::{Credentials, Identity, peer_identity};
use crate::{NetError, humanize};

/// Liveness and limits of connections.
#[derive(Debug, Clone, Copy)]
pub struct TransportSettings {
    /// How often an idle connection sends a keep-alive.
    pub keep_alive: Duration,
    /// After this long without hearing from the peer, the connection is lost.
    pub idle_timeout: Duration,
    /// How long the Hello exchange (and the handshake before it) may take.
    pub hello_timeout: Duration,
    /// How long a peer may take to send a request frame on a stream it opened.
    pub request_read_timeout: Duration,
    /// Streams a peer may have open at once.
    pub max_streams: u32,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(5),
            request_read_timeout: Duration::from_secs(10),
            max_streams: 256,
        }
    }
}

impl TransportSettings {
    fn transport_config(&self) -> Result<quinn::TransportConfig, NetError> {
        let mut t = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| NetError::Credentials("idle timeout is too large".into()))?;
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_concurrent_bidi_streams(self.max_streams.into());
        t.max_concurrent_uni_streams(0u32.into());
        // What a peer may send that this side has not read yet, over all streams: quinn's
        // default is unlimited, and a stream waiting for frame budget is not read.
        t.receive_window(RECEIVE_WINDOW.into());
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(7u32.into());
        t.ack_frequency_config(Some(ack));
        Ok(t)
    }
}

/// Bytes a peer may have sent on a connection that this side has not read yet.
pub const RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// Streams a peer opened that [`serve_answers`] serves right now, in this process.
static SERVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Streams that peers opened and this process is serving right now (streamed answers
/// included, until they end).
pub fn served_streams() -> usize {
    SERVED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one served stream while it lives.
struct Serving;

impl Serving {
    fn new() -> Self {
        SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A QUIC endpoint that accepts connections from holders of a CA certificate, and can
/// also dial out with the same credentials.
pub fn server_endpoint(
    creds: &Credentials,
    addr: SocketAddr,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, NetError> {
    server_endpoint_keyed(creds, addr, settings, None)
}

/// As [`server_endpoint`], with the stateless resets keyed by `reset_key` when given.
///
/// A packet for a connection the endpoint does not know (it restarted after a crash, so
/// its connections are gone) is answered with a stateless reset, which a peer believes
/// only if it carries the token the connection's first endpoint announced: an HMAC of
/// the connection id under this key. With new random keys per process, a restarted
/// daemon dropped such packets (it could not tell its own connection ids from noise) or
/// sent resets the peer ignored, and every peer waited out its idle timeout before it
/// dialled again; with the key kept across restarts, peers learn at their next packet
/// (a keep-alive at the latest) that the connection is gone.
pub fn server_endpoint_keyed(
    creds: &Credentials,
    addr: SocketAddr,
    settings: &TransportSettings,
    reset_key: Option<&[u8; crate::reset_key::LEN]>,
) -> Result<quinn::Endpoint, NetError> {
    let tls = creds.server_config()?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| NetError::Credentials(format!("tls configuration unusable for quic: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(settings.transport_config()?));
    let endpoint_config = reset_key.map_or_else(quinn::EndpointConfig::default, keyed_config);
    let mut endpoint = bind_endpoint(addr, Some(cfg), endpoint_config)?;
    endpoint.set_default_client_config(client_config(creds, settings)?);
    Ok(endpoint)
}

/// The endpoint config of a keyed endpoint: resets signed, and connection ids hashed,
/// under keys derived from `key`.
fn keyed_config(key: &[u8; crate::reset_key::LEN]) -> quinn::EndpointConfig {
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let cid_key = cid_key(&hmac);
    let mut config = quinn::EndpointConfig::new(Arc::new(hmac));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // quinn's default of one reset per 20 ms let a restarted controller reset only about
    // 50 agents a second, and even one per millisecond left the agents whose packets
    // came in a burst to wait out their idle timeout. A reset answers only a packet
    // whose connection id carries this key's hash (others are dropped as noise), and it
    // is always smaller than that packet, so answering every one amplifies nothing.
    config.min_reset_interval(Duration::ZERO);
    config
}

/// The key of the hash in a keyed endpoint's connection ids, which is how an endpoint
/// tells a packet of a connection it lost from noise. It must outlive the process too,
/// or the restarted endpoint drops the packets instead of resetting their connections.
fn cid_key(reset_hmac: &ring::hmac::Key) -> u64 {
    let tag = ring::hmac::sign(reset_hmac, b"drover connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    u64::from_le_bytes(cid_key)
}

/// What we ask of the kernel for each UDP socket's receive and send buffers. Linux caps
/// it at `net.core.rmem_max` / `wmem_max` (and doubles it for its bookkeeping). The
/// default (208 KiB) holds only some hundred small datagrams: the replies of a fan-out
/// to a few hundred agents arrive at once, and what does not fit is dropped and waits for
/// QUIC's loss recovery, which made latency grow faster than the number of agents. The
/// memory is only used while datagrams wait to be read.
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Binds a UDP socket with [`SOCKET_BUFFER`]-sized buffers and makes it an endpoint.
fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    config: quinn::EndpointConfig,
) -> Result<quinn::Endpoint, NetError> {
    let bind_err = |source| NetError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(bind_err)?;
    // A smaller buffer than asked for is no reason to fail: it only drops bursts sooner.
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER);
    if let Ok(got) = state.recv_buffer_size((&socket).into())
        && got < SOCKET_BUFFER
    {
        tracing::debug!(
            "udp receive buffer of {addr} is {} KiB (net.core.rmem_max limits it)",
            got / 1024
        );
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no async runtime found")))?;
    quinn::Endpoint::new(config, server, socket, runtime).map_err(bind_err)
}

/// A client-only endpoint bound to an ephemeral port of the right address family.
pub fn client_endpoint(
    creds: &Credentials,
    settings: &TransportSettings,
    peer: SocketAddr,
) -> Result<quinn::Endpoint, NetError> {
    let bind: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = bind_endpoint(bind, None, quinn::EndpointConfig::default())?;
    endpoint.set_default_client_config(client_config(creds, settings)?);
    Ok(endpoint)
}

/// The quinn client configuration for these credentials.
pub fn client_config(
    creds: &Credentials,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, NetError> {
    quic_client_config(creds.client_config()?, settings)
}

/// Wraps any rustls client configuration (tests use odd ones) for quinn.
pub fn quic_client_config(
    tls: rustls::ClientConfig,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, NetError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| NetError::Credentials(format!("tls configuration unusable for quic: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(settings.transport_config()?));
    Ok(cfg)
}

/// A connection whose Hello was answered.
#[derive(Debug, Clone)]
pub struct Established {
    /// The connection.
    pub conn: quinn::Connection,
    /// The peer's verified identity.
    pub peer: Identity,
    /// The peer's Welcome.
    pub welcome: Welcome,
}

/// Describes a TLS alert carried in a QUIC close code, if it is one.
fn alert_text(code: u64) -> Option<&'static str> {
    if !(0x100..=0x1ff).contains(&code) {
        return None;
    }
    Some(match code - 0x100 {
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "certificate revoked",
        45 => "certificate expired or not valid yet",
        46 => "certificate unknown",
        48 => "unknown issuer",
        49 => "access denied",
        51 => "bad signature (is it from another CA?)",
        80 => "internal error",
        116 => "no client certificate presented",
        120 => "no common application protocol",
        _ => "tls handshake failure",
    })
}

/// Turns a local TLS error reason into a short cause.
pub(crate) fn tls_error_text(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    let cause = if r.contains("unknownissuer") || r.contains("unknown issuer") {
        "unknown issuer"
    } else if r.contains("expired") {
        "certificate expired"
    } else if r.contains("notvalidyet") || r.contains("not valid yet") {
        "certificate not valid yet"
    } else if r.contains("notvalidforname") || r.contains("not valid for name") {
        "certificate not valid for the address dialled"
    } else if r.contains("badsignature") || r.contains("bad signature") {
        "bad signature (is it from another CA?)"
    } else if r.contains("no certificates") || r.contains("nocertificates") {
        "no certificate presented"
    } else if r.contains("application protocol") || r.contains("alpn") {
        "no common application protocol"
    } else {
        return reason.to_owned();
    };
    cause.to_owned()
}

/// Explains why a connection to or from `peer` failed, in one line.
pub fn explain(err: &quinn::ConnectionError, peer: &str) -> String {
    use quinn::ConnectionError as E;
    match err {
        E::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            match alert_text(code) {
                Some("no common application protocol") => {
                    format!("{peer} does not speak {} (alpn mismatch)", alpn_str())
                }
                Some(text) => format!("{peer} rejected our certificate: {text}"),
                None => format!("{peer} closed the connection: {close}"),
            }
        }
        E::TransportError(te) => {
            let code = u64::from(te.code);
            if alert_text(code).is_some() {
                let cause = tls_error_text(&te.reason);
                if cause.contains("application protocol") {
                    format!("{peer} does not speak {} (alpn mismatch)", alpn_str())
                } else {
                    format!("cannot verify {peer}'s certificate: {cause}")
                }
            } else {
                format!("connection to {peer} failed: {te}")
            }
        }
        E::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            if reason.is_empty() {
                format!("{peer} closed the connection")
            } else {
                format!("{peer} closed the connection: {reason}")
            }
        }
        E::TimedOut => format!("no answer from {peer} within the idle timeout"),
        E::Reset => format!("{peer} reset the connection (did it restart?)"),
        E::LocallyClosed => "connection closed locally".to_owned(),
        E::VersionMismatch => format!("{peer} speaks no common quic version"),
        E::CidsExhausted => format!("connection to {peer} ran out of connection ids"),
    }
}

/// Explains why a connection offered by `addr` could not be accepted (for logs).
pub fn explain_incoming(err: &quinn::ConnectionError, addr: SocketAddr) -> String {
    match err {
        quinn::ConnectionError::TransportError(te) if alert_text(u64::from(te.code)).is_some() => {
            format!(
                "refused connection from {addr}: {}",
                tls_error_text(&te.reason)
            )
        }
        other => format!("connection from {addr} failed: {}", explain(other, "peer")),
    }
}

fn alpn_str() -> String {
    String::from_utf8_lossy(drover_proto::msg::ALPN).into_owned()
}

fn map_stream_err(e: impl std::fmt::Display, conn: &quinn::Connection, peer: &str) -> NetError {
    match conn.close_reason() {
        Some(reason) => NetError::Connection(explain(&reason, peer)),
        None => NetError::Connection(format!("stream to {peer} failed: {e}")),
    }
}

/// Dials `addr`, verifies that the peer is a `expect` (and, when given, named
/// `expect_name`), and exchanges Hello/Welcome.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per role; a struct would only rename them"
)]
pub async fn dial(
    endpoint: &quinn::Endpoint,
    cfg: Option<quinn::ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
    hello: Hello,
    expect: PeerRole,
    expect_name: Option<&str>,
    timeout: Duration,
) -> Result<Established, NetError> {
    let peer_desc = match expect {
        PeerRole::Controller => format!("controller {addr}"),
        role => format!("{role} {addr}"),
    };
    let work = async {
        let connecting = match cfg {
            Some(cfg) => endpoint.connect_with(cfg, addr, server_name),
            None => endpoint.connect(addr, server_name),
        }
        .map_err(|e| NetError::Connection(format!("cannot dial {peer_desc}: {e}")))?;
        let conn = connecting
            .await
            .map_err(|e| NetError::Connection(explain(&e, &peer_desc)))?;
        let peer = peer_identity(&conn)?;
        if peer.role != expect || expect_name.is_some_and(|n| n != peer.name) {
            let want = match expect_name {
                Some(n) => format!("{expect} '{n}'"),
                None => expect.to_string(),
            };
            conn.close(1u32.into(), b"unexpected identity");
            return Err(NetError::Identity(format!(
                "{addr} presented the certificate of {peer}, expected {want}"
            )));
        }
        let (welcome, _): (Welcome, _) = call_on(&conn, &hello, &peer_desc, timeout).await?;
        if welcome.api_version != hello.api_version {
            conn.close(2u32.into(), b"api version mismatch");
            return Err(NetError::Protocol(format!(
                "{peer_desc} speaks api version {}, we speak {}",
                welcome.api_version, hello.api_version
            )));
        }
        Ok(Established {
            conn,
            peer,
            welcome,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(NetError::Timeout {
            what: format!("connecting to {peer_desc}"),
            after: timeout,
        }),
    }
}

/// How long [`dial_leader`] waits for a welcome without a warning once it has one with.
const WARNED_GRACE: Duration = Duration::from_millis(500);

/// What a dialer remembers of a high-availability group between dials: the controller
/// that welcomed it last (or the leader a refusal named), whether its connection to
/// that leader was lost, and that leader's term. [`dial_leader_with`] dials the
/// remembered leader first and the others [`STAGGER`] later; after a loss, the others
/// first and the lost one last.
#[derive(Debug, Clone, Default)]
pub struct LeaderMemory {
    leader: Option<String>,
    term: Option<i64>,
    lost: bool,
}

impl LeaderMemory {
    /// The connection to the remembered leader ended (it died, stepped down, or the
    /// network failed): it is dialled last, and its term is what
    /// [`LeaderMemory::lost_term`] tells the others.
    pub fn lost(&mut self) {
        self.lost = self.leader.is_some();
    }

    /// The term of the leader whose connection was lost, for [`Hello::lost_term`].
    pub fn lost_term(&self) -> Option<i64> {
        self.term.filter(|_| self.lost)
    }

    /// The leader remembered, and whether its connection was lost.
    pub fn leader(&self) -> Option<(&str, bool)> {
        self.leader.as_deref().map(|l| (l, self.lost))
    }

    /// When to start dialling each target (and the remembered leader, if it is not
    /// one of them), after the start of a dial, in order.
    fn schedule(&self, targets: &[String]) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        let mut add = |t: &str, at: Duration| {
            if !out.iter().any(|(o, _)| o == t) {
                out.push((t.to_owned(), at));
            }
        };
        match (&self.leader, self.lost) {
            (Some(leader), false) => {
                add(leader, Duration::ZERO);
                for t in targets {
                    add(t, STAGGER);
                }
            }
            (Some(leader), true) => {
                for t in targets.iter().filter(|t| *t != leader) {
                    add(t, Duration::ZERO);
                }
                add(leader, STAGGER);
            }
            (None, _) => {
                for t in targets {
                    add(t, Duration::ZERO);
                }
            }
        }
        out
    }

    fn welcomed(&mut self, target: &str, term: Option<i64>) {
        self.leader = Some(target.to_owned());
        self.term = term;
        self.lost = false;
    }

    fn hint(&mut self, leader: &str) {
        // Followers name the lost leader until its lease expires: that is no news.
        if self.leader.as_deref() != Some(leader) {
            self.leader = Some(leader.to_owned());
            self.term = None;
            self.lost = false;
        }
    }
}

/// How long [`dial_leader_with`] waits after dialling the likely leader before it
/// dials the other controllers too (unless the first attempts failed sooner).
pub const STAGGER: Duration = Duration::from_millis(250);

/// Dials the controllers of `targets` (`HOST:PORT` each) through `dial_one`, all at
/// once: [`dial_leader_with`] for a dialer that remembers nothing.
pub async fn dial_leader<F, Fut>(targets: &[String], dial_one: F) -> Result<Established, NetError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Established, NetError>>,
{
    dial_leader_with(targets, &mut LeaderMemory::default(), dial_one).await
}

/// Dials the controllers of `targets` (`HOST:PORT` each) through `dial_one` and returns
/// the first that welcomes us (preferring, for a moment, one whose welcome carries no
/// warning). A controller that does not lead refuses with the leader's address, which
/// is dialled too (at once, and once). With one target and no redirection the error is
/// that dial's own; otherwise it lists what each target answered.
///
/// The order comes from `memory` ([`LeaderMemory`]), which is updated with the outcome:
/// with nothing remembered, every target at once; with a leader remembered, that one
/// first and the others [`STAGGER`] later, so that the followers are spared handshakes
/// only to refuse; after its connection was lost, the others first and the lost one
/// last. Whenever every attempt started so far has failed, the next ones start at once,
/// so a dead member of a high-availability group costs at most [`STAGGER`], never a
/// handshake timeout.
///
/// A follower that refuses while another dial is still outstanding (typically to a
/// leader that just died, which only its handshake timeout will tell), or once a
/// follower has named a leader that did not itself refuse us for good (as a live leader
/// refuses an agent already connected), is asked again after a growing, jittered pause
/// (at most [`REASK_LIMIT`] times): once a successor is elected, its answer names it (or it is
/// the successor and welcomes us), so a client or agent that dialled during the
/// election neither waits out the dead leader's timeout nor gives up when that timeout
/// (or a stopping leader's refusal) ends its last other dial before the election. When
/// no follower named a leader (none is elected, etcd is unreachable), the refusals are
/// the answer once no other dial is outstanding or waiting to start.
pub async fn dial_leader_with<F, Fut>(
    targets: &[String],
    memory: &mut LeaderMemory,
    mut dial_one: F,
) -> Result<Established, NetError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Established, NetError>>,
{
    use futures_util::StreamExt as _;
    use futures_util::future::Either;
    async fn tagged<T, F: Future<Output = T>>(
        target: String,
        reask: u32,
        fut: F,
    ) -> (String, u32, T) {
        (target, reask, fut.await)
    }
    let began = tokio::time::Instant::now();
    let mut tried = std::collections::HashSet::new();
    // Targets not dialled yet, by when they start.
    let mut waiting: std::collections::VecDeque<(String, tokio::time::Instant)> = memory
        .schedule(targets)
        .into_iter()
        .filter(|(t, _)| tried.insert(t.clone()))
        .map(|(t, at)| (t, began + at))
        .collect();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    // Dials that are not re-asks, still outstanding.
    let mut live = 0usize;
    let mut failures: Vec<(String, NetError)> = Vec::new();
    // A welcome with a warning (a leader cut off from etcd) is taken only if no other
    // target welcomes us without one soon: another controller may lead by now.
    let mut warned: Option<(Established, String, tokio::time::Instant)> = None;
    // Leaders the followers named, and targets that refused us for good (a live
    // controller's answer that is not "not the leader"). A named leader that did not
    // refuse for good may be gone, its successor moments from being elected (its lease
    // runs out): the followers are then asked again even with nothing else outstanding.
    let mut named = std::collections::HashSet::<String>::new();
    let mut refused_for_good = std::collections::HashSet::<String>::new();
    // Targets with a dial outstanding (not re-asks): a named leader whose earlier dial
    // failed is dialled again only when none is.
    let mut in_flight = std::collections::HashSet::<String>::new();
    let failover = |named: &std::collections::HashSet<String>,
                    refused: &std::collections::HashSet<String>| {
        named.iter().any(|l| !refused.contains(l))
    };
    loop {
        // Start what is due, and everything next in line when nothing is outstanding.
        let now = tokio::time::Instant::now();
        let next_due = waiting.front().map(|(_, at)| *at);
        if let Some(due) = next_due
            && (due <= now || live == 0)
        {
            while let Some((target, _)) = waiting.pop_front_if(|(_, at)| *at <= due.max(now)) {
                live += 1;
                in_flight.insert(target.clone());
                let dial = dial_one(target.clone());
                pending.push(tagged(target, 0, Either::Left(dial)));
            }
        }
        if live == 0
            && waiting.is_empty()
            && (!failover(&named, &refused_for_good) || pending.is_empty())
        {
            // Only re-asks are left (or nothing), and no leader was named whose
            // successor they could be waiting for.
            break;
        }
        let wake = match (&warned, waiting.front()) {
            (Some((_, _, until)), Some((_, at))) => Some((*until).min(*at)),
            (Some((_, _, until)), None) => Some(*until),
            (None, Some((_, at))) => Some(*at),
            (None, None) => None,
        };
        let next = match wake {
            Some(wake) => match tokio::time::timeout_at(wake, pending.next()).await {
                Ok(next) => next,
                Err(_) if warned.as_ref().is_some_and(|(_, _, u)| *u <= wake) => break,
                Err(_) => continue,
            },
            None => pending.next().await,
        };
        let Some((target, reask, result)) = next else {
            if waiting.is_empty() {
                break;
            }
            continue;
        };
        if reask == 0 {
            live -= 1;
            in_flight.remove(&target);
        }
        match result {
            Ok(est) if est.welcome.warning.is_some() => {
                if warned.is_none() {
                    let until = tokio::time::Instant::now() + WARNED_GRACE;
                    warned = Some((est, target, until));
                }
            }
            Ok(est) => {
                memory.welcomed(&target, est.welcome.term);
                return Ok(est);
            }
            Err(e) => {
                // The leader has this identity connected already: its answer is final,
                // and the refused agent must stop its nodes now, not once the
                // followers have held their answers.
                if let NetError::Refused(w) = &e
                    && drover_proto::msg::is_already_connected(&w.message)
                {
                    return Err(e);
                }
                if let NetError::Refused(w) = &e {
                    let hint = drover_proto::msg::leader_hint(&w.message);
                    if let Some(leader) = hint {
                        memory.hint(leader);
                        named.insert(leader.to_owned());
                    } else if !w.message.starts_with("not the leader") {
                        refused_for_good.insert(target.clone());
                    }
                    let waits = hint.and_then(|l| waiting.iter().position(|(t, _)| t == l));
                    match hint {
                        // Named, and waiting for its turn: its turn is now.
                        Some(_) if waits.is_some() => {
                            let (leader, _) = waiting.remove(waits.expect("found")).expect("found");
                            live += 1;
                            in_flight.insert(leader.clone());
                            let dial = dial_one(leader.clone());
                            pending.push(tagged(leader, 0, Either::Left(dial)));
                        }
                        // Not dialled yet; or its dial failed earlier in this attempt
                        // (nothing listened, or its connection saw no answer within the
                        // idle timeout: a controller restarted on its address that won
                        // the election since): a follower naming it now is news, and it
                        // is dialled again rather than the followers alone being asked
                        // until they give up. A dead one is dialled again only while
                        // followers name it, at most once per re-ask, until its lease
                        // runs out. Not one whose handshake timed out (that wait would
                        // come again), nor one that refused us for good.
                        Some(leader)
                            if tried.insert(leader.to_owned())
                                || (!in_flight.contains(leader)
                                    && !refused_for_good.contains(leader)
                                    && failures.iter().any(|(t, e)| {
                                        t == leader && !matches!(e, NetError::Timeout { .. })
                                    })) =>
                        {
                            live += 1;
                            in_flight.insert(leader.to_owned());
                            pending.push(tagged(
                                leader.to_owned(),
                                0,
                                Either::Left(dial_one(leader.to_owned())),
                            ));
                        }
                        _ => {}
                    }
                    // Asked again while something is outstanding, or a named leader may
                    // be gone: also a follower that named a leader just dialled, which
                    // may be dead, this follower its successor.
                    if (live > 0 || failover(&named, &refused_for_good)) && reask < REASK_LIMIT {
                        let pause = reask_pause(&target, reask);
                        let again = dial_one(target.clone());
                        pending.push(tagged(
                            target.clone(),
                            reask + 1,
                            Either::Right(async move {
                                tokio::time::sleep(pause).await;
                                again.await
                            }),
                        ));
                    }
                }
                failures.retain(|(t, _)| *t != target);
                failures.push((target, e));
            }
        }
    }
    if let Some((est, target, _)) = warned {
        memory.welcomed(&target, est.welcome.term);
        return Ok(est);
    }
    if failures.len() == 1 {
        return Err(failures.pop().expect("one").1);
    }
    if failures.is_empty() {
        return Err(NetError::Connection("no controller address to dial".into()));
    }
    let all: Vec<String> = failures.iter().map(|(t, e)| format!("{t}: {e}")).collect();
    Err(NetError::Connection(format!(
        "no controller welcomed us as the leader ({})",
        all.join("; ")
    )))
}

/// How often [`dial_leader`] asks a refusing follower again while another dial is
/// outstanding.
pub const REASK_LIMIT: u32 = 4;

/// The pause before re-ask number `n` (from 0) of `target`: 400 ms doubling, plus up to
/// half as much again at random, so that a fleet does not ask in step.
fn reask_pause(target: &str, n: u32) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let base = Duration::from_millis(400) * 2u32.pow(n.min(4));
    let jitter = RandomState::new().hash_one((target, n, std::time::Instant::now())) % 1000;
    base + base * u32::try_from(jitter).unwrap_or(0) / 2000
}

/// Completes the handshake of an incoming connection and reads the peer's identity.
pub async fn accept(
    incoming: quinn::Incoming,
    timeout: Duration,
) -> Result<(quinn::Connection, Identity), NetError> {
    let addr = incoming.remote_address();
    let conn = match tokio::time::timeout(timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(NetError::Connection(explain_incoming(&e, addr))),
        Err(_) => {
            return Err(NetError::Timeout {
                what: format!("handshake with {addr}"),
                after: timeout,
            });
        }
    };
    match peer_identity(&conn) {
        Ok(id) => Ok((conn, id)),
        Err(e) => {
            conn.close(1u32.into(), b"certificate carries no drover identity");
            Err(NetError::Identity(format!("{addr}: {e}")))
        }
    }
}

/// The open Hello stream, waiting for our answer.
#[derive(Debug)]
pub struct HelloResponder {
    conn: quinn::Connection,
    send: quinn::SendStream,
    id: String,
    timeout: Option<Duration>,
}

impl HelloResponder {
    /// How long the dialer said it waits for the answer, if it said.
    pub fn dialer_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Accepts the peer.
    pub async fn welcome(mut self, welcome: Welcome) -> Result<(), NetError> {
        let reply = Reply {
            id: self.id,
            result: Ok(welcome),
            warning: None,
        };
        write_frame(&mut self.send, &reply).await?;
        let _ = self.send.finish();
        Ok(())
    }

    /// Refuses the peer: sends the error, then closes the connection once it is
    /// delivered (or after a second).
    pub async fn refuse(mut self, error: WireError) {
        let reason = error.message.clone();
        let reply: Reply<Welcome> = Reply {
            id: self.id,
            result: Err(error),
            warning: None,
        };
        if write_frame(&mut self.send, &reply).await.is_ok() {
            let _ = self.send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.send.stopped()).await;
        }
        let reason: Vec<u8> = reason.bytes().take(200).collect();
        self.conn.close(3u32.into(), &reason);
    }
}

/// Reads the Hello on the first stream of an accepted connection.
pub async fn read_hello(
    conn: &quinn::Connection,
    timeout: Duration,
) -> Result<(Hello, HelloResponder), NetError> {
    let addr = conn.remote_address();
    let work = async {
        let (send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| NetError::Connection(explain_incoming(&e, addr)))?;
        let req: Request<Hello> = read_frame(&mut recv, 64 * 1024)
            .await?
            .ok_or_else(|| NetError::Protocol(format!("{addr} closed its hello stream")))?;
        Ok((
            req.body,
            HelloResponder {
                conn: conn.clone(),
                send,
                id: req.id,
                timeout: req.timeout_ms.map(Duration::from_millis),
            },
        ))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => {
            conn.close(4u32.into(), b"no hello in time");
            Err(NetError::Timeout {
                what: format!("waiting for the hello of {addr}"),
                after: timeout,
            })
        }
    }
}

/// Checks a Hello against the certificate it came with: the role and name it claims must
/// be those the certificate carries, and the API version ours. A refusal for the version
/// names both sides' API versions and software (`our_software`, e.g.
/// `drover-controller 0.1.0`), so that whoever reads it knows which side to upgrade.
pub fn check_hello(
    hello: &Hello,
    cert: &Identity,
    our_version: u32,
    our_software: &str,
) -> Result<(), WireError> {
    if hello.api_version != our_version {
        return Err(WireError::new(
            ErrorCode::VersionMismatch,
            format!(
                "api version mismatch: peer speaks {} ({}), this side speaks {our_version} ({our_software})",
                hello.api_version, hello.software
            ),
        ));
    }
    if hello.role != cert.role {
        let message = match (cert.role, hello.role) {
            (PeerRole::Client, PeerRole::Agent) => {
                "a client certificate cannot register as an agent".to_owned()
            }
            (PeerRole::Agent, PeerRole::Client) => {
                "an agent certificate cannot make client requests".to_owned()
            }
            (have, want) => format!("a {have} certificate cannot act as {want}"),
        };
        return Err(WireError::new(ErrorCode::Forbidden, message));
    }
    if hello.name != cert.name {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            format!(
                "{} name '{}' does not match its certificate name '{}'",
                hello.role, hello.name, cert.name
            ),
        ));
    }
    Ok(())
}

async fn call_on<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    body: &Req,
    peer: &str,
    timeout: Duration,
) -> Result<(Resp, Option<String>), NetError> {
    let id = new_id();
    let work = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| map_stream_err(e, conn, peer))?;
        let req = Request {
            id: id.clone(),
            timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
            body,
        };
        write_frame(&mut send, &req)
            .await
            .map_err(|e| map_stream_err(e, conn, peer))?;
        let _ = send.finish();
        let reply: Reply<Resp> = match read_frame(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(match conn.close_reason() {
                    Some(reason) => NetError::Connection(explain(&reason, peer)),
                    None => NetError::Protocol(format!("{peer} closed the stream without a reply")),
                });
            }
            Err(crate::frame::FrameError::Stream(e)) => return Err(map_stream_err(e, conn, peer)),
            Err(e) => return Err(e.into()),
        };
        if reply.id != id {
            return Err(NetError::Protocol(format!(
                "{peer} answered request '{}' on the stream of request '{id}'",
                reply.id
            )));
        }
        let warning = reply.warning;
        reply
            .result
            .map(|r| (r, warning))
            .map_err(NetError::Refused)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(NetError::Timeout {
            what: format!("request to {peer}"),
            after: timeout,
        }),
    }
}

/// Sends one request on a new stream and waits at most `timeout` for its reply.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    body: &Req,
    timeout: Duration,
) -> Result<Resp, NetError> {
    // The address, not the certificate's identity: parsing the certificate on every
    // request would cost more than the request itself.
    let peer = format!("peer {}", conn.remote_address());
    call_on(conn, body, &peer, timeout).await.map(|(r, _)| r)
}

/// As [`call`], with the reply's warning, if the peer sent one (see
/// [`drover_proto::msg::Reply::warning`]).
pub async fn call_warned<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    body: &Req,
    timeout: Duration,
) -> Result<(Resp, Option<String>), NetError> {
    let peer = format!("peer {}", conn.remote_address());
    call_on(conn, body, &peer, timeout).await
}

/// What a request handler answers: one reply, or a stream of replies that ends when
/// the handler drops its sender (or when the peer stops reading).
#[derive(Debug)]
pub enum Answer<R> {
    /// One reply frame.
    One(R),
    /// Reply frames as they come.
    Stream(tokio::sync::mpsc::Receiver<R>),
}

/// The replies of a request that reports progress: a reply made by `progress` for the
/// counts `work` publishes while it runs, at most one per `every` (a watch keeps only the
/// latest, so a slow reader or a burst costs nothing but skipped counts), then the reply
/// `answer` makes of its outcome. `work` runs to its end even when the requester goes
/// away: what it does does not depend on who is listening.
pub fn progress_stream<T, P, R>(
    work: impl Future<Output = T> + Send + 'static,
    mut counts: tokio::sync::watch::Receiver<P>,
    every: Duration,
    progress: impl Fn(P) -> R + Send + 'static,
    answer: impl FnOnce(T) -> R + Send + 'static,
) -> tokio::sync::mpsc::Receiver<R>
where
    T: Send + 'static,
    P: Clone + Send + Sync + 'static,
    R: Send + 'static,
{
    use tokio::sync::mpsc::error::TrySendError;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        tokio::pin!(work);
        let mut listening = true;
        let out = loop {
            tokio::select! {
                out = &mut work => break out,
                changed = counts.changed(), if listening => {
                    let sent = changed.is_ok() && {
                        let p = counts.borrow_and_update().clone();
                        !matches!(tx.try_send(progress(p)), Err(TrySendError::Closed(_)))
                    };
                    if !sent {
                        listening = false;
                        continue;
                    }
                    tokio::select! {
                        out = &mut work => break out,
                        () = tokio::time::sleep(every) => {}
                    }
                }
            }
        };
        let _ = tx.send(answer(out)).await;
    });
    rx
}

/// Runs `work`, marking `beats` as changed every `every` until it ends, so that a
/// [`progress_stream`] over it sends a frame at least that often: its requester, which
/// waits a timeout between two frames, waits as long as the work goes on. With `quiet`,
/// only while the value in `beats` changed (real progress) within that time: work stuck
/// for longer (a write that never returns) lets its requester time out as without
/// heartbeats.
pub async fn with_heartbeats<T, P: Clone + PartialEq>(
    work: impl Future<Output = T>,
    beats: tokio::sync::watch::Sender<P>,
    every: Duration,
    quiet: Option<Duration>,
) -> T {
    tokio::pin!(work);
    let mut beat = tokio::time::interval(every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    let mut last = beats.borrow().clone();
    let mut moved = tokio::time::Instant::now();
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = beat.tick() => {
                let now = beats.borrow().clone();
                if now != last {
                    last = now;
                    moved = tokio::time::Instant::now();
                }
                if quiet.is_none_or(|q| moved.elapsed() < q) {
                    beats.send_modify(|_| {});
                }
            }
        }
    }
}

/// Serves the streams a peer opens until the connection ends, returning why it ended.
///
/// Each stream is handled in its own task: read one request frame (within
/// `settings.request_read_timeout`, so a stream opened and never written frees itself),
/// run `handler`, write its reply. A frame that cannot be decoded is answered with a
/// `bad_request` error on that stream; the connection and the process are unaffected.
/// Request frames take their memory from one [`FrameBudget::connection`] per connection.
pub async fn serve<Req, Resp, F, Fut>(
    conn: quinn::Connection,
    settings: TransportSettings,
    handler: F,
) -> quinn::ConnectionError
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Request<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, WireError>> + Send + 'static,
{
    serve_answers(conn, settings, move |req| {
        let fut = handler(req);
        async move { fut.await.map(Answer::One) }
    })
    .await
}

/// As [`serve`], for handlers that may answer with a stream of replies.
pub async fn serve_answers<Req, Resp, F, Fut>(
    conn: quinn::Connection,
    settings: TransportSettings,
    handler: F,
) -> quinn::ConnectionError
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Request<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Answer<Resp>, WireError>> + Send + 'static,
{
    serve_answers_warned(conn, settings, handler, || None).await
}

/// As [`serve_answers`]; every successful reply frame carries what `warning` says when
/// it is written ([`drover_proto::msg::Reply::warning`]).
pub async fn serve_answers_warned<Req, Resp, F, Fut, W>(
    conn: quinn::Connection,
    settings: TransportSettings,
    handler: F,
    warning: W,
) -> quinn::ConnectionError
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Request<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Answer<Resp>, WireError>> + Send + 'static,
    W: Fn() -> Option<String> + Clone + Send + Sync + 'static,
{
    let budget = FrameBudget::connection();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let handler = handler.clone();
        let budget = budget.clone();
        let warning = warning.clone();
        tokio::spawn(async move {
            let _serving = Serving::new();
            let read = tokio::time::timeout(
                settings.request_read_timeout,
                read_frame_in::<Request<Req>>(&mut recv, MAX_FRAME_LEN, &budget),
            )
            .await;
            let (id, answer) = match read {
                Ok(Ok(Some(req))) => {
                    let id = req.id.clone();
                    (id, handler(req).await)
                }
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::debug!("bad request frame: {e}");
                    (
                        String::new(),
                        Err(WireError::new(ErrorCode::BadRequest, e.to_string())),
                    )
                }
                Err(_) => {
                    let _ = recv.stop(0u32.into());
                    (
                        String::new(),
                        Err(WireError::new(
                            ErrorCode::BadRequest,
                            format!(
                                "no request frame within {}",
                                humanize(settings.request_read_timeout)
                            ),
                        )),
                    )
                }
            };
            match answer {
                Ok(Answer::Stream(mut rx)) => loop {
                    // Stop as soon as the peer goes away, even while nothing is sent.
                    let item = tokio::select! {
                        item = rx.recv() => item,
                        _ = send.stopped() => return,
                    };
                    let Some(item) = item else {
                        let _ = send.finish();
                        return;
                    };
                    let bytes = fit_frame(
                        crate::frame::encode(&Reply {
                            id: id.clone(),
                            result: Ok::<_, WireError>(item),
                            warning: warning(),
                        }),
                        &id,
                    );
                    if send.write_all(&bytes).await.is_err() {
                        return;
                    }
                },
                other => {
                    let result = other.map(|a| match a {
                        Answer::One(r) => r,
                        Answer::Stream(_) => unreachable!("matched above"),
                    });
                    let warning = result.as_ref().ok().and_then(|_| warning());
                    let reply: Reply<Resp> = Reply {
                        id,
                        result,
                        warning,
                    };
                    let id = reply.id.clone();
                    let bytes = fit_frame(crate::frame::encode(&reply), &id);
                    drop(reply);
                    if send.write_all(&bytes).await.is_ok() {
                        let _ = send.finish();
                    }
                }
            }
        });
    }
}

/// An encoded reply frame, or, when it exceeds [`MAX_FRAME_LEN`] (which the peer would
/// refuse), an error reply that says so.
fn fit_frame(bytes: Vec<u8>, id: &str) -> Vec<u8> {
    let len = bytes.len() - crate::frame::HEADER_LEN;
    if len <= MAX_FRAME_LEN {
        return bytes;
    }
    tracing::warn!("a reply of {len} bytes exceeds the frame limit; answering an error");
    crate::frame::encode(&Reply::<()> {
        id: id.to_owned(),
        result: Err(WireError::new(
            ErrorCode::Internal,
            format!("reply of {len} bytes exceeds the frame limit of {MAX_FRAME_LEN} bytes"),
        )),
        warning: None,
    })
}

/// The replies of a streamed request; dropping it tells the peer to stop.
#[derive(Debug)]
pub struct ReplyStream {
    id: String,
    peer: String,
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    /// Kept open so the peer does not see the request stream end early.
    _send: quinn::SendStream,
    warning: Option<String>,
}

impl ReplyStream {
    /// The last warning a reply of this stream carried, if any.
    pub fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// The next reply; `Ok(None)` when the peer ended the stream.
    pub async fn next<Resp: DeserializeOwned>(&mut self) -> Result<Option<Resp>, NetError> {
        match read_frame::<Reply<Resp>>(&mut self.recv, MAX_FRAME_LEN).await {
            Ok(Some(reply)) => {
                if reply.id != self.id {
                    return Err(NetError::Protocol(format!(
                        "{} answered request '{}' on the stream of request '{}'",
                        self.peer, reply.id, self.id
                    )));
                }
                if reply.warning.is_some() {
                    self.warning = reply.warning;
                }
                reply.result.map(Some).map_err(NetError::Refused)
            }
            Ok(None) => Ok(None),
            Err(crate::frame::FrameError::Stream(e)) => {
                Err(map_stream_err(e, &self.conn, &self.peer))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Sends one request whose replies come as a stream; read them with
/// [`ReplyStream::next`].
pub async fn call_stream<Req: Serialize>(
    conn: &quinn::Connection,
    body: &Req,
    timeout: Duration,
) -> Result<ReplyStream, NetError> {
    // The address, not the certificate's identity: parsing the certificate on every
    // request would cost more than the request itself.
    let peer = format!("peer {}", conn.remote_address());
    let id = new_id();
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| map_stream_err(e, conn, &peer))?;
    let req = Request {
        id: id.clone(),
        timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        body,
    };
    write_frame(&mut send, &req)
        .await
        .map_err(|e| map_stream_err(e, conn, &peer))?;
    Ok(ReplyStream {
        id,
        peer,
        conn: conn.clone(),
        recv,
        _send: send,
        warning: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{HEADER_LEN, decode_exact, encode};
    use std::collections::BTreeMap;

    #[test]
    fn a_reply_over_the_frame_limit_becomes_an_error_reply() {
        let small = encode(&Reply::<String> {
            id: "r1".into(),
            result: Ok("fine".into()),
            warning: None,
        });
        assert_eq!(fit_frame(small.clone(), "r1"), small);

        let big = encode(&Reply::<String> {
            id: "r1".into(),
            result: Ok("x".repeat(MAX_FRAME_LEN)),
            warning: None,
        });
        assert!(big.len() - HEADER_LEN > MAX_FRAME_LEN);
        let fitted = fit_frame(big, "r1");
        let reply: Reply<String> = decode_exact(&fitted, MAX_FRAME_LEN).unwrap();
        assert_eq!(reply.id, "r1");
        let err = reply.result.unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(
            err.message.contains("exceeds the frame limit"),
            "{}",
            err.message
        );
    }

    /// A controller's credentials from a new CA.
    fn controller_creds() -> Credentials {
        let ca = drover_pki::Ca::generate("t").unwrap();
        let leaf = ca
            .issue(&drover_pki::LeafSpec::new(PeerRole::Controller, "ctl"))
            .unwrap();
        Credentials::from_pem(
            ca.pem().cert.as_bytes(),
            leaf.cert.as_bytes(),
            leaf.key.as_bytes(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_keyed_endpoint_resets_every_lost_connection_whose_packets_come_at_once() {
        use quinn_proto::ConnectionIdGenerator as _;
        let key = [7u8; crate::reset_key::LEN];
        let endpoint = server_endpoint_keyed(
            &controller_creds(),
            "127.0.0.1:0".parse().unwrap(),
            &TransportSettings::default(),
            Some(&key),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        // Packets of connections an endpoint with this key made before a restart: short
        // headers whose connection ids carry the key's hash, sent in one burst, as the
        // keep-alives of a fleet's agents reach a restarted controller.
        let mut ids = quinn_proto::HashedConnectionIdGenerator::from_key(cid_key(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        ));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        const LOST: usize = 64;
        const LEN: usize = 100;
        for _ in 0..LOST {
            let mut packet = vec![0x41u8];
            packet.extend_from_slice(&ids.generate_cid());
            packet.resize(LEN, 0xab);
            sock.send_to(&packet, addr).await.unwrap();
        }
        // One reset each (the endpoint sends nothing else to this socket), each
        // smaller than its packet.
        let mut buf = [0u8; 2048];
        let mut resets = 0;
        while resets < LOST {
            match tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf)).await {
                Ok(Ok((len, from))) => {
                    assert_eq!(from, addr);
                    assert!(len < LEN, "a reset of {len} bytes answered {LEN}");
                    resets += 1;
                }
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => break,
            }
        }
        assert_eq!(resets, LOST, "lost connections left to their idle timeout");

        // A packet whose connection id does not carry the hash is noise: no reset.
        let mut packet = vec![0x41u8];
        packet.extend_from_slice(&[0x5a; 8]);
        packet.resize(LEN, 0xab);
        sock.send_to(&packet, addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
        assert!(got.is_err(), "noise was answered: {got:?}");
    }

    /// When the frames of [`with_heartbeats`] come, for work that makes progress once,
    /// after 0.5 s, and then none, forever: watched on a paused clock for 20 s.
    fn heartbeats(quiet: Option<Duration>) -> Vec<Duration> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::watch::channel(0u32);
            let progress = tx.clone();
            let work = async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                progress.send_replace(1);
                std::future::pending::<()>().await;
            };
            let every = Duration::from_secs(1);
            let task = tokio::spawn(with_heartbeats(work, tx, every, quiet));
            let start = tokio::time::Instant::now();
            let mut seen = Vec::new();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await
                {
                    seen.push(start.elapsed());
                }
            }
            task.abort();
            seen
        })
    }

    #[test]
    fn heartbeats_come_every_period_and_stop_once_the_work_is_quiet_too_long() {
        let endless = heartbeats(None);
        assert!(endless.len() >= 19, "{endless:?}");
        assert!(
            endless
                .windows(2)
                .all(|w| w[1] - w[0] <= Duration::from_secs(1)),
            "{endless:?}"
        );
        // The progress at 0.5 s is seen at the beat of 1 s: beats until 3 s after that.
        let bounded = heartbeats(Some(Duration::from_secs(3)));
        let last = *bounded.last().unwrap();
        assert!(
            last >= Duration::from_secs(3) && last <= Duration::from_secs(4),
            "{bounded:?}"
        );
    }

    /// `dial_leader` against fake controllers: `dead` answers nothing until its
    /// timeout, the others refuse with `refusal`. Returns how often each was dialled
    /// and the time taken.
    fn dial_fakes(dead: Option<&str>, refusal: &str) -> (BTreeMap<String, usize>, Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let calls = std::sync::Mutex::new(BTreeMap::<String, usize>::new());
        let targets = vec!["a:1".to_owned(), "b:1".to_owned(), "c:1".to_owned()];
        // The paused runtime's clock, which only its own `now` reads.
        let start = rt.block_on(async { tokio::time::Instant::now() });
        let result = rt.block_on(dial_leader(&targets, |t| {
            let dead = dead == Some(t.as_str());
            let (refusal, calls) = (refusal.to_owned(), &calls);
            // Counted when dialled (polled), not when the dial is made ready.
            async move {
                *calls.lock().unwrap().entry(t.clone()).or_default() += 1;
                if dead {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    return Err(NetError::Timeout {
                        what: format!("connecting to {t}"),
                        after: Duration::from_secs(5),
                    });
                }
                Err(NetError::Refused(WireError::new(
                    ErrorCode::Unavailable,
                    refusal,
                )))
            }
        }));
        assert!(result.is_err());
        let took = rt.block_on(async { start.elapsed() });
        (calls.into_inner().unwrap(), took)
    }

    /// `dial_leader_with` against fake controllers with `memory`: each target answers
    /// as `answer` says (`None`: nothing until a 5 s timeout; `Some(m)`: a refusal with
    /// `m` after 1 ms). Returns every dial with when it started, in order.
    fn dial_in_order(
        memory: &mut LeaderMemory,
        answer: impl Fn(&str) -> Option<String>,
    ) -> Vec<(String, Duration)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let dials = std::sync::Mutex::new(Vec::new());
        let targets = vec!["a:1".to_owned(), "b:1".to_owned(), "c:1".to_owned()];
        let start = rt.block_on(async { tokio::time::Instant::now() });
        let result = rt.block_on(dial_leader_with(&targets, memory, |t| {
            let (answer, dials) = (answer(&t), &dials);
            async move {
                dials.lock().unwrap().push((t.clone(), start.elapsed()));
                match answer {
                    None => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        Err(NetError::Timeout {
                            what: format!("connecting to {t}"),
                            after: Duration::from_secs(5),
                        })
                    }
                    Some(m) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        Err(NetError::Refused(WireError::new(ErrorCode::Unavailable, m)))
                    }
                }
            }
        }));
        let err = result.unwrap_err().to_string();
        // The leader's refusal of an agent already connected is the answer by itself.
        if !drover_proto::msg::is_already_connected(&err) {
            for t in &targets {
                assert!(err.contains(t.as_str()), "{err}");
            }
        }
        dials.into_inner().unwrap()
    }

    /// When `target` was first dialled, to the millisecond.
    fn started(dials: &[(String, Duration)], target: &str) -> Duration {
        let at = dials
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("{target} was not dialled: {dials:?}"));
        Duration::from_millis(u64::try_from((at.as_micros() + 500) / 1000).unwrap())
    }

    #[test]
    fn the_remembered_leader_is_dialled_first_and_the_others_a_stagger_later() {
        let mut memory = LeaderMemory::default();
        memory.welcomed("b:1", Some(7));
        assert_eq!(memory.lost_term(), None);
        // b is gone without a word; a and c know no leader.
        let dials = dial_in_order(&mut memory, |t| {
            (t != "b:1").then(|| "not the leader; no leader is elected yet".to_owned())
        });
        assert_eq!(started(&dials, "b:1"), Duration::ZERO, "{dials:?}");
        assert_eq!(started(&dials, "a:1"), STAGGER, "{dials:?}");
        assert_eq!(started(&dials, "c:1"), STAGGER, "{dials:?}");
    }

    #[test]
    fn after_a_loss_the_others_are_dialled_first_and_told_the_lost_term() {
        let mut memory = LeaderMemory::default();
        memory.welcomed("b:1", Some(7));
        memory.lost();
        assert_eq!(memory.lost_term(), Some(7));
        assert_eq!(memory.leader(), Some(("b:1", true)));
        let dials = dial_in_order(&mut memory, |t| {
            (t != "b:1").then(|| "not the leader; no leader is elected yet".to_owned())
        });
        assert_eq!(started(&dials, "a:1"), Duration::ZERO, "{dials:?}");
        assert_eq!(started(&dials, "c:1"), Duration::ZERO, "{dials:?}");
        // Both refused at once: the lost one is next, without waiting for its turn.
        assert!(started(&dials, "b:1") < STAGGER, "{dials:?}");
        // The followers named no leader: the lost one is still remembered as lost.
        assert_eq!(memory.lost_term(), Some(7));
    }

    #[test]
    fn a_refusal_naming_a_waiting_target_starts_it_at_once_and_is_remembered() {
        let mut memory = LeaderMemory::default();
        memory.welcomed("a:1", None);
        // a refuses at once naming c, which is then dialled before its turn.
        let dials = dial_in_order(&mut memory, |t| match t {
            "a:1" => Some("not the leader; the leader is c:1".to_owned()),
            "c:1" => None,
            _ => Some("not the leader; the leader is c:1".to_owned()),
        });
        assert_eq!(started(&dials, "a:1"), Duration::ZERO, "{dials:?}");
        assert!(started(&dials, "c:1") < STAGGER, "{dials:?}");
        // b still waits for its turn (a dial to c is outstanding).
        assert_eq!(started(&dials, "b:1"), STAGGER, "{dials:?}");
        assert_eq!(memory.leader(), Some(("c:1", false)));
        // Each target dialled once apart from re-asks of refusing followers.
        assert_eq!(dials.iter().filter(|(t, _)| t == "c:1").count(), 1);
    }

    #[test]
    fn followers_naming_a_leader_are_asked_again_as_long_as_the_limit_allows() {
        let (calls, took) = dial_fakes(Some("a:1"), "not the leader; the leader is a:1");
        assert_eq!(calls["a:1"], 1, "{calls:?}");
        // The named leader never answers and no successor is named: every re-ask is
        // made, then the refusals are the answer.
        assert_eq!(calls["b:1"], 1 + REASK_LIMIT as usize, "{calls:?}");
        assert_eq!(calls["c:1"], 1 + REASK_LIMIT as usize, "{calls:?}");
        let most: Duration = (0..REASK_LIMIT).map(reask_pause_most).sum();
        assert!(took <= most + Duration::from_millis(10), "{took:?}");
    }

    /// The longest [`reask_pause`] number `n` may be.
    fn reask_pause_most(n: u32) -> Duration {
        let base = Duration::from_millis(400) * 2u32.pow(n.min(4));
        base + base / 2
    }

    /// Dials `targets` on a paused clock while the leader `a:1` is dead: its dial times
    /// out after `dead_for`. Until `elected` (2 s) every other target refuses naming it;
    /// from then on `b:1` is its successor (a fake cannot make a welcome: it fails
    /// otherwise) and the rest name `b:1`. When each target was dialled.
    fn during_election(targets: &[&str], dead_for: Duration) -> Vec<(String, Duration)> {
        dials_on_a_paused_clock(targets, |t, now| async move {
            let refuse = |m: &str| {
                Err(NetError::Refused(WireError::new(
                    ErrorCode::Unavailable,
                    m.to_owned(),
                )))
            };
            match t.as_str() {
                "a:1" => {
                    tokio::time::sleep(dead_for).await;
                    Err(NetError::Timeout {
                        what: "connecting to a:1".into(),
                        after: dead_for,
                    })
                }
                _ if now < ELECTED => refuse("not the leader; the leader is a:1"),
                "b:1" => Err(NetError::Connection("the successor".into())),
                _ => refuse("not the leader; the leader is b:1"),
            }
        })
    }

    /// Runs [`dial_leader`] over `targets` on a paused clock, each dial answered by
    /// `answer(target, when)`, which must fail (a fake cannot make a welcome). Every dial
    /// with when it started, in order.
    fn dials_on_a_paused_clock<F, Fut>(targets: &[&str], answer: F) -> Vec<(String, Duration)>
    where
        F: Fn(String, Duration) -> Fut,
        Fut: Future<Output = Result<Established, NetError>>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let targets: Vec<String> = targets.iter().map(|t| (*t).to_owned()).collect();
        let start = rt.block_on(async { tokio::time::Instant::now() });
        let dials = std::sync::Mutex::new(Vec::new());
        let result = rt.block_on(dial_leader(&targets, |t| {
            let now = start.elapsed();
            dials.lock().unwrap().push((t.clone(), now));
            answer(t, now)
        }));
        assert!(result.is_err());
        dials.into_inner().unwrap()
    }

    /// When the successor is elected in [`during_election`].
    const ELECTED: Duration = Duration::from_secs(2);

    /// The leader dies: its followers name it until its lease runs out (2 s), then one
    /// of them leads. The dial to the dead one times out (2.5 s) before the re-asks that
    /// would find the successor are due: they are still made, and reach it.
    #[test]
    fn a_dial_during_an_election_reaches_the_successor_after_the_dead_leaders_timeout() {
        let dials = during_election(&["a:1", "b:1", "c:1"], Duration::from_millis(2500));
        assert!(
            dials.iter().any(|(t, at)| t == "b:1" && *at >= ELECTED),
            "the successor was not asked once elected: {dials:?}"
        );
    }

    /// Given one follower's address only: it names the dead leader, whose dial hangs
    /// past the election, and is asked again meanwhile, so its answer as the successor
    /// is heard.
    #[test]
    fn one_follower_given_is_asked_again_while_the_leader_it_named_is_dialled() {
        let dials = during_election(&["b:1"], Duration::from_secs(5));
        assert!(
            dials
                .iter()
                .any(|(t, at)| t == "b:1" && *at >= ELECTED && *at < Duration::from_secs(5)),
            "the follower was not asked again before the dead leader's timeout: {dials:?}"
        );
    }

    /// A controller restarted on its address: dialled while it was down, then elected,
    /// its followers naming it throughout (its lease held). Its first dial fails after
    /// `fails_after` with `why`; from `back` on it answers. When it was dialled again,
    /// and when a follower was first asked again from `back` on.
    fn redialled(fails_after: Duration, why: &str, back: Duration) -> (Option<Duration>, Duration) {
        let dials = dials_on_a_paused_clock(&["a:1", "b:1", "c:1"], |t, now| async move {
            match t.as_str() {
                "a:1" if now < back => {
                    tokio::time::sleep(fails_after).await;
                    Err(NetError::Connection(why.to_owned()))
                }
                // Back (a fake cannot welcome: it fails otherwise).
                "a:1" => Err(NetError::Connection("the leader, back".into())),
                _ => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Err(NetError::Refused(WireError::new(
                        ErrorCode::Unavailable,
                        "not the leader; the leader is a:1".to_owned(),
                    )))
                }
            }
        });
        let again = dials
            .iter()
            .find(|(t, at)| t == "a:1" && *at >= back)
            .map(|(_, at)| *at);
        let reask = dials
            .iter()
            .find(|(t, at)| t != "a:1" && *at >= back)
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("a follower asked again from {back:?} on: {dials:?}"));
        (again, reask)
    }

    /// Dialled again on the followers' word, at once, rather than the followers alone
    /// being asked until they give up: whether nothing listened on its address, or its
    /// connection saw no answer within the (group's 2 s) idle timeout.
    #[test]
    fn a_named_leader_whose_dial_failed_earlier_is_dialled_again() {
        for (fails_after, why, back) in [
            (
                Duration::from_millis(1),
                "nothing listens at udp a:1: connection refused",
                Duration::from_millis(300),
            ),
            (
                Duration::from_secs(2),
                "no answer from controller a:1 within the idle timeout",
                Duration::from_millis(2500),
            ),
        ] {
            let (again, reask) = redialled(fails_after, why, back);
            assert!(
                again.is_some_and(|at| at <= reask + Duration::from_millis(2)),
                "{why}: a:1 not dialled again once named ({again:?}, re-ask at {reask:?})"
            );
        }
    }

    /// The leader the followers name answers, refusing us for good (an agent already
    /// connected, say): no election is under way, so nobody is asked again.
    #[test]
    fn a_named_leader_that_refuses_for_good_is_the_answer_at_once() {
        let mut memory = LeaderMemory::default();
        let dials = dial_in_order(&mut memory, |t| match t {
            "a:1" => Some("agent a1 is already connected from 10.0.0.9:4000".to_owned()),
            _ => Some("not the leader; the leader is a:1".to_owned()),
        });
        assert!(
            dials.iter().all(|(_, at)| *at < Duration::from_millis(100)),
            "asked again: {dials:?}"
        );
    }

    /// The leader has the agent's identity connected already: that refusal is the
    /// answer at once, not once a follower that holds its answer (or a dead member's
    /// handshake) is done, since the refused agent stops its nodes on it.
    #[test]
    fn an_agent_already_connected_is_the_answer_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let targets = vec!["a:1".to_owned(), "b:1".to_owned()];
        let mut memory = LeaderMemory::default();
        let (result, took) = rt.block_on(async {
            let start = tokio::time::Instant::now();
            let r = dial_leader_with(&targets, &mut memory, |t| async move {
                if t == "a:1" {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Err(NetError::Refused(WireError::new(
                        ErrorCode::Unavailable,
                        "agent a1 is already connected from 10.0.0.9:4000",
                    )))
                } else {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Err(NetError::Timeout {
                        what: format!("connecting to {t}"),
                        after: Duration::from_secs(5),
                    })
                }
            })
            .await;
            (r, start.elapsed())
        });
        let err = result.unwrap_err().to_string();
        assert!(drover_proto::msg::is_already_connected(&err), "{err}");
        assert!(took < Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn refusals_with_nothing_outstanding_are_the_answer_at_once() {
        let (calls, took) = dial_fakes(None, "not the leader; no leader is elected yet");
        assert!(calls.values().all(|n| *n == 1), "{calls:?}");
        assert!(took < Duration::from_millis(10), "{took:?}");
    }
}
