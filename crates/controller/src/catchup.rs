//! Bringing connected agents that lag the desired deploy up to it.
//!
//! An agent is brought to the desired deploy when it connects, and by every deploy. One
//! that answered an Apply without applying it (it could not write its desired state: a
//! full disk, a read-only state dir; or it refused the Apply) stays connected and lags.
//! Nothing else would tell it again until it reconnected or the next deploy came, so
//! [`run`] sends it the desired deploy again, with backoff, until it applies it or
//! leaves. It also records again, every few seconds, a desired deploy that every agent
//! applied but that could not be recorded as the deployed one (a full disk).
//! [`Schedule`] decides who is due at a given instant (no clock, no I/O); the loop
//! around it asks and re-applies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::Shared;

/// How long an agent seen lagging waits for its first try: the re-apply of its own
/// connection, or a deploy's Apply, may be on its way.
pub(crate) const FIRST_TRY: Duration = Duration::from_secs(2);

/// The longest wait between two tries.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(30);

/// How often the loop looks for lagging agents.
const TICK: Duration = Duration::from_secs(1);

/// How often a desired deploy every agent applied, but that could not be recorded as
/// the deployed one (a full disk), is recorded again: its agents have nothing more to
/// report that would ask for it.
const RECORD_AGAIN: Duration = Duration::from_secs(5);

/// Which lagging agents are due for another try.
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    /// Each lagging agent: tries made, and when the next is due.
    lagging: BTreeMap<String, (u32, Instant)>,
}

impl Schedule {
    /// The agents to send the desired deploy to at `now`, of those that lag now. An agent
    /// first seen lagging waits [`FIRST_TRY`]; each try doubles the wait, up to
    /// [`MAX_WAIT`]. An agent that no longer lags (or left) is forgotten, so it starts
    /// over if it lags again.
    pub(crate) fn due(
        &mut self,
        lagging: impl IntoIterator<Item = String>,
        now: Instant,
    ) -> Vec<String> {
        let lagging: BTreeSet<String> = lagging.into_iter().collect();
        self.lagging.retain(|name, _| lagging.contains(name));
        let mut due = Vec::new();
        for name in lagging {
            let (tries, next) = self
                .lagging
                .entry(name.clone())
                .or_insert((0, now + FIRST_TRY));
            if now >= *next {
                *tries += 1;
                *next = now + wait_after(*tries);
                due.push(name);
            }
        }
        due
    }
}

/// The wait after `tries` tries.
fn wait_after(tries: u32) -> Duration {
    FIRST_TRY.saturating_mul(1 << tries.min(8)).min(MAX_WAIT)
}

/// Re-applies the desired deploy to connected agents that lag it, per [`Schedule`],
/// until `shutdown`. Not while a deploy runs: it brings every connected agent along
/// itself. A controller that does not lead has no agent connections, so this sends
/// nothing there.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut schedule = Schedule::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recorded_at = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(desired) = shared.store.desired() else {
            continue;
        };
        if shared.is_deploying() {
            continue;
        }
        if recorded_at.elapsed() >= RECORD_AGAIN {
            recorded_at = Instant::now();
            crate::api::converge(&shared);
        }
        let connections = shared.registry.connections();
        let lagging: Vec<String> = {
            let view = shared.view();
            connections
                .iter()
                .filter(|(name, _)| view.applied(name).unwrap_or(0) < desired.generation)
                .map(|(name, _)| name.clone())
                .collect()
        };
        let due = schedule.due(lagging, Instant::now());
        if due.is_empty() {
            continue;
        }
        let mut calls = tokio::task::JoinSet::new();
        for (name, conn) in connections {
            if due.contains(&name) {
                let (shared, desired) = (shared.clone(), desired.clone());
                calls.spawn(async move {
                    crate::api::reapply(&shared, &name, &conn, &desired).await;
                });
            }
        }
        // One round at a time: an agent that does not answer is not sent another Apply
        // while the last one waits (each is bounded by the request timeout).
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = async { while calls.join_next().await.is_some() {} } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_lagging_agent_is_tried_after_a_first_wait_then_with_growing_waits() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        assert!(s.due(names(&["a"]), t0).is_empty(), "not at first sight");
        assert!(s.due(names(&["a"]), t0 + FIRST_TRY / 2).is_empty());
        let mut at = t0 + FIRST_TRY;
        let mut tries = Vec::new();
        // Every second for five minutes: when is it due?
        while at < t0 + Duration::from_secs(300) {
            if !s.due(names(&["a"]), at).is_empty() {
                tries.push(at - t0);
            }
            at += Duration::from_millis(500);
        }
        let secs: Vec<u64> = tries.iter().take(6).map(Duration::as_secs).collect();
        assert_eq!(secs, [2, 6, 14, 30, 60, 90]);
        let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[0] <= g[1]), "{gaps:?}");
        assert!(gaps.iter().all(|g| *g <= MAX_WAIT), "{gaps:?}");
    }

    #[test]
    fn an_agent_that_caught_up_or_left_starts_over_when_it_lags_again() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.due(names(&["a", "b"]), t0);
        assert_eq!(
            s.due(names(&["a", "b"]), t0 + FIRST_TRY),
            names(&["a", "b"])
        );
        // a caught up; b did not.
        assert!(s.due(names(&["b"]), t0 + FIRST_TRY * 2).is_empty());
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            s.due(names(&["a", "b"]), later),
            names(&["b"]),
            "a waits anew"
        );
        assert_eq!(s.due(names(&["a", "b"]), later + FIRST_TRY), names(&["a"]));
    }

    #[test]
    fn nobody_lagging_means_nobody_due() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.due(names(&["a"]), t0);
        assert!(s.due(Vec::new(), t0 + MAX_WAIT * 4).is_empty());
        assert!(s.lagging.is_empty());
    }
}
