//! Applies driven by hand against a table of nodes that the tests carry the steps out
//! on, as the supervisor does; and random sequences of Applies, some failing to be
//! written, checked against what they must leave behind.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use drover_proto::model::Node;
use proptest::prelude::*;

use super::*;
use crate::converge::Restart;

#[derive(Debug, Default, Clone)]
struct Fake {
    applied: u64,
    epoch: u64,
    nodes: BTreeMap<String, (Node, Facts)>,
}

impl Table for Fake {
    fn applied(&self) -> u64 {
        self.applied
    }
    fn restart_epoch(&self) -> u64 {
        self.epoch
    }
    fn specs(&self) -> Vec<(&str, &Node)> {
        self.nodes
            .iter()
            .map(|(n, (s, _))| (n.as_str(), s))
            .collect()
    }
    fn facts(&self, node: &str) -> Option<Facts> {
        self.nodes.get(node).map(|(_, f)| *f)
    }
}

impl Fake {
    /// Carries the steps out as the supervisor does, every node ending with a process
    /// (a removed one is gone at once).
    fn carry(&mut self, c: &CarryOut<u32>) {
        self.applied = c.generation;
        self.epoch = c.restart_epoch;
        for (name, step) in &c.steps {
            let running = Facts {
                has_process: true,
                ..Facts::default()
            };
            match step {
                Step::Remove => {
                    self.nodes.remove(name);
                }
                Step::Keep { retry } => {
                    let f = &mut self.nodes.get_mut(name).expect("kept node exists").1;
                    f.removing = false;
                    if *retry {
                        *f = running;
                    }
                }
                Step::Restart { spec, .. } | Step::Create { spec } => {
                    self.nodes.insert(name.clone(), (spec.clone(), running));
                }
            }
        }
    }
}

fn spec(name: &str, version: u32) -> Node {
    let mut n = Node::new(name, "agent-1");
    n.command = vec!["prog".into(), format!("--version={version}")];
    n
}

fn incoming(generation: u64, nodes: &[(&str, u32)], with: u32) -> Incoming<u32> {
    Incoming {
        generation,
        restart: Restart::default(),
        nodes: nodes
            .iter()
            .map(|(n, v)| ((*n).to_owned(), spec(n, *v)))
            .collect(),
        refused: Vec::new(),
        with,
    }
}

fn write(out: Vec<Out<u32>>) -> Write {
    match <[Out<u32>; 1]>::try_from(out) {
        Ok([Out::Write(w)]) => w,
        Ok([other]) => panic!("expected a write, got {other:?}"),
        Err(out) => panic!("expected one write, got {out:?}"),
    }
}

fn answer(out: Vec<Out<u32>>) -> (u32, Vec<String>) {
    match <[Out<u32>; 1]>::try_from(out) {
        Ok([Out::Answer { with, errors }]) => (with, errors),
        Ok([other]) => panic!("expected an answer, got {other:?}"),
        Err(out) => panic!("expected one answer, got {out:?}"),
    }
}

fn repeat(out: Vec<Out<u32>>) -> u32 {
    match <[Out<u32>; 1]>::try_from(out) {
        Ok([Out::Repeat { with }]) => with,
        Ok([other]) => panic!("expected an answer, got {other:?}"),
        Err(out) => panic!("expected one answer, got {out:?}"),
    }
}

fn carried(w: Written<u32>) -> CarryOut<u32> {
    match w {
        Written::CarryOut(c) => c,
        other => panic!("expected a carry-out, got {other:?}"),
    }
}

const NONE: &BTreeSet<String> = &BTreeSet::new();

fn names(steps: &[(String, Step)]) -> Vec<(&str, &'static str)> {
    steps
        .iter()
        .map(|(n, s)| {
            let kind = match s {
                Step::Remove => "remove",
                Step::Keep { retry: false } => "keep",
                Step::Keep { retry: true } => "retry",
                Step::Restart { renew: false, .. } => "restart",
                Step::Restart { renew: true, .. } => "renew",
                Step::Create { .. } => "create",
            };
            (n.as_str(), kind)
        })
        .collect()
}

#[test]
fn a_first_apply_writes_then_creates_every_node() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    let mut user = spec("b", 1);
    user.user = Some("nobody".into());
    let mut first = incoming(1, &[("a", 1), ("c", 1)], 7);
    first.nodes.insert("b".into(), user);
    let w = write(a.push(first, &t));
    assert_eq!(w.desired.generation, 1);
    assert_eq!(w.desired.restart_epoch, 0);
    assert_eq!(w.create, ["a", "b", "c"]);
    // Only a node with a user, groups or limits has anything to resolve.
    assert_eq!(w.resolve, ["b"]);
    assert!(a.is_writing());
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(c.with, 7);
    assert_eq!(c.generation, 1);
    assert_eq!(
        names(&c.steps),
        [("a", "create"), ("b", "create"), ("c", "create")]
    );
    t.carry(&c);
    assert!(!a.is_writing());
    assert!(a.next(&t).is_empty());
}

#[test]
fn applies_queued_behind_a_write_are_judged_after_it_is_carried_out() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    write(a.push(incoming(2, &[("a", 1)], 1), &t));
    // Behind it: the same generation (a repeat once 2 is applied), an older one, and
    // a newer one.
    assert!(a.push(incoming(2, &[("a", 1)], 2), &t).is_empty());
    assert!(a.push(incoming(1, &[("a", 0)], 3), &t).is_empty());
    assert!(a.push(incoming(3, &[("a", 2)], 4), &t).is_empty());
    let c = carried(a.written(Ok(NONE), &t));
    t.carry(&c);
    let out = a.next(&t);
    assert_eq!(out.len(), 3, "{out:?}");
    let mut out = out.into_iter();
    assert!(matches!(out.next(), Some(Out::Repeat { with: 2 })));
    match out.next() {
        Some(Out::Answer { with: 3, errors }) => assert_eq!(
            errors,
            [
                "deploy generation 1 is older than generation 2, which this agent has applied; nothing changed"
            ]
        ),
        other => panic!("{other:?}"),
    }
    match out.next() {
        Some(Out::Write(w)) => {
            assert_eq!(w.desired.generation, 3);
            assert!(w.create.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!((c.with, names(&c.steps)), (4, vec![("a", "restart")]));
}

#[test]
fn a_repeat_with_restart_all_and_no_since_restarts_everything_under_a_new_epoch() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    write(a.push(incoming(1, &[("a", 1), ("b", 1)], 1), &t));
    t.carry(&carried(a.written(Ok(NONE), &t)));
    // "b" has no process (stopped by an operator, say).
    t.nodes.get_mut("b").unwrap().1.has_process = false;
    let mut again = incoming(1, &[("a", 1), ("b", 1)], 2);
    again.restart = Restart {
        all: true,
        since: 0,
    };
    let w = write(a.push(again, &t));
    assert_eq!(w.desired.restart_epoch, 1);
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(c.restart_epoch, 1);
    assert_eq!(names(&c.steps), [("a", "restart"), ("b", "renew")]);
}

#[test]
fn a_deploy_that_restarts_everything_is_carried_out_once_however_often_it_comes() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    write(a.push(incoming(1, &[("a", 1), ("b", 1)], 1), &t));
    t.carry(&carried(a.written(Ok(NONE), &t)));
    let restart = Restart {
        all: true,
        since: 2,
    };
    let mut first = incoming(2, &[("a", 1), ("b", 1)], 2);
    first.restart = restart;
    let w = write(a.push(first, &t));
    assert_eq!(w.desired.restart_epoch, 1);
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(names(&c.steps), [("a", "restart"), ("b", "restart")]);
    t.carry(&c);
    // Sent again (a reconnect, a retry after a lost answer): a repeat.
    let mut again = incoming(2, &[("a", 1), ("b", 1)], 3);
    again.restart = restart;
    assert_eq!(repeat(a.push(again, &t)), 3);
    // A later deploy that restarts nothing itself carries the same `since`: only the
    // changed node restarts.
    let mut later = incoming(3, &[("a", 2), ("b", 1)], 4);
    later.restart = Restart {
        all: false,
        since: 2,
    };
    write(a.push(later, &t));
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(c.restart_epoch, 1);
    assert_eq!(names(&c.steps), [("b", "keep"), ("a", "restart")]);
}

#[test]
fn an_agent_that_missed_a_restart_of_everything_restarts_everything_when_it_catches_up() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    write(a.push(incoming(1, &[("a", 1), ("b", 1)], 1), &t));
    t.carry(&carried(a.written(Ok(NONE), &t)));
    // Generation 2 restarted everything; this agent never had it. Generation 3, which
    // only changes "a", brings it up to date: "b" restarts too, as it would have then.
    let mut catch_up = incoming(3, &[("a", 2), ("b", 1)], 2);
    catch_up.restart = Restart {
        all: false,
        since: 2,
    };
    let w = write(a.push(catch_up, &t));
    assert_eq!(w.desired.restart_epoch, 1);
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(names(&c.steps), [("a", "restart"), ("b", "restart")]);
}

#[test]
fn a_refused_apply_changes_nothing_and_the_next_one_goes_ahead() {
    let t = Fake::default();
    let mut a = Applies::default();
    let mut bad = incoming(1, &[("a", 1)], 1);
    bad.refused = vec![
        "node 'a': x cannot be enforced".into(),
        "node 'b': y".into(),
    ];
    let (with, errors) = answer(a.push(bad, &t));
    assert_eq!(with, 1);
    assert_eq!(
        errors,
        ["node 'a': x cannot be enforced; node 'b': y; nothing changed"]
    );
    assert!(!a.is_writing());
    let w = write(a.push(incoming(2, &[("a", 1)], 2), &t));
    assert_eq!(w.desired.generation, 2);
}

#[test]
fn a_desired_state_that_cannot_be_written_changes_nothing() {
    let t = Fake::default();
    let mut a = Applies::default();
    write(a.push(incoming(4, &[("a", 1)], 1), &t));
    assert!(a.push(incoming(4, &[("a", 1)], 2), &t).is_empty());
    match a.written(Err("disk full".into()), &t) {
        Written::Failed { with: 1, error } => assert_eq!(error, "disk full"),
        other => panic!("{other:?}"),
    }
    // Generation 4 was not applied: the same generation again is no repeat.
    let w = write(a.next(&t));
    assert_eq!(w.desired.generation, 4);
    assert!(matches!(a.written(Ok(NONE), &t), Written::CarryOut(_)));
    assert!(matches!(a.written(Ok(NONE), &t), Written::Nothing));
}

#[test]
fn generation_zero_changing_nothing_is_answered_at_once_unless_a_node_is_being_removed() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    write(a.push(incoming(0, &[("a", 1)], 1), &t));
    t.carry(&carried(a.written(Ok(NONE), &t)));
    assert_eq!(answer(a.push(incoming(0, &[("a", 1)], 2), &t)), (2, vec![]));
    // A node of an earlier configuration still being stopped: the same configuration
    // again must be carried out, for it keeps that node.
    t.nodes
        .insert("old".into(), (spec("old", 1), Facts::default()));
    t.nodes.get_mut("old").unwrap().1.removing = true;
    let with_old = incoming(0, &[("a", 1), ("old", 1)], 3);
    let w = write(a.push(with_old, &t));
    assert!(w.create.is_empty());
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(names(&c.steps), [("a", "keep"), ("old", "keep")]);
}

#[test]
fn an_unchanged_node_that_could_not_be_resolved_is_resolved_again_and_retried() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    let mut n = spec("a", 1);
    n.user = Some("later".into());
    let mut first = incoming(1, &[], 1);
    first.nodes.insert("a".into(), n.clone());
    first.nodes.insert("b".into(), n.clone());
    first.nodes.insert("c".into(), n.clone());
    write(a.push(first.clone_shape(2), &t));
    t.carry(&carried(a.written(Ok(NONE), &t)));
    let failed = Facts {
        plan_failed: true,
        failed: true,
        ..Facts::default()
    };
    t.nodes.get_mut("a").unwrap().1 = failed;
    t.nodes.get_mut("b").unwrap().1 = failed;
    // "c" could not be resolved but is not FAILED (an operator stopped it): not retried.
    t.nodes.get_mut("c").unwrap().1 = Facts {
        plan_failed: true,
        ..Facts::default()
    };
    let w = write(a.push(first.clone_shape(3).at(2), &t));
    assert_eq!(w.resolve, ["a", "b", "c"]);
    // "a" and "c" resolve now, "b" still does not.
    let resolved: BTreeSet<String> = ["a".to_owned(), "c".to_owned()].into();
    let c = carried(a.written(Ok(&resolved), &t));
    assert_eq!(
        names(&c.steps),
        [("a", "retry"), ("b", "keep"), ("c", "keep")]
    );
}

impl Incoming<u32> {
    fn clone_shape(&self, with: u32) -> Self {
        Incoming {
            generation: self.generation,
            restart: self.restart,
            nodes: self.nodes.clone(),
            refused: self.refused.clone(),
            with,
        }
    }

    fn at(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }
}

#[test]
fn steps_are_decided_against_the_nodes_as_they_are_once_written() {
    let mut t = Fake::default();
    t.nodes
        .insert("gone".into(), (spec("gone", 1), Facts::default()));
    t.nodes.get_mut("gone").unwrap().1.removing = true;
    t.nodes.insert("z".into(), (spec("z", 1), Facts::default()));
    let mut a = Applies::default();
    let w = write(a.push(incoming(1, &[("gone", 1), ("new", 1), ("z", 2)], 1), &t));
    // While it was written, the node being removed stopped and was dropped.
    assert!(w.create == ["new"]);
    t.nodes.remove("gone");
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(
        names(&c.steps),
        [("z", "renew"), ("gone", "create"), ("new", "create")]
    );
}

#[test]
fn steps_come_removals_first_then_kept_changed_and_new_nodes() {
    let mut t = Fake::default();
    let mut a = Applies::default();
    write(a.push(incoming(1, &[("a", 1), ("b", 1), ("c", 1)], 1), &t));
    t.carry(&carried(a.written(Ok(NONE), &t)));
    write(a.push(incoming(2, &[("a", 2), ("c", 1), ("d", 1)], 2), &t));
    let c = carried(a.written(Ok(NONE), &t));
    assert_eq!(
        names(&c.steps),
        [
            ("b", "remove"),
            ("c", "keep"),
            ("a", "restart"),
            ("d", "create")
        ]
    );
}

fn arb_nodes() -> impl Strategy<Value = BTreeMap<String, u32>> {
    proptest::collection::btree_map(
        proptest::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(str::to_owned),
        0u32..3,
        0..5,
    )
}

#[derive(Debug, Clone)]
struct Arrival {
    generation: u64,
    restart: Restart,
    nodes: BTreeMap<String, u32>,
    refused: bool,
    /// Its desired state cannot be written.
    unwritable: bool,
}

fn arb_arrival() -> impl Strategy<Value = Arrival> {
    (0u64..6, any::<bool>(), 0u64..6, arb_nodes(), 0u8..8, 0u8..8).prop_map(
        |(generation, all, since, nodes, refused, unwritable)| Arrival {
            generation,
            restart: Restart { all, since },
            nodes,
            refused: refused == 0,
            unwritable: unwritable == 0,
        },
    )
}

/// A random run: what was pushed, in order, and how each Apply ended.
#[derive(Default)]
struct Run {
    table: Fake,
    applies: Applies<u32>,
    /// Pushed and not yet answered, carried out or being written, in order: each
    /// [`Out`] is for the first of them.
    queued: VecDeque<u32>,
    /// The one being written, and its write.
    writing: Option<(u32, Write)>,
    ended: BTreeMap<u32, &'static str>,
}

impl Run {
    fn take(&mut self, out: Vec<Out<u32>>, arrivals: &[Arrival]) -> Result<(), TestCaseError> {
        for o in out {
            let id = self.queued.pop_front().expect("an Out for a queued Apply");
            match o {
                Out::Answer { with, errors } => {
                    prop_assert_eq!(with, id);
                    // Answered as a success: that generation is the one in effect.
                    let generation = arrivals[id as usize].generation;
                    if errors.is_empty() && generation > 0 {
                        prop_assert_eq!(self.table.applied, generation);
                    }
                    prop_assert!(self.ended.insert(id, "answered").is_none());
                }
                Out::Repeat { with } => {
                    prop_assert_eq!(with, id);
                    // Only the generation in effect repeats.
                    let generation = arrivals[id as usize].generation;
                    prop_assert!(generation > 0);
                    prop_assert_eq!(self.table.applied, generation);
                    prop_assert!(self.ended.insert(id, "repeated").is_none());
                }
                Out::Write(w) => {
                    prop_assert!(
                        self.writing.replace((id, w)).is_none(),
                        "two writes at once"
                    );
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self, arrivals: &[Arrival]) -> Result<(), TestCaseError> {
        let Some((id, w)) = self.writing.take() else {
            return Ok(());
        };
        let x = &arrivals[id as usize];
        let before = self.table.applied;
        if x.unwritable {
            match self
                .applies
                .written(Err("cannot write".into()), &self.table)
            {
                Written::Failed { with, .. } => prop_assert_eq!(with, id),
                other => prop_assert!(false, "{:?}", other),
            }
            prop_assert_eq!(self.table.applied, before);
            self.ended.insert(id, "failed");
        } else {
            let Written::CarryOut(c) = self.applies.written(Ok(&BTreeSet::new()), &self.table)
            else {
                prop_assert!(false, "no carry-out");
                unreachable!()
            };
            prop_assert_eq!(c.with, id);
            prop_assert!(!x.refused);
            prop_assert!(
                c.generation == 0
                    || c.generation > before
                    || (c.generation == before && x.restart.all_given(before))
            );
            if x.restart.all_given(before) {
                let kept = c.steps.iter().any(|(_, s)| matches!(s, Step::Keep { .. }));
                prop_assert!(!kept, "a restart-all kept a node");
            }
            self.table.carry(&c);
            let have: BTreeMap<&str, &Node> = self.table.specs().into_iter().collect();
            let want: BTreeMap<&str, &Node> = w
                .desired
                .nodes
                .iter()
                .map(|(n, s)| (n.as_str(), s))
                .collect();
            prop_assert_eq!(have, want);
            self.ended.insert(id, "carried");
        }
        let out = self.applies.next(&self.table);
        self.take(out, arrivals)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every Apply is answered or carried out exactly once, in arrival order; a refused
    /// one is never carried out; the generation applied never goes back (but for
    /// generation 0); after a carry-out the nodes are exactly its desired ones, each
    /// with its spec; a restart-all keeps no node as it was.
    #[test]
    fn random_applies_leave_exactly_the_desired_nodes(
        arrivals in proptest::collection::vec(arb_arrival(), 1..12),
        writes_between in proptest::collection::vec(any::<bool>(), 12),
    ) {
        let mut run = Run::default();
        for (i, x) in arrivals.iter().enumerate() {
            let id = u32::try_from(i).unwrap();
            let inc = Incoming {
                generation: x.generation,
                restart: x.restart,
                nodes: x.nodes.iter().map(|(n, v)| (n.clone(), spec(n, *v))).collect(),
                refused: if x.refused { vec!["refused".into()] } else { Vec::new() },
                with: id,
            };
            run.queued.push_back(id);
            let out = run.applies.push(inc, &run.table);
            run.take(out, &arrivals)?;
            if writes_between[i] {
                run.finish(&arrivals)?;
            }
        }
        while run.writing.is_some() {
            run.finish(&arrivals)?;
        }
        prop_assert!(run.queued.is_empty());
        prop_assert_eq!(run.ended.len(), arrivals.len());
    }
}
