//! Operator actions on existing nodes (stop, start, restart, signal), decided without
//! I/O and without a clock: which nodes an action is for, which are refused and why,
//! what each of the others goes through, and what the request then waits for. A pure
//! core, like [`crate::apply`]; the supervisor carries out the steps (the nodes'
//! machines, signals, records) and hands the wait to [`crate::waiters`].

use nix::sys::signal::Signal;

use crate::converge::Want;

/// Operator actions on existing nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Stop and start again.
    Restart,
    /// Stop; the node stays stopped.
    Stop,
    /// Start a stopped node.
    Start,
    /// Send this signal to the node's process group; its state machine is not involved
    /// (a node that dies of it is restarted under its policy).
    Signal(i32),
}

/// What the core asks of the nodes the supervisor has.
pub trait Nodes {
    /// The nodes an action without names is for: every node but those being removed,
    /// in name order.
    fn all(&self) -> Vec<String>;
    /// What the core needs to know of one node; `None` when there is no such node.
    fn node(&self, name: &str) -> Option<Facts>;
}

/// What the core needs to know of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// It has a live process (a signal has somewhere to go).
    pub has_process: bool,
    /// Its spawn count: a restart waits for a process past it.
    pub spawns: u64,
}

/// What one node goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send it this signal; the answer for the node is whether that worked.
    Signal(Signal),
    /// Stop it and mark it stopped by an operator.
    Stop,
    /// Start it, clearing the operator's stop.
    Start,
    /// Stop it, then start it, clearing the operator's stop.
    Restart,
}

/// An action, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every node, in the order asked: what it goes through, or why it is refused
    /// (unknown, not running, a bad signal) and answered at once.
    pub steps: Vec<(String, Result<Step, String>)>,
    /// The nodes the request then waits for, with the spawn count a restart must move
    /// past (and a stop is done at); none for a signal, whose answer is whether it was
    /// sent.
    pub wait: Vec<(String, Option<u64>)>,
    /// What the request waits for them to be.
    pub want: Want,
}

/// Decides `op` for `names` (every node but those being removed when empty).
#[must_use]
pub fn plan(op: Op, names: Vec<String>, nodes: &impl Nodes) -> Plan {
    let names = if names.is_empty() { nodes.all() } else { names };
    let want = if op == Op::Stop {
        Want::Stopped
    } else {
        Want::Running
    };
    let mut out = Plan {
        steps: Vec::new(),
        wait: Vec::new(),
        want,
    };
    for name in names {
        let Some(facts) = nodes.node(&name) else {
            out.steps
                .push((name, Err("unknown cluster node".to_owned())));
            continue;
        };
        let step = match op {
            Op::Signal(sig) => match (facts.has_process, Signal::try_from(sig)) {
                (true, Ok(sig)) => Step::Signal(sig),
                (false, _) => {
                    let why = format!("node {name} is not running");
                    out.steps.push((name, Err(why)));
                    continue;
                }
                (true, Err(_)) => {
                    out.steps.push((name, Err(format!("invalid signal {sig}"))));
                    continue;
                }
            },
            Op::Stop => Step::Stop,
            Op::Start => Step::Start,
            Op::Restart => Step::Restart,
        };
        if !matches!(step, Step::Signal(_)) {
            // A restart waits for a process past the current one; a stop for the
            // current one's end, which a start asked for meanwhile may follow at once.
            let past = matches!(op, Op::Restart | Op::Stop).then_some(facts.spawns);
            out.wait.push((name.clone(), past));
        }
        out.steps.push((name, Ok(step)));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    struct Fake(BTreeMap<&'static str, (Facts, bool)>);

    impl Nodes for Fake {
        fn all(&self) -> Vec<String> {
            self.0
                .iter()
                .filter(|(_, (_, removing))| !removing)
                .map(|(n, _)| (*n).to_owned())
                .collect()
        }
        fn node(&self, name: &str) -> Option<Facts> {
            self.0.get(name).map(|(f, _)| *f)
        }
    }

    fn fake() -> Fake {
        let running = |spawns| Facts {
            has_process: true,
            spawns,
        };
        Fake(BTreeMap::from([
            ("a", (running(3), false)),
            ("b", (Facts::default(), false)),
            ("gone", (running(1), true)),
        ]))
    }

    fn ok(name: &str, step: Step) -> (String, Result<Step, String>) {
        (name.to_owned(), Ok(step))
    }

    fn err(name: &str, why: &str) -> (String, Result<Step, String>) {
        (name.to_owned(), Err(why.to_owned()))
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_names_means_every_node_not_being_removed() {
        let p = plan(Op::Stop, Vec::new(), &fake());
        assert_eq!(p.steps, [ok("a", Step::Stop), ok("b", Step::Stop)]);
        assert_eq!(p.want, Want::Stopped);
        assert_eq!(
            p.wait,
            [("a".to_owned(), Some(3)), ("b".to_owned(), Some(0))]
        );
    }

    #[test]
    fn a_restart_waits_for_a_process_past_the_current_one() {
        let p = plan(Op::Restart, names(&["b", "a"]), &fake());
        assert_eq!(p.steps, [ok("b", Step::Restart), ok("a", Step::Restart)]);
        assert_eq!(
            p.wait,
            [("b".to_owned(), Some(0)), ("a".to_owned(), Some(3))]
        );
        assert_eq!(p.want, Want::Running);
    }

    #[test]
    fn unknown_nodes_are_refused_and_the_others_go_ahead() {
        let p = plan(Op::Start, names(&["x", "b", "gone"]), &fake());
        // Named explicitly, a node being removed is acted on (its machine decides).
        assert_eq!(
            p.steps,
            [
                err("x", "unknown cluster node"),
                ok("b", Step::Start),
                ok("gone", Step::Start)
            ]
        );
        assert_eq!(p.wait.len(), 2);
    }

    #[test]
    fn a_signal_needs_a_process_and_a_real_signal_and_waits_for_nothing() {
        let p = plan(Op::Signal(10), names(&["a", "b"]), &fake());
        assert_eq!(
            p.steps,
            [
                ok("a", Step::Signal(Signal::SIGUSR1)),
                err("b", "node b is not running")
            ]
        );
        assert!(p.wait.is_empty());
        let p = plan(Op::Signal(999), names(&["a"]), &fake());
        assert_eq!(p.steps, [err("a", "invalid signal 999")]);
    }
}
