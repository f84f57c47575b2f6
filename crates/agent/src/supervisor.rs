//! The supervisor: the async shell around the per-node state machines.
//!
//! One task (the actor, [`Supervisor::start`]) owns every node: its [`Machine`], its
//! process, its logs and its record on disk. It reacts to commands (apply a
//! configuration, stop, start, restart, report), to process exits, to readiness
//! (`READY=1` on the node's `NOTIFY_SOCKET`, a TCP port that accepts, or the start
//! period), and to the one timer it keeps: the earliest deadline any machine asked for.
//! It never polls: with every node running and ready, it sleeps until something happens.
//!
//! # Processes
//!
//! A node is spawned with `posix_spawn` (std's fast path: no `pre_exec` hook) in its own
//! process group, with a clean environment plus the node's env and `DROVER_NODE`,
//! `DROVER_INSTANCE`, `DROVER_ROLE`, `NOTIFY_SOCKET`, `DROVER_QUERY_SOCKET` and a
//! per-spawn `DROVER_NODE_TOKEN`. CPU affinity is set on the spawning thread just before
//! the spawn and restored right after: a child inherits its parent thread's mask, so it is
//! pinned from its first instruction without forcing a `fork`. stdout and stderr are
//! files the node holds itself (see [`crate::logs`]).
//!
//! Stopping sends the stop signal to the process group, then SIGKILL to the group after
//! the stop timeout. When the main process has exited, whatever is left of the node is
//! killed too: its process group, and any process carrying its spawn token in its
//! environment (grandchildren that moved to a session of their own).
//!
//! # Records and adoption
//!
//! Each node has `<state-dir>/nodes/<name>/record.json`: its spec, its process (pid and
//! start time, so a recycled pid is never mistaken for it), its spawn token, whether it
//! was ready, its restart count, and whether an operator stopped it. Nodes outlive the
//! agent: when a new agent process starts, it reads the records and adopts every process
//! still alive, keeping its pid; it learns of the process's exit through a pidfd, since
//! the process is not its child. A node whose process ended while no agent ran is started
//! again under its restart policy, counted as one restart; its exit status is unknown.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_proto::config::signal_number;
use drover_proto::model::{
    self as model, Configuration, MgmtResult, MgmtRole, Node, NodeOutputs, NodeStatus, ResultData,
};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::net::UnixDatagram;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::logs::{LogConfig, NodeLogs};
use crate::machine::{self, Action, Machine, MachineConfig, Millis};
use crate::sys::{self, ProcId};

/// Lines of each stream returned with a failed node's outputs (as Zeek).
const OUTPUT_LINES: usize = 100;

/// How often log sizes are checked for rotation while nodes run.
const ROTATE_EVERY: Duration = Duration::from_secs(30);

/// What a supervisor needs to know.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This agent's instance name.
    pub instance: String,
    /// The agent's state dir; nodes live under `<state_dir>/nodes`.
    pub state_dir: PathBuf,
    /// Log rotation.
    pub logs: LogConfig,
}

/// A handle to the supervisor task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Command>,
    /// Bumped on every node state change, for status reporting.
    changes: watch::Receiver<u64>,
}

#[derive(Debug)]
enum Command {
    Apply {
        config: Box<Configuration>,
        restart_all: bool,
        deadline: Instant,
        reply: oneshot::Sender<Vec<MgmtResult>>,
    },
    Act {
        op: Op,
        nodes: Vec<String>,
        deadline: Instant,
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
        reply: oneshot::Sender<Option<NodeLogs>>,
    },
    Queryable {
        nodes: Vec<String>,
        reply: oneshot::Sender<Vec<(String, Result<PathBuf, String>)>>,
    },
    Shutdown {
        stop_nodes: bool,
        reply: oneshot::Sender<()>,
    },
}

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

#[derive(Debug)]
enum Event {
    Exited {
        node: String,
        generation: u64,
        exit: machine::ExitStatus,
    },
    Ready {
        node: String,
        generation: u64,
    },
    Notify {
        node: String,
        text: String,
        /// One of the node's [`NOTIFY_QUEUE`] places in the queue, given back when the
        /// event has been handled.
        _queued: tokio::sync::OwnedSemaphorePermit,
    },
}

/// Notify messages of one node that may wait in the supervisor's queue; further ones
/// wait in the node's socket (whose kernel buffer is bounded).
const NOTIFY_QUEUE: usize = 16;

/// The record of a node on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: Node,
    config_id: String,
    #[serde(default)]
    process: Option<RecordedProcess>,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    restarts: u64,
    /// An operator stopped it: it stays stopped across agent restarts.
    #[serde(default)]
    stopped: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct RecordedProcess {
    pid: i32,
    start_ticks: u64,
    started_at_ms: u64,
    token: u64,
}

/// A live process of a node.
#[derive(Debug)]
struct Proc {
    id: ProcId,
    generation: u64,
    token: u64,
    started_at_ms: u64,
    /// Aborts the readiness probe, if one runs.
    probe: Option<tokio::task::AbortHandle>,
    /// True when this agent spawned it (tokio reaps it); false when adopted.
    child: bool,
}

#[derive(Debug)]
struct Entry {
    spec: Node,
    config_id: String,
    machine: Machine,
    logs: NodeLogs,
    dir: PathBuf,
    proc: Option<Proc>,
    /// Counts spawns, so events from an old process are told apart.
    generation: u64,
    /// Restarts counted before this agent process (from the record).
    restarts_base: u64,
    stopped_by_operator: bool,
    /// Remove the node once it has stopped (it left the configuration).
    removing: bool,
    status_text: Option<String>,
    last_exit: Option<model::ExitStatus>,
    notify_task: Option<tokio::task::AbortHandle>,
    /// The record as last written: an unchanged record is not written again (a deploy
    /// would otherwise write each new node's record three times, and file creation and
    /// renames are most of the agent's cost per spawned node).
    written: Vec<u8>,
}

impl Entry {
    fn restarts(&self) -> u64 {
        self.restarts_base + self.machine.restart_count()
    }
}

/// Someone waiting for nodes to settle.
#[derive(Debug)]
struct Waiter {
    /// Node name and the generation it must move past (for restarts), or None.
    nodes: Vec<(String, Option<u64>)>,
    want: Want,
    deadline: Instant,
    reply: oneshot::Sender<Vec<MgmtResult>>,
    results: Vec<MgmtResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Running,
    Stopped,
}

struct Core {
    cfg: SupervisorConfig,
    nodes_dir: PathBuf,
    epoch: Instant,
    nodes: BTreeMap<String, Entry>,
    waiters: Vec<Waiter>,
    events: mpsc::UnboundedSender<Event>,
    changes: watch::Sender<u64>,
    config_id: Option<String>,
    next_token: u64,
    shutdown: Option<(Instant, oneshot::Sender<()>)>,
    /// An exit happened: look for orphaned descendants once the burst is handled.
    sweep_pending: bool,
    /// Nodes whose status changed since [`Command::Changes`] last asked, so that a
    /// status report carries those alone.
    changed: BTreeSet<String>,
    /// A node was added or removed since then: the next report must be a full one.
    membership_changed: bool,
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

fn to_model_exit(e: machine::ExitStatus) -> model::ExitStatus {
    match e {
        machine::ExitStatus::Code(c) => model::ExitStatus::Code(c),
        machine::ExitStatus::Signal(s) => model::ExitStatus::Signal(s),
    }
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
fn write_record(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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

/// The largest record written in place: one page, the unit a kill cannot cut.
const IN_PLACE_MAX: usize = 4096;

/// Reads the record `write_record` wrote: the first JSON value in the file.
fn read_record(bytes: &[u8]) -> Result<Record, serde_json::Error> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Record>()
        .next()
        .unwrap_or_else(|| Err(serde::de::Error::custom("empty record")))
}

/// Writes a node's `files` into its working directory (each through a temp file and a
/// rename, so a node never reads half a file), leaving alone those that already hold
/// the text, as on most restarts. Names must be plain file names.
fn write_node_files(workdir: &Path, files: &BTreeMap<String, String>) -> Result<(), String> {
    for (name, text) in files {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(format!("node file name '{name}' is not a plain file name"));
        }
        let path = workdir.join(name);
        if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
            continue;
        }
        let tmp = workdir.join(format!(".{name}.drover-tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    }
    Ok(())
}

/// Fills in RSS and CPU time from `/proc` for statuses with a process.
fn add_usage(statuses: &mut [NodeStatus]) {
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

/// The `DROVER_NODE_TOKEN` in a process's environment, if any.
fn token_of(pid: i32) -> Option<u64> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|var| {
        std::str::from_utf8(var.strip_prefix(b"DROVER_NODE_TOKEN=")?)
            .ok()?
            .parse()
            .ok()
    })
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
        if let Err(e) = sys::set_child_subreaper() {
            warn!(
                "cannot become a child subreaper ({e}); orphaned grandchildren of nodes go to init"
            );
        }
        let (tx, rx) = mpsc::channel(256);
        // Unbounded, but bounded by construction: each process sends at most one Exited
        // and one Ready, and each node at most NOTIFY_QUEUE Notify at a time.
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (changes_tx, changes_rx) = watch::channel(0);
        let mut core = Core {
            cfg,
            nodes_dir,
            epoch: Instant::now(),
            nodes: BTreeMap::new(),
            waiters: Vec::new(),
            events: events_tx,
            changes: changes_tx,
            config_id: None,
            next_token: u64::from(std::process::id()) << 32 | u64::from(rand_u32()),
            shutdown: None,
            sweep_pending: false,
            changed: BTreeSet::new(),
            membership_changed: true,
        };
        core.recover();
        tokio::spawn(core.run(rx, events_rx));
        Ok(Self {
            tx,
            changes: changes_rx,
        })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    /// Applies `config` for this instance; one result per node started or restarted.
    pub async fn apply(
        &self,
        config: Configuration,
        restart_all: bool,
        deadline: Instant,
    ) -> Vec<MgmtResult> {
        self.ask(|reply| Command::Apply {
            config: Box::new(config),
            restart_all,
            deadline,
            reply,
        })
        .await
        .unwrap_or_default()
    }

    /// Stops, starts or restarts nodes (all when `nodes` is empty).
    pub async fn act(&self, op: Op, nodes: Vec<String>, deadline: Instant) -> Vec<MgmtResult> {
        self.ask(|reply| Command::Act {
            op,
            nodes,
            deadline,
            reply,
        })
        .await
        .unwrap_or_default()
    }

    /// Every node's status, with RSS and CPU time from `/proc`. Those are read here, by
    /// the caller, not by the supervisor task: with 500 nodes they take milliseconds
    /// that would otherwise delay starts and restarts.
    pub async fn status(&self) -> Vec<NodeStatus> {
        let mut statuses = self
            .ask(|reply| Command::Status { reply })
            .await
            .unwrap_or_default();
        add_usage(&mut statuses);
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
        add_usage(&mut statuses);
        (full, statuses)
    }

    /// The log files of a node, if it exists.
    pub async fn logs(&self, node: &str) -> Option<NodeLogs> {
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

    /// Ends the supervisor; with `stop_nodes`, stops every node first (bounded by the
    /// longest stop timeout), otherwise leaves them running for the next agent process.
    pub async fn shutdown(&self, stop_nodes: bool) {
        let _ = self
            .ask(|reply| Command::Shutdown { stop_nodes, reply })
            .await;
    }

    /// A receiver that changes whenever a node's state changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
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
                        self.sweep_orphans();
                    }
                }
                () = sleep_until(deadline) => self.tick(),
                Some(()) = async { match sigchld.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    self.reap();
                }
                _ = rotate.tick(), if self.nodes.values().any(|e| e.proc.is_some()) => self.rotate_logs(),
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
            .filter_map(|e| e.machine.next_deadline())
            .min()
            .map(|at| self.instant_of(at));
        let waiters = self.waiters.iter().map(|w| w.deadline).min();
        let shutdown = self.shutdown.as_ref().map(|(d, _)| *d);
        [machines, waiters, shutdown].into_iter().flatten().min()
    }

    /// Notes that `node`'s status changed and wakes whoever watches for changes.
    fn bump(&mut self, node: &str) {
        if !self.changed.contains(node) {
            self.changed.insert(node.to_owned());
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    // === commands ===

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply {
                config,
                restart_all,
                deadline,
                reply,
            } => self.apply(&config, restart_all, deadline, reply),
            Command::Act {
                op,
                nodes,
                deadline,
                reply,
            } => self.act(op, nodes, deadline, reply),
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
                let _ = reply.send(self.nodes.get(&node).map(|e| e.logs.clone()));
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
                            Some(e) if e.machine.state() != machine::State::Running => {
                                Err(format!("cluster node {n} not in running state"))
                            }
                            Some(e) => Ok(e.dir.join("query.sock")),
                        };
                        (n, r)
                    })
                    .collect();
                let _ = reply.send(out);
            }
            Command::Shutdown { stop_nodes, reply } => {
                let now = self.now();
                let mut longest = Duration::ZERO;
                if stop_nodes {
                    let names: Vec<String> = self.nodes.keys().cloned().collect();
                    for name in names {
                        if let Some(e) = self.nodes.get_mut(&name) {
                            longest = longest.max(e.spec.stop_timeout);
                            let actions = e.machine.stop(now);
                            self.run_actions(&name, actions);
                        }
                    }
                } else {
                    // Leave every process to the next agent; keep the records as they are.
                    self.nodes.clear();
                }
                let deadline = Instant::now() + longest + Duration::from_secs(2);
                self.shutdown = Some((deadline, reply));
            }
        }
    }

    fn apply(
        &mut self,
        config: &Configuration,
        restart_all: bool,
        deadline: Instant,
        reply: oneshot::Sender<Vec<MgmtResult>>,
    ) {
        let instance = self.cfg.instance.clone();
        if self.config_id.as_deref() == Some(config.id.as_str()) && !restart_all {
            let _ = reply.send(Vec::new());
            return;
        }
        let now = self.now();
        let desired: BTreeMap<String, Node> = config
            .nodes_on(&instance)
            .map(|n| (n.name.clone(), config.resolve(n)))
            .collect();
        let mut wait = Vec::new();
        let mut results = Vec::new();
        // New nodes' directories, log files and notify sockets, made on every core at
        // once: creating inodes is most of what starting hundreds of nodes costs.
        let mut prepared = self.prepare(
            desired
                .iter()
                .filter(|(name, _)| !self.nodes.contains_key(*name))
                .map(|(name, spec)| (name.as_str(), spec)),
        );
        // Nodes that left the configuration.
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !desired.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            info!(node = %name, "node removed from the configuration; stopping it");
            if let Some(e) = self.nodes.get_mut(&name) {
                e.removing = true;
                let actions = e.machine.stop(now);
                self.run_actions(&name, actions);
            }
            self.remove_if_done(&name);
        }
        for (name, spec) in desired {
            match self.nodes.get_mut(&name) {
                Some(e) if e.spec == spec && !restart_all => {
                    // Unchanged: leave it alone, whatever its state.
                    e.config_id.clone_from(&config.id);
                    e.removing = false;
                }
                Some(e) => {
                    info!(node = %name, "node spec changed; restarting it");
                    e.spec = spec;
                    e.config_id.clone_from(&config.id);
                    e.removing = false;
                    e.stopped_by_operator = false;
                    let old_generation = e.generation;
                    let had_process = e.machine.has_process();
                    // A new machine takes the new restart policy; a running process is
                    // stopped first and the new one started once it is gone.
                    let mut actions = e.machine.stop(now);
                    if !had_process {
                        e.machine = Machine::new(machine_config(&e.spec));
                        e.restarts_base = 0;
                    }
                    actions.extend(e.machine.start(now));
                    self.run_actions(&name, actions);
                    wait.push((name, Some(old_generation)));
                }
                None => match self.create(&name, spec, &config.id, prepared.remove(&name)) {
                    Ok(()) => {
                        let actions = self
                            .nodes
                            .get_mut(&name)
                            .map(|e| e.machine.start(now))
                            .unwrap_or_default();
                        self.run_actions(&name, actions);
                        wait.push((name, None));
                    }
                    Err(e) => results.push(
                        MgmtResult::err("", format!("cannot set up node '{name}': {e}"))
                            .on_instance(&instance)
                            .on_node(&name),
                    ),
                },
            }
        }
        for name in self.nodes.keys().cloned().collect::<Vec<_>>() {
            self.save_record(&name);
        }
        self.config_id = Some(config.id.clone());
        self.waiters.push(Waiter {
            nodes: wait,
            want: Want::Running,
            deadline,
            reply,
            results,
        });
    }

    fn act(
        &mut self,
        op: Op,
        nodes: Vec<String>,
        deadline: Instant,
        reply: oneshot::Sender<Vec<MgmtResult>>,
    ) {
        let instance = self.cfg.instance.clone();
        let now = self.now();
        let names: Vec<String> = if nodes.is_empty() {
            self.nodes
                .iter()
                .filter(|(_, e)| !e.removing)
                .map(|(n, _)| n.clone())
                .collect()
        } else {
            nodes
        };
        let mut results = Vec::new();
        let mut wait = Vec::new();
        for name in names {
            let Some(e) = self.nodes.get_mut(&name) else {
                results.push(
                    MgmtResult::err("", "unknown cluster node")
                        .on_instance(&instance)
                        .on_node(&name),
                );
                continue;
            };
            if let Op::Signal(sig) = op {
                let result = match (&e.proc, Signal::try_from(sig)) {
                    (Some(p), Ok(sig)) => match sys::signal_group(p.id.pid, sig) {
                        Ok(_) => Ok(()),
                        Err(err) => Err(format!("cannot signal node: {err}")),
                    },
                    (None, _) => Err(format!("node {name} is not running")),
                    (_, Err(_)) => Err(format!("invalid signal {sig}")),
                };
                results.push(
                    match result {
                        Ok(()) => MgmtResult::ok("", None),
                        Err(msg) => MgmtResult::err("", msg),
                    }
                    .on_instance(&instance)
                    .on_node(&name),
                );
                continue;
            }
            let generation = e.generation;
            let actions = match op {
                Op::Signal(_) => unreachable!("handled above"),
                Op::Stop => {
                    e.stopped_by_operator = true;
                    e.machine.stop(now)
                }
                Op::Start => {
                    e.stopped_by_operator = false;
                    e.machine.start(now)
                }
                Op::Restart => {
                    e.stopped_by_operator = false;
                    let mut a = e.machine.stop(now);
                    a.extend(e.machine.start(now));
                    a
                }
            };
            self.run_actions(&name, actions);
            self.save_record(&name);
            wait.push((name, (op == Op::Restart).then_some(generation)));
        }
        self.waiters.push(Waiter {
            nodes: wait,
            want: if op == Op::Stop {
                Want::Stopped
            } else {
                Want::Running
            },
            deadline,
            reply,
            results,
        });
    }

    /// Makes the directories, empty log files and bound notify sockets of new nodes,
    /// spread over a few threads, for [`Core::create`] and the first spawn to find in
    /// place. Blocks the supervisor task, as doing the same one node at a time would.
    fn prepare<'a>(
        &self,
        nodes: impl Iterator<Item = (&'a str, &'a Node)>,
    ) -> BTreeMap<String, std::io::Result<std::os::unix::net::UnixDatagram>> {
        let jobs: Vec<(String, PathBuf, Option<PathBuf>)> = nodes
            .filter(|(name, _)| drover_proto::name::check(name).is_ok())
            .map(|(name, spec)| {
                let dir = self.nodes_dir.join(name);
                let work = spec.workdir.is_none().then(|| dir.join("work"));
                (name.to_owned(), dir, work)
            })
            .collect();
        if jobs.is_empty() {
            return BTreeMap::new();
        }
        let logs = self.cfg.logs;
        let prepare_one = |dir: &Path, work: Option<&Path>| {
            Self::make_node_dir(dir)?;
            if let Some(w) = work {
                std::fs::create_dir_all(w)?;
            }
            NodeLogs::new(dir, logs).open_for_child()?;
            Self::bind_notify(dir)
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
                                (name.clone(), prepare_one(dir, work.as_deref()))
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

    /// Creates a node's directory, for the agent and the node only (its sockets and
    /// records are there).
    fn make_node_dir(dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
    }

    /// Binds a node's notify socket, replacing a stale one.
    fn bind_notify(dir: &Path) -> std::io::Result<std::os::unix::net::UnixDatagram> {
        let path = Self::notify_path(dir);
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path)?;
        sock.set_nonblocking(true)?;
        Ok(sock)
    }

    /// Creates the entry of a new node: its directory, logs and notify socket, unless
    /// [`Core::prepare`] made them (`prepared`: its notify socket).
    fn create(
        &mut self,
        name: &str,
        spec: Node,
        config_id: &str,
        prepared: Option<std::io::Result<std::os::unix::net::UnixDatagram>>,
    ) -> std::io::Result<()> {
        drover_proto::name::check(name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let dir = self.nodes_dir.join(name);
        let sock = match prepared {
            Some(sock) => sock?,
            None => {
                Self::make_node_dir(&dir)?;
                Self::bind_notify(&dir)?
            }
        };
        let logs = NodeLogs::new(&dir, self.cfg.logs);
        let machine = Machine::new(machine_config(&spec));
        let mut entry = Entry {
            spec,
            config_id: config_id.to_owned(),
            machine,
            logs,
            dir,
            proc: None,
            generation: 0,
            restarts_base: 0,
            stopped_by_operator: false,
            removing: false,
            status_text: None,
            last_exit: None,
            notify_task: None,
            written: Vec::new(),
        };
        entry.notify_task = Some(self.listen_notify(name, sock)?);
        self.nodes.insert(name.to_owned(), entry);
        self.membership_changed = true;
        Ok(())
    }

    fn notify_path(dir: &Path) -> PathBuf {
        dir.join("notify.sock")
    }

    /// Forwards what the node's notify socket receives.
    fn listen_notify(
        &self,
        name: &str,
        sock: std::os::unix::net::UnixDatagram,
    ) -> std::io::Result<tokio::task::AbortHandle> {
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
                let Ok(n) = sock.recv(&mut buf).await else {
                    break;
                };
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if events
                    .send(Event::Notify {
                        node: node.clone(),
                        text,
                        _queued: queued,
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
                    if matches!(state, machine::State::Crashed | machine::State::Failed) {
                        let exit = e.last_exit;
                        warn!(node = %name, ?exit, restarts = e.restarts(), "node {}", state.as_str().to_lowercase());
                    }
                    // Spawns and exits write the record themselves; readiness is the one
                    // state change the record must learn of here.
                    if state == machine::State::Running {
                        self.save_record(name);
                    }
                    self.bump(name);
                }
                Action::Spawn => {
                    let more = match self.spawn(name) {
                        Ok(pid) => self
                            .nodes
                            .get_mut(name)
                            .map(|e| e.machine.spawned(now, pid))
                            .unwrap_or_default(),
                        Err(err) => {
                            warn!(node = %name, "cannot start node: {err}");
                            self.nodes
                                .get_mut(name)
                                .map(|e| e.machine.spawn_failed(now, err))
                                .unwrap_or_default()
                        }
                    };
                    queue.extend(more);
                }
                Action::SignalStop => {
                    if let Some(p) = &e.proc {
                        let sig = signal_number(&e.spec.stop_signal)
                            .and_then(|n| Signal::try_from(n).ok())
                            .unwrap_or(Signal::SIGTERM);
                        debug!(node = %name, pid = p.id.pid, %sig, "stopping");
                        let _ = sys::signal_group(p.id.pid, sig);
                    }
                }
                Action::Kill => {
                    if let Some(p) = &e.proc {
                        warn!(node = %name, pid = p.id.pid, "stop timeout reached; killing the process group");
                        kill_remains(p);
                    }
                }
            }
        }
    }

    /// Spawns the node's process; returns its pid.
    fn spawn(&mut self, name: &str) -> Result<u32, String> {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        let instance = self.cfg.instance.clone();
        let e = self.nodes.get_mut(name).ok_or("no such node")?;
        let spec = &e.spec;
        let (program, args) = spec.command.split_first().ok_or("node has no command")?;
        let workdir = match &spec.workdir {
            Some(w) => PathBuf::from(w),
            None => e.dir.join("work"),
        };
        std::fs::create_dir_all(&workdir).map_err(|err| {
            format!(
                "cannot create working directory {}: {err}",
                workdir.display()
            )
        })?;
        write_node_files(&workdir, &spec.files)?;
        let _ = e.logs.rotate_if_needed();
        let (out, err) = e
            .logs
            .open_for_child()
            .map_err(|err| format!("cannot open log files in {}: {err}", e.dir.display()))?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(&spec.env)
            .env("DROVER_NODE", name)
            .env("DROVER_INSTANCE", &instance)
            .env("DROVER_ROLE", spec.role.as_str())
            .env("NOTIFY_SOCKET", Self::notify_path(&e.dir))
            .env("DROVER_QUERY_SOCKET", e.dir.join("query.sock"))
            .env("DROVER_NODE_TOKEN", token.to_string())
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(false);
        let cpus: Option<Vec<usize>> = spec
            .cpu_affinity
            .as_ref()
            .map(|a| a.cpus().into_iter().map(|c| c as usize).collect());
        let previous = match &cpus {
            Some(c) => Some(
                sys::set_thread_affinity(c)
                    .map_err(|err| format!("cannot apply cpu affinity {c:?}: {err}"))?,
            ),
            None => None,
        };
        let spawned = cmd.spawn();
        if let Some(prev) = &previous
            && let Err(err) = sys::restore_thread_affinity(prev)
        {
            warn!("cannot restore the agent thread's cpu affinity: {err}");
        }
        let mut child = spawned.map_err(|err| format!("cannot execute '{program}': {err}"))?;
        let pid = child.id().ok_or("the process vanished at once")?;
        let pid_i = i32::try_from(pid).map_err(|_| "pid out of range")?;
        let start_ticks = sys::proc_id(pid_i).map(|p| p.start_ticks).unwrap_or(0);
        e.generation += 1;
        let generation = e.generation;
        let events = self.events.clone();
        let node = name.to_owned();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(c), _) => machine::ExitStatus::Code(c),
                    (None, Some(s)) => machine::ExitStatus::Signal(s),
                    (None, None) => machine::ExitStatus::Code(-1),
                },
                Err(_) => machine::ExitStatus::Code(-1),
            };
            let _ = events.send(Event::Exited {
                node,
                generation,
                exit,
            });
        });
        let tcp_port = match &e.spec.readiness {
            model::Readiness::Tcp { port, .. } => Some(*port),
            _ => None,
        };
        let probe = tcp_port.map(|port| self.probe_tcp(name, generation, port));
        let e = self.nodes.get_mut(name).ok_or("no such node")?;
        e.proc = Some(Proc {
            id: ProcId {
                pid: pid_i,
                start_ticks,
            },
            generation,
            token,
            started_at_ms: epoch_ms(),
            probe,
            child: true,
        });
        e.status_text = None;
        info!(node = %name, pid, "started");
        // The record must name the new process before anything else can happen, or an
        // agent killed now would start the node a second time.
        self.save_record(name);
        Ok(pid)
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
            Event::Exited {
                node,
                generation,
                exit,
            } => {
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                if e.proc.as_ref().map(|p| p.generation) != Some(generation) {
                    return;
                }
                let p = e.proc.take().expect("checked above");
                if let Some(probe) = &p.probe {
                    probe.abort();
                }
                // Whatever the main process left behind goes with it.
                kill_remains(&p);
                if p.child {
                    // Batched: one sweep after every event ready now has been handled.
                    self.sweep_pending = true;
                }
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                if !matches!(exit, machine::ExitStatus::Code(-1)) {
                    e.last_exit = Some(to_model_exit(exit));
                }
                info!(node = %node, pid = p.id.pid, ?exit, "process exited");
                let actions = e.machine.exited(now, exit);
                self.run_actions(&node, actions);
                self.save_record(&node);
                self.remove_if_done(&node);
                self.bump(&node);
            }
            Event::Ready { node, generation } => {
                if let Some(e) = self.nodes.get_mut(&node)
                    && e.proc.as_ref().map(|p| p.generation) == Some(generation)
                {
                    let actions = e.machine.ready(now);
                    self.run_actions(&node, actions);
                }
            }
            Event::Notify { node, text, .. } => {
                let Some(e) = self.nodes.get_mut(&node) else {
                    return;
                };
                let mut ready = false;
                for line in text.lines() {
                    if line == "READY=1" {
                        ready = true;
                    } else if let Some(s) = line.strip_prefix("STATUS=") {
                        e.status_text = Some(s.chars().take(256).collect());
                        self.changes.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                if ready
                    && let Some(e) = self.nodes.get_mut(&node)
                    && matches!(e.spec.readiness, model::Readiness::Notify { .. })
                {
                    let actions = e.machine.ready(now);
                    self.run_actions(&node, actions);
                }
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now();
        let due: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.machine.next_deadline().is_some_and(|d| d <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(e) = self.nodes.get_mut(&name) {
                let actions = e.machine.tick(now);
                self.run_actions(&name, actions);
            }
        }
    }

    /// Kills processes that outlived their node: descendants that left the node's
    /// process group (a new session) are re-parented to the agent, a child subreaper,
    /// when their parent dies. Any such child whose spawn token belongs to no live node
    /// process is killed.
    fn sweep_orphans(&self) {
        let tracked: BTreeSet<i32> = self
            .nodes
            .values()
            .filter_map(|e| e.proc.as_ref().filter(|p| p.child).map(|p| p.id.pid))
            .collect();
        let live_tokens: BTreeSet<u64> = self
            .nodes
            .values()
            .filter_map(|e| e.proc.as_ref().map(|p| p.token))
            .collect();
        for pid in sys::children() {
            if tracked.contains(&pid) {
                continue;
            }
            if let Some(token) = token_of(pid)
                && !live_tokens.contains(&token)
            {
                debug!(pid, "killing a leftover descendant of a stopped node");
                let _ = sys::signal_group(pid, Signal::SIGKILL);
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    fn reap(&mut self) {
        let tracked: BTreeSet<i32> = self
            .nodes
            .values()
            .filter_map(|e| e.proc.as_ref().filter(|p| p.child).map(|p| p.id.pid))
            .collect();
        for (pid, exit) in sys::reap_orphans(&|pid| tracked.contains(&pid)) {
            debug!(pid, ?exit, "reaped an orphaned descendant of a node");
        }
        self.sweep_orphans();
    }

    /// Rotates oversized node logs, off the actor's thread (rotation copies files).
    fn rotate_logs(&self) {
        let logs: Vec<(String, NodeLogs)> = self
            .nodes
            .iter()
            .filter(|(_, e)| e.proc.is_some())
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

    fn remove_if_done(&mut self, name: &str) {
        let done = self
            .nodes
            .get(name)
            .is_some_and(|e| e.removing && !e.machine.has_process());
        if done && let Some(e) = self.nodes.remove(name) {
            if let Some(t) = &e.notify_task {
                t.abort();
            }
            let _ = std::fs::remove_file(e.dir.join("record.json"));
            let _ = std::fs::remove_file(Self::notify_path(&e.dir));
            info!(node = %name, "node removed");
            self.membership_changed = true;
            self.bump(name);
        }
    }

    // === waiters ===

    fn settle_waiters(&mut self) {
        let now = Instant::now();
        let instance = self.cfg.instance.clone();
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &mut self.waiters[i];
            let timed_out = now >= w.deadline;
            let mut pending = Vec::new();
            for (name, past) in std::mem::take(&mut w.nodes) {
                let Some(e) = self.nodes.get(&name) else {
                    if w.want == Want::Stopped {
                        w.results.push(
                            MgmtResult::ok("", None)
                                .on_instance(&instance)
                                .on_node(&name),
                        );
                    } else {
                        w.results.push(
                            MgmtResult::err("", "node was removed")
                                .on_instance(&instance)
                                .on_node(&name),
                        );
                    }
                    continue;
                };
                let state = e.machine.state();
                let moved_on = past.is_none_or(|g| e.generation > g);
                let outcome = match w.want {
                    Want::Stopped if !e.machine.has_process() => Some(Ok(())),
                    Want::Stopped => None,
                    Want::Running => match state {
                        machine::State::Running if moved_on && !e.machine.is_stopping() => {
                            Some(Ok(()))
                        }
                        machine::State::Failed | machine::State::Crashed if moved_on => {
                            Some(Err(failure_text(e)))
                        }
                        machine::State::Stopped if moved_on && !e.machine.has_process() => {
                            // Exited successfully under a policy that does not restart.
                            Some(Ok(()))
                        }
                        _ => None,
                    },
                };
                match outcome {
                    Some(Ok(())) => w.results.push(
                        MgmtResult::ok("", None)
                            .on_instance(&instance)
                            .on_node(&name),
                    ),
                    Some(Err(msg)) => {
                        let (stdout, stderr) = e.logs.outputs(OUTPUT_LINES);
                        let mut r = MgmtResult::err("", msg)
                            .on_instance(&instance)
                            .on_node(&name);
                        r.data = Some(ResultData::NodeOutputs(NodeOutputs { stdout, stderr }));
                        w.results.push(r);
                    }
                    None if timed_out => w.results.push(
                        MgmtResult::err(
                            "",
                            format!(
                                "timed out waiting for node '{name}' (state {})",
                                to_model_state(state).as_str()
                            ),
                        )
                        .on_instance(&instance)
                        .on_node(&name),
                    ),
                    None => pending.push((name, past)),
                }
            }
            w.nodes = pending;
            if w.nodes.is_empty() {
                let w = self.waiters.swap_remove(i);
                let _ = w.reply.send(w.results);
            } else {
                i += 1;
            }
        }
    }

    fn shutdown_done(&mut self) -> bool {
        let Some((deadline, _)) = &self.shutdown else {
            return false;
        };
        let busy = self.nodes.values().any(|e| e.machine.has_process());
        if busy && Instant::now() < *deadline {
            return false;
        }
        if busy {
            warn!("nodes still running at the end of the shutdown grace period; killing them");
            for e in self.nodes.values() {
                if let Some(p) = &e.proc {
                    kill_remains(p);
                }
            }
        }
        if let Some((_, reply)) = self.shutdown.take() {
            let _ = reply.send(());
        }
        true
    }

    // === status and records ===

    fn statuses(&self) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|(name, e)| Self::status_of(name, e))
            .collect()
    }

    /// The statuses of those of `names` that still exist.
    fn statuses_of(&self, names: &BTreeSet<String>) -> Vec<NodeStatus> {
        names
            .iter()
            .filter_map(|n| self.nodes.get_key_value(n))
            .map(|(name, e)| Self::status_of(name, e))
            .collect()
    }

    /// A node's status, without resource figures (see [`Supervisor::status`]).
    fn status_of(name: &str, e: &Entry) -> NodeStatus {
        let mut s = NodeStatus::new(name, to_model_state(e.machine.state()), MgmtRole::None);
        s.cluster_role = e.spec.role.clone();
        s.port = e.spec.port;
        s.metrics_port = e.spec.metrics_port;
        s.restarts = u32::try_from(e.restarts()).unwrap_or(u32::MAX);
        s.last_exit = e.last_exit;
        s.ready = e.machine.ready_at().is_some();
        s.status_text.clone_from(&e.status_text);
        if let Some(p) = &e.proc {
            s.pid = u32::try_from(p.id.pid).ok();
            s.started_at_ms = Some(p.started_at_ms);
        }
        s
    }

    fn save_record(&mut self, name: &str) {
        let Some(e) = self.nodes.get_mut(name) else {
            return;
        };
        let record = Record {
            spec: e.spec.clone(),
            config_id: e.config_id.clone(),
            process: e.proc.as_ref().map(|p| RecordedProcess {
                pid: p.id.pid,
                start_ticks: p.id.start_ticks,
                started_at_ms: p.started_at_ms,
                token: p.token,
            }),
            ready: e.machine.ready_at().is_some(),
            restarts: e.restarts(),
            stopped: e.stopped_by_operator,
        };
        let path = e.dir.join("record.json");
        let bytes = serde_json::to_vec_pretty(&record).expect("records serialize");
        if bytes == e.written {
            return;
        }
        match write_record(&path, &bytes) {
            Ok(()) => e.written = bytes,
            Err(err) => warn!(node = %name, "cannot write {}: {err}", path.display()),
        }
    }

    /// Reads the records left by a previous agent process: adopts live processes, and
    /// starts again nodes whose process ended while no agent ran.
    fn recover(&mut self) {
        let Ok(dir) = std::fs::read_dir(&self.nodes_dir) else {
            return;
        };
        let now = self.now();
        for entry in dir.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path().join("record.json");
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let record: Record = match read_record(&bytes) {
                Ok(r) => r,
                Err(err) => {
                    warn!(node = %name, "ignoring unreadable record {}: {err}", path.display());
                    continue;
                }
            };
            if let Err(err) = self.create(&name, record.spec.clone(), &record.config_id, None) {
                warn!(node = %name, "cannot restore node: {err}");
                continue;
            }
            let e = self.nodes.get_mut(&name).expect("just created");
            e.restarts_base = record.restarts;
            e.stopped_by_operator = record.stopped;
            self.config_id = Some(record.config_id.clone());
            let alive = record.process.filter(|p| {
                sys::is_alive(ProcId {
                    pid: p.pid,
                    start_ticks: p.start_ticks,
                })
            });
            let actions = match alive {
                Some(p) => match sys::PidFd::open_id(ProcId {
                    pid: p.pid,
                    start_ticks: p.start_ticks,
                }) {
                    Ok(fd) => {
                        e.generation += 1;
                        let generation = e.generation;
                        e.proc = Some(Proc {
                            id: ProcId {
                                pid: p.pid,
                                start_ticks: p.start_ticks,
                            },
                            generation,
                            token: p.token,
                            started_at_ms: p.started_at_ms,
                            probe: None,
                            child: false,
                        });
                        let events = self.events.clone();
                        let node = name.clone();
                        tokio::spawn(async move {
                            let _ = fd.exited().await;
                            let _ = events.send(Event::Exited {
                                node,
                                generation,
                                exit: machine::ExitStatus::Code(-1),
                            });
                        });
                        info!(node = %name, pid = p.pid, "adopted running node");
                        e.machine
                            .adopt(now, u32::try_from(p.pid).unwrap_or(0), record.ready)
                    }
                    Err(err) => {
                        warn!(node = %name, pid = p.pid, "cannot watch adopted process ({err}); killing it and starting afresh");
                        let _ = sys::signal_group(p.pid, Signal::SIGKILL);
                        e.restarts_base += 1;
                        e.machine.start(now)
                    }
                },
                None if record.stopped => Vec::new(),
                None => {
                    if record.process.is_some() {
                        info!(node = %name, "node's process ended while no agent ran; starting it again");
                        e.restarts_base += 1;
                    }
                    e.machine.start(now)
                }
            };
            self.run_actions(&name, actions);
            self.save_record(&name);
        }
    }
}

/// Kills what is left of a node's process group.
fn kill_remains(p: &Proc) {
    let _ = sys::signal_group(p.id.pid, Signal::SIGKILL);
}

fn failure_text(e: &Entry) -> String {
    match (e.machine.last_spawn_error(), e.last_exit) {
        (Some(err), _) => err.to_owned(),
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

    #[test]
    fn records_are_rewritten_in_place_and_read_past_a_stale_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        let record = |restarts: u64, config_id: &str| Record {
            spec: Node::new("n1", "agent-1"),
            config_id: config_id.to_owned(),
            process: None,
            ready: true,
            restarts,
            stopped: false,
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

    #[test]
    fn node_files_are_written_into_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let files = BTreeMap::from([
            ("cluster-layout.zeek".to_owned(), "redef x;\n".to_owned()),
            ("empty".to_owned(), String::new()),
        ]);
        write_node_files(dir.path(), &files).unwrap();
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
        write_node_files(dir.path(), &files).unwrap();
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
            let e = write_node_files(dir.path(), &files).unwrap_err();
            assert!(e.contains("not a plain file name"), "{bad}: {e}");
        }
    }
}
