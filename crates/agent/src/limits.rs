//! Per-node resource limits through cgroups: `memory`, `cpus`, `cpu_weight`,
//! `pids_max` and `io_weight`, on cgroup v2 where the agent's subtree has the
//! controller, else on the cgroup v1 hierarchy of that controller; and what the
//! cgroups account: memory and CPU of the whole node (children included) and OOM kills.
//!
//! # Where each setting goes
//!
//! | setting       | cgroup v2                 | cgroup v1                                     |
//! |---------------|---------------------------|-----------------------------------------------|
//! | `memory.max`  | `memory.max`              | `memory.limit_in_bytes`                       |
//! | `memory.high` | `memory.high`             | `memory.soft_limit_in_bytes` (reclaim target) |
//! | `cpus`        | `cpu.max`                 | `cpu.cfs_quota_us` / `cpu.cfs_period_us`      |
//! | `cpu_weight`  | `cpu.weight`              | `cpu.shares` (weight x 1024 / 100)            |
//! | `pids_max`    | `pids.max`                | `pids.max`                                    |
//! | `io_weight`   | `io.weight`               | `blkio.weight` (weight x 5, 10 to 1000)       |
//!
//! A controller is used on v2 when it can be enabled in the agent's subtree (see
//! [`crate::cgroup`]: under systemd that takes `Delegate=yes`); otherwise on v1 in
//! `<v1 mount>/<agent's own v1 cgroup>/<subtree name>/nodes/<node>`, beside the v2
//! subtree. A setting neither can enforce (no such controller, or a v1 hierarchy
//! without the file: `blkio.weight` needs a proportional I/O scheduler) is refused
//! when the node is deployed, with the node, the setting and the reason: never ignored.
//!
//! # Placing a node in its v1 cgroups
//!
//! Before the exec, not after: the child moves itself into the node's v1 cgroups as
//! the first thing it does (a write of "0" to each one's `cgroup.procs`, opened by the
//! agent beforehand, see [`crate::exec::spawn`]), so its memory after `exec` is charged
//! there (a new address space belongs to the process that made it) and nothing the
//! node forks or allocates escapes its limits. The agent's own threads never change
//! cgroups: each move waits for an RCU grace period, and moving the spawning thread in
//! and out took two per hierarchy. The CPU quota is written only once the node runs,
//! so its first steps are never throttled by its quota while the spawning thread waits
//! for them; `pids.max` is written before, so that a node forking at once cannot pass
//! it. On v2 a node is created in its cgroup (see
//! [`crate::cgroup`]), whose limits are written before.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use drover_proto::model::Node;

use crate::cgroup::Cgroups;

/// A controller drover sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ctl {
    Memory,
    Cpu,
    Pids,
    Io,
}

impl Ctl {
    const ALL: [Self; 4] = [Self::Memory, Self::Cpu, Self::Pids, Self::Io];

    fn v2(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Cpu => "cpu",
            Self::Pids => "pids",
            Self::Io => "io",
        }
    }

    fn v1(self) -> &'static str {
        match self {
            Self::Io => "blkio",
            other => other.v2(),
        }
    }
}

/// The agent's host, once known: its own status entry tells the controller what it
/// cannot enforce ([`Host::unenforceable`], looked at anew each time: a scheduler with
/// proportional weights may be loaded later).
pub static HOST: std::sync::OnceLock<std::sync::Arc<Host>> = std::sync::OnceLock::new();

/// A node's limits, as numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
    pub cpus: Option<f64>,
    pub cpu_weight: Option<u32>,
    pub pids_max: Option<u64>,
    pub io_weight: Option<u32>,
}

/// The CFS period drover uses for a CPU quota (the kernel's default).
const PERIOD_US: u64 = 100_000;

/// One file to write in a node's cgroup: the controller, the setting it comes from, the
/// file and the value; `late` files are written once the node runs (see the module
/// docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub ctl: Ctl,
    pub setting: &'static str,
    pub file: &'static str,
    pub value: String,
    pub late: bool,
}

impl Limits {
    pub fn of(n: &Node) -> Self {
        Self {
            memory_max: n.memory.and_then(|m| m.max).map(|b| b.0),
            memory_high: n.memory.and_then(|m| m.high).map(|b| b.0),
            cpus: n.cpus,
            cpu_weight: n.cpu_weight,
            pids_max: n.pids_max,
            io_weight: n.io_weight,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn quota_us(cpus: f64) -> u64 {
        // Validation bounds cpus to 0.01..=4096, so this is 1_000 or more and fits.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "bounded by validation"
        )]
        let q = (cpus * PERIOD_US as f64).round() as u64;
        q.max(1_000)
    }

    /// The files to write for these limits, on v2 (`v2`) or v1.
    pub fn writes(&self, v2: bool) -> Vec<Write> {
        let mut out = Vec::new();
        let mut w = |ctl, setting, file, value: String, late| {
            out.push(Write {
                ctl,
                setting,
                file,
                value,
                late,
            });
        };
        use Ctl::{Cpu, Io, Memory, Pids};
        if v2 {
            if let Some(m) = self.memory_max {
                w(Memory, "memory.max", "memory.max", m.to_string(), false);
            }
            if let Some(m) = self.memory_high {
                w(Memory, "memory.high", "memory.high", m.to_string(), false);
            }
            if let Some(c) = self.cpus {
                let v = format!("{} {PERIOD_US}", Self::quota_us(c));
                w(Cpu, "cpus", "cpu.max", v, false);
            }
            if let Some(c) = self.cpu_weight {
                w(Cpu, "cpu_weight", "cpu.weight", c.to_string(), false);
            }
            if let Some(p) = self.pids_max {
                w(Pids, "pids_max", "pids.max", p.to_string(), false);
            }
            if let Some(i) = self.io_weight {
                w(Io, "io_weight", "io.weight", format!("default {i}"), false);
            }
        } else {
            if let Some(m) = self.memory_max {
                w(
                    Memory,
                    "memory.max",
                    "memory.limit_in_bytes",
                    m.to_string(),
                    false,
                );
            }
            if let Some(m) = self.memory_high {
                let f = "memory.soft_limit_in_bytes";
                w(Memory, "memory.high", f, m.to_string(), false);
            }
            if let Some(c) = self.cpus {
                let p = PERIOD_US.to_string();
                w(Cpu, "cpus", "cpu.cfs_period_us", p, false);
                let q = Self::quota_us(c).to_string();
                w(Cpu, "cpus", "cpu.cfs_quota_us", q, true);
            }
            if let Some(c) = self.cpu_weight {
                let shares = (u64::from(c) * 1024 / 100).max(2);
                w(Cpu, "cpu_weight", "cpu.shares", shares.to_string(), false);
            }
            // Before the node runs: what it forks at once counts.
            if let Some(p) = self.pids_max {
                w(Pids, "pids_max", "pids.max", p.to_string(), false);
            }
            if let Some(i) = self.io_weight {
                let weight = (u64::from(i) * 5).clamp(10, 1000);
                w(Io, "io_weight", "blkio.weight", weight.to_string(), false);
            }
        }
        out
    }

    /// The files of the settings these limits leave unset, with what each holds
    /// without a limit (the kernel's defaults), on v2 (`v2`) or v1: written into a
    /// node cgroup that outlives the node's process, over what an earlier spec of the
    /// node set, since a redeploy that drops a limit means the node runs without it.
    pub fn resets(&self, v2: bool) -> Vec<(Ctl, &'static str, &'static str)> {
        use Ctl::{Cpu, Io, Memory, Pids};
        let unset = [
            self.memory_max.is_none(),
            self.memory_high.is_none(),
            self.cpus.is_none(),
            self.cpu_weight.is_none(),
            self.pids_max.is_none(),
            self.io_weight.is_none(),
        ];
        let files = if v2 {
            [
                (Memory, "memory.max", "max"),
                (Memory, "memory.high", "max"),
                (Cpu, "cpu.max", "max"),
                (Cpu, "cpu.weight", "100"),
                (Pids, "pids.max", "max"),
                (Io, "io.weight", "default 100"),
            ]
        } else {
            [
                (Memory, "memory.limit_in_bytes", "-1"),
                (Memory, "memory.soft_limit_in_bytes", "-1"),
                (Cpu, "cpu.cfs_quota_us", "-1"),
                (Cpu, "cpu.shares", "1024"),
                (Pids, "pids.max", "max"),
                (Io, "blkio.weight", "500"),
            ]
        };
        unset
            .into_iter()
            .zip(files)
            .filter_map(|(unset, f)| unset.then_some(f))
            .collect()
    }

    /// What a `late` file holds until it is written: no limit.
    fn unlimited(file: &str) -> &'static str {
        if file == "cpu.cfs_quota_us" {
            "-1"
        } else {
            "max"
        }
    }
}

/// A v1 hierarchy the agent may use for one controller.
#[derive(Debug, Clone)]
struct V1 {
    /// `<the agent's own cgroup in it>/<subtree name>/nodes`, made by [`V1::make`].
    nodes: PathBuf,
    /// The agent's own cgroup is the hierarchy's root, which lacks files every other
    /// cgroup of it has (`pids.max`, say).
    own_is_root: bool,
}

impl V1 {
    /// Makes the agent's directory in this hierarchy, if missing.
    fn make(&self) -> io::Result<()> {
        if self.nodes.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(&self.nodes).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", self.nodes.display()),
            )
        })?;
        tracing::info!(dir = %self.nodes.display(), "node limits use cgroup v1 here");
        Ok(())
    }
}

/// What this host can enforce, found once at start-up.
#[derive(Debug, Default)]
pub struct Host {
    /// The v2 node cgroups' parent, when there is a v2 subtree.
    v2_nodes: Option<PathBuf>,
    /// Controllers enabled for the v2 node cgroups.
    v2: Vec<Ctl>,
    /// Why a controller is not on v2.
    v2_why: String,
    v1: BTreeMap<Ctl, V1>,
    /// Why a controller has no usable v1 hierarchy.
    v1_why: BTreeMap<Ctl, String>,
    /// Nodes with a v1 memory cgroup: only theirs is read (status reports ask about
    /// every node, most of which have none).
    v1_memory: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Where one node's limits live: its v1 cgroups (the spawning thread enters them), and
/// whether it has v2 limits.
#[derive(Debug, Default)]
pub struct Placement {
    v1: Vec<PathBuf>,
    late: Vec<(PathBuf, String)>,
}

impl Host {
    /// Finds what `cgroups` (the agent's v2 subtree, if any) and the v1 hierarchies
    /// mounted offer; `subtree` names the agent's directory in each v1 hierarchy.
    pub fn discover(cgroups: Option<&Cgroups>, subtree: &str) -> Self {
        let mut host = Self::default();
        match cgroups {
            Some(c) => {
                let (on, why) = enable_v2(c.root());
                host.v2 = on;
                host.v2_why = why;
                host.v2_nodes = Some(c.root().join("nodes"));
            }
            None => host.v2_why = "no cgroup v2 subtree (--cgroup-root)".to_owned(),
        }
        let mounts = v1_mounts();
        let own = v1_own();
        for ctl in Ctl::ALL {
            if host.v2.contains(&ctl) {
                continue;
            }
            let name = ctl.v1();
            let Some((mount, root)) = mounts.get(name) else {
                host.v1_why
                    .insert(ctl, format!("no cgroup v1 {name} hierarchy is mounted"));
                continue;
            };
            let rel = own.get(name).map_or("/", String::as_str);
            let rel = rel.strip_prefix(root.as_str()).unwrap_or(rel);
            let own_dir = Path::new(mount).join(rel.trim_start_matches('/'));
            let nodes = own_dir.join(subtree).join("nodes");
            // Made when a node first needs it: most agents set no limit that v2 cannot,
            // and a v1 cgroup (a memory one above all) is not free to keep.
            match nix::unistd::access(&own_dir, nix::unistd::AccessFlags::W_OK) {
                Ok(()) => {
                    let own_is_root = own_dir == Path::new(mount);
                    host.v1.insert(ctl, V1 { nodes, own_is_root });
                }
                Err(e) => {
                    host.v1_why.insert(
                        ctl,
                        format!("cannot create {}: {}", nodes.display(), io::Error::from(e)),
                    );
                }
            }
        }
        host
    }

    /// A line for the agent's log: where each controller is.
    pub fn describe(&self) -> String {
        Ctl::ALL
            .iter()
            .map(|c| {
                let at = if self.v2.contains(c) {
                    "v2"
                } else if self.v1.contains_key(c) {
                    "v1"
                } else {
                    "none"
                };
                format!("{}={at}", c.v2())
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Refuses limits this host cannot enforce: an error naming the node, the setting
    /// and the reason.
    pub fn check(&self, node: &str, limits: &Limits) -> Result<(), String> {
        self.check_as(node, limits, true)
    }

    /// [`Host::check`]; without `make`, nothing is created: the agent's own v1 cgroup,
    /// which exists and has the files its subtree's would, is looked at instead.
    fn check_as(&self, node: &str, limits: &Limits, make: bool) -> Result<(), String> {
        for w in limits.writes(true) {
            if let (true, Some(nodes)) = (self.v2.contains(&w.ctl), &self.v2_nodes)
                && !nodes.join(w.file).exists()
            {
                return Err(format!(
                    "node '{node}': {} cannot be enforced on this host: {} does not exist in {}",
                    w.setting,
                    w.file,
                    nodes.display()
                ));
            }
        }
        for w in limits.writes(false) {
            if self.v2.contains(&w.ctl) {
                continue;
            }
            let Some(v1) = self.v1.get(&w.ctl) else {
                return Err(self.refusal(node, w.setting, w.ctl, None));
            };
            if make && let Err(e) = v1.make() {
                return Err(self.refusal(node, w.setting, w.ctl, Some(e.to_string())));
            }
            // The agent's v1 directory has every file a node's cgroup will have, as
            // has the agent's own v1 cgroup above it.
            let subtree = v1.nodes.parent().unwrap_or(&v1.nodes);
            let dir = if make {
                subtree
            } else {
                subtree.parent().unwrap_or(subtree)
            };
            let mut exists = dir.join(w.file).exists();
            if !exists && !make && v1.own_is_root {
                // The root has not every file: one of its child cgroups says; with none
                // to look at, the agent's own directory, made now rather than at the
                // first deploy that needs it (the answer is wanted before any deploy).
                exists = match first_subdir(dir) {
                    Some(child) => child.join(w.file).exists(),
                    None => v1.make().is_err() || subtree.join(w.file).exists(),
                };
            }
            if !exists {
                let why = format!(
                    "{} does not exist in the cgroup v1 {} hierarchy{}",
                    w.file,
                    w.ctl.v1(),
                    if w.ctl == Ctl::Io {
                        " (the block devices' I/O scheduler has no proportional weights)"
                    } else {
                        ""
                    }
                );
                return Err(self.refusal(node, w.setting, w.ctl, Some(why)));
            }
        }
        Ok(())
    }

    /// The settings this host cannot enforce, each with why (as [`Host::check`] says it,
    /// without a node's name): reported to the controller, which refuses a deploy that
    /// uses one before anything changes.
    pub fn unenforceable(&self) -> BTreeMap<String, String> {
        let one = [
            Limits {
                memory_max: Some(1 << 30),
                ..Limits::default()
            },
            Limits {
                memory_high: Some(1 << 30),
                ..Limits::default()
            },
            Limits {
                cpus: Some(1.0),
                ..Limits::default()
            },
            Limits {
                cpu_weight: Some(100),
                ..Limits::default()
            },
            Limits {
                pids_max: Some(1024),
                ..Limits::default()
            },
            Limits {
                io_weight: Some(100),
                ..Limits::default()
            },
        ];
        let mut out = BTreeMap::new();
        for limits in one {
            let Some(setting) = limits.writes(true).first().map(|w| w.setting) else {
                continue;
            };
            if let Err(why) = self.check_as("", &limits, false) {
                let why = why.strip_prefix("node '': ").unwrap_or(&why).to_owned();
                out.insert(setting.to_owned(), why);
            }
        }
        out
    }

    fn refusal(&self, node: &str, setting: &str, ctl: Ctl, v1: Option<String>) -> String {
        let v1 = v1
            .or_else(|| self.v1_why.get(&ctl).cloned())
            .unwrap_or_default();
        format!(
            "node '{node}': {setting} cannot be enforced on this host: the {} controller is not available on cgroup v2 ({}) and {v1}",
            ctl.v2(),
            self.v2_why
        )
    }

    /// Writes the node's limits into its cgroups (v2: the node's v2 cgroup, made
    /// ahead; `v2_fresh` when it was made anew for this process, so it holds no
    /// earlier spec's limits), creating its v1 cgroups; a setting the node no longer
    /// has is set back to no limit in the cgroups it keeps. Call before each spawn; the
    /// returned placement is entered around the spawn and finished after it.
    pub fn prepare(&self, node: &str, limits: &Limits, v2_fresh: bool) -> io::Result<Placement> {
        let mut placement = Placement::default();
        if let (false, Some(nodes)) = (v2_fresh, &self.v2_nodes) {
            let dir = nodes.join(node);
            if dir.is_dir() {
                for (_, file, value) in limits
                    .resets(true)
                    .into_iter()
                    .filter(|(ctl, _, _)| self.v2.contains(ctl))
                {
                    write_existing(&dir.join(file), value)?;
                }
            }
        }
        self.adopted(node, limits);
        if limits.is_empty() {
            return Ok(placement);
        }
        let v2w = limits.writes(true);
        for w in limits.writes(false) {
            if self.v2.contains(&w.ctl) {
                continue;
            }
            let v1 = self
                .v1
                .get(&w.ctl)
                .ok_or_else(|| io::Error::other(self.refusal(node, w.setting, w.ctl, None)))?;
            let dir = v1.nodes.join(node);
            if !placement.v1.contains(&dir) {
                v1.make()?;
                make_dir(&dir)?;
                placement.v1.push(dir.clone());
            }
            let path = dir.join(w.file);
            if w.late {
                write(&path, Limits::unlimited(w.file))?;
                placement.late.push((path, w.value));
            } else {
                write(&path, &w.value)?;
            }
        }
        // The v1 cgroups the node enters are kept from one spec to the next.
        for (ctl, file, value) in limits.resets(false) {
            if let Some(v1) = self.v1.get(&ctl).filter(|_| !self.v2.contains(&ctl)) {
                let dir = v1.nodes.join(node);
                if placement.v1.contains(&dir) {
                    write_existing(&dir.join(file), value)?;
                }
            }
        }
        if let Some(nodes) = &self.v2_nodes {
            let dir = nodes.join(node);
            for w in v2w.iter().filter(|w| self.v2.contains(&w.ctl)) {
                make_dir(&dir)?;
                write(&dir.join(w.file), &w.value)?;
            }
        }
        Ok(placement)
    }

    /// Notes the limits of a node found running (or about to start): whether it has a
    /// memory cgroup of its own to account. One whose spec no longer limits its memory
    /// runs outside its v1 memory cgroup, whose figures are no longer its own: that
    /// cgroup goes (once empty).
    pub fn adopted(&self, node: &str, limits: &Limits) {
        let mut accounted = self
            .v1_memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.v1_memory_of(limits) {
            accounted.insert(node.to_owned());
        } else if accounted.remove(node)
            && let Some(v) = self.v1.get(&Ctl::Memory)
        {
            let _ = fs::remove_dir(v.nodes.join(node));
        }
    }

    fn v1_memory_of(&self, limits: &Limits) -> bool {
        !self.v2.contains(&Ctl::Memory)
            && self.v1.contains_key(&Ctl::Memory)
            && (limits.memory_max.is_some() || limits.memory_high.is_some())
    }

    /// True when a node with these limits has a memory cgroup of its own, which counts
    /// its OOM kills.
    pub fn counts_oom(&self, limits: &Limits) -> bool {
        self.v2.contains(&Ctl::Memory) || self.v1_memory_of(limits)
    }

    /// Memory charged to the node's cgroup (children included) and its CPU time in
    /// microseconds, where a cgroup accounts them.
    pub fn usage(&self, node: &str) -> (Option<u64>, Option<u64>) {
        let v2 = self.v2_nodes.as_ref().map(|n| n.join(node));
        let memory = if self.v2.contains(&Ctl::Memory) {
            v2.as_ref()
                .and_then(|d| read_u64(&d.join("memory.current")))
        } else if self
            .v1_memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(node)
        {
            self.v1
                .get(&Ctl::Memory)
                .and_then(|v| read_u64(&v.nodes.join(node).join("memory.usage_in_bytes")))
        } else {
            None
        };
        let cpu = v2
            .as_ref()
            .and_then(|d| crate::sys::read_pseudo_text(&d.join("cpu.stat")).ok())
            .and_then(|t| keyed(&t, "usage_usec"));
        (memory, cpu)
    }

    /// OOM kills in the node's cgroup so far (`oom_kill` of v2 `memory.events` or v1
    /// `memory.oom_control`); `None` where the node has no memory cgroup.
    pub fn oom_kills(&self, node: &str) -> Option<u64> {
        if self.v2.contains(&Ctl::Memory) {
            let d = self.v2_nodes.as_ref()?.join(node);
            return keyed(
                &crate::sys::read_pseudo_text(&d.join("memory.events")).ok()?,
                "oom_kill",
            );
        }
        let d = self.v1.get(&Ctl::Memory)?.nodes.join(node);
        keyed(
            &crate::sys::read_pseudo_text(&d.join("memory.oom_control")).ok()?,
            "oom_kill",
        )
    }

    /// Removes the agent's (empty) v1 subtrees: the agent stopped its nodes and exits.
    pub fn release(&self) {
        for v in self.v1.values() {
            if let Ok(dirs) = fs::read_dir(&v.nodes) {
                for d in dirs
                    .flatten()
                    .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
                {
                    let _ = fs::remove_dir(d.path());
                }
            }
            let _ = fs::remove_dir(&v.nodes);
            if let Some(subtree) = v.nodes.parent() {
                let _ = fs::remove_dir(subtree);
            }
        }
    }

    /// Removes the v1 cgroups of nodes `keep` does not know (left by an agent killed
    /// while removing a node, or whose state dir was lost), killing what still runs in
    /// them; the names it removed.
    pub fn sweep(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut swept = std::collections::BTreeSet::new();
        for v in self.v1.values() {
            let Ok(dirs) = fs::read_dir(&v.nodes) else {
                continue;
            };
            for d in dirs
                .flatten()
                .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
            {
                let name = d.file_name().to_string_lossy().into_owned();
                if keep(&name) {
                    continue;
                }
                let procs = fs::read_to_string(d.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    if let Ok(fd) = crate::sys::PidFd::open(pid) {
                        let _ = fd.signal(nix::sys::signal::Signal::SIGKILL);
                    }
                }
                if fs::remove_dir(d.path()).is_ok() {
                    swept.insert(name);
                }
            }
        }
        swept.into_iter().collect()
    }

    /// Removes the node's v1 cgroups (its v2 cgroup is removed with containment).
    pub fn remove(&self, node: &str) {
        self.v1_memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(node);
        for v in self.v1.values() {
            let _ = fs::remove_dir(v.nodes.join(node));
        }
    }
}

impl Placement {
    /// Opens the `cgroup.procs` of each of the node's v1 cgroups, for the child to move
    /// itself into them before it execs (see [`crate::exec::spawn`]).
    pub fn open_procs(&self) -> io::Result<Vec<std::os::fd::OwnedFd>> {
        self.v1
            .iter()
            .map(|dir| {
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(dir.join("cgroup.procs"))
                    .map(std::os::fd::OwnedFd::from)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot enter {}: {e}", dir.display()))
                    })
            })
            .collect()
    }

    /// Writes the limits that wait for the node to run (the CPU quota).
    pub fn finish(&self) -> io::Result<()> {
        for (path, value) in &self.late {
            write(path, value)?;
        }
        Ok(())
    }
}

/// A directory in `dir`, if it has one.
fn first_subdir(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir).ok()?.find_map(|e| {
        let e = e.ok()?;
        e.file_type().ok()?.is_dir().then(|| e.path())
    })
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot write '{value}' to {}: {e}", path.display()),
        )
    })
}

/// As [`write`], for a file the kernel may not offer (a controller's optional file):
/// nothing to do without it.
fn write_existing(path: &Path, value: &str) -> io::Result<()> {
    match write(path, value) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    crate::sys::read_pseudo_text(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a `key value` per line file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Enables the controllers drover uses in the v2 subtree at `root` (and its parent,
/// the agent's delegated cgroup, when they are not enabled there yet); returns those
/// enabled for the node cgroups and why the others are not.
fn enable_v2(root: &Path) -> (Vec<Ctl>, String) {
    let has = |dir: &Path, ctl: Ctl| {
        fs::read_to_string(dir.join("cgroup.controllers"))
            .is_ok_and(|t| t.split_whitespace().any(|c| c == ctl.v2()))
    };
    let nodes = root.join("nodes");
    let mut on = Vec::new();
    let mut missing = Vec::new();
    for ctl in Ctl::ALL {
        let plus = format!("+{}", ctl.v2());
        if !has(root, ctl)
            && let Some(parent) = root.parent()
        {
            let _ = fs::write(parent.join("cgroup.subtree_control"), &plus);
        }
        let enabled = has(root, ctl)
            && fs::write(root.join("cgroup.subtree_control"), &plus).is_ok()
            && fs::write(nodes.join("cgroup.subtree_control"), &plus).is_ok();
        if enabled {
            on.push(ctl);
        } else {
            missing.push(ctl.v2());
        }
    }
    let why = if missing.is_empty() {
        String::new()
    } else {
        format!(
            "{} cannot be enabled in {}: not delegated to the agent",
            missing.join(", "),
            root.display()
        )
    };
    (on, why)
}

/// v1 hierarchies by controller: the mount point and the mount's root in the
/// hierarchy.
fn v1_mounts() -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return out;
    };
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        if r.next() != Some("cgroup") {
            continue;
        }
        let opts = r.nth(1).unwrap_or("");
        let mut l = left.split_whitespace();
        let (Some(root), Some(mount)) = (l.nth(3), l.next()) else {
            continue;
        };
        for o in opts.split(',') {
            out.entry(o.to_owned())
                .or_insert_with(|| (mount.to_owned(), root.to_owned()));
        }
    }
    out
}

/// This process's v1 cgroup path by controller, from `/proc/self/cgroup`.
fn v1_own() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(text) = fs::read_to_string("/proc/self/cgroup") else {
        return out;
    };
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, Some(ctls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        for c in ctls.split(',').filter(|c| !c.is_empty()) {
            out.insert(c.to_owned(), path.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use drover_proto::resources::{ByteSize, Memory};

    fn limits() -> Limits {
        let mut n = Node::new("n", "a");
        n.memory = Some(Memory {
            max: Some(ByteSize(64 << 20)),
            high: Some(ByteSize(48 << 20)),
        });
        n.cpus = Some(1.5);
        n.cpu_weight = Some(200);
        n.pids_max = Some(32);
        n.io_weight = Some(300);
        Limits::of(&n)
    }

    #[test]
    fn settings_map_to_v2_and_v1_files() {
        let v2: Vec<(&str, String)> = limits()
            .writes(true)
            .into_iter()
            .map(|w| (w.file, w.value))
            .collect();
        assert_eq!(
            v2,
            [
                ("memory.max", "67108864".to_owned()),
                ("memory.high", "50331648".to_owned()),
                ("cpu.max", "150000 100000".to_owned()),
                ("cpu.weight", "200".to_owned()),
                ("pids.max", "32".to_owned()),
                ("io.weight", "default 300".to_owned()),
            ]
        );
        let v1: Vec<(&str, String, bool)> = limits()
            .writes(false)
            .into_iter()
            .map(|w| (w.file, w.value, w.late))
            .collect();
        assert_eq!(
            v1,
            [
                ("memory.limit_in_bytes", "67108864".to_owned(), false),
                ("memory.soft_limit_in_bytes", "50331648".to_owned(), false),
                ("cpu.cfs_period_us", "100000".to_owned(), false),
                ("cpu.cfs_quota_us", "150000".to_owned(), true),
                ("cpu.shares", "2048".to_owned(), false),
                ("pids.max", "32".to_owned(), false),
                ("blkio.weight", "1000".to_owned(), false),
            ]
        );
        let tiny = Limits {
            cpus: Some(0.004),
            cpu_weight: Some(1),
            io_weight: Some(1),
            ..Limits::default()
        };
        let v: Vec<String> = tiny.writes(false).into_iter().map(|w| w.value).collect();
        assert_eq!(v, ["100000", "1000", "10", "10"], "kernel minimums");
        assert!(Limits::default().writes(true).is_empty());
    }

    #[test]
    fn a_host_without_controllers_refuses_with_node_setting_and_reason() {
        let host = Host {
            v2_why: "memory cannot be enabled in /x: not delegated to the agent".into(),
            v1_why: BTreeMap::from([(
                Ctl::Memory,
                "no cgroup v1 memory hierarchy is mounted".into(),
            )]),
            ..Host::default()
        };
        let e = host.check("w1", &limits()).unwrap_err();
        assert_eq!(
            e,
            "node 'w1': memory.max cannot be enforced on this host: the memory controller is not available on cgroup v2 (memory cannot be enabled in /x: not delegated to the agent) and no cgroup v1 memory hierarchy is mounted"
        );
        assert!(host.check("w1", &Limits::default()).is_ok());
        assert!(host.prepare("w1", &limits(), true).is_err());
    }

    /// A setting the node no longer has is set back to no limit in a v2 cgroup that
    /// was not made anew, and in the v1 cgroups the node enters; the settings it has
    /// are written.
    #[test]
    fn settings_dropped_are_set_back_to_no_limit() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = dir.path().join("v2");
        let node = v2.join("w1");
        fs::create_dir_all(&node).unwrap();
        for (file, old) in [
            ("memory.max", "1000"),
            ("cpu.max", "5000 100000"),
            ("pids.max", "9"),
        ] {
            fs::write(node.join(file), old).unwrap();
        }
        let host = Host {
            v2_nodes: Some(v2),
            v2: vec![Ctl::Memory, Ctl::Cpu, Ctl::Pids],
            ..Host::default()
        };
        let kept = Limits {
            memory_high: Some(4096),
            ..Limits::default()
        };
        // Made anew for this process: nothing of an earlier spec to undo.
        host.prepare("w1", &kept, true).unwrap();
        assert_eq!(fs::read_to_string(node.join("pids.max")).unwrap(), "9");
        host.prepare("w1", &kept, false).unwrap();
        let read = |f: &str| fs::read_to_string(node.join(f)).unwrap();
        assert_eq!(read("memory.max"), "max");
        assert_eq!(read("cpu.max"), "max");
        assert_eq!(read("pids.max"), "max");
        assert_eq!(read("memory.high"), "4096");
        // On v1: the hierarchies the node enters.
        let mem = dir.path().join("v1-memory");
        let host = Host {
            v1: BTreeMap::from([(
                Ctl::Memory,
                V1 {
                    nodes: mem.join("nodes"),
                    own_is_root: false,
                },
            )]),
            ..Host::default()
        };
        let both = Limits {
            memory_max: Some(1 << 20),
            memory_high: Some(4096),
            ..Limits::default()
        };
        host.prepare("w1", &both, true).unwrap();
        let v1 = |f: &str| fs::read_to_string(mem.join("nodes/w1").join(f)).unwrap();
        assert_eq!(v1("memory.limit_in_bytes"), (1 << 20).to_string());
        host.prepare("w1", &kept, true).unwrap();
        assert_eq!(v1("memory.limit_in_bytes"), "-1");
        assert_eq!(v1("memory.soft_limit_in_bytes"), "4096");
        fs::write(mem.join("nodes/w1/memory.usage_in_bytes"), "1234").unwrap();
        assert_eq!(host.usage("w1").0, Some(1234));
        // No memory limit at all: the node runs outside that cgroup, whose figures are
        // not its own any more.
        host.prepare("w1", &Limits::default(), true).unwrap();
        assert_eq!(host.usage("w1").0, None);
    }

    #[test]
    fn what_a_host_cannot_enforce_is_listed_with_why() {
        let host = Host {
            v2_why: "memory cannot be enabled in /x: not delegated to the agent".into(),
            v1_why: Ctl::ALL
                .iter()
                .map(|c| (*c, format!("no cgroup v1 {} hierarchy is mounted", c.v1())))
                .collect(),
            ..Host::default()
        };
        let all = host.unenforceable();
        assert_eq!(
            all.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "cpu_weight",
                "cpus",
                "io_weight",
                "memory.high",
                "memory.max",
                "pids_max"
            ]
        );
        assert!(
            all["memory.max"].starts_with("memory.max cannot be enforced on this host: "),
            "{}",
            all["memory.max"]
        );
        // As the agent's own check says it, for a node.
        let limits = Limits {
            memory_max: Some(1 << 20),
            ..Limits::default()
        };
        assert_eq!(
            host.check("w1", &limits).unwrap_err(),
            format!("node 'w1': {}", all["memory.max"])
        );
    }

    /// An agent in the root of a v1 hierarchy: the root lacks files its children have
    /// (`pids.max`), so a child says whether the setting can be enforced; a file no
    /// cgroup of it has (`blkio.weight` without proportional I/O) is still refused.
    #[test]
    fn an_agent_in_a_v1_root_looks_at_a_child_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let (pids, blkio) = (dir.path().join("pids"), dir.path().join("blkio"));
        for (root, child_file) in [(&pids, "pids.max"), (&blkio, "blkio.reset_stats")] {
            fs::create_dir_all(root.join("user.slice")).unwrap();
            fs::write(root.join("user.slice").join(child_file), "").unwrap();
        }
        let v1 = |root: &Path| V1 {
            nodes: root.join("drover-agent-x").join("nodes"),
            own_is_root: true,
        };
        let host = Host {
            v1: BTreeMap::from([(Ctl::Pids, v1(&pids)), (Ctl::Io, v1(&blkio))]),
            ..Host::default()
        };
        let all = host.unenforceable();
        assert!(!all.contains_key("pids_max"), "{all:?}");
        assert!(
            all.get("io_weight")
                .is_some_and(|why| why.contains("blkio.weight does not exist")),
            "{all:?}"
        );
        // Nothing was made to find out.
        assert!(!pids.join("drover-agent-x").exists());
        // Not in the root: its own cgroup is looked at, as before.
        let host = Host {
            v1: BTreeMap::from([(
                Ctl::Pids,
                V1 {
                    own_is_root: false,
                    ..v1(&pids)
                },
            )]),
            ..Host::default()
        };
        assert!(host.unenforceable().contains_key("pids_max"));
    }

    #[test]
    fn keyed_files_are_read() {
        let t = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(t, "oom_kill"), Some(3));
        assert_eq!(keyed(t, "oom"), None);
        assert_eq!(keyed("usage_usec 12\n", "usage_usec"), Some(12));
    }
}
