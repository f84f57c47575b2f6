//! The supervisor: the async shell around the per-node state machines.
//!
//! One task (the actor, [`Supervisor::start`]) owns every node: its [`Machine`] and the
//! process it follows, both in the node's [`Book`] (which decides what each event about
//! the node's processes changes), its logs and its record on disk. It reacts to commands (apply a
//! configuration, stop, start, restart, report), to process exits, to readiness
//! (`READY=1` on the node's `NOTIFY_SOCKET`, a TCP port that accepts, or the start
//! period), and to the one timer it keeps: the earliest deadline any machine asked for.
//! It never polls: with every node running and ready, it sleeps until something happens.
//!
//! # Processes
//!
//! Spawns are carried out by the spawner threads ([`crate::spawner`]), never on this task:
//! the node's machine waits in its spawning phase until the outcome comes back as an
//! event. A node is spawned with `posix_spawn` ([`sys::spawn_clean`]: no `fork`, every signal at
//! its default, an empty mask; a node with its own user, capabilities or limits through a
//! vfork-style clone, see [`crate::exec`]) in its own process group and, where the agent has a
//! cgroup subtree, moved into a cgroup of its own ([`crate::cgroup`]), with a clean
//! environment plus the node's env and `DROVER_NODE`,
//! `DROVER_INSTANCE`, `DROVER_ROLE`, `NOTIFY_SOCKET`, `DROVER_QUERY_SOCKET` and a
//! per-spawn `DROVER_NODE_TOKEN`. CPU affinity is set on the spawning thread just before
//! the spawn and restored right after: a child inherits its parent thread's mask, so it is
//! pinned from its first instruction without forcing a `fork`. stdout and stderr are
//! pipes to the log keeper ([`crate::keeper`]), or, without one, files the node holds
//! itself (see [`crate::logs`]).
//!
//! Stopping sends the stop signal to every process in the node's cgroup, then kills the
//! cgroup after the stop timeout. When the main process has exited, whatever is left of
//! the node is killed too: everything in its cgroup. Without cgroups, the process group
//! (through the leader's pidfd) takes the place of the cgroup, and any process carrying
//! the node's spawn token in its environment among the agent's children (grandchildren
//! that moved to a session of their own, re-parented to the agent) is killed too.
//! An exec error is the node's `last_error` until it next runs.
//!
//! # Applies
//!
//! An Apply carries a deploy generation. What becomes of it is decided by a pure core,
//! [`crate::apply`]: Applies are taken one at a time in arrival order; a repeat of the
//! applied generation changes nothing (unless restart-all), an older one is refused
//! with one error result, generation 0 (a controller without generations) is always
//! carried out. Before any node is touched, the desired state (generation, restart-all
//! epoch, resolved specs) is written to `<state-dir>/desired.json` and synced, on the
//! blocking pool so that the task keeps answering and firing timers meanwhile (a new
//! node's directory and notify socket are made by its first spawn). Then
//! each node's step,
//! from [`converge::diff`] of the specs (not the configuration's id), is carried out
//! here: start, restart, stop and go, or stay untouched.
//!
//! # Records, adoption and recovery
//!
//! Each node has `<state-dir>/nodes/<name>/record.json`: the spec its process runs and
//! that spec's generation, its process (pid and start time, so a recycled pid is never
//! mistaken for it), its spawn token, the restart epoch it started under, whether it was
//! ready, its restart count, and whether an operator stopped it. Before a spawn the
//! record announces the spawn's token (`spawning`); after it, it names the pid.
//!
//! Nodes outlive the agent. A new agent process reads `desired.json` and the records,
//! checks which recorded processes live, looks in `/proc/*/environ` for the tokens of
//! announced but unconfirmed spawns, and carries out [`converge::recover`]: processes
//! running their desired spec are adopted and keep their pids (their exit is learnt
//! through a pidfd, since they are not its children); outdated ones are adopted and
//! restarted; those of nodes no longer desired are stopped and their records removed;
//! desired nodes without a process are started (counted as one restart if a recorded
//! process was lost; its exit status is unknown), except those whose record says their
//! process ended for good under their policy (FAILED, or STOPPED after a successful
//! exit), which stay so for the same spec. A state dir without `desired.json` keeps the
//! nodes of its records.
//!
//! Spawn tokens start with a hash of the state dir. Without cgroups, a starting agent
//! kills every process carrying a token of its state dir that belongs to no live
//! recorded process: what a node left in sessions of its own when it died with the
//! agent, even if its record is gone.
//!
//! # Liveness
//!
//! [`Supervisor::ping`] is a round trip through the task, for the systemd watchdog; a
//! panic of the task is reported by [`Supervisor::failed`], and the agent exits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_proto::config::signal_number;
use drover_proto::model::{self as model, Configuration, MgmtResult, MgmtRole, Node, NodeStatus};
use drover_proto::msg::Progress;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::net::UnixDatagram;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::apply::{self, Applies, CarryOut, Step};
use crate::book::{Book, NOTIFY_QUEUE, Spawned};
use crate::cgroup::{self, CgroupSetting, Cgroups};
use crate::converge::{self, Desired, Found, Restart, Stray, Then, Want};
use crate::keeper::PipeEnd;
use crate::limits::{self, Limits};
use crate::logs::{LogConfig, NodeLogs, Stream};
use crate::machine::{self, Action, Machine, MachineConfig, Millis};
use crate::ops;
use crate::probe;
use crate::sockdir::SocketDirs;
use crate::sys::{self, ProcId};
use crate::waiters::{self, Waiters};

/// How often log sizes are checked for rotation while nodes run.
const ROTATE_EVERY: Duration = Duration::from_secs(30);

/// How often the memory cgroups of running nodes with one are checked for OOM kills of
/// processes other than the main one (which is seen when it ends).
const OOM_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How often a kill that could not be sent is tried again.
const KILL_RETRY: Duration = Duration::from_secs(1);

/// What a stop, start or restart waits beyond its nodes' own timeouts: the kill that
/// follows a stop_timeout and the exit it brings, or a failed start's report.
pub(crate) const SETTLE_GRACE: Duration = Duration::from_secs(2);

/// What a supervisor needs to know.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This agent's instance name.
    pub instance: String,
    /// The agent's state dir; nodes live under `<state_dir>/nodes`.
    pub state_dir: PathBuf,
    /// Log rotation.
    pub logs: LogConfig,
    /// Where nodes' cgroups go (see [`crate::cgroup`]).
    pub cgroup: CgroupSetting,
    /// The log keeper new processes' output goes to through pipes; without one they
    /// write their log files themselves (see [`crate::keeper`]).
    pub keeper: Option<crate::keeper::Keeper>,
    /// How long a removed node's directory is kept before it is deleted; kept for good
    /// when `None` (see [`crate::prune`]).
    pub removed_node_retention: Option<Duration>,
}

/// The answer to a request the supervisor task ended before answering: an error about
/// the agent, not a node, so that an Apply answered so is not taken as applied (and an
/// empty answer is not taken as success).
fn unanswered(what: &str) -> Vec<MgmtResult> {
    vec![MgmtResult::err(
        "",
        format!("the agent's supervisor ended before it answered {what}"),
    )]
}

/// A handle to the supervisor task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Command>,
    /// Bumped on every node state change, for status reporting.
    changes: watch::Receiver<u64>,
    /// Bumped when requests waiting for nodes were answered, so that the controller
    /// learns of the nodes' states with the answer, not a report interval later.
    answered: watch::Receiver<u64>,
    /// The deploy generation applied.
    applied: watch::Receiver<u64>,
    /// True while the agent stands by (see [`Supervisor::stand_by`]), for metrics.
    standby: watch::Receiver<bool>,
    /// Set when the supervisor task ended other than by [`Supervisor::shutdown`]: a
    /// panic.
    failure: watch::Receiver<Option<String>>,
    /// What the host's cgroups enforce and account (see [`crate::limits`]).
    host: std::sync::Arc<limits::Host>,
    /// The directories of adopted nodes whose process writes its log files itself.
    direct_log_writers: std::sync::Arc<Vec<PathBuf>>,
    /// See [`Core::log_watch`].
    log_watch: std::sync::Arc<std::sync::OnceLock<crate::logwatch::Adder>>,
}

#[derive(Debug)]
enum Command {
    Apply {
        config: Box<Configuration>,
        restart: Restart,
        generation: u64,
        deadline: Instant,
        progress: Option<ProgressTo>,
        reply: oneshot::Sender<Vec<MgmtResult>>,
    },
    Act {
        op: Op,
        nodes: Vec<String>,
        deadline: Instant,
        cap: Instant,
        reply: oneshot::Sender<Vec<MgmtResult>>,
    },
    Status {
        reply: oneshot::Sender<Vec<NodeStatus>>,
    },
    Changes {
        full: bool,
        reply: oneshot::Sender<(bool, Vec<NodeStatus>)>,
    },
    Logs {
        node: String,
        reply: oneshot::Sender<Option<(NodeLogs, Option<[crate::logs::Mark; 2]>)>>,
    },
    Queryable {
        nodes: Vec<String>,
        reply: oneshot::Sender<Vec<(String, Result<PathBuf, String>)>>,
    },
    Shutdown {
        stop_nodes: bool,
        reply: oneshot::Sender<()>,
    },
    /// The controller refused this agent because another live process holds its
    /// identity: stop every node as an exit with `--on-exit stop` would, leaving each
    /// desired to run, until [`Command::Resume`]. Answered with whether the agent was
    /// not standing by already.
    StandBy { reply: oneshot::Sender<bool> },
    /// The controller accepted this agent: start again the nodes [`Command::StandBy`]
    /// stopped. Answered with whether it was standing by.
    Resume { reply: oneshot::Sender<bool> },
    /// The state dir was removed or replaced under the agent: every node's directory
    /// and notify socket are made again and every record written anew.
    /// Answered with the nodes that could not be restored, and why.
    Restore {
        reply: oneshot::Sender<Vec<(String, String)>>,
    },
    /// Answered at once: the task is alive and not stuck; left unanswered when the
    /// spawner has had spawns waiting for longer than `patience` without finishing one.
    Ping {
        patience: Duration,
        reply: oneshot::Sender<()>,
    },
    /// Panics the task, to test what follows.
    #[cfg(test)]
    Panic,
    /// Blocks the supervisor task's thread this long, as a stuck system call would.
    #[cfg(test)]
    Stall(Duration),
}

pub use crate::ops::Op;

/// A deploy's answer for a node it would start while the agent stands by: not applied
/// yet, so the deploy is not taken as done (it stays the desired state, and the agent
/// starts the node once it holds its connection past the grace).
fn not_started_standing_by(instance: &str, node: &str) -> MgmtResult {
    MgmtResult::err(
        "",
        "not started: this agent stands by (another process with its certificate ran its \
         nodes when it connected); it starts the node once it has held its connection for a \
         grace"
            .to_owned(),
    )
    .on_instance(instance)
    .on_node(node)
}

/// Why an operator's action is refused while the agent stands by.
const STANDING_BY: &str = "this agent stands by (another process with its certificate ran its nodes when it connected): its nodes are stopped, and it acts on none until it has held its connection for a grace; try again then";

#[derive(Debug)]
enum Event {
    Exited {
        node: String,
        generation: u64,
        exit: machine::ExitStatus,
        /// OOM kills in the node's memory cgroup while the process ran (read by the
        /// task that waited for the exit, not by the supervisor's).
        oom: u64,
    },
    Ready {
        node: String,
        generation: u64,
    },
    /// The memory cgroup of the node's process of this generation, still running, has
    /// seen `oom` OOM kills since it started.
    OomWhileRunning {
        node: String,
        generation: u64,
        oom: u64,
    },
    Notify {
        node: String,
        text: String,
        /// Who sent it (see [`probe::Sender`]).
        sender: probe::Sender,
        /// One of the node's [`NOTIFY_QUEUE`] places in the queue, given back when the
        /// event has been handled.
        _queued: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// A liveness check of the process of this generation failed.
    Unhealthy {
        node: String,
        generation: u64,
        reason: String,
    },
    /// The desired state of the Apply in [`Core::writing`] is on disk and the exec
    /// settings of the nodes it starts are resolved, or it could not be written.
    DesiredWritten(Result<Plans, String>),
    /// What [`Command::Restore`] made again, off this task, and whom to tell.
    Restored(Prepared, oneshot::Sender<Vec<(String, String)>>),
    /// The spawner carried out a spawn.
    Spawned(Box<crate::spawner::Outcome>),
    /// The exec settings of a node whose last lookup failed were looked up again, off
    /// this task, for the spawn `job` (sent to the spawner once they resolve).
    LookedUp(
        Box<(
            crate::spawner::Job,
            Result<std::sync::Arc<crate::exec::Plan>, String>,
        )>,
    ),
    /// The log keeper closed a pipe (a waiter may want what came through it last).
    OutputClosed,
    /// The node directories, listed for pruning (see [`crate::prune`]).
    Scanned(crate::prune::Scan),
}

/// The resolved identity, capabilities and limits of the nodes an Apply starts or
/// restarts (see [`crate::exec`]), or why a node cannot have them.
type Plans = BTreeMap<String, Result<std::sync::Arc<crate::exec::Plan>, String>>;

/// A new node's name, directory and working directory to make before its first spawn.
type PrepareJob = (String, PathBuf, Option<PathBuf>);

/// What was made for new nodes (their bound notify sockets and where their log files
/// ended), or why it could not be, by name.
type Prepared = BTreeMap<String, std::io::Result<crate::spawner::Made>>;

/// Who asked for an Apply, handed to [`crate::apply`] and back with its answer or
/// its carry-out.
#[derive(Debug)]
struct Requested {
    config_id: String,
    deadline: Instant,
    progress: Option<ProgressTo>,
    reply: oneshot::Sender<Vec<MgmtResult>>,
}

/// Where an Apply that reports progress sends it, and how long it may go without any:
/// its wait for nodes ends `idle` after the last node settled, not at a fixed deadline,
/// so a deploy of thousands of nodes never times out while it is getting somewhere.
#[derive(Debug)]
pub struct ProgressTo {
    /// The latest count; a watch, so a slow reader costs nothing but skipped counts.
    pub tx: watch::Sender<Progress>,
    /// The longest wait between two nodes settling.
    pub idle: Duration,
}

/// The spec, restart epoch and deploy generation of a spawn handed to the spawner.
#[derive(Debug, Clone)]
struct SpawnOf {
    spec: Node,
    epoch: u64,
    deploy_gen: u64,
}

/// The record of a node on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The spec its process runs; with no process, the spec it is to run.
    spec: Node,
    #[serde(default)]
    config_id: String,
    /// The deploy generation of `spec`.
    #[serde(default)]
    generation: u64,
    /// The restart epoch (see [`Desired::restart_epoch`]) its process started under.
    #[serde(default)]
    epoch: u64,
    /// The spawn token of a spawn that is about to happen or happened unrecorded: a
    /// process carrying it in its environment belongs to this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spawning: Option<u64>,
    #[serde(default)]
    process: Option<RecordedProcess>,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    restarts: u64,
    /// An operator stopped it: it stays stopped across agent restarts.
    #[serde(default)]
    stopped: bool,
    /// An operator's restart of it is under way (its process told to stop, to be
    /// started again): a later agent process finishes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    restarting: bool,
    /// Its process ended for good under its restart policy: it stays so across agent
    /// restarts, until an operator or a new spec starts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ended: Option<Ended>,
    /// How its last process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_exit: Option<model::ExitStatus>,
    /// Its process crashed and it waits out its backoff: the start a later agent
    /// process gives it is that restart, and counts as one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    restart_due: bool,
    /// When that restart is due (Unix ms), and the failures in a row so far: a later
    /// agent process goes on with the same backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restart_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    failures: u32,
    /// Why its last start failed, until it next runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    /// Why its process last ended unasked (OOM kill, liveness), and how often each: what
    /// status and metrics show is kept across agent restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_failure: Option<String>,
    /// Its last start failed for want of its user, groups or other exec settings: the
    /// next deploy looks them up again and starts it, also under a later agent process.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    plan_failed: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    oom_kills: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    liveness_failures: u32,
    /// The last `STATUS=` its process sent: what `status` shows of it is kept across
    /// agent restarts, as long as that process runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status_text: Option<String>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How a node's process ended for good (see [`Record::ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ended {
    /// It failed and its policy gave up: FAILED.
    Failed,
    /// It exited successfully under a policy that restarts only failures: STOPPED.
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordedProcess {
    pid: i32,
    start_ticks: u64,
    started_at_ms: u64,
    token: u64,
    /// The node's cgroup, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cgroup: Option<PathBuf>,
    /// The boot it was started in ([`sys::boot_id`]): after a reboot, its pid and start
    /// time may name another program's process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot: Option<String>,
}

impl RecordedProcess {
    /// Whether the process still runs: of this boot (a record without a boot, from an
    /// older agent, is taken to be), and its pid has its start time.
    fn alive(&self) -> bool {
        let this_boot = match (&self.boot, sys::boot_id()) {
            (Some(then), Some(now)) => then == now,
            _ => true,
        };
        this_boot
            && sys::is_alive(ProcId {
                pid: self.pid,
                start_ticks: self.start_ticks,
            })
    }
}

/// A live process of a node.
#[derive(Debug)]
struct Proc {
    id: ProcId,
    token: u64,
    /// The spec it runs, its deploy generation and the restart epoch it started under.
    spec: Node,
    deploy_gen: u64,
    epoch: u64,
    started_at_ms: u64,
    /// Aborts the readiness probe, if one runs.
    probe: Option<tokio::task::AbortHandle>,
    /// True when this agent spawned it (and reaps it through its pidfd); false when
    /// adopted.
    child: bool,
    /// The node's cgroup, when it has one: every process of the node is in it.
    cgroup: Option<PathBuf>,
    /// A pidfd of the process, to signal its process group when it has no cgroup.
    pidfd: Option<sys::PidFd>,
    /// OOM kills in the node's memory cgroup when it started.
    oom_base: Option<u64>,
    /// Its watchdog and liveness probe, once it is ready.
    monitors: Option<probe::Monitors>,
}

#[derive(Debug)]
struct Entry {
    spec: Node,
    config_id: String,
    /// The node's machine, the process it follows and what status shows of its past
    /// (see [`crate::book`]).
    book: Book<Proc, probe::Sender>,
    logs: NodeLogs,
    dir: PathBuf,
    /// The deploy generation of `spec`.
    deploy_gen: u64,
    /// What the spawn under way runs: until its outcome is in, the record names this
    /// spec (an Apply may have changed `spec` meanwhile), for the process carrying the
    /// token runs it.
    spawn_of: Option<SpawnOf>,
    /// Restarts counted before this agent process (from the record).
    restarts_base: u64,
    stopped_by_operator: bool,
    /// Stopped because the agent is exiting (`--on-exit stop`): desired to run still, so
    /// its record does not say it ended, and the next agent process starts it again.
    stopped_with_agent: bool,
    /// Remove the node once it has stopped (it left the configuration).
    removing: bool,
    notify_task: Option<tokio::task::AbortHandle>,
    /// What its child applies before exec, once resolved for `spec` (or why it cannot).
    plan: Option<Result<std::sync::Arc<crate::exec::Plan>, String>>,
    /// An earlier agent process could not resolve its exec settings, and it has not run
    /// since (see [`Record::plan_failed`]).
    plan_failed_before: bool,
    /// The record as last written: an unchanged record is not written again (a deploy
    /// would otherwise write each new node's record three times, and file creation and
    /// renames are most of the agent's cost per spawned node).
    written: Vec<u8>,
    /// The stdout and stderr pipes (inode numbers) of its last process this agent
    /// spawned with a log keeper, for that process's last words should it fail.
    last_pipes: Option<[u64; 2]>,
    /// Its last start failed before its program ran: a failure's answer carries no
    /// output (see [`waiters::Failure::never_ran`]).
    start_failed: bool,
    /// Its directory and notify socket are still to be made, by its next
    /// spawn (see [`crate::spawner::Fresh`]).
    fresh: bool,
    /// Where its log files ended when this agent process made the node: a follow of
    /// its output since it was first started begins there (see
    /// [`crate::logs::NodeLogs::follow_from`]). Unknown for an adopted node.
    output_marks: Option<[crate::logs::Mark; 2]>,
    /// When this agent process sent the stop signal to its process (epoch ms), so that
    /// status shows a stop under way; cleared by the next state change (the process
    /// is gone by then).
    stop_sent_ms: Option<u64>,
}

impl Entry {
    fn restarts(&self) -> u64 {
        self.restarts_base + self.book.machine.restart_count()
    }

    /// The followed process.
    fn proc(&self) -> Option<&Proc> {
        self.book.process()
    }

    /// Its last start failed for want of its exec settings (in this agent process or
    /// an earlier one), and nothing started it since.
    fn plan_failed(&self) -> bool {
        matches!(self.plan, Some(Err(_))) || self.plan_failed_before
    }
}

/// Who waits for nodes to settle (see [`crate::waiters`]): where the answer goes, and
/// the progress, for requests that report it.
#[derive(Debug)]
struct Requester {
    reply: oneshot::Sender<Vec<MgmtResult>>,
    progress: Option<watch::Sender<Progress>>,
}

/// The Apply last carried out (see [`Core::repeat`]).
#[derive(Debug)]
struct LastApply {
    generation: u64,
    /// Its waiter, while it waits.
    wait: u64,
    /// The nodes it started or changed, which its answer is about.
    nodes: Vec<String>,
    /// Its answers known at once (nodes it could not set up).
    errors: Vec<MgmtResult>,
}

struct Core {
    cfg: SupervisorConfig,
    nodes_dir: PathBuf,
    /// The directory through which each node's sockets are reached: its own, or a
    /// short link to it when the path would be too long ([`crate::sockdir`]).
    socks: SocketDirs,
    epoch: Instant,
    nodes: BTreeMap<String, Entry>,
    waiters: Waiters<Requester>,
    events: mpsc::UnboundedSender<Event>,
    changes: watch::Sender<u64>,
    /// See [`Supervisor::answered`].
    answered: watch::Sender<u64>,
    /// The deploy generation applied, and the restart epoch of the desired state.
    applied: watch::Sender<u64>,
    restart_epoch: u64,
    /// True while the agent stands by ([`Command::StandBy`]): an Apply under way when
    /// it began must not start its nodes either.
    standby: watch::Sender<bool>,
    /// Applies in arrival order, carried out one at a time, and the one whose desired
    /// state is being written (off this task: it is synced).
    applies: Applies<Requested>,
    /// The Apply last carried out, which a repeat of its generation joins while it
    /// waits, and is answered like once it is done.
    last_apply: Option<LastApply>,
    next_token: u64,
    shutdown: Option<(Instant, oneshot::Sender<()>)>,
    /// An exit happened: look for orphaned descendants once the burst is handled.
    sweep_pending: bool,
    /// Nodes whose kill could not be sent (out of file descriptors, say), and when to
    /// try again: the machine sends its `Kill` once and then waits for the exit, which
    /// would never come.
    /// The process each was to end: a node's next process is not killed for it.
    kill_retry: Option<(Instant, BTreeMap<String, ProcId>)>,
    /// The first scan for pruning was handled: later ones find this process's own
    /// deletions under way among the leftovers, and leave them to it.
    pruned_once: bool,
    /// Nodes whose status changed since [`Command::Changes`] last asked, so that a
    /// status report carries those alone.
    changed: BTreeSet<String>,
    /// A node was added or removed since then: the next report must be a full one.
    membership_changed: bool,
    /// The agent's cgroup subtree; `None` when nodes are contained by process group
    /// and spawn token only.
    cgroups: Option<Cgroups>,
    /// What marks this agent's exec probe runs (see [`probe::kill_orphans`]): its
    /// instance and state dir, as its cgroup subtree's name.
    probe_owner: String,
    /// The agent stops its nodes on shutdown: remove its cgroup subtree at the end.
    release_cgroups: bool,
    /// What the host's cgroups enforce and account (see [`crate::limits`]).
    host: std::sync::Arc<limits::Host>,
    /// Spawns go to the spawner threads, so that this task never blocks on one.
    /// Unbounded, but bounded by construction: a node has at most one spawn queued.
    spawner: std::sync::mpsc::Sender<crate::spawner::Job>,
    /// Children the spawner made that this task has not taken over yet: the orphan
    /// reaper leaves them alone.
    in_flight: crate::spawner::InFlight,
    /// Shared with the spawners, which write the records announcing spawns: see
    /// [`crate::records`].
    records: std::sync::Arc<crate::records::Records>,
    /// The sequence number of the last record made.
    record_seq: u64,
    /// Set once the agent's log watcher runs: with a log keeper it watches only nodes
    /// that write their files themselves, and a node started while no keeper answers
    /// is one (see [`crate::keeper::Keeper::available`]).
    log_watch: std::sync::Arc<std::sync::OnceLock<crate::logwatch::Adder>>,
    /// A reap was skipped while the spawner was spawning: do it once the spawn is in.
    reap_pending: bool,
    /// Spawns handed to the spawner whose outcome has not come back.
    spawns_waiting: usize,
    /// When the spawner last finished a spawn, or was handed one with none waiting: a
    /// spawner stuck for the stall timeout ends the agent as a stuck task does.
    spawner_moved: Instant,
}

/// A node count for [`Progress`].
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn machine_config(n: &Node) -> MachineConfig {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    MachineConfig {
        restart: match n.restart {
            model::RestartPolicy::Never => machine::RestartPolicy::Never,
            model::RestartPolicy::OnFailure => machine::RestartPolicy::OnFailure,
            model::RestartPolicy::Always => machine::RestartPolicy::Always,
        },
        backoff_initial_ms: ms(n.backoff.initial),
        backoff_multiplier: n.backoff.multiplier,
        backoff_max_ms: ms(n.backoff.max),
        reset_after_ms: ms(n.backoff.reset_after),
        max_failed_starts: n.max_failed_starts,
        success_exit_codes: n.success_exit_codes.clone(),
        readiness: match &n.readiness {
            model::Readiness::StartPeriod { period } => {
                machine::Readiness::StartPeriod { ms: ms(*period) }
            }
            model::Readiness::Notify { timeout } => machine::Readiness::Notify {
                timeout_ms: ms(*timeout),
            },
            model::Readiness::Tcp { timeout, .. } => machine::Readiness::Tcp {
                timeout_ms: ms(*timeout),
            },
        },
        stop_timeout_ms: ms(n.stop_timeout),
    }
}

fn to_model_state(s: machine::State) -> model::State {
    match s {
        machine::State::Pending => model::State::Pending,
        machine::State::Running => model::State::Running,
        machine::State::Stopped => model::State::Stopped,
        machine::State::Crashed => model::State::Crashed,
        machine::State::Failed => model::State::Failed,
    }
}

/// Creates a node's directory, for the agent and the node only (its sockets and
/// records are there).
pub(crate) fn make_node_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        // The umask can only have taken bits away.
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// A node's notify socket in `dir` (as [`crate::sockdir`] names it).
pub(crate) fn notify_path(dir: &Path) -> PathBuf {
    dir.join("notify.sock")
}

/// A notify socket the log keeper held for a node, if it is still the one its path
/// names (the path is there and the socket is bound to it); otherwise the node gets a
/// new one.
fn still_bound(fd: std::os::fd::OwnedFd, path: &Path) -> Option<std::os::unix::net::UnixDatagram> {
    use std::os::unix::fs::FileTypeExt as _;
    let sock = std::os::unix::net::UnixDatagram::from(fd);
    let addr = sock.local_addr().ok()?;
    let there = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    (there && addr.as_pathname() == Some(path)).then_some(())?;
    // A live socket answers there: with this agent just started and the last one gone,
    // only the keeper's can (a socket bound there later by an agent that died before
    // handing it over is dead, and the node gets a new one).
    std::os::unix::net::UnixDatagram::unbound()
        .and_then(|probe| probe.connect(path))
        .ok()?;
    sock.set_nonblocking(true).ok()?;
    Some(sock)
}

/// What the log keeper heard on a node's notify socket, as the datagram it was.
fn heard_event(node: &str, h: crate::keeper::notify::Heard) -> Event {
    Event::Notify {
        node: node.to_owned(),
        text: h.text,
        sender: probe::Sender {
            pid: h.pid,
            cgroup: h.cgroup,
        },
        _queued: None,
    }
}

/// Binds a node's notify socket in `dir` (as [`crate::sockdir`] names it), replacing a
/// stale one.
pub(crate) fn bind_notify(dir: &Path) -> std::io::Result<std::os::unix::net::UnixDatagram> {
    let path = notify_path(dir);
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Writes a record over the previous one. A record of up to [`IN_PLACE_MAX`] bytes
/// (most: a spec without large `files`) is written in place, one `write` at offset 0,
/// then the file is cut to length: a temp file and a rename would allocate a new inode
/// each time, and ext4's inode allocator made that most of the agent's work when 500
/// nodes stop at once. A write within one page is not torn by a kill; if the agent dies
/// between the write and the cut, a shorter record is followed by the old one's tail,
/// which [`read_record`] ignores. A larger record could be torn between pages, so it
/// goes through a temp file and a rename. No fsync: a record only matters while its
/// process lives, and no process survives a power loss.
pub(crate) fn write_record(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if bytes.len() > IN_PLACE_MAX {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        return std::fs::rename(&tmp, path);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)
}

/// Writes the desired state: a temp file renamed over the old one, so that an agent
/// killed at any moment finds the old state or the new one, whole. It is not synced
/// here: what an agent acts on must survive the agent, which the page cache does; only a
/// host crash could lose it, and that ends the nodes too, while the controller (which
/// syncs its own record before telling agents) brings the agent back to it on reconnect.
/// [`sync_desired`] makes it durable afterwards, off the path to the first spawn.
fn write_desired(path: &Path, desired: &Desired) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = serde_json::to_vec(desired).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    // Each error names the file it is about: the temp file, or the rename into place.
    let at = |e: std::io::Error, what: &Path| {
        std::io::Error::new(e.kind(), format!("{}: {e}", what.display()))
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| at(e, &tmp))?;
    let placed = f.write_all(&bytes).map_err(|e| at(e, &tmp)).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("renaming {} to {}: {e}", tmp.display(), path.display()),
            )
        })
    });
    drop(f);
    if placed.is_err() {
        // On a full disk the partial file holds what space there was, which the nodes'
        // logs and records need.
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

/// Syncs the desired state [`write_desired`] wrote, and its directory.
fn sync_desired(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads the desired state, if an Apply ever wrote one.
fn read_desired(path: &Path) -> Result<Option<Desired>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: not a valid desired state: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The largest record written in place: one page, the unit a kill cannot cut.
const IN_PLACE_MAX: usize = 4096;

/// Reads the record `write_record` wrote: the first JSON value in the file.
fn read_record(bytes: &[u8]) -> Result<Record, serde_json::Error> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Record>()
        .next()
        .unwrap_or_else(|| Err(serde::de::Error::custom("empty record")))
}

/// Fills in RSS and CPU time from `/proc` for statuses with a process, and the memory
/// and CPU time of their cgroups where these account them.
fn add_usage(statuses: &mut [NodeStatus], host: &limits::Host) {
    for s in statuses
        .iter_mut()
        .filter(|s| s.mgmt_role == MgmtRole::None && s.pid.is_some())
    {
        (s.memory_bytes, s.cgroup_cpu_ms) = host.usage(&s.node);
        s.cgroup_cpu_ms = s.cgroup_cpu_ms.map(|us| us / 1000);
    }
    for s in statuses {
        if let Some(st) = s
            .pid
            .and_then(|p| i32::try_from(p).ok())
            .and_then(|p| sys::proc_stat(p).ok())
        {
            s.rss_bytes = Some(sys::rss_bytes(&st));
            s.cpu_ms = Some(sys::cpu_ms(&st));
        }
    }
}

impl Supervisor {
    /// Starts the supervisor task: adopts or restarts the nodes recorded in the state dir,
    /// then serves commands.
    pub fn start(mut cfg: SupervisorConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        // Nodes run in their own working directories and get socket paths in their
        // environment: those paths must be absolute.
        cfg.state_dir = std::fs::canonicalize(&cfg.state_dir)?;
        let nodes_dir = cfg.state_dir.join("nodes");
        std::fs::create_dir_all(&nodes_dir)?;
        let socks = SocketDirs::new(&nodes_dir)?;
        if let Err(e) = sys::set_child_subreaper() {
            warn!(
                "cannot become a child subreaper ({e}); orphaned grandchildren of nodes go to init"
            );
        }
        let unignored = sys::unignore_inherited_signals();
        if !unignored.is_empty() {
            debug!(
                ?unignored,
                "signals inherited as ignored are reset for the nodes"
            );
        }
        let cgroups = match Cgroups::setup(&cfg.cgroup, &cfg.instance, &cfg.state_dir) {
            Ok(c) => c,
            Err(e) if matches!(cfg.cgroup, CgroupSetting::Path(_)) => {
                return Err(std::io::Error::other(e));
            }
            Err(e) => {
                warn!(
                    "no cgroup for the nodes ({e}); descendants that leave a node's process group are found by spawn token only while this agent runs"
                );
                None
            }
        };
        if let Some(c) = &cgroups {
            info!(cgroup = %c.root().display(), "nodes are contained in cgroups");
        }
        let identity = cgroup::subtree_name(&cfg.instance, &cfg.state_dir);
        let host = std::sync::Arc::new(limits::Host::discover(cgroups.as_ref(), &identity));
        info!(controllers = %host.describe(), "cgroup controllers for node limits");
        let _ = limits::HOST.set(host.clone());
        let (tx, rx) = mpsc::channel(256);
        // Unbounded, but bounded by construction: each process sends at most one Exited
        // and one Ready, its pipes one OutputClosed each, and each node at most
        // NOTIFY_QUEUE Notify at a time.
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        if let Some(k) = &cfg.keeper {
            let closed_to = events_tx.clone();
            k.on_closed(move || {
                let _ = closed_to.send(Event::OutputClosed);
            });
        }
        let (changes_tx, changes_rx) = watch::channel(0);
        let (answered_tx, answered_rx) = watch::channel(0);
        let (applied_tx, applied_rx) = watch::channel(0);
        let (standby_tx, standby_rx) = watch::channel(false);
        let state_dir_for_tokens = cfg.state_dir.clone();
        let in_flight = crate::spawner::InFlight::default();
        let records = std::sync::Arc::new(crate::records::Records::default());
        let (spawner, jobs) = std::sync::mpsc::channel();
        let spawned_to = events_tx.clone();
        crate::spawner::start(
            crate::spawner::Context {
                cgroups: cgroups.clone(),
                host: host.clone(),
                in_flight: in_flight.clone(),
                keeper: cfg.keeper.clone(),
                records: records.clone(),
            },
            jobs,
            move |outcome| {
                let _ = spawned_to.send(Event::Spawned(Box::new(outcome)));
            },
        )?;
        let mut core = Core {
            cfg,
            nodes_dir,
            socks,
            epoch: Instant::now(),
            nodes: BTreeMap::new(),
            waiters: Waiters::default(),
            events: events_tx,
            changes: changes_tx,
            answered: answered_tx,
            applied: applied_tx,
            restart_epoch: 0,
            standby: standby_tx,
            applies: Applies::default(),
            last_apply: None,
            next_token: token_prefix(&state_dir_for_tokens) << 32 | u64::from(rand_u32()),
            shutdown: None,
            sweep_pending: false,
            kill_retry: None,
            pruned_once: false,
            changed: BTreeSet::new(),
            membership_changed: true,
            cgroups,
            probe_owner: identity,
            release_cgroups: false,
            host: host.clone(),
            spawner,
            in_flight,
            reap_pending: false,
            spawns_waiting: 0,
            spawner_moved: Instant::now(),
            records,
            record_seq: 0,
            log_watch: std::sync::Arc::default(),
        };
        let log_watch = core.log_watch.clone();
        core.recover();
        let direct_log_writers = std::sync::Arc::new(core.direct_log_writers());
        let task = tokio::spawn(core.run(rx, events_rx));
        let (failure_tx, failure_rx) = watch::channel(None);
        tokio::spawn(async move {
            if let Err(err) = task.await {
                let what = if err.is_panic() {
                    let payload = err.into_panic();
                    payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .map_or_else(|| "it panicked".to_owned(), |m| format!("it panicked: {m}"))
                } else {
                    "it was cancelled".to_owned()
                };
                let _ = failure_tx.send(Some(what));
            }
        });
        Ok(Self {
            tx,
            changes: changes_rx,
            answered: answered_rx,
            applied: applied_rx,
            standby: standby_rx,
            failure: failure_rx,
            host,
            direct_log_writers,
            log_watch,
        })
    }

    /// Has the log watcher (which, with a log keeper, watches only the nodes that write
    /// their files themselves) watch each node started from now on that writes its
    /// files itself because no keeper answered.
    pub fn watch_own_writers_with(&self, adder: crate::logwatch::Adder) {
        let _ = self.log_watch.set(adder);
    }

    /// The directories of nodes found running at start-up whose process writes its log
    /// files itself (spawned by an agent without a log keeper): with a keeper, the only
    /// logs the log watcher must hold to their bound.
    pub fn direct_log_writers(&self) -> Vec<PathBuf> {
        self.direct_log_writers.to_vec()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    /// Applies `config`, deploy generation `generation`, for this instance; one result
    /// per node started or restarted. A repeat of the applied generation changes nothing
    /// (unless `restart` says to restart every node) and is answered with the nodes the
    /// first Apply of it started or restarted, as they are; an older generation is
    /// refused with one error result.
    pub async fn apply(
        &self,
        config: Configuration,
        restart: Restart,
        generation: u64,
        deadline: Instant,
        progress: Option<ProgressTo>,
    ) -> Vec<MgmtResult> {
        self.ask(|reply| Command::Apply {
            config: Box::new(config),
            restart,
            generation,
            deadline,
            progress,
            reply,
        })
        .await
        .unwrap_or_else(|| unanswered("the deploy"))
    }

    /// Stops, starts or restarts nodes (all when `nodes` is empty), answering by
    /// `deadline`, or later, up to `cap`, while the nodes are within their own stop and
    /// readiness timeouts (see [`Node::settle_within`]).
    pub async fn act(
        &self,
        op: Op,
        nodes: Vec<String>,
        deadline: Instant,
        cap: Instant,
    ) -> Vec<MgmtResult> {
        self.ask(|reply| Command::Act {
            op,
            nodes,
            deadline,
            cap,
            reply,
        })
        .await
        .unwrap_or_else(|| unanswered("the request"))
    }

    /// Every node's status, with RSS and CPU time from `/proc`. Those are read here, by
    /// the caller, not by the supervisor task: with 500 nodes they take milliseconds
    /// that would otherwise delay starts and restarts.
    pub async fn status(&self) -> Vec<NodeStatus> {
        let mut statuses = self
            .ask(|reply| Command::Status { reply })
            .await
            .unwrap_or_default();
        add_usage(&mut statuses, &self.host);
        statuses
    }

    /// The statuses of the nodes that changed since the last call (every node's when
    /// `full`, or when a node was added or removed since); true when it is every node's.
    /// For status reports: there is one reporter per supervisor.
    pub async fn changes_since_last(&self, full: bool) -> (bool, Vec<NodeStatus>) {
        let (full, mut statuses) = self
            .ask(|reply| Command::Changes { full, reply })
            .await
            .unwrap_or_default();
        add_usage(&mut statuses, &self.host);
        (full, statuses)
    }

    /// The log files of a node, if it exists, and where they ended before this agent
    /// process first started it (stdout, stderr), when it did.
    pub async fn logs(&self, node: &str) -> Option<(NodeLogs, Option<[crate::logs::Mark; 2]>)> {
        let node = node.to_owned();
        self.ask(|reply| Command::Logs { node, reply })
            .await
            .flatten()
    }

    /// For each named node (all when empty): its query socket if it is running, or why
    /// it cannot be asked.
    pub async fn queryable(&self, nodes: Vec<String>) -> Vec<(String, Result<PathBuf, String>)> {
        self.ask(|reply| Command::Queryable { nodes, reply })
            .await
            .unwrap_or_default()
    }

    /// Makes every node's directory and notify socket again, and writes
    /// every record anew, after the state dir was removed or replaced under the agent:
    /// the nodes run on, say when they are ready, log, and are adopted by the next agent
    /// process. Returns the nodes that could not be restored, and why.
    pub async fn restore(&self) -> Vec<(String, String)> {
        self.ask(|reply| Command::Restore { reply })
            .await
            .unwrap_or_default()
    }

    /// Ends the supervisor; with `stop_nodes`, stops every node first (bounded by the
    /// longest stop timeout), otherwise leaves them running for the next agent process.
    pub async fn shutdown(&self, stop_nodes: bool) {
        let _ = self
            .ask(|reply| Command::Shutdown { stop_nodes, reply })
            .await;
    }

    /// Stops every node that runs or is to run, leaving each desired to run (an agent
    /// process started meanwhile starts it), because the controller refused this agent:
    /// another live process holds its identity, and the nodes must not run twice.
    /// Returns whether the agent was not standing by already.
    pub async fn stand_by(&self) -> bool {
        self.ask(|reply| Command::StandBy { reply })
            .await
            .unwrap_or(false)
    }

    /// Starts again the nodes [`Supervisor::stand_by`] stopped, once the controller
    /// accepted this agent. Returns whether it was standing by.
    pub async fn resume(&self) -> bool {
        self.ask(|reply| Command::Resume { reply })
            .await
            .unwrap_or(false)
    }

    /// True while the agent stands by ([`Supervisor::stand_by`]).
    pub fn standing_by(&self) -> bool {
        *self.standby.borrow()
    }

    /// True when the supervisor task answers within `patience`: it is neither gone nor
    /// stuck. For the systemd watchdog.
    pub async fn ping(&self, patience: Duration) -> bool {
        tokio::time::timeout(
            patience,
            self.ask(|reply| Command::Ping { patience, reply }),
        )
        .await
        .is_ok_and(|r| r.is_some())
    }

    /// Resolves once the supervisor task has gone `limit` without answering a ping:
    /// stuck in a system call, or in a loop. Asks every `limit / 2`, so a stall is
    /// noticed within one and a half times `limit`, at the cost of a wake-up per ask.
    pub async fn stalled(&self, limit: Duration) {
        loop {
            tokio::time::sleep(limit / 2).await;
            if !self.ping(limit).await {
                return;
            }
        }
    }

    /// Resolves, with what happened, if the supervisor task ends by a panic; never
    /// otherwise. The agent then exits with an error and leaves the nodes to the next
    /// agent process, which adopts them.
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.clone();
        loop {
            if let Some(what) = rx.borrow_and_update().clone() {
                return what;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The deploy generation applied (0: none, or one from a controller without
    /// generations).
    pub fn applied_generation(&self) -> u64 {
        *self.applied.borrow()
    }

    /// A receiver that changes whenever a node's state changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// A receiver that changes whenever requests waiting for nodes (deploy, start, stop,
    /// restart) were answered.
    pub fn answered(&self) -> watch::Receiver<u64> {
        self.answered.clone()
    }
}

/// The upper half of every spawn token of the agents on one state dir: a hash of its
/// path. Without cgroups, a starting agent finds what its predecessors left running by
/// this prefix, without touching the nodes of other agents on the host.
fn token_prefix(state_dir: &Path) -> u64 {
    // FNV-1a: stable across builds and runs, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 32).max(1)
}

/// The token after `token`: the same prefix, the next lower half.
fn next_token_after(token: u64) -> u64 {
    let low = u32::try_from(token & 0xffff_ffff)
        .unwrap_or(0)
        .wrapping_add(1);
    (token & !0xffff_ffff) | u64::from(low)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(epoch_ms());
    h.finish() as u32
}

impl Core {
    fn now(&self) -> Millis {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `at` on the clock of [`Core::now`].
    fn millis_of(&self, at: Instant) -> Millis {
        millis(at.saturating_duration_since(self.epoch))
    }

    fn instant_of(&self, at: Millis) -> Instant {
        self.epoch + Duration::from_millis(at)
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut sigchld =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
        let mut rotate = tokio::time::interval(ROTATE_EVERY);
        rotate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let retention = self.cfg.removed_node_retention;
        let mut prune = tokio::time::interval(
            retention.map_or(Duration::from_secs(3600), crate::prune::interval),
        );
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut oom_check = tokio::time::interval(OOM_CHECK_EVERY);
        oom_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(ev) = events.recv() => {
                    self.event(ev);
                    // Handle a burst (many nodes exiting at once) in one go.
                    while let Ok(ev) = events.try_recv() {
                        self.event(ev);
                    }
                    if std::mem::take(&mut self.sweep_pending) {
                        self.reap();
                    }
                }
                () = sleep_until(deadline) => self.tick(),
                Some(()) = async { match sigchld.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    self.reap();
                }
                _ = rotate.tick(), if self.nodes.values().any(|e| e.proc().is_some()) => self.rotate_logs(),
                _ = prune.tick(), if retention.is_some() => self.scan_for_pruning(),
                _ = oom_check.tick(), if self.nodes.values().any(|e| e.proc().is_some_and(|p| p.oom_base.is_some())) => self.check_ooms(),
            }
            self.settle_waiters();
            if self.shutdown_done() {
                break;
            }
        }
        for e in self.nodes.values() {
            if let Some(t) = &e.notify_task {
                t.abort();
            }
        }
        debug!("supervisor stopped");
    }

    fn next_deadline(&self) -> Option<Instant> {
        let machines = self
            .nodes
            .values()
            .filter_map(|e| e.book.machine.next_deadline())
            .min()
            .map(|at| self.instant_of(at));
        let waiters = self.waiters.next_deadline().map(|at| self.instant_of(at));
        let shutdown = self.shutdown.as_ref().map(|(d, _)| *d);
        let kills = self.kill_retry.as_ref().map(|(at, _)| *at);
        [machines, waiters, shutdown, kills]
            .into_iter()
            .flatten()
            .min()
    }

    /// Notes that `node`'s status changed and wakes whoever watches for changes.
    fn bump(&mut self, node: &str) {
        // A node whose spawn is under way changes again when it is in: one report for
        // both steps (a crashed node's restart reaches the controller as RUNNING with
        // its new pid, not as PENDING first and RUNNING a report interval later).
        let spawning = self.nodes.get(node).is_some_and(|e| e.book.awaits_spawn());
        self.note_change(node, !spawning);
    }

    /// Marks the node changed for the next status report; `now`: tell the reporter at
    /// once (otherwise the next change that does tells it).
    fn note_change(&mut self, node: &str, now: bool) {
        if !self.changed.contains(node) {
            self.changed.insert(node.to_owned());
        }
        if now {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    // === commands ===

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply {
                config,
                restart,
                generation,
                deadline,
                progress,
                reply,
            } => {
                let instance = &self.cfg.instance;
                let nodes: BTreeMap<String, Node> = config
                    .nodes_on(instance)
                    .map(|n| (n.name.clone(), config.resolve(n)))
                    .collect();
                // Limits this host cannot enforce are refused before anything changes.
                let refused = nodes
                    .values()
                    .filter_map(|n| self.host.check(&n.name, &Limits::of(n)).err())
                    .collect();
                let incoming = apply::Incoming {
                    generation,
                    restart,
                    nodes,
                    refused,
                    with: Requested {
                        config_id: config.id.clone(),
                        deadline,
                        progress,
                        reply,
                    },
                };
                let table = ApplyTable::of(&self.nodes, &self.applied, self.restart_epoch);
                let out = self.applies.push(incoming, &table);
                self.apply_out(out);
            }
            Command::Act { nodes, reply, .. } if *self.standby.borrow() => {
                // Started here, a node would run beside the copy of the process this
                // agent stood by for, and stay running when it is refused again; a stop
                // or signal would reach this agent's copy, which is not running, and
                // not the one that is.
                let names = if nodes.is_empty() {
                    self.nodes
                        .iter()
                        .filter(|(_, e)| !e.removing)
                        .map(|(n, _)| n.clone())
                        .collect()
                } else {
                    nodes
                };
                let refused = names
                    .iter()
                    .map(|n| {
                        MgmtResult::err("", STANDING_BY.to_owned())
                            .on_instance(&self.cfg.instance)
                            .on_node(n)
                    })
                    .collect();
                let _ = reply.send(refused);
            }
            Command::Act {
                op,
                nodes,
                deadline,
                cap,
                reply,
            } => self.act(op, nodes, (deadline, cap), reply),
            Command::Status { reply } => {
                let _ = reply.send(self.statuses());
            }
            Command::Changes { full, reply } => {
                let full = full || self.membership_changed;
                let changed = std::mem::take(&mut self.changed);
                self.membership_changed = false;
                let statuses = if full {
                    self.statuses()
                } else {
                    self.statuses_of(&changed)
                };
                let _ = reply.send((full, statuses));
            }
            Command::Logs { node, reply } => {
                let _ = reply.send(
                    self.nodes
                        .get(&node)
                        .map(|e| (e.logs.clone(), e.output_marks)),
                );
            }
            Command::Queryable { nodes, reply } => {
                let names: Vec<String> = if nodes.is_empty() {
                    self.nodes.keys().cloned().collect()
                } else {
                    nodes
                };
                let out = names
                    .into_iter()
                    .map(|n| {
                        let r = match self.nodes.get(&n) {
                            None => Err("unknown cluster node".to_owned()),
                            Some(e) if e.book.machine.state() != machine::State::Running => {
                                Err(format!("cluster node {n} not in running state"))
                            }
                            Some(e) => Ok(crate::exec::query_path(&self.socks.dir(&n), &e.spec)),
                        };
                        (n, r)
                    })
                    .collect();
                let _ = reply.send(out);
            }
            Command::Ping { patience, reply } => {
                let stuck = self.spawns_waiting > 0 && self.spawner_moved.elapsed() > patience;
                if stuck {
                    warn!(
                        waiting = self.spawns_waiting,
                        "the spawner has finished no spawn for {:?}",
                        self.spawner_moved.elapsed()
                    );
                } else {
                    let _ = reply.send(());
                }
            }
            #[cfg(test)]
            Command::Panic => panic!("asked to panic"),
            #[cfg(test)]
            Command::Stall(d) => std::thread::sleep(d),
            Command::Restore { reply } => {
                let jobs: Vec<PrepareJob> = self
                    .nodes
                    .keys()
                    .map(|name| (name.clone(), self.nodes_dir.join(name), None))
                    .collect();
                let (logs, socks, events) =
                    (self.cfg.logs, self.socks.clone(), self.events.clone());
                tokio::task::spawn_blocking(move || {
                    let made = Self::run_prepare(&jobs, logs, &socks);
                    let _ = events.send(Event::Restored(made, reply));
                });
            }
            Command::Shutdown { stop_nodes, reply } => {
                self.release_cgroups = stop_nodes;
                let longest = if stop_nodes {
                    self.stop_with_agent()
                } else {
                    // Leave every process to the next agent; keep the records as they are.
                    self.nodes.clear();
                    Duration::ZERO
                };
                let deadline = Instant::now() + longest + Duration::from_secs(2);
                self.shutdown = Some((deadline, reply));
            }
            Command::StandBy { reply } => {
                let began = !self.standby.send_replace(true);
                if began {
                    self.stop_with_agent();
                }
                let _ = reply.send(began);
            }
            Command::Resume { reply } => {
                let was = self.standby.send_replace(false);
                if was {
                    self.start_stopped_with_agent();
                }
                let _ = reply.send(was);
            }
        }
    }

    /// Stops every node that runs or is to run as the agent's exit with `--on-exit stop`
    /// does: each stays desired to run, and an agent process started later starts it
    /// again. Returns the longest stop timeout among them.
    fn stop_with_agent(&mut self) -> Duration {
        let now = self.now();
        let mut longest = Duration::ZERO;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if let Some(e) = self.nodes.get_mut(&name) {
                longest = longest.max(e.spec.stop_timeout);
                let ended = matches!(
                    e.book.machine.state(),
                    machine::State::Stopped | machine::State::Failed
                );
                if ended {
                    // Nothing runs: its record stays as it is, so that a FAILED node is
                    // FAILED to the next agent, not stopped.
                    continue;
                }
                // One that ran or was to run again runs again with the next agent; one
                // an operator stopped stays as it is.
                e.stopped_with_agent = !e.stopped_by_operator;
                let actions = e.book.machine.stop(now);
                self.run_actions(&name, actions);
                // One waiting out its backoff has no process whose end would write its
                // record: the next agent starts it afresh.
                self.save_record(&name);
            }
        }
        longest
    }

    /// Starts again the nodes [`Core::stop_with_agent`] stopped.
    fn start_stopped_with_agent(&mut self) {
        let now = self.now();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if let Some(e) = self.nodes.get_mut(&name)
                && std::mem::take(&mut e.stopped_with_agent)
                && !e.removing
                && !e.stopped_by_operator
            {
                info!(node = %name, "starting the node again: the controller accepted this agent");
                let actions = e.book.machine.start(now);
                self.run_actions(&name, actions);
                self.save_record(&name);
            }
        }
    }

    /// What [`crate::apply`] has the supervisor do for Applies: answer them, or have
    /// the desired state of one written (and synced) off this task, with its new
    /// nodes' directories and notify sockets made and their exec settings
    /// resolved meanwhile; it is carried out once written ([`Core::carry_out`]), and
    /// only then is the next one taken.
    fn apply_out(&mut self, out: Vec<apply::Out<Requested>>) {
        for o in out {
            match o {
                apply::Out::Repeat { with } => self.repeat(with),
                apply::Out::Answer { with, errors } => {
                    let instance = &self.cfg.instance;
                    let results = errors
                        .into_iter()
                        .map(|msg| {
                            warn!("{msg}");
                            MgmtResult::err("", msg).on_instance(instance)
                        })
                        .collect();
                    let _ = with.reply.send(results);
                }
                apply::Out::Write(w) => self.start_write(w),
            }
        }
    }

    /// Writes an Apply's desired state on the blocking pool and resolves the exec
    /// settings of the nodes it starts there too. Reported as [`Event::DesiredWritten`].
    /// New nodes' directories and notify sockets are made by their first
    /// spawn ([`crate::spawner::Fresh`]), which also gives them to the node's user:
    /// creating inodes is most of what starting hundreds of nodes costs, and so the
    /// first node starts while later ones are still being made, on the spawner
    /// threads.
    fn start_write(&mut self, w: apply::Write) {
        let apply::Write {
            desired,
            create,
            resolve,
        } = w;
        debug!(
            generation = desired.generation,
            nodes = desired.nodes.len(),
            new = create.len(),
            "applying a deploy"
        );
        let exec_jobs: Vec<(String, Node, PathBuf, PathBuf)> = resolve
            .iter()
            .filter_map(|name| desired.nodes.get_key_value(name))
            .map(|(name, spec)| {
                let dir = self.nodes_dir.join(name);
                let notify = notify_path(&self.socks.dir(name));
                (name.clone(), spec.clone(), dir, notify)
            })
            .collect();
        let path = self.desired_path();
        let events = self.events.clone();
        let generation = desired.generation;
        tokio::task::spawn_blocking(move || {
            let began = Instant::now();
            let result = write_desired(&path, &desired)
                .map(|()| {
                    let written = began.elapsed();
                    let plans = exec_jobs
                        .iter()
                        .map(|(name, spec, dir, notify)| {
                            let plan = crate::exec::prepare(name, spec, dir, notify);
                            (name.clone(), plan.map(std::sync::Arc::new))
                        })
                        .collect();
                    debug!(
                        generation,
                        written_us = written.as_micros(),
                        resolved_us = (began.elapsed() - written).as_micros(),
                        "desired state written"
                    );
                    plans
                })
                .map_err(|err| format!("cannot record the desired state: {err}"));
            let written = result.is_ok();
            let _ = events.send(Event::DesiredWritten(result));
            if written && let Err(err) = sync_desired(&path) {
                warn!(
                    "cannot sync the desired state in {}: {err}; a host crash could lose it until the controller applies again",
                    path.display()
                );
            }
        });
    }

    /// Carries out an Apply whose desired state is on disk, step by step as
    /// [`crate::apply`] decided.
    fn carry_out(&mut self, c: CarryOut<Requested>, mut plans: Plans) {
        let CarryOut {
            with:
                Requested {
                    config_id,
                    mut deadline,
                    progress,
                    reply,
                },
            generation,
            restart_epoch,
            steps,
        } = c;
        if let Some(p) = &progress {
            // Writing the desired state and preparing the nodes was progress too.
            deadline = deadline.max(Instant::now() + p.idle);
        }
        let instance = self.cfg.instance.clone();
        let now = self.now();
        // Refused since this Apply was taken: what it would start is left stopped,
        // desired to run, as the rest (see `Command::StandBy`), rather than run for a
        // moment beside the nodes of the process the controller keeps.
        let standby = *self.standby.borrow();
        self.restart_epoch = restart_epoch;
        self.applied.send_replace(generation);
        let mut wait = Vec::new();
        let mut results = Vec::new();
        // Removed nodes still stopping: the answer waits for them to be gone, so that a
        // deploy that succeeded leaves nothing of the old configuration running.
        let mut leaving = Vec::new();
        // The longest a node waited for may take by its own stop and readiness timeouts.
        let mut settle = Duration::ZERO;
        for (name, step) in steps {
            match step {
                Step::Remove => {
                    info!(node = %name, "node removed from the configuration; stopping it");
                    if let Some(e) = self.nodes.get_mut(&name) {
                        e.removing = true;
                        settle = settle.max(e.spec.stop_timeout);
                        let actions = e.book.machine.stop(now);
                        self.run_actions(&name, actions);
                    }
                    self.remove_if_done(&name);
                    if self.nodes.contains_key(&name) {
                        leaving.push(name);
                    }
                }
                Step::Keep { retry } => {
                    // Unchanged: leave it alone, whatever its state; it now runs this
                    // generation's spec.
                    let Some(e) = self.nodes.get_mut(&name) else {
                        continue;
                    };
                    e.config_id.clone_from(&config_id);
                    e.removing = false;
                    e.deploy_gen = generation;
                    if let Some(p) = e.book.process_mut() {
                        p.deploy_gen = generation;
                    }
                    if let Some(plan) = plans.remove(&name) {
                        e.plan = Some(plan);
                    }
                    // It failed for want of its user or groups, which now resolve.
                    if retry && standby {
                        e.stopped_with_agent = true;
                        results.push(not_started_standing_by(&instance, &name));
                    } else if retry {
                        settle = settle.max(e.spec.settle_within(false, true));
                        let actions = e.book.machine.start(now);
                        self.run_actions(&name, actions);
                        wait.push((name.clone(), None));
                    } else if let Some(Err(err)) = &e.plan
                        && e.proc().is_none()
                        && e.spawn_of.is_none()
                        && !e.stopped_by_operator
                        && matches!(
                            e.book.machine.state(),
                            machine::State::Failed | machine::State::Crashed
                        )
                    {
                        // Still not: the deploy says so rather than succeed while the
                        // node cannot run (FAILED, or CRASHED between attempts that
                        // fail the same way).
                        results.push(
                            MgmtResult::err("", err.clone())
                                .on_instance(&instance)
                                .on_node(&name),
                        );
                    }
                    self.bump(&name);
                }
                Step::Restart { spec, renew } => {
                    let Some(e) = self.nodes.get_mut(&name) else {
                        continue;
                    };
                    info!(node = %name, "node spec changed; restarting it");
                    // Stopped as the old spec says, started as the new one does.
                    let stop = if e.proc().is_some() || e.spawn_of.is_some() {
                        e.spec.stop_timeout
                    } else {
                        Duration::ZERO
                    };
                    settle = settle.max(stop + spec.settle_within(false, true));
                    e.spec = spec;
                    e.plan = plans.remove(&name);
                    e.config_id.clone_from(&config_id);
                    e.deploy_gen = generation;
                    e.removing = false;
                    e.stopped_by_operator = false;
                    let old_generation = e.book.spawns();
                    // A running process is stopped first (with its own spec's stop
                    // signal, see `Action::SignalStop`) and the new one started once it
                    // is gone.
                    let mut actions = e.book.machine.stop(now);
                    if renew {
                        e.book.machine = Machine::new(machine_config(&e.spec));
                        e.restarts_base = 0;
                    } else {
                        e.book.machine.reconfigure(machine_config(&e.spec));
                    }
                    if standby {
                        e.stopped_with_agent = true;
                    } else {
                        actions.extend(e.book.machine.start(now));
                    }
                    self.run_actions(&name, actions);
                    if standby {
                        results.push(not_started_standing_by(&instance, &name));
                    } else {
                        wait.push((name, Some(old_generation)));
                    }
                }
                Step::Create { spec } => {
                    settle = settle.max(spec.settle_within(false, true));
                    match self.create(&name, spec, &config_id, None) {
                        Ok(()) => {
                            let actions = self
                                .nodes
                                .get_mut(&name)
                                .map(|e| {
                                    e.deploy_gen = generation;
                                    e.plan = plans.remove(&name);
                                    if standby {
                                        e.stopped_with_agent = true;
                                        e.book.machine.stop(now)
                                    } else {
                                        e.book.machine.start(now)
                                    }
                                })
                                .unwrap_or_default();
                            self.run_actions(&name, actions);
                            if standby {
                                results.push(not_started_standing_by(&instance, &name));
                            } else {
                                wait.push((name, None));
                            }
                        }
                        Err(e) => results.push(
                            MgmtResult::err("", format!("cannot set up node '{name}': {e}"))
                                .on_instance(&instance)
                                .on_node(&name),
                        ),
                    }
                }
            }
        }
        for name in self.nodes.keys().cloned().collect::<Vec<_>>() {
            self.save_record(&name);
        }
        if let Some(p) = &progress {
            p.tx.send_replace(Progress {
                done: count(results.len()),
                total: count(results.len() + wait.len()),
            });
            // Its requester waits as long as frames come (the request handler sends
            // them at least every second): long enough for every node to start, or
            // fail, as its configuration allows.
            if !settle.is_zero() {
                deadline = deadline.max(Instant::now() + settle + SETTLE_GRACE);
            }
        }
        let deadline = self.millis_of(deadline);
        let idle = progress.as_ref().map(|p| millis(p.idle));
        let last = LastApply {
            generation,
            wait: 0,
            nodes: wait.iter().map(|(name, _)| name.clone()).collect(),
            errors: results.clone(),
        };
        let id = self.waiters.add(
            wait,
            Want::Running,
            deadline,
            idle,
            results,
            Requester {
                reply,
                progress: progress.map(|p| p.tx),
            },
        );
        self.waiters.also_gone(id, leaving);
        self.last_apply = Some(LastApply { wait: id, ..last });
    }

    /// Answers a repeat of the generation applied along with the Apply that carried it
    /// out, while that one waits for its nodes; once that one is answered (or when the
    /// generation was put in effect by an earlier agent process), with what its nodes
    /// show now, as that Apply would be answered now: the requester of a deploy sent
    /// again (on an agent's new connection, say) learns of every node, not of none.
    fn repeat(&mut self, with: Requested) {
        let Requested {
            mut deadline,
            progress,
            reply,
            ..
        } = with;
        // Nodes the generation removed that are still stopping (an earlier agent
        // process began their stop): the answer waits for them too, as the Apply that
        // removed them would have, so that a deploy that succeeded leaves nothing of
        // the previous configuration running.
        let leaving: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.removing)
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(p) = &progress {
            let stops = leaving
                .iter()
                .filter_map(|n| Some(self.nodes.get(n)?.spec.stop_timeout))
                .max()
                .map_or(Duration::ZERO, |t| t + SETTLE_GRACE);
            deadline = deadline.max(Instant::now() + p.idle.max(stops));
        }
        let deadline = self.millis_of(deadline);
        let idle = progress.as_ref().map(|p| millis(p.idle));
        let requester = Requester {
            reply,
            progress: progress.map(|p| p.tx),
        };
        let applied = *self.applied.borrow();
        let last = self.last_apply.as_ref().filter(|l| l.generation == applied);
        let joined = match last {
            Some(l) => self.waiters.add_like(l.wait, deadline, idle, requester),
            None => Err(requester),
        };
        if let Err(requester) = joined {
            // The nodes that Apply started or changed, as they are now; every node when
            // an earlier agent process carried it out.
            let (nodes, errors) = match last {
                // Its errors as they stand now: a node it could not start for want of
                // its user may run since.
                Some(l) => (
                    l.nodes.clone(),
                    l.errors
                        .iter()
                        .filter(|r| {
                            r.node.as_ref().is_none_or(|n| {
                                self.nodes.get(n).is_none_or(|e| {
                                    e.book.machine.state() == machine::State::Failed
                                        && matches!(e.plan, Some(Err(_)))
                                })
                            })
                        })
                        .cloned()
                        .collect(),
                ),
                None => (
                    self.nodes
                        .iter()
                        .filter(|(_, e)| !e.removing)
                        .map(|(name, _)| name.clone())
                        .collect(),
                    Vec::new(),
                ),
            };
            let nodes = nodes.into_iter().map(|name| (name, None)).collect();
            let id = self
                .waiters
                .add(nodes, Want::Running, deadline, idle, errors, requester);
            self.waiters.also_gone(id, leaving);
        }
        self.settle_waiters();
    }

    fn desired_path(&self) -> PathBuf {
        self.cfg.state_dir.join("desired.json")
    }

    /// Carries out an operator action as [`crate::ops`] decided it.
    fn act(
        &mut self,
        op: Op,
        nodes: Vec<String>,
        (mut deadline, cap): (Instant, Instant),
        reply: oneshot::Sender<Vec<MgmtResult>>,
    ) {
        let instance = self.cfg.instance.clone();
        let now = self.now();
        let plan = ops::plan(op, nodes, &OpsTable(&self.nodes));
        // A node may take its stop_timeout to stop and its readiness timeout to start:
        // the answer waits for that, as far as the requester waits, rather than calling
        // a stop or start that is going as configured a failure.
        let allowed = plan
            .steps
            .iter()
            .filter_map(|(name, step)| {
                let e = self.nodes.get(name)?;
                let (stops, starts) = match step.as_ref().ok()? {
                    ops::Step::Stop => (true, false),
                    // A start while a stop is under way starts once it is done.
                    ops::Step::Start => (e.book.machine.is_stopping(), true),
                    ops::Step::Restart => (true, true),
                    ops::Step::Signal(_) => return None,
                };
                // A process whose spawn is under way is one to stop too.
                let live = e.proc().is_some() || e.spawn_of.is_some();
                Some(e.spec.settle_within(stops && live, starts))
            })
            .max()
            .unwrap_or_default();
        if !allowed.is_zero() {
            deadline = deadline.max((deadline + allowed + SETTLE_GRACE).min(cap));
        }
        let mut results = Vec::new();
        let answer = |name: &str, r: Result<(), String>| {
            match r {
                Ok(()) => MgmtResult::ok("", None),
                Err(msg) => MgmtResult::err("", msg),
            }
            .on_instance(&instance)
            .on_node(name)
        };
        for (name, step) in plan.steps {
            let step = match step {
                Ok(step) => step,
                Err(why) => {
                    results.push(answer(&name, Err(why)));
                    continue;
                }
            };
            let Some(e) = self.nodes.get_mut(&name) else {
                continue;
            };
            let actions = match step {
                ops::Step::Signal(sig) => {
                    let sent = match e.proc() {
                        Some(p) => {
                            signal_node(p, sig).map_err(|err| format!("cannot signal node: {err}"))
                        }
                        None => Err(format!("node {name} is not running")),
                    };
                    results.push(answer(&name, sent));
                    continue;
                }
                ops::Step::Stop => {
                    e.stopped_by_operator = true;
                    e.book.machine.stop(now)
                }
                ops::Step::Start => {
                    e.stopped_by_operator = false;
                    e.book.machine.start(now)
                }
                ops::Step::Restart => {
                    e.stopped_by_operator = false;
                    let mut a = e.book.machine.stop(now);
                    a.extend(e.book.machine.start(now));
                    a
                }
            };
            // Recorded before the stop signal goes: an agent killed right after it
            // leaves a record that says so, and the next one finishes the stop or
            // restart rather than adopting a process that was told to go.
            self.save_record(&name);
            self.run_actions(&name, actions);
            self.save_record(&name);
        }
        let deadline = self.millis_of(deadline);
        self.waiters.add(
            plan.wait,
            plan.want,
            deadline,
            None,
            results,
            Requester {
                reply,
                progress: None,
            },
        );
    }

    /// Makes the directories and bound notify sockets of new nodes, on
    /// this thread (see [`Core::prepare_jobs`] and [`Core::run_prepare`]).
    fn prepare<'a>(&self, nodes: impl Iterator<Item = (&'a str, &'a Node)>) -> Prepared {
        Self::run_prepare(&self.prepare_jobs(nodes), self.cfg.logs, &self.socks)
    }

    /// What [`Core::run_prepare`] makes for these nodes: name, directory, and working
    /// directory unless the spec names one.
    fn prepare_jobs<'a>(
        &self,
        nodes: impl Iterator<Item = (&'a str, &'a Node)>,
    ) -> Vec<PrepareJob> {
        nodes
            .filter(|(name, _)| drover_proto::name::check(name).is_ok())
            .map(|(name, spec)| {
                let dir = self.nodes_dir.join(name);
                let work = spec.workdir.is_none().then(|| dir.join("work"));
                (name.to_owned(), dir, work)
            })
            .collect()
    }

    /// Makes the directories and bound notify sockets of new nodes,
    /// spread over a few threads, for [`Core::create`] and the first spawn to find in
    /// place. Blocking; an Apply runs it on the blocking pool.
    fn run_prepare(jobs: &[PrepareJob], logs: LogConfig, socks: &SocketDirs) -> Prepared {
        if jobs.is_empty() {
            return BTreeMap::new();
        }
        // The node's cgroup is made by its spawn (see [`Cgroups::prepare`]).
        let prepare_one = |name: &str, dir: &Path, work: Option<&Path>| {
            let made = crate::spawner::prepare_fresh(name, dir, &NodeLogs::new(dir, logs), socks)?;
            if let Some(w) = work {
                crate::spawner::make_workdir(w)?;
            }
            Ok(made)
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(4);
        let chunk = jobs.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|(name, dir, work)| {
                                (name.clone(), prepare_one(name, dir, work.as_deref()))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    /// Creates the entry of a new node. With `prepared` (its notify socket, as
    /// [`Core::prepare`] made it with its directory and logs) it is ready; without, its
    /// first spawn makes them (the entry is `fresh`).
    fn create(
        &mut self,
        name: &str,
        spec: Node,
        config_id: &str,
        prepared: Option<std::io::Result<crate::spawner::Made>>,
    ) -> std::io::Result<()> {
        drover_proto::name::check(name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let dir = self.nodes_dir.join(name);
        // Without one, its first spawn makes what the node needs.
        let made = prepared.transpose()?;
        let logs = NodeLogs::new(&dir, self.cfg.logs);
        let machine = Machine::new(machine_config(&spec));
        let mut entry = Entry {
            spec,
            config_id: config_id.to_owned(),
            book: Book::new(machine),
            logs,
            dir,
            deploy_gen: *self.applied.borrow(),
            spawn_of: None,
            restarts_base: 0,
            stopped_by_operator: false,
            stopped_with_agent: false,
            removing: false,
            notify_task: None,
            plan: None,
            plan_failed_before: false,
            written: Vec::new(),
            last_pipes: None,
            start_failed: false,
            fresh: false,
            output_marks: made.as_ref().map(|m| m.marks),
            stop_sent_ms: None,
        };
        entry.notify_task = made.map(|m| self.listen_notify(name, m.sock)).transpose()?;
        entry.fresh = entry.notify_task.is_none();
        self.nodes.insert(name.to_owned(), entry);
        self.membership_changed = true;
        Ok(())
    }

    /// Forwards what the node's notify socket receives.
    fn listen_notify(
        &self,
        name: &str,
        sock: std::os::unix::net::UnixDatagram,
    ) -> std::io::Result<tokio::task::AbortHandle> {
        // Every notify socket passes credentials from its bind on
        // ([`crate::spawner::prepare_fresh`]), before the node can send.
        // The keeper holds it too, and reads it while no agent runs (an upgrade, a
        // crash), for the next agent (see [`crate::keeper::notify`]).
        if let Some(k) = &self.cfg.keeper {
            k.hold_notify(name, std::os::fd::AsFd::as_fd(&sock));
        }
        let sock = UnixDatagram::from_std(sock)?;
        let events = self.events.clone();
        let node = name.to_owned();
        let queue = std::sync::Arc::new(tokio::sync::Semaphore::new(NOTIFY_QUEUE));
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok(queued) = queue.clone().acquire_owned().await else {
                    break;
                };
                let Ok((n, sender)) = probe::recv(&sock, &mut buf).await else {
                    break;
                };
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if events
                    .send(Event::Notify {
                        node: node.clone(),
                        text,
                        sender,
                        _queued: Some(queued),
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(task.abort_handle())
    }

    // === machine actions ===

    fn run_actions(&mut self, name: &str, actions: Vec<Action>) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let now = self.now();
            let Some(e) = self.nodes.get_mut(name) else {
                return;
            };
            match action {
                Action::StateChanged(state) => {
                    debug!(node = %name, state = %state, "state changed");
                    e.stop_sent_ms = None;
                    if matches!(state, machine::State::Crashed | machine::State::Failed) {
                        let exit = e.book.last_exit;
                        warn!(node = %name, ?exit, restarts = e.restarts(), "node {}", state.as_str().to_lowercase());
                    }
                    // Spawns and exits write the record themselves; readiness is the one
                    // state change the record must learn of here.
                    if state == machine::State::Running {
                        self.save_record(name);
                        self.start_monitors(name);
                    }
                    if queue.contains(&Action::Spawn) {
                        // PENDING, with the spawn next: reported with its outcome.
                        self.note_change(name, false);
                    } else {
                        self.bump(name);
                    }
                }
                Action::Spawn => {
                    let more = match self.request_spawn(name) {
                        Ok(()) => Vec::new(),
                        Err(err) => {
                            warn!(node = %name, "cannot start node: {err}");
                            self.bump(name);
                            let more = self
                                .nodes
                                .get_mut(name)
                                .and_then(|e| {
                                    e.spawn_of = None;
                                    e.start_failed = true;
                                    let spawn = e.book.spawns();
                                    e.book.spawn_failed(now, spawn, err)
                                })
                                .unwrap_or_default();
                            // A later agent process shows the error too.
                            self.save_record(name);
                            more
                        }
                    };
                    queue.extend(more);
                }
                Action::SignalStop => {
                    if let Some(p) = e.proc() {
                        // The process's own spec: a redeploy may have replaced the
                        // node's while it ran, or while its spawn was under way.
                        let sig = signal_number(&p.spec.stop_signal)
                            .and_then(|n| Signal::try_from(n).ok())
                            .unwrap_or(Signal::SIGTERM);
                        debug!(node = %name, pid = p.id.pid, %sig, "stopping");
                        if let Err(err) = signal_node(p, sig) {
                            warn!(node = %name, "cannot send {sig} to the node: {err}");
                        }
                        // A node paused (SIGSTOP, or a debugger's stop) would see its
                        // stop signal only when resumed, and be killed at its
                        // stop_timeout instead of ending cleanly: resume it, as systemd does.
                        if !matches!(sig, Signal::SIGCONT | Signal::SIGKILL) {
                            let _ = signal_node(p, Signal::SIGCONT);
                        }
                        e.stop_sent_ms = Some(epoch_ms());
                        self.bump(name);
                    }
                }
                Action::Kill => {
                    if let Some(p) = e.proc() {
                        let why = if e.book.machine.is_stopping() {
                            "it did not end within its stop_timeout".to_owned()
                        } else {
                            e.book
                                .error()
                                .unwrap_or_else(|| "a failed check".to_owned())
                        };
                        warn!(node = %name, pid = p.id.pid, "killing the node: {why}");
                        if let Err(err) = signal_node(p, Signal::SIGKILL) {
                            warn!(node = %name, "cannot kill the node: {err}; trying again every second");
                            let (_, nodes) = self.kill_retry.get_or_insert_with(|| {
                                (Instant::now() + KILL_RETRY, BTreeMap::new())
                            });
                            nodes.insert(name.to_owned(), p.id);
                        }
                    }
                }
            }
        }
    }

    /// Hands the node's spawn to the spawner threads (see [`crate::spawner`]); its
    /// outcome comes back as [`Event::Spawned`]. An error (the node cannot be spawned
    /// at all) names the node, the program and the cause.
    fn request_spawn(&mut self, name: &str) -> Result<(), String> {
        let token = self.next_token;
        self.next_token = next_token_after(token);
        let instance = self.cfg.instance.clone();
        let sock_dir = self.socks.dir(name);
        let socks = self.socks.clone();
        let e = self.nodes.get_mut(name).ok_or("no such node")?;
        let generation = e.book.next_spawn();
        let spec = &e.spec;
        let (program, args) = spec.command.split_first().ok_or("node has no command")?;
        let workdir = match &spec.workdir {
            Some(w) => PathBuf::from(w),
            None => e.dir.join("work"),
        };
        let notify = notify_path(&sock_dir);
        let query = crate::exec::query_path(&sock_dir, spec);
        let mut env = node_env(name, &instance, spec);
        env.extend([
            ("NOTIFY_SOCKET", notify.display().to_string()),
            ("DROVER_QUERY_SOCKET", query.display().to_string()),
            ("DROVER_NODE_TOKEN", token.to_string()),
        ]);
        if let Some(w) = spec.watchdog {
            env.insert("WATCHDOG_USEC", w.as_micros().to_string());
        }
        let env_list: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let path = env["PATH"].clone();
        let (program, args) = match spec.watchdog {
            // WATCHDOG_PID must be the node's pid, known only once it runs: a shell
            // sets it to its own and execs the node, which keeps that pid.
            // Its exec errors are found here, or the shell's exec would turn them into an
            // exit code.
            Some(_) => {
                let resolved = sys::check_executable(program, &path).map_err(|err| {
                    format!(
                        "node '{name}': cannot execute {program}: {}",
                        sys::exec_cause(&err, program, &path, &workdir)
                    )
                })?;
                let mut shim = vec![
                    "-c".to_owned(),
                    "WATCHDOG_PID=$$; export WATCHDOG_PID; exec \"$0\" \"$@\"".to_owned(),
                    resolved.display().to_string(),
                ];
                shim.extend(args.iter().cloned());
                ("/bin/sh".to_owned(), shim)
            }
            None => (program.clone(), args.to_vec()),
        };
        // Resolved when the Apply started the node or at recovery; a node without such
        // settings gets its empty plan here, once (a stat, see `exec::prepare`). One
        // whose lookup failed is looked up again (its user may exist now) on a blocking
        // thread: a directory service may take its time, and neither this task nor the
        // spawner threads wait for it.
        let resolve_again = matches!(e.plan, Some(Err(_))).then(|| (e.dir.clone(), notify.clone()));
        let plan = if resolve_again.is_some() {
            std::sync::Arc::default()
        } else {
            e.plan
                .get_or_insert_with(|| {
                    crate::exec::prepare(name, &e.spec, &e.dir, &notify).map(std::sync::Arc::new)
                })
                .clone()?
        };
        if resolve_again.is_none() {
            e.plan_failed_before = false;
        }
        let job = crate::spawner::Job {
            node: name.to_owned(),
            generation,
            spec: e.spec.clone(),
            program,
            args,
            env: env_list,
            path,
            workdir,
            logs: e.logs.clone(),
            plan,
            cpus: e
                .spec
                .cpu_affinity
                .as_ref()
                .map(|a| a.cpus().into_iter().map(|c| c as usize).collect()),
            limits: Limits::of(&e.spec),
            announce: None,
            fresh: Some(crate::spawner::Fresh {
                dir: e.dir.clone(),
                socks,
                if_gone: !e.fresh,
            }),
        };
        e.spawn_of = Some(SpawnOf {
            spec: e.spec.clone(),
            epoch: self.restart_epoch,
            deploy_gen: e.deploy_gen,
        });
        // The spawner writes the record announcing the token before it spawns.
        let announce = self.announce_spawn(name, token);
        let job = crate::spawner::Job { announce, ..job };
        if let Some((dir, notify)) = resolve_again {
            let events = self.events.clone();
            tokio::task::spawn_blocking(move || {
                let plan = crate::exec::prepare(&job.node, &job.spec, &dir, &notify)
                    .map(std::sync::Arc::new);
                let _ = events.send(Event::LookedUp(Box::new((job, plan))));
            });
            return Ok(());
        }
        self.send_job(job)
    }

    /// Hands `job` to the spawner threads, counting it as waiting for them.
    fn send_job(&mut self, job: crate::spawner::Job) -> Result<(), String> {
        self.spawner
            .send(job)
            .map_err(|_| "the spawner threads are gone".to_owned())?;
        if self.spawns_waiting == 0 {
            self.spawner_moved = Instant::now();
        }
        self.spawns_waiting += 1;
        Ok(())
    }

    /// A spawn's exec settings, looked up again: the job goes to the spawner with them,
    /// or the spawn fails with why they cannot be had. The answer replaces only the
    /// failed lookup the spawn started from (a deploy may have looked again meanwhile).
    fn looked_up(
        &mut self,
        mut job: crate::spawner::Job,
        plan: Result<std::sync::Arc<crate::exec::Plan>, String>,
    ) {
        if let Some(e) = self.nodes.get_mut(&job.node)
            && e.spec == job.spec
            && matches!(e.plan, Some(Err(_)))
        {
            if plan.is_ok() {
                e.plan_failed_before = false;
            }
            e.plan = Some(plan.clone());
        }
        let (node, generation, spec) = (job.node.clone(), job.generation, job.spec.clone());
        let result = match plan {
            Ok(plan) => {
                job.plan = plan;
                match self.send_job(job) {
                    Ok(()) => return,
                    Err(err) => Err(err),
                }
            }
            Err(err) => Err(err),
        };
        // Answered as a spawn the spawner could not carry out.
        self.spawns_waiting += 1;
        self.spawned(crate::spawner::Outcome {
            node,
            generation,
            spec,
            result,
            made: None,
        });
    }

    /// Takes over the process the spawner made for a node, or learns why it could
    /// not, and tells the node's machine.
    fn spawned(&mut self, outcome: crate::spawner::Outcome) {
        let now = self.now();
        self.spawns_waiting = self.spawns_waiting.saturating_sub(1);
        self.spawner_moved = Instant::now();
        let crate::spawner::Outcome {
            node,
            generation,
            spec,
            result,
            made,
        } = outcome;
        if let Some(made) = made {
            self.prepared(&node, made);
        }
        if result.is_ok()
            && let Some(e) = self.nodes.get_mut(&node)
        {
            // It runs: whatever kept it from starting before is over.
            e.plan_failed_before = false;
        }
        let s = match result {
            Ok(s) => s,
            Err(err) => {
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                let Some(more) = e.book.spawn_failed(now, generation, err.clone()) else {
                    return;
                };
                e.spawn_of = None;
                e.start_failed = true;
                warn!(node = %node, "cannot start node: {err}");
                self.bump(&node);
                // A later agent process shows the error too.
                self.save_record(&node);
                self.run_actions(&node, more);
                return;
            }
        };
        let pid_i = s.id.pid;
        let pid = u32::try_from(pid_i).unwrap_or(0);
        let restart_epoch = self.restart_epoch;
        let Some(e) = self.nodes.get_mut(&node) else {
            // Never leave a process nobody watches.
            warn!(node = %node, pid, "killing a process spawned for a node that is gone");
            kill_pid(pid_i);
            self.in_flight_done(pid_i);
            return;
        };
        let of = e.spawn_of.as_ref();
        let proc = Proc {
            id: s.id,
            token: e.book.spawning().unwrap_or(0),
            deploy_gen: of.map_or(e.deploy_gen, |o| o.deploy_gen),
            spec,
            epoch: of.map_or(restart_epoch, |o| o.epoch),
            started_at_ms: s.started_at_ms,
            probe: None,
            child: true,
            cgroup: s.cgroup,
            pidfd: Some(s.pidfd),
            oom_base: s.oom_base,
            monitors: None,
        };
        let (more, held) = match e.book.spawned(now, generation, pid, proc) {
            Spawned::Stale(p) => {
                // Unreachable while a node's machine waits for its spawn; never leave a
                // process nobody watches.
                warn!(node = %node, pid, "killing a process spawned for a node that moved on");
                kill_pid(p.id.pid);
                self.in_flight_done(pid_i);
                return;
            }
            Spawned::Taken { actions, held } => (actions, held),
        };
        e.spawn_of = None;
        e.start_failed = false;
        e.last_pipes = s.pipes;
        if s.pipes.is_none()
            && self.cfg.keeper.is_some()
            && let Some(watch) = self.log_watch.get()
        {
            // No keeper answered: it writes its files itself, and is held to their
            // bound as they grow.
            watch.watch(e.logs.dir());
        }
        let tcp_port = match &e.proc().expect("just taken").spec.readiness {
            model::Readiness::Tcp { port, .. } => Some(*port),
            _ => None,
        };
        let waiter = e.proc().and_then(|p| p.pidfd.as_ref()?.try_clone().ok());
        let oom_base = e.proc().and_then(|p| p.oom_base);
        let host = self.host.clone();
        let events = self.events.clone();
        let watched = node.clone();
        tokio::spawn(async move {
            let exit = match waiter {
                Some(fd) => match sys::wait_child_owned(fd).await {
                    Ok(sys::ExitKind::Code(c)) => machine::ExitStatus::Code(c),
                    Ok(sys::ExitKind::Signal(s)) => machine::ExitStatus::Signal(s),
                    Err(_) => machine::ExitStatus::Code(-1),
                },
                None => machine::ExitStatus::Code(-1),
            };
            let oom = oom_since(&host, &watched, oom_base);
            let _ = events.send(Event::Exited {
                node: watched,
                generation,
                exit,
                oom,
            });
        });
        let probe = tcp_port.map(|port| self.probe_tcp(&node, generation, port));
        if let Some(p) = self.nodes.get_mut(&node).and_then(|e| e.book.process_mut()) {
            p.probe = probe;
        }
        info!(node = %node, pid, "started");
        // The record must name the new process before anything else can happen, or an
        // agent killed now would look for it by its token only. Written after the
        // machine learnt of the spawn, it says at once whether the node is ready (a
        // start period of 0), and its readiness needs no second write.
        self.save_record(&node);
        self.in_flight_done(pid_i);
        self.run_actions(&node, more);
        // Its change (a pid, PENDING for a node that was CRASHED) was held back while
        // the spawn was under way: it is in now, whether or not the node is ready yet.
        self.note_change(&node, true);
        for (text, sender) in held {
            self.event(Event::Notify {
                node: node.clone(),
                text,
                sender,
                _queued: None,
            });
        }
    }

    /// The first spawn of a `fresh` node made its directory, logs and notify socket, or
    /// a later one made them again (they were deleted): what the node sends there is
    /// read from now on (what it sent already waits in the socket).
    fn prepared(&mut self, name: &str, made: crate::spawner::Made) {
        if !self.nodes.contains_key(name) {
            return;
        }
        match self.listen_notify(name, made.sock) {
            Ok(task) => {
                if let Some(e) = self.nodes.get_mut(name) {
                    e.fresh = false;
                    if let Some(old) = e.notify_task.replace(task) {
                        old.abort();
                    }
                    e.output_marks = Some(made.marks);
                }
            }
            Err(err) => warn!(node = %name, "cannot read the node's notify socket: {err}"),
        }
    }

    /// Takes what [`Command::Restore`] made again: each node reads its new notify socket
    /// and gets its directory back for its user, and every record is written anew. The
    /// nodes that could not be restored, and why.
    fn restored(&mut self, made: Prepared) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for (name, made) in made {
            match made {
                Ok(made) => {
                    self.prepared(&name, made);
                    if let Some(e) = self.nodes.get_mut(&name)
                        && crate::exec::wanted(&e.spec)
                    {
                        let notify = notify_path(&self.socks.dir(&name));
                        let plan = crate::exec::prepare(&name, &e.spec, &e.dir, &notify);
                        e.plan = Some(plan.map(std::sync::Arc::new));
                    }
                }
                Err(err) => failed.push((name, err.to_string())),
            }
        }
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if let Some(e) = self.nodes.get_mut(&name) {
                e.written.clear();
            }
            self.save_record(&name);
        }
        failed
    }

    /// The supervisor has taken over `pid`: the orphan reaper may see it as ours.
    fn in_flight_done(&mut self, pid: i32) {
        self.in_flight.done(pid);
        if std::mem::take(&mut self.reap_pending) {
            self.reap();
        }
    }

    /// Starts the watchdog and liveness probe of the node's process, now ready, if its
    /// spec has them. A failure comes back as [`Event::Unhealthy`], once per monitor.
    fn start_monitors(&mut self, name: &str) {
        let events = self.events.clone();
        let Some(e) = self.nodes.get_mut(name) else {
            return;
        };
        let Some(generation) = e.book.live_spawn() else {
            return;
        };
        let dir = e.dir.clone();
        let Some(p) = e.book.process_mut() else {
            return;
        };
        if p.monitors.is_some() || (p.spec.watchdog.is_none() && p.spec.liveness.is_none()) {
            return;
        }
        let workdir = p
            .spec
            .workdir
            .as_ref()
            .map_or_else(|| dir.join("work"), PathBuf::from);
        let mut env = node_env(name, &self.cfg.instance, &p.spec);
        let query = crate::exec::query_path(&self.socks.dir(name), &p.spec);
        env.insert("DROVER_QUERY_SOCKET", query.display().to_string());
        let how = probe::ExecAs {
            plan: e
                .plan
                .as_ref()
                .and_then(|p| p.as_ref().ok())
                .cloned()
                .unwrap_or_default(),
            path: env["PATH"].clone(),
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            workdir,
            cgroup: self.cgroups.as_ref().map(|c| (c.clone(), c.probe(name))),
            owner: self.probe_owner.clone(),
        };
        let node = name.to_owned();
        let report: probe::Report = std::sync::Arc::new(move |reason| {
            let _ = events.send(Event::Unhealthy {
                node: node.clone(),
                generation,
                reason,
            });
        });
        p.monitors = Some(probe::Monitors::start(
            p.spec.watchdog,
            p.spec.liveness.as_ref(),
            how,
            u32::try_from(p.id.pid).unwrap_or(0),
            report,
        ));
    }

    /// Writes the token of the spawn about to happen into the node's record, so that an
    /// agent killed between the spawn and the record of its pid finds the process (it
    /// carries the token in its environment) instead of leaving it untracked.
    /// Returns the record to write, for the spawner to write it before the spawn.
    fn announce_spawn(&mut self, name: &str, token: u64) -> Option<crate::records::Write> {
        self.nodes.get_mut(name)?.book.announce(token);
        let (path, bytes) = self.record_of(name)?;
        let e = self.nodes.get_mut(name)?;
        if bytes == e.written {
            return None;
        }
        e.written.clone_from(&bytes);
        self.record_seq += 1;
        Some(crate::records::Write {
            path,
            seq: self.record_seq,
            bytes,
        })
    }

    /// Makes sure an adopted process of an unrecorded spawn (and what it forked) is in
    /// the node's cgroup; the cgroup, or `None` without containment or when the move
    /// failed (then the node runs uncontained, as without cgroups).
    fn contain_adopted(&self, name: &str, pid: u32, token: u64) -> Option<PathBuf> {
        let cgroups = self.cgroups.as_ref()?;
        let cg = cgroups.node(name);
        match cgroups.adopt(&cg, pid, token) {
            Ok(()) => Some(cg),
            Err(err) => {
                warn!(node = %name, pid, "cannot move the node into {}: {err}", cg.display());
                None
            }
        }
    }

    fn probe_tcp(&self, name: &str, generation: u64, port: u16) -> tokio::task::AbortHandle {
        let events = self.events.clone();
        let node = name.to_owned();
        tokio::spawn(async move {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            loop {
                let attempt = tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(addr),
                )
                .await;
                if matches!(attempt, Ok(Ok(_))) {
                    let _ = events.send(Event::Ready { node, generation });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .abort_handle()
    }

    // === events ===

    fn event(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::Spawned(outcome) => self.spawned(*outcome),
            Event::LookedUp(looked) => {
                let (job, plan) = *looked;
                self.looked_up(job, plan);
            }
            // The waiters are looked at after every event.
            Event::OutputClosed => {}
            Event::Scanned(scan) => self.prune(scan),
            Event::Restored(made, reply) => {
                let _ = reply.send(self.restored(made));
            }
            Event::DesiredWritten(result) => {
                let (plans, result) = match result {
                    Ok(plans) => {
                        let resolved = plans
                            .iter()
                            .filter(|(_, p)| p.is_ok())
                            .map(|(n, _)| n.clone())
                            .collect();
                        (plans, Ok(resolved))
                    }
                    Err(msg) => (Plans::new(), Err(msg)),
                };
                let table = ApplyTable::of(&self.nodes, &self.applied, self.restart_epoch);
                match self
                    .applies
                    .written(result.as_ref().map_err(Clone::clone), &table)
                {
                    apply::Written::Nothing => {}
                    apply::Written::CarryOut(c) => self.carry_out(c, plans),
                    apply::Written::Failed { with, error } => {
                        self.apply_out(vec![apply::Out::Answer {
                            with,
                            errors: vec![error],
                        }]);
                    }
                }
                let table = ApplyTable::of(&self.nodes, &self.applied, self.restart_epoch);
                let out = self.applies.next(&table);
                self.apply_out(out);
            }
            Event::Exited {
                node,
                generation,
                exit,
                oom,
            } => {
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                let Some((p, actions)) = e.book.exited(now, generation, exit, oom) else {
                    return;
                };
                if let Some(probe) = &p.probe {
                    probe.abort();
                }
                // Whatever the main process left behind goes with it.
                kill_remains(&p);
                if p.child {
                    // Batched: one sweep after every event ready now has been handled.
                    self.sweep_pending = true;
                } else if p.cgroup.is_none() && p.token != 0 {
                    // Adopted, without a cgroup: what it left in sessions of their own
                    // went to init, not to this agent, so only the spawn token in their
                    // environment finds them (a scan of /proc, off this task).
                    let token = p.token;
                    tokio::task::spawn_blocking(move || {
                        for stray in find_token_carriers(&|t| t == token).into_values().flatten() {
                            debug!(
                                pid = stray.pid,
                                "killing a leftover descendant of an adopted node"
                            );
                            kill_pid(stray.pid);
                        }
                    });
                }
                if oom > 0 {
                    warn!(node = %node, kills = oom, "the kernel killed processes of the node for exceeding its memory limit");
                }
                info!(node = %node, pid = p.id.pid, %exit, "process exited");
                self.run_actions(&node, actions);
                self.save_record(&node);
                self.remove_if_done(&node);
                self.bump(&node);
            }
            Event::OomWhileRunning {
                node,
                generation,
                oom,
            } => {
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                let new = e.book.oom_while_running(now, generation, oom);
                if new > 0 {
                    warn!(node = %node, kills = new, "the kernel killed processes of the node for exceeding its memory limit; the node runs on");
                    self.save_record(&node);
                    self.bump(&node);
                }
            }
            Event::Ready { node, generation } => {
                if let Some(e) = self.nodes.get_mut(&node) {
                    let actions = e.book.ready(now, generation);
                    self.run_actions(&node, actions);
                }
            }
            Event::Unhealthy {
                node,
                generation,
                reason,
            } => {
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                if e.book.live_spawn() != Some(generation) {
                    return;
                }
                if let Some(p) = e.book.process_mut() {
                    p.monitors = None;
                }
                let Some(actions) = e.book.unhealthy(now, generation, reason.clone()) else {
                    return;
                };
                // Not ready, or being stopped: nothing to restart.
                if actions.is_empty() {
                    return;
                }
                warn!(node = %node, "{reason}; killing it, to be restarted under its policy");
                self.run_actions(&node, actions);
                self.save_record(&node);
                self.bump(&node);
            }
            Event::Notify {
                node, text, sender, ..
            } => {
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                // Its process may be the one being spawned: checked once it is in.
                let Some((text, sender)) = e.book.notified(text, sender) else {
                    return;
                };
                let main = e.book.pid();
                let cg = e.proc().and_then(|p| p.cgroup.clone());
                if !sender.belongs(main, cg.as_deref()) {
                    debug!(node = %node, pid = ?sender.pid, "ignoring a notify message from a process that is not the node's");
                    return;
                }
                let by_notify = matches!(e.spec.readiness, model::Readiness::Notify { .. });
                let watchdog = e.proc().is_some_and(|p| p.spec.watchdog.is_some());
                let out = e
                    .book
                    .notice(now, probe::Notice::parse(&text), by_notify, watchdog);
                if out.ping
                    && let Some(m) = e.proc().and_then(|p| p.monitors.as_ref())
                {
                    m.ping();
                }
                if out.status_changed {
                    // Kept for the next agent process (a repeated text writes nothing).
                    self.save_record(&node);
                    self.changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                self.run_actions(&node, out.actions);
                if out.trigger
                    && let Some(generation) =
                        self.nodes.get(&node).and_then(|e| e.book.live_spawn())
                {
                    self.event(Event::Unhealthy {
                        node,
                        generation,
                        reason: "watchdog triggered by the node (WATCHDOG=trigger)".to_owned(),
                    });
                }
            }
        }
    }

    fn tick(&mut self) {
        if let Some((at, _)) = &self.kill_retry
            && *at <= Instant::now()
        {
            self.retry_kills();
        }
        let now = self.now();
        let due: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.book.machine.next_deadline().is_some_and(|d| d <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(e) = self.nodes.get_mut(&name) {
                let actions = e.book.machine.tick(now);
                self.run_actions(&name, actions);
            }
        }
    }

    /// Sends again the kills that could not be sent; those that still cannot be are
    /// tried again a second later, until they go or their process is gone.
    fn retry_kills(&mut self) {
        let Some((_, nodes)) = self.kill_retry.take() else {
            return;
        };
        let mut left = BTreeMap::new();
        for (name, id) in nodes {
            // Gone, or another process of the node by now: nothing of it to kill.
            let Some(p) = self
                .nodes
                .get(&name)
                .and_then(Entry::proc)
                .filter(|p| p.id == id)
            else {
                continue;
            };
            match signal_node(p, Signal::SIGKILL) {
                Ok(()) => info!(node = %name, "killed the node"),
                Err(err) => {
                    debug!(node = %name, "cannot kill the node yet: {err}");
                    left.insert(name, id);
                }
            }
        }
        if !left.is_empty() {
            self.kill_retry = Some((Instant::now() + KILL_RETRY, left));
        }
    }

    /// Kills processes that outlived their node: descendants that left the node's
    /// process group (a new session) are re-parented to the agent, a child subreaper,
    /// when their parent dies. Any such child whose spawn token belongs to no live node
    /// process is killed.
    fn sweep_orphans_except(&self, tracked: &BTreeSet<i32>) {
        // A spawn under way carries the token its record announced.
        let live_tokens: BTreeSet<u64> = self
            .nodes
            .values()
            .flat_map(|e| {
                e.proc()
                    .map(|p| p.token)
                    .into_iter()
                    .chain(e.book.spawning())
            })
            .collect();
        for pid in sys::children() {
            if tracked.contains(&pid) {
                continue;
            }
            if let Some(token) = u32::try_from(pid).ok().and_then(cgroup::spawn_token)
                && !live_tokens.contains(&token)
            {
                debug!(pid, "killing a leftover descendant of a stopped node");
                // Our unreaped child: its pid, and the group it may lead, are its own.
                if let Ok(id) = sys::proc_id(pid) {
                    let fd = sys::PidFd::open_id(id).ok();
                    let _ = sys::signal_led_group(id, fd.as_ref(), Signal::SIGKILL);
                    if let Some(fd) = fd {
                        let _ = fd.signal(Signal::SIGKILL);
                    }
                }
            }
        }
    }

    fn reap(&mut self) {
        // While a spawner spawns, its child is known neither here nor in the set.
        let Some(in_flight) = self.in_flight.settled() else {
            self.reap_pending = true;
            return;
        };
        let mut tracked: BTreeSet<i32> = self
            .nodes
            .values()
            .filter_map(|e| e.proc().filter(|p| p.child).map(|p| p.id.pid))
            .collect();
        tracked.extend(in_flight.iter().copied());
        for (pid, exit) in sys::reap_orphans(&|pid| tracked.contains(&pid) || probe::is_probe(pid))
        {
            debug!(pid, ?exit, "reaped an orphaned descendant of a node");
        }
        self.sweep_orphans_except(&tracked);
    }

    /// Rotates oversized node logs, off the actor's thread (rotation copies files).
    fn rotate_logs(&self) {
        let logs: Vec<(String, NodeLogs)> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.proc().is_some())
            .map(|(n, e)| (n.clone(), e.logs.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            for (name, logs) in logs {
                match logs.rotate_if_needed() {
                    Ok(rotated) if !rotated.is_empty() => {
                        debug!(node = %name, ?rotated, "rotated logs");
                    }
                    Ok(_) => {}
                    Err(err) => warn!(node = %name, "cannot rotate logs: {err}"),
                }
            }
        });
    }

    /// Lists the node directories off this task; [`Event::Scanned`] brings the list.
    fn scan_for_pruning(&self) {
        let (dir, events) = (self.nodes_dir.clone(), self.events.clone());
        tokio::task::spawn_blocking(move || {
            let scan = crate::prune::scan(&dir, SystemTime::now());
            let _ = events.send(Event::Scanned(scan));
        });
    }

    /// Renames the expired directories of removed nodes out of the way here, where no
    /// node can be added meanwhile (one deployed again under such a name gets a new
    /// directory), and deletes them, with any earlier leftovers, off this task.
    fn prune(&mut self, scan: crate::prune::Scan) {
        let Some(retention) = self.cfg.removed_node_retention else {
            return;
        };
        // Leftovers of an earlier agent process; later ones are our own, being deleted.
        let mut doomed = if std::mem::replace(&mut self.pruned_once, true) {
            Vec::new()
        } else {
            scan.leftovers
        };
        for name in crate::prune::expired(&scan.dirs, &self.nodes, retention) {
            let from = self.nodes_dir.join(name);
            // Looked at again: since the scan, a node may have been deployed under that
            // name and removed again, making the directory young.
            let now = crate::prune::look(&from, name.to_owned(), SystemTime::now());
            if now.is_none_or(|d| {
                crate::prune::expired(std::slice::from_ref(&d), &self.nodes, retention).is_empty()
            }) {
                continue;
            }
            let to = self.nodes_dir.join(format!(
                "{}{name}-{:08x}",
                crate::prune::PRUNED_PREFIX,
                rand_u32()
            ));
            match std::fs::rename(&from, &to) {
                Ok(()) => {
                    info!(
                        node = %name,
                        "deleting the directory of a node removed more than {} ago",
                        humantime::format_duration(retention)
                    );
                    doomed.push(to);
                }
                Err(e) => warn!(node = %name, "cannot delete {}: {e}", from.display()),
            }
        }
        if !doomed.is_empty() {
            tokio::task::spawn_blocking(move || crate::prune::remove(doomed));
        }
    }

    fn remove_if_done(&mut self, name: &str) {
        let done = self
            .nodes
            .get(name)
            .is_some_and(|e| e.removing && !e.book.machine.has_process());
        if done && let Some(e) = self.nodes.remove(name) {
            if let Some(t) = &e.notify_task {
                t.abort();
            }
            let record = e.dir.join("record.json");
            let _ = std::fs::remove_file(&record);
            self.records.forget(&record);
            let _ = std::fs::remove_file(notify_path(&e.dir));
            if let Some(k) = &self.cfg.keeper {
                k.forget_notify(name);
            }
            if let Some(c) = &self.cgroups {
                remove_cgroup(c.node(name));
                remove_cgroup(c.probe(name));
            }
            self.host.remove(name);
            info!(node = %name, "node removed");
            self.membership_changed = true;
            self.bump(name);
        }
    }

    // === waiters ===

    fn settle_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let now = self.now();
        let view = WaitView {
            nodes: &self.nodes,
            keeper: self.cfg.keeper.as_ref(),
        };
        let step = self.waiters.settle(now, &self.cfg.instance, &view);
        for at in &step.read_outputs {
            let outputs = self
                .nodes
                .get(&at.node)
                .map(|e| e.logs.outputs(waiters::OUTPUT_LINES))
                .unwrap_or_default();
            self.waiters.fill(at, outputs);
        }
        for (id, progress) in step.progress {
            if let Some(tx) = self.waiters.handle(id).and_then(|r| r.progress.as_ref()) {
                tx.send_replace(progress);
            }
        }
        let mut answered = false;
        for (r, results) in self.waiters.answers() {
            let _ = r.reply.send(results);
            answered = true;
        }
        if answered {
            self.answered.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn shutdown_done(&mut self) -> bool {
        let Some((deadline, _)) = &self.shutdown else {
            return false;
        };
        let busy = self.nodes.values().any(|e| e.book.machine.has_process());
        if busy && Instant::now() < *deadline {
            return false;
        }
        if busy {
            warn!("nodes still running at the end of the shutdown grace period; killing them");
            for e in self.nodes.values() {
                if let Some(p) = e.proc() {
                    kill_remains(p);
                }
            }
        }
        if let Some(c) = &self.cgroups
            && self.release_cgroups
        {
            // Nodes were stopped (not left to the next agent): remove the subtree.
            for name in c.node_names() {
                let _ = cgroup::kill(&c.node(&name));
            }
            for cg in c.probe_dirs() {
                let _ = cgroup::kill(&cg);
            }
            c.release();
        }
        if self.release_cgroups {
            self.host.release();
            self.socks.release();
        }
        if let Some((_, reply)) = self.shutdown.take() {
            let _ = reply.send(());
        }
        true
    }

    // === status and records ===

    fn statuses(&self) -> Vec<NodeStatus> {
        let clock = self.wall_clock();
        self.nodes
            .iter()
            .map(|(name, e)| Self::status_of(name, e, clock))
            .collect()
    }

    /// The statuses of those of `names` that still exist.
    fn statuses_of(&self, names: &BTreeSet<String>) -> Vec<NodeStatus> {
        let clock = self.wall_clock();
        names
            .iter()
            .filter_map(|n| self.nodes.get_key_value(n))
            .map(|(name, e)| Self::status_of(name, e, clock))
            .collect()
    }

    /// This clock's now and the wall clock's (epoch ms), to tell a machine's deadline
    /// as a time of day.
    fn wall_clock(&self) -> (Millis, u64) {
        (self.now(), epoch_ms())
    }

    /// A node's status, without resource figures (see [`Supervisor::status`]); `clock`
    /// from [`Core::wall_clock`].
    fn status_of(name: &str, e: &Entry, (now, epoch_now): (Millis, u64)) -> NodeStatus {
        let mut s = NodeStatus::new(name, to_model_state(e.book.machine.state()), MgmtRole::None);
        s.cluster_role = e.spec.role.clone();
        s.port = e.spec.port;
        s.metrics_port = e.spec.metrics_port;
        s.restarts = u32::try_from(e.restarts()).unwrap_or(u32::MAX);
        s.last_exit = e.book.last_exit;
        s.ready = e.book.machine.ready_at().is_some();
        // What a process said of itself, while it runs (as its record keeps it).
        s.status_text = e.proc().and(e.book.status_text.clone());
        s.generation = Some(e.deploy_gen);
        s.last_error = e.book.error();
        s.last_failure.clone_from(&e.book.last_failure);
        s.oom_kills = e.book.oom_kills;
        s.liveness_failures = e.book.liveness_failures;
        if let Some(p) = e.proc() {
            s.pid = u32::try_from(p.id.pid).ok();
            s.started_at_ms = Some(p.started_at_ms);
            s.generation = Some(p.deploy_gen);
            s.stopping_since_ms = e.stop_sent_ms.filter(|_| e.book.machine.is_stopping());
        }
        s.restart_at_ms = e
            .book
            .machine
            .next_restart_at()
            .map(|at| epoch_now.saturating_add(at.saturating_sub(now)));
        s
    }

    fn save_record(&mut self, name: &str) {
        let Some((path, bytes)) = self.record_of(name) else {
            return;
        };
        let Some(e) = self.nodes.get_mut(name) else {
            return;
        };
        if bytes == e.written {
            return;
        }
        self.record_seq += 1;
        let w = crate::records::Write {
            path,
            seq: self.record_seq,
            bytes,
        };
        // A node whose first spawn failed before making its directory (its record
        // keeps the error for a later agent process).
        if e.fresh
            && let Err(err) = make_node_dir(&e.dir)
        {
            warn!(node = %name, "cannot create {}: {err}", e.dir.display());
        }
        // Made last, it is the newest: written.
        match self.records.write(&w, write_record) {
            Ok(_) => e.written = w.bytes,
            Err(err) => warn!(node = %name, "cannot write {}: {err}", w.path.display()),
        }
    }

    /// The node's record as it is to be written, and where.
    fn record_of(&self, name: &str) -> Option<(PathBuf, Vec<u8>)> {
        let e = self.nodes.get(name)?;
        let of = e.spawn_of.as_ref();
        let record = Record {
            spec: e
                .proc()
                .as_ref()
                .map(|p| &p.spec)
                .or(of.map(|o| &o.spec))
                .unwrap_or(&e.spec)
                .clone(),
            config_id: e.config_id.clone(),
            generation: e
                .proc()
                .as_ref()
                .map(|p| p.deploy_gen)
                .or(of.map(|o| o.deploy_gen))
                .unwrap_or(e.deploy_gen),
            epoch: e
                .proc()
                .as_ref()
                .map(|p| p.epoch)
                .or(of.map(|o| o.epoch))
                .unwrap_or(self.restart_epoch),
            spawning: e.book.spawning(),
            process: e.proc().map(|p| RecordedProcess {
                pid: p.id.pid,
                start_ticks: p.id.start_ticks,
                started_at_ms: p.started_at_ms,
                token: p.token,
                cgroup: p.cgroup.clone(),
                boot: sys::boot_id().map(str::to_owned),
            }),
            ready: e.book.machine.ready_at().is_some(),
            restarts: e.restarts(),
            stopped: e.stopped_by_operator,
            restarting: e.book.machine.is_restarting(),
            ended: match e.book.machine.state() {
                _ if e.proc().is_some()
                    || e.stopped_by_operator
                    || e.removing
                    || e.stopped_with_agent =>
                {
                    None
                }
                machine::State::Failed => Some(Ended::Failed),
                machine::State::Stopped if e.book.last_exit.is_some() => Some(Ended::Done),
                _ => None,
            },
            last_exit: e.book.last_exit,
            restart_due: e.book.machine.state() == machine::State::Crashed,
            restart_at_ms: e.book.machine.next_restart_at().map(|at| {
                let now = self.now();
                epoch_ms().saturating_add(at.saturating_sub(now))
            }),
            failures: e.book.machine.consecutive_failures(),
            last_error: e.book.error(),
            last_failure: e.book.last_failure.clone(),
            plan_failed: e.plan_failed(),
            oom_kills: e.book.oom_kills,
            liveness_failures: e.book.liveness_failures,
            status_text: e.proc().and(e.book.status_text.clone()),
        };
        let bytes = serde_json::to_vec(&record).expect("records serialize");
        Some((e.dir.join("record.json"), bytes))
    }

    /// See [`Supervisor::direct_log_writers`]: adopted processes whose stdout or
    /// stderr is one of their node's log files.
    fn direct_log_writers(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let id = |m: std::fs::Metadata| (m.dev(), m.ino());
        self.nodes
            .values()
            .filter(|e| {
                let Some(p) = e.proc().filter(|p| !p.child) else {
                    return false;
                };
                let files: Vec<_> = [Stream::Stdout, Stream::Stderr]
                    .into_iter()
                    .filter_map(|s| std::fs::metadata(e.logs.path(s)).ok().map(id))
                    .collect();
                // Following the links: the files the descriptors are open on.
                [1, 2].into_iter().any(|fd| {
                    std::fs::metadata(format!("/proc/{}/fd/{fd}", p.id.pid))
                        .is_ok_and(|m| files.contains(&id(m)))
                })
            })
            .map(|e| e.dir.clone())
            .collect()
    }

    /// Converges on the desired state the last Apply wrote, from whatever a previous
    /// agent process left: reads the records, checks their processes (pid and start
    /// time), looks for processes of unconfirmed spawns by their token, lets
    /// [`converge::recover`] decide, and carries that out. Live processes that run
    /// their node's desired spec are adopted and keep their pids; those of nodes no
    /// longer desired are stopped and their records removed; outdated ones are
    /// restarted; desired nodes without a process are started.
    fn recover(&mut self) {
        let records = self.read_records();
        let announced: BTreeSet<u64> = records
            .values()
            .filter(|r| r.process.is_none())
            .filter_map(|r| r.spawning)
            .collect();
        // Without cgroups, whatever carries a token of this state dir's agents is looked
        // at too: a node's descendants in sessions of their own outlive its record when
        // an agent died between the node's exit and their kill.
        let prefix = self.cgroups.is_none().then_some(self.next_token >> 32);
        let mut strays = if announced.is_empty() && prefix.is_none() {
            BTreeMap::new()
        } else {
            find_token_carriers(&|t| announced.contains(&t) || prefix.is_some_and(|p| t >> 32 == p))
        };
        let found: BTreeMap<String, Found> = records
            .iter()
            .map(|(name, r)| {
                let alive = r.process.as_ref().filter(|p| p.alive()).map(|p| p.pid);
                let found = Found {
                    spec: r.spec.clone(),
                    epoch: r.epoch,
                    stopped: r.stopped,
                    restarting: r.restarting,
                    ended: r.ended.is_some(),
                    recorded: r.process.is_some() || r.restart_due,
                    alive,
                    strays: r
                        .spawning
                        .filter(|_| r.process.is_none())
                        .and_then(|t| strays.remove(&t))
                        .unwrap_or_default(),
                };
                (name.clone(), found)
            })
            .collect();
        let live_tokens: BTreeSet<u64> = records
            .values()
            .filter_map(|r| r.process.as_ref())
            .filter(|p| p.alive())
            .map(|p| p.token)
            .collect();
        for (token, list) in &strays {
            if live_tokens.contains(token) {
                continue;
            }
            for stray in list {
                info!(
                    pid = stray.pid,
                    "killing a leftover of a node whose process ended while no agent ran"
                );
                kill_pid(stray.pid);
            }
        }
        let desired = match read_desired(&self.desired_path()) {
            Ok(Some(d)) => d,
            Ok(None) => converge::legacy_desired(&found),
            Err(err) => {
                warn!("{err}; keeping the nodes of the records until the controller applies again");
                converge::legacy_desired(&found)
            }
        };
        self.applied.send_replace(desired.generation);
        self.restart_epoch = desired.restart_epoch;
        let plans = converge::recover(&desired, &found);
        let mut prepared = self.prepare(
            desired
                .nodes
                .iter()
                .filter(|(name, _)| !records.contains_key(*name))
                .map(|(name, spec)| (name.as_str(), spec)),
        );
        // A node whose process lives reads on the notify socket the log keeper held
        // for it, with what the keeper heard there meanwhile (see
        // [`crate::keeper::notify`]); without one (no keeper, or it was started anew)
        // the socket is bound anew, so that its READY=1, WATCHDOG=1 and STATUS= reach
        // this agent from now on; only the socket: its directory keeps the owner and
        // mode it has. A socket that cannot be bound costs the node its notifications,
        // not its adoption.
        let mut heard = BTreeMap::new();
        for (name, f) in &found {
            if f.alive.is_none() || drover_proto::name::check(name).is_err() {
                continue;
            }
            let kept = self.cfg.keeper.as_ref().and_then(|k| k.take_notify(name));
            let kept = kept.and_then(|(fd, h)| {
                let sock = still_bound(fd, &notify_path(&self.socks.dir(name)))?;
                heard.insert(name.clone(), h);
                Some(sock)
            });
            let rebound = kept
                .map_or_else(
                    || {
                        self.socks
                            .ensure(name)
                            .and_then(|()| bind_notify(&self.socks.dir(name)))
                    },
                    Ok,
                )
                .and_then(|sock| {
                    probe::pass_credentials(&sock)?;
                    Ok(crate::spawner::Made {
                        sock,
                        marks: [crate::logs::Mark { ino: 0, len: 0 }; 2],
                    })
                });
            match rebound {
                Ok(made) => {
                    prepared.insert(name.clone(), Ok(made));
                }
                Err(err) => warn!(
                    node = %name,
                    "cannot bind the node's notify socket again ({err}); what it sends there is lost"
                ),
            }
        }
        let now = self.now();
        for (name, plan) in plans {
            for pid in &plan.kill {
                info!(node = %name, pid, "killing a process of an unrecorded spawn");
                kill_pid(*pid);
            }
            let record = records.get(&name);
            let spec = match (desired.nodes.get(&name), record) {
                (Some(spec), _) => spec.clone(),
                (None, Some(r)) => r.spec.clone(),
                (None, None) => continue,
            };
            if plan.then == Then::Remove {
                info!(node = %name, "node is no longer desired; removing it");
                let dir = self.nodes_dir.join(&name);
                let _ = std::fs::remove_file(dir.join("record.json"));
                let _ = std::fs::remove_file(notify_path(&dir));
                if let Some(k) = &self.cfg.keeper {
                    k.forget_notify(&name);
                }
                continue;
            }
            let config_id = record.map(|r| r.config_id.clone()).unwrap_or_default();
            if let Err(err) = self.create(&name, spec, &config_id, prepared.remove(&name)) {
                warn!(node = %name, "cannot restore node: {err}");
                continue;
            }
            let e = self.nodes.get_mut(&name).expect("just created");
            e.deploy_gen = desired.generation;
            if record.is_some() {
                // Where a recorded node's output began is not known to this agent process.
                e.output_marks = None;
            }
            // Before serving, like the rest of recovery: an adopted node's socket and
            // directory are given back to its user (making the node's entry reset them).
            if crate::exec::wanted(&e.spec) {
                let notify = notify_path(&self.socks.dir(&name));
                let plan = crate::exec::prepare(&name, &e.spec, &e.dir, &notify);
                e.plan = Some(plan.map(std::sync::Arc::new));
            }
            if let Some(r) = record {
                e.restarts_base = r.restarts;
                e.book.last_error.clone_from(&r.last_error);
                e.book.last_failure.clone_from(&r.last_failure);
                e.plan_failed_before = r.plan_failed;
                e.book.oom_kills = r.oom_kills;
                e.book.liveness_failures = r.liveness_failures;
                e.book.last_exit = r.last_exit;
            }
            let adopt = match plan.then {
                Then::Adopt { pid }
                | Then::Stop { pid }
                | Then::Restart { pid }
                | Then::StopAndRemove { pid } => Some(pid),
                Then::Start { .. } | Then::StayStopped | Then::StayEnded | Then::Remove => None,
            };
            let mut actions = Vec::new();
            let mut adopted = true;
            if let (Some(pid), Some(r)) = (adopt, record) {
                match self.adopt(&name, pid, r, desired.generation) {
                    Ok(a) => actions = a,
                    Err(err) => {
                        warn!(node = %name, pid, "cannot watch adopted process ({err}); killing it");
                        kill_pid(pid);
                        if let Some(cg) = r.process.as_ref().and_then(|p| p.cgroup.as_ref()) {
                            let _ = cgroup::kill(cg);
                        }
                        adopted = false;
                    }
                }
            }
            let e = self.nodes.get_mut(&name).expect("just created");
            match plan.then {
                Then::Adopt { .. } => {
                    if !adopted {
                        e.restarts_base += 1;
                        actions.extend(e.book.machine.start(now));
                    }
                }
                Then::Stop { .. } => {
                    e.stopped_by_operator = true;
                    actions.extend(e.book.machine.stop(now));
                }
                Then::Restart { .. } => {
                    if record.is_some_and(|r| r.restarting && r.spec == e.spec) {
                        info!(node = %name, "a restart of the node was under way when the last agent ended; finishing it");
                    } else {
                        info!(node = %name, "node runs an outdated spec; restarting it");
                    }
                    // Stopped as the spec it runs says (its signal comes from the
                    // process's own spec, its timeout from the machine's), started as
                    // the desired one does: as a redeploy does with no agent restart.
                    if let Some(r) = record {
                        e.book.machine.reconfigure(machine_config(&r.spec));
                    }
                    actions.extend(e.book.machine.stop(now));
                    e.book.machine.reconfigure(machine_config(&e.spec));
                    actions.extend(e.book.machine.start(now));
                }
                Then::StopAndRemove { .. } => {
                    info!(node = %name, "node is no longer desired; stopping it");
                    e.removing = true;
                    actions.extend(e.book.machine.stop(now));
                }
                Then::Start { lost } => {
                    // Only for the spec the backoff was for: a new one starts afresh.
                    let backoff = record
                        .filter(|r| lost && r.restart_due && r.spec == e.spec)
                        .and_then(|r| Some((r.restart_at_ms?, r.failures)));
                    if let Some((at_ms, streak)) = backoff {
                        // Its backoff goes on where the last agent left it, no longer
                        // than its longest (a clock set back since is not waited out).
                        let wait = at_ms
                            .saturating_sub(epoch_ms())
                            .min(millis(e.spec.backoff.max));
                        info!(node = %name, wait_ms = wait, "node's restart was due when the last agent ended; it waits out the rest of its backoff");
                        let exit = e.book.last_exit.map(|x| match x {
                            model::ExitStatus::Code(c) => machine::ExitStatus::Code(c),
                            model::ExitStatus::Signal(s) => machine::ExitStatus::Signal(s),
                        });
                        actions.extend(e.book.machine.restore_backoff(
                            now,
                            streak,
                            now.saturating_add(wait),
                            exit,
                        ));
                        self.run_actions(&name, actions);
                        self.save_record(&name);
                        continue;
                    }
                    if lost {
                        if record.is_some_and(|r| r.restart_due) {
                            info!(node = %name, "node's restart was due when the last agent ended; starting it");
                        } else {
                            info!(node = %name, "node's process ended while no agent ran; starting it again");
                        }
                        e.restarts_base += 1;
                    }
                    actions.extend(e.book.machine.start(now));
                }
                Then::StayStopped => e.stopped_by_operator = true,
                Then::StayEnded => {
                    let failed = record.and_then(|r| r.ended) == Some(Ended::Failed);
                    let exit = e.book.last_exit.map(|x| match x {
                        model::ExitStatus::Code(c) => machine::ExitStatus::Code(c),
                        model::ExitStatus::Signal(s) => machine::ExitStatus::Signal(s),
                    });
                    actions.extend(e.book.machine.restore_ended(now, failed, exit));
                }
                Then::Remove => {}
            }
            self.run_actions(&name, actions);
            self.save_record(&name);
            // What it said while no agent ran, before what it says from now on.
            for h in heard.remove(&name).unwrap_or_default() {
                self.event(heard_event(&name, h));
            }
            self.remove_if_done(&name);
        }
        if let Some(k) = &self.cfg.keeper {
            k.forget_unclaimed();
        }
        self.sweep_stale_cgroups();
    }

    /// The records in the state dir, by node name; unreadable ones are skipped.
    fn read_records(&self) -> BTreeMap<String, Record> {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(&self.nodes_dir) else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path().join("record.json");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match read_record(&bytes) {
                Ok(r) => {
                    out.insert(name, r);
                }
                Err(err) => {
                    warn!(node = %name, "ignoring unreadable record {}: {err}", path.display());
                }
            }
        }
        out
    }

    /// Kills what runs in node cgroups that no live node process owns: the leftovers
    /// of nodes whose process ended, or whose record is gone, while no agent ran.
    /// Removes those of unknown nodes.
    fn sweep_stale_cgroups(&self) {
        for name in self.host.sweep(|n| self.nodes.contains_key(n)) {
            info!(node = %name, "removed the v1 cgroups of a node this agent no longer has");
        }
        let Some(c) = &self.cgroups else {
            let killed = probe::kill_orphans(&self.probe_owner);
            if killed > 0 {
                info!(
                    killed,
                    "killed what probes of the last agent process left running"
                );
            }
            return;
        };
        c.kill_strays();
        // No probe outlives the agent process that ran it.
        for cg in c.probe_dirs() {
            remove_cgroup(cg);
        }
        for name in c.node_names() {
            let cg = c.node(&name);
            // A node with a spawn under way (recovery starts nodes before this sweep)
            // may have its new child in the cgroup already: the spawn emptied the
            // cgroup of what was left before it made the child there.
            let owned = self.nodes.get(&name).is_some_and(|e| {
                e.proc().and_then(|p| p.cgroup.as_ref()) == Some(&cg)
                    || e.book.spawning().is_some()
                    || e.spawn_of.is_some()
            });
            if owned {
                continue;
            }
            if cgroup::populated(&cg) {
                info!(node = %name, "killing what is left in {}", cg.display());
                let _ = cgroup::kill(&cg);
            }
            if !self.nodes.contains_key(&name) {
                remove_cgroup(cg);
            }
        }
    }

    /// Takes over a live process of node `name` (the one its record names, or one of a
    /// spawn the record announced) and watches it for its exit through a pidfd.
    fn adopt(
        &mut self,
        name: &str,
        pid: i32,
        record: &Record,
        generation: u64,
    ) -> std::io::Result<Vec<Action>> {
        let now = self.now();
        let (id, token, started_at_ms, ready, cgroup) =
            match record.process.as_ref().filter(|p| p.pid == pid) {
                Some(p) => (
                    ProcId {
                        pid,
                        start_ticks: p.start_ticks,
                    },
                    p.token,
                    p.started_at_ms,
                    record.ready,
                    p.cgroup.clone(),
                ),
                None => {
                    let id = sys::proc_id(pid)?;
                    let started = sys::start_time_epoch_ms(id).unwrap_or_else(epoch_ms);
                    let token = record.spawning.unwrap_or(0);
                    let cgroup = self.contain_adopted(name, u32::try_from(pid).unwrap_or(0), token);
                    (id, token, started, false, cgroup)
                }
            };
        let fd = sys::PidFd::open_id(id)?;
        let limits = Limits::of(&record.spec);
        self.host.adopted(name, &limits);
        let oom_base = if self.host.counts_oom(&limits) {
            self.host.oom_kills(name)
        } else {
            None
        };
        let current = self
            .nodes
            .get(name)
            .is_some_and(|e| e.spec == record.spec && record.epoch >= self.restart_epoch);
        let epoch = record.epoch;
        let Some(e) = self.nodes.get_mut(name) else {
            return Ok(Vec::new());
        };
        let proc = Proc {
            id,
            token,
            spec: record.spec.clone(),
            deploy_gen: if current {
                generation
            } else {
                record.generation
            },
            epoch,
            started_at_ms,
            probe: None,
            child: false,
            cgroup,
            pidfd: sys::PidFd::open_id(id).ok(),
            oom_base,
            monitors: None,
        };
        let actions = e
            .book
            .adopted(now, u32::try_from(pid).unwrap_or(0), ready, proc);
        // The recorded process's own status; another process found instead has none yet.
        e.book.status_text = record
            .process
            .as_ref()
            .filter(|p| p.pid == pid)
            .and(record.status_text.clone());
        let spawn_generation = e.book.spawns();
        e.last_pipes = None;
        // A node adopted while it was starting is still watched for its port.
        let port = match &record.spec.readiness {
            model::Readiness::Tcp { port, .. } if !ready => Some(*port),
            _ => None,
        };
        let probe = port.map(|port| self.probe_tcp(name, spawn_generation, port));
        if let Some(p) = self.nodes.get_mut(name).and_then(|e| e.book.process_mut()) {
            p.probe = probe;
        }
        let events = self.events.clone();
        let host = self.host.clone();
        let node = name.to_owned();
        tokio::spawn(async move {
            let _ = fd.exited().await;
            let oom = oom_since(&host, &node, oom_base);
            let _ = events.send(Event::Exited {
                node,
                generation: spawn_generation,
                exit: machine::ExitStatus::Code(-1),
                oom,
            });
        });
        info!(node = %name, pid, "adopted running node");
        Ok(actions)
    }
}

impl Core {
    /// Reads, off this task, the OOM kills in the memory cgroup of every running node
    /// that has one: a process of the node other than its main one killed by the
    /// kernel is counted while the node runs on, not only when its main process ends.
    fn check_ooms(&self) {
        let watched: Vec<(String, u64, u64)> = self
            .nodes
            .iter()
            .filter_map(|(name, e)| {
                let base = e.proc()?.oom_base?;
                Some((name.clone(), e.book.live_spawn()?, base))
            })
            .collect();
        let host = self.host.clone();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            for (node, generation, base) in watched {
                let oom = oom_since(&host, &node, Some(base));
                if oom > 0 {
                    let _ = events.send(Event::OomWhileRunning {
                        node,
                        generation,
                        oom,
                    });
                }
            }
        });
    }
}

/// OOM kills in `node`'s memory cgroup since there were `base` (none without a base).
fn oom_since(host: &limits::Host, node: &str, base: Option<u64>) -> u64 {
    base.and_then(|before| Some(host.oom_kills(node)?.saturating_sub(before)))
        .unwrap_or(0)
}

/// SIGKILL to a process and to the process group it leads, if it leads one.
fn kill_pid(pid: i32) {
    let _ = sys::signal_group(pid, Signal::SIGKILL);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
}

/// The live processes carrying a `DROVER_NODE_TOKEN` that `wanted` accepts, by token:
/// reads the environment of every process on the host, so it is done only at start-up
/// (when a record announced a spawn it never confirmed, or without cgroups) and for an
/// adopted node's remains.
fn find_token_carriers(wanted: &dyn Fn(u64) -> bool) -> BTreeMap<u64, Vec<Stray>> {
    let mut out: BTreeMap<u64, Vec<Stray>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(token) = u32::try_from(pid)
            .ok()
            .and_then(cgroup::spawn_token)
            .filter(|t| wanted(*t))
        else {
            continue;
        };
        let Ok(stat) = sys::proc_stat(pid) else {
            continue;
        };
        if stat.state == 'Z' {
            continue;
        }
        out.entry(token).or_default().push(Stray {
            pid,
            leader: stat.pgrp == pid,
        });
    }
    out
}

/// The environment every process of node `name` starts with: the node adds its notify
/// socket, query socket and spawn token, an exec probe the node's pid.
fn node_env<'a>(name: &str, instance: &str, spec: &'a Node) -> BTreeMap<&'a str, String> {
    let mut env: BTreeMap<&str, String> = BTreeMap::from([(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
    )]);
    env.extend(spec.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    env.extend([
        ("DROVER_NODE", name.to_owned()),
        ("DROVER_INSTANCE", instance.to_owned()),
        ("DROVER_ROLE", spec.role.as_str().to_owned()),
    ]);
    env
}

/// Kills what is left of a node: everything in its cgroup, or else its process group.
fn kill_remains(p: &Proc) {
    let _ = signal_node(p, Signal::SIGKILL);
}

/// Sends `sig` to a node: every process in its cgroup, or without one its process
/// group; never to a bare process group id (see [`sys::signal_led_group`]).
fn signal_node(p: &Proc, sig: Signal) -> std::io::Result<()> {
    let group = || sys::signal_led_group(p.id, p.pidfd.as_ref(), sig);
    let via_cgroup = match &p.cgroup {
        Some(cg) if sig == Signal::SIGKILL => cgroup::kill(cg),
        Some(cg) => cgroup::signal(cg, sig).map(|_| ()),
        None => return group().map(|_| ()),
    };
    match via_cgroup {
        // The cgroup's files and the processes' pidfds take descriptors the agent has
        // run out of (log follows, probes): its process group, through the pidfd held
        // for it, needs none. What left the group is reached once descriptors are free
        // (a stop's kill is tried again every second).
        Err(e) if sys::out_of_fds(&e) => {
            warn!(
                pid = p.id.pid,
                "out of file descriptors: signalling the node's process group instead of its cgroup ({e})"
            );
            // Failing that too, its main process through the pidfd held for it.
            match (group(), &p.pidfd) {
                (Ok(true), _) => Ok(()),
                (_, Some(fd)) => fd.signal(sig),
                (other, None) => other.map(|_| ()),
            }
        }
        other => other,
    }
}

/// Kills what is left in a removed node's cgroup and removes it once empty, off the
/// supervisor task (dying processes take a moment to leave).
fn remove_cgroup(cg: PathBuf) {
    let _ = cgroup::kill(&cg);
    if cgroup::remove(&cg).is_ok() {
        return;
    }
    tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !cgroup::populated(&cg) {
                if let Err(err) = cgroup::remove(&cg) {
                    warn!("cannot remove cgroup {}: {err}", cg.display());
                }
                return;
            }
        }
        warn!("cgroup {} is still populated; leaving it", cg.display());
    });
}

/// What [`crate::ops`] sees of the nodes.
struct OpsTable<'a>(&'a BTreeMap<String, Entry>);

impl ops::Nodes for OpsTable<'_> {
    fn all(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, e)| !e.removing)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn node(&self, name: &str) -> Option<ops::Facts> {
        self.0.get(name).map(|e| ops::Facts {
            has_process: e.proc().is_some(),
            spawns: e.book.spawns(),
        })
    }
}

/// What [`crate::apply`] sees of the nodes.
struct ApplyTable<'a> {
    nodes: &'a BTreeMap<String, Entry>,
    applied: u64,
    restart_epoch: u64,
}

impl<'a> ApplyTable<'a> {
    fn of(nodes: &'a BTreeMap<String, Entry>, applied: &watch::Sender<u64>, epoch: u64) -> Self {
        Self {
            nodes,
            applied: *applied.borrow(),
            restart_epoch: epoch,
        }
    }
}

impl apply::Table for ApplyTable<'_> {
    fn applied(&self) -> u64 {
        self.applied
    }

    fn restart_epoch(&self) -> u64 {
        self.restart_epoch
    }

    fn specs(&self) -> Vec<(&str, &Node)> {
        self.nodes
            .iter()
            .map(|(n, e)| (n.as_str(), &e.spec))
            .collect()
    }

    fn facts(&self, node: &str) -> Option<apply::Facts> {
        let e = self.nodes.get(node)?;
        Some(apply::Facts {
            plan_failed: e.plan_failed(),
            // CRASHED too when its last start failed for its plan: a deploy that finds
            // its user now starts it at once, not a backoff later.
            failed: match e.book.machine.state() {
                machine::State::Failed => true,
                machine::State::Crashed => e.plan_failed(),
                _ => false,
            },
            has_process: e.book.machine.has_process(),
            removing: e.removing,
        })
    }
}

/// What [`Waiters`] sees of the supervisor's nodes and the log keeper.
struct WaitView<'a> {
    nodes: &'a BTreeMap<String, Entry>,
    keeper: Option<&'a crate::keeper::Keeper>,
}

impl waiters::View for WaitView<'_> {
    fn seen(&self, node: &str) -> Option<converge::Seen> {
        self.nodes.get(node).map(|e| converge::Seen {
            state: e.book.machine.state(),
            has_process: e.book.machine.has_process(),
            stopping: e.book.machine.is_stopping(),
            spawns: e.book.spawns(),
        })
    }

    fn state_name(&self, node: &str) -> &'static str {
        self.nodes
            .get(node)
            .map_or("gone", |e| to_model_state(e.book.machine.state()).as_str())
    }

    fn failure(&self, node: &str) -> waiters::Failure {
        self.nodes
            .get(node)
            .map(|e| waiters::Failure {
                text: failure_text(e),
                last_error: e.book.error(),
                pipes: e.last_pipes.filter(|_| self.keeper.is_some()),
                never_ran: e.start_failed,
            })
            .unwrap_or_default()
    }

    fn pipe_end(&self, ino: u64) -> PipeEnd {
        self.keeper.map_or(PipeEnd::Closed, |k| k.pipe_end(ino))
    }
}

/// Whole milliseconds of `d`, as the pure cores count time.
fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn failure_text(e: &Entry) -> String {
    match (e.book.error(), e.book.last_exit) {
        (Some(err), _) => err,
        (None, Some(model::ExitStatus::Code(c))) => format!("node exited with code {c}"),
        (None, Some(model::ExitStatus::Signal(s))) => format!("node was killed by signal {s}"),
        (None, None) => "node failed".to_owned(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent sets in a node's environment is what stage refuses a
    /// configuration to set, so that nothing is replaced without a word.
    #[test]
    fn the_variables_the_agent_sets_are_those_stage_refuses() {
        let mut spec = Node::new("n1", "agent-1");
        spec.env.insert("OWN".into(), "x".into());
        for var in node_env("n1", "agent-1", &spec).keys() {
            assert!(
                matches!(*var, "PATH" | "OWN") || drover_proto::argv::AGENT_SET.contains(var),
                "{var} is set by the agent but not refused at stage"
            );
        }
        for var in [
            "NOTIFY_SOCKET",
            "DROVER_QUERY_SOCKET",
            "DROVER_NODE_TOKEN",
            "WATCHDOG_USEC",
        ] {
            assert!(drover_proto::argv::AGENT_SET.contains(&var), "{var}");
        }
    }

    /// An agent out of file descriptors cannot open a node's cgroup files, nor pidfds
    /// for its processes: the stop still reaches the node, through the pidfd it holds.
    /// (nextest runs each test in a process of its own, whose descriptors this one may
    /// use up.)
    #[test]
    fn a_node_is_signalled_when_the_agent_is_out_of_file_descriptors() {
        use std::os::unix::process::CommandExt as _;
        if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() != Ok("process-per-test") {
            eprintln!("skipped: it uses up its process's descriptors");
            return;
        }
        let cgroup = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let p = Proc {
            id: sys::proc_id(pid).unwrap(),
            token: 0,
            spec: Node::new("n1", "agent-1"),
            deploy_gen: 0,
            epoch: 0,
            started_at_ms: 0,
            probe: None,
            child: true,
            cgroup: Some(cgroup.path().to_owned()),
            pidfd: Some(sys::PidFd::open(pid).unwrap()),
            oom_base: None,
            monitors: None,
        };
        // Every descriptor taken, under a small limit.
        let limit = libc::rlimit {
            rlim_cur: 256,
            rlim_max: libc::RLIM_INFINITY,
        };
        let mut hard = limit;
        // SAFETY: valid rlimit structs of the right type.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut hard), 0);
            let soft = libc::rlimit {
                rlim_max: hard.rlim_max,
                ..limit
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const soft), 0);
        }
        let mut held = Vec::new();
        let exhausted = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
            assert!(held.len() <= 256, "the limit holds");
        };
        assert!(sys::out_of_fds(&exhausted), "{exhausted}");
        let sent = signal_node(&p, Signal::SIGKILL);
        drop(held);
        sent.unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }

    #[test]
    fn a_desired_state_that_cannot_be_put_in_place_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.json");
        // A non-empty directory where the file goes: the rename fails, even for root.
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), b"").unwrap();
        let desired = Desired {
            generation: 3,
            restart_epoch: 0,
            nodes: BTreeMap::new(),
        };
        write_desired(&path, &desired).unwrap_err();
        assert!(!dir.path().join("desired.json.tmp").exists());
        std::fs::remove_dir_all(&path).unwrap();
        write_desired(&path, &desired).unwrap();
        assert_eq!(read_desired(&path).unwrap(), Some(desired));
    }

    #[test]
    fn records_are_rewritten_in_place_and_read_past_a_stale_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        let record = |restarts: u64, config_id: &str| Record {
            spec: Node::new("n1", "agent-1"),
            config_id: config_id.to_owned(),
            generation: 0,
            epoch: 0,
            spawning: None,
            process: None,
            ready: true,
            restarts,
            stopped: false,
            restarting: false,
            ended: None,
            last_exit: None,
            last_error: None,
            last_failure: None,
            restart_due: false,
            restart_at_ms: None,
            failures: 0,
            plan_failed: false,
            oom_kills: 0,
            liveness_failures: 0,
            status_text: None,
        };
        let long = serde_json::to_vec_pretty(&record(1, "a-long-configuration-id")).unwrap();
        let short = serde_json::to_vec_pretty(&record(2, "short")).unwrap();
        write_record(&path, &long).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        write_record(&path, &short).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&meta),
            ino,
            "same inode"
        );
        assert_eq!(meta.len(), short.len() as u64, "cut to length");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        // An agent killed between the write and the cut leaves the old tail behind.
        let mut torn = short.clone();
        torn.extend_from_slice(&long[short.len()..]);
        let r = read_record(&torn).unwrap();
        assert_eq!((r.restarts, r.config_id.as_str()), (2, "short"));
        // A record larger than a page goes through a temp file and a rename instead.
        let mut big = record(3, "big");
        big.spec
            .files
            .insert("cluster-layout.zeek".into(), "x".repeat(IN_PLACE_MAX));
        let big = serde_json::to_vec_pretty(&big).unwrap();
        write_record(&path, &big).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_ne!(
            std::os::unix::fs::MetadataExt::ino(&meta),
            ino,
            "a new file"
        );
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        assert_eq!(
            read_record(&std::fs::read(&path).unwrap())
                .unwrap()
                .restarts,
            3
        );
        assert!(!path.with_extension("tmp").exists());
        assert!(read_record(b"").is_err());
        assert!(read_record(b"{\"spec\":").is_err());
    }

    /// A supervisor without cgroups on state dir `dir`; call on a runtime.
    fn bare_supervisor(dir: &Path) -> Supervisor {
        Supervisor::start(SupervisorConfig {
            instance: "agent-1".into(),
            state_dir: dir.to_owned(),
            logs: LogConfig::default(),
            cgroup: CgroupSetting::None,
            keeper: None,
            removed_node_retention: None,
        })
        .unwrap()
    }

    #[test]
    fn a_panic_of_the_supervisor_task_is_reported_and_stops_the_pings() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sup = bare_supervisor(dir.path());
            assert!(sup.ping(Duration::from_secs(5)).await);
            sup.tx.send(Command::Panic).await.unwrap();
            let what = tokio::time::timeout(Duration::from_secs(5), sup.failed())
                .await
                .expect("the failure is reported");
            assert_eq!(what, "it panicked: asked to panic");
            assert!(!sup.ping(Duration::from_secs(1)).await);
            // Requests to it get an error about the agent, not an empty (successful)
            // answer: the controller must not take the Apply as applied.
            let deadline = Instant::now() + Duration::from_secs(1);
            let rs = sup
                .apply(
                    Configuration::empty(),
                    Restart::default(),
                    7,
                    deadline,
                    None,
                )
                .await;
            assert!(
                rs.len() == 1 && !rs[0].success && rs[0].node.is_none(),
                "{rs:?}"
            );
            let rs = sup.act(Op::Restart, Vec::new(), deadline, deadline).await;
            assert!(rs.len() == 1 && !rs[0].success, "{rs:?}");
        });
    }

    /// A runtime with two workers, as the agent's.
    fn two_workers() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_stuck_supervisor_task_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let rt = two_workers();
        rt.block_on(async {
            let sup = bare_supervisor(dir.path());
            let limit = Duration::from_millis(300);
            // Answering: not stalled over several asks.
            assert!(
                tokio::time::timeout(limit * 4, sup.stalled(limit))
                    .await
                    .is_err(),
                "an answering supervisor is not stalled"
            );
            sup.tx
                .send(Command::Stall(Duration::from_secs(3)))
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), sup.stalled(limit))
                .await
                .expect("the stall is noticed before it ends");
        });
    }

    #[test]
    fn a_stuck_spawner_is_noticed_as_a_stall() {
        let dir = tempfile::tempdir().unwrap();
        let rt = two_workers();
        // The node's file is a FIFO nobody writes: the spawner blocks reading it.
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let fifo = work.join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let text = format!(
            "[instances.agent-1]\n[nodes.x]\ninstance = \"agent-1\"\ncommand = [\"/bin/true\"]\nworkdir = \"{}\"\n",
            work.display()
        );
        let mut config = drover_proto::config::parse_toml("c.toml", &text).unwrap();
        config.nodes[0].files.insert("f".into(), "x".into());
        rt.block_on(async {
            let sup = bare_supervisor(&dir.path().join("state"));
            let limit = Duration::from_millis(300);
            let apply = tokio::spawn({
                let sup = sup.clone();
                async move {
                    sup.apply(
                        config,
                        Restart::default(),
                        1,
                        Instant::now() + Duration::from_secs(30),
                        None,
                    )
                    .await
                }
            });
            tokio::time::timeout(Duration::from_secs(10), sup.stalled(limit))
                .await
                .expect("a spawner stuck for the limit is a stall");
            // The task itself still answers a status request meanwhile.
            assert_eq!(sup.status().await.len(), 1);
            // Unblock the spawner: a writer opens the FIFO and goes.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
            apply.abort();
        });
    }

    use drover_proto::model::State;

    /// Waits until `want` holds of the supervisor's statuses, by name.
    async fn until_states(sup: &Supervisor, want: &[(&str, State)]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let states: BTreeMap<String, State> = sup
                .status()
                .await
                .into_iter()
                .map(|s| (s.node, s.state))
                .collect();
            if want
                .iter()
                .all(|(n, st)| states.get(*n).is_some_and(|s| s == st))
            {
                return;
            }
            assert!(Instant::now() < deadline, "want {want:?}, have {states:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Nodes that sleep, each adding a line to `<dir>/<node>.ran` as it starts.
    fn sleepers(dir: &Path, names: &[&str]) -> Configuration {
        let mut text = "[instances.agent-1]\n".to_owned();
        for n in names {
            text.push_str(&format!(
                "[nodes.{n}]\ninstance = \"agent-1\"\ncommand = [\"sh\", \"-c\", \"echo >> {}/{n}.ran; exec sleep 1000\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
                dir.display()
            ));
        }
        drover_proto::config::parse_toml("c.toml", &text).unwrap()
    }

    #[test]
    fn standing_by_stops_the_nodes_to_run_and_resuming_starts_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let ran = |n: &str| {
            std::fs::read_to_string(dir.path().join(format!("{n}.ran")))
                .unwrap_or_default()
                .lines()
                .count()
        };
        two_workers().block_on(async {
            let sup = bare_supervisor(&state);
            let later = || Instant::now() + Duration::from_secs(20);
            let rs = sup
                .apply(
                    sleepers(dir.path(), &["a", "b", "c"]),
                    Restart::default(),
                    1,
                    later(),
                    None,
                )
                .await;
            assert!(rs.iter().all(|r| r.success), "{rs:?}");
            until_states(
                &sup,
                &[
                    ("a", State::Running),
                    ("b", State::Running),
                    ("c", State::Running),
                ],
            )
            .await;
            let rs = sup.act(Op::Stop, vec!["b".into()], later(), later()).await;
            assert!(rs.iter().all(|r| r.success), "{rs:?}");

            assert!(sup.stand_by().await);
            assert!(sup.standing_by());
            assert!(!sup.stand_by().await, "already standing by");
            until_states(&sup, &[("a", State::Stopped), ("c", State::Stopped)]).await;
            // An operator's action is refused meanwhile.
            for op in [Op::Start, Op::Restart, Op::Stop, Op::Signal(15)] {
                let rs = sup.act(op, vec!["a".into()], later(), later()).await;
                assert!(
                    rs.len() == 1
                        && !rs[0].success
                        && rs[0].node.as_deref() == Some("a")
                        && rs[0].error.as_deref() == Some(STANDING_BY),
                    "{rs:?}"
                );
            }
            // Still desired to run: an agent process started now would start it.
            let record =
                read_record(&std::fs::read(state.join("nodes/a/record.json")).unwrap()).unwrap();
            assert!(record.ended.is_none() && !record.stopped, "{record:?}");

            // An Apply carried out meanwhile does not start what it adds.
            let rs = sup
                .apply(
                    sleepers(dir.path(), &["a", "b", "c", "d"]),
                    Restart::default(),
                    2,
                    later(),
                    None,
                )
                .await;
            assert!(
                rs.iter().any(|r| r.node.as_deref() == Some("d")
                    && !r.success
                    && r.error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("not started: this agent stands by"))),
                "the deploy says the node was not started: {rs:?}"
            );
            until_states(&sup, &[("d", State::Stopped)]).await;
            assert_eq!(ran("d"), 0, "d never ran");

            assert!(sup.resume().await);
            assert!(!sup.standing_by());
            assert!(!sup.resume().await, "not standing by any more");
            until_states(
                &sup,
                &[
                    ("a", State::Running),
                    ("c", State::Running),
                    ("d", State::Running),
                ],
            )
            .await;
            // The one an operator stopped before stays stopped.
            until_states(&sup, &[("b", State::Stopped)]).await;
            // Each started once more (its line comes once its shell runs).
            let deadline = Instant::now() + Duration::from_secs(20);
            while [ran("a"), ran("b"), ran("c"), ran("d")] != [2, 1, 2, 1] {
                assert!(
                    Instant::now() < deadline,
                    "{:?}",
                    [ran("a"), ran("b"), ran("c"), ran("d")]
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sup.shutdown(true).await;
        });
    }

    #[test]
    fn node_files_are_written_into_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let files = BTreeMap::from([
            ("cluster-layout.zeek".to_owned(), "redef x;\n".to_owned()),
            ("empty".to_owned(), String::new()),
        ]);
        crate::spawner::write_node_files(dir.path(), &files).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        assert_eq!(read("cluster-layout.zeek"), "redef x;\n");
        assert_eq!(read("empty"), "");
        // Written again on the next start, replacing what is there; a file that already
        // holds its text is left alone (same inode).
        let ino = |n: &str| {
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.path().join(n)).unwrap())
        };
        let layout = ino("cluster-layout.zeek");
        let empty = ino("empty");
        let files = BTreeMap::from([
            ("cluster-layout.zeek".to_owned(), "redef x;\n".to_owned()),
            ("empty".to_owned(), "now".to_owned()),
        ]);
        crate::spawner::write_node_files(dir.path(), &files).unwrap();
        assert_eq!(read("empty"), "now");
        assert_ne!(ino("empty"), empty);
        assert_eq!(ino("cluster-layout.zeek"), layout);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temp files left"
        );
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd"] {
            let files = BTreeMap::from([(bad.to_owned(), "x".to_owned())]);
            let e = crate::spawner::write_node_files(dir.path(), &files).unwrap_err();
            assert!(e.contains("not a plain file name"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_node_file_that_cannot_be_put_in_place_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory where the file goes: the rename fails, even for root.
        std::fs::create_dir_all(dir.path().join("layout").join("in-the-way")).unwrap();
        let files = BTreeMap::from([("layout".to_owned(), "redef x;\n".to_owned())]);
        let e = crate::spawner::write_node_files(dir.path(), &files).unwrap_err();
        assert!(e.contains("cannot write") && e.contains("layout"), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["layout"], "only what was there");
    }
}
