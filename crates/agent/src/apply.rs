//! The Applies of deploy generations, decided without I/O and without a clock. A pure
//! core, like [`crate::machine`] and [`crate::waiters`]: the supervisor hands it each
//! Apply as it arrives ([`Incoming`]) and what it sees of its nodes ([`Table`]); it
//! hands back the answers to send and the desired state to write ([`Out`]), and, once
//! that is on disk, what each node goes through ([`CarryOut`]).
//!
//! The order it keeps, on which recovery relies ([`crate::converge::recover`]):
//!
//! - Applies are taken in arrival order, one at a time. The next one is judged only
//!   once the one before has been carried out, so each is judged against the
//!   generation in effect.
//! - A repeat, a stale generation and an Apply the host cannot honour change nothing,
//!   not even the desired state on disk, and are answered at once (a repeat, along
//!   with the Apply that carried its generation out, if that one still waits, else
//!   with that Apply's nodes as they are: the supervisor's part).
//! - The desired state is written (atomically, synced) before any node is touched:
//!   an agent killed at any moment finds on disk the generation it was acting on.
//! - What each node goes through is decided from its spec alone ([`converge::diff`]),
//!   again once the desired state is written, against the nodes as they are then.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use drover_proto::model::Node;

use crate::converge::{self, Desired, Verdict};

/// An Apply as it arrives.
#[derive(Debug)]
pub struct Incoming<T> {
    /// Its deploy generation (0: from a controller without generations).
    pub generation: u64,
    /// Whether it restarts every node, changed or not (see [`converge::Restart`]).
    pub restart: converge::Restart,
    /// This agent's share of the configuration, resolved.
    pub nodes: BTreeMap<String, Node>,
    /// Why some of those nodes cannot run on this host (limits it cannot enforce): the
    /// Apply is refused as a whole.
    pub refused: Vec<String>,
    /// The requester's own: handed back with the answer, or with the carry-out.
    pub with: T,
}

/// What the core asks of the nodes the supervisor has.
pub trait Table {
    /// The deploy generation applied (0: none, or one without generations).
    fn applied(&self) -> u64;
    /// The restart epoch of the desired state in effect.
    fn restart_epoch(&self) -> u64;
    /// Every node, with the spec it runs (or is to run).
    fn specs(&self) -> Vec<(&str, &Node)>;
    /// What the core needs to know of one node; `None` when there is no such node.
    fn facts(&self, node: &str) -> Option<Facts>;
}

/// What the core needs to know of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// Its user, groups or limits could not be resolved when it was last started.
    pub plan_failed: bool,
    /// Its state is FAILED.
    pub failed: bool,
    /// It has a process, or one is being spawned.
    pub has_process: bool,
    /// It left the configuration and is being stopped, to be removed.
    pub removing: bool,
}

/// What the supervisor does next for an Apply.
#[derive(Debug)]
pub enum Out<T> {
    /// A repeat of the generation applied: nothing changes. It is answered as the Apply
    /// that carried that generation out is, if that one still waits for its nodes (a
    /// controller that sent it again on an agent's new connection must not take it as
    /// done before they run), else with that Apply's nodes as they are now.
    Repeat {
        /// The requester's.
        with: T,
    },
    /// Answer it now, with these errors (none: one that changes nothing). Nothing
    /// changed.
    Answer {
        /// The requester's.
        with: T,
        /// One error for the instance, if any.
        errors: Vec<String>,
    },
    /// Write its desired state, make what its new nodes need, then report with
    /// [`Applies::written`].
    Write(Write),
}

/// The desired state to write before any node is touched, and the work that can be
/// done meanwhile, off the task that answers requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// To write, atomically, and to sync.
    pub desired: Desired,
    /// New nodes, created once the state is written (each first spawn makes the node's
    /// files, see [`crate::spawner::Fresh`]).
    pub create: Vec<String>,
    /// Nodes whose user, groups, capabilities or limits are to be resolved
    /// ([`crate::exec::prepare`]): the new and changed ones that have such settings,
    /// and unchanged ones that could not be resolved before (the host's user database
    /// may have changed since).
    pub resolve: Vec<String>,
}

/// What one node goes through when an Apply is carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// It left the configuration: stop it, and drop it once stopped.
    Remove,
    /// Its spec is unchanged: leave it alone, whatever its state; it now belongs to this
    /// generation. `retry`: start it again, for what kept it from starting (its user or
    /// groups) now resolves.
    Keep {
        /// Start it again.
        retry: bool,
    },
    /// Its spec changed (or every node restarts): stop its process as the old spec
    /// says, then start one of the new spec, whose readiness, restart policy and
    /// backoff apply from then on. `renew`: it has no process, so it starts afresh,
    /// its restart count too.
    Restart {
        /// The new spec.
        spec: Node,
        /// It has no process.
        renew: bool,
    },
    /// New: create it, then start it.
    Create {
        /// Its spec.
        spec: Node,
    },
}

/// An Apply whose desired state is on disk, to carry out.
#[derive(Debug)]
pub struct CarryOut<T> {
    /// The requester's.
    pub with: T,
    /// The generation now applied.
    pub generation: u64,
    /// The restart epoch now in effect.
    pub restart_epoch: u64,
    /// Every step, by node: removals first, then the unchanged nodes, the changed ones,
    /// and the new ones.
    pub steps: Vec<(String, Step)>,
}

/// Applies in arrival order, and the one whose desired state is being written.
#[derive(Debug)]
pub struct Applies<T> {
    queue: VecDeque<Incoming<T>>,
    writing: Option<Writing<T>>,
}

#[derive(Debug)]
struct Writing<T> {
    with: T,
    restart_all: bool,
    desired: Desired,
}

impl<T> Default for Applies<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            writing: None,
        }
    }
}

impl<T> Applies<T> {
    /// Queues an Apply; what to do for it, and for those queued behind it, now.
    pub fn push(&mut self, a: Incoming<T>, table: &impl Table) -> Vec<Out<T>> {
        self.queue.push_back(a);
        self.next(table)
    }

    /// Whether a desired state is being written.
    #[must_use]
    pub fn is_writing(&self) -> bool {
        self.writing.is_some()
    }

    /// The desired state of the Apply being written is on disk, with the nodes of
    /// [`Write::resolve`] that resolved in `resolved` (`Ok`), or it could not be
    /// written (`Err`: why). The supervisor carries out or answers that Apply, then
    /// calls [`Applies::next`] for those queued behind it, whose judgement depends on
    /// what this one did.
    pub fn written(
        &mut self,
        result: Result<&BTreeSet<String>, String>,
        table: &impl Table,
    ) -> Written<T> {
        let Some(w) = self.writing.take() else {
            return Written::Nothing;
        };
        match result {
            Ok(resolved) => Written::CarryOut(carry_out(w, resolved, table)),
            Err(error) => Written::Failed {
                with: w.with,
                error,
            },
        }
    }

    /// Takes the Applies queued, up to the next one to write (see [`Applies::push`]).
    pub fn next(&mut self, table: &impl Table) -> Vec<Out<T>> {
        let mut out = Vec::new();
        while self.writing.is_none() {
            let Some(a) = self.queue.pop_front() else {
                break;
            };
            let generation = a.generation;
            let restart_all = a.restart.all_given(table.applied());
            match converge::judge(table.applied(), generation, restart_all) {
                Verdict::Apply => {}
                Verdict::Repeat => {
                    out.push(Out::Repeat { with: a.with });
                    continue;
                }
                Verdict::Stale { applied } => {
                    out.push(Out::Answer {
                        with: a.with,
                        errors: vec![format!(
                            "deploy generation {generation} is older than generation {applied}, which this agent has applied; nothing changed"
                        )],
                    });
                    continue;
                }
            }
            if !a.refused.is_empty() {
                out.push(Out::Answer {
                    with: a.with,
                    errors: vec![format!("{}; nothing changed", a.refused.join("; "))],
                });
                continue;
            }
            let desired = Desired {
                generation,
                restart_epoch: table.restart_epoch() + u64::from(restart_all),
                nodes: a.nodes,
            };
            let changes = converge::diff(table.specs(), &desired.nodes, restart_all);
            let removing = || {
                table
                    .specs()
                    .iter()
                    .any(|(n, _)| table.facts(n).is_some_and(|f| f.removing))
            };
            if generation == 0 && changes.is_empty() && !removing() {
                // A controller without generations re-applying what runs (it does so
                // whenever an agent connects): nothing to do, and the generation
                // applied stays what it was.
                out.push(Out::Answer {
                    with: a.with,
                    errors: Vec::new(),
                });
                continue;
            }
            let plan_failed = |n: &String| table.facts(n).is_some_and(|f| f.plan_failed);
            let resolve = changes
                .start
                .iter()
                .chain(&changes.restart)
                .chain(changes.keep.iter().filter(|n| plan_failed(n)))
                .filter(|n| desired.nodes.get(*n).is_some_and(crate::exec::wanted))
                .cloned()
                .collect();
            out.push(Out::Write(Write {
                desired: desired.clone(),
                create: changes.start,
                resolve,
            }));
            self.writing = Some(Writing {
                with: a.with,
                restart_all,
                desired,
            });
        }
        out
    }
}

/// What [`Applies::written`] hands back.
#[derive(Debug)]
pub enum Written<T> {
    /// No desired state was being written.
    Nothing,
    /// Carry this out.
    CarryOut(CarryOut<T>),
    /// The desired state could not be written: answer with this error; nothing changed.
    Failed {
        /// The requester's.
        with: T,
        /// Why.
        error: String,
    },
}

/// The steps of an Apply whose desired state is on disk, against the nodes as they are
/// now (a node being removed may have gone while the state was written).
fn carry_out<T>(w: Writing<T>, resolved: &BTreeSet<String>, table: &impl Table) -> CarryOut<T> {
    let Writing {
        with,
        restart_all,
        desired,
    } = w;
    let changes = converge::diff(table.specs(), &desired.nodes, restart_all);
    let mut nodes = desired.nodes;
    let facts = |n: &str| table.facts(n).unwrap_or_default();
    let mut steps = Vec::with_capacity(changes.remove.len() + nodes.len());
    steps.extend(changes.remove.into_iter().map(|n| (n, Step::Remove)));
    steps.extend(changes.keep.into_iter().map(|n| {
        let retry = resolved.contains(&n) && facts(&n).failed;
        (n, Step::Keep { retry })
    }));
    for n in changes.restart {
        if let Some(spec) = nodes.remove(&n) {
            let renew = !facts(&n).has_process;
            steps.push((n, Step::Restart { spec, renew }));
        }
    }
    for n in changes.start {
        if let Some(spec) = nodes.remove(&n) {
            steps.push((n, Step::Create { spec }));
        }
    }
    CarryOut {
        with,
        generation: desired.generation,
        restart_epoch: desired.restart_epoch,
        steps,
    }
}

#[cfg(test)]
mod tests;
