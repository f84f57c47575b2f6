//! When an agent that stands by starts its nodes again.
//!
//! An agent the controller refused because another live process holds its identity
//! stops its nodes ([`Supervisor::stand_by`]). Once the controller admits it (the other
//! process stopped answering, or the controller restarted and this one dialled first),
//! it waits a grace before it starts them, and until then answers the controller's
//! probe `StandingBy`: should the process that runs the nodes dial meanwhile, it is let
//! in and this one's connection closed, so that the nodes neither move nor run twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

use crate::supervisor::Supervisor;

/// Schedules the start after the grace, and says how to answer the probe meanwhile.
#[derive(Debug, Clone)]
pub(crate) struct Resumer {
    supervisor: Supervisor,
    /// The connection this agent dialled that serves now: a handover during the grace
    /// replaces it, and the new one counts as the admitted connection.
    current: Arc<Mutex<Option<quinn::Connection>>>,
    /// How many connections the controller made to this agent's listener are live.
    listened: watch::Receiver<usize>,
    /// Set while a grace task decides to start the nodes: the probe is answered `Ack`
    /// from then on, so that the controller does not let another process in while this
    /// one starts them.
    resuming: Arc<AtomicBool>,
    grace: Duration,
}

impl Resumer {
    pub(crate) fn new(
        supervisor: Supervisor,
        listened: watch::Receiver<usize>,
        grace: Duration,
    ) -> Self {
        Self {
            supervisor,
            current: Arc::default(),
            listened,
            resuming: Arc::default(),
            grace,
        }
    }

    /// Notes the dialled connection now in use.
    pub(crate) fn serving(&self, conn: &quinn::Connection) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
    }

    /// Whether the probe is to be answered `StandingBy`.
    pub(crate) fn standing_by(&self) -> bool {
        self.supervisor.standing_by() && !self.resuming.load(Ordering::SeqCst)
    }

    /// Whether a connection of this process that the controller may have admitted
    /// lives: the dialled one in use, or one it made to the listener (the controller
    /// closes such a one at once when it does not admit it).
    fn admitted(&self) -> bool {
        let dialled = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|c| c.close_reason().is_none());
        dialled || *self.listened.borrow() > 0
    }

    /// The controller admitted this agent (or may have: a connection to its listener):
    /// if it stands by, its nodes start after the grace, provided a connection of this
    /// process still lives then.
    pub(crate) fn admitted_now(&self) {
        if !self.supervisor.standing_by() {
            return;
        }
        info!(
            "the controller accepted this agent; it starts its nodes in {} unless the process that runs them comes back meanwhile",
            drover_net::humanize(self.grace)
        );
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.grace).await;
            this.resuming.store(true, Ordering::SeqCst);
            if this.admitted() && this.supervisor.resume().await {
                info!(
                    "starting the nodes stopped while another process held this agent's identity"
                );
            }
            this.resuming.store(false, Ordering::SeqCst);
        });
    }
}
