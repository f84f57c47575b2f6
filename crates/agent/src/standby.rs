//! When an agent that stands by starts its nodes again.
//!
//! An agent the controller refused because another live process holds its identity
//! stops its nodes ([`Supervisor::stand_by`]). Once the controller admits it (the other
//! process stopped answering, or the controller restarted and this one dialled first),
//! it waits a grace before it starts them, and until then answers the controller's
//! probe `StandingBy`: should the process that runs the nodes dial meanwhile, it is let
//! in and this one's connection closed, so that the nodes neither move nor run twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Bumped whenever a connection of this process to the controller ends, and when it
    /// answers a probe `StandingBy` (the controller is then letting another process
    /// in): a grace begun before then is void, and only a grace of its own admits the
    /// next connection.
    epoch: Arc<AtomicU64>,
    /// One more than the epoch a grace is running for (0: none), so that the several
    /// signs of one admission (the welcome, the first request) start one grace.
    armed: Arc<AtomicU64>,
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
            epoch: Arc::default(),
            armed: Arc::default(),
            grace,
        }
    }

    /// Notes the dialled connection now in use.
    pub(crate) fn serving(&self, conn: &quinn::Connection) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
    }

    /// Whether the probe is to be answered `StandingBy`; when it is, the grace under way
    /// is void (the controller lets the other process in and closes this connection)
    /// and a new one begins, should the controller keep this connection after all.
    pub(crate) fn answer_standing_by(&self) -> bool {
        let standing = self.supervisor.standing_by() && !self.resuming.load(Ordering::SeqCst);
        if standing {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.arm(false);
        }
        standing
    }

    /// A connection of this process to the controller ended: a grace begun while it
    /// lived is void.
    pub(crate) fn lost(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
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
    /// Called for every request while standing by: one grace per admission.
    pub(crate) fn admitted_now(&self) {
        self.arm(true);
    }

    /// Starts a grace for the current epoch, unless one runs for it already.
    fn arm(&self, say: bool) {
        if !self.supervisor.standing_by() {
            return;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        if self.armed.swap(epoch + 1, Ordering::SeqCst) == epoch + 1 {
            return;
        }
        if say {
            info!(
                "the controller accepted this agent; it starts its nodes in {} unless the process that runs them comes back meanwhile",
                drover_net::humanize(self.grace)
            );
        }
        let this = self.clone();
        let until = tokio::time::Instant::now() + self.grace;
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            this.resuming.store(true, Ordering::SeqCst);
            // Looked at once the probe is answered `Ack`: a `StandingBy` answered before
            // voids this grace.
            let current = this.epoch.load(Ordering::SeqCst) == epoch;
            if current && this.admitted() && this.supervisor.resume().await {
                info!(
                    "starting the nodes stopped while another process held this agent's identity"
                );
            }
            this.resuming.store(false, Ordering::SeqCst);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupSetting;
    use crate::logs::LogConfig;
    use crate::supervisor::SupervisorConfig;

    const GRACE: Duration = Duration::from_secs(10);

    /// Lets the tasks woken so far (a grace's end, the supervisor's answer) run.
    async fn settle() {
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
    }

    /// A grace is void once a connection of the process ends, or once it answers the
    /// probe `StandingBy`: only a whole grace of the admission that follows starts the
    /// nodes, never one left over from before.
    #[test]
    fn only_a_whole_grace_of_the_current_admission_starts_the_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let sup = Supervisor::start(SupervisorConfig {
                instance: "agent-1".into(),
                state_dir: dir.path().to_owned(),
                logs: LogConfig::default(),
                cgroup: CgroupSetting::None,
                keeper: None,
                removed_node_retention: None,
            })
            .unwrap();
            // A connection to the listener lives throughout.
            let (_listened, rx) = watch::channel(1usize);
            let r = Resumer::new(sup.clone(), rx, GRACE);
            assert!(!r.answer_standing_by(), "not standing by");
            assert!(sup.stand_by().await);

            for void in [Resumer::lost as fn(&Resumer), |r| {
                assert!(r.answer_standing_by())
            }] {
                r.admitted_now();
                r.admitted_now();
                tokio::time::advance(GRACE / 2).await;
                void(&r);
                r.admitted_now();
                // The first grace ends: void.
                tokio::time::advance(GRACE / 2 + Duration::from_secs(1)).await;
                settle().await;
                assert!(sup.standing_by());
                // The grace of the admission after the loss ends.
                tokio::time::advance(GRACE / 2).await;
                settle().await;
                assert!(!sup.standing_by(), "resumed a whole grace after admission");
                assert!(sup.stand_by().await);
            }

            // No connection left when the grace ends: nothing starts.
            let (gone, rx) = watch::channel(1usize);
            let r = Resumer::new(sup.clone(), rx, GRACE);
            r.admitted_now();
            gone.send_replace(0);
            tokio::time::advance(GRACE + Duration::from_secs(1)).await;
            settle().await;
            assert!(sup.standing_by());
        });
    }
}
