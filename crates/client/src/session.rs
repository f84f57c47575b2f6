//! A client's connection to the controller.

use std::time::Duration;

use anyhow::Context;
use drover_net::conn::{self, TransportSettings};
use drover_net::peers::{CLOSE_LET_GO, CLOSE_STOPPING};
use drover_net::{Credentials, TlsFiles};
use drover_proto::msg::{API_VERSION, ClientRequest, ClientResponse, Hello, PeerRole, Progress};

use crate::settings::Settings;

/// How soon a client given several controllers (a high-availability group) gives up on
/// a silent one, the agents' default in a group: about the default leader lease.
const GROUP_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The controller answered our Hello with a refusal: asking again will not help.
#[derive(Debug, thiserror::Error)]
#[error("controller {at} refused us: {message}")]
pub struct Refused {
    at: String,
    message: String,
}

/// An established connection to the controller.
#[derive(Debug)]
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    timeout: Duration,
    /// Whether a warning of the controller was printed (once is enough).
    warned: std::sync::atomic::AtomicBool,
    /// Whether the controller welcomed us with a warning: it is cut off from etcd and
    /// may not lead any more.
    stale: bool,
    /// That warning, until [`Session::tell_welcome`] prints it.
    welcome: Option<String>,
}

fn tls_files(s: &Settings) -> anyhow::Result<TlsFiles> {
    let need = |v: &Option<std::path::PathBuf>, flag: &str| {
        v.clone().with_context(|| {
            format!(
                "missing --{flag} (or DROVER_{}, or tls.{flag} in the settings file): the client needs the cluster CA and a client certificate; create them with `drover ca init` and `drover ca issue --role client`",
                flag.to_uppercase()
            )
        })
    };
    Ok(TlsFiles {
        ca: need(&s.tls.ca, "ca")?,
        cert: need(&s.tls.cert, "cert")?,
        key: need(&s.tls.key, "key")?,
    })
}

/// Resolves, with the error to show, once the host of every address of `targets` has
/// answered that nothing listens on its port; never if one cannot be resolved or its
/// host stays silent.
async fn nothing_listens_at_any(targets: &[String]) -> String {
    let probes = targets.iter().map(|target| async move {
        let Some(addr) = tokio::net::lookup_host(target)
            .await
            .ok()
            .and_then(|mut a| a.next())
        else {
            return std::future::pending().await;
        };
        drover_net::refusal::nothing_listens(addr).await;
        if *target == addr.to_string() {
            format!("udp {addr}")
        } else {
            format!("{target} (udp {addr})")
        }
    });
    let at = futures_util::future::join_all(probes).await;
    match at.as_slice() {
        [one] => format!(
            "nothing listens at {one}: connection refused (is the controller running there?)"
        ),
        several => format!(
            "nothing listens at any controller address ({}): connection refused \
             (are the controllers running there?)",
            several.join(", ")
        ),
    }
}

impl Session {
    /// Connects, verifies the controller, and exchanges Hello/Welcome.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        Self::connect_saying(settings, true).await
    }

    /// As [`Session::connect`]; the controller's warning is printed only when `say`.
    pub async fn connect_saying(settings: &Settings, say: bool) -> anyhow::Result<Self> {
        let session = Self::connect_untold(settings).await?;
        if say {
            session.tell_welcome();
        } else {
            session
                .warned
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(session)
    }

    /// As [`Session::connect`], but the controller's warning waits for
    /// [`Session::tell_welcome`]: for a connection made while something else is under
    /// way whose failure should be told alone.
    pub async fn connect_untold(settings: &Settings) -> anyhow::Result<Self> {
        let files = tls_files(settings)?;
        let creds = Credentials::load(&files)?;
        if creds.identity().role != PeerRole::Client {
            anyhow::bail!(
                "the certificate {} belongs to {}; the client needs a client certificate (`drover ca issue --role client`)",
                files.cert.display(),
                creds.identity()
            );
        }
        // The controller would refuse it with a TLS alert that says neither which
        // certificate nor when: said here, with the dates.
        if let Err(why) = creds.check_own(drover_net::trust::unix_now()) {
            let remedy = match why {
                // Its CA left the bundle (a rollover), or the bundle is not the cluster's.
                drover_net::tls::Unusable::Untrusted(_) => format!(
                    "; renew it from a CA of --ca ({}), or give the bundle that holds its CA",
                    files.ca.display()
                ),
                drover_net::tls::Unusable::Expired { .. } => format!(
                    "; renew it with `drover ca renew --dir CA_DIR --cert {}`",
                    files.cert.display()
                ),
                // It says to look at the clocks.
                drover_net::tls::Unusable::NotYetValid { .. } => String::new(),
            };
            anyhow::bail!(
                "the client certificate {} {why}{remedy}",
                files.cert.display()
            );
        }
        let timeout = settings.timeout();
        let targets = settings.controller_addrs();
        let several = targets.len() > 1;
        let mut transport = TransportSettings {
            hello_timeout: timeout.min(Duration::from_secs(5)),
            ..TransportSettings::default()
        };
        if several {
            // As an agent of a group: a leader that died without a word is given up
            // within about the leader lease, so that a follow moves to its successor.
            transport.idle_timeout = GROUP_IDLE_TIMEOUT;
            transport.keep_alive = GROUP_IDLE_TIMEOUT / 4;
        }
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Client,
            name: creds.identity().name.clone(),
            software: format!("drover {}", env!("CARGO_PKG_VERSION")),
            lost_term: None,
        };
        // One endpoint per address family, shared by the dials.
        let endpoints = std::sync::Mutex::new([None::<quinn::Endpoint>, None]);
        let dials = conn::dial_leader(&targets, |target| {
            let (creds, transport, hello, endpoints) =
                (&creds, &transport, hello.clone(), &endpoints);
            async move {
                let addr = tokio::net::lookup_host(&target)
                    .await
                    .map_err(|e| {
                        drover_net::NetError::Connection(format!(
                            "cannot resolve controller address '{target}': {e}"
                        ))
                    })?
                    .next()
                    .ok_or_else(|| {
                        drover_net::NetError::Connection(format!(
                            "controller address '{target}' resolves to nothing"
                        ))
                    })?;
                let host = target
                    .rsplit_once(':')
                    .map_or(target.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let endpoint = {
                    let mut slots = endpoints.lock().unwrap_or_else(|p| p.into_inner());
                    match &mut slots[usize::from(addr.is_ipv6())] {
                        Some(e) => e.clone(),
                        slot => slot
                            .insert(conn::client_endpoint(creds, transport, addr)?)
                            .clone(),
                    }
                };
                conn::dial(
                    &endpoint,
                    None,
                    addr,
                    &host,
                    hello,
                    PeerRole::Controller,
                    None,
                    transport.hello_timeout,
                )
                .await
                .map_err(|e| match e {
                    drover_net::NetError::Timeout { .. } if !several => {
                        drover_net::NetError::Connection(format!(
                            "{e} (is the controller running at {target} and reachable?)"
                        ))
                    }
                    other => other,
                })
            }
        });
        // Stopped controllers are told at once, not after the handshake's timeout,
        // where their hosts answer that nothing listens. Only once that is so of every
        // address: while a dead leader's handshake is outstanding, its followers are
        // asked again until one of them is elected, which a quick failure would cut
        // short.
        let est = tokio::select! {
            biased;
            r = dials => r,
            nowhere = nothing_listens_at_any(&targets) => {
                Err(drover_net::NetError::Connection(nowhere))
            }
        }
        .map_err(|e| match e {
            drover_net::NetError::Refused(w) => anyhow::Error::new(Refused {
                at: targets.join(","),
                message: w.message,
            }),
            other => other.into(),
        })?;
        // Only the endpoint of the connection made stays open.
        let endpoint = endpoints.into_inner().unwrap_or_else(|p| p.into_inner())
            [usize::from(est.conn.remote_address().is_ipv6())]
        .take()
        .context("no endpoint for the connection made")?;
        let session = Self {
            endpoint,
            conn: est.conn,
            timeout,
            warned: std::sync::atomic::AtomicBool::new(false),
            stale: est.welcome.warning.is_some(),
            welcome: est.welcome.warning,
        };
        crate::interrupt::watch(&session.conn);
        Ok(session)
    }

    /// Prints the controller's warning in its welcome, if it gave one and no warning
    /// was printed yet.
    pub fn tell_welcome(&self) {
        self.warn(self.welcome.as_deref());
    }

    /// Makes this connection the one Ctrl-C closes (again, after another was made).
    pub(crate) fn watch_interrupts(&self) {
        crate::interrupt::watch(&self.conn);
    }

    /// Whether the controller welcomed us with a warning that it may not lead any more.
    pub fn stale(&self) -> bool {
        self.stale
    }

    /// How long a request may take (between two replies, for a stream of them).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the connection ended under a request, by the controller's doing or the
    /// network's (not ours: Ctrl-C, or the command's end).
    pub fn lost_under_way(&self) -> bool {
        self.conn
            .close_reason()
            .is_some_and(|r| !matches!(r, quinn::ConnectionError::LocallyClosed))
    }

    /// The controller's address.
    pub fn peer(&self) -> std::net::SocketAddr {
        self.conn.remote_address()
    }

    /// Why the connection ended, when the controller went away and another (or the same,
    /// started again) may take over: it stopped or stepped down, restarted (a stateless
    /// reset), or fell silent. None when it is still open after `patience`, or ended
    /// otherwise (our certificate distrusted, Ctrl-C): a follow then ends with it.
    pub async fn gone(&self, patience: Duration) -> Option<String> {
        use quinn::ConnectionError as E;
        let reason = match self.conn.close_reason() {
            Some(r) => r,
            None => tokio::time::timeout(patience, self.conn.closed())
                .await
                .ok()?,
        };
        let worth_a_retry = match &reason {
            E::ApplicationClosed(close) => [CLOSE_STOPPING, CLOSE_LET_GO]
                .map(u64::from)
                .contains(&u64::from(close.error_code)),
            E::TimedOut | E::Reset | E::ConnectionClosed(_) => true,
            E::LocallyClosed | E::TransportError(_) | E::VersionMismatch | E::CidsExhausted => {
                false
            }
        };
        worth_a_retry.then(|| match &reason {
            E::ApplicationClosed(close) => String::from_utf8_lossy(&close.reason).into_owned(),
            E::TimedOut => "no answer within the idle timeout".to_owned(),
            E::Reset => "it reset the connection: it restarted".to_owned(),
            other => other.to_string(),
        })
    }

    /// Prints the controller's warning (its answers may be stale) on stderr, once.
    fn warn(&self, warning: Option<&str>) {
        if let Some(w) = warning
            && !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            crate::stdio::errln(&format!("warning: {w}"));
        }
    }

    /// Sends one request and waits for its reply.
    pub async fn request(&self, req: &ClientRequest) -> anyhow::Result<ClientResponse> {
        let (reply, warning) = conn::call_warned(&self.conn, req, self.timeout).await?;
        self.warn(warning.as_deref());
        Ok(reply)
    }

    /// Sends a request that reports progress (a deploy with `progress`), passing each
    /// [`Progress`] to `on_progress`, and returns its answer. The timeout applies between
    /// two replies, not to the whole: a deploy of thousands of nodes may take long, but
    /// never long without news. A controller that predates progress answers at once.
    pub async fn request_with_progress(
        &self,
        req: &ClientRequest,
        mut on_progress: impl FnMut(Progress),
    ) -> anyhow::Result<ClientResponse> {
        let timed_out = || drover_net::NetError::Timeout {
            what: format!("request to peer {}", self.conn.remote_address()),
            after: self.timeout,
        };
        let mut replies = conn::call_stream(&self.conn, req, self.timeout).await?;
        loop {
            let reply = tokio::time::timeout(self.timeout, replies.next::<ClientResponse>())
                .await
                .map_err(|_| timed_out())??;
            self.warn(replies.warning());
            match reply {
                Some(ClientResponse::Progress(p)) => on_progress(p),
                Some(answer) => return Ok(answer),
                None => anyhow::bail!("the controller ended the request without an answer"),
            }
        }
    }

    /// Sends one request whose replies come as a stream.
    pub async fn request_stream(&self, req: &ClientRequest) -> anyhow::Result<conn::ReplyStream> {
        Ok(conn::call_stream(&self.conn, req, self.timeout).await?)
    }

    /// Closes the connection politely so the controller sees it go at once. Waiting for
    /// the whole draining period (`wait_idle`, about 3 round trips' worth of timeout)
    /// would add ~80 ms to every command for nothing; what matters is that the close
    /// frame left, which the connection's datagram counter tells: it moves once the
    /// driver task has handed the close packet to the socket (waited for at most 5 ms).
    pub async fn close(self) {
        crate::interrupt::forget();
        let before = self.conn.stats().udp_tx.datagrams;
        self.conn.close(0u32.into(), b"done");
        let sent = async {
            while self.conn.stats().udp_tx.datagrams == before {
                tokio::task::yield_now().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(5), sent).await;
        // The endpoint's socket had to outlive the send; now it may go.
        drop(self.endpoint);
    }
}
