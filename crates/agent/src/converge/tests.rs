//! Simulation of the supervisor's persistence protocol around the decisions of
//! [`super`], cut after every step.
//!
//! A simulated process table and state dir stand in for the host. An agent applies a
//! new desired state the way the supervisor does (desired state first; per node: kill,
//! note the exit, remove or announce the spawn token, spawn, record the pid), is killed
//! after any step, and a new agent recovers through [`recover`]; that recovery may be
//! killed after any step too, and a third agent recovers again. Afterwards exactly the
//! desired nodes run, each once, with the desired spec, every live process is named by
//! a record, removed nodes are gone, and nodes the Apply left alone kept their process.

use std::collections::{BTreeMap, BTreeSet};

use drover_proto::model::Node;
use proptest::prelude::*;

use super::{
    Changes, Desired, Found, Seen, Settled, Stray, Then, Verdict, Want, diff, judge,
    legacy_desired, recover, settle,
};
use crate::machine::State;

#[derive(Debug, Clone)]
struct SimProc {
    node: String,
    token: u64,
    spec: Node,
    leader: bool,
    alive: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct SimRecord {
    spec: Node,
    epoch: u64,
    stopped: bool,
    process: Option<(i32, u64)>,
    spawning: Option<u64>,
}

/// The host: what survives an agent's death.
#[derive(Debug, Clone, Default)]
struct World {
    procs: BTreeMap<i32, SimProc>,
    records: BTreeMap<String, SimRecord>,
    desired: Option<Desired>,
    next_pid: i32,
    next_token: u64,
}

/// One thing the agent does that outlives it.
#[derive(Debug, Clone)]
enum Step {
    WriteDesired(Desired),
    /// SIGKILL to a process group (and the process itself).
    Kill(i32),
    /// The process is gone: the record says so (the next spec, no process).
    RecordExited {
        name: String,
        spec: Node,
    },
    RecordStopped {
        name: String,
    },
    RemoveRecord(String),
    /// The record carries the token of the spawn to come.
    Announce {
        name: String,
        spec: Node,
        epoch: u64,
        token: u64,
    },
    Spawn {
        name: String,
        spec: Node,
        token: u64,
    },
    /// The record names the spawned process.
    Confirm {
        name: String,
        token: u64,
    },
    /// The record names an adopted process.
    RecordAdopted {
        name: String,
        pid: i32,
    },
}

impl World {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::WriteDesired(d) => self.desired = Some(d.clone()),
            Step::Kill(pid) => {
                let token = self.procs.get(pid).filter(|p| p.leader).map(|p| p.token);
                for (p, proc) in &mut self.procs {
                    if *p == *pid || Some(proc.token) == token {
                        proc.alive = false;
                    }
                }
            }
            Step::RecordExited { name, spec } => {
                if let Some(r) = self.records.get_mut(name) {
                    r.process = None;
                    r.spec = spec.clone();
                }
            }
            Step::RecordStopped { name } => {
                if let Some(r) = self.records.get_mut(name) {
                    r.process = None;
                    r.stopped = true;
                }
            }
            Step::RemoveRecord(name) => {
                self.records.remove(name);
            }
            Step::Announce {
                name,
                spec,
                epoch,
                token,
            } => {
                self.records.insert(
                    name.clone(),
                    SimRecord {
                        spec: spec.clone(),
                        epoch: *epoch,
                        stopped: false,
                        process: None,
                        spawning: Some(*token),
                    },
                );
            }
            Step::Spawn { name, spec, token } => {
                self.next_pid += 1;
                let pid = self.next_pid;
                let proc = SimProc {
                    node: name.clone(),
                    token: *token,
                    spec: spec.clone(),
                    leader: true,
                    alive: true,
                };
                // A node that forks leaves a descendant with its token.
                let forks = spec.command.iter().any(|a| a == "--fork");
                self.procs.insert(pid, proc.clone());
                if forks {
                    self.next_pid += 1;
                    self.procs.insert(
                        self.next_pid,
                        SimProc {
                            leader: false,
                            ..proc
                        },
                    );
                }
            }
            Step::Confirm { name, token } => {
                let pid = self
                    .procs
                    .iter()
                    .find(|(_, p)| p.alive && p.leader && p.token == *token)
                    .map(|(pid, _)| *pid);
                if let (Some(r), Some(pid)) = (self.records.get_mut(name), pid) {
                    r.process = Some((pid, *token));
                    r.spawning = None;
                }
            }
            Step::RecordAdopted { name, pid } => {
                let token = self.procs[pid].token;
                if let Some(r) = self.records.get_mut(name) {
                    r.process = Some((*pid, token));
                    r.spawning = None;
                }
            }
        }
    }

    /// What a starting agent finds: records, with their processes checked for life and
    /// the process table searched for the tokens of unconfirmed spawns.
    fn found(&self) -> BTreeMap<String, Found> {
        self.records
            .iter()
            .map(|(name, r)| {
                let alive = r
                    .process
                    .filter(|(pid, token)| {
                        self.procs
                            .get(pid)
                            .is_some_and(|p| p.alive && p.token == *token)
                    })
                    .map(|(pid, _)| pid);
                let strays = r
                    .spawning
                    .map(|t| {
                        self.procs
                            .iter()
                            .filter(|(_, p)| p.alive && p.token == t)
                            .map(|(pid, p)| Stray {
                                pid: *pid,
                                leader: p.leader,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let found = Found {
                    spec: r.spec.clone(),
                    epoch: r.epoch,
                    stopped: r.stopped,
                    restarting: false,
                    ended: false,
                    recorded: r.process.is_some(),
                    alive,
                    strays,
                };
                (name.clone(), found)
            })
            .collect()
    }

    /// The steps of a starting agent's recovery.
    fn recovery(&mut self) -> Vec<Step> {
        let found = self.found();
        let desired = self
            .desired
            .clone()
            .unwrap_or_else(|| legacy_desired(&found));
        let mut steps = Vec::new();
        for (name, plan) in recover(&desired, &found) {
            steps.extend(plan.kill.iter().map(|pid| Step::Kill(*pid)));
            let spec = desired.nodes.get(&name).cloned();
            match plan.then {
                Then::Remove => steps.push(Step::RemoveRecord(name)),
                Then::StopAndRemove { pid } => {
                    let spec = found[&name].spec.clone();
                    steps.push(Step::RecordAdopted {
                        name: name.clone(),
                        pid,
                    });
                    steps.push(Step::Kill(pid));
                    steps.push(Step::RecordExited {
                        name: name.clone(),
                        spec,
                    });
                    steps.push(Step::RemoveRecord(name));
                }
                Then::Adopt { pid } => steps.push(Step::RecordAdopted { name, pid }),
                Then::Stop { pid } => {
                    steps.push(Step::RecordAdopted {
                        name: name.clone(),
                        pid,
                    });
                    steps.push(Step::Kill(pid));
                    steps.push(Step::RecordStopped { name });
                }
                Then::Restart { pid } => {
                    let spec = spec.expect("restarted nodes are desired");
                    steps.push(Step::RecordAdopted {
                        name: name.clone(),
                        pid,
                    });
                    steps.push(Step::Kill(pid));
                    steps.push(Step::RecordExited {
                        name: name.clone(),
                        spec: spec.clone(),
                    });
                    let token = self.token();
                    steps.extend(spawn_steps(&name, &spec, desired.restart_epoch, token));
                }
                Then::Start { .. } => {
                    let spec = spec.expect("started nodes are desired");
                    let token = self.token();
                    steps.extend(spawn_steps(&name, &spec, desired.restart_epoch, token));
                }
                Then::StayStopped | Then::StayEnded => {}
            }
        }
        steps
    }

    /// The steps of an Apply of `d` by an agent that knows the nodes of the records,
    /// each node's steps in order, nodes interleaved by `order`.
    fn apply(&mut self, d: &Desired, restart_all: bool, order: &[usize]) -> (Vec<Step>, Changes) {
        let current: BTreeMap<String, SimRecord> = self.records.clone();
        let changes = diff(
            current.iter().map(|(n, r)| (n.as_str(), &r.spec)),
            &d.nodes,
            restart_all,
        );
        let mut per_node: Vec<Vec<Step>> = Vec::new();
        for name in &changes.remove {
            let r = &current[name];
            let mut s = Vec::new();
            if let Some((pid, _)) = r.process {
                s.push(Step::Kill(pid));
                s.push(Step::RecordExited {
                    name: name.clone(),
                    spec: r.spec.clone(),
                });
            }
            s.push(Step::RemoveRecord(name.clone()));
            per_node.push(s);
        }
        for name in &changes.restart {
            let spec = &d.nodes[name];
            let mut s = Vec::new();
            if let Some((pid, _)) = current[name].process {
                s.push(Step::Kill(pid));
                s.push(Step::RecordExited {
                    name: name.clone(),
                    spec: spec.clone(),
                });
            }
            s.extend(spawn_steps(name, spec, d.restart_epoch, self.token()));
            per_node.push(s);
        }
        for name in &changes.start {
            let token = self.token();
            per_node.push(spawn_steps(name, &d.nodes[name], d.restart_epoch, token));
        }
        let mut steps = vec![Step::WriteDesired(d.clone())];
        let mut cursors = vec![0; per_node.len()];
        let mut pick = order.iter().cycle();
        while cursors.iter().zip(&per_node).any(|(c, s)| *c < s.len()) {
            let open: Vec<usize> = (0..per_node.len())
                .filter(|i| cursors[*i] < per_node[*i].len())
                .collect();
            let i = open[pick.next().copied().unwrap_or(0) % open.len()];
            steps.push(per_node[i][cursors[i]].clone());
            cursors[i] += 1;
        }
        (steps, changes)
    }

    fn run_all(&mut self, steps: &[Step]) {
        for s in steps {
            self.run(s);
        }
    }

    fn live_pid(&self, name: &str) -> Option<i32> {
        self.records
            .get(name)
            .and_then(|r| r.process)
            .map(|(pid, _)| pid)
            .filter(|pid| self.procs[pid].alive)
    }
}

fn spawn_steps(name: &str, spec: &Node, epoch: u64, token: u64) -> Vec<Step> {
    vec![
        Step::Announce {
            name: name.to_owned(),
            spec: spec.clone(),
            epoch,
            token,
        },
        Step::Spawn {
            name: name.to_owned(),
            spec: spec.clone(),
            token,
        },
        Step::Confirm {
            name: name.to_owned(),
            token,
        },
    ]
}

fn spec(name: &str, version: u32, forks: bool) -> Node {
    let mut n = Node::new(name, "agent-1");
    n.command = vec!["prog".into(), format!("--version={version}")];
    if forks {
        n.command.push("--fork".into());
    }
    n
}

/// Exactly the desired nodes run, each once, with the desired spec, each named by its
/// record; operator-stopped nodes whose spec did not change stay stopped; nothing else
/// lives; nodes the Apply kept still run the process they ran before.
fn check(w: &World, d: &Desired, stopped: &BTreeSet<String>, kept: &BTreeMap<String, i32>) {
    let names: BTreeSet<&String> = w.records.keys().collect();
    assert_eq!(
        names,
        d.nodes.keys().collect(),
        "records are those of the desired nodes"
    );
    for (name, spec) in &d.nodes {
        let r = &w.records[name];
        let leaders: Vec<i32> = w
            .procs
            .iter()
            .filter(|(_, p)| p.alive && p.leader && p.node == *name)
            .map(|(pid, _)| *pid)
            .collect();
        if stopped.contains(name) && r.stopped {
            assert!(leaders.is_empty(), "{name}: stopped, but runs {leaders:?}");
            continue;
        }
        assert_eq!(leaders.len(), 1, "{name}: processes {leaders:?}");
        let pid = leaders[0];
        assert_eq!(&w.procs[&pid].spec, spec, "{name}: runs an outdated spec");
        assert_eq!(&r.spec, spec, "{name}: record's spec");
        assert_eq!(r.process.map(|(p, _)| p), Some(pid), "{name}: untracked");
        assert_eq!(r.epoch, d.restart_epoch, "{name}: epoch");
        if let Some(before) = kept.get(name) {
            assert_eq!(pid, *before, "{name}: unchanged but restarted");
        }
    }
    for (pid, p) in &w.procs {
        if !p.alive {
            continue;
        }
        let r = w
            .records
            .get(&p.node)
            .unwrap_or_else(|| panic!("pid {pid} of removed node {} lives", p.node));
        assert_eq!(
            r.process.map(|(_, t)| t),
            Some(p.token),
            "pid {pid} of {} is untracked",
            p.node
        );
    }
}

struct Scenario {
    before: Desired,
    stopped: BTreeSet<String>,
    after: Desired,
    restart_all: bool,
    order: Vec<usize>,
}

impl Scenario {
    /// A world converged on `before`, with the operator's stops done.
    fn start(&self) -> World {
        let mut w = World::default();
        w.run(&Step::WriteDesired(self.before.clone()));
        let steps = w.recovery();
        w.run_all(&steps);
        check(&w, &self.before, &BTreeSet::new(), &BTreeMap::new());
        for name in &self.stopped {
            let pid = w.live_pid(name).expect("running");
            w.run_all(&[
                Step::Kill(pid),
                Step::RecordStopped {
                    name: name.to_owned(),
                },
            ]);
        }
        w
    }

    /// Applies, killing the agent after `cut` steps and its successor's recovery after
    /// `cut2` steps (`None`: never), then recovers to quiescence; checks the outcome.
    /// Returns how many steps the Apply has.
    fn run(&self, w0: &World, cut: usize, cut2: Option<usize>) -> usize {
        let mut w = w0.clone();
        let kept: BTreeMap<String, i32> = {
            let changes = diff(
                w.records.iter().map(|(n, r)| (n.as_str(), &r.spec)),
                &self.after.nodes,
                self.restart_all,
            );
            changes
                .keep
                .iter()
                .filter_map(|n| Some((n.clone(), w.live_pid(n)?)))
                .collect()
        };
        let (steps, changes) = w.apply(&self.after, self.restart_all, &self.order);
        let n = steps.len();
        w.run_all(&steps[..cut.min(n)]);
        if cut >= n {
            // No crash: the Apply alone converged.
            self.check(&w, &changes, &kept);
            return n;
        }
        if let Some(cut2) = cut2 {
            let steps = w.recovery();
            w.run_all(&steps[..cut2.min(steps.len())]);
        }
        let steps = w.recovery();
        w.run_all(&steps);
        if cut == 0 {
            // Killed before the desired state was written: the node set is the old one,
            // and the controller applies again when the agent is back.
            assert_eq!(w.desired.as_ref(), Some(&self.before));
            let (steps, _) = w.apply(&self.after, self.restart_all, &self.order);
            w.run_all(&steps);
        }
        self.check(&w, &changes, &kept);
        // Recovery of a converged world changes nothing.
        let again = w.recovery();
        assert!(
            again
                .iter()
                .all(|s| matches!(s, Step::RecordAdopted { .. })),
            "a second recovery acted: {again:?}"
        );
        n
    }

    fn check(&self, w: &World, changes: &Changes, kept: &BTreeMap<String, i32>) {
        let stopped: BTreeSet<String> = self
            .stopped
            .iter()
            .filter(|n| changes.keep.contains(n))
            .cloned()
            .collect();
        check(w, &self.after, &stopped, kept);
    }
}

fn twenty_nodes(restart_all: bool) -> Scenario {
    // n00-n04 removed, n05-n09 changed, n10-n14 unchanged, n15-n19 new; every third
    // forks a descendant; n11 (unchanged) and n06 (changed) were stopped by an operator.
    let name = |i: usize| format!("n{i:02}");
    let before = Desired {
        generation: 1,
        restart_epoch: 0,
        nodes: (0..15)
            .map(|i| (name(i), spec(&name(i), 1, i % 3 == 0)))
            .collect(),
    };
    let after = Desired {
        generation: 2,
        restart_epoch: u64::from(restart_all),
        nodes: (5..20)
            .map(|i| {
                let version = if (5..10).contains(&i) { 2 } else { 1 };
                (name(i), spec(&name(i), version, i % 3 == 0))
            })
            .collect(),
    };
    Scenario {
        before,
        stopped: ["n06", "n11"].into_iter().map(str::to_owned).collect(),
        after,
        restart_all,
        order: vec![0, 3, 1, 4, 1, 5, 9, 2, 6],
    }
}

#[test]
fn an_apply_cut_after_every_step_converges() {
    for restart_all in [false, true] {
        let s = twenty_nodes(restart_all);
        let w = s.start();
        let n = s.run(&w, usize::MAX, None);
        assert!(n > 40, "the apply has {n} steps");
        for cut in 0..n {
            s.run(&w, cut, None);
        }
    }
}

#[test]
fn an_apply_and_its_recovery_cut_after_every_step_converge() {
    let s = twenty_nodes(false);
    let w = s.start();
    let n = s.run(&w, usize::MAX, None);
    for cut in 0..n {
        for cut2 in 0..n + 20 {
            s.run(&w, cut, Some(cut2));
        }
    }
}

#[test]
fn a_state_dir_without_desired_state_keeps_its_recorded_nodes() {
    let s = twenty_nodes(false);
    let mut w = s.start();
    let pids: BTreeMap<String, Option<i32>> = s
        .before
        .nodes
        .keys()
        .map(|n| (n.clone(), w.live_pid(n)))
        .collect();
    w.desired = None;
    let steps = w.recovery();
    w.run_all(&steps);
    for (n, pid) in pids {
        assert_eq!(w.live_pid(&n), pid, "{n}");
    }
}

#[test]
fn generations_are_applied_once_and_never_backwards() {
    assert_eq!(judge(0, 1, false), Verdict::Apply);
    assert_eq!(judge(1, 2, false), Verdict::Apply);
    assert_eq!(judge(2, 2, false), Verdict::Repeat);
    assert_eq!(judge(2, 2, true), Verdict::Apply);
    assert_eq!(judge(3, 2, false), Verdict::Stale { applied: 3 });
    assert_eq!(judge(3, 2, true), Verdict::Stale { applied: 3 });
    // Generation 0 (a controller without generations): always by spec diff.
    assert_eq!(judge(0, 0, false), Verdict::Apply);
    assert_eq!(judge(7, 0, false), Verdict::Apply);
}

#[test]
fn the_diff_looks_at_specs_not_ids() {
    let current = [("a", spec("a", 1, false)), ("b", spec("b", 1, false))];
    let desired: BTreeMap<String, Node> = [
        ("a".to_owned(), spec("a", 1, false)),
        ("b".to_owned(), spec("b", 2, false)),
        ("c".to_owned(), spec("c", 1, false)),
    ]
    .into();
    let d = diff(current.iter().map(|(n, s)| (*n, s)), &desired, false);
    assert_eq!(d.keep, ["a"]);
    assert_eq!(d.restart, ["b"]);
    assert_eq!(d.start, ["c"]);
    assert!(d.remove.is_empty());
    let d = diff(current.iter().map(|(n, s)| (*n, s)), &desired, true);
    assert_eq!(d.restart, ["a", "b"]);
    let d = diff(
        current.iter().map(|(n, s)| (*n, s)),
        &BTreeMap::new(),
        false,
    );
    assert_eq!(d.remove, ["a", "b"]);
}

#[test]
fn a_stray_leader_is_adopted_and_its_descendants_spared() {
    let d = Desired {
        generation: 1,
        restart_epoch: 0,
        nodes: [("a".to_owned(), spec("a", 1, true))].into(),
    };
    let found = Found {
        spec: spec("a", 1, true),
        epoch: 0,
        stopped: false,
        restarting: false,
        ended: false,
        recorded: false,
        alive: None,
        strays: vec![
            Stray {
                pid: 11,
                leader: false,
            },
            Stray {
                pid: 10,
                leader: true,
            },
        ],
    };
    let plans = recover(&d, &[("a".to_owned(), found.clone())].into());
    assert_eq!(plans["a"].then, Then::Adopt { pid: 10 });
    assert!(plans["a"].kill.is_empty());
    // Without its leader, the descendants are killed and the node started again.
    let orphaned = Found {
        strays: vec![Stray {
            pid: 11,
            leader: false,
        }],
        ..found.clone()
    };
    let plans = recover(&d, &[("a".to_owned(), orphaned)].into());
    assert_eq!(plans["a"].kill, [11]);
    assert_eq!(plans["a"].then, Then::Start { lost: true });
    // A stray of a node no longer desired is killed with it.
    let plans = recover(
        &Desired::default(),
        &[("a".to_owned(), found.clone())].into(),
    );
    assert_eq!(plans["a"].kill, [11, 10]);
    assert_eq!(plans["a"].then, Then::Remove);
    // A recorded process of a node no longer desired is stopped as the node says.
    let recorded = Found {
        alive: Some(9),
        recorded: true,
        strays: Vec::new(),
        ..found
    };
    let plans = recover(&Desired::default(), &[("a".to_owned(), recorded)].into());
    assert!(plans["a"].kill.is_empty());
    assert_eq!(plans["a"].then, Then::StopAndRemove { pid: 9 });
}

#[test]
fn a_node_that_ended_for_good_stays_so_for_its_spec_only() {
    let d = Desired {
        generation: 2,
        restart_epoch: 0,
        nodes: [("a".to_owned(), spec("a", 1, true))].into(),
    };
    let ended = Found {
        spec: spec("a", 1, true),
        epoch: 0,
        stopped: false,
        restarting: false,
        ended: true,
        recorded: true,
        alive: None,
        strays: Vec::new(),
    };
    let plans = recover(&d, &[("a".to_owned(), ended.clone())].into());
    assert_eq!(plans["a"].then, Then::StayEnded);
    // A new spec starts it, as an Apply would.
    let outdated = Found {
        spec: spec("a", 2, true),
        ..ended.clone()
    };
    let plans = recover(&d, &[("a".to_owned(), outdated)].into());
    assert_eq!(plans["a"].then, Then::Start { lost: true });
    // So does a restart-all that came after it ended.
    let restart_all = Desired {
        restart_epoch: 1,
        ..d.clone()
    };
    let plans = recover(&restart_all, &[("a".to_owned(), ended.clone())].into());
    assert_eq!(plans["a"].then, Then::Start { lost: true });
    // No longer desired: removed.
    let plans = recover(&Desired::default(), &[("a".to_owned(), ended)].into());
    assert_eq!(plans["a"].then, Then::Remove);
}

#[test]
fn waiting_requests_settle_on_a_later_process_only() {
    let seen = |state, has_process, stopping, spawns| {
        Some(Seen {
            state,
            has_process,
            stopping,
            spawns,
        })
    };
    // A start waits for readiness.
    assert_eq!(
        settle(Want::Running, None, seen(State::Pending, true, false, 1)),
        Settled::Pending
    );
    assert_eq!(
        settle(Want::Running, None, seen(State::Running, true, false, 1)),
        Settled::Done
    );
    // A restart does not count the process it is replacing, even while it is running
    // or being stopped.
    assert_eq!(
        settle(Want::Running, Some(1), seen(State::Running, true, false, 1)),
        Settled::Pending
    );
    assert_eq!(
        settle(Want::Running, Some(1), seen(State::Running, true, true, 2)),
        Settled::Pending
    );
    assert_eq!(
        settle(Want::Running, Some(1), seen(State::Running, true, false, 2)),
        Settled::Done
    );
    assert_eq!(
        settle(Want::Running, Some(1), seen(State::Failed, false, false, 1)),
        Settled::Pending
    );
    assert_eq!(
        settle(Want::Running, Some(1), seen(State::Failed, false, false, 3)),
        Settled::Failed
    );
    assert_eq!(
        settle(Want::Running, None, seen(State::Crashed, false, false, 1)),
        Settled::Failed
    );
    // Done for good under a policy that does not restart.
    assert_eq!(
        settle(Want::Running, None, seen(State::Stopped, false, false, 1)),
        Settled::Done
    );
    assert_eq!(settle(Want::Running, None, None), Settled::Removed);
    // A stop waits for the process to be gone; a node removed meanwhile is stopped.
    assert_eq!(
        settle(Want::Stopped, None, seen(State::Running, true, true, 1)),
        Settled::Pending
    );
    assert_eq!(
        settle(Want::Stopped, None, seen(State::Stopped, false, false, 1)),
        Settled::Done
    );
    assert_eq!(settle(Want::Stopped, None, None), Settled::Done);
    // A stop of process 1 is over once process 2 runs (a start came after it).
    assert_eq!(
        settle(Want::Stopped, Some(1), seen(State::Running, true, true, 1)),
        Settled::Pending
    );
    assert_eq!(
        settle(Want::Stopped, Some(1), seen(State::Running, true, false, 2)),
        Settled::Done
    );
}

fn arb_desired(generation: u64) -> impl Strategy<Value = Desired> {
    // Eight possible nodes, each absent or present with one of three specs.
    proptest::collection::vec(proptest::option::of((1u32..4, any::<bool>())), 8).prop_map(
        move |slots| Desired {
            generation,
            restart_epoch: 0,
            nodes: slots
                .into_iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let name = format!("n{i}");
                    s.map(|(v, f)| (name.clone(), spec(&name, v, f)))
                })
                .collect(),
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_applies_cut_anywhere_converge(
        before in arb_desired(1),
        mut after in arb_desired(2),
        stop_mask in any::<u8>(),
        restart_all in any::<bool>(),
        order in proptest::collection::vec(0usize..16, 1..12),
        cut_frac in 0.0f64..1.0,
        cut2 in proptest::option::of(0usize..40),
    ) {
        after.restart_epoch = u64::from(restart_all);
        let stopped = before
            .nodes
            .keys()
            .enumerate()
            .filter(|(i, _)| stop_mask & (1 << i) != 0)
            .map(|(_, n)| n.clone())
            .collect();
        let s = Scenario { before, stopped, after, restart_all, order };
        let w = s.start();
        let n = s.run(&w, usize::MAX, None);
        // Truncation is intended: a cut point among the apply's steps.
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss, reason = "a fraction of a small count")]
        let cut = (cut_frac * n as f64) as usize;
        s.run(&w, cut, cut2);
    }
}

#[test]
fn a_restart_cut_short_is_finished_and_a_stop_wins_over_it() {
    let d = Desired {
        generation: 1,
        restart_epoch: 0,
        nodes: [("a".to_owned(), spec("a", 1, true))].into(),
    };
    let restarting = Found {
        spec: spec("a", 1, true),
        epoch: 0,
        stopped: false,
        restarting: true,
        ended: false,
        recorded: true,
        alive: Some(7),
        strays: Vec::new(),
    };
    let plans = recover(&d, &[("a".to_owned(), restarting.clone())].into());
    assert_eq!(plans["a"].then, Then::Restart { pid: 7 });
    // Its process gone meanwhile: started, as one lost.
    let gone = Found {
        alive: None,
        ..restarting.clone()
    };
    let plans = recover(&d, &[("a".to_owned(), gone)].into());
    assert_eq!(plans["a"].then, Then::Start { lost: true });
    // No longer desired: stopped and removed, not started again.
    let plans = recover(
        &Desired::default(),
        &[("a".to_owned(), restarting.clone())].into(),
    );
    assert_eq!(plans["a"].then, Then::StopAndRemove { pid: 7 });
    // Stopped by an operator after all: stays stopped.
    let stopped = Found {
        stopped: true,
        ..restarting
    };
    let plans = recover(&d, &[("a".to_owned(), stopped)].into());
    assert_eq!(plans["a"].then, Then::Stop { pid: 7 });
}
