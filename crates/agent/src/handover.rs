//! Moving the connection to the controller to a new one without a gap.
//!
//! A QUIC connection keeps the certificates of its handshake. After a reload that
//! changed this agent's certificate or CA bundle (or when the controller asks, after
//! its own changed: then at a random point within [`RECONNECT_SPREAD`], so that a
//! fleet does not reconnect at once), the agent dials a new connection while the old
//! one keeps serving.
//! On the old one it answers the controller's liveness probe with `HandingOver`, so the
//! controller registers the new connection at once instead of refusing it as a second
//! process with the same certificate. The old connection is then retired: its status
//! reports stop, requests the controller sent on it before the switch are answered,
//! and it is closed. A log follow still running on it ends (the client may follow
//! again). If the new connection cannot be made, the old one stays as it was.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use drover_net::peers::Tracked;
use tokio_util::sync::CancellationToken;

/// What the serving side of one connection shares with its owner.
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    /// Set while a new connection is being made to replace this one.
    pub(crate) handing_over: AtomicBool,
    /// Requests being answered.
    in_flight: AtomicUsize,
    /// Cancelled when the connection is retired: its status reports stop.
    pub(crate) retired: CancellationToken,
}

/// Counts a request as in flight while it lives.
pub(crate) struct InFlight(Arc<SessionState>);

impl SessionState {
    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection to the controller being served.
pub(crate) struct Live {
    pub(crate) conn: quinn::Connection,
    pub(crate) state: Arc<SessionState>,
    pub(crate) task: tokio::task::JoinHandle<quinn::ConnectionError>,
    pub(crate) _tracked: Tracked,
}

/// Longest delay before an agent the controller asked to reconnect does so, each
/// picking a random point within it.
pub(crate) const RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// How long requests the controller sent before it switched may take to arrive.
const IN_TRANSIT: Duration = Duration::from_millis(250);
/// How often a retiring connection looks whether its requests are answered.
const DRAIN_CHECK: Duration = Duration::from_millis(20);

impl Live {
    /// Retires this connection after a handover: see the module doc. Requests still
    /// unanswered after `grace` are cut.
    pub(crate) async fn retire(self, grace: Duration) {
        self.state.retired.cancel();
        let deadline = Instant::now() + grace;
        tokio::time::sleep(IN_TRANSIT.min(grace)).await;
        while self.state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_CHECK).await;
        }
        self.conn
            .close(0u32.into(), b"replaced by a new connection of this agent");
        let _ = self.task.await;
    }
}
