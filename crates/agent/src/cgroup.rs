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
//!     probes/<node>/    the node's exec liveness probe while it runs
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
//! A node process is created in its own cgroup: `clone3` with `CLONE_INTO_CGROUP`
//! (Linux 5.7) and `CLONE_VM | CLONE_VFORK`, as `posix_spawn` does without it (see
//! [`crate::exec::spawn`]). It never runs anywhere else, so nothing it forks is left
//! behind in the agent's leaf, two spawns under way at once cannot take each other's
//! processes, and no migration (which can wait for an RCU grace period) is needed.
//!
//! Before each spawn the node's cgroup is made ready ([`Cgroups::prepare`]): what an
//! earlier process of the node left is killed and, once gone, the cgroup is removed
//! and made again. That is needed, not tidiness: the kernel kills a process created
//! in a cgroup that `cgroup.kill` was used on since the cgroup was made (its fork
//! compares the kill sequence of its parent's cgroup with the new one's). Where the
//! leftovers do not die in time, or `clone3` is missing (older kernels, seccomp
//! filters that hide it), the child moves itself in with a write of "0" to
//! `cgroup.procs`, before it execs and before anything else.
//!
//! A node process found in `agent/` at start-up was spawned by an older agent version
//! (which moved nodes after their exec) that died before it moved and recorded it; no
//! record names it, so it is killed. One such process that is adopted is moved with
//! whatever carries its spawn token ([`Cgroups::adopt`]).
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

/// How long [`Cgroups::prepare`] waits for what it killed in a node's cgroup to be
/// gone before the new process moves itself in instead.
const DRAIN: std::time::Duration = std::time::Duration::from_millis(100);

/// A node cgroup made ready for a new process by [`Cgroups::prepare`].
#[derive(Debug)]
pub struct Ready {
    /// Its directory, open.
    pub dir: std::os::fd::OwnedFd,
    /// True when no process was ever killed in it, so a process may be created in it
    /// (`clone3` with `CLONE_INTO_CGROUP`): the kernel kills a process created in a
    /// cgroup that was killed through `cgroup.kill` since it was made (its fork sees
    /// a kill sequence other than its parent's cgroup's). Otherwise the process moves
    /// itself in before it execs.
    pub fresh: bool,
}

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
    /// The cgroup the agent started in (for one started inside its subtree, the cgroup
    /// the subtree is in), to go back to when it removes its subtree.
    origin: Option<PathBuf>,
}

/// How many rounds [`kill`] signals what is listed before giving up, on kernels
/// without `cgroup.kill`.
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
        let mut own = own_cgroup();
        let root = match setting {
            CgroupSetting::None => return Ok(None),
            CgroupSetting::Path(p) => p.clone(),
            CgroupSetting::Auto => {
                let base = own.clone().ok_or("no cgroup v2 hierarchy is mounted")?;
                // An agent that was already inside its subtree (started by its
                // predecessor's leaf) reuses that subtree, and goes back to where the
                // subtree hangs when it releases it.
                match (base.file_name(), base.parent()) {
                    (Some(leaf), Some(parent))
                        if leaf == "agent" && parent.file_name() == Some(name.as_ref()) =>
                    {
                        own = parent.parent().map(Path::to_owned);
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

    /// The cgroup of node `name`'s exec probe (which may not exist yet): a sibling of
    /// `nodes/`, so that a probe is neither killed nor counted as the node.
    pub fn probe(&self, name: &str) -> PathBuf {
        self.root.join("probes").join(name)
    }

    /// Probe cgroups present on disk.
    pub fn probe_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.root.join("probes"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Creates node `name`'s cgroup if it does not exist; returns its path.
    pub fn create_node(&self, name: &str) -> io::Result<PathBuf> {
        let path = self.node(name);
        make_dir(&path)?;
        Ok(path)
    }

    /// Makes node cgroup `cg` ready for a new process of the node (see the module
    /// docs). What is still in `cg` belongs to an earlier process of the node (left
    /// while no agent ran, or still dying) and is killed: a node's cgroup holds its
    /// current process and its descendants only. Once empty (within [`DRAIN`]), the
    /// cgroup is made anew, so the process can be created in it.
    pub fn prepare(&self, cg: &Path) -> io::Result<Ready> {
        // A node's first process: nothing earlier to clear.
        match fs::create_dir(cg) {
            Ok(()) => {
                return Ok(Ready {
                    dir: fs::File::open(cg)?.into(),
                    fresh: true,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if populated(cg) {
            kill(cg)?;
            let until = std::time::Instant::now() + DRAIN;
            let mut pause = std::time::Duration::from_micros(50);
            while populated(cg) && std::time::Instant::now() < until {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(2));
            }
        }
        let fresh = !populated(cg)
            && match fs::remove_dir(cg) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
        make_dir(cg)?;
        let dir = fs::File::open(cg)?;
        Ok(Ready {
            dir: dir.into(),
            fresh,
        })
    }

    /// Moves `pid`, a node process the agent is adopting, into node cgroup `cg`,
    /// unless it is there already (as every process spawned into its cgroup is), with
    /// the processes in the agent's own leaf that carry its spawn `token`: those a
    /// node spawned by moving it after its `exec` forked meanwhile. Nothing else moves:
    /// another node's process may be on its way through the leaf.
    pub fn adopt(&self, cg: &Path, pid: u32, token: u64) -> io::Result<()> {
        if procs(cg).is_ok_and(|p| p.contains(&pid)) {
            return Ok(());
        }
        make_dir(cg)?;
        write_pid(cg, pid)?;
        let me = std::process::id();
        for p in procs(&self.agent)? {
            if p != me && spawn_token(p) == Some(token) {
                // ESRCH: it exited meanwhile.
                if let Err(e) = write_pid(cg, p)
                    && e.raw_os_error() != Some(libc::ESRCH)
                {
                    return Err(e);
                }
            }
        }
        Ok(())
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
        for dir in self.probe_dirs() {
            let _ = fs::remove_dir(dir);
        }
        // The log keeper's leaf, if the keeper has exited.
        let keeper = self.root.join("keeper");
        let probes = self.root.join("probes");
        for dir in [&self.nodes, &probes, &self.agent, &keeper, &self.root] {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// True if process `pid` has a `DROVER_NODE_TOKEN` in its environment, as every
/// process the agent spawns has.
fn has_spawn_token(pid: u32) -> bool {
    spawn_token(pid).is_some()
}

/// The `DROVER_NODE_TOKEN` in process `pid`'s environment, if any.
pub(crate) fn spawn_token(pid: u32) -> Option<u64> {
    let env = crate::sys::read_pseudo(Path::new(&format!("/proc/{pid}/environ"))).ok()?;
    env.split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"DROVER_NODE_TOKEN="))
        .and_then(|t| std::str::from_utf8(t).ok()?.parse().ok())
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
    Ok(crate::sys::read_pseudo_text(&cg.join("cgroup.procs"))?
        .split_ascii_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// True while a process lives in `cg` or below (`populated 1` in `cgroup.events`).
/// False for a cgroup that does not exist.
pub fn populated(cg: &Path) -> bool {
    crate::sys::read_pseudo_text(&cg.join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
}

/// Sends `sig` to every process in `cg`, each through a pidfd (see the module docs);
/// returns how many were signalled. A cgroup that does not exist holds none.
pub fn signal(cg: &Path, sig: Signal) -> io::Result<usize> {
    let listed = match procs(cg) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        other => other?,
    };
    let mut fds: Vec<(u32, PidFd)> = Vec::with_capacity(listed.len());
    for p in listed {
        let Ok(pid) = i32::try_from(p) else { continue };
        match PidFd::open(pid) {
            Ok(fd) => fds.push((p, fd)),
            // Out of descriptors: said, so that the caller signals another way, rather
            // than taken for a process that is gone.
            Err(e) if crate::sys::out_of_fds(&e) => return Err(e),
            Err(_) => {}
        }
    }
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

    /// `sh -c SCRIPT` spawned into the cgroup made `ready`.
    fn spawn_into(ready: &Ready, script: &str) -> u32 {
        use std::os::fd::AsFd;
        let out = tempfile::tempfile().unwrap();
        let args = ["-c".to_owned(), script.to_owned()];
        let pid = crate::sys::spawn_clean(&crate::sys::SpawnSpec {
            program: "/bin/sh",
            argv0: None,
            args: &args,
            env: vec!["PATH=/usr/bin:/bin".to_owned()],
            path: "/usr/bin:/bin",
            cwd: Path::new("/"),
            stdout: out.as_fd(),
            stderr: out.as_fd(),
            exec: None,
            cgroup: Some(crate::sys::IntoCgroup {
                dir: ready.dir.as_fd(),
                create: ready.fresh,
            }),
            join: &[],
        })
        .unwrap();
        u32::try_from(pid).unwrap()
    }

    /// Kills what is in `cg`, our child `pid` among it, and reaps it.
    fn reap_after_kill(cg: &Path, pid: u32) {
        kill(cg).unwrap();
        reap(pid);
        wait_until("empty", || !populated(cg));
    }

    /// Waits for our child `pid` to end.
    fn reap(pid: u32) {
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(i32::try_from(pid).unwrap(), &raw mut status, 0) };
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
        // A shell that forks at once, spawned into the node's cgroup: it and what it
        // forked are there, never in the agent's leaf, whichever way the child gets
        // there (`clone3`, or moving itself where that is missing).
        for fallback in [false, true] {
            if fallback {
                crate::exec::forget_clone3();
            }
            let ready = c.prepare(&cg).unwrap();
            assert!(ready.fresh);
            let pid = spawn_into(&ready, "sleep 1000 & sleep 1000 & wait");
            wait_until("sh and two sleeps", || procs(&cg).unwrap().len() == 3);
            assert!(procs(&cg).unwrap().contains(&pid));
            assert_eq!(procs(&c.agent).unwrap(), vec![std::process::id()]);
            assert_eq!(signal(&cg, Signal::SIGCONT).unwrap(), 3);
            // The next process of the node: what the last one left is killed first,
            // and the cgroup made anew (the kernel would kill a process created in
            // a cgroup killed before).
            let ready = c.prepare(&cg).unwrap();
            assert!(ready.fresh);
            assert!(!populated(&cg));
            let next = spawn_into(&ready, "exec sleep 1000");
            assert_eq!(procs(&cg).unwrap(), vec![next]);
            kill(&cg).unwrap();
            wait_until("empty", || !populated(&cg));
            // A process that cannot be created in a killed cgroup moves itself in.
            let ready = Ready {
                dir: fs::File::open(&cg).unwrap().into(),
                fresh: false,
            };
            let moved = spawn_into(&ready, "exec sleep 1000");
            assert_eq!(procs(&cg).unwrap(), vec![moved]);
            assert_eq!(procs(&c.agent).unwrap(), vec![std::process::id()]);
            reap_after_kill(&cg, moved);
            kill(&cg).unwrap();
            wait_until("empty", || !populated(&cg));
            assert_eq!(signal(&cg, Signal::SIGCONT).unwrap(), 0);
            reap(pid);
            reap(next);
        }
        // Adopting a process spawned the old way (in the agent's leaf, then moved):
        // what it forked with its token follows it, another node's process does not.
        let mut old = Command::new("/bin/sh")
            .args(["-c", "sleep 1000 & exec sleep 1000"])
            .env("DROVER_NODE_TOKEN", "8")
            .spawn()
            .unwrap();
        let mut passing = Command::new("/bin/sleep")
            .arg("1000")
            .env("DROVER_NODE_TOKEN", "9")
            .spawn()
            .unwrap();
        wait_until("forked and exec'd", || {
            procs(&c.agent).unwrap().len() == 4
                && procs(&c.agent)
                    .unwrap()
                    .iter()
                    .all(|&p| p == std::process::id() || spawn_token(p).is_some())
        });
        c.adopt(&cg, old.id(), 8).unwrap();
        let mut there = procs(&cg).unwrap();
        there.sort_unstable();
        assert_eq!(there.len(), 2, "{there:?}");
        assert!(there.contains(&old.id()));
        assert_eq!(
            procs(&c.agent).unwrap(),
            vec![std::process::id(), passing.id()]
        );
        c.adopt(&cg, old.id(), 8).unwrap();
        assert_eq!(procs(&cg).unwrap().len(), 2, "adopting again moves nothing");
        passing.kill().unwrap();
        passing.wait().unwrap();
        kill(&cg).unwrap();
        old.wait().unwrap();
        wait_until("empty again", || !populated(&cg));
        remove(&cg).unwrap();
        remove(&cg).unwrap();
        assert!(kill(&cg).is_ok(), "a missing cgroup holds nothing");
        c.release();
        assert!(!root.exists());
    }
}
