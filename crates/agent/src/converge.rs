//! The agent's multi-node decisions, without I/O and without a clock.
//!
//! [`crate::machine`] decides for one node; this module decides for the set of them:
//!
//! - [`judge`]: whether an Apply of a deploy generation is carried out, is a repeat
//!   (answered without changes), or is stale (older than what is applied) and refused.
//! - [`diff`]: which nodes an Apply starts, restarts, removes or leaves alone, from the
//!   resolved node specs alone (never from the configuration's id).
//! - [`settle`]: whether a request waiting for a node (an Apply, restart, stop, start)
//!   is answered, and how.
//! - [`recover`]: what a starting agent does with each node, given the desired state
//!   that was written before the previous agent process acted ([`Desired`]) and what
//!   that process left behind ([`Found`]: records, and which of their processes live).
//!
//! The supervisor (the shell) reads files and `/proc`, calls these, and carries out
//! the answers. It keeps to one persistence protocol, which the simulation test below
//! models step by step and cuts at every step: the desired state is written (atomically,
//! synced) before any node is touched for an Apply; a node's record carries its spawn
//! token before the spawn and the process's pid after it; the spec a record carries is
//! the one its process runs; a removed node's record goes only once its process is gone.

use std::collections::{BTreeMap, BTreeSet};

use drover_proto::model::Node;
use serde::{Deserialize, Serialize};

/// The agent's share of the deployed configuration, as it is written to the state dir
/// before an Apply acts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Desired {
    /// The deploy generation (0: from a controller that predates generations).
    pub generation: u64,
    /// Counts Applies with restart-all: a process started before the latest such Apply
    /// (its record holds a smaller epoch) is restarted even if its spec is current.
    #[serde(default)]
    pub restart_epoch: u64,
    /// The resolved spec of every node this agent must run.
    pub nodes: BTreeMap<String, Node>,
}

/// What to do with an Apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry it out: diff the specs (restart everything with `restart_all`).
    Apply,
    /// The generation already applied, without restart-all: nothing changes.
    Repeat,
    /// Older than the generation applied: refused, nothing changes.
    Stale {
        /// The generation applied.
        applied: u64,
    },
}

/// Whether an Apply restarts every node, changed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restart {
    /// The Apply's own deploy asked for it (all a controller that predates `since`
    /// tells).
    pub all: bool,
    /// The generation of the latest deploy, up to the Apply's, that asked for it (0:
    /// none, or not told).
    pub since: u64,
}

impl Restart {
    /// Whether an agent that has applied generation `applied` restarts every node for
    /// this Apply. With `since` known: exactly when it has applied neither that
    /// generation nor a later one, so that a deploy which restarted everything is
    /// carried out once per agent, whether the agent had it first hand, missed it and
    /// is brought to a later one, or is sent it again after a reconnect.
    #[must_use]
    pub fn all_given(self, applied: u64) -> bool {
        if self.since > 0 {
            self.since > applied
        } else {
            self.all
        }
    }
}

/// Judges an Apply of generation `incoming` when `applied` is applied (0: none, or one
/// from a controller without generations). Generation 0 is always carried out by spec
/// diff, which changes nothing that already runs its spec (the supervisor answers one
/// that changes nothing at once, keeping the applied generation).
#[must_use]
pub fn judge(applied: u64, incoming: u64, restart_all: bool) -> Verdict {
    if incoming == 0 || incoming > applied {
        Verdict::Apply
    } else if incoming < applied {
        Verdict::Stale { applied }
    } else if restart_all {
        Verdict::Apply
    } else {
        Verdict::Repeat
    }
}

/// What an Apply changes, by node name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// New nodes: start them.
    pub start: Vec<String>,
    /// Nodes whose spec changed (or all, with restart-all): stop, then start anew.
    pub restart: Vec<String>,
    /// Nodes no longer desired: stop them and remove them.
    pub remove: Vec<String>,
    /// Nodes whose spec is unchanged: leave them alone, whatever their state.
    pub keep: Vec<String>,
}

impl Changes {
    /// True when the Apply starts, restarts and removes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.start.is_empty() && self.restart.is_empty() && self.remove.is_empty()
    }
}

/// Compares the specs the agent has (`current`) with the desired ones.
#[must_use]
pub fn diff<'a>(
    current: impl IntoIterator<Item = (&'a str, &'a Node)>,
    desired: &BTreeMap<String, Node>,
    restart_all: bool,
) -> Changes {
    let mut out = Changes::default();
    let mut seen = BTreeSet::new();
    for (name, spec) in current {
        seen.insert(name);
        match desired.get(name) {
            None => out.remove.push(name.to_owned()),
            Some(d) if d == spec && !restart_all => out.keep.push(name.to_owned()),
            Some(_) => out.restart.push(name.to_owned()),
        }
    }
    out.start = desired
        .keys()
        .filter(|n| !seen.contains(n.as_str()))
        .cloned()
        .collect();
    out
}

/// A live process that carries a node's spawn token in its environment although no
/// record names it: the previous agent spawned it and died before recording its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stray {
    /// Its pid.
    pub pid: i32,
    /// It leads its process group: the node's main process (nodes are spawned into a
    /// group of their own); the others are its descendants.
    pub leader: bool,
}

/// What a previous agent process left behind for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The spec in its record: the one its recorded process runs, if it has one.
    pub spec: Node,
    /// The restart epoch its process was started under.
    pub epoch: u64,
    /// An operator stopped it.
    pub stopped: bool,
    /// An operator's restart was under way (its process told to stop, to be started
    /// again): a process still alive is stopped and the node started anew.
    pub restarting: bool,
    /// Its process had ended for good under its restart policy (failed, or exited
    /// successfully under a policy that restarts only failures), with no operator
    /// involved: it is not started again for the same spec.
    pub ended: bool,
    /// The record named a process (alive or not), or said its process had crashed and
    /// it awaited its restart: starting it counts as a restart.
    pub recorded: bool,
    /// The recorded process, if it still lives (pid and start time checked).
    pub alive: Option<i32>,
    /// Live processes carrying the token of a spawn the record announced but never
    /// confirmed.
    pub strays: Vec<Stray>,
}

/// What recovery does with a node after killing the process groups in [`Plan::kill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Keep this process: it runs the desired spec.
    Adopt {
        /// Its pid.
        pid: i32,
    },
    /// Adopt this process, then stop it (the operator had stopped the node).
    Stop {
        /// Its pid.
        pid: i32,
    },
    /// Adopt this process, then restart it: it runs an outdated spec, or an
    /// operator's restart of it was cut short.
    Restart {
        /// Its pid.
        pid: i32,
    },
    /// Start the node (`lost`: a recorded process ended while no agent ran, which
    /// counts as one restart).
    Start {
        /// A recorded process was lost.
        lost: bool,
    },
    /// Leave the node stopped, as an operator left it.
    StayStopped,
    /// Leave the node as its last process left it: failed, or done after a successful
    /// exit (its policy does not restart it).
    StayEnded,
    /// The node is no longer desired: remove its record.
    Remove,
    /// The node is no longer desired but its process lives: adopt it, stop it (its
    /// stop signal, then SIGKILL after its stop timeout), then remove the record.
    StopAndRemove {
        /// Its pid.
        pid: i32,
    },
}

/// Recovery's decision for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Process groups to kill first.
    pub kill: Vec<i32>,
    /// Then this.
    pub then: Then,
}

/// Decides, for every node desired or found, what a starting agent does so that exactly
/// the desired nodes run, each once, with the desired spec, and nothing runs untracked.
#[must_use]
pub fn recover(desired: &Desired, found: &BTreeMap<String, Found>) -> BTreeMap<String, Plan> {
    let mut out = BTreeMap::new();
    for (name, f) in found {
        let plan = match desired.nodes.get(name) {
            None => Plan {
                kill: f.strays.iter().map(|s| s.pid).collect(),
                then: match f.alive {
                    Some(pid) => Then::StopAndRemove { pid },
                    None => Then::Remove,
                },
            },
            Some(spec) => {
                let current = &f.spec == spec && f.epoch >= desired.restart_epoch;
                let keep = |pid| match (current, f.stopped) {
                    (true, false) if f.restarting => Then::Restart { pid },
                    (true, false) => Then::Adopt { pid },
                    (true, true) => Then::Stop { pid },
                    (false, _) => Then::Restart { pid },
                };
                if let Some(pid) = f.alive {
                    Plan {
                        kill: f.strays.iter().map(|s| s.pid).collect(),
                        then: keep(pid),
                    }
                } else if let Some(leader) = f.strays.iter().find(|s| s.leader) {
                    // The main process lives; the other strays are its descendants.
                    Plan {
                        kill: Vec::new(),
                        then: keep(leader.pid),
                    }
                } else {
                    let then = if f.stopped && current {
                        Then::StayStopped
                    } else if f.ended && current && f.strays.is_empty() {
                        Then::StayEnded
                    } else {
                        Then::Start {
                            lost: f.recorded || !f.strays.is_empty(),
                        }
                    };
                    Plan {
                        kill: f.strays.iter().map(|s| s.pid).collect(),
                        then,
                    }
                }
            }
        };
        out.insert(name.clone(), plan);
    }
    for name in desired.nodes.keys() {
        if !found.contains_key(name) {
            out.insert(
                name.clone(),
                Plan {
                    kill: Vec::new(),
                    then: Then::Start { lost: false },
                },
            );
        }
    }
    out
}

/// What a request (an Apply, a restart, a stop, a start) waits for its nodes to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Running (and ready), or done for good under a policy that does not restart.
    Running,
    /// Without a process.
    Stopped,
}

/// What a waiting request sees of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The machine's state.
    pub state: crate::machine::State,
    /// It has a process (perhaps one being stopped).
    pub has_process: bool,
    /// Its process is being stopped.
    pub stopping: bool,
    /// How many processes it has had (spawned or adopted).
    pub spawns: u64,
}

/// How a waiting request ends for one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// It reached what was wanted.
    Done,
    /// It failed to start (FAILED, or CRASHED and waiting to be started again).
    Failed,
    /// It is gone: removed from the configuration meanwhile.
    Removed,
    /// Not yet: keep waiting (until the request's deadline).
    Pending,
}

/// Whether a request that wants `want` of a node is settled, given what it sees of the
/// node (`None`: the node is gone). `past` is the number of processes the node had when
/// a restart (or stop) was asked for: only a later process counts (a stop is over once
/// there is one).
#[must_use]
pub fn settle(want: Want, past: Option<u64>, node: Option<Seen>) -> Settled {
    use crate::machine::State;
    let Some(n) = node else {
        return match want {
            Want::Stopped => Settled::Done,
            Want::Running => Settled::Removed,
        };
    };
    let moved_on = past.is_none_or(|p| n.spawns > p);
    match want {
        // A later process than the one to stop means that one ended (a start came
        // after the stop).
        Want::Stopped if !n.has_process || moved_on && past.is_some() => Settled::Done,
        Want::Stopped => Settled::Pending,
        Want::Running => match n.state {
            State::Running if moved_on && !n.stopping => Settled::Done,
            State::Failed | State::Crashed if moved_on => Settled::Failed,
            // Exited successfully under a policy that does not restart.
            State::Stopped if moved_on && !n.has_process => Settled::Done,
            _ => Settled::Pending,
        },
    }
}

/// The desired state of an agent whose state dir predates desired-state files: the
/// nodes of its records, under no generation.
#[must_use]
pub fn legacy_desired(found: &BTreeMap<String, Found>) -> Desired {
    Desired {
        generation: 0,
        restart_epoch: 0,
        nodes: found
            .iter()
            .map(|(n, f)| (n.clone(), f.spec.clone()))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
