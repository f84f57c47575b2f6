//! Liveness of running nodes: the watchdog (`WATCHDOG=1` on the notify socket, systemd's
//! `WatchdogSec`), liveness probes (http, tcp, exec), and who may speak on a node's
//! notify socket.
//!
//! A node's [`Monitors`] run from the moment it is ready until its process ends (they
//! abort when dropped, with the process's record). Each reports at most one failure,
//! through the callback it was given; the supervisor turns that into
//! [`crate::machine::Machine::unhealthy`], so the restart goes through the node's
//! restart policy, backoff and restart count like any other failure.
//!
//! Notify messages are accepted only from the node's own processes (systemd's
//! `NotifyAccess=all`): the socket has `SO_PASSCRED`, every datagram carries its
//! sender's pid (`SCM_CREDENTIALS`, filled in by the kernel), and the sender must be the
//! node's main process or in the node's cgroup, or, without cgroups, a descendant of the
//! main process. The sender's cgroup is read as soon as the datagram is received, so a
//! helper that sends and exits at once (`systemd-notify`) is still recognised.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_proto::resources::Liveness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

mod exec;

pub use exec::{ExecAs, kill_orphans};

/// What a monitor calls when the node fails: the reason, for `last_error` and events.
pub type Report = Arc<dyn Fn(String) + Send + Sync>;

/// The watchdog and probe tasks of one running process.
#[derive(Debug, Default)]
pub struct Monitors {
    tasks: Vec<AbortHandle>,
    watchdog: Option<Arc<Notify>>,
}

impl Drop for Monitors {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Monitors {
    /// Starts the watchdog (when `watchdog` is set) and the probe (when `liveness` is),
    /// for a node whose process `pid` just became ready; `how` says how an exec probe
    /// runs. `report` is called at most once per monitor.
    pub fn start(
        watchdog: Option<Duration>,
        liveness: Option<&Liveness>,
        how: ExecAs,
        pid: u32,
        report: Report,
    ) -> Self {
        let mut m = Self::default();
        if let Some(period) = watchdog {
            let pings = Arc::new(Notify::new());
            m.watchdog = Some(pings.clone());
            let report = report.clone();
            m.tasks.push(
                tokio::spawn(async move {
                    loop {
                        let pinged = pings.notified();
                        if tokio::time::timeout(period, pinged).await.is_err() {
                            report(format!(
                                "watchdog timeout: no WATCHDOG=1 within {}",
                                humantime::format_duration(period)
                            ));
                            return;
                        }
                    }
                })
                .abort_handle(),
            );
        }
        if let Some(probe) = liveness.cloned() {
            m.tasks.push(
                tokio::spawn(async move {
                    let (interval, timeout, failures) = probe.timing();
                    let mut failed = 0;
                    loop {
                        tokio::time::sleep(interval).await;
                        let result = attempt_within(&probe, &how, pid, timeout).await;
                        match result {
                            Ok(()) => failed = 0,
                            Err(why) => {
                                failed += 1;
                                if failed >= failures {
                                    let times = match failed {
                                        1 => "once".to_owned(),
                                        n => format!("{n} times in a row"),
                                    };
                                    report(format!(
                                        "liveness probe ({}) failed {times}: {why}",
                                        probe.kind()
                                    ));
                                    return;
                                }
                            }
                        }
                    }
                })
                .abort_handle(),
            );
        }
        m
    }

    /// True when the node has a watchdog.
    pub fn has_watchdog(&self) -> bool {
        self.watchdog.is_some()
    }

    /// A `WATCHDOG=1` from the node: its watchdog starts a new period.
    pub fn ping(&self) {
        if let Some(w) = &self.watchdog {
            w.notify_one();
        }
    }
}

/// One probe attempt.
async fn attempt(probe: &Liveness, how: &ExecAs, pid: u32) -> Result<(), String> {
    let local = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match probe {
        Liveness::Tcp { port, .. } => tokio::net::TcpStream::connect(local(*port))
            .await
            .map(drop)
            .map_err(|e| format!("cannot connect to port {port}: {e}")),
        Liveness::Http { port, path, .. } => {
            let mut s = tokio::net::TcpStream::connect(local(*port))
                .await
                .map_err(|e| format!("cannot connect to port {port}: {e}"))?;
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: drover-agent\r\nConnection: close\r\n\r\n"
            );
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("cannot send the request: {e}"))?;
            // The status line is all that matters; it fits in the first read or two.
            let mut head = Vec::new();
            let mut buf = [0u8; 512];
            while !head.contains(&b'\n') && head.len() < 4096 {
                let n = s
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("cannot read the answer: {e}"))?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let line = String::from_utf8_lossy(&head);
            let line = line.lines().next().unwrap_or("");
            let status = line
                .strip_prefix("HTTP/")
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|c| c.parse::<u16>().ok());
            match status {
                Some(code) if (200..400).contains(&code) => Ok(()),
                Some(code) => Err(format!("GET {path} answered {code}")),
                None => Err(format!("GET {path}: not an HTTP answer: {line:?}")),
            }
        }
        Liveness::Exec { command, .. } => exec_attempt(command, how, pid, None).await,
    }
}

/// [`attempt`] within `timeout`: one that runs out says so, an exec probe's with the
/// last line it wrote by then, as its other failures end.
async fn attempt_within(
    probe: &Liveness,
    how: &ExecAs,
    pid: u32,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let run = async {
        match probe {
            Liveness::Exec { command, .. } => {
                exec_attempt(command, how, pid, Some((deadline, timeout))).await
            }
            _ => attempt(probe, how, pid).await,
        }
    };
    tokio::time::timeout_at(deadline, run)
        .await
        .unwrap_or_else(|_| Err(late(timeout)))
}

/// The reason of an attempt that ran out of `timeout`.
fn late(timeout: Duration) -> String {
    format!("no answer within {}", humantime::format_duration(timeout))
}

/// Runs an exec probe's `command` once; with a deadline (and the timeout it ends), one
/// that runs out fails as [`late`] says, with the last line it wrote, just before the
/// caller's own timeout would.
async fn exec_attempt(
    command: &[String],
    how: &ExecAs,
    pid: u32,
    deadline: Option<(tokio::time::Instant, Duration)>,
) -> Result<(), String> {
    let program = command.first().cloned().unwrap_or_default();
    let (command, how) = (command.to_vec(), how.clone());
    // Started off the runtime: a cgroup the last run left populated is waited for. A
    // run this attempt no longer waits for (a timeout) is dropped, and so killed, where
    // it ends up.
    let mut run = tokio::task::spawn_blocking(move || exec::Run::start(&command, &how, pid))
        .await
        .map_err(|_| "the probe's start panicked".to_owned())??;
    let status = match deadline {
        None => run.finish().await?,
        // A moment before the caller's: what it wrote is still here to say.
        Some((at, timeout)) => {
            let before = at.checked_sub(EXEC_LATE_MARGIN).unwrap_or(at);
            match tokio::time::timeout_at(before, run.finish()).await {
                Ok(status) => status?,
                Err(_) => {
                    return Err(match run.last_line() {
                        Some(line) => format!("{}: {line}", late(timeout)),
                        None => late(timeout),
                    });
                }
            }
        }
    };
    exec::describe(&program, status, run.last_line())
}

/// How long before its deadline a timed exec probe gives up itself, so that its own
/// reason, with its last line, is the one told.
const EXEC_LATE_MARGIN: Duration = Duration::from_millis(5);

/// Pids of exec probes running, not yet reaped.
static PROBES: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// True while `pid` is an exec probe of this agent, which its own task reaps: the
/// orphan reaper leaves it alone.
pub fn is_probe(pid: i32) -> bool {
    PROBES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&pid)
}

/// Who sent a notify message: its pid and, read at once, its cgroup v2 path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sender {
    pub pid: Option<u32>,
    pub cgroup: Option<String>,
}

impl Sender {
    /// True when the sender is the node's process `main`, in the node's cgroup `cg`
    /// (or below it), or, when the node has no cgroup, a descendant of `main`.
    pub fn belongs(&self, main: Option<u32>, cg: Option<&Path>) -> bool {
        let Some(pid) = self.pid else {
            return false;
        };
        if Some(pid) == main {
            return true;
        }
        match cg {
            Some(cg) => self.cgroup.as_deref().is_some_and(|rel| in_cgroup(rel, cg)),
            None => main.is_some_and(|m| descends_from(pid, m)),
        }
    }
}

/// True when the cgroup v2 path `rel` (as `/proc/PID/cgroup` gives it) is the node
/// cgroup `cg` or below it: `cg`'s last three components (`<subtree>/nodes/<node>`,
/// the subtree named after the agent's instance and state dir) appear in `rel` in a row.
fn in_cgroup(rel: &str, cg: &Path) -> bool {
    let tail: Vec<&std::ffi::OsStr> = cg.iter().collect();
    if tail.len() < 3 {
        return false;
    }
    let tail = &tail[tail.len() - 3..];
    let parts: Vec<&std::ffi::OsStr> = Path::new(rel).iter().collect();
    parts.windows(3).any(|w| w == tail)
}

/// True when `main` is an ancestor of `pid` (a few dozen generations at most).
fn descends_from(pid: u32, main: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        let Some(parent) = i32::try_from(p)
            .ok()
            .and_then(|p| crate::sys::proc_stat(p).ok())
            .and_then(|s| u32::try_from(s.ppid).ok())
        else {
            return false;
        };
        if parent == main {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        p = parent;
    }
    false
}

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/PID/cgroup`).
pub(crate) fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// What one notify datagram says (systemd's `sd_notify` protocol, the lines drover
/// acts on; others are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notice {
    /// `READY=1`.
    pub ready: bool,
    /// `WATCHDOG=1`: the node is alive.
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: the node asks to be treated as hung.
    pub trigger: bool,
    /// The last `STATUS=` text, cut to [`STATUS_MAX`] characters.
    pub status: Option<String>,
}

/// The longest `STATUS=` text kept, in characters.
pub const STATUS_MAX: usize = 256;

impl Notice {
    /// Reads a datagram, one assignment per line.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut n = Self::default();
        for line in text.lines() {
            match line {
                "READY=1" => n.ready = true,
                "WATCHDOG=1" => n.watchdog = true,
                "WATCHDOG=trigger" => n.trigger = true,
                _ => {
                    if let Some(s) = line.strip_prefix("STATUS=") {
                        n.status = Some(s.chars().take(STATUS_MAX).collect());
                    }
                }
            }
        }
        n
    }
}

/// Asks the kernel to attach the sender's credentials to every datagram on `sock`.
pub fn pass_credentials(sock: &impl AsRawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Receives one datagram from the notify socket: its length and its sender. File
/// descriptors passed along are closed.
pub async fn recv(
    sock: &tokio::net::UnixDatagram,
    buf: &mut [u8],
) -> std::io::Result<(usize, Sender)> {
    let (n, pid) = sock
        .async_io(tokio::io::Interest::READABLE, || {
            recv_cred(sock.as_raw_fd(), buf)
        })
        .await?;
    let cgroup = pid.and_then(cgroup_of);
    Ok((n, Sender { pid, cgroup }))
}

pub(crate) fn recv_cred(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<u32>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for the credentials and a few descriptors, aligned for cmsghdr.
    let mut control = [0u64; 32];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe {
        libc::recvmsg(
            fd,
            &raw mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut pid = None;
    // SAFETY: walking the control messages the kernel wrote into `control`, with the
    // libc macros, reading each payload unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            let h = &*c;
            let data = libc::CMSG_DATA(c);
            let len = h.cmsg_len as usize - (data as usize - c as usize);
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_CREDENTIALS {
                let cred = data.cast::<libc::ucred>().read_unaligned();
                pid = u32::try_from(cred.pid).ok();
            } else if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                for i in 0..len / size_of::<RawFd>() {
                    let fd = data.cast::<RawFd>().add(i).read_unaligned();
                    libc::close(fd);
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((usize::try_from(n).unwrap_or(0), pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_membership_is_by_the_node_cgroups_tail() {
        let cg = Path::new("/sys/fs/cgroup/x/drover-agent-a-1234abcd/nodes/w1");
        assert!(in_cgroup("/x/drover-agent-a-1234abcd/nodes/w1", cg));
        assert!(in_cgroup("/drover-agent-a-1234abcd/nodes/w1/child", cg));
        assert!(!in_cgroup("/drover-agent-a-1234abcd/nodes/w2", cg));
        assert!(!in_cgroup("/drover-agent-b-1234abcd/nodes/w1", cg));
        assert!(!in_cgroup("/drover-agent-a-1234abcd/agent", cg));
        assert!(!in_cgroup("/", Path::new("/a")));
    }

    #[test]
    fn senders_are_checked_by_pid_cgroup_or_ancestry() {
        let me = std::process::id();
        let cg = Path::new("/c/drover-agent-a-1/nodes/n");
        let s = |pid, cgroup: Option<&str>| Sender {
            pid,
            cgroup: cgroup.map(str::to_owned),
        };
        assert!(s(Some(7), None).belongs(Some(7), Some(cg)));
        assert!(s(Some(8), Some("/drover-agent-a-1/nodes/n")).belongs(Some(7), Some(cg)));
        assert!(!s(Some(8), Some("/elsewhere")).belongs(Some(7), Some(cg)));
        assert!(!s(None, None).belongs(Some(7), None));
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("100")
            .spawn()
            .unwrap();
        assert!(s(Some(child.id()), None).belongs(Some(me), None));
        assert!(!s(Some(me), None).belongs(Some(child.id()), None));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn credentials_name_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        pass_credentials(&sock).unwrap();
        let sock = tokio::net::UnixDatagram::from_std(sock).unwrap();
        let out = std::os::unix::net::UnixDatagram::unbound().unwrap();
        out.send_to(b"READY=1", &path).unwrap();
        let mut buf = [0u8; 64];
        let (n, sender) = recv(&sock, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(sender.pid, Some(std::process::id()));
        assert_eq!(sender.cgroup, cgroup_of(std::process::id()));
    }

    #[tokio::test]
    async fn probes_tell_serving_from_hung() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = std::env::temp_dir();
        let tcp = Liveness::Tcp {
            port,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures: 1,
        };
        assert_eq!(attempt(&tcp, &plain(&dir), 1).await, Ok(()));
        let http = Liveness::Http {
            port,
            path: "/h".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures: 1,
        };
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            // The tcp attempt's connection.
            drop(listener.accept().unwrap());
            for answer in [
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n\r\n",
                "HTTP/1.1 399 Odd\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\n\r\n",
                "HTTP/1.1 199 Early\r\n\r\n",
                "HTTP/1.0 503 Busy\r\n\r\n",
                "SSH-2.0\r\n",
            ] {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = [0u8; 1024];
                let n = s.read(&mut req).unwrap();
                assert!(req[..n].starts_with(b"GET /h HTTP/1.0\r\n"));
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        // 2xx and 3xx are healthy (a redirect is not followed), anything else is not.
        for _ in 0..3 {
            assert_eq!(attempt(&http, &plain(&dir), 1).await, Ok(()));
        }
        for code in [400, 199, 503] {
            assert_eq!(
                attempt(&http, &plain(&dir), 1).await,
                Err(format!("GET /h answered {code}"))
            );
        }
        let e = attempt(&http, &plain(&dir), 1).await.unwrap_err();
        assert!(e.contains("not an HTTP answer"), "{e}");
        server.join().unwrap();
        let how = plain(&dir);
        assert_eq!(attempt(&exec(&["/bin/true"]), &how, 1).await, Ok(()));
        let e = attempt(&exec(&["false"]), &how, 1).await.unwrap_err();
        assert_eq!(e, "false ended with exit status 1");
        let e = attempt(&exec(&["sh", "-c", "kill -9 $$"]), &how, 1)
            .await
            .unwrap_err();
        assert_eq!(e, "sh was killed by SIGKILL");
        // The last line with something in it, from stdout or stderr, says why.
        let e = attempt(
            &exec(&[
                "sh",
                "-c",
                "echo checking; echo 'db: connection refused' >&2; echo; exit 2",
            ]),
            &how,
            1,
        )
        .await
        .unwrap_err();
        assert_eq!(e, "sh ended with exit status 2: db: connection refused");
        // Output is read as it comes: a check writing far more than a pipe holds ends.
        let chatty = exec(&[
            "sh",
            "-c",
            "i=0; while [ $i -lt 4000 ]; do echo line $i of a chatty check; i=$((i+1)); done; exit 1",
        ]);
        let e = tokio::time::timeout(Duration::from_secs(20), attempt(&chatty, &how, 1))
            .await
            .expect("not blocked on a full pipe")
            .unwrap_err();
        assert_eq!(
            e,
            "sh ended with exit status 1: line 3999 of a chatty check"
        );
        let e = attempt(&exec(&["/nonexistent"]), &how, 1)
            .await
            .unwrap_err();
        assert!(e.starts_with("cannot run /nonexistent"), "{e}");
    }

    fn exec(cmd: &[&str]) -> Liveness {
        Liveness::Exec {
            command: cmd.iter().map(|s| (*s).to_owned()).collect(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures: 1,
        }
    }

    /// As the agent's own user, without cgroups.
    fn plain(dir: &Path) -> ExecAs {
        ExecAs {
            path: "/usr/bin:/bin".into(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            workdir: dir.to_owned(),
            ..ExecAs::default()
        }
    }

    fn alive(pid: i32) -> bool {
        crate::sys::proc_stat(pid).is_ok_and(|s| s.state != 'Z')
    }

    /// Pids of live processes whose command line is `sleep <arg>`.
    fn sleeping(arg: &str) -> Vec<i32> {
        crate::sys::scan_procs()
            .into_iter()
            .filter(|s| s.state != 'Z')
            .filter(|s| {
                std::fs::read(format!("/proc/{}/cmdline", s.pid))
                    .is_ok_and(|c| c == format!("sleep\0{arg}\0").as_bytes())
            })
            .map(|s| s.pid)
            .collect()
    }

    async fn none_sleeping(arg: &str) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !sleeping(arg).is_empty() {
            assert!(
                std::time::Instant::now() < until,
                "left running: {:?}",
                sleeping(arg)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn what_an_exec_probe_leaves_running_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let how = plain(dir.path());
        // Ends at once, leaving a child behind in its process group.
        let left = exec(&["sh", "-c", "sleep 4711.25 & echo $! > left; exit 0"]);
        assert_eq!(attempt(&left, &how, 1).await, Ok(()));
        let pid: i32 = std::fs::read_to_string(dir.path().join("left"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        none_sleeping("4711.25").await;
        assert!(!alive(pid));
        // Times out with a child of its own: both go.
        let hung = exec(&["sh", "-c", "sleep 4711.5 & sleep 4711.5"]);
        let cut = tokio::time::timeout(Duration::from_millis(300), attempt(&hung, &how, 1)).await;
        assert!(cut.is_err(), "{cut:?}");
        none_sleeping("4711.5").await;
        // Timed out by its own timeout: the reason ends with the last line it wrote,
        // as its other failures do; and it goes, with its children.
        let talks = exec(&["sh", "-c", "echo still checking; sleep 4711.75"]);
        let why = attempt_within(&talks, &how, 1, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(why, "no answer within 500ms: still checking");
        none_sleeping("4711.75").await;
        let silent = exec(&["sleep", "4711.875"]);
        let why = attempt_within(&silent, &how, 1, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(why, "no answer within 300ms");
        none_sleeping("4711.875").await;
        // The node's pid and environment reach the command.
        let env = exec(&[
            "sh",
            "-c",
            "test \"$DROVER_NODE_PID\" = 42 && test -z \"$HOME\"",
        ]);
        assert_eq!(attempt(&env, &how, 42).await, Ok(()));
    }

    #[test]
    fn notices_read_the_lines_acted_on_and_ignore_the_rest() {
        let n = Notice::parse("READY=1\nSTATUS=warming up\nMAINPID=4\nWATCHDOG=1\n");
        assert_eq!(
            n,
            Notice {
                ready: true,
                watchdog: true,
                trigger: false,
                status: Some("warming up".into()),
            }
        );
        assert_eq!(Notice::parse("READY=0\nready=1"), Notice::default());
        let long = format!("STATUS={}\nSTATUS=x{}", "a".repeat(10), "é".repeat(300));
        let n = Notice::parse(&long);
        assert_eq!(
            n.status.as_deref().map(|s| s.chars().count()),
            Some(STATUS_MAX)
        );
        assert!(n.status.unwrap().starts_with('x'), "the last STATUS= wins");
        assert!(Notice::parse("WATCHDOG=trigger").trigger);
    }
}
