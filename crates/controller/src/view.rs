//! The controller's view of every agent's nodes, kept from the statuses agents push on
//! every change, so that get-nodes need not ask every agent each time: with a thousand
//! agents, asking them all costs the controller about 150 ms of CPU, reading the view
//! a few milliseconds.
//!
//! An agent's view answers get-nodes only while it is *current*:
//!
//! - it was filled over the agent's present connection (a reconnected agent's first
//!   report makes it current again; a lost agent's view is only history, its nodes
//!   UNKNOWN);
//! - no operation (apply, restart, stop, start, signal) is in flight to that agent, and
//!   none has been answered since the agent was last asked directly. After an
//!   operation, the next get-nodes asks that agent, so a client that restarts a node and
//!   then lists the nodes sees the restart (read-your-writes); that answer makes the view
//!   current again, unless another operation ended meanwhile.
//!
//! Between those, the view is as fresh as the agents' reports: a crash or restart that
//! no operation caused shows once the agent's report arrives (agents report at once,
//! then at most every few tens of milliseconds under bursts). Resource figures (RSS, CPU
//! time) are those of the last report; `get-nodes --fresh` asks every agent now.
//!
//! Architecture invariant: no I/O and no clock here; connections are named by quinn's
//! stable ids, so the rules are tested without a network.

use std::collections::BTreeMap;

use drover_proto::model::{MgmtRole, NodeStatus, State};
use drover_proto::msg::Event;

/// Every agent's nodes as last reported, by instance name.
#[derive(Debug, Default)]
pub(crate) struct View {
    agents: BTreeMap<String, AgentView>,
}

#[derive(Debug, Default)]
struct AgentView {
    /// The nodes, by name, as last reported (the agent's own entry apart).
    nodes: BTreeMap<String, NodeStatus>,
    /// The agent's own entry (management role AGENT), when its reports carry one.
    agent: Option<NodeStatus>,
    /// The connection that filled this view; `None` once the agent is lost.
    conn: Option<usize>,
    /// Operations sent to the agent and not yet answered.
    in_flight: u32,
    /// An operation was answered since the agent was last asked directly.
    dirty: bool,
    /// Operations answered so far; a direct answer only clears `dirty` when no
    /// operation ended while it was on its way.
    finished: u64,
    /// Reports taken in so far; a direct answer taken before a report that arrived
    /// first may be older than it, and must not replace it.
    reports: u64,
    /// The highest deploy generation the agent answered an apply of (0: none).
    acknowledged: u64,
}

/// Taken before asking an agent directly, handed back with its answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ask {
    finished: u64,
    idle: bool,
    reports: u64,
}

impl View {
    /// Records a report pushed by `instance` over connection `conn`: every node's
    /// status when `full`, else those that changed. Returns an event per node whose
    /// state, pid or restart count changed.
    ///
    /// A partial report only counts on the connection that sent the full one before it
    /// (reports on one connection arrive in order: the agent waits for each to be
    /// acknowledged); one on another connection is ignored, and that agent's next
    /// full report makes the view current.
    pub(crate) fn report(
        &mut self,
        instance: &str,
        conn: usize,
        full: bool,
        statuses: Vec<NodeStatus>,
    ) -> Vec<Event> {
        let view = self.agents.entry(instance.to_owned()).or_default();
        if full {
            view.conn = Some(conn);
            view.reports += 1;
            view.replace(instance, statuses)
        } else if view.conn == Some(conn) {
            view.reports += 1;
            view.merge(instance, statuses)
        } else {
            Vec::new()
        }
    }

    /// Before asking `instance` directly for its statuses.
    pub(crate) fn ask(&self, instance: &str) -> Ask {
        self.agents.get(instance).map_or(
            Ask {
                finished: 0,
                idle: true,
                reports: 0,
            },
            |v| Ask {
                finished: v.finished,
                idle: v.in_flight == 0,
                reports: v.reports,
            },
        )
    }

    /// Records a direct answer from `instance` over `conn` to the ask `ask`. One that a
    /// report overtook is left out: the agent may have taken it before that report, and
    /// the view stays as the reports made it, to be asked again.
    pub(crate) fn answered(
        &mut self,
        instance: &str,
        conn: usize,
        ask: Ask,
        statuses: Vec<NodeStatus>,
    ) -> Vec<Event> {
        let view = self.agents.entry(instance.to_owned()).or_default();
        if view.reports != ask.reports && view.conn == Some(conn) {
            view.dirty = true;
            return Vec::new();
        }
        view.conn = Some(conn);
        if ask.idle && view.in_flight == 0 && ask.finished == view.finished {
            view.dirty = false;
        }
        view.replace(instance, statuses)
    }

    /// An operation is on its way to `instance`.
    pub(crate) fn op_started(&mut self, instance: &str) {
        let view = self.agents.entry(instance.to_owned()).or_default();
        view.in_flight += 1;
    }

    /// The operation to `instance` was answered, or failed, or timed out.
    pub(crate) fn op_finished(&mut self, instance: &str) {
        let view = self.agents.entry(instance.to_owned()).or_default();
        view.in_flight = view.in_flight.saturating_sub(1);
        view.dirty = true;
        view.finished += 1;
    }

    /// The statuses of `instance` (its own entry included) if its view is current for
    /// connection `conn`, and `None` if the agent must be asked.
    pub(crate) fn current(&self, instance: &str, conn: usize) -> Option<Vec<NodeStatus>> {
        let view = self.agents.get(instance)?;
        if view.conn != Some(conn) || view.in_flight > 0 || view.dirty {
            return None;
        }
        let mut out: Vec<NodeStatus> = view.nodes.values().cloned().collect();
        out.push(
            view.agent
                .clone()
                .unwrap_or_else(|| NodeStatus::new(instance, State::Running, MgmtRole::Agent)),
        );
        Some(out)
    }

    /// Marks every node of a lost agent UNKNOWN (their processes are untouched); returns
    /// the events.
    pub(crate) fn lost(&mut self, instance: &str) -> Vec<Event> {
        let Some(view) = self.agents.get_mut(instance) else {
            return Vec::new();
        };
        view.conn = None;
        view.agent = None;
        let mut events = Vec::new();
        for s in view.nodes.values_mut() {
            if s.state != State::Unknown {
                events.push(Event::NodeState {
                    instance: instance.to_owned(),
                    node: s.node.clone(),
                    state: State::Unknown,
                    previous: Some(s.state),
                    pid: s.pid,
                    restarts: s.restarts,
                    reason: None,
                    restart_at_ms: None,
                });
                s.state = State::Unknown;
            }
        }
        events
    }

    /// The last known statuses of an instance's nodes (its own entry left out).
    pub(crate) fn last(&self, instance: &str) -> Vec<NodeStatus> {
        self.agents
            .get(instance)
            .map(|v| v.nodes.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every known node's status, for counting.
    pub(crate) fn all_nodes(&self) -> impl Iterator<Item = &NodeStatus> {
        self.agents.values().flat_map(|v| v.nodes.values())
    }

    /// `instance` answered the apply of deploy generation `generation`.
    pub(crate) fn acknowledged(&mut self, instance: &str, generation: u64) {
        let view = self.agents.entry(instance.to_owned()).or_default();
        view.acknowledged = view.acknowledged.max(generation);
    }

    /// The generation `instance` has applied: the higher of what it last reported (its
    /// own entry, while connected) and the highest apply it answered; `None` when
    /// neither is known.
    pub(crate) fn applied(&self, instance: &str) -> Option<u64> {
        self.agents.get(instance).and_then(AgentView::applied)
    }

    /// How many CPUs `instance` said its nodes may use; `None` when unknown.
    pub(crate) fn cpus(&self, instance: &str) -> Option<u32> {
        self.agents
            .get(instance)
            .and_then(|v| v.agent.as_ref())
            .and_then(|a| a.cpus)
    }

    /// The resource settings `instance`'s agent said its host cannot enforce, with why.
    pub(crate) fn unenforceable(&self, instance: &str) -> BTreeMap<String, String> {
        self.agents
            .get(instance)
            .and_then(|v| v.agent.as_ref())
            .map(|a| a.unenforceable.clone())
            .unwrap_or_default()
    }

    /// How many nodes `instance`'s agent said its open-file limit leaves room for.
    pub(crate) fn nodes_max(&self, instance: &str) -> Option<u32> {
        self.agents
            .get(instance)
            .and_then(|v| v.agent.as_ref())
            .and_then(|a| a.nodes_max)
    }

    /// Every agent's applied generation (see [`View::applied`]), where known.
    pub(crate) fn applied_all(&self) -> impl Iterator<Item = (&str, u64)> {
        self.agents
            .iter()
            .filter_map(|(name, v)| v.applied().map(|g| (name.as_str(), g)))
    }
}

impl AgentView {
    fn applied(&self) -> Option<u64> {
        let reported = self.agent.as_ref().and_then(|a| a.generation);
        let acknowledged = Some(self.acknowledged).filter(|g| *g > 0);
        reported.max(acknowledged)
    }

    /// Replaces the nodes with a full report; returns the change events.
    fn replace(&mut self, instance: &str, statuses: Vec<NodeStatus>) -> Vec<Event> {
        let mut before = std::mem::take(&mut self.nodes);
        self.merge_from(instance, statuses, &mut before)
    }

    /// Updates the nodes a partial report names; returns the change events.
    fn merge(&mut self, instance: &str, statuses: Vec<NodeStatus>) -> Vec<Event> {
        let mut before = std::mem::take(&mut self.nodes);
        let events = self.merge_from(instance, statuses, &mut before);
        // Nodes the report did not name are unchanged.
        self.nodes.append(&mut before);
        events
    }

    /// Puts `statuses` into the (emptied) nodes, comparing each with its entry taken out
    /// of `before`.
    fn merge_from(
        &mut self,
        instance: &str,
        statuses: Vec<NodeStatus>,
        before: &mut BTreeMap<String, NodeStatus>,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for s in statuses {
            match s.mgmt_role {
                MgmtRole::Agent => {
                    self.agent = Some(s);
                    continue;
                }
                MgmtRole::Controller => continue,
                MgmtRole::None | MgmtRole::Node => {}
            }
            let previous = before.remove(&s.node);
            let changed = previous.as_ref().is_none_or(|p| {
                p.state != s.state
                    || p.restarts != s.restarts
                    || p.pid != s.pid
                    || p.last_failure != s.last_failure
            });
            if changed {
                let news = previous
                    .as_ref()
                    .is_none_or(|p| p.last_failure != s.last_failure);
                let reason = s
                    .last_failure
                    .clone()
                    .filter(|_| news || matches!(s.state, State::Crashed | State::Failed));
                events.push(Event::NodeState {
                    instance: instance.to_owned(),
                    node: s.node.clone(),
                    state: s.state,
                    previous: previous.as_ref().map(|p| p.state),
                    pid: s.pid,
                    restarts: s.restarts,
                    reason,
                    restart_at_ms: s.restart_at_ms,
                });
            }
            // A stop that began since (its signal's time tells a later stop apart).
            if let Some(since_ms) = s.stopping_since_ms
                && previous.is_none_or(|p| p.stopping_since_ms != Some(since_ms))
            {
                events.push(Event::NodeStopping {
                    instance: instance.to_owned(),
                    node: s.node.clone(),
                    pid: s.pid,
                    since_ms,
                });
            }
            self.nodes.insert(s.node.clone(), s);
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, state: State, pid: u32) -> NodeStatus {
        let mut s = NodeStatus::new(name, state, MgmtRole::None);
        s.pid = Some(pid);
        s
    }

    fn pids(v: &[NodeStatus]) -> Vec<(String, Option<u32>)> {
        v.iter().map(|s| (s.node.clone(), s.pid)).collect()
    }

    #[test]
    fn a_report_makes_the_view_current_for_that_connection_only() {
        let mut view = View::default();
        assert!(view.current("a", 1).is_none(), "nothing reported yet");
        let events = view.report("a", 1, true, vec![node("n1", State::Running, 10)]);
        assert_eq!(events.len(), 1);
        let now = view.current("a", 1).expect("current");
        assert_eq!(
            pids(&now),
            vec![("n1".into(), Some(10)), ("a".into(), None)],
            "the nodes, then a stand-in for the agent's own entry"
        );
        assert!(
            view.current("a", 2).is_none(),
            "another connection must ask"
        );
    }

    #[test]
    fn the_agents_own_entry_is_kept_apart_from_its_nodes() {
        let mut view = View::default();
        let mut me = NodeStatus::new("a", State::Running, MgmtRole::Agent);
        me.pid = Some(99);
        let events = view.report("a", 1, true, vec![node("n1", State::Running, 10), me]);
        assert_eq!(events.len(), 1, "no event for the agent itself");
        assert_eq!(view.last("a").len(), 1);
        assert_eq!(view.all_nodes().count(), 1);
        let now = view.current("a", 1).expect("current");
        assert_eq!(now[1].pid, Some(99));
        assert_eq!(now[1].mgmt_role, MgmtRole::Agent);
    }

    #[test]
    fn an_operation_sends_the_next_get_nodes_to_the_agent() {
        let mut view = View::default();
        view.report("a", 1, true, vec![node("n1", State::Running, 10)]);
        view.op_started("a");
        assert!(view.current("a", 1).is_none(), "in flight");
        // A report during the operation does not make the view current.
        view.report("a", 1, true, vec![node("n1", State::Pending, 11)]);
        assert!(view.current("a", 1).is_none());
        view.op_finished("a");
        assert!(
            view.current("a", 1).is_none(),
            "answered but not asked since"
        );
        view.report("a", 1, true, vec![node("n1", State::Running, 11)]);
        assert!(view.current("a", 1).is_none(), "a report does not clear it");
        let ask = view.ask("a");
        view.answered("a", 1, ask, vec![node("n1", State::Running, 11)]);
        assert_eq!(
            pids(&view.current("a", 1).expect("current again"))[0],
            ("n1".into(), Some(11))
        );
    }

    #[test]
    fn an_answer_a_report_overtook_does_not_replace_it() {
        let mut view = View::default();
        view.report("a", 1, true, vec![node("n1", State::Running, 10)]);
        // An operation (a signal) restarts n1: the next get-nodes asks the agent.
        view.op_started("a");
        view.op_finished("a");
        let ask = view.ask("a");
        // The agent answers while n1 is being started again, and reports it running
        // with its new pid; the report lands first.
        let mut pending = NodeStatus::new("n1", State::Pending, MgmtRole::None);
        pending.pid = None;
        view.report("a", 1, false, vec![node("n1", State::Running, 11)]);
        let events = view.answered("a", 1, ask, vec![pending]);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(pids(&view.last("a")), vec![("n1".into(), Some(11))]);
        assert!(view.current("a", 1).is_none(), "asked again");
        // Asked again with no report in between: current, as answered.
        let ask = view.ask("a");
        view.answered("a", 1, ask, vec![node("n1", State::Running, 11)]);
        let now = view.current("a", 1).expect("current");
        assert_eq!(now[0].pid, Some(11));
    }

    #[test]
    fn an_answer_that_raced_an_operation_does_not_clear_it() {
        let mut view = View::default();
        view.report("a", 1, true, vec![node("n1", State::Running, 10)]);
        view.op_started("a");
        view.op_finished("a");
        // Asked, then an operation starts and ends before the answer lands.
        let ask = view.ask("a");
        view.op_started("a");
        view.op_finished("a");
        view.answered("a", 1, ask, vec![node("n1", State::Running, 10)]);
        assert!(view.current("a", 1).is_none());
        // Asked while an operation was in flight: no better.
        view.op_started("a");
        let ask = view.ask("a");
        view.op_finished("a");
        view.answered("a", 1, ask, vec![node("n1", State::Running, 12)]);
        assert!(view.current("a", 1).is_none());
        let ask = view.ask("a");
        view.answered("a", 1, ask, vec![node("n1", State::Running, 12)]);
        assert!(view.current("a", 1).is_some());
    }

    #[test]
    fn a_lost_agent_keeps_its_nodes_as_unknown_until_it_reports_again() {
        let mut view = View::default();
        view.report("a", 1, true, vec![node("n1", State::Running, 10)]);
        let events = view.lost("a");
        assert_eq!(events.len(), 1);
        assert!(
            view.lost("a").is_empty(),
            "already unknown: no second event"
        );
        assert!(view.current("a", 1).is_none());
        let last = view.last("a");
        assert_eq!(last[0].state, State::Unknown);
        assert_eq!(last[0].pid, Some(10));
        let events = view.report("a", 2, true, vec![node("n1", State::Running, 10)]);
        assert_eq!(events.len(), 1, "back from UNKNOWN is a change");
        assert!(view.current("a", 2).is_some());
    }

    #[test]
    fn events_name_only_real_changes() {
        let mut view = View::default();
        view.report("a", 1, true, vec![node("n1", State::Running, 10)]);
        let mut same = node("n1", State::Running, 10);
        same.rss_bytes = Some(4096);
        assert!(view.report("a", 1, true, vec![same]).is_empty());
        let mut crashed = node("n1", State::Crashed, 10);
        crashed.restart_at_ms = Some(5_000);
        let events = view.report("a", 1, true, vec![crashed]);
        assert!(matches!(
            &events[..],
            [Event::NodeState {
                state: State::Crashed,
                previous: Some(State::Running),
                restart_at_ms: Some(5_000),
                ..
            }]
        ));
        // A partial report changes what it names and keeps the rest.
        view.report(
            "a",
            1,
            true,
            vec![
                node("n1", State::Running, 10),
                node("n2", State::Running, 20),
            ],
        );
        let events = view.report("a", 1, false, vec![node("n2", State::Running, 21)]);
        assert_eq!(events.len(), 1);
        assert_eq!(
            pids(&view.last("a")),
            vec![("n1".into(), Some(10)), ("n2".into(), Some(21))]
        );
        // One from a connection that sent no full report is ignored.
        assert!(
            view.report("a", 7, false, vec![node("n2", State::Failed, 0)])
                .is_empty()
        );
        assert_eq!(view.last("a")[1].state, State::Running);
        // A node gone from a full report is gone from the view.
        view.report("a", 1, true, Vec::new());
        assert!(view.last("a").is_empty());
    }

    #[test]
    fn a_stop_under_way_is_one_event_and_its_end_a_state_change() {
        let mut view = View::default();
        view.report("a", 1, true, vec![node("n", State::Running, 10)]);
        let mut stopping = node("n", State::Running, 10);
        stopping.stopping_since_ms = Some(1_000);
        let events = view.report("a", 1, false, vec![stopping.clone()]);
        assert_eq!(
            events,
            vec![Event::NodeStopping {
                instance: "a".into(),
                node: "n".into(),
                pid: Some(10),
                since_ms: 1_000,
            }]
        );
        // Reported again (its memory moved): no news.
        stopping.rss_bytes = Some(4096);
        assert!(
            view.report("a", 1, false, vec![stopping.clone()])
                .is_empty()
        );
        // The process ended: a state change, and no stop under way.
        let events = view.report("a", 1, false, vec![node("n", State::Stopped, 0)]);
        assert!(
            matches!(
                &events[..],
                [Event::NodeState {
                    state: State::Stopped,
                    previous: Some(State::Running),
                    ..
                }]
            ),
            "{events:?}"
        );
        // A later stop is news again.
        view.report("a", 1, false, vec![node("n", State::Running, 11)]);
        let mut again = node("n", State::Running, 11);
        again.stopping_since_ms = Some(9_000);
        let events = view.report("a", 1, false, vec![again]);
        assert!(
            matches!(
                &events[..],
                [Event::NodeStopping {
                    since_ms: 9_000,
                    ..
                }]
            ),
            "{events:?}"
        );
    }

    #[test]
    fn a_failure_reason_travels_with_the_state_change_it_explains() {
        let reason = |e: &[Event]| match e {
            [Event::NodeState { reason, .. }] => reason.clone(),
            other => panic!("{other:?}"),
        };
        let mut view = View::default();
        view.report("a", 1, true, vec![node("n", State::Running, 10)]);
        let mut killed = node("n", State::Crashed, 10);
        killed.last_failure = Some("oom-killed".into());
        let events = view.report("a", 1, true, vec![killed.clone()]);
        assert_eq!(reason(&events).as_deref(), Some("oom-killed"));
        // Running again: the reason is kept in the status but is no news.
        let mut again = node("n", State::Running, 11);
        again.last_failure = killed.last_failure.clone();
        assert_eq!(
            reason(&view.report("a", 1, true, vec![again.clone()])),
            None
        );
        // A new reason while the state stays is an event of its own.
        again.last_failure = Some("watchdog timeout".into());
        let events = view.report("a", 1, true, vec![again]);
        assert_eq!(reason(&events).as_deref(), Some("watchdog timeout"));
    }

    #[test]
    fn the_applied_generation_is_the_higher_of_report_and_acknowledgement() {
        let mut view = View::default();
        assert_eq!(view.applied("a"), None);
        let own = |generation: Option<u64>, cpus: Option<u32>| {
            let mut s = NodeStatus::new("a", State::Running, MgmtRole::Agent);
            s.generation = generation;
            s.cpus = cpus;
            s
        };
        // An agent that predates generations reports none.
        view.report("a", 1, true, vec![own(None, None)]);
        assert_eq!((view.applied("a"), view.cpus("a")), (None, None));
        view.acknowledged("a", 3);
        assert_eq!(view.applied("a"), Some(3));
        // A report of a newer one counts at once; an older report (sent before the
        // apply was answered) does not lower it.
        view.report("a", 1, false, vec![own(Some(5), Some(8))]);
        assert_eq!((view.applied("a"), view.cpus("a")), (Some(5), Some(8)));
        view.report("a", 1, false, vec![own(Some(2), Some(8))]);
        assert_eq!(view.applied("a"), Some(3));
        view.acknowledged("a", 2);
        assert_eq!(view.applied("a"), Some(3));
        assert_eq!(view.applied_all().collect::<Vec<_>>(), vec![("a", 3)]);
        // A lost agent's report is gone; what it acknowledged stays a fact.
        view.lost("a");
        assert_eq!((view.applied("a"), view.cpus("a")), (Some(3), None));
    }
}
