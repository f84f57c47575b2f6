//! One run of an exec liveness probe: started as its node is (the node's user, groups,
//! capabilities, rlimits and environment, in the node's working directory), contained
//! like a node, and taken down whole when it ends, times out or is dropped.
//!
//! A probe command that forks (`sh -c "check &"`, a hung `curl` under a shell) must
//! not leave processes behind at every interval: the run has a cgroup of its own,
//! `<subtree>/probes/<node>` (see [`crate::cgroup`]), made for each run as a node's is
//! made ready, killed through `cgroup.kill` once the command has exited (before its
//! status is collected) or the run is dropped, and removed after it. Without cgroups the command leads a process group of its own,
//! which is signalled through the leader's pidfd, or with `killpg` while the unreaped
//! leader still holds the group's id ([`crate::sys::signal_led_group`]): never a group
//! id that may have been reused. What leaves its process group as well escapes there.
//!
//! A run outlives an agent killed meanwhile. Its next agent process kills it: the
//! probe cgroups it finds, or, without cgroups, the processes whose environment has
//! `DROVER_PROBE` set to the agent's identity ([`kill_orphans`]), which a probe's
//! descendants inherit.
//!
//! What the command writes (stdout and stderr, one pipe) is read as it comes, so a
//! chatty check never blocks on a full pipe, and only its last [`TAIL`] bytes are kept:
//! a failure's reason ends with the last line of them (`check ended with exit status
//! 2: connection refused`), as `systemctl status` shows a unit's last lines.
//!
//! The run's pid is registered (see [`super::is_probe`]) from before its exit can be
//! seen until it is reaped, so the agent's orphan reaper leaves it to this module; a
//! run dropped before its end (a timeout, a node that stops) unregisters it after the
//! kill, and the reaper collects it.

use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::signal::Signal;

use crate::cgroup::{self, Cgroups};
use crate::sys::{self, ExitKind, PidFd, ProcId};

/// How a node's exec probe runs: as the node does.
#[derive(Debug, Clone, Default)]
pub struct ExecAs {
    /// The node's user, groups, capabilities and rlimits.
    pub plan: Arc<crate::exec::Plan>,
    /// The node's environment, `KEY=VALUE`; each run adds `DROVER_NODE_PID` and
    /// `DROVER_PROBE`.
    pub env: Vec<String>,
    /// Where a program name is looked up (the node's `PATH`).
    pub path: String,
    /// The node's working directory.
    pub workdir: PathBuf,
    /// The agent's cgroups and the probe's cgroup in them, where the agent has any.
    pub cgroup: Option<(Cgroups, PathBuf)>,
    /// The agent's identity (its cgroup subtree's name, which names its instance and
    /// state dir): every run has it as `DROVER_PROBE`.
    pub owner: String,
}

/// The most of a run's output kept, from its end.
const TAIL: usize = 1024;

/// How long a run's output is read after it exited and what it left was killed: a
/// process that escaped the kill may hold the pipe open.
const DRAIN: std::time::Duration = std::time::Duration::from_millis(100);

/// A probe command started and not yet reaped.
pub(super) struct Run {
    id: ProcId,
    pidfd: PidFd,
    /// The read end of the command's stdout and stderr.
    output: Option<std::os::fd::OwnedFd>,
    /// The last [`TAIL`] bytes read from it.
    tail: Vec<u8>,
    /// The probe's cgroup, when it runs in one.
    cgroup: Option<PathBuf>,
    /// Set once the command's status is collected: nothing is left to do at drop.
    reaped: bool,
}

impl Run {
    /// Starts `command` for the node whose main process is `node_pid`. Blocks (a
    /// cgroup left populated by the last run is waited for): call it off the runtime.
    pub(super) fn start(command: &[String], how: &ExecAs, node_pid: u32) -> Result<Self, String> {
        let (program, args) = command.split_first().ok_or("no command")?;
        // Without its cgroup the run still goes, in a process group of its own: a
        // probe that cannot be contained is no reason to restart its node.
        let cgroup = how.cgroup.as_ref().and_then(|(cgroups, cg)| {
            let ready = cg
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| cgroups.prepare(cg));
            match ready {
                Ok(ready) => Some((cg.clone(), ready)),
                Err(e) => {
                    if !UNCONTAINED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            "cannot prepare cgroup {} for an exec probe; probes run in process groups of their own: {}",
                            cg.display(),
                            sys::cause(&e)
                        );
                    }
                    None
                }
            }
        });
        let (output, sink) =
            pipe().map_err(|e| format!("cannot make a pipe: {}", sys::cause(&e)))?;
        let mut env = how.env.clone();
        env.push(format!("DROVER_NODE_PID={node_pid}"));
        env.push(format!("{MARK}={}", how.owner));
        let spec = sys::SpawnSpec {
            program,
            argv0: None,
            args,
            env,
            path: &how.path,
            cwd: &how.workdir,
            stdout: std::os::fd::AsFd::as_fd(&sink),
            stderr: std::os::fd::AsFd::as_fd(&sink),
            exec: Some(&how.plan),
            cgroup: cgroup.as_ref().map(|(_, ready)| sys::IntoCgroup {
                dir: std::os::fd::AsFd::as_fd(&ready.dir),
                create: ready.fresh,
            }),
            join: &[],
        };
        // Registered before its exit can be seen (see the module docs).
        let mut running = super::PROBES.lock().unwrap_or_else(|p| p.into_inner());
        let pid = sys::spawn_clean(&spec).map_err(|e| {
            format!(
                "cannot run {program}: {}",
                sys::exec_cause(&e, program, &how.path, &how.workdir)
            )
        })?;
        running.insert(pid);
        drop(running);
        // The child has its copy: the read end sees EOF once the run's processes are gone.
        drop(sink);
        // Our unreaped child: the pid is its own until we collect it.
        let opened = PidFd::open(pid).and_then(|fd| Ok((fd, sys::proc_id(pid)?)));
        let (pidfd, id) = match opened {
            Ok(v) => v,
            Err(e) => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                unregister(pid);
                return Err(format!(
                    "cannot watch probe process {pid}: {}",
                    sys::cause(&e)
                ));
            }
        };
        Ok(Self {
            id,
            pidfd,
            output: Some(output),
            tail: Vec::new(),
            cgroup: cgroup.map(|(cg, _)| cg),
            reaped: false,
        })
    }

    /// Waits for the command to exit, kills what it left running, and collects its
    /// status. Cancel-safe: a run dropped while it waits is killed whole.
    pub(super) async fn finish(&mut self) -> Result<ExitKind, String> {
        let mut output = match self.output.take() {
            Some(fd) => Some(
                tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
                    .map_err(|e| format!("cannot read the probe's output: {e}"))?,
            ),
            None => None,
        };
        let mut buf = vec![0u8; 16 * 1024];
        let exited = self.pidfd.exited();
        tokio::pin!(exited);
        loop {
            tokio::select! {
                r = &mut exited => {
                    r.map_err(|e| format!("cannot wait for the probe: {e}"))?;
                    break;
                }
                n = read_some(output.as_mut(), &mut buf) => {
                    keep(&mut self.tail, &buf[..n]);
                    if n == 0 {
                        output = None;
                    }
                }
            }
        }
        // The leader is a zombie, not reaped: its group id cannot have been reused.
        self.kill_rest();
        // What is still in the pipe; a process that escaped the kill may hold it open.
        if output.is_some() {
            let _ = tokio::time::timeout(DRAIN, async {
                loop {
                    let n = read_some(output.as_mut(), &mut buf).await;
                    if n == 0 {
                        return;
                    }
                    keep(&mut self.tail, &buf[..n]);
                }
            })
            .await;
        }
        let status = sys::wait_child(&self.pidfd)
            .await
            .map_err(|e| format!("cannot collect the probe's status: {e}"))?;
        self.reaped = true;
        unregister(self.id.pid);
        Ok(status)
    }

    /// The last line the command wrote that holds anything but white space, cut to
    /// 200 characters, control characters dropped.
    pub(super) fn last_line(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.tail);
        let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
        Some(line.chars().filter(|c| !c.is_control()).take(200).collect())
    }

    /// SIGKILL to everything in the run's cgroup, or in its process group.
    fn kill_rest(&self) {
        let _ = match &self.cgroup {
            Some(cg) => cgroup::kill(cg),
            None => sys::signal_led_group(self.id, Some(&self.pidfd), Signal::SIGKILL).map(drop),
        };
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_rest();
            let _ = self.pidfd.signal(Signal::SIGKILL);
            // From here the orphan reaper may collect it (its death is a SIGCHLD to
            // come); one already dead is collected now.
            unregister(self.id.pid);
            let _ = sys::reap_exited(&self.pidfd);
        }
        if let Some(cg) = self.cgroup.take() {
            retire(cg);
        }
    }
}

/// Removes a run's cgroup, once what was killed in it is gone: at once as a rule,
/// else from a thread of its own that waits up to [`RETIRE`] and removes the cgroup
/// only if it is still the one this run had (the node's next run may have made it
/// anew meanwhile). A cgroup is per run: one left behind (a node removed while its
/// check was being started, which made it again) would stay for good.
fn retire(cg: PathBuf) {
    use std::os::unix::fs::MetadataExt;
    let _ = cgroup::kill(&cg);
    if cgroup::remove(&cg).is_ok() {
        return;
    }
    let Ok(ino) = std::fs::metadata(&cg).map(|m| m.ino()) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("probe-cgroup".to_owned())
        .spawn(move || {
            let until = std::time::Instant::now() + RETIRE;
            while cgroup::populated(&cg) && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if std::fs::metadata(&cg).is_ok_and(|m| m.ino() == ino) {
                let _ = cgroup::remove(&cg);
            }
        });
}

/// How long [`retire`] waits for what was killed in a run's cgroup to be gone.
const RETIRE: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `bytes` at the end of a run's output `tail`, at most [`TAIL`] bytes.
fn keep(tail: &mut Vec<u8>, bytes: &[u8]) {
    tail.extend_from_slice(bytes);
    let excess = tail.len().saturating_sub(TAIL);
    tail.drain(..excess);
}

/// Reads what is there from `output` (0 at its end); never resolves without one, or
/// on an error, so that a `select!` goes on waiting for the exit.
async fn read_some(output: Option<&mut tokio::net::unix::pipe::Receiver>, buf: &mut [u8]) -> usize {
    use tokio::io::AsyncReadExt;
    match output {
        Some(rx) => match rx.read(buf).await {
            Ok(n) => n,
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// A pipe for a run's output: (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two new descriptors this process owns.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Set once a probe could not be given its cgroup (and that was logged).
static UNCONTAINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The variable that marks a probe's processes, with its agent's identity.
const MARK: &str = "DROVER_PROBE";

/// Kills the processes left by probes of an earlier process of the agent `owner` (see
/// the module docs): each through a pidfd, checked after the open to still carry the
/// mark. For agents without cgroups, once at start-up, before any probe runs.
pub fn kill_orphans(owner: &str) -> usize {
    let me = std::process::id();
    let marked = |pid: i32| {
        sys::read_pseudo(std::path::Path::new(&format!("/proc/{pid}/environ"))).is_ok_and(|env| {
            env.split(|b| *b == 0).any(|v| {
                v.strip_prefix(MARK.as_bytes())
                    .and_then(|r| r.strip_prefix(b"="))
                    == Some(owner.as_bytes())
            })
        })
    };
    let mut killed = 0;
    for s in sys::scan_procs() {
        if u32::try_from(s.pid).is_ok_and(|p| p == me) || s.state == 'Z' || !marked(s.pid) {
            continue;
        }
        if let Ok(fd) = PidFd::open(s.pid)
            && marked(s.pid)
            && fd.signal(Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}

fn unregister(pid: i32) {
    super::PROBES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&pid);
}

/// How a probe's command ended, as its failure says it, with the last line of its
/// output when there is one.
pub(super) fn describe(
    program: &str,
    status: ExitKind,
    last: Option<String>,
) -> Result<(), String> {
    let how = match status {
        ExitKind::Code(0) => return Ok(()),
        ExitKind::Code(code) => format!("{program} ended with exit status {code}"),
        ExitKind::Signal(sig) => {
            let name =
                Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.to_string());
            format!("{program} was killed by {name}")
        }
    };
    Err(match last {
        Some(line) => format!("{how}: {line}"),
        None => how,
    })
}
