//! The WebSocket server zeek-client talks to: Zeek's `/v1/messages/json` endpoint.
//!
//! Per connection: the HTTP upgrade and the client's subscription (a JSON array of topic
//! prefixes) within [`Limits::handshake_timeout`], then the `ack`, then data messages
//! both ways. Requests run as tasks of their own (a deploy goes on when its client
//! leaves, as in Zeek) and their responses are published on the controller topic to
//! every connection subscribed to a prefix of it — other clients see them too, as on a
//! Zeek controller, and zeek-client picks its own by request id.
//!
//! Bad input never reaches further than its connection: undecodable messages get a
//! Broker error message (`{"type":"error","code":"deserialization_failed",…}`), which
//! zeek-client skips; a wrong path gets `invalid_uri` and close code 1008; an oversize
//! message closes the connection with 1009; a client that does not subscribe in time,
//! or does not read what it is sent, is dropped.
//!
//! With [`Tls`] the same is served as `wss://`: the TLS handshake (mutual: the client
//! shows a certificate from the cluster CA) comes first, within the handshake timeout,
//! and the client's identity must pass [`Tls::authorize`]; a client that fails either
//! is dropped before any WebSocket byte is read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use drover_net::tls::{TcpTlsAcceptor, TlsPeer};
use drover_proto::access::Scope;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::broker::{self, Event};
use super::events::{self, Incoming, TOPIC, ZeekRequest};

/// The only path served, as Zeek's.
pub(crate) const PATH: &str = "/v1/messages/json";

/// Bounds on what one client may cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// From TCP accept to a received subscription.
    pub(crate) handshake_timeout: Duration,
    /// The largest message (and frame) accepted, in bytes.
    pub(crate) max_message: usize,
    /// How long one write to a client may block before it is dropped.
    pub(crate) write_timeout: Duration,
    /// Connections served at once; more are closed at accept.
    pub(crate) max_connections: usize,
    /// Connections of one address still in their handshake (TLS, upgrade, subscription)
    /// at once; more from it are closed at accept. Anyone who reaches the port can hold
    /// a handshake open until its timeout, with no certificate and no word: without
    /// this, one host could fill `max_connections` and lock every zeek-client out.
    pub(crate) max_handshakes_per_addr: usize,
    /// Whether loopback addresses count toward that too (tests; see
    /// [`Handshaking::start`]).
    pub(crate) count_loopback: bool,
    /// Requests of one connection running at once; more wait (the connection is not
    /// read meanwhile).
    pub(crate) max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_message: drover_proto::msg::MAX_FRAME_LEN,
            write_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_handshakes_per_addr: 8,
            count_loopback: false,
            max_in_flight: 16,
        }
    }
}

/// Who is connected: its address and, on `wss://`, its verified certificate.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    /// Where it connected from.
    pub(crate) addr: SocketAddr,
    /// Its certificate's identity, serial and scope; `None` on `ws://`.
    pub(crate) tls: Option<TlsPeer>,
}

/// Answers one request of a client: its response event, or `None` for no response at
/// all.
pub(crate) type Handler = Arc<
    dyn Fn(Arc<Client>, String, ZeekRequest) -> BoxFuture<'static, Option<Event>> + Send + Sync,
>;

/// Decides whether a client that completed the TLS handshake may go on: `Err` tells
/// why not. An admitted connection is tracked while the guard lives, and cancelling the
/// token (a reload found its client revoked or untrusted) ends it.
pub(crate) type Authorize = Arc<
    dyn Fn(&TlsPeer, SocketAddr, CancellationToken) -> Result<drover_net::peers::Tracked, String>
        + Send
        + Sync,
>;

/// TLS for the front: `wss://` instead of `ws://`.
pub(crate) struct Tls {
    /// Runs the (mutual) TLS handshake.
    pub(crate) acceptor: TcpTlsAcceptor,
    /// Admits or refuses a verified client.
    pub(crate) authorize: Authorize,
}

/// A frame published to subscribers of its topic.
#[derive(Debug)]
struct Published {
    topic: &'static str,
    frame: String,
}

/// What every connection shares.
struct Ctx {
    limits: Limits,
    handler: Handler,
    /// Our endpoint id; connection `n` is `<id>-websocket-<n>`, as in Zeek.
    endpoint: String,
    version: String,
    bus: broadcast::Sender<Arc<Published>>,
    connections: Arc<Semaphore>,
    /// Connections in their handshake, by address (see
    /// [`Limits::max_handshakes_per_addr`]).
    handshaking: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    next: AtomicU64,
    tls: Option<Tls>,
}

/// A connection counted in [`Ctx::handshaking`] until its handshake is over.
struct Handshaking {
    ctx: Arc<Ctx>,
    addr: std::net::IpAddr,
}

impl Handshaking {
    /// Counts a handshake from `addr`, unless that address has as many as it may
    /// (`None`), or is not counted: loopback, where every local zeek-client comes from
    /// and whoever is there may deploy anyway. An IPv6 address counts with its /64, the
    /// least a host is given.
    fn start(ctx: &Arc<Ctx>, addr: std::net::IpAddr) -> Option<Option<Self>> {
        let addr = match addr.to_canonical() {
            a if a.is_loopback() && !ctx.limits.count_loopback => return Some(None),
            std::net::IpAddr::V6(v6) => {
                std::net::IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into())
            }
            v4 => v4,
        };
        let mut by_addr = ctx
            .handshaking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = by_addr.entry(addr).or_default();
        if *n >= ctx.limits.max_handshakes_per_addr {
            return None;
        }
        *n += 1;
        Some(Some(Self {
            ctx: ctx.clone(),
            addr,
        }))
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut by_addr = self
            .ctx
            .handshaking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = by_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                by_addr.remove(&self.addr);
            }
        }
    }
}

/// Serves WebSocket clients on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    limits: Limits,
    endpoint: String,
    version: String,
    handler: Handler,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) {
    let ctx = Arc::new(Ctx {
        limits,
        handler,
        endpoint,
        version,
        bus: broadcast::channel(1024).0,
        connections: Arc::new(Semaphore::new(limits.max_connections)),
        handshaking: std::sync::Mutex::default(),
        next: AtomicU64::new(1),
        tls,
    });
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    warn!("zeek websocket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(handshaking) = Handshaking::start(&ctx, peer.ip()) else {
            // Said at debug level only: a flood would flood the log too.
            debug!(%peer, "zeek websocket: too many handshakes from this address, closing this one");
            continue;
        };
        let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
            warn!(%peer, "zeek websocket: too many connections, closing this one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + ctx.limits.handshake_timeout;
            match &ctx.tls {
                None => {
                    let client = Arc::new(Client {
                        addr: peer,
                        tls: None,
                    });
                    connection(&ctx, stream, client, deadline, handshaking, shutdown).await;
                }
                Some(tls) => {
                    let ended = shutdown.child_token();
                    if let Some((stream, cert, _tracked)) =
                        secure(tls, stream, peer, deadline, ended.clone()).await
                    {
                        let client = Arc::new(Client {
                            addr: peer,
                            tls: Some(cert),
                        });
                        connection(&ctx, stream, client, deadline, handshaking, ended).await;
                    }
                }
            }
            drop(permit);
        });
    }
}

fn close_frame(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// The TLS handshake and the client's admission; `None` when it is refused (and
/// logged).
async fn secure(
    tls: &Tls,
    stream: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    ended: CancellationToken,
) -> Option<(
    drover_net::tls::TcpTlsStream,
    TlsPeer,
    drover_net::peers::Tracked,
)> {
    let (stream, client) =
        match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(%peer, "zeek websocket: refused connection: {e}");
                return None;
            }
            Err(_) => {
                debug!(%peer, "zeek websocket: no tls handshake in time");
                return None;
            }
        };
    let tracked = match (tls.authorize)(&client, peer, ended) {
        Ok(t) => t,
        Err(e) => {
            warn!(%peer, client = %client.identity, "zeek websocket: refused connection: {e}");
            return None;
        }
    };
    debug!(%peer, client = %client.identity, "zeek websocket: tls client admitted");
    Some((stream, client, tracked))
}

/// Sends one message, giving up after the write timeout.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    limits: &Limits,
    msg: Message,
) -> Result<(), String> {
    match tokio::time::timeout(limits.write_timeout, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the client does not read".to_owned()),
    }
}

/// Sends a Broker error message and closes.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    limits: &Limits,
    code: &str,
    context: &str,
    close: CloseCode,
) {
    if send(
        ws,
        limits,
        Message::text(broker::error_message(code, context)),
    )
    .await
    .is_ok()
    {
        let _ = send(ws, limits, close_frame(close, context)).await;
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    stream: S,
    client: Arc<Client>,
    deadline: tokio::time::Instant,
    handshaking: Option<Handshaking>,
    shutdown: CancellationToken,
) {
    let peer = client.addr;
    let limits = ctx.limits;
    let mut path = String::new();
    let mut app = None;
    let callback = Peek {
        path: &mut path,
        app: &mut app,
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_message))
        .max_frame_size(Some(limits.max_message));
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let mut ws = match tokio::time::timeout_at(deadline, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            debug!(%peer, "zeek websocket upgrade failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "zeek websocket: no upgrade request in time");
            return;
        }
    };
    if path != PATH {
        debug!(%peer, %path, "zeek websocket: wrong path");
        let context = format!("invalid URI '{path}': the endpoint is {PATH}");
        refuse(&mut ws, &limits, "invalid_uri", &context, CloseCode::Policy).await;
        return;
    }
    let topics = loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => {
                debug!(%peer, "zeek websocket: no subscription in time");
                let context = format!(
                    "no subscription within {}s",
                    limits.handshake_timeout.as_secs()
                );
                refuse(
                    &mut ws,
                    &limits,
                    "deserialization_failed",
                    &context,
                    CloseCode::Policy,
                )
                .await;
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                closed_with(&mut ws, &limits, peer, &e).await;
                return;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) => match broker::parse_handshake(t.as_str()) {
                Ok(topics) => break topics,
                Err(e) => {
                    debug!(%peer, "zeek websocket: bad subscription: {e}");
                    refuse(
                        &mut ws,
                        &limits,
                        "deserialization_failed",
                        &e.to_string(),
                        CloseCode::Policy,
                    )
                    .await;
                    return;
                }
            },
            Message::Binary(_) => {
                refuse(
                    &mut ws,
                    &limits,
                    "deserialization_failed",
                    "only text messages are supported",
                    CloseCode::Unsupported,
                )
                .await;
                return;
            }
            Message::Close(_) => return,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    };
    drop(handshaking);
    // Subscribe before the ack, so nothing published after it is missed.
    let mut bus = ctx.bus.subscribe();
    let n = ctx.next.fetch_add(1, Ordering::Relaxed);
    let endpoint = format!("{}-websocket-{n}", ctx.endpoint);
    if send(
        &mut ws,
        &limits,
        Message::text(broker::ack(&endpoint, &ctx.version)),
    )
    .await
    .is_err()
    {
        return;
    }
    debug!(%peer, ?topics, application = app.as_deref().unwrap_or(""), "zeek websocket client subscribed");
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = send(&mut ws, &limits, close_frame(CloseCode::Away, "controller shutting down")).await;
                return;
            }
            published = bus.recv() => match published {
                Ok(p) => {
                    if topics.iter().any(|t| p.topic.starts_with(t.as_str()))
                        && let Err(e) = send(&mut ws, &limits, Message::text(p.frame.as_str())).await
                    {
                        debug!(%peer, "zeek websocket client dropped: {e}");
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(%peer, missed, "zeek websocket client too slow: responses dropped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            msg = ws.next() => {
                let msg = match msg {
                    None => return,
                    Some(Err(e)) => {
                        closed_with(&mut ws, &limits, peer, &e).await;
                        return;
                    }
                    Some(Ok(m)) => m,
                };
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        if send(&mut ws, &limits, Message::text(broker::error_message(
                            "deserialization_failed",
                            "only text messages are supported",
                        ))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Message::Close(_) => return,
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                };
                match incoming(text.as_str()) {
                    Ok(None) => {}
                    Ok(Some((reqid, req))) => {
                        // Backpressure: a client with too many requests running is not read.
                        let Ok(permit) = in_flight.clone().acquire_owned().await else {
                            return;
                        };
                        debug!(%peer, request = req.kind(), %reqid, "zeek request");
                        let handler = ctx.handler.clone();
                        let bus = ctx.bus.clone();
                        let client = client.clone();
                        tokio::spawn(async move {
                            if let Some(ev) = handler(client, reqid, req).await {
                                let data = ev.to_data(Some(SystemTime::now()));
                                let frame = broker::data_message(TOPIC, &data);
                                // Nobody listening is not an error.
                                let _ = bus.send(Arc::new(Published { topic: TOPIC, frame }));
                            }
                            drop(permit);
                        });
                    }
                    Err(context) => {
                        debug!(%peer, "zeek websocket: {context}");
                        let frame = broker::error_message("deserialization_failed", &context);
                        if send(&mut ws, &limits, Message::text(frame)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// A message after the handshake: a request to run, nothing to do, or the context of
/// a Broker error message.
pub(super) fn incoming(text: &str) -> Result<Option<(String, ZeekRequest)>, String> {
    let (topic, data) = broker::parse_data_message(text).map_err(|e| e.to_string())?;
    if !topic.starts_with(TOPIC) {
        // Zeek would route it to whoever subscribed; here nobody does.
        return Ok(None);
    }
    let ev = Event::from_data(&data).map_err(|_| "failed to create Zeek event".to_owned())?;
    match events::decode(&ev).map_err(|e| e.to_string())? {
        Incoming::Request(reqid, req) => Ok(Some((reqid, req))),
        Incoming::Ignored => Ok(None),
    }
}

/// Ends a connection whose read failed: an oversize message is told so (1009).
async fn closed_with<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    limits: &Limits,
    peer: SocketAddr,
    e: &WsError,
) {
    match e {
        WsError::Capacity(c) => {
            warn!(%peer, "zeek websocket client sent too much: {c}");
            let _ = send(ws, limits, close_frame(CloseCode::Size, "message too big")).await;
        }
        WsError::ConnectionClosed | WsError::AlreadyClosed => {}
        other => debug!(%peer, "zeek websocket client gone: {other}"),
    }
}

/// Notes the path and application name of an upgrade request.
struct Peek<'a> {
    path: &'a mut String,
    app: &'a mut Option<String>,
}

impl Callback for Peek<'_> {
    fn on_request(self, req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
        *self.path = req.uri().path().to_owned();
        *self.app = req
            .headers()
            .get("x-application-name")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(resp)
    }
}

/// Logs where the listener is, warning when plain WebSocket is reachable from other
/// hosts.
pub(crate) fn announce(addr: SocketAddr, tls: bool, scope: Scope) {
    if tls {
        info!(
            %addr,
            %scope,
            "serving zeek-client on wss://{addr}{PATH} (mutual tls: client certificates \
             from the cluster ca, each acting with its scope, at most {scope})"
        );
    } else if addr.ip().is_loopback() {
        info!(%addr, %scope, "serving zeek-client on ws://{addr}{PATH} (every client acts with scope {scope})");
    } else {
        let may = match scope {
            Scope::Viewer => "look at the cluster",
            Scope::Operator => "restart nodes",
            Scope::Admin => "deploy and restart nodes",
        };
        warn!(
            %addr,
            %scope,
            "serving zeek-client on ws://{addr}{PATH}: plain WebSocket without TLS or \
             authentication; anyone who can reach it can {may} (scope {scope})"
        );
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    use super::*;
    use crate::zeek::broker::Data;

    type Client = WebSocketStream<TcpStream>;

    /// A server whose handler answers get_nodes with an empty vector, and nothing else.
    async fn server(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|_client, reqid, req| {
            Box::pin(async move {
                match req {
                    ZeekRequest::GetNodes => Some(events::response(
                        &reqid,
                        &req,
                        drover_proto::msg::ClientResponse::Results(vec![]),
                    )),
                    _ => None,
                }
            })
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            limits,
            "ep".into(),
            "test".into(),
            handler,
            None,
            shutdown.clone(),
        ));
        (addr, shutdown)
    }

    async fn connect(addr: SocketAddr, path: &str) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let req = format!("ws://{addr}{path}").into_client_request().unwrap();
        tokio_tungstenite::client_async(req, stream)
            .await
            .unwrap()
            .0
    }

    async fn text(c: &mut Client) -> String {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.next())
                .await
                .expect("a message in time")
            {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Close(f))) => return format!("close {f:?}"),
                Some(Ok(_)) => {}
                other => return format!("end {other:?}"),
            }
        }
    }

    async fn subscribed(addr: SocketAddr) -> Client {
        let mut c = connect(addr, PATH).await;
        c.send(Message::text(r#"["zeek/management/controller"]"#))
            .await
            .unwrap();
        let ack = text(&mut c).await;
        assert!(
            ack.starts_with(r#"{"type":"ack","endpoint":"ep-websocket-"#),
            "{ack}"
        );
        c
    }

    fn get_nodes(reqid: &str) -> String {
        let ev = Event {
            name: "Management::Controller::API::get_nodes_request".into(),
            args: vec![Data::string(reqid)],
        };
        broker::data_message(TOPIC, &ev.to_data(None))
    }

    #[tokio::test]
    async fn handshake_request_response_and_broadcast() {
        let (addr, _stop) = server(Limits::default()).await;
        let mut a = subscribed(addr).await;
        let mut b = subscribed(addr).await;
        a.send(Message::text(get_nodes("r1"))).await.unwrap();
        for c in [&mut a, &mut b] {
            let frame = text(c).await;
            assert!(
                frame.starts_with(r#"{"type":"data-message","topic":"zeek/management/controller","@data-type":"vector""#),
                "{frame}"
            );
            assert!(frame.contains("get_nodes_response"), "{frame}");
            assert!(frame.contains(r#""data":"r1""#), "{frame}");
        }
    }

    #[tokio::test]
    async fn bad_messages_get_error_messages_and_the_connection_lives() {
        let (addr, _stop) = server(Limits::default()).await;
        let mut c = subscribed(addr).await;
        let ev = |name: &str, args: Vec<Data>| {
            let e = Event {
                name: name.into(),
                args,
            };
            broker::data_message(TOPIC, &e.to_data(None))
        };
        for (bad, context) in [
            ("not json".to_owned(), "failed to decode JSON object"),
            (
                r#"{"type":"data-message","@data-type":"count","data":1}"#.to_owned(),
                "no topic in top-level JSON object",
            ),
            (
                broker::data_message(TOPIC, &Data::Count(1)),
                "failed to create Zeek event",
            ),
            (ev("Foo::bar", vec![]), "unknown event 'Foo::bar'"),
            (
                ev(
                    "Management::Controller::API::get_nodes_request",
                    vec![Data::Count(1)],
                ),
                "failed to create Zeek event",
            ),
        ] {
            c.send(Message::text(bad.clone())).await.unwrap();
            let frame = text(&mut c).await;
            assert!(
                frame.starts_with(r#"{"type":"error","code":"deserialization_failed","context":""#)
                    && frame.contains(context),
                "{bad} -> {frame}"
            );
        }
        c.send(Message::binary(vec![1, 2, 3])).await.unwrap();
        assert!(text(&mut c).await.contains("only text messages"));
        c.send(Message::text(get_nodes("still-there")))
            .await
            .unwrap();
        assert!(text(&mut c).await.contains("still-there"));
    }

    /// Loopback is not counted (every local zeek-client comes from there); an IPv6
    /// address counts with its /64.
    #[tokio::test]
    async fn handshakes_are_counted_by_host_not_on_loopback() {
        let limits = Limits {
            max_handshakes_per_addr: 1,
            ..Limits::default()
        };
        let ctx = Arc::new(Ctx {
            limits,
            handler: Arc::new(|_, _, _| Box::pin(async { None })),
            endpoint: "ep".into(),
            version: "test".into(),
            bus: broadcast::channel(1).0,
            connections: Arc::new(Semaphore::new(4)),
            handshaking: std::sync::Mutex::default(),
            next: AtomicU64::new(1),
            tls: None,
        });
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let local: Vec<_> = (0..3)
            .map(|_| Handshaking::start(&ctx, ip("127.0.0.1")))
            .collect();
        assert!(local.iter().all(|h| matches!(h, Some(None))), "not counted");
        let first = Handshaking::start(&ctx, ip("2001:db8::1")).expect("the first");
        assert!(first.is_some());
        assert!(
            Handshaking::start(&ctx, ip("2001:db8::2")).is_none(),
            "the same /64"
        );
        assert!(Handshaking::start(&ctx, ip("2001:db8:0:1::1")).is_some());
        drop(first);
        assert!(
            Handshaking::start(&ctx, ip("2001:db8::2")).is_some(),
            "freed"
        );
    }

    /// Connections that never finish their handshake, from one address, cannot lock
    /// out the others: past its share, that address is closed at accept, and other
    /// addresses are served; its share comes back as its handshakes end.
    #[tokio::test]
    async fn one_address_cannot_hold_every_handshake() {
        use tokio::io::AsyncReadExt;
        let limits = Limits {
            handshake_timeout: Duration::from_secs(60),
            max_connections: 4,
            max_handshakes_per_addr: 2,
            count_loopback: true,
            ..Limits::default()
        };
        let (addr, _stop) = server(limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
            .await
            .expect("closed at once, not at the handshake timeout")
            .unwrap_or(0);
        assert_eq!(n, 0, "the third handshake of one address is closed");
        // Another address (on loopback) is served, whole exchanges included.
        for _ in 0..3 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let stream = sock.connect(addr).await.unwrap();
            let req = format!("ws://{addr}{PATH}").into_client_request().unwrap();
            let mut c = tokio_tungstenite::client_async(req, stream)
                .await
                .unwrap()
                .0;
            c.send(Message::text(r#"["zeek/management/controller"]"#))
                .await
                .unwrap();
            assert!(text(&mut c).await.contains(r#""type":"ack""#));
        }
        // One of the held handshakes given up: the first address is served again.
        drop(held.pop());
        let c = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                // The server learns of the close when it reads: try until it has.
                let stream = TcpStream::connect(addr).await.unwrap();
                let req = format!("ws://{addr}{PATH}").into_client_request().unwrap();
                let Ok((mut c, _)) = tokio_tungstenite::client_async(req, stream).await else {
                    tokio::task::yield_now().await;
                    continue;
                };
                c.send(Message::text(r#"["zeek/management/controller"]"#))
                    .await
                    .unwrap();
                if text(&mut c).await.contains(r#""type":"ack""#) {
                    break c;
                }
            }
        })
        .await
        .expect("served again");
        drop(c);
    }

    #[tokio::test]
    async fn wrong_path_oversize_and_silent_clients_are_closed() {
        let limits = Limits {
            handshake_timeout: Duration::from_millis(300),
            max_message: 1024,
            ..Limits::default()
        };
        let (addr, _stop) = server(limits).await;

        let mut c = connect(addr, "/v1/messages/binary").await;
        let frame = text(&mut c).await;
        assert!(frame.contains(r#""code":"invalid_uri""#), "{frame}");
        assert!(text(&mut c).await.contains("Policy"));

        let mut silent = connect(addr, PATH).await;
        let frame = text(&mut silent).await;
        assert!(frame.contains("no subscription within"), "{frame}");

        let mut c = connect(addr, PATH).await;
        c.send(Message::text(r#"{"not":"a list"}"#)).await.unwrap();
        assert!(text(&mut c).await.contains("JSON array of topics"));

        let mut big = subscribed(addr).await;
        let _ = big.send(Message::text("x".repeat(4096))).await;
        let end = text(&mut big).await;
        assert!(end.contains("Size") || end.starts_with("end"), "{end}");

        // A raw TCP client that never upgrades is dropped too.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"GET /v1/messages/json HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0);

        // And the server still serves.
        let mut ok = subscribed(addr).await;
        ok.send(Message::text(get_nodes("after"))).await.unwrap();
        assert!(text(&mut ok).await.contains("after"));
    }
}
