//! Requests that wait for nodes to settle (a deploy, start, stop, restart): which nodes
//! each one still waits for, what each node's answer is, when the request is answered,
//! and the progress it reports. A pure core, like [`crate::machine`]: the supervisor
//! hands it what it sees of the nodes and of the log keeper's pipes ([`View`]) and the
//! time; it hands back the answers and progress to send. No I/O, no clock.
//!
//! A node found failed is answered with its failed process's outputs: the tails the
//! keeper sent when it closed that process's pipes (see [`crate::keeper`]), waited for
//! up to [`OUTPUT_WAIT_MS`] (the request waits, not the supervisor); without a keeper,
//! or once that wait is over, from the node's log files, which the supervisor reads
//! ([`Step::read_outputs`]) before the answers go out.

use std::collections::BTreeMap;

use drover_proto::model::{MgmtResult, NodeOutputs, ResultData};
use drover_proto::msg::Progress;

use crate::converge::{self, Seen, Settled, Want};
use crate::keeper::PipeEnd;
use crate::machine::Millis;

/// The longest a failed node's outputs wait for the keeper to close its process's
/// pipes (and tell what came through them last) before they are read from its log files.
pub const OUTPUT_WAIT_MS: Millis = 1_000;

/// Lines of each stream a failed node's answer carries at most (as Zeek).
pub const OUTPUT_LINES: usize = 100;

/// What the supervisor tells the core of a node.
pub trait View {
    /// What a waiting request sees of `node`; `None` when it is gone.
    fn seen(&self, node: &str) -> Option<Seen>;
    /// Its state's name, for a request that times out waiting for it.
    fn state_name(&self, node: &str) -> &'static str;
    /// Why it failed, and the pipes of its last process (see [`Failure`]).
    fn failure(&self, node: &str) -> Failure;
    /// Whether the keeper closed pipe `ino`, and what came through it last.
    fn pipe_end(&self, ino: u64) -> PipeEnd;
}

/// What an answer for a failed node says, besides its outputs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Failure {
    /// The error of the answer.
    pub text: String,
    /// Why the agent could not run its program, if it could not: added to its stderr
    /// (an exec error is not in the node's output: the node never ran).
    pub last_error: Option<String>,
    /// The stdout and stderr pipes (inode numbers) of its last process, when it wrote
    /// to pipes read by the keeper.
    pub pipes: Option<[u64; 2]>,
    /// Its last start failed before its program ran (an exec error, a user that does not
    /// exist): it has no output of its own, and an earlier process's is not its.
    pub never_ran: bool,
}

/// One waiting request.
#[derive(Debug)]
struct Wait<T> {
    id: u64,
    /// Node name and the number of processes it must move past (restarts), or None.
    nodes: Vec<(String, Option<u64>)>,
    want: Want,
    /// When the nodes still pending are answered as timed out.
    deadline: Millis,
    /// For requests that report progress: the longest wait between two nodes settling
    /// (the deadline moves on by this whenever one does).
    idle: Option<Millis>,
    results: Vec<MgmtResult>,
    /// Nodes found failed, waiting for their process's outputs: the pipes, and until
    /// when to wait for them.
    failing: BTreeMap<String, ([u64; 2], Millis)>,
    /// Nodes that must be gone before the answer (those an Apply removed, still
    /// stopping); they have no result unless still there at the deadline.
    leaving: Vec<String>,
    /// The requester's handle, given back with the answer.
    handle: T,
}

/// The waiting requests.
#[derive(Debug)]
pub struct Waiters<T> {
    waits: Vec<Wait<T>>,
    next_id: u64,
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Self {
            waits: Vec::new(),
            next_id: 1,
        }
    }
}

/// A node's result whose outputs the supervisor reads from its log files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOutputs {
    /// The request ([`Waiters::add`]'s id).
    pub wait: u64,
    /// The result's place among the request's results.
    pub index: usize,
    /// The node.
    pub node: String,
}

/// What one [`Waiters::settle`] brought.
#[derive(Debug)]
pub struct Step {
    /// Results whose outputs are to be read from the log files now (as the failure
    /// left them), and set with [`Waiters::fill`] before [`Waiters::answers`].
    pub read_outputs: Vec<ReadOutputs>,
    /// Progress to report, by request.
    pub progress: Vec<(u64, Progress)>,
}

impl<T> Waiters<T> {
    /// A request waiting for `nodes` (each with the process count to move past, if
    /// any) to reach `want` until `deadline`; `results` holds what is known already.
    /// Its id.
    pub fn add(
        &mut self,
        nodes: Vec<(String, Option<u64>)>,
        want: Want,
        deadline: Millis,
        idle: Option<Millis>,
        results: Vec<MgmtResult>,
        handle: T,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.waits.push(Wait {
            id,
            nodes,
            want,
            deadline,
            idle,
            results,
            failing: BTreeMap::new(),
            leaving: Vec::new(),
            handle,
        });
        id
    }

    /// Request `wait` is answered only once `nodes` are gone too (see [`Wait::leaving`]).
    pub fn also_gone(&mut self, wait: u64, nodes: Vec<String>) {
        if let Some(w) = self.waits.iter_mut().find(|w| w.id == wait) {
            w.leaving.extend(nodes);
        }
    }

    /// A request that waits for what request `of` still waits for, and is answered as
    /// it will be: with the results it has so far and those to come (an Apply repeated
    /// while the first of its generation still waits for its nodes, say), until
    /// `deadline`. Its id; the handle back when `of` is answered already.
    pub fn add_like(
        &mut self,
        of: u64,
        deadline: Millis,
        idle: Option<Millis>,
        handle: T,
    ) -> Result<u64, T> {
        let Some(w) = self.waits.iter().find(|w| w.id == of) else {
            return Err(handle);
        };
        let (nodes, want, results, failing, leaving) = (
            w.nodes.clone(),
            w.want,
            w.results.clone(),
            w.failing.clone(),
            w.leaving.clone(),
        );
        let id = self.add(nodes, want, deadline, idle, results, handle);
        if let Some(w) = self.waits.last_mut() {
            w.failing = failing;
            w.leaving = leaving;
        }
        Ok(id)
    }

    /// The requester's handle of request `wait`.
    pub fn handle(&self, wait: u64) -> Option<&T> {
        self.waits.iter().find(|w| w.id == wait).map(|w| &w.handle)
    }

    /// When [`Waiters::settle`] next has something to do without news of the nodes.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.waits
            .iter()
            .flat_map(|w| std::iter::once(w.deadline).chain(w.failing.values().map(|f| f.1)))
            .min()
    }

    /// Answers what can be answered at `now` with what `view` shows; the results stay
    /// with their requests until [`Waiters::answers`].
    pub fn settle(&mut self, now: Millis, instance: &str, view: &impl View) -> Step {
        let mut step = Step {
            read_outputs: Vec::new(),
            progress: Vec::new(),
        };
        for w in &mut self.waits {
            let before = w.results.len();
            let mut pending = Vec::new();
            for (name, past) in std::mem::take(&mut w.nodes) {
                let seen = view.seen(&name);
                let verdict = if seen.is_some() && w.failing.contains_key(&name) {
                    // Found failed before: that stands while its outputs come.
                    Settled::Failed
                } else {
                    w.failing.remove(&name);
                    converge::settle(w.want, past, seen)
                };
                let result = match verdict {
                    Settled::Done => MgmtResult::ok("", None),
                    Settled::Removed => MgmtResult::err("", "node was removed"),
                    Settled::Pending => {
                        pending.push((name, past));
                        continue;
                    }
                    Settled::Failed => {
                        let failure = view.failure(&name);
                        // Told once, when it is first found failed: a start that fails
                        // later does not take away the output of the process that did.
                        if failure.never_ran && !w.failing.contains_key(&name) {
                            w.failing.remove(&name);
                            let result = failed(&failure, (String::new(), String::new()));
                            w.results.push(result.on_instance(instance).on_node(&name));
                            continue;
                        }
                        let (pipes, until) = *w.failing.entry(name.clone()).or_insert_with(|| {
                            (failure.pipes.unwrap_or_default(), now + OUTPUT_WAIT_MS)
                        });
                        let ends = (pipes != [0, 0]).then(|| pipes.map(|p| view.pipe_end(p)));
                        let outputs = match ends {
                            Some([PipeEnd::Tail(out), PipeEnd::Tail(err)]) => {
                                Some((last_lines(&out), last_lines(&err)))
                            }
                            Some(ends) if ends.contains(&PipeEnd::Open) && now < until => {
                                pending.push((name, past));
                                continue;
                            }
                            // No keeper, or one that does not tell, or that took too
                            // long: the log files.
                            _ => None,
                        };
                        w.failing.remove(&name);
                        if outputs.is_none() {
                            step.read_outputs.push(ReadOutputs {
                                wait: w.id,
                                index: w.results.len(),
                                node: name.clone(),
                            });
                        }
                        failed(&failure, outputs.unwrap_or_default())
                    }
                };
                w.results.push(result.on_instance(instance).on_node(&name));
            }
            if let Some(idle) = w.idle
                && w.results.len() > before
            {
                w.deadline = w.deadline.max(now + idle);
                step.progress.push((
                    w.id,
                    Progress {
                        done: count(w.results.len()),
                        total: count(w.results.len() + pending.len()),
                    },
                ));
            }
            w.leaving.retain(|name| view.seen(name).is_some());
            if now >= w.deadline {
                for name in w.leaving.drain(..) {
                    let state = view.state_name(&name);
                    let result = MgmtResult::err(
                        "",
                        format!(
                            "timed out waiting for removed node '{name}' to stop (state {state})"
                        ),
                    );
                    w.results.push(result.on_instance(instance).on_node(&name));
                }
                for (name, _) in pending.drain(..) {
                    let result = if w.failing.remove(&name).is_some() {
                        // Failed, its outputs not yet in: those of the log files.
                        step.read_outputs.push(ReadOutputs {
                            wait: w.id,
                            index: w.results.len(),
                            node: name.clone(),
                        });
                        failed(&view.failure(&name), (String::new(), String::new()))
                    } else {
                        let state = view.state_name(&name);
                        MgmtResult::err(
                            "",
                            format!("timed out waiting for node '{name}' (state {state})"),
                        )
                    };
                    w.results.push(result.on_instance(instance).on_node(&name));
                }
            }
            w.nodes = pending;
        }
        step
    }

    /// Sets the outputs of a result listed in [`Step::read_outputs`] (stdout, stderr),
    /// keeping the reason the agent could not run the node at the end of its stderr.
    pub fn fill(&mut self, at: &ReadOutputs, outputs: (String, String)) {
        let Some(r) = self
            .waits
            .iter_mut()
            .find(|w| w.id == at.wait)
            .and_then(|w| w.results.get_mut(at.index))
        else {
            return;
        };
        if let Some(ResultData::NodeOutputs(o)) = &mut r.data {
            let (stdout, stderr) = outputs;
            let exec_error = std::mem::take(&mut o.stderr);
            o.stdout = stdout;
            o.stderr = join_stderr(stderr, &exec_error);
        }
    }

    /// The requests that have all their results, with their handles.
    pub fn answers(&mut self) -> Vec<(T, Vec<MgmtResult>)> {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waits)
            .into_iter()
            .partition(|w| w.nodes.is_empty() && w.leaving.is_empty());
        self.waits = waiting;
        done.into_iter().map(|w| (w.handle, w.results)).collect()
    }

    /// True when no request waits.
    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }
}

/// The answer for a failed node with its `outputs` (stdout, stderr).
fn failed(failure: &Failure, outputs: (String, String)) -> MgmtResult {
    let (stdout, stderr) = outputs;
    let exec_error = failure
        .last_error
        .as_ref()
        .map(|e| format!("drover-agent: {e}"))
        .unwrap_or_default();
    let mut r = MgmtResult::err("", failure.text.clone());
    r.data = Some(ResultData::NodeOutputs(NodeOutputs {
        stdout,
        stderr: join_stderr(stderr, &exec_error),
    }));
    r
}

/// A node's stderr, then the agent's line about why it could not run it, if any.
fn join_stderr(stderr: String, exec_error: &str) -> String {
    match (stderr.is_empty(), exec_error.is_empty()) {
        (_, true) => stderr,
        (true, false) => exec_error.to_owned(),
        (false, false) => format!("{stderr}\n{exec_error}"),
    }
}

/// The last [`OUTPUT_LINES`] lines of `text`, joined by newlines (as the log files'
/// tails are given).
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(OUTPUT_LINES)..].join("\n")
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
