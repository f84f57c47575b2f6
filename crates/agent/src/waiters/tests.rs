//! The waiting requests driven by hand: what the supervisor would show of nodes and
//! pipes over time, and what the requests answer.

use std::collections::BTreeMap;

use drover_proto::model::{MgmtResult, ResultData};

use super::*;
use crate::machine::State;

#[derive(Default)]
struct Fake {
    nodes: BTreeMap<String, Seen>,
    failures: BTreeMap<String, Failure>,
    pipes: BTreeMap<u64, PipeEnd>,
}

impl Fake {
    fn fail(&mut self, name: &str, text: &str, last_error: Option<&str>, pipes: Option<[u64; 2]>) {
        self.failures.insert(
            name.to_owned(),
            Failure {
                text: text.into(),
                last_error: last_error.map(Into::into),
                pipes,
                never_ran: false,
            },
        );
    }

    fn node(&mut self, name: &str, state: State, spawns: u64) {
        let has_process = matches!(state, State::Pending | State::Running);
        self.nodes.insert(
            name.to_owned(),
            Seen {
                state,
                has_process,
                stopping: false,
                spawns,
            },
        );
    }
}

impl View for Fake {
    fn seen(&self, node: &str) -> Option<Seen> {
        self.nodes.get(node).copied()
    }
    fn state_name(&self, node: &str) -> &'static str {
        match self.nodes.get(node).map(|s| s.state) {
            Some(State::Running) => "RUNNING",
            Some(State::Pending) => "PENDING",
            Some(_) => "OTHER",
            None => "gone",
        }
    }
    fn failure(&self, node: &str) -> Failure {
        self.failures.get(node).cloned().unwrap_or_default()
    }
    fn pipe_end(&self, ino: u64) -> PipeEnd {
        self.pipes.get(&ino).cloned().unwrap_or(PipeEnd::Open)
    }
}

fn outputs(r: &MgmtResult) -> (&str, &str) {
    match &r.data {
        Some(ResultData::NodeOutputs(o)) => (o.stdout.as_str(), o.stderr.as_str()),
        other => panic!("no outputs: {other:?}"),
    }
}

fn one(nodes: &[&str], past: Option<u64>) -> Vec<(String, Option<u64>)> {
    nodes.iter().map(|n| ((*n).to_owned(), past)).collect()
}

#[test]
fn a_request_is_answered_once_every_node_settled_and_not_before() {
    let mut v = Fake::default();
    v.node("a", State::Pending, 1);
    v.node("b", State::Pending, 1);
    let mut w = Waiters::default();
    let pre = vec![MgmtResult::err("", "cannot set up node 'c'")];
    w.add(
        one(&["a", "b"], None),
        Want::Running,
        10_000,
        None,
        pre,
        "deploy",
    );
    assert!(w.settle(0, "i", &v).read_outputs.is_empty());
    assert!(w.answers().is_empty());
    v.node("a", State::Running, 1);
    w.settle(10, "i", &v);
    assert!(w.answers().is_empty(), "b is still pending");
    v.nodes.remove("b");
    w.settle(20, "i", &v);
    let answers = w.answers();
    assert_eq!(answers.len(), 1);
    let (handle, results) = &answers[0];
    assert_eq!(*handle, "deploy");
    assert_eq!(results.len(), 3);
    assert!(results[1].success, "{results:?}");
    assert_eq!(results[2].error.as_deref(), Some("node was removed"));
    assert!(w.is_empty());
}

#[test]
fn a_restart_waits_for_a_new_process() {
    let mut v = Fake::default();
    v.node("a", State::Running, 3);
    let mut w = Waiters::default();
    w.add(
        one(&["a"], Some(3)),
        Want::Running,
        10_000,
        None,
        Vec::new(),
        (),
    );
    w.settle(0, "i", &v);
    assert!(w.answers().is_empty(), "still the old process");
    v.node("a", State::Running, 4);
    w.settle(5, "i", &v);
    assert_eq!(w.answers().len(), 1);
}

#[test]
fn a_failed_node_is_answered_with_its_processs_own_tails_once_the_keeper_has_them() {
    let mut v = Fake::default();
    v.node("a", State::Crashed, 1);
    v.fail("a", "failed to start", None, Some([11, 12]));
    let mut w = Waiters::default();
    w.add(
        one(&["a"], None),
        Want::Running,
        10_000,
        None,
        Vec::new(),
        (),
    );
    w.settle(0, "i", &v);
    assert!(w.answers().is_empty(), "its pipes are still open");
    assert_eq!(w.next_deadline(), Some(OUTPUT_WAIT_MS));
    // Meanwhile the node starts again: the request still answers the failure.
    v.node("a", State::Running, 2);
    v.pipes.insert(11, PipeEnd::Tail("one\ntwo\n".into()));
    w.settle(5, "i", &v);
    assert!(w.answers().is_empty(), "stderr is still open");
    v.pipes.insert(12, PipeEnd::Tail("boom\n".into()));
    let step = w.settle(6, "i", &v);
    assert!(step.read_outputs.is_empty());
    let answers = w.answers();
    let r = &answers[0].1[0];
    assert!(!r.success);
    assert_eq!(r.error.as_deref(), Some("failed to start"));
    assert_eq!(outputs(r), ("one\ntwo", "boom"));
}

#[test]
fn outputs_come_from_the_log_files_without_a_keeper_or_after_the_wait() {
    let mut v = Fake::default();
    v.node("a", State::Failed, 1);
    v.node("b", State::Failed, 1);
    v.fail("a", "failed", Some("cannot execute /x: no such file"), None);
    v.fail("b", "failed", None, Some([21, 22]));
    let mut w = Waiters::default();
    let id = w.add(
        one(&["a", "b"], None),
        Want::Running,
        10_000,
        None,
        Vec::new(),
        (),
    );
    let step = w.settle(0, "i", &v);
    assert_eq!(
        step.read_outputs,
        vec![ReadOutputs {
            wait: id,
            index: 0,
            node: "a".into()
        }],
        "no pipes: at once"
    );
    w.fill(&step.read_outputs[0], ("out".into(), "err".into()));
    assert!(
        w.settle(OUTPUT_WAIT_MS - 1, "i", &v)
            .read_outputs
            .is_empty()
    );
    // A keeper that closed one pipe without a tail, the other never: after the wait.
    v.pipes.insert(21, PipeEnd::Closed);
    let step = w.settle(OUTPUT_WAIT_MS, "i", &v);
    assert_eq!(step.read_outputs.len(), 1);
    assert_eq!(step.read_outputs[0].node, "b");
    w.fill(&step.read_outputs[0], (String::new(), "late".into()));
    let answers = w.answers();
    let results = &answers[0].1;
    assert_eq!(
        outputs(&results[0]),
        ("out", "err\ndrover-agent: cannot execute /x: no such file"),
        "the agent's reason stays last"
    );
    assert_eq!(outputs(&results[1]), ("", "late"));
}

#[test]
fn at_its_deadline_a_request_answers_what_is_left() {
    let mut v = Fake::default();
    v.node("slow", State::Pending, 1);
    v.node("failing", State::Crashed, 1);
    v.fail("failing", "crashed", None, Some([1, 2]));
    let mut w = Waiters::default();
    w.add(
        one(&["slow", "failing"], None),
        Want::Running,
        100,
        None,
        Vec::new(),
        (),
    );
    assert!(w.settle(50, "i", &v).read_outputs.is_empty());
    assert_eq!(w.next_deadline(), Some(100));
    let step = w.settle(100, "i", &v);
    assert_eq!(
        step.read_outputs.len(),
        1,
        "the failed node's outputs: the files"
    );
    let answers = w.answers();
    let results = &answers[0].1;
    assert_eq!(
        results[0].error.as_deref(),
        Some("timed out waiting for node 'slow' (state PENDING)")
    );
    assert_eq!(results[1].error.as_deref(), Some("crashed"));
}

#[test]
fn a_failed_node_removed_while_its_outputs_are_awaited_is_answered_as_removed() {
    let mut v = Fake::default();
    v.node("a", State::Crashed, 1);
    v.fail("a", "crashed", None, Some([1, 2]));
    let mut w = Waiters::default();
    w.add(
        one(&["a"], None),
        Want::Running,
        10_000,
        None,
        Vec::new(),
        (),
    );
    w.settle(0, "i", &v);
    assert!(w.answers().is_empty(), "its pipes are open");
    v.nodes.remove("a");
    w.settle(5, "i", &v);
    let answers = w.answers();
    assert_eq!(answers[0].1[0].error.as_deref(), Some("node was removed"));
    assert_eq!(w.next_deadline(), None);
}

#[test]
fn progress_moves_the_deadline_on_as_nodes_settle() {
    let mut v = Fake::default();
    for n in ["a", "b", "c"] {
        v.node(n, State::Pending, 1);
    }
    let mut w = Waiters::default();
    let id = w.add(
        one(&["a", "b", "c"], None),
        Want::Running,
        100,
        Some(100),
        Vec::new(),
        (),
    );
    assert!(w.settle(10, "i", &v).progress.is_empty(), "nothing settled");
    v.node("a", State::Running, 1);
    let step = w.settle(90, "i", &v);
    assert_eq!(step.progress, vec![(id, Progress { done: 1, total: 3 })]);
    assert_eq!(w.next_deadline(), Some(190));
    // Past the first deadline, within the moved one: still waiting.
    w.settle(150, "i", &v);
    assert!(w.answers().is_empty());
    let step = w.settle(190, "i", &v);
    assert!(step.progress.is_empty());
    assert_eq!(w.answers()[0].1.len(), 3);
}

#[test]
fn a_stop_waits_until_no_process_is_left() {
    let mut v = Fake::default();
    v.node("a", State::Running, 1);
    let mut w = Waiters::default();
    w.add(
        one(&["a"], None),
        Want::Stopped,
        1_000,
        None,
        Vec::new(),
        (),
    );
    w.settle(0, "i", &v);
    assert!(w.answers().is_empty());
    v.node("a", State::Stopped, 1);
    w.settle(1, "i", &v);
    assert!(w.answers()[0].1[0].success);
}

#[test]
fn a_tail_longer_than_the_lines_kept_is_cut_to_the_last_ones() {
    let text: String = (0..OUTPUT_LINES + 5)
        .map(|i| format!("line {i}\n"))
        .collect();
    let kept = last_lines(&text);
    assert_eq!(kept.lines().count(), OUTPUT_LINES);
    assert!(kept.starts_with("line 5\n"));
    assert!(kept.ends_with(&format!("line {}", OUTPUT_LINES + 4)));
}

#[test]
fn a_request_added_like_another_is_answered_with_it_and_alike() {
    let mut v = Fake::default();
    v.node("a", State::Pending, 1);
    v.node("b", State::Pending, 1);
    let mut w = Waiters::default();
    let first = w.add(
        one(&["a", "b"], None),
        Want::Running,
        10_000,
        None,
        Vec::new(),
        "first",
    );
    v.node("a", State::Running, 1);
    w.settle(10, "i", &v);
    // Joins once "a" has settled: it still gets its result.
    assert!(w.add_like(first, 10_000, None, "again").is_ok());
    assert!(w.answers().is_empty());
    v.node("b", State::Running, 1);
    w.settle(20, "i", &v);
    let answers = w.answers();
    assert_eq!(answers.len(), 2);
    for (handle, results) in &answers {
        let nodes: Vec<_> = results.iter().map(|r| r.node.as_deref()).collect();
        assert_eq!(nodes, [Some("a"), Some("b")], "{handle}");
        assert!(results.iter().all(|r| r.success), "{handle}: {results:?}");
    }
    // Once the first is answered there is nothing to join.
    assert_eq!(w.add_like(first, 10_000, None, "late"), Err("late"));
    assert!(w.is_empty());
}

#[test]
fn an_apply_is_answered_once_the_nodes_it_removed_are_gone() {
    let mut v = Fake::default();
    v.node("new", State::Running, 1);
    v.node("old", State::Running, 1);
    let mut w: Waiters<u8> = Waiters::default();
    let id = w.add(one(&["new"], None), Want::Running, 100, None, Vec::new(), 1);
    w.also_gone(id, vec!["old".to_owned()]);
    w.settle(10, "i", &v);
    assert!(w.answers().is_empty(), "the removed node still stops");
    v.nodes.remove("old");
    w.settle(20, "i", &v);
    let answers = w.answers();
    assert_eq!(answers.len(), 1);
    // The removed node has no result of its own.
    assert_eq!(answers[0].1.len(), 1);
    assert_eq!(answers[0].1[0].node.as_deref(), Some("new"));

    // Still there at the deadline: an error names it.
    v.node("old", State::Running, 1);
    let id = w.add(one(&["new"], None), Want::Running, 100, None, Vec::new(), 2);
    w.also_gone(id, vec!["old".to_owned()]);
    w.settle(100, "i", &v);
    let answers = w.answers();
    assert_eq!(answers.len(), 1);
    let errors: Vec<_> = answers[0].1.iter().filter(|r| !r.success).collect();
    assert_eq!(errors.len(), 1, "{:?}", answers[0].1);
    assert!(
        errors[0].error.as_deref().is_some_and(
            |e| e.contains("timed out waiting for removed node 'old' to stop (state RUNNING)")
        ),
        "{:?}",
        errors[0]
    );
}
