//! Containment of nodes in cgroup v2: every node gets a cgroup of its own, so that
//! whatever it forks, however it leaves its session or process group, can be found
//! and killed, also by the next agent process.
//!
//! # Layout
//!
//! ```text
//! <base>/drover-agent-<instance>-<hash of the state dir>/   the agent's subtree
//!     agent/            the agent process itself, alone
//!     nodes/<node>/     one cgroup per node
//! ```
//!
//! `<base>` is the cgroup the agent started in (under systemd, the service's cgroup,
//! delegated with `Delegate=yes`), on the first cgroup v2 mount in
//! `/proc/self/mountinfo`. The agent moves itself into `agent/`: cgroup v2 lets only
//! leaves hold processes once controllers are enabled, so the subtree root and
//! `nodes/` stay empty and per-node limits can be added later. The name carries a hash
//! of the state dir, which holds the node records: one agent per state dir, and the
//! next agent process on it finds the same subtree. Each node's record names its
//! cgroup as well.
//!
//! # Placing a node
//!
//! A node is spawned with `posix_spawn` (no `fork`: see [`crate::sys`]), so it starts
//! in the agent's cgroup, `agent/`, and is moved to its own with one write of its pid
//! to `cgroup.procs` ([`Cgroups::contain`]). Whatever it forked between its `exec` and
//! that write is still in `agent/`, which otherwise holds the agent alone: those
//! processes are moved after it, until `agent/` holds only the agent. A node process
//! found in `agent/` at start-up was spawned by an agent that died before it moved and
//! recorded it; no record names it, so it is killed. `clone3` with
//! `CLONE_INTO_CGROUP` would place it from its first instruction, but neither std nor
//! glibc before 2.39 offers it with `posix_spawn`'s `CLONE_VM | CLONE_VFORK`, and a
//! `fork` costs in proportion to the agent's memory. A move can wait for an RCU grace
//! period (about 10 ms here for an isolated spawn; microseconds within a burst), after
//! the node has exec'd, not before.
//!
//! # Signals
//!
//! SIGKILL goes through `cgroup.kill` (Linux 5.14+); other signals, and SIGKILL on
//! older kernels, go to each process listed in `cgroup.procs` through a pidfd, opened
//! and then checked to still be listed, so a pid that was reused meanwhile is never
//! signalled. Never to a bare pid or process group.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use crate::sys::PidFd;

/// Where the agent puts its nodes' cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// Find a writable cgroup v2 hierarchy; without one, warn and do without.
    #[default]
    Auto,
    /// No cgroups: process groups and spawn tokens only.
    None,
    /// This directory (inside a cgroup v2 hierarchy) is the agent's subtree.
    Path(PathBuf),
}

impl std::str::FromStr for CgroupSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            p if p.starts_with('/') => Ok(Self::Path(PathBuf::from(p))),
            other => Err(format!(
                "invalid cgroup root '{other}': expected auto, none or an absolute path"
            )),
        }
    }
}

/// The agent's cgroup subtree.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    agent: PathBuf,
    nodes: PathBuf,
    /// The cgroup the agent started in, to go back to when it removes its subtree.
    origin: Option<PathBuf>,
}

/// How many rounds [`Cgroups::contain`] moves stragglers before giving up.
const STRAGGLER_ROUNDS: usize = 64;

impl Cgroups {
    /// Sets up the agent's subtree as `setting` says and moves the agent into its
    /// `agent/` leaf. `Ok(None)` for [`CgroupSetting::None`]; an error says why no
    /// cgroup can be used (the caller warns and does without).
    pub fn setup(
        setting: &CgroupSetting,
        instance: &str,
        state_dir: &Path,
    ) -> Result<Option<Self>, String> {
        let name = subtree_name(instance, state_dir);
        let own = own_cgroup();
        let root = match setting {
            CgroupSetting::None => return Ok(None),
            CgroupSetting::Path(p) => p.clone(),
            CgroupSetting::Auto => {
                let base = own.clone().ok_or("no cgroup v2 hierarchy is mounted")?;
                // An agent that was already inside its subtree (started by its
                // predecessor's leaf) reuses that subtree.
                match (base.file_name(), base.parent()) {
                    (Some(leaf), Some(parent))
                        if leaf == "agent" && parent.file_name() == Some(name.as_ref()) =>
                    {
                        parent.to_owned()
                    }
                    _ => base.join(&name),
                }
            }
        };
        let parent = root.parent().unwrap_or(&root);
        if !is_cgroup2(parent) {
            return Err(format!(
                "{} is not in a cgroup v2 hierarchy",
                parent.display()
            ));
        }
        let this = Self {
            agent: root.join("agent"),
            nodes: root.join("nodes"),
            root,
            origin: own,
        };
        for dir in [&this.root, &this.agent, &this.nodes] {
            make_dir(dir).map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
        }
        let me = std::process::id();
        write_pid(&this.agent, me)
            .map_err(|e| format!("cannot move the agent into {}: {e}", this.agent.display()))?;
        Ok(Some(this))
    }

    /// Kills node processes (they carry a spawn token) still in the agent's own leaf: a
    /// previous agent process spawned them and died before it moved them out, and
    /// recovery adopted none of them (an adopted one is moved into its node's cgroup).
    /// Never other processes, say another agent given the same --cgroup-root by mistake.
    pub fn kill_strays(&self) {
        let me = std::process::id();
        let strays: Vec<(u32, PidFd)> = procs(&self.agent)
            .unwrap_or_default()
            .into_iter()
            .filter(|&p| p != me && has_spawn_token(p))
            .filter_map(|p| Some((p, PidFd::open(i32::try_from(p).ok()?).ok()?)))
            .collect();
        let still = procs(&self.agent).unwrap_or_default();
        for (pid, fd) in strays {
            if still.contains(&pid) {
                tracing::warn!(
                    pid,
                    "killing an unrecorded process left in the agent's cgroup"
                );
                let _ = fd.signal(Signal::SIGKILL);
            }
        }
    }

    /// The subtree's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup of node `name` (which may not exist yet).
    pub fn node(&self, name: &str) -> PathBuf {
        self.nodes.join(name)
    }

    /// Creates node `name`'s cgroup if it does not exist; returns its path.
    pub fn create_node(&self, name: &str) -> io::Result<PathBuf> {
        let path = self.node(name);
        make_dir(&path)?;
        Ok(path)
    }

    /// Moves the freshly spawned `pid` into the node cgroup `cg`, then whatever it
    /// forked before the move (see the module docs). Creates `cg` if it is missing.
    /// What is still in `cg` belongs to an earlier process of the node (left while no
    /// agent ran, or still dying) and is killed first: a node's cgroup holds its
    /// current process and its descendants only.
    pub fn contain(&self, cg: &Path, pid: u32) -> io::Result<()> {
        if populated(cg) {
            kill(cg)?;
        }
        match write_pid(cg, pid) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                make_dir(cg)?;
                write_pid(cg, pid)?;
            }
            other => other?,
        }
        let me = std::process::id();
        // The kernel skips a process that is exiting without an error, so it would be
        // listed round after round; it can fork no more, so it is left where it is.
        let mut exiting = Vec::new();
        for _ in 0..STRAGGLER_ROUNDS {
            let strays: Vec<u32> = procs(&self.agent)?
                .into_iter()
                .filter(|&p| p != me && !exiting.contains(&p))
                .collect();
            if strays.is_empty() {
                return Ok(());
            }
            for p in strays {
                if is_exiting(p) {
                    exiting.push(p);
                    continue;
                }
                // ESRCH: it exited meanwhile.
                if let Err(e) = write_pid(cg, p)
                    && e.raw_os_error() != Some(libc::ESRCH)
                {
                    return Err(e);
                }
            }
        }
        Err(io::Error::other(format!(
            "{} keeps forking into the agent's cgroup",
            cg.display()
        )))
    }

    /// Node cgroups present on disk, by name.
    pub fn node_names(&self) -> Vec<String> {
        fs::read_dir(&self.nodes)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Moves the agent back to the cgroup it started in and removes the subtree, if
    /// no node runs in it any more. Best effort: used when the agent exits having
    /// stopped its nodes.
    pub fn release(&self) {
        let Some(origin) = &self.origin else {
            return;
        };
        if origin.starts_with(&self.root) || write_pid(origin, std::process::id()).is_err() {
            return;
        }
        for name in self.node_names() {
            let _ = fs::remove_dir(self.node(&name));
        }
        // The log keeper's leaf, if the keeper has exited.
        let keeper = self.root.join("keeper");
        for dir in [&self.nodes, &self.agent, &keeper, &self.root] {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// True if process `pid` has a `DROVER_NODE_TOKEN` in its environment, as every
/// process the agent spawns has.
fn has_spawn_token(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0)
            .any(|v| v.starts_with(b"DROVER_NODE_TOKEN="))
    })
}

/// True if process `pid` is gone, a zombie, or exiting (`PF_EXITING` in the flags,
/// field 9 of `/proc/<pid>/stat`).
fn is_exiting(pid: u32) -> bool {
    /// `PF_EXITING` of `<linux/sched.h>`.
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return true;
    };
    // `rest` starts at field 3 (state).
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next().unwrap_or("X");
    let flags = fields
        .nth(5)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    matches!(state, "Z" | "X" | "x") || flags & PF_EXITING != 0
}

/// `drover-agent-<instance>-<FNV-1a of the state dir, 8 hex digits>`.
pub fn subtree_name(instance: &str, state_dir: &Path) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("drover-agent-{instance}-{h:08x}")
}

/// The agent's own cgroup v2 directory: the first cgroup2 mount plus the `0::` line
/// of `/proc/self/cgroup`.
fn own_cgroup() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(unescape_mount))?
    })?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(Path::new(&mount).join(rel.trim_start_matches('/')))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn write_pid(cg: &Path, pid: u32) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(cg.join("cgroup.procs"))?;
    f.write_all(pid.to_string().as_bytes())
}

/// The processes in cgroup `cg` (not its descendants).
pub fn procs(cg: &Path) -> io::Result<Vec<u32>> {
    Ok(fs::read_to_string(cg.join("cgroup.procs"))?
        .split_ascii_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// True while a process lives in `cg` or below (`populated 1` in `cgroup.events`).
/// False for a cgroup that does not exist.
pub fn populated(cg: &Path) -> bool {
    fs::read_to_string(cg.join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
}

/// Sends `sig` to every process in `cg`, each through a pidfd (see the module docs);
/// returns how many were signalled. A cgroup that does not exist holds none.
pub fn signal(cg: &Path, sig: Signal) -> io::Result<usize> {
    let listed = match procs(cg) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        other => other?,
    };
    let fds: Vec<(u32, PidFd)> = listed
        .into_iter()
        .filter_map(|p| Some((p, PidFd::open(i32::try_from(p).ok()?).ok()?)))
        .collect();
    // A pid still listed after its pidfd was opened was in `cg` when opened.
    let still = procs(cg).unwrap_or_default();
    let mut n = 0;
    for (pid, fd) in fds {
        if still.contains(&pid) && fd.signal(sig).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Kills every process in `cg` and below: `cgroup.kill` where the kernel has it, else
/// SIGKILL to each process through a pidfd, until the cgroup is empty. Returns at once;
/// the processes may take a moment to die.
pub fn kill(cg: &Path) -> io::Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .open(cg.join("cgroup.kill"))
    {
        Ok(mut f) => return f.write_all(b"1"),
        // No such cgroup: nothing to kill.
        Err(_) if !cg.exists() => return Ok(()),
        // A kernel without cgroup.kill.
        Err(_) => {}
    }
    for _ in 0..STRAGGLER_ROUNDS {
        if signal(cg, Signal::SIGKILL)? == 0 {
            break;
        }
    }
    if let Ok(dirs) = fs::read_dir(cg) {
        for d in dirs
            .flatten()
            .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
        {
            kill(&d.path())?;
        }
    }
    Ok(())
}

/// Removes the (empty) cgroup `cg`; a cgroup that is already gone is fine.
pub fn remove(cg: &Path) -> io::Result<()> {
    match fs::remove_dir(cg) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;
    use std::time::{Duration, Instant};

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn exiting_processes_are_told_apart() {
        assert!(!is_exiting(std::process::id()));
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        wait_until("zombie", || is_exiting(pid));
        child.wait().unwrap();
        assert!(is_exiting(pid), "reaped");
    }

    #[test]
    fn settings_parse() {
        assert_eq!("auto".parse(), Ok(CgroupSetting::Auto));
        assert_eq!("none".parse(), Ok(CgroupSetting::None));
        assert_eq!(
            "/sys/fs/cgroup/x".parse(),
            Ok(CgroupSetting::Path("/sys/fs/cgroup/x".into()))
        );
        let e = "relative/dir".parse::<CgroupSetting>().unwrap_err();
        assert!(
            e.contains("'relative/dir'") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn subtree_names_are_stable_and_differ_by_state_dir() {
        let a = subtree_name("agent-1", Path::new("/var/lib/drover-agent"));
        assert_eq!(
            a,
            subtree_name("agent-1", Path::new("/var/lib/drover-agent"))
        );
        assert!(
            a.starts_with("drover-agent-agent-1-") && a.len() == 29,
            "{a}"
        );
        assert_ne!(a, subtree_name("agent-1", Path::new("/var/lib/other")));
        assert_ne!(
            a,
            subtree_name("agent-2", Path::new("/var/lib/drover-agent"))
        );
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount("/x\\0"), "/x\\0", "truncated escape kept");
    }

    #[test]
    fn a_path_outside_cgroup2_is_refused() {
        let dir = std::env::temp_dir().join(format!("not-cgroup-{}", std::process::id()));
        let e =
            Cgroups::setup(&CgroupSetting::Path(dir.join("x")), "a", Path::new("/s")).unwrap_err();
        assert!(e.contains("is not in a cgroup v2 hierarchy"), "{e}");
        assert!(
            Cgroups::setup(&CgroupSetting::None, "a", Path::new("/s"))
                .unwrap()
                .is_none()
        );
    }

    /// A real subtree: a shell that forks at once is contained with its children,
    /// signalled and killed through the cgroup, and the subtree removed. It moves the
    /// test process into the subtree's `agent/` leaf, so it runs only where each test
    /// has a process of its own (nextest), and only with a writable cgroup v2.
    #[test]
    fn contain_signal_and_kill_a_forking_process() {
        if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() != Ok("process-per-test") {
            eprintln!("skipped: needs a process of its own");
            return;
        }
        let Some(own) = own_cgroup() else {
            eprintln!("skipped: no cgroup v2 hierarchy");
            return;
        };
        let root = own.join(format!("drover-unit-{}", std::process::id()));
        let c = match Cgroups::setup(&CgroupSetting::Path(root.clone()), "t", Path::new("/")) {
            Ok(Some(c)) => c,
            other => {
                eprintln!("skipped: {other:?}");
                return;
            }
        };
        assert_eq!(procs(&c.agent).unwrap(), vec![std::process::id()]);
        // A node process left in the agent's leaf by a previous agent is killed once
        // recovery is done with the leaf; another process is not.
        let mut left = Command::new("/bin/sleep")
            .arg("1000")
            .env("DROVER_NODE_TOKEN", "7")
            .spawn()
            .unwrap();
        let mut other = Command::new("/bin/sleep").arg("1000").spawn().unwrap();
        wait_until("exec", || {
            has_spawn_token(left.id())
                && fs::read_to_string(format!("/proc/{}/comm", other.id()))
                    .is_ok_and(|c| c.trim() == "sleep")
        });
        let again = Cgroups::setup(&CgroupSetting::Path(root.clone()), "t", Path::new("/"));
        assert!(matches!(again, Ok(Some(_))), "{again:?}");
        c.kill_strays();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&left.wait().unwrap()),
            Some(libc::SIGKILL)
        );
        assert_eq!(other.try_wait().unwrap(), None, "not a node: left alone");
        other.kill().unwrap();
        other.wait().unwrap();
        let cg = c.create_node("n1").unwrap();
        assert_eq!(c.node_names(), vec!["n1".to_owned()]);
        assert!(!populated(&cg));
        let mut sh = Command::new("/bin/sh")
            .args(["-c", "sleep 1000 & sleep 1000 & wait"])
            .spawn()
            .unwrap();
        c.contain(&cg, sh.id()).unwrap();
        // Whatever sh forked before the move followed it: the agent's leaf holds the
        // test process alone, and the node's cgroup all three.
        wait_until("sh and two sleeps", || procs(&cg).unwrap().len() == 3);
        assert_eq!(procs(&c.agent).unwrap(), vec![std::process::id()]);
        assert!(populated(&cg));
        assert_eq!(signal(&cg, Signal::SIGCONT).unwrap(), 3);
        kill(&cg).unwrap();
        wait_until("empty", || !populated(&cg));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&sh.wait().unwrap()),
            Some(libc::SIGKILL)
        );
        assert_eq!(signal(&cg, Signal::SIGCONT).unwrap(), 0);
        // A leftover of an earlier process is killed when the next one moves in.
        let mut old = Command::new("/bin/sleep").arg("1000").spawn().unwrap();
        write_pid(&cg, old.id()).unwrap();
        let mut new = Command::new("/bin/sleep").arg("1000").spawn().unwrap();
        c.contain(&cg, new.id()).unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&old.wait().unwrap()),
            Some(libc::SIGKILL)
        );
        assert_eq!(procs(&cg).unwrap(), vec![new.id()]);
        kill(&cg).unwrap();
        new.wait().unwrap();
        wait_until("empty again", || !populated(&cg));
        remove(&cg).unwrap();
        remove(&cg).unwrap();
        assert!(kill(&cg).is_ok(), "a missing cgroup holds nothing");
        c.release();
        assert!(!root.exists());
    }
}
