//! Exec events from the kernel's process connector (netlink `NETLINK_CONNECTOR`, group
//! `CN_IDX_PROC`): every `execve` on the machine, with the pid and the kernel's
//! `CLOCK_MONOTONIC` time of it.
//!
//! The benches time when programs are exec'd. Polling `/proc` for that costs CPU in
//! proportion to the supervisor's threads (each lists its own children), and the CPU it
//! takes is the measured system's on a busy machine; these events cost nothing until an
//! exec happens, and carry the exact time. Listening needs `CAP_NET_ADMIN`; without it
//! [`ExecEvents::open`] fails and the caller polls instead.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::time::{ClockId, clock_gettime};

use super::procfs;
use super::system::PidSource;

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct cn_msg` without its data.
const CN_MSG: usize = 20;
/// Where the `struct proc_event` starts in a message.
const EVENT: usize = NLMSG_HDR + CN_MSG;

/// One `execve`: the process (thread group leader's pid) and when, on `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exec {
    pub(crate) pid: u32,
    pub(crate) at: Duration,
}

/// A subscription to the machine's exec events.
#[derive(Debug)]
pub(crate) struct ExecEvents {
    fd: OwnedFd,
    /// The longest [`ExecEvents::next`] waits.
    wait: Duration,
}

impl ExecEvents {
    /// Subscribes; events are queued from now on. `wait` bounds each
    /// [`ExecEvents::next`], so that a caller can check whether to stop; it is waited
    /// for with `poll`, whose timeout is precise (a socket's receive timeout is rounded
    /// up to whole clock ticks: 8 ms for 1 ms at 250 Hz).
    pub(crate) fn open(wait: Duration) -> io::Result<Self> {
        // SAFETY: plain socket calls on an fd this function owns.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A burst of process events must not overflow the queue (root may force it).
        let size: libc::c_int = 8 << 20;
        // SAFETY: the option value outlives the call; its size is given.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                size_of_val(&size) as libc::socklen_t,
            );
        }
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: `addr` is a valid sockaddr_nl of the given size.
        if unsafe {
            libc::bind(
                raw,
                (&raw const addr).cast(),
                size_of_val(&addr) as libc::socklen_t,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut msg = Vec::with_capacity(EVENT + 4);
        let len = u32::try_from(EVENT + 4).unwrap_or(u32::MAX);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // data length
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: `msg` is valid for its length.
        if unsafe { libc::send(raw, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, wait })
    }

    /// The next exec event; `None` when none came within the wait given to
    /// [`ExecEvents::open`]. An error (`ENOBUFS`: events were lost) ends the
    /// subscription's usefulness.
    pub(crate) fn next(&self) -> io::Result<Option<Exec>> {
        let mut buf = [0u8; 256];
        let until = Instant::now() + self.wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Whole milliseconds, rounded up.
            let ms = libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(1000);
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                return Ok(None);
            }
            // SAFETY: `buf` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            let n = usize::try_from(n).unwrap_or(0);
            if let Some(exec) = parse(&buf[..n]) {
                return Ok(Some(exec));
            }
        }
    }
}

/// The exec in one process-connector message, if it is one (and the process, not a
/// thread of it, exec'd).
fn parse(msg: &[u8]) -> Option<Exec> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(msg.get(off..off + 4)?.try_into().ok()?))
    };
    // proc_event: what (u32), cpu (u32), timestamp_ns (u64), then the event's data;
    // for an exec: process_pid, process_tgid.
    if u32_at(EVENT)? != PROC_EVENT_EXEC {
        return None;
    }
    let ns = u64::from_ne_bytes(msg.get(EVENT + 8..EVENT + 16)?.try_into().ok()?);
    let pid = u32_at(EVENT + 16)?;
    let tgid = u32_at(EVENT + 20)?;
    (pid == tgid).then_some(Exec {
        pid,
        at: Duration::from_nanos(ns),
    })
}

/// `CLOCK_MONOTONIC` now, the clock of [`Exec::at`].
pub(crate) fn monotonic_now() -> Duration {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(Duration::ZERO, |ts| {
        Duration::new(
            u64::try_from(ts.tv_sec()).unwrap_or(0),
            u32::try_from(ts.tv_nsec()).unwrap_or(0),
        )
    })
}

/// How [`ExecWatch`] learns of execs here, for the report.
pub(crate) fn source() -> &'static str {
    if ExecEvents::open(Duration::from_millis(1)).is_ok() {
        "the kernel's exec events (process connector), timed by the kernel"
    } else {
        "/proc polled every 1 ms for children of the supervising processes"
    }
}

/// A thread that records when each child of the supervising processes that runs the
/// program was exec'd: from [`ExecEvents`] where this process may listen to them, else
/// by polling `/proc` every 1 ms. Dropping it stops the thread.
pub(crate) struct ExecWatch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<(u32, Duration)>>>,
}

impl Drop for ExecWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl ExecWatch {
    /// Watches for `n` children of `sources` exec'ing `argv` (its first element's base
    /// name, then exactly the rest), with times from `t0`. The events are subscribed
    /// to before this returns, so before any exec the caller starts next.
    pub(crate) fn start(
        t0: Instant,
        sources: Vec<PidSource>,
        argv: &[String],
        n: usize,
    ) -> anyhow::Result<Self> {
        let program = Path::new(argv.first().context("no program")?)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let args: Vec<String> = argv[1..].to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let events = ExecEvents::open(Duration::from_millis(20)).ok();
        // `t0` on the events' clock.
        let mono_t0 = monotonic_now().saturating_sub(t0.elapsed());
        let handle = std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let is_program = |pid: u32| procfs::is_program(&procfs::cmdline(pid), &program, &args);
            let mut seen: BTreeMap<u32, Duration> = BTreeMap::new();
            let mut sups: Vec<Option<u32>> = vec![None; sources.len()];
            let resolve = |sups: &mut Vec<Option<u32>>| {
                for (src, sup) in sources.iter().zip(sups.iter_mut()) {
                    if sup.is_none() {
                        *sup = src.get();
                    }
                }
            };
            match events {
                Some(events) => {
                    // Execs seen before their supervisor's pid was known (a pidfile).
                    let mut pending: Vec<(u32, Duration)> = Vec::new();
                    while seen.len() < n && !flag.load(Ordering::SeqCst) {
                        let next = match events.next() {
                            Ok(next) => next,
                            Err(e) => {
                                eprintln!(
                                    "  exec events lost ({e}): this run's exec times are incomplete"
                                );
                                break;
                            }
                        };
                        if let Some(exec) = next
                            && is_program(exec.pid)
                        {
                            pending.push((exec.pid, exec.at.saturating_sub(mono_t0)));
                        }
                        resolve(&mut sups);
                        pending.retain(|(pid, at)| {
                            let Some(st) = procfs::stat(*pid) else {
                                return false;
                            };
                            if sups.contains(&Some(st.ppid)) {
                                seen.insert(*pid, *at);
                                return false;
                            }
                            sups.iter().any(Option::is_none)
                        });
                    }
                }
                None => {
                    while seen.len() < n && !flag.load(Ordering::SeqCst) {
                        resolve(&mut sups);
                        for sup in sups.iter().flatten() {
                            for pid in procfs::children(*sup) {
                                if !seen.contains_key(&pid) && is_program(pid) {
                                    seen.insert(pid, t0.elapsed());
                                }
                            }
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            let mut v: Vec<(u32, Duration)> = seen.into_iter().collect();
            v.sort_by_key(|(_, d)| *d);
            v
        });
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Waits up to 5 s for the watcher to have seen all `n` (polling may lag by a
    /// poll), then stops it: the (pid, exec time) of each, by time. Fails unless it saw
    /// `n`.
    pub(crate) fn finish(mut self, n: usize) -> anyhow::Result<Vec<(u32, Duration)>> {
        let handle = self.handle.take().context("the exec watcher is gone")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stop.store(true, Ordering::SeqCst);
        let seen = handle
            .join()
            .map_err(|_| anyhow::anyhow!("the exec watcher panicked"))?;
        if seen.len() < n {
            bail!("the exec watcher saw {} of {n} programs", seen.len());
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, ns: u64, pid: u32, tgid: u32) -> Vec<u8> {
        let mut m = vec![0u8; EVENT];
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&ns.to_ne_bytes());
        m.extend_from_slice(&pid.to_ne_bytes());
        m.extend_from_slice(&tgid.to_ne_bytes());
        m
    }

    #[test]
    fn only_a_processs_own_exec_is_an_exec() {
        assert_eq!(
            parse(&message(PROC_EVENT_EXEC, 1_500, 42, 42)),
            Some(Exec {
                pid: 42,
                at: Duration::from_nanos(1_500)
            })
        );
        // A fork event, a thread's exec, a cut message.
        assert_eq!(parse(&message(1, 1_500, 42, 42)), None);
        assert_eq!(parse(&message(PROC_EVENT_EXEC, 1_500, 43, 42)), None);
        assert_eq!(
            parse(&message(PROC_EVENT_EXEC, 1_500, 42, 42)[..EVENT + 12]),
            None
        );
    }

    #[test]
    fn a_child_exec_is_seen_with_its_time_when_events_can_be_had() {
        let events = match ExecEvents::open(Duration::from_millis(200)) {
            Ok(events) => events,
            // Without CAP_NET_ADMIN the benches poll /proc instead; root must subscribe.
            Err(e) if !nix::unistd::Uid::effective().is_root() => {
                eprintln!("skipped: exec events need CAP_NET_ADMIN ({e})");
                return;
            }
            Err(e) => panic!("root cannot subscribe to exec events: {e}"),
        };
        let before = monotonic_now();
        let child = std::process::Command::new("/bin/true")
            .spawn()
            .expect("/bin/true runs");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = loop {
            assert!(Instant::now() < deadline, "no exec event for {pid}");
            if let Some(e) = events.next().expect("events")
                && e.pid == pid
            {
                break e;
            }
        };
        let mut child = child;
        child.wait().expect("reaped");
        assert!(seen.at >= before && seen.at <= monotonic_now(), "{seen:?}");
    }
}
