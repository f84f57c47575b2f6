//! A node's identity, capabilities and rlimits: resolved on the agent's host when a
//! deploy prepares the node, and applied in the child between `clone` and `exec`.
//!
//! # Resolution ([`resolve`])
//!
//! `user`, `group` and `supplementary_groups` are looked up in the host's user and group
//! databases (NSS: `getpwnam_r`, `getgrnam_r`, `getgrouplist`), which may block on a
//! directory service: callers run it on a blocking thread. A user brings its primary
//! group (or `group` in its place) and the groups the group database lists it in, as
//! `login` and systemd do. The
//! agent's own privileges are checked at the same time: an agent that cannot switch to
//! the user (no `CAP_SETUID`/`CAP_SETGID`, i.e. not root), drop from the bounding set
//! (`CAP_SETPCAP`) or hand out a capability it does not hold refuses the node, and the
//! deploy says why.
//!
//! # The child ([`spawn`])
//!
//! `posix_spawn` cannot switch users, raise capabilities, set rlimits or start a child
//! in a cgroup, and a `fork` copies the agent's page tables. So a node with any of
//! these settings is started like glibc's `posix_spawn` starts a child:
//! `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, every signal blocked in the
//! parent meanwhile; `clone3` with `CLONE_INTO_CGROUP` as well for a node with a
//! cgroup. The child shares the
//! agent's memory until it execs, so it only makes raw system calls on data prepared
//! beforehand: no allocation, no lock, no libc wrapper that touches shared state
//! (glibc's `setuid` would signal the agent's threads). In order: into its cgroup v1
//! limits, and its v2 cgroup where `clone3` did not create it there, every signal to its
//! default, its own process group, stdio, working directory, rlimits (while still
//! privileged, so hard limits may rise), umask, the bounding set cut (needs
//! `CAP_SETPCAP`), `PR_SET_KEEPCAPS`, `setgroups`, `setresgid`, `setresuid`, `capset`
//! (effective, permitted and inheritable = the node's capabilities), the ambient raise
//! (which a uid change from 0 clears, so it comes last), `PR_SET_NO_NEW_PRIVS`, an
//! empty signal mask, `execve`. A step that fails leaves its stage and errno in memory
//! the parent reads once the vfork-style clone returns, and the error names the step.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use drover_proto::exec::{LIMITS, capability_number};
use drover_proto::model::Node;
use nix::unistd::{Gid, Group, Uid, User};

use crate::sys::{CArgs, SpawnSpec};

/// What a node's child does before exec, resolved to numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// `setresuid` to this, when the node names a user.
    pub uid: Option<u32>,
    /// `setresgid` to this, when the node names a user or a group.
    pub gid: Option<u32>,
    /// `setgroups` to these, when the node names a user or supplementary groups.
    pub groups: Option<Vec<u32>>,
    /// `umask`, when given.
    pub umask: Option<u32>,
    /// The capabilities (bit per number), when the node lists them.
    pub caps: Option<u64>,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// rlimits: resource, soft, hard (`RLIM_INFINITY` for unlimited), and the name.
    pub limits: Vec<(u32, u64, u64, &'static str)>,
}

impl Plan {
    /// True when nothing is to be done: the plain `posix_spawn` path serves.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The uid and gid the node's files are given to, when it runs as someone else
    /// than the agent.
    pub fn owner(&self) -> Option<(u32, u32)> {
        if self.uid.is_none() && self.gid.is_none() {
            return None;
        }
        let uid = self.uid.unwrap_or_else(|| Uid::effective().as_raw());
        let gid = self.gid.unwrap_or_else(|| Gid::effective().as_raw());
        Some((uid, gid))
    }
}

/// The agent's own credentials, as far as switching is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// Effective uid.
    pub euid: u32,
    /// Effective gid.
    pub egid: u32,
    /// Effective capabilities.
    pub effective: u64,
    /// Permitted capabilities.
    pub permitted: u64,
    /// Bounding set.
    pub bounding: u64,
    /// Supplementary groups, sorted.
    pub groups: Vec<u32>,
    /// Hard rlimits (resource, limit; `RLIM_INFINITY` for unlimited): a node's may be
    /// higher only with `raises_hard_limits`.
    pub hard_limits: Vec<(u32, u64)>,
    /// Whether it may raise a hard rlimit: `CAP_SYS_RESOURCE`, held in the host's own
    /// user namespace (the kernel asks for it there: root of a user-namespaced
    /// container holds it in name only).
    pub raises_hard_limits: bool,
}

impl Creds {
    /// This process's, from `/proc/self/status`.
    pub fn current() -> io::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let mask = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .ok_or_else(|| io::Error::other(format!("no {field} in /proc/self/status")))
        };
        let effective = mask("CapEff:")?;
        Ok(Self {
            euid: Uid::effective().as_raw(),
            egid: Gid::effective().as_raw(),
            effective,
            raises_hard_limits: has(effective, CAP_SYS_RESOURCE) && in_the_hosts_user_namespace(),
            permitted: mask("CapPrm:")?,
            bounding: mask("CapBnd:")?,
            groups: {
                let mut g: Vec<u32> = nix::unistd::getgroups()
                    .map_err(io::Error::from)?
                    .into_iter()
                    .map(Gid::as_raw)
                    .collect();
                g.sort_unstable();
                g
            },
            hard_limits: LIMITS
                .iter()
                .filter_map(|(name, _)| {
                    let (r, _) = resource(name)?;
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    // SAFETY: getrlimit writes the limits into `lim`.
                    (unsafe { libc::getrlimit(r, &raw mut lim) } == 0).then_some((r, lim.rlim_max))
                })
                .collect(),
        })
    }
}

/// Whether this process is in the host's own user namespace: its uid map is the
/// identity over every id, as only there (or in a namespace mapped as such) it is.
fn in_the_hosts_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").map_or(true, |m| {
        m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]
    })
}

const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_RESOURCE: u32 = 24;

fn has(mask: u64, cap: u32) -> bool {
    mask & (1 << cap) != 0
}

/// Resolves the node's identity, capabilities and limits on this host, and checks
/// that the agent (`creds`) can apply them. Blocking (NSS). Errors name the node.
pub fn resolve(name: &str, node: &Node, creds: &Creds) -> Result<Plan, String> {
    let mut plan = Plan {
        umask: node.umask.map(|u| u.0),
        no_new_privs: node.no_new_privileges.unwrap_or(false),
        ..Plan::default()
    };
    if let Some(user) = &node.user {
        let (uid, primary, username) = lookup_user(user)
            .map_err(|e| format!("node '{name}': cannot look up user '{user}': {e}"))?
            .ok_or_else(|| format!("node '{name}': unknown user '{user}' on this host"))?;
        plan.uid = Some(uid);
        // `group` takes the primary group's place, in the group list too (as systemd's
        // `Group=`: `initgroups(user, group)`).
        plan.gid = match &node.group {
            Some(group) => Some(lookup_group(name, group)?),
            None => primary,
        };
        let mut groups = match (&username, plan.gid) {
            (Some(u), Some(g)) => {
                let c = CString::new(u.as_str()).map_err(|e| e.to_string())?;
                nix::unistd::getgrouplist(&c, Gid::from_raw(g))
                    .map_err(|e| format!("node '{name}': cannot list the groups of '{user}': {e}"))?
                    .into_iter()
                    .map(Gid::as_raw)
                    .collect()
            }
            _ => Vec::new(),
        };
        groups.sort_unstable();
        groups.dedup();
        plan.groups = Some(groups);
    }
    if let (Some(group), None) = (&node.group, &node.user) {
        plan.gid = Some(lookup_group(name, group)?);
    }
    if plan.uid.is_some() && plan.gid.is_none() {
        return Err(format!(
            "node '{name}': user '{}' has no entry in the user database: give its group",
            node.user.as_deref().unwrap_or_default()
        ));
    }
    if let Some(wanted) = node.supplementary_groups.as_ref().filter(|g| !g.is_empty()) {
        let mut groups = plan.groups.take().unwrap_or_default();
        for g in wanted {
            groups.push(lookup_group(name, g)?);
        }
        groups.sort_unstable();
        groups.dedup();
        plan.groups = Some(groups);
    }
    if let Some(caps) = &node.capabilities {
        let mut mask = 0u64;
        for c in caps {
            let n = capability_number(c)
                .ok_or_else(|| format!("node '{name}': unknown capability '{c}'"))?;
            mask |= 1 << n;
        }
        plan.caps = Some(mask);
    }
    for (limit, value) in &node.limits {
        let (resource, canonical) =
            resource(limit).ok_or_else(|| format!("node '{name}': unknown limit '{limit}'"))?;
        // The kernel refuses an open-file limit above fs.nr_open, even to root:
        // "unlimited" means that ceiling, as systemd's LimitNOFILE=infinity does.
        let inf = if resource == libc::RLIMIT_NOFILE {
            let most = nr_open();
            if let Some(v) = [value.soft, value.hard]
                .into_iter()
                .flatten()
                .find(|v| *v > most)
            {
                return Err(format!(
                    "node '{name}': limit nofile {v} is above this host's fs.nr_open ({most})"
                ));
            }
            most
        } else {
            libc::RLIM_INFINITY
        };
        plan.limits.push((
            resource,
            value.soft.unwrap_or(inf),
            value.hard.unwrap_or(inf),
            canonical,
        ));
    }
    // The agent's own groups need no setgroups, which would need CAP_SETGID. The
    // primary group counts whether or not the list repeats it.
    if plan.gid.is_none_or(|g| g == creds.egid)
        && let Some(groups) = &plan.groups
    {
        let without = |list: &[u32]| -> Vec<u32> {
            list.iter().copied().filter(|g| *g != creds.egid).collect()
        };
        if without(groups) == without(&creds.groups) {
            plan.groups = None;
        }
    }
    check_privileges(name, node, &plan, creds)?;
    Ok(plan)
}

/// Whether an agent with `creds` can carry out `plan`: the refusal a deploy reports.
pub fn check_privileges(name: &str, node: &Node, plan: &Plan, creds: &Creds) -> Result<(), String> {
    let who = if creds.euid == 0 {
        "root".to_owned()
    } else {
        format!("uid {}", creds.euid)
    };
    let mut missing = Vec::new();
    if plan.uid.is_some_and(|u| u != creds.euid) && !has(creds.effective, CAP_SETUID) {
        missing.push("CAP_SETUID");
    }
    let other_gid = plan.gid.is_some_and(|g| g != creds.egid);
    if (other_gid || plan.groups.is_some()) && !has(creds.effective, CAP_SETGID) {
        missing.push("CAP_SETGID");
    }
    if !missing.is_empty() {
        let asked = match (&node.user, &node.group) {
            (Some(u), _) => format!("user '{u}'"),
            (None, Some(g)) => format!("group '{g}'"),
            (None, None) => "supplementary groups".to_owned(),
        };
        return Err(format!(
            "node '{name}' asks for {asked}, but the agent runs as {who} without {}: run the \
             agent as root to run nodes as other users",
            missing.join(" and ")
        ));
    }
    if !creds.raises_hard_limits {
        for (resource, _, hard, limit) in &plan.limits {
            let own = creds
                .hard_limits
                .iter()
                .find(|(r, _)| r == resource)
                .map(|(_, h)| *h);
            if let Some(own) = own.filter(|own| hard > own) {
                let shown = |v: u64| {
                    if v == libc::RLIM_INFINITY {
                        "unlimited".to_owned()
                    } else {
                        v.to_string()
                    }
                };
                return Err(format!(
                    "node '{name}' asks for limit {limit} up to {}, above the agent's own hard \
                     limit {}, which it cannot raise without CAP_SYS_RESOURCE (in the host's \
                     user namespace): ask for at most that (\"SOFT:HARD\") or give the agent \
                     CAP_SYS_RESOURCE",
                    shown(*hard),
                    shown(own)
                ));
            }
        }
    }
    if let Some(caps) = plan.caps {
        let full = !0u64 >> (63 - last_cap());
        if caps != full & creds.bounding && !has(creds.effective, CAP_SETPCAP) {
            return Err(format!(
                "node '{name}' lists capabilities, but the agent runs as {who} without \
                 CAP_SETPCAP and cannot cut a node's bounding set"
            ));
        }
        let lacking: Vec<&str> = (0..64)
            .filter(|c| has(caps, *c) && !has(creds.permitted, *c))
            .map(|c| drover_proto::exec::capability_name(c).unwrap_or("?"))
            .collect();
        if !lacking.is_empty() {
            return Err(format!(
                "node '{name}' asks for {}, which the agent does not have: give the agent \
                 every capability its nodes are to have",
                lacking.join(", ")
            ));
        }
    }
    Ok(())
}

/// A user's uid, primary gid (none for a numeric id without an entry) and name.
type Account = (u32, Option<u32>, Option<String>);

/// Looks up a user by name or numeric id.
fn lookup_user(user: &str) -> nix::Result<Option<Account>> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(Some(match User::from_uid(Uid::from_raw(uid))? {
            Some(u) => (uid, Some(u.gid.as_raw()), Some(u.name)),
            None => (uid, None, None),
        }));
    }
    Ok(User::from_name(user)?.map(|u| (u.uid.as_raw(), Some(u.gid.as_raw()), Some(u.name))))
}

fn lookup_group(name: &str, group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    Group::from_name(group)
        .map_err(|e| format!("node '{name}': cannot look up group '{group}': {e}"))?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| format!("node '{name}': unknown group '{group}' on this host"))
}

/// The `RLIMIT_` number of a limit name, and the name as `'static`.
fn resource(name: &str) -> Option<(u32, &'static str)> {
    let canonical = LIMITS.iter().find(|(n, _)| *n == name)?.0;
    let r = match canonical {
        "as" => libc::RLIMIT_AS,
        "core" => libc::RLIMIT_CORE,
        "cpu" => libc::RLIMIT_CPU,
        "data" => libc::RLIMIT_DATA,
        "fsize" => libc::RLIMIT_FSIZE,
        "locks" => libc::RLIMIT_LOCKS,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "rss" => libc::RLIMIT_RSS,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "rttime" => libc::RLIMIT_RTTIME,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    };
    Some((r, canonical))
}

/// True when the node has any setting of this module: it needs [`prepare`].
pub fn wanted(node: &Node) -> bool {
    node.user.is_some()
        || node.group.is_some()
        || node
            .supplementary_groups
            .as_ref()
            .is_some_and(|g| !g.is_empty())
        || node.umask.is_some()
        || node.capabilities.is_some()
        || node.no_new_privileges == Some(true)
        || !node.limits.is_empty()
}

/// [`resolve`]s the node's settings against this agent's credentials and gives the
/// node's files to its user ([`own_node_paths`]): `node_dir` is its directory (its
/// default working directory `work` below it), `notify` its notify socket. A node whose
/// files are not made yet gets them from its next spawn, which makes them (see
/// [`crate::spawner::Fresh`]). Blocking.
pub fn prepare(
    name: &str,
    node: &Node,
    node_dir: &std::path::Path,
    notify: &std::path::Path,
) -> Result<Plan, String> {
    if !wanted(node) {
        reclaim_node_paths(node, node_dir, notify).map_err(|e| format!("node '{name}': {e}"))?;
        return Ok(Plan::default());
    }
    let creds = Creds::current()
        .map_err(|e| format!("node '{name}': cannot read the agent's credentials: {e}"))?;
    let plan = resolve(name, node, &creds)?;
    let Some(owner) = plan.owner() else {
        // No user or group of its own (capabilities or limits only): it runs as the
        // agent, and gets back what a spec with a user gave that user, which an agent
        // without CAP_DAC_OVERRIDE in the node's bounding set could not enter.
        reclaim_node_paths(node, node_dir, notify).map_err(|e| format!("node '{name}': {e}"))?;
        return Ok(plan);
    };
    // The notify socket is the last of them a first spawn makes.
    if notify.exists() {
        let work = node_dir.join("work");
        let work = node.workdir.is_none().then_some(work.as_path());
        if let Some(w) = work {
            std::fs::create_dir_all(w)
                .map_err(|e| format!("node '{name}': cannot create {}: {e}", w.display()))?;
        }
        own_node_paths(owner, node_dir, work, Some(notify))
            .map_err(|e| format!("node '{name}': {e}"))?;
    }
    Ok(plan)
}

/// The most open files a process may be allowed (`/proc/sys/fs/nr_open`).
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`).
pub fn last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
            .min(63)
    })
}

/// Where a node binds its query socket, below `sock_dir` (see [`crate::sockdir`]): in
/// its directory, or, for a node running as its own user or group, which may not write
/// there (its records are there), in `run/`, which is the node's.
pub fn query_path(sock_dir: &std::path::Path, node: &Node) -> std::path::PathBuf {
    if node.user.is_some() || node.group.is_some() {
        sock_dir.join("run").join("query.sock")
    } else {
        sock_dir.join("query.sock")
    }
}

/// Gives what a node with its own user must reach to it: its notify socket and its
/// working directory and `run/` (where it binds its query socket) to the node's user
/// (mode 0600 and 0700), its directory to the agent and the node's group (0750, read
/// and search only: the node's records are there). Other users reach none of them.
pub fn own_node_paths(
    owner: (u32, u32),
    node_dir: &std::path::Path,
    work: Option<&std::path::Path>,
    notify: Option<&std::path::Path>,
) -> io::Result<()> {
    use std::os::unix::fs::{PermissionsExt, chown};
    let (uid, gid) = owner;
    let set = |p: &std::path::Path, u: Option<u32>, g: Option<u32>, mode: u32| {
        chown(p, u, g).map_err(|e| {
            let e = with_path(&format!("giving to {uid}:{gid}"), p, &e);
            if e.kind() == io::ErrorKind::PermissionDenied {
                // The one capability a user switch needs beyond CAP_SETUID/CAP_SETGID.
                io::Error::new(
                    e.kind(),
                    format!("{e}: the agent lacks CAP_CHOWN, which a node with a user or group of its own needs"),
                )
            } else {
                e
            }
        })?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| with_path("setting the mode of", p, &e))
    };
    set(node_dir, None, Some(gid), 0o750)?;
    let run = node_dir.join("run");
    std::fs::create_dir_all(&run).map_err(|e| with_path("creating", &run, &e))?;
    set(&run, Some(uid), Some(gid), 0o700)?;
    if let Some(w) = work {
        set(w, Some(uid), Some(gid), 0o700)?;
    }
    match notify {
        Some(n) => set(n, Some(uid), Some(gid), 0o600),
        None => Ok(()),
    }
}

/// Takes back what [`own_node_paths`] gave a node that now runs as the agent: one
/// `stat` when there is nothing to take back.
fn reclaim_node_paths(
    node: &Node,
    node_dir: &std::path::Path,
    notify: &std::path::Path,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let egid = Gid::effective().as_raw();
    match std::fs::metadata(node_dir) {
        Ok(m) if m.gid() != egid => {}
        _ => return Ok(()),
    }
    let me = (Uid::effective().as_raw(), egid);
    // A node removed and deployed again under its name has its directory, owned as
    // its user left it, but not yet its working directory or notify socket.
    let work = node_dir.join("work");
    own_node_paths(
        me,
        node_dir,
        (node.workdir.is_none() && work.exists()).then_some(work.as_path()),
        notify.exists().then_some(notify),
    )?;
    std::fs::set_permissions(
        node_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|e| with_path("setting the mode of", node_dir, &e))
}

fn with_path(what: &str, p: &std::path::Path, e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

// === the child ===

/// What the child failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Stage {
    None = 0,
    Cgroup,
    Pgroup,
    Stdio,
    Chdir,
    Limit,
    Bounding,
    KeepCaps,
    Groups,
    Gid,
    Uid,
    Capset,
    Ambient,
    NoNewPrivs,
    Exec,
}

impl Stage {
    const ALL: [Self; 15] = [
        Self::None,
        Self::Cgroup,
        Self::Pgroup,
        Self::Stdio,
        Self::Chdir,
        Self::Limit,
        Self::Bounding,
        Self::KeepCaps,
        Self::Groups,
        Self::Gid,
        Self::Uid,
        Self::Capset,
        Self::Ambient,
        Self::NoNewPrivs,
        Self::Exec,
    ];

    fn what(self, plan: &Plan, index: u32) -> String {
        match self {
            Self::None | Self::Exec => String::new(),
            Self::Cgroup => "cannot enter its cgroups".to_owned(),
            Self::Pgroup => "cannot make a process group".to_owned(),
            Self::Stdio => "cannot set up stdin, stdout and stderr".to_owned(),
            Self::Chdir => "cannot enter the working directory".to_owned(),
            Self::Limit => {
                let l = plan.limits.get(index as usize);
                format!("cannot set limit {}", l.map_or("?", |(_, _, _, name)| name))
            }
            Self::Bounding => "cannot cut the capability bounding set".to_owned(),
            Self::KeepCaps => "cannot keep capabilities across the user switch".to_owned(),
            Self::Groups => "cannot set the supplementary groups".to_owned(),
            Self::Gid => format!("cannot switch to gid {}", plan.gid.unwrap_or_default()),
            Self::Uid => format!("cannot switch to uid {}", plan.uid.unwrap_or_default()),
            Self::Capset => "cannot set the capabilities".to_owned(),
            Self::Ambient => format!(
                "cannot raise ambient capability {}",
                drover_proto::exec::capability_name(index).unwrap_or("?")
            ),
            Self::NoNewPrivs => "cannot set no_new_privileges".to_owned(),
        }
    }
}

/// Everything the child reads, prepared by the parent.
struct Child<'a> {
    args: &'a CArgs,
    stdout: libc::c_int,
    stderr: libc::c_int,
    plan: &'a Plan,
    last_cap: u32,
    /// The `cgroup.procs` files the child moves itself into first (its v1 cgroups, and
    /// its v2 one where `clone3` cannot start it there): the first `joins` of them.
    join: [libc::c_int; MAX_JOIN],
    joins: usize,
    /// stage << 48 | index << 16 | errno; 0 while nothing failed.
    failure: AtomicU64,
}

/// The kernel's `struct sigaction` (x86_64, aarch64).
#[repr(C)]
struct KernelSigaction {
    handler: libc::c_ulong,
    flags: libc::c_ulong,
    restorer: libc::c_ulong,
    mask: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A raw system call's result: the value, or the errno.
fn sys(ret: libc::c_long) -> Result<libc::c_long, i32> {
    if ret < 0 {
        // SAFETY: errno is this thread's (the parent thread's, suspended while the
        // child runs on its memory).
        Err(unsafe { *libc::__errno_location() })
    } else {
        Ok(ret)
    }
}

impl Child<'_> {
    /// Runs in the child. Returns only on failure: (stage, index, errno).
    ///
    /// # Safety
    ///
    /// Only in the child of a `CLONE_VM | CLONE_VFORK` clone, with every pointer in
    /// `self` valid.
    unsafe fn run(&self) -> (Stage, u32, i32) {
        macro_rules! try_sys {
            ($stage:expr, $index:expr, $call:expr) => {
                if let Err(errno) = sys($call) {
                    return ($stage, $index, errno);
                }
            };
        }
        // SAFETY (for every call below): raw system calls on memory the parent
        // prepared and keeps alive until the child execs or exits.
        unsafe {
            let dfl = KernelSigaction {
                handler: libc::SIG_DFL as libc::c_ulong,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            // Before anything can fork: "0" is the writing process.
            for (i, fd) in self.join[..self.joins].iter().enumerate() {
                try_sys!(
                    Stage::Cgroup,
                    i as u32,
                    libc::syscall(libc::SYS_write, *fd, c"0".as_ptr(), 1usize)
                );
            }
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        &raw const dfl,
                        std::ptr::null_mut::<KernelSigaction>(),
                        8usize,
                    );
                }
            }
            try_sys!(Stage::Pgroup, 0, libc::syscall(libc::SYS_setpgid, 0, 0));
            let null = libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
            );
            try_sys!(Stage::Stdio, 0, null);
            for (from, to) in [(null as libc::c_int, 0), (self.stdout, 1), (self.stderr, 2)] {
                if from == to {
                    try_sys!(
                        Stage::Stdio,
                        0,
                        libc::syscall(libc::SYS_fcntl, to, libc::F_SETFD, 0)
                    );
                } else {
                    try_sys!(Stage::Stdio, 0, libc::syscall(libc::SYS_dup3, from, to, 0));
                }
            }
            if null > 2 {
                libc::syscall(libc::SYS_close, null);
            }
            let plan = self.plan;
            for (i, (resource, soft, hard, _)) in plan.limits.iter().enumerate() {
                let lim = libc::rlimit64 {
                    rlim_cur: *soft,
                    rlim_max: *hard,
                };
                try_sys!(
                    Stage::Limit,
                    i as u32,
                    libc::syscall(
                        libc::SYS_prlimit64,
                        0,
                        *resource,
                        &raw const lim,
                        std::ptr::null_mut::<libc::rlimit64>()
                    )
                );
            }
            if let Some(mask) = plan.umask {
                libc::syscall(libc::SYS_umask, mask);
            }
            if let Some(caps) = plan.caps {
                for cap in 0..=self.last_cap {
                    // Only what is there to cut: without CAP_SETPCAP (an agent that is
                    // not root, whose bounding set is the node's list already) every
                    // drop fails, even of what is gone.
                    if caps & (1 << cap) == 0
                        && libc::syscall(libc::SYS_prctl, libc::PR_CAPBSET_READ, cap, 0, 0, 0) == 1
                    {
                        try_sys!(
                            Stage::Bounding,
                            cap,
                            libc::syscall(libc::SYS_prctl, libc::PR_CAPBSET_DROP, cap, 0, 0, 0)
                        );
                    }
                }
                if plan.uid.is_some() {
                    try_sys!(
                        Stage::KeepCaps,
                        0,
                        libc::syscall(libc::SYS_prctl, libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)
                    );
                }
            }
            if let Some(groups) = &plan.groups {
                try_sys!(
                    Stage::Groups,
                    0,
                    libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr())
                );
            }
            if let Some(g) = plan.gid {
                try_sys!(Stage::Gid, 0, libc::syscall(libc::SYS_setresgid, g, g, g));
            }
            if let Some(u) = plan.uid {
                try_sys!(Stage::Uid, 0, libc::syscall(libc::SYS_setresuid, u, u, u));
            }
            if let Some(caps) = plan.caps {
                let header = CapHeader {
                    version: LINUX_CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let word = |w: u32| CapData {
                    effective: w,
                    permitted: w,
                    inheritable: w,
                };
                let data = [word(caps as u32), word((caps >> 32) as u32)];
                try_sys!(
                    Stage::Capset,
                    0,
                    libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr())
                );
                for cap in 0..=self.last_cap {
                    if caps & (1 << cap) != 0 {
                        try_sys!(
                            Stage::Ambient,
                            cap,
                            libc::syscall(
                                libc::SYS_prctl,
                                libc::PR_CAP_AMBIENT,
                                libc::PR_CAP_AMBIENT_RAISE,
                                cap,
                                0,
                                0
                            )
                        );
                    }
                }
            }
            if plan.no_new_privs {
                try_sys!(
                    Stage::NoNewPrivs,
                    0,
                    libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
                );
            }
            // As the node's user, as systemd does: a directory only that user may
            // enter (a home on NFS with root squashed) works, and one the user may not
            // enter is refused rather than held open for it by the agent's rights.
            try_sys!(
                Stage::Chdir,
                0,
                libc::syscall(libc::SYS_chdir, self.args.cwd.as_ptr())
            );
            let empty = 0u64;
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &raw const empty,
                std::ptr::null_mut::<u64>(),
                8usize,
            );
            let ret = libc::syscall(
                libc::SYS_execve,
                self.args.program.as_ptr(),
                self.args.argv_p.as_ptr(),
                self.args.envp_p.as_ptr(),
            );
            match sys(ret) {
                Err(errno) => (Stage::Exec, 0, errno),
                Ok(_) => (Stage::Exec, 0, libc::EINVAL),
            }
        }
    }
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Child` the parent passed to clone, alive until we exec or
    // exit (the parent is suspended until then).
    let child = unsafe { &*arg.cast::<Child<'_>>() };
    // SAFETY: we are that clone's child.
    let (stage, index, errno) = unsafe { child.run() };
    let code = (stage as u64) << 48 | u64::from(index) << 16 | u64::from(errno as u16);
    child.failure.store(code, Ordering::Release);
    // SAFETY: ends this process at once, running nothing of the parent's.
    unsafe { libc::syscall(libc::SYS_exit, 127) };
    127
}

/// `struct clone_args` of `<linux/sched.h>`, up to `cgroup` (version 2).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Whether `clone3` with `CLONE_INTO_CGROUP` is worth trying: [`CLONE3_NO`] once it
/// was found missing.
static CLONE3: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
const CLONE3_NO: u8 = 1;

/// Makes the next spawns do without `clone3`, as on a kernel without it (for tests).
#[cfg(test)]
pub(crate) fn forget_clone3() {
    CLONE3.store(CLONE3_NO, Ordering::Relaxed);
}

fn clone3_works() -> bool {
    cfg!(target_arch = "x86_64") && CLONE3.load(Ordering::Relaxed) != CLONE3_NO
}

/// True for the errors of a kernel without `clone3` or `CLONE_INTO_CGROUP`, or of a
/// seccomp filter that hides it (container runtimes' defaults answer `ENOSYS`, some
/// older ones `EPERM`). The child then moves itself, which fails with a clear error
/// where the move itself is not allowed.
fn clone3_unsupported(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOSYS | libc::EINVAL | libc::E2BIG | libc::EPERM
    )
}

/// Opens the `cgroup.procs` of the cgroup directory `dir`.
fn open_procs(dir: libc::c_int) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: a plain openat on a path we own; the fd returned is ours.
    let fd = unsafe {
        libc::openat(
            dir,
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `clone(CLONE_VM | CLONE_VFORK)` running `child_main(child)` on the stack below
/// `top`; the pid, or the errno.
///
/// # Safety
///
/// `child` and the stack must stay valid until the child execs or exits, which
/// `CLONE_VFORK` waits for.
unsafe fn clone_vfork(child: &Child<'_>, top: usize) -> Result<i32, i32> {
    // SAFETY: see the function's contract.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(child).cast_mut().cast(),
        )
    };
    if pid < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(pid)
    }
}

/// As [`clone_vfork`], the child created in the cgroup whose directory is open as
/// `cgroup` (`clone3` with `CLONE_INTO_CGROUP`): it never runs anywhere else, so
/// nothing it forks can be left behind, and no migration (which may wait for an RCU
/// grace period) is needed. glibc offers no `clone3` wrapper that runs a function on
/// a new stack, hence the few instructions of assembly: in the child, which starts
/// on the stack `base..base + size` with the parent's registers, they call
/// `child_main(child)`, which never returns.
///
/// # Safety
///
/// As [`clone_vfork`]; `base` 16-byte aligned, `size` a multiple of 16.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vfork_into(
    cgroup: libc::c_int,
    child: &Child<'_>,
    base: usize,
    size: usize,
) -> Result<i32, i32> {
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: base as u64,
        stack_size: size as u64,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: u64::try_from(cgroup).unwrap_or(u64::MAX),
    };
    let entry: extern "C" fn(*mut libc::c_void) -> libc::c_int = child_main;
    let ret: libc::c_long;
    // SAFETY: the parent returns from the system call as from any other; the child
    // (rax 0) only calls `child_main` on its own stack, which ends it.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &raw const args,
            in("rsi") size_of::<CloneArgs>(),
            in("r12") std::ptr::from_ref(child),
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    if ret < 0 {
        Err(i32::try_from(-ret).unwrap_or(libc::EIO))
    } else {
        Ok(i32::try_from(ret).unwrap_or(-1))
    }
}

/// Elsewhere the child moves itself (see [`clone3_works`]).
#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3_vfork_into(_: libc::c_int, _: &Child<'_>, _: usize, _: usize) -> Result<i32, i32> {
    Err(libc::ENOSYS)
}

/// The most `cgroup.procs` files a child moves itself into: one per cgroup v1
/// hierarchy with a controller for limits, and its v2 cgroup.
const MAX_JOIN: usize = 8;

/// The child's stack: enough for [`Child::run`], which calls nothing deep.
const STACK: usize = 64 * 1024;

/// Spawns `spec` carrying out `plan` in the child (see the module docs): in a process
/// group of its own, every signal at its default, an empty mask, and in the cgroup
/// `spec.cgroup` from its first instruction when one is given. Returns the pid; a
/// failed step is the error (exec errors keep their errno, as with `posix_spawn`).
pub fn spawn(spec: &SpawnSpec<'_>, plan: &Plan) -> io::Result<i32> {
    let args = CArgs::new(spec)?;
    let into = spec.cgroup.map(|c| c.dir.as_raw_fd());
    // Where `clone3` cannot start the child in its cgroup, the child moves itself
    // there before anything else: through this, opened beforehand.
    let procs = match spec.cgroup {
        Some(c) if !c.create || !clone3_works() => Some(open_procs(c.dir.as_raw_fd())?),
        _ => None,
    };
    if spec.join.len() + 2 > MAX_JOIN {
        return Err(io::Error::other("too many cgroups to join"));
    }
    let mut join = [-1; MAX_JOIN];
    for (slot, fd) in join.iter_mut().zip(spec.join) {
        *slot = fd.as_raw_fd();
    }
    let mut child = Child {
        args: &args,
        stdout: spec.stdout.as_raw_fd(),
        stderr: spec.stderr.as_raw_fd(),
        plan,
        last_cap: last_cap(),
        join,
        joins: spec.join.len(),
        failure: AtomicU64::new(0),
    };
    let moves_itself = procs.is_some();
    if let Some(fd) = &procs {
        child.join[child.joins] = fd.as_raw_fd();
        child.joins += 1;
    }
    let mut stack: Vec<u8> = Vec::with_capacity(STACK + 16);
    // The stack grows down from its top, 16-byte aligned.
    let base = (stack.as_mut_ptr() as usize + 15) & !15;
    let top = base + STACK;
    let all = !0u64;
    let mut old = 0u64;
    // SAFETY: blocks every signal of this thread (the child must not run a handler
    // of the agent's on shared memory before it resets them), restored below.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const all,
            &raw mut old,
            8usize,
        );
    }
    let mut result = Err(libc::ENOSYS);
    let mut cloned = false;
    let mut opened = None;
    if let Some(dir) = into
        && !moves_itself
    {
        // SAFETY: as for `clone_vfork` below; `base..top` is the child's stack.
        result = unsafe { clone3_vfork_into(dir, &child, base, STACK) };
        match result {
            Err(errno) if clone3_unsupported(errno) => {
                // A kernel (or a seccomp filter) without it: remembered, and this
                // child moves itself.
                CLONE3.store(CLONE3_NO, Ordering::Relaxed);
                match open_procs(dir) {
                    Ok(fd) => {
                        child.join[child.joins] = fd.as_raw_fd();
                        child.joins += 1;
                        opened = Some(fd);
                    }
                    Err(e) => {
                        result = Err(e.raw_os_error().unwrap_or(libc::EIO));
                        cloned = true;
                    }
                }
            }
            _ => cloned = true,
        }
    }
    if !cloned {
        // SAFETY: CLONE_VFORK suspends this thread until the child execs or exits, so
        // `child`, `args`, `plan` and the stack outlive every use the child makes of
        // them; the child runs only `child_main`.
        result = unsafe { clone_vfork(&child, top) };
    }
    // SAFETY: puts back the mask saved above.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const old,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
    drop((stack, procs, opened));
    let pid = result.map_err(|errno| {
        let err = io::Error::from_raw_os_error(errno);
        match into {
            Some(_) => io::Error::new(
                err.kind(),
                format!("cannot start it in its cgroup: {}", crate::sys::cause(&err)),
            ),
            None => err,
        }
    })?;
    let failure = child.failure.load(Ordering::Acquire);
    if failure == 0 {
        return Ok(pid);
    }
    // It exited: reap it, so it leaves no zombie.
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    let stage = Stage::ALL
        .get((failure >> 48) as usize)
        .copied()
        .unwrap_or(Stage::None);
    let index = ((failure >> 16) & 0xffff_ffff) as u32;
    let errno = (failure & 0xffff) as i32;
    let err = io::Error::from_raw_os_error(errno);
    if stage == Stage::Exec {
        return Err(err);
    }
    Err(io::Error::new(
        err.kind(),
        format!("{}: {}", stage.what(plan, index), crate::sys::cause(&err)),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    use drover_proto::model::{Limit, Umask};
    use nix::sys::signal::Signal;

    use super::*;
    use crate::sys::{ExitKind, PidFd, proc_stat, wait_child};

    const NOBODY: u32 = 65534;

    fn is_root() -> bool {
        Uid::effective().is_root()
    }

    /// A `/proc/<pid>/status` field, trimmed.
    fn status(pid: i32, field: &str) -> String {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn node(f: impl FnOnce(&mut Node)) -> Node {
        let mut n = Node::new("n", "a");
        f(&mut n);
        n
    }

    /// Spawns `program args` with `plan`, in `dir`, output to `dir/out`.
    fn spawn_in(
        dir: &std::path::Path,
        plan: &Plan,
        program: &str,
        args: &[&str],
    ) -> io::Result<i32> {
        let out = tempfile::tempfile().unwrap();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        spawn(
            &SpawnSpec {
                program,
                argv0: None,
                args: &args,
                env: vec!["A=b".to_owned()],
                path: "/usr/bin:/bin",
                cwd: dir,
                stdout: out.as_fd(),
                stderr: out.as_fd(),
                exec: Some(plan),
                cgroup: None,
                join: &[],
            },
            plan,
        )
    }

    fn finish(pid: i32) -> ExitKind {
        let fd = PidFd::open(pid).unwrap();
        let _ = fd.signal(Signal::SIGKILL);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { wait_child(&fd).await.unwrap() })
    }

    /// `group` takes the user's primary group's place in the group list too, as
    /// systemd's `Group=` does.
    #[test]
    fn a_group_replaces_the_users_primary_group() {
        if !is_root() {
            eprintln!("skipped: switching users needs root");
            return;
        }
        let n = node(|n| {
            n.user = Some("nobody".into());
            n.group = Some("65533".into());
        });
        let plan = resolve("n", &n, &Creds::current().unwrap()).unwrap();
        assert_eq!(plan.gid, Some(65533));
        let groups = plan.groups.unwrap();
        assert!(groups.contains(&65533), "{groups:?}");
        assert!(
            !groups.contains(&NOBODY),
            "the primary group stays: {groups:?}"
        );
    }

    /// An unlimited open-file limit is the most the kernel allows (fs.nr_open); a
    /// number above it, which the kernel would refuse at every start, is refused here.
    #[test]
    fn nofile_is_bounded_by_nr_open() {
        if !is_root() {
            eprintln!("skipped: raising a hard limit needs root");
            return;
        }
        let limit = |text: &str| {
            let n = node(|n| {
                n.limits =
                    BTreeMap::from([("nofile".to_owned(), Limit::parse(text, false).unwrap())]);
            });
            // As an agent that may raise hard limits (see the test of CAP_SYS_RESOURCE).
            let mut creds = Creds::current().unwrap();
            creds.raises_hard_limits = true;
            resolve("n", &n, &creds)
        };
        let plan = limit("unlimited").unwrap();
        assert_eq!(plan.limits[0].1, nr_open());
        assert_eq!(plan.limits[0].2, nr_open());
        let over = nr_open() + 1;
        let e = limit(&over.to_string()).unwrap_err();
        assert!(
            e.contains(&format!(
                "limit nofile {over} is above this host's fs.nr_open"
            )),
            "{e}"
        );
    }

    #[test]
    fn a_switched_child_has_the_user_groups_capabilities_and_limits() {
        if !is_root() {
            eprintln!("skipped: switching users needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let n = node(|n| {
            n.user = Some("nobody".into());
            n.supplementary_groups = Some(vec!["65533".into()]);
            n.umask = Some(Umask(0o027));
            n.capabilities = Some(vec!["CAP_NET_RAW".into(), "net_admin".into()]);
            n.no_new_privileges = Some(true);
            n.limits = BTreeMap::from([
                (
                    "nofile".to_owned(),
                    Limit::parse("1234:2345", false).unwrap(),
                ),
                ("core".to_owned(), Limit::parse("unlimited", true).unwrap()),
                // Within this host's hard limit: raising it needs CAP_SYS_RESOURCE.
                ("memlock".to_owned(), Limit::parse("4M", true).unwrap()),
            ]);
        });
        let plan = resolve("n", &n, &Creds::current().unwrap()).unwrap();
        assert_eq!(plan.uid, Some(NOBODY));
        let pid = spawn_in(dir.path(), &plan, "sleep", &["1000"]).unwrap();
        // The name changes early in exec, the environment is in place at its end.
        wait_until("exec", || {
            proc_stat(pid).is_ok_and(|s| s.comm == "sleep")
                && fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| !e.is_empty())
        });
        assert_eq!(status(pid, "Uid:"), "65534\t65534\t65534\t65534");
        let gid = plan.gid.unwrap();
        assert_eq!(status(pid, "Gid:"), format!("{gid}\t{gid}\t{gid}\t{gid}"));
        let groups: Vec<u32> = status(pid, "Groups:")
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        assert!(groups.contains(&65533), "{groups:?}");
        let caps = (1u64 << 12 | 1 << 13).to_string();
        let hex = |f: &str| {
            u64::from_str_radix(&status(pid, f), 16)
                .unwrap()
                .to_string()
        };
        for field in ["CapAmb:", "CapBnd:", "CapPrm:", "CapEff:", "CapInh:"] {
            assert_eq!(hex(field), caps, "{field}");
        }
        assert_eq!(status(pid, "NoNewPrivs:"), "1");
        assert_eq!(status(pid, "Umask:"), "0027");
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let row = |name: &str| {
            limits
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .split_whitespace()
                .rev()
                .skip(1)
                .take(2)
                .collect::<Vec<_>>()
        };
        assert_eq!(row("Max open files"), ["2345", "1234"]);
        assert_eq!(row("Max core file size"), ["unlimited", "unlimited"]);
        assert_eq!(row("Max locked memory"), ["4194304", "4194304"]);
        let s = proc_stat(pid).unwrap();
        assert_eq!(s.pgrp, pid, "a process group of its own");
        assert_eq!(sig_ignored(pid), 0, "nothing ignored");
        assert_eq!(
            status(pid, "SigBlk:"),
            "0000000000000000",
            "nothing blocked"
        );
        assert_eq!(fs::read(format!("/proc/{pid}/environ")).unwrap(), b"A=b\0");
        assert_eq!(finish(pid), ExitKind::Signal(libc::SIGKILL));
    }

    fn sig_ignored(pid: i32) -> u64 {
        u64::from_str_radix(&status(pid, "SigIgn:"), 16).unwrap()
    }

    #[test]
    fn capabilities_without_a_user_cut_root_to_them() {
        if !is_root() {
            eprintln!("skipped: cutting the bounding set needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let n = node(|n| n.capabilities = Some(vec![]));
        let plan = resolve("n", &n, &Creds::current().unwrap()).unwrap();
        let pid = spawn_in(dir.path(), &plan, "sleep", &["1000"]).unwrap();
        wait_until("exec", || proc_stat(pid).is_ok_and(|s| s.comm == "sleep"));
        assert_eq!(status(pid, "Uid:"), "0\t0\t0\t0");
        for field in ["CapBnd:", "CapPrm:", "CapEff:", "CapAmb:"] {
            assert_eq!(
                u64::from_str_radix(&status(pid, field), 16).unwrap(),
                0,
                "{field}"
            );
        }
        finish(pid);
    }

    #[test]
    fn failures_name_the_step_and_leave_no_child() {
        let dir = tempfile::tempdir().unwrap();
        let before = crate::sys::children();
        // Exec errors keep their errno, as with posix_spawn.
        let plan = Plan {
            umask: Some(0o22),
            ..Plan::default()
        };
        let err = spawn_in(dir.path(), &plan, "/nonexistent/prog", &[]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        // A soft limit above the hard one.
        let plan = Plan {
            limits: vec![(libc::RLIMIT_NOFILE, 20, 10, "nofile")],
            ..Plan::default()
        };
        let err = spawn_in(dir.path(), &plan, "/bin/true", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot set limit nofile: "),
            "{err}"
        );
        let gone = dir.path().join("gone");
        let plan = Plan {
            umask: Some(0o22),
            ..Plan::default()
        };
        let err = spawn_in(&gone, &plan, "/bin/true", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot enter the working directory: no such file or directory"
        );
        assert_eq!(
            crate::sys::children(),
            before,
            "every failed child was reaped"
        );
    }

    fn creds(euid: u32, effective: u64) -> Creds {
        Creds {
            euid,
            egid: euid,
            effective,
            permitted: effective,
            bounding: !0 >> (63 - last_cap()),
            groups: Vec::new(),
            hard_limits: vec![(libc::RLIMIT_MEMLOCK, 8 << 20)],
            raises_hard_limits: has(effective, CAP_SYS_RESOURCE),
        }
    }

    #[test]
    fn a_hard_limit_above_the_agents_needs_cap_sys_resource() {
        let n = node(|_| {});
        let plan = |hard: u64| Plan {
            limits: vec![(libc::RLIMIT_MEMLOCK, 1 << 20, hard, "memlock")],
            ..Plan::default()
        };
        let all = !0u64 >> (63 - last_cap());
        let without = all & !(1 << CAP_SYS_RESOURCE);
        assert!(check_privileges("w", &n, &plan(8 << 20), &creds(0, without)).is_ok());
        let err = check_privileges("w", &n, &plan(64 << 20), &creds(0, without)).unwrap_err();
        assert_eq!(
            err,
            "node 'w' asks for limit memlock up to 67108864, above the agent's own hard limit \
             8388608, which it cannot raise without CAP_SYS_RESOURCE (in the host's user \
             namespace): ask for at most that (\"SOFT:HARD\") or give the agent \
             CAP_SYS_RESOURCE"
        );
        let err = check_privileges("w", &n, &plan(libc::RLIM_INFINITY), &creds(1000, 0));
        assert!(err.unwrap_err().contains("up to unlimited"));
        assert!(check_privileges("w", &n, &plan(64 << 20), &creds(0, all)).is_ok());
    }

    #[test]
    fn an_agent_that_is_not_root_refuses_to_switch() {
        let user = node(|n| {
            n.user = Some("65534".into());
            n.group = Some("65534".into());
        });
        let plan = Plan {
            uid: Some(NOBODY),
            gid: Some(NOBODY),
            groups: Some(vec![]),
            ..Plan::default()
        };
        let err = check_privileges("w", &user, &plan, &creds(1000, 0)).unwrap_err();
        assert_eq!(
            err,
            "node 'w' asks for user '65534', but the agent runs as uid 1000 without CAP_SETUID \
             and CAP_SETGID: run the agent as root to run nodes as other users"
        );
        let all = !0u64 >> (63 - last_cap());
        assert!(check_privileges("w", &user, &plan, &creds(0, all)).is_ok());
        // Its own user needs no switch.
        let own = Plan {
            uid: Some(1000),
            gid: Some(1000),
            ..Plan::default()
        };
        assert!(check_privileges("w", &user, &own, &creds(1000, 0)).is_ok());
        // Capabilities: the agent must hold them and be able to cut the bounding set.
        let caps = node(|n| n.capabilities = Some(vec!["CAP_NET_RAW".into()]));
        let raw = Plan {
            caps: Some(1 << 13),
            ..Plan::default()
        };
        let err = check_privileges("w", &caps, &raw, &creds(1000, 1 << 13)).unwrap_err();
        assert!(err.contains("without CAP_SETPCAP"), "{err}");
        let err = check_privileges("w", &caps, &raw, &creds(0, 1 << CAP_SETPCAP)).unwrap_err();
        assert!(
            err.contains("asks for CAP_NET_RAW, which the agent does not have"),
            "{err}"
        );
        assert!(check_privileges("w", &caps, &raw, &creds(0, all)).is_ok());
    }

    #[test]
    fn unknown_users_and_groups_are_named() {
        let creds = Creds::current().unwrap();
        let n = node(|n| n.user = Some("no-such-user-here".into()));
        assert_eq!(
            resolve("w", &n, &creds).unwrap_err(),
            "node 'w': unknown user 'no-such-user-here' on this host"
        );
        let n = node(|n| n.group = Some("no-such-group-here".into()));
        assert_eq!(
            resolve("w", &n, &creds).unwrap_err(),
            "node 'w': unknown group 'no-such-group-here' on this host"
        );
        let n = node(|n| n.user = Some("4000000000".into()));
        assert!(
            resolve("w", &n, &creds)
                .unwrap_err()
                .contains("has no entry"),
            "a bare uid needs a group"
        );
    }
}
