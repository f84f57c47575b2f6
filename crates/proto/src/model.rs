//! The cluster data model.
//!
//! Names and meanings follow Zeek's Management framework so that operators and the
//! zeek-client compatibility front find what they know: an [`Instance`] is a host running
//! one agent, a [`Node`] is one supervised process, a [`NodeStatus`] is what an agent
//! reports about it, and a [`MgmtResult`] is the universal per-instance, per-node answer.
//! On top of Zeek's fields, a node carries what any program needs to be supervised:
//! its argv, env, working directory, restart policy, readiness, stop signal and timeout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::exec::{Limit, Umask};
use crate::resources::{Liveness, Memory};

/// A node's lifecycle state (Zeek's `Management::State`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Started, not yet ready.
    Pending,
    /// Ready and serving.
    Running,
    /// Stopped by request, or exited successfully under a policy that does not restart it.
    Stopped,
    /// Exited unexpectedly; a restart is scheduled.
    Crashed,
    /// Gave up: could not be started, or failed too often in a row.
    Failed,
    /// Its agent is unreachable; the process may well still run.
    Unknown,
}

impl State {
    /// All states, in declaration order.
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Running,
        Self::Stopped,
        Self::Crashed,
        Self::Failed,
        Self::Unknown,
    ];

    /// The upper-case name used on the wire and in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Stopped => "STOPPED",
            Self::Crashed => "CRASHED",
            Self::Failed => "FAILED",
            Self::Unknown => "UNKNOWN",
        }
    }
}

/// The management role of a process (Zeek's `Management::Role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MgmtRole {
    /// An ordinary cluster node.
    None,
    /// An agent.
    Agent,
    /// The controller.
    Controller,
    /// A node (Zeek reserves it; drover reports ordinary nodes as `None`).
    Node,
}

/// A node's role in its cluster (Zeek's `Supervisor::ClusterRole`), extended with
/// free-form roles for non-Zeek programs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum ClusterRole {
    /// No role.
    #[default]
    None,
    /// Zeek's logger.
    Logger,
    /// Zeek's manager.
    Manager,
    /// Zeek's proxy.
    Proxy,
    /// Zeek's worker.
    Worker,
    /// Any other role name, lower-case.
    Other(String),
}

impl ClusterRole {
    /// Parses a role name, case-insensitively for Zeek's roles.
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "" | "none" => Self::None,
            "logger" => Self::Logger,
            "manager" => Self::Manager,
            "proxy" => Self::Proxy,
            "worker" => Self::Worker,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The lower-case role name (`"worker"`), or `"none"`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "none",
            Self::Logger => "logger",
            Self::Manager => "manager",
            Self::Proxy => "proxy",
            Self::Worker => "worker",
            Self::Other(s) => s,
        }
    }

    /// True for [`ClusterRole::None`].
    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }
}

impl Serialize for ClusterRole {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ClusterRole {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// A host running one agent (Zeek's `Management::Instance`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique instance name; equal to the agent's name (and its certificate name).
    pub name: String,
    /// The instance's address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<IpAddr>,
    /// The agent's listening port: present when the controller dials the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// When a node is restarted after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart; an exit is final.
    Never,
    /// Restart unless it exited with a success code.
    #[default]
    OnFailure,
    /// Always restart.
    Always,
}

/// Exponential backoff between automatic restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "BackoffFields")]
pub struct Backoff {
    /// Delay before the first restart of a failure streak.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Factor applied to the delay after each further failure.
    pub multiplier: f64,
    /// Upper bound on the delay.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Uptime after which a node counts as healthy and its failure streak resets.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// [`Backoff`] as written, each field optional.
#[derive(Deserialize)]
struct BackoffFields {
    #[serde(default, with = "humantime_serde")]
    initial: Option<Duration>,
    multiplier: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    max: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reset_after: Option<Duration>,
}

impl From<BackoffFields> for Backoff {
    /// The defaults for what is not given, except that a `max` not given is never below
    /// the `initial` given: `initial = "1m"` alone means waits of a minute, not an error
    /// about a `max` the user never wrote.
    fn from(f: BackoffFields) -> Self {
        let d = Self::default();
        let initial = f.initial.unwrap_or(d.initial);
        Self {
            initial,
            multiplier: f.multiplier.unwrap_or(d.multiplier),
            max: f.max.unwrap_or(d.max.max(initial)),
            reset_after: f.reset_after.unwrap_or(d.reset_after),
        }
    }
}

/// How an agent decides that a started node is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Readiness {
    /// Ready once it stayed alive this long (the default, 1 s).
    StartPeriod {
        /// How long the node must stay up.
        #[serde(with = "humantime_serde", default = "default_start_period")]
        period: Duration,
    },
    /// Ready when it sends `READY=1` on `NOTIFY_SOCKET` (systemd's protocol).
    Notify {
        /// How long to wait for `READY=1` before the start counts as failed.
        #[serde(with = "humantime_serde", default = "default_ready_timeout")]
        timeout: Duration,
    },
    /// Ready when a TCP connection to this port on the loopback address succeeds.
    Tcp {
        /// The port to probe.
        port: u16,
        /// How long to wait before the start counts as failed.
        #[serde(with = "humantime_serde", default = "default_ready_timeout")]
        timeout: Duration,
    },
}

fn default_start_period() -> Duration {
    Duration::from_secs(1)
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for Readiness {
    fn default() -> Self {
        Self::StartPeriod {
            period: default_start_period(),
        }
    }
}

/// CPU affinity: one CPU (Zeek's `cpu_affinity = 3`) or a list of CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CpuAffinity {
    /// A single CPU.
    One(u32),
    /// Several CPUs.
    Many(Vec<u32>),
}

impl CpuAffinity {
    /// The CPUs, in order.
    pub fn cpus(&self) -> Vec<u32> {
        match self {
            Self::One(c) => vec![*c],
            Self::Many(v) => v.clone(),
        }
    }
}

/// One supervised process of the cluster (Zeek's `Management::Node`, generalised).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Cluster-unique node name.
    pub name: String,
    /// The instance (agent) it runs on.
    pub instance: String,
    /// Its cluster role; also selects a command template when `command` is empty.
    #[serde(default, skip_serializing_if = "ClusterRole::is_none")]
    pub role: ClusterRole,
    /// argv; empty means "take it from the role's template".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Extra environment, on top of the agent's clean base.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; default `<state-dir>/nodes/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The node's listening port (Zeek's Broker port), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Its Prometheus port, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
    /// Sniffing interface (Zeek workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Extra scripts (Zeek).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scripts: Vec<String>,
    /// CPUs to pin the process to, applied before exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_affinity: Option<CpuAffinity>,

    // --- identity, capabilities and process limits (see `crate::exec`) ---
    /// The user the process runs as (a name or a numeric id on the agent's host); the
    /// agent's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Its group; the user's primary group when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Supplementary groups on top of those the user is in (from the group database);
    /// without a user, these replace the agent's. Given, even empty, it is the node's
    /// own: its role's are not taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supplementary_groups: Option<Vec<String>>,
    /// Its file mode creation mask; the agent's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<Umask>,
    /// Its capabilities: the bounding set is cut to these, and they are ambient for
    /// a node running as an ordinary user. Absent: left as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// `PR_SET_NO_NEW_PRIVS`: exec can never grant more privileges (setuid bits, file
    /// capabilities). Given, even `false`, it is the node's own: its role's is not
    /// taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_new_privileges: Option<bool>,
    /// rlimits by lower-case `RLIMIT_` name (`nofile`, `core`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Limit>,
    // --- end of identity, capabilities and process limits ---
    /// Files the agent writes into the working directory before every start: plain
    /// file name (no `/`) to contents. Not a cluster-file key: the controller fills it
    /// (Zeek's `cluster-layout.zeek`, see the controller's `zeek::layout`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// When to restart after an exit.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Delays between automatic restarts.
    #[serde(default)]
    pub backoff: Backoff,
    /// Consecutive failed starts before the node is FAILED; 0 never gives up.
    #[serde(default = "default_max_failed_starts")]
    pub max_failed_starts: u32,
    /// Exit codes that count as success.
    #[serde(default = "default_success_codes")]
    pub success_exit_codes: Vec<i32>,
    /// How readiness is decided.
    #[serde(default)]
    pub readiness: Readiness,
    /// Signal sent to the process group to stop it (e.g. `SIGTERM`).
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// How long to wait after the stop signal before SIGKILL.
    #[serde(with = "humantime_serde", default = "default_stop_timeout")]
    pub stop_timeout: Duration,
    // --- resources and liveness (see [`crate::resources`]) ---
    /// Memory limits, enforced through the node's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// CPU quota, in CPUs (`1.5` = 150 ms of CPU time per 100 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1-10000 (100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// Most processes and threads the node may have at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// Relative block I/O weight, 1-10000 (100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
    /// The node must send `WATCHDOG=1` on its notify socket at least this often once
    /// ready (systemd's `WatchdogSec`), or it is restarted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub watchdog: Option<Duration>,
    /// A probe that must keep succeeding once the node is ready, or it is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Liveness>,
    // --- end of resources and liveness ---
}

fn default_max_failed_starts() -> u32 {
    5
}

fn default_success_codes() -> Vec<i32> {
    vec![0]
}

fn default_stop_signal() -> String {
    "SIGTERM".to_owned()
}

fn default_stop_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Node {
    /// A node with every optional field at its default.
    pub fn new(name: impl Into<String>, instance: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            instance: instance.into(),
            role: ClusterRole::None,
            command: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            port: None,
            metrics_port: None,
            interface: None,
            scripts: Vec::new(),
            cpu_affinity: None,
            user: None,
            group: None,
            supplementary_groups: None,
            umask: None,
            capabilities: None,
            no_new_privileges: None,
            limits: BTreeMap::new(),
            files: BTreeMap::new(),
            restart: RestartPolicy::default(),
            backoff: Backoff::default(),
            max_failed_starts: default_max_failed_starts(),
            success_exit_codes: default_success_codes(),
            readiness: Readiness::default(),
            stop_signal: default_stop_signal(),
            stop_timeout: default_stop_timeout(),
            // --- resources and liveness ---
            memory: None,
            cpus: None,
            cpu_weight: None,
            pids_max: None,
            io_weight: None,
            watchdog: None,
            liveness: None,
        }
    }
}

/// A command template for nodes of one role that name no command of their own.
///
/// Strings may contain placeholders that are replaced per node: `{name}`, `{instance}`,
/// `{role}`, `{interface}`, `{port}`, and `{scripts}`: a command argument that is exactly
/// `{scripts}` becomes the node's scripts, one argument each (none when it has none), as
/// Zeek's Supervisor appends them to a node's command line; elsewhere it is replaced by
/// the scripts joined with spaces.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoleTemplate {
    /// argv template.
    pub command: Vec<String>,
    /// Extra environment for every node of the role (a node's own env wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    // --- identity, capabilities and process limits: what a node of the role leaves
    // unset (a limit: each name it does not set) it takes from here ---
    /// See [`Node::user`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// See [`Node::group`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// See [`Node::supplementary_groups`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supplementary_groups: Option<Vec<String>>,
    /// See [`Node::umask`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<Umask>,
    /// See [`Node::capabilities`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// See [`Node::no_new_privileges`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_new_privileges: Option<bool>,
    /// See [`Node::limits`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Limit>,
    // --- end of identity, capabilities and process limits ---
    // --- resources and liveness (see [`crate::resources`]) ---
    /// Memory limits, for nodes of the role that set none; enforced through the node's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// CPU quota, in CPUs (`1.5` = 150 ms of CPU time per 100 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1-10000 (100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// Most processes and threads the node may have at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// Relative block I/O weight, 1-10000 (100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
    /// The node must send `WATCHDOG=1` on its notify socket at least this often once
    /// ready (systemd's `WatchdogSec`), or it is restarted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub watchdog: Option<Duration>,
    /// A probe that must keep succeeding once the node is ready, or it is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Liveness>,
    // --- end of resources and liveness ---
}

/// A whole cluster configuration (Zeek's `Management::Configuration`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Configuration {
    /// Identifier of this configuration; new ids are UUIDs.
    pub id: String,
    /// The instances, sorted by name.
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// The nodes, sorted by name.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Per-role command templates, keyed by lower-case role name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub roles: BTreeMap<String, RoleTemplate>,
}

/// True when `name` matches `pattern`, in which `*` stands for any run of characters
/// and `?` for any one (a shell's wildcards, without brackets). Node names hold
/// neither, so a target with one is a pattern.
pub fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Two pointers, going back to the last `*` only: linear for patterns without
    // several stars, never exponential.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

impl Configuration {
    /// A fresh, empty configuration with a new id.
    pub fn empty() -> Self {
        Self {
            id: new_id(),
            instances: Vec::new(),
            nodes: Vec::new(),
            roles: BTreeMap::new(),
        }
    }

    /// The nodes placed on `instance`.
    pub fn nodes_on<'a>(&'a self, instance: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.iter().filter(move |n| n.instance == instance)
    }

    /// Expands targets into node names: a node name, a pattern of names ([`wildcard`]),
    /// `role:ROLE` (every node of that role) or `instance:NAME` (every node on that
    /// instance). Returns the names, sorted and without duplicates, and the targets
    /// that matched nothing.
    pub fn select(&self, targets: &[String]) -> (Vec<String>, Vec<String>) {
        let mut names = std::collections::BTreeSet::new();
        let mut unmatched = Vec::new();
        for t in targets {
            let found: Vec<&Node> = if let Some(role) = t.strip_prefix("role:") {
                let role = ClusterRole::parse(role);
                self.nodes.iter().filter(|n| n.role == role).collect()
            } else if let Some(inst) = t.strip_prefix("instance:") {
                self.nodes_on(inst).collect()
            } else if t.contains(['*', '?']) {
                self.nodes.iter().filter(|n| wildcard(t, &n.name)).collect()
            } else {
                self.node(t).into_iter().collect()
            };
            if found.is_empty() {
                unmatched.push(t.clone());
            }
            names.extend(found.into_iter().map(|n| n.name.clone()));
        }
        (names.into_iter().collect(), unmatched)
    }

    /// The part of the configuration an agent needs: same id, its own instance, its own
    /// nodes and the role templates. Sending each agent only its share keeps a deploy to
    /// N agents O(N) on the wire rather than O(N²).
    pub fn share_for(&self, instance: &str) -> Self {
        Self {
            id: self.id.clone(),
            instances: self
                .instances
                .iter()
                .filter(|i| i.name == instance)
                .cloned()
                .collect(),
            nodes: self.nodes_on(instance).cloned().collect(),
            roles: self.roles.clone(),
        }
    }

    /// [`Configuration::share_for`] of each of `instances` (duplicates are ignored), in one
    /// pass over the nodes: a deploy to N agents stays O(N), where calling `share_for` for
    /// each would be O(N²).
    pub fn shares<'a>(
        &self,
        instances: impl IntoIterator<Item = &'a str>,
    ) -> BTreeMap<String, Self> {
        let mut out: BTreeMap<String, Self> = instances
            .into_iter()
            .map(|name| {
                let share = Self {
                    id: self.id.clone(),
                    instances: Vec::new(),
                    nodes: Vec::new(),
                    roles: self.roles.clone(),
                };
                (name.to_owned(), share)
            })
            .collect();
        for i in &self.instances {
            if let Some(share) = out.get_mut(&i.name) {
                share.instances.push(i.clone());
            }
        }
        for n in &self.nodes {
            if let Some(share) = out.get_mut(&n.instance) {
                share.nodes.push(n.clone());
            }
        }
        out
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// `node` with its role template applied: the template's command when the node has
    /// none, the template's env under the node's own, and placeholders (`{name}`,
    /// `{instance}`, `{role}`, `{interface}`, `{port}`, `{scripts}`; see
    /// [`RoleTemplate`]) replaced in command and env.
    pub fn resolve(&self, node: &Node) -> Node {
        let mut out = node.clone();
        if let Some(t) = self.roles.get(node.role.as_str()) {
            if out.command.is_empty() {
                out.command.clone_from(&t.command);
            }
            for (k, v) in &t.env {
                out.env.entry(k.clone()).or_insert_with(|| v.clone());
            }
            inherit_exec(&mut out, t);
            // --- resources and liveness: the node's own settings win ---
            out.memory = out.memory.or(t.memory);
            out.cpus = out.cpus.or(t.cpus);
            out.cpu_weight = out.cpu_weight.or(t.cpu_weight);
            out.pids_max = out.pids_max.or(t.pids_max);
            out.io_weight = out.io_weight.or(t.io_weight);
            out.watchdog = out.watchdog.or(t.watchdog);
            if out.liveness.is_none() {
                out.liveness.clone_from(&t.liveness);
            }
        }
        let port = node.port.map(|p| p.to_string()).unwrap_or_default();
        let scripts = node.scripts.join(" ");
        let fill = |s: &str| {
            s.replace("{name}", &node.name)
                .replace("{instance}", &node.instance)
                .replace("{role}", node.role.as_str())
                .replace("{interface}", node.interface.as_deref().unwrap_or(""))
                .replace("{port}", &port)
                .replace("{scripts}", &scripts)
        };
        out.command = out
            .command
            .iter()
            .flat_map(|a| {
                if a == "{scripts}" {
                    node.scripts.clone()
                } else {
                    vec![fill(a)]
                }
            })
            .collect();
        out.env = out.env.iter().map(|(k, v)| (k.clone(), fill(v))).collect();
        // Once resolved, off and not given run alike: one form, so that the spec equals
        // the one an agent stored before these could be given as off (no restart).
        if out.no_new_privileges == Some(false) {
            out.no_new_privileges = None;
        }
        if out.supplementary_groups.as_ref().is_some_and(Vec::is_empty) {
            out.supplementary_groups = None;
        }
        out
    }
}

impl Node {
    /// How long its agent may take to settle it, by its own settings: its
    /// `stop_timeout` when it is stopped (after which it is killed), and its readiness
    /// timeout (or start period) when it is started (after which it is ready, or killed
    /// and failed). A request that stops, starts or restarts it waits this long, however
    /// short its own timeout, so that it does not report a failure while the node is
    /// still within what its configuration allows.
    pub fn settle_within(&self, stops: bool, starts: bool) -> Duration {
        let stop = if stops {
            self.stop_timeout
        } else {
            Duration::ZERO
        };
        let start = match (starts, &self.readiness) {
            (false, _) => Duration::ZERO,
            (true, Readiness::StartPeriod { period }) => *period,
            (true, Readiness::Notify { timeout } | Readiness::Tcp { timeout, .. }) => *timeout,
        };
        stop + start
    }

    /// Its identity, capabilities and limits, for [`crate::exec::check`].
    pub fn exec_ref(&self) -> crate::exec::ExecRef<'_> {
        crate::exec::ExecRef {
            user: self.user.as_deref(),
            group: self.group.as_deref(),
            supplementary_groups: self.supplementary_groups.as_deref().unwrap_or_default(),
            capabilities: self.capabilities.as_deref(),
            limits: &self.limits,
        }
    }
}

impl RoleTemplate {
    /// Its identity, capabilities and limits, for [`crate::exec::check`].
    pub fn exec_ref(&self) -> crate::exec::ExecRef<'_> {
        crate::exec::ExecRef {
            user: self.user.as_deref(),
            group: self.group.as_deref(),
            supplementary_groups: self.supplementary_groups.as_deref().unwrap_or_default(),
            capabilities: self.capabilities.as_deref(),
            limits: &self.limits,
        }
    }
}

/// The identity, capabilities and limits a node leaves unset, from its role's template.
fn inherit_exec(node: &mut Node, t: &RoleTemplate) {
    if node.user.is_none() {
        node.user.clone_from(&t.user);
    }
    if node.group.is_none() {
        node.group.clone_from(&t.group);
    }
    if node.supplementary_groups.is_none() {
        node.supplementary_groups
            .clone_from(&t.supplementary_groups);
    }
    if node.umask.is_none() {
        node.umask = t.umask;
    }
    if node.capabilities.is_none() {
        node.capabilities.clone_from(&t.capabilities);
    }
    if node.no_new_privileges.is_none() {
        node.no_new_privileges = t.no_new_privileges;
    }
    for (k, v) in &t.limits {
        node.limits.entry(k.clone()).or_insert(*v);
    }
}

/// A new unique, time-ordered identifier (UUIDv7).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// How a process last ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// What an agent reports about one process (Zeek's `Management::NodeStatus`, extended).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name (or the agent's / controller's own name).
    pub node: String,
    /// Current state.
    pub state: State,
    /// AGENT or CONTROLLER for management processes, NONE for nodes.
    pub mgmt_role: MgmtRole,
    /// The node's cluster role.
    #[serde(default)]
    pub cluster_role: ClusterRole,
    /// Process id, when a process exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The node's listening port, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Its metrics port, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
    /// Automatic restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// How the previous process ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitStatus>,
    /// Start of the current process, in milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// Whether readiness has been reached.
    #[serde(default)]
    pub ready: bool,
    /// Last `STATUS=` text the node sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
    /// Resident memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// CPU time used, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    /// Why the node's last start or stop failed (exec errors such as a missing or
    /// non-executable program), until it next runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// While a stop of its process is under way (a stop, restart or redeploy sent its
    /// stop signal and the process has not ended yet): when the signal was sent, in
    /// milliseconds since the Unix epoch. The state meanwhile stays what it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping_since_ms: Option<u64>,
    /// While a crashed node waits out its backoff: when it is to be started again, in
    /// milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_at_ms: Option<u64>,
    /// The deploy generation: for a node, the generation whose spec it runs; for an
    /// agent's own entry, the generation the agent has applied; for the controller's own
    /// entry in get-nodes, the desired generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// For an agent's own entry: how many CPUs its nodes may be pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// For an agent's own entry: how many nodes its open-file limit leaves room for
    /// (each running node holds descriptors in the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_max: Option<u32>,
    /// For an agent's own entry: the resource settings (`memory.max`, `io_weight`, ...)
    /// its host cannot enforce, each with why, so that a deploy using one is refused
    /// before anything changes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unenforceable: BTreeMap<String, String>,
    /// For the controller's and each agent's own entry in get-nodes: when the
    /// certificate it holds (an agent's: the one its connection presented) expires,
    /// in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<i64>,
    // --- resources and liveness ---
    /// Memory charged to the node's cgroup, its children's included, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU time of the node's cgroup, its children's included, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_cpu_ms: Option<u64>,
    /// Processes of the node the kernel killed for memory; kept in its record across agent
    /// restarts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub oom_kills: u32,
    /// Restarts forced by a failed watchdog or liveness probe (kept like `oom_kills`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub liveness_failures: u32,
    /// Why the node's process last ended without being asked to (`oom-killed`, a
    /// watchdog timeout, a failed probe), kept across its restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl NodeStatus {
    /// A status with only the required fields set.
    pub fn new(node: impl Into<String>, state: State, mgmt_role: MgmtRole) -> Self {
        Self {
            node: node.into(),
            state,
            mgmt_role,
            cluster_role: ClusterRole::None,
            pid: None,
            port: None,
            metrics_port: None,
            restarts: 0,
            last_exit: None,
            started_at_ms: None,
            ready: false,
            status_text: None,
            rss_bytes: None,
            cpu_ms: None,
            last_error: None,
            stopping_since_ms: None,
            restart_at_ms: None,
            generation: None,
            cpus: None,
            nodes_max: None,
            unenforceable: BTreeMap::new(),
            cert_not_after: None,
            memory_bytes: None,
            cgroup_cpu_ms: None,
            oom_kills: 0,
            liveness_failures: 0,
            last_failure: None,
        }
    }
}

/// The last lines of a node's stdout and stderr (Zeek's `Management::NodeOutputs`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeOutputs {
    /// Tail of stdout, lines joined with `\n`.
    pub stdout: String,
    /// Tail of stderr, lines joined with `\n`.
    pub stderr: String,
}

/// The typed payload of a [`MgmtResult`] (Zeek's `data: any`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum ResultData {
    /// A configuration id.
    ConfigId(String),
    /// Connected instances.
    Instances(Vec<Instance>),
    /// A whole configuration.
    Configuration(Box<Configuration>),
    /// Statuses of an instance's processes.
    NodeStatuses(Vec<NodeStatus>),
    /// Output tails of a node that failed.
    NodeOutputs(NodeOutputs),
    /// A value, as a JSON document in a string (as Zeek's `to_json()`).
    Json(String),
    /// Lines of one of a node's output streams.
    Log(LogChunk),
}

/// Which output stream of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Lines of one output stream of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// The stream.
    pub stream: LogStream,
    /// Complete lines, oldest first, without their newline.
    pub lines: Vec<String>,
    /// Where in the stream's file the sender stands after these lines, when it knows:
    /// a follow broken off (its agent restarted) is taken up again from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<LogMark>,
}

/// A place in a node's log file: the file (its inode number, which a rotation by
/// rename changes) and a length of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMark {
    /// The file's inode number.
    pub ino: u64,
    /// Bytes from the file's start.
    pub len: u64,
}

/// Where to take up a follow of each stream (see [`LogChunk::end`]); a stream without a
/// mark is followed from its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogResume {
    /// Standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<LogMark>,
    /// Standard error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<LogMark>,
}

/// The universal answer to a management request (Zeek's `Management::Result`).
///
/// Results produced by the controller itself carry no `instance`; results an agent
/// produced always do. Clients rely on that distinction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MgmtResult {
    /// The request that produced it.
    pub reqid: String,
    /// Whether the operation succeeded.
    pub success: bool,
    /// The instance it concerns, when an agent produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ResultData>,
    /// Error message when `success` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node it concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl MgmtResult {
    /// A successful result with a payload.
    pub fn ok(reqid: impl Into<String>, data: Option<ResultData>) -> Self {
        Self {
            reqid: reqid.into(),
            success: true,
            instance: None,
            data,
            error: None,
            node: None,
        }
    }

    /// A failed result with an error message.
    pub fn err(reqid: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            reqid: reqid.into(),
            success: false,
            instance: None,
            data: None,
            error: Some(error.into()),
            node: None,
        }
    }

    /// Sets the instance.
    #[must_use]
    pub fn on_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    /// Sets the node.
    #[must_use]
    pub fn on_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// The failure of a request's part for instance `instance`, whose agent is not
    /// connected: nothing was done there.
    pub fn not_connected(reqid: impl Into<String>, instance: &str) -> Self {
        Self::err(reqid, not_connected(instance)).on_instance(instance)
    }

    /// Whether this is a [`MgmtResult::not_connected`]: its part was not acted on.
    pub fn is_not_connected(&self) -> bool {
        !self.success
            && self
                .instance
                .as_deref()
                .is_some_and(|i| self.error.as_deref() == Some(not_connected(i).as_str()))
    }
}

/// Why a request's part for `instance` was not acted on: its agent is not connected.
pub fn not_connected(instance: &str) -> String {
    format!("instance '{instance}' is not connected")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_settles_within_its_stop_and_readiness_timeouts() {
        let mut n = Node::new("w", "a");
        n.stop_timeout = Duration::from_secs(7);
        assert_eq!(n.settle_within(false, false), Duration::ZERO);
        assert_eq!(n.settle_within(true, false), Duration::from_secs(7));
        // The default readiness: a start period of 1 s.
        assert_eq!(n.settle_within(false, true), Duration::from_secs(1));
        n.readiness = Readiness::Notify {
            timeout: Duration::from_secs(30),
        };
        assert_eq!(n.settle_within(true, true), Duration::from_secs(37));
        n.readiness = Readiness::Tcp {
            port: 80,
            timeout: Duration::from_millis(1500),
        };
        assert_eq!(n.settle_within(false, true), Duration::from_millis(1500));
    }

    #[test]
    fn state_names_are_upper_case_on_the_wire() {
        for s in State::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
        }
    }

    #[test]
    fn roles_parse_case_insensitively() {
        assert_eq!(ClusterRole::parse("WORKER"), ClusterRole::Worker);
        assert_eq!(ClusterRole::parse("Manager"), ClusterRole::Manager);
        assert_eq!(
            ClusterRole::parse("web"),
            ClusterRole::Other("web".to_owned())
        );
        let json = serde_json::to_string(&ClusterRole::Proxy).unwrap();
        assert_eq!(json, "\"proxy\"");
    }

    #[test]
    fn node_defaults_survive_a_json_round_trip() {
        let mut node = Node::new("w1", "agent-1");
        node.command = vec!["/bin/sleep".into(), "1".into()];
        node.cpu_affinity = Some(CpuAffinity::One(1));
        let json = serde_json::to_string(&node).unwrap();
        let back: Node = serde_json::from_str(&json).unwrap();
        assert_eq!(back, node);
        let minimal: Node =
            serde_json::from_str(r#"{"name":"w1","instance":"agent-1","command":["x"]}"#).unwrap();
        assert_eq!(minimal.stop_signal, "SIGTERM");
        assert_eq!(minimal.restart, RestartPolicy::OnFailure);
        assert_eq!(minimal.readiness, Readiness::default());
    }

    #[test]
    fn shares_are_each_instances_share() {
        let mut c = Configuration::empty();
        for i in ["a", "b", "c"] {
            c.instances.push(Instance {
                name: i.into(),
                host: None,
                port: None,
            });
        }
        for (n, i) in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("x1", "x")] {
            c.nodes.push(Node::new(n, i));
        }
        c.roles.insert("web".into(), RoleTemplate::default());
        let shares = c.shares(["a", "b", "c", "d", "a"]);
        assert_eq!(shares.len(), 4);
        for (name, share) in &shares {
            assert_eq!(share, &c.share_for(name), "share of {name}");
        }
        assert_eq!(shares["a"].nodes.len(), 2);
    }

    #[test]
    fn role_templates_fill_command_env_and_placeholders() {
        let mut c = Configuration::empty();
        c.roles.insert(
            "worker".into(),
            RoleTemplate {
                command: vec!["/usr/bin/zeek".into(), "-i".into(), "{interface}".into()],
                env: BTreeMap::from([
                    ("NODE".into(), "{name}@{instance}".into()),
                    ("KEEP".into(), "template".into()),
                ]),
                ..RoleTemplate::default()
            },
        );
        let mut n = Node::new("w1", "a1");
        n.role = ClusterRole::Worker;
        n.interface = Some("eth0".into());
        n.env.insert("KEEP".into(), "own".into());
        let r = c.resolve(&n);
        assert_eq!(r.command, vec!["/usr/bin/zeek", "-i", "eth0"]);
        assert_eq!(r.env["NODE"], "w1@a1");
        assert_eq!(r.env["KEEP"], "own");
        let mut own = n.clone();
        own.command = vec!["/bin/true".into()];
        assert_eq!(c.resolve(&own).command, vec!["/bin/true"]);
    }

    #[test]
    fn scripts_expand_to_one_argument_each() {
        let mut c = Configuration::empty();
        c.roles.insert(
            "manager".into(),
            RoleTemplate {
                command: vec!["zeek".into(), "local".into(), "{scripts}".into()],
                env: BTreeMap::from([("SCRIPTS".into(), "[{scripts}]".into())]),
                ..RoleTemplate::default()
            },
        );
        let mut n = Node::new("m", "a");
        n.role = ClusterRole::Manager;
        assert_eq!(c.resolve(&n).command, ["zeek", "local"]);
        assert_eq!(c.resolve(&n).env["SCRIPTS"], "[]");
        n.scripts = vec!["a.zeek".into(), "policy/b".into()];
        assert_eq!(
            c.resolve(&n).command,
            ["zeek", "local", "a.zeek", "policy/b"]
        );
        assert_eq!(c.resolve(&n).env["SCRIPTS"], "[a.zeek policy/b]");
    }

    #[test]
    fn targets_select_by_name_role_and_instance() {
        let mut c = Configuration::empty();
        for (name, inst, role) in [
            ("w1", "a", "worker"),
            ("w2", "b", "worker"),
            ("m", "a", "manager"),
        ] {
            let mut n = Node::new(name, inst);
            n.role = ClusterRole::parse(role);
            c.nodes.push(n);
        }
        let t = |v: &[&str]| c.select(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            t(&["role:worker"]),
            (vec!["w1".into(), "w2".into()], vec![])
        );
        assert_eq!(
            t(&["instance:a", "w2"]),
            (vec!["m".into(), "w1".into(), "w2".into()], vec![])
        );
        assert_eq!(
            t(&["m", "nope", "role:proxy"]),
            (vec!["m".into()], vec!["nope".into(), "role:proxy".into()])
        );
        assert_eq!(
            t(&["w*", "?", "x*"]),
            (
                vec!["m".into(), "w1".into(), "w2".into()],
                vec!["x*".into()]
            )
        );
    }

    #[test]
    fn wildcards_match_as_a_shells() {
        for (p, n) in [
            ("w1", "w1"),
            ("w*", "w1"),
            ("w*", "w"),
            ("*-1", "worker-1"),
            ("w?-*", "w1-x"),
            ("*", ""),
            ("a*b*c", "axxbyyc"),
            ("a*b", "abab"),
        ] {
            assert!(wildcard(p, n), "{p} {n}");
        }
        for (p, n) in [
            ("w1", "w10"),
            ("w?", "w"),
            ("*-1", "worker-10"),
            ("a*b*c", "axxbyy"),
            ("", "a"),
        ] {
            assert!(!wildcard(p, n), "{p} {n}");
        }
    }

    #[test]
    fn result_data_is_tagged() {
        let r = MgmtResult::ok("r1", Some(ResultData::ConfigId("c".into()))).on_instance("a");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["data"]["type"], "config_id");
        assert_eq!(v["instance"], "a");
        assert!(v.get("node").is_none());
    }
}
