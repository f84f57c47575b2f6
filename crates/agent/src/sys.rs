//! Linux process plumbing for the agent: reading `/proc`, process identities that
//! survive PID reuse, pidfds, process-group signalling, orphan reaping, CPU pinning and
//! spawning with clean signals.
//!
//! Everything here is Linux-only and assumes the agent runs as root in the PID
//! namespace whose `/proc` it reads.
//!
//! # Identities and PID reuse
//!
//! A bare pid is not an identity: once a process is reaped, its pid can be handed to
//! an unrelated process (`kernel.pid_max` is often only 32768). [`ProcId`] pairs the
//! pid with the process's start time in clock ticks since boot, which never changes
//! for a process and practically never repeats for a pid within one boot, so
//! [`is_alive`] cannot mistake a recycled pid for the process the agent started. Across
//! a reboot it can (ticks start again at zero): what is kept on disk names the boot too
//! ([`boot_id`]). For processes that are
//! not the agent's children (adopted after an agent restart), [`PidFd::open_id`] pins
//! the identity in a pidfd: the kernel then tells us of the exit ([`PidFd::exited`])
//! and signals sent through it ([`PidFd::signal`]) can never reach a pid's next owner.
//!
//! # Zombies
//!
//! A process that has exited but not been waited for is a zombie: it keeps its pid,
//! its process group and its `/proc` entry until its parent reaps it. Everything here
//! that asks "is it running" ([`is_alive`], [`group_alive`], [`descendants`]) counts
//! zombies as gone. Note that `kill`/`killpg` still succeed on a zombie, so
//! [`signal_group`] returns `Ok(true)` for a group whose members have all exited but
//! not yet been reaped.
//!
//! Orphans are re-parented to the nearest ancestor marked as a child subreaper
//! ([`set_child_subreaper`]), or else to PID 1. Do not count on PID 1 reaping them
//! promptly: in containers and micro-VMs it is often a small supervisor that reaps
//! orphans lazily, on a timer, or not at all. An agent that is a subreaper must reap
//! the orphans it inherits itself, with [`reap_orphans`], without stealing the exit
//! statuses of the children `tokio::process` tracks.
//!
//! # Spawning pinned children without `fork`
//!
//! `std::process::Command` (and so `tokio::process::Command`) uses `posix_spawn`
//! (`clone(CLONE_VM | CLONE_VFORK)`: no copy of the agent's page tables) unless
//! something forces the `fork` path: a `pre_exec` hook, `uid`/`gid`/`groups`, or an
//! overridden `PATH` combined with a program name that needs a `PATH` lookup. To start
//! a child pinned to some CPUs from its first instruction without a `pre_exec` hook,
//! pin the *spawning thread*, spawn, and restore the thread's mask: the child inherits
//! the mask of the thread that created it.
//!
//! ```text
//! let previous = sys::set_thread_affinity(&[2, 3])?;
//! let spawned = std::process::Command::new("/usr/bin/node-binary").spawn();
//! sys::restore_thread_affinity(&previous)?;
//! let _child = spawned?;
//! ```
//!
//! The three calls must run on one thread with no `.await` between them (a task can
//! move between worker threads at an `.await`), and nothing on that thread may start
//! threads meanwhile, as those would inherit the pinned mask too.
//!
//! The agent spawns its nodes with [`spawn_clean`] rather than `Command`: the same
//! `posix_spawn`, but with every signal reset to its default disposition (std resets
//! only SIGPIPE; glibc leaves ignored signals ignored and sets its own two internal
//! real-time signals to ignored in the child), and it reaps them through pidfds
//! ([`wait_child`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sched::CpuSet;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, SysconfVar};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Parsed `/proc/<pid>/stat`: the fields the agent uses.
///
/// `comm` sits in parentheses and may itself contain spaces and `)`, so the line is
/// split at the *last* `)`; non-UTF-8 bytes in it are replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id (field 1).
    pub pid: i32,
    /// Command name, at most 15 bytes, as the kernel truncates it (field 2).
    pub comm: String,
    /// State: `R` running, `S` sleeping, `D` disk sleep, `Z` zombie, `T` stopped,
    /// `t` traced, `X` dead, `I` idle (field 3).
    pub state: char,
    /// Parent's pid (field 4).
    pub ppid: i32,
    /// Process group id (field 5).
    pub pgrp: i32,
    /// Session id (field 6).
    pub session: i32,
    /// User-mode CPU time of all threads, in clock ticks (field 14).
    pub utime_ticks: u64,
    /// Kernel-mode CPU time of all threads, in clock ticks (field 15).
    pub stime_ticks: u64,
    /// Start time, in clock ticks since boot (field 22).
    pub starttime_ticks: u64,
    /// Resident set size, in pages (field 24).
    pub rss_pages: i64,
}

/// Reads a small file of `/proc` or of a cgroup: these report a size of 0, which makes
/// `fs::read` probe with reads of 32 bytes and grow from there (five or six reads for a
/// `stat` line); one buffer of a page takes such a file in one read and one more for the
/// end.
pub fn read_pseudo(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = fs::File::open(path)?;
    let mut out = Vec::with_capacity(PAGE);
    loop {
        let len = out.len();
        out.resize(len + PAGE, 0);
        match f.read(&mut out[len..]) {
            Ok(0) => {
                out.truncate(len);
                return Ok(out);
            }
            Ok(n) => out.truncate(len + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => out.truncate(len),
            Err(e) => return Err(e),
        }
    }
}

/// [`read_pseudo`] as text; invalid UTF-8 is an error, as with `fs::read_to_string`.
pub fn read_pseudo_text(path: &Path) -> io::Result<String> {
    String::from_utf8(read_pseudo(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The buffer [`read_pseudo`] reads with.
const PAGE: usize = 4096;

/// Reads and parses `/proc/<pid>/stat`.
///
/// Fails with `NotFound` (or `ESRCH`) once the process has been reaped, and with
/// `InvalidData` if the file cannot be parsed.
pub fn proc_stat(pid: i32) -> io::Result<ProcStat> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid pid {pid}"),
        ));
    }
    parse_stat(&read_pseudo(Path::new(&format!("/proc/{pid}/stat")))?)
}

fn parse_stat(raw: &[u8]) -> io::Result<ProcStat> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc stat line: {what}"),
        )
    };
    let open = raw
        .iter()
        .position(|&b| b == b'(')
        .ok_or_else(|| bad("no '('"))?;
    let close = raw
        .iter()
        .rposition(|&b| b == b')')
        .ok_or_else(|| bad("no ')'"))?;
    if close < open {
        return Err(bad("')' before '('"));
    }
    let pid = std::str::from_utf8(&raw[..open])
        .map_err(|_| bad("pid is not utf-8"))?
        .trim()
        .parse()
        .map_err(|_| bad("bad pid"))?;
    let comm = String::from_utf8_lossy(&raw[open + 1..close]).into_owned();
    let rest = std::str::from_utf8(&raw[close + 1..]).map_err(|_| bad("fields are not utf-8"))?;
    // Index 0 of `fields` is field 3 (state) of proc_pid_stat(5).
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .copied()
            .ok_or_else(|| bad("too few fields"))
    };
    fn num<T: std::str::FromStr>(s: &str, name: &str) -> io::Result<T> {
        s.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed /proc stat line: bad {name} {s:?}"),
            )
        })
    }
    let mut state = field(3)?.chars();
    let (Some(state), None) = (state.next(), state.next()) else {
        return Err(bad("bad state"));
    };
    Ok(ProcStat {
        pid,
        comm,
        state,
        ppid: num(field(4)?, "ppid")?,
        pgrp: num(field(5)?, "pgrp")?,
        session: num(field(6)?, "session")?,
        utime_ticks: num(field(14)?, "utime")?,
        stime_ticks: num(field(15)?, "stime")?,
        starttime_ticks: num(field(22)?, "starttime")?,
        rss_pages: num(field(24)?, "rss")?,
    })
}

/// True for the states of a process that has exited (zombie `Z`, dead `X`).
fn is_dead_state(state: char) -> bool {
    matches!(state, 'Z' | 'X')
}

/// Every process in `/proc` that could be read (processes that vanish mid-scan are
/// skipped). Threads other than thread-group leaders are not listed.
pub(crate) fn scan_procs() -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        proc_stat(pid).ok()
    })
    .collect()
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the `*_ticks` fields (100 on every mainstream
/// Linux). Cached; 100 if sysconf fails.
pub fn clock_ticks_per_sec() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| sysconf_u64(SysconfVar::CLK_TCK).unwrap_or(100))
}

/// `sysconf(_SC_PAGESIZE)`: the unit of [`ProcStat::rss_pages`]. Cached; 4096 if
/// sysconf fails.
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| sysconf_u64(SysconfVar::PAGE_SIZE).unwrap_or(4096))
}

fn sysconf_u64(var: SysconfVar) -> Option<u64> {
    let v = nix::unistd::sysconf(var).ok().flatten()?;
    u64::try_from(v).ok().filter(|&v| v > 0)
}

/// Resident set size in bytes.
pub fn rss_bytes(stat: &ProcStat) -> u64 {
    u64::try_from(stat.rss_pages)
        .unwrap_or(0)
        .saturating_mul(page_size())
}

/// CPU time (user + system, all threads) in milliseconds.
pub fn cpu_ms(stat: &ProcStat) -> u64 {
    stat.utime_ticks
        .saturating_add(stat.stime_ticks)
        .saturating_mul(1000)
        / clock_ticks_per_sec()
}

/// A process identity that survives PID reuse: the pid plus the process's start time
/// in clock ticks since boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcId {
    /// Process id.
    pub pid: i32,
    /// [`ProcStat::starttime_ticks`] of that process.
    pub start_ticks: u64,
}

/// The [`ProcId`] of the process that currently holds `pid` (zombie or not).
pub fn proc_id(pid: i32) -> io::Result<ProcId> {
    let stat = proc_stat(pid)?;
    Ok(ProcId {
        pid,
        start_ticks: stat.starttime_ticks,
    })
}

/// `CLOCK_BOOTTIME` in clock ticks: the clock and unit of [`ProcStat::starttime_ticks`]
/// (the kernel stamps a new process with the boot-time clock and `/proc` divides it down
/// to ticks, both in the reader's time namespace, as this clock is).
fn boottime_ticks() -> Option<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is valid for writes.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut now) } != 0 {
        return None;
    }
    let ns = u64::try_from(now.tv_sec)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(now.tv_nsec).ok()?)?;
    // The kernel converts this way only where a tick is a whole number of nanoseconds
    // (100 ticks a second, as on every architecture Linux runs on today); elsewhere
    // `/proc` says.
    let ticks = clock_ticks_per_sec();
    (ticks > 0 && 1_000_000_000 % ticks == 0).then(|| ns / (1_000_000_000 / ticks))
}

/// Runs `spawn`, which creates one process and returns its pid, and gives that pid
/// with the process's start time ([`ProcStat::starttime_ticks`]) when the clock read
/// the same tick before and after `spawn`: the process was created between the two
/// readings, so no `/proc` read is needed. `None` when the clock crossed a tick
/// meanwhile (then [`proc_id`] reads it). A `/proc` read is most of what a spawn costs
/// the agent besides the spawn itself.
pub fn spawn_timed(spawn: impl FnOnce() -> io::Result<i32>) -> io::Result<(i32, Option<u64>)> {
    let before = boottime_ticks();
    let pid = spawn()?;
    let start = match (before, boottime_ticks()) {
        (Some(b), Some(a)) if a == b => Some(b),
        _ => None,
    };
    Ok((pid, start))
}

/// True if a process with this pid exists, has this start time (so a recycled PID is
/// never mistaken for it), and is not a zombie.
pub fn is_alive(id: ProcId) -> bool {
    proc_stat(id.pid).is_ok_and(|s| s.starttime_ticks == id.start_ticks && !is_dead_state(s.state))
}

/// The process's soft limit on open files (`u64::MAX` when unlimited).
pub fn open_file_limit() -> u64 {
    // SAFETY: getrlimit writes the limits into the struct it is given.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return u64::MAX;
        }
        if lim.rlim_cur == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            lim.rlim_cur
        }
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`, a random UUID the kernel makes
/// at boot), read once. A [`ProcId`] only names a process within one boot: after a
/// reboot, start times since boot begin again at zero, and a boot much like the last
/// one hands out the same pids at the same ticks to other programs.
pub fn boot_id() -> Option<&'static str> {
    static BOOT_ID: OnceLock<Option<String>> = OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .as_deref()
}

/// Boot time in milliseconds since the Unix epoch, from the `btime` line of
/// `/proc/stat` (whole seconds). Cached after the first successful read, so that
/// values derived from it stay consistent while the wall clock is adjusted.
pub fn boot_time_epoch_ms() -> Option<u64> {
    static BOOT: OnceLock<u64> = OnceLock::new();
    if let Some(&ms) = BOOT.get() {
        return Some(ms);
    }
    let text = fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(*BOOT.get_or_init(|| secs.saturating_mul(1000)))
}

/// When the process started, in milliseconds since the Unix epoch. Accurate to about a
/// second (`btime` has whole seconds); for display, not for identity, which is
/// [`ProcId`]'s job. Does not check that the process still exists.
pub fn start_time_epoch_ms(id: ProcId) -> Option<u64> {
    let since_boot = id.start_ticks.saturating_mul(1000) / clock_ticks_per_sec();
    Some(boot_time_epoch_ms()?.saturating_add(since_boot))
}

/// A pidfd: a file descriptor that refers to one process, not to a pid. Used for
/// processes that are not the agent's children (adopted after an agent restart), to
/// learn of their exit without polling and to signal them without racing PID reuse.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for the process that currently holds `pid` (`pidfd_open(2)`,
    /// Linux 5.3+). Works on zombies; fails with `ESRCH` once the process is reaped.
    /// The descriptor is close-on-exec.
    pub fn open(pid: i32) -> io::Result<Self> {
        if pid <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid pid {pid}"),
            ));
        }
        let flags: libc::c_uint = 0;
        // SAFETY: pidfd_open takes a pid and a flags word by value and touches no
        // memory of ours.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = RawFd::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
        // SAFETY: the kernel has just returned this descriptor: it is open, and nothing
        // else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Opens a pidfd for `id`, checking after the open that `id.pid` still belongs to
    /// the process that started at `id.start_ticks`: fails with `NotFound` if that
    /// process is gone and its pid was reaped (and perhaps reused). The process may be
    /// a zombie; [`PidFd::exited`] then resolves at once.
    pub fn open_id(id: ProcId) -> io::Result<Self> {
        let gone = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {} (start {}) is gone", id.pid, id.start_ticks),
            )
        };
        let fd = Self::open(id.pid).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                gone()
            } else {
                e
            }
        })?;
        // The fd refers to whichever process held the pid at the open; if the pid
        // still shows the expected start time now, that process held it throughout.
        match proc_stat(id.pid) {
            Ok(s) if s.starttime_ticks == id.start_ticks => Ok(fd),
            _ => Err(gone()),
        }
    }

    /// Resolves once the process has exited (whether or not it has been reaped, and by
    /// whom). Must be called within a Tokio runtime with I/O enabled. Cancel-safe; may
    /// be awaited repeatedly and concurrently.
    pub async fn exited(&self) -> io::Result<()> {
        // Each wait registers its own duplicate with the reactor, so that concurrent
        // or repeated calls never clash over one registration.
        let dup = self.0.try_clone()?;
        // SAFETY: `dup` is an OwnedFd moved into the AsyncFd: it stays open, refers to
        // the same pidfd and keeps its number until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }?;
        let _ready = fd.readable().await?;
        Ok(())
    }

    /// A second descriptor for the same process.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// Sends `sig` to the process (`pidfd_send_signal(2)`). Unlike `kill(pid)`, this
    /// can never reach another process that later got the same pid. Fails with `ESRCH`
    /// once the process has been reaped; succeeds on a zombie.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        self.send_signal(sig, 0)
    }

    /// `pidfd_send_signal(2)` with `flags`.
    fn send_signal(&self, sig: Signal, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: the arguments are a descriptor we own, a signal number, a null
        // siginfo pointer (documented as "act like kill(2)") and a flags word.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                flags,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl PidFd {
    /// Sends `sig` to the process group of this process
    /// (`pidfd_send_signal(PIDFD_SIGNAL_PROCESS_GROUP)`, Linux 6.9+): unlike `killpg`,
    /// it cannot reach a group whose id was freed and reused. Fails with `ESRCH` once
    /// the process has been reaped and with `EINVAL` on older kernels.
    pub fn signal_group(&self, sig: Signal) -> io::Result<()> {
        /// `PIDFD_SIGNAL_PROCESS_GROUP` of `<linux/pidfd.h>`.
        const PROCESS_GROUP: libc::c_uint = 1 << 2;
        self.send_signal(sig, PROCESS_GROUP)
    }
}

/// Signals the process group led by `leader` without ever aiming at a group id that
/// may have been reused: through the leader's pidfd (Linux 6.9+); else with `killpg`
/// while the leader still holds its pid (alive or an unreaped zombie, checked by start
/// time); else, the leader being gone, each remaining member found in `/proc`, through
/// a pidfd, checked after the open to still be in the group. Returns whether any
/// process was signalled.
pub fn signal_led_group(leader: ProcId, pidfd: Option<&PidFd>, sig: Signal) -> io::Result<bool> {
    check_pgid(leader.pid)?;
    if let Some(fd) = pidfd {
        match fd.signal_group(sig) {
            Ok(()) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return signal_members(leader, sig),
            Err(_) => {}
        }
    }
    if proc_stat(leader.pid).is_ok_and(|s| s.starttime_ticks == leader.start_ticks) {
        return signal_group(leader.pid, sig);
    }
    signal_members(leader, sig)
}

/// The members of the group `leader` led, leader gone: each through a pidfd. Only
/// processes started after the leader count, as the group's members must have.
fn signal_members(leader: ProcId, sig: Signal) -> io::Result<bool> {
    let mut any = false;
    for s in scan_procs() {
        if s.pgrp != leader.pid || s.starttime_ticks < leader.start_ticks || is_dead_state(s.state)
        {
            continue;
        }
        let Ok(fd) = PidFd::open(s.pid) else {
            continue;
        };
        if proc_stat(s.pid)
            .is_ok_and(|now| now.starttime_ticks == s.starttime_ticks && now.pgrp == leader.pid)
            && fd.signal(sig).is_ok()
        {
            any = true;
        }
    }
    Ok(any)
}

/// Marks close-on-exec every descriptor from 3 up that this process holds without the
/// flag: those it inherited (a pipe a shell, `ssh` or a CI step handed down and waits
/// to see closed), as its own all have it. No node, log keeper or probe then inherits
/// one, and such a pipe ends with the agent, not with the last node. Returns the
/// descriptors changed.
pub fn cloexec_inherited() -> io::Result<Vec<RawFd>> {
    let mut changed = Vec::new();
    for entry in fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
            .filter(|&fd| fd > 2)
        else {
            continue;
        };
        // SAFETY: F_GETFD and F_SETFD only read and set the descriptor's flags; one
        // that was closed meanwhile (the listing's own) fails harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0
                && flags & libc::FD_CLOEXEC == 0
                && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) == 0
            {
                changed.push(fd);
            }
        }
    }
    Ok(changed)
}

/// Makes every signal this process inherited as ignored (`SIG_IGN`, e.g. SIGHUP under
/// `nohup`) handled by a handler that does nothing instead: the agent still ignores
/// it, but `exec` resets a handled signal to its default in the nodes, where an
/// ignored one would stay ignored. Returns the signals changed. SIGKILL and SIGSTOP
/// cannot be ignored; the real-time signals glibc keeps for itself are skipped.
pub fn unignore_inherited_signals() -> Vec<i32> {
    extern "C" fn nothing(_: libc::c_int) {}
    let mut changed = Vec::new();
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: sigaction_t is plain old data; all-zero is a valid value.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only reads the current one into `old`.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
            // glibc keeps two real-time signals for itself and refuses them here.
            if reset_reserved_signal(sig) {
                changed.push(sig);
            }
            continue;
        }
        if old.sa_sigaction != libc::SIG_IGN {
            continue;
        }
        // SAFETY: as above.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: `act` is a valid action whose handler is async-signal-safe (it does
        // nothing); the mask is empty from zeroing.
        if unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) } == 0 {
            changed.push(sig);
        }
    }
    changed
}

/// For a signal glibc keeps for itself (its `SIGCANCEL` and `SIGSETXID`, which it
/// gives handlers of its own when it needs them), inherited as ignored: sets it to its
/// default with the raw system call. True if it was changed.
fn reset_reserved_signal(sig: libc::c_int) -> bool {
    /// The kernel's `struct sigaction` (x86_64, aarch64).
    #[repr(C)]
    struct KernelSigaction {
        handler: libc::c_ulong,
        flags: libc::c_ulong,
        restorer: libc::c_ulong,
        mask: u64,
    }
    let mut old = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: a null new action only reads the current one into `old`, a valid
    // kernel sigaction; the last argument is the size of its mask.
    let read = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<KernelSigaction>(),
            &mut old,
            8usize,
        )
    };
    if read != 0 || old.handler != libc::SIG_IGN as libc::c_ulong {
        return false;
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL as libc::c_ulong,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: SIG_DFL needs no handler or restorer; the structure is valid.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &dfl,
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        ) == 0
    }
}

/// What [`spawn_clean`] starts.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// The program: a path, or a name looked up in `path` (the node's `PATH`).
    pub program: &'a str,
    /// The child's `argv[0]`, when it is not `program` (a program run through
    /// `/proc/self/exe` keeps its own name in `ps`).
    pub argv0: Option<&'a str>,
    /// The arguments after the program.
    pub args: &'a [String],
    /// The whole environment, as `KEY=VALUE`.
    pub env: Vec<String>,
    /// The directories a program name is looked up in.
    pub path: &'a str,
    /// The working directory.
    pub cwd: &'a Path,
    /// What becomes the child's stdout and stderr (stdin is `/dev/null`).
    pub stdout: BorrowedFd<'a>,
    /// See `stdout`.
    pub stderr: BorrowedFd<'a>,
    /// User, groups, capabilities and limits to apply before exec (see
    /// [`crate::exec`]); `None` or an empty plan spawns with `posix_spawn` (unless
    /// `cgroup` is given).
    pub exec: Option<&'a crate::exec::Plan>,
    /// The cgroup v2 the child is to start in (see [`crate::exec::spawn`]), if any.
    pub cgroup: Option<IntoCgroup<'a>>,
    /// `cgroup.procs` files (cgroup v1) the child moves itself into before anything
    /// else (see [`crate::limits`]).
    pub join: &'a [BorrowedFd<'a>],
}

/// Where [`SpawnSpec::cgroup`] puts the child.
#[derive(Debug, Clone, Copy)]
pub struct IntoCgroup<'a> {
    /// The cgroup's directory.
    pub dir: BorrowedFd<'a>,
    /// Whether the child may be created in it (see [`crate::cgroup::Ready::fresh`]);
    /// otherwise it moves itself in before it execs.
    pub create: bool,
}

/// A [`SpawnSpec`]'s strings as C strings and the pointer arrays `execve` takes,
/// prepared before the child exists.
pub(crate) struct CArgs {
    pub(crate) program: std::ffi::CString,
    _argv: Vec<std::ffi::CString>,
    _envp: Vec<std::ffi::CString>,
    pub(crate) argv_p: Vec<*mut libc::c_char>,
    pub(crate) envp_p: Vec<*mut libc::c_char>,
    pub(crate) cwd: std::ffi::CString,
}

impl CArgs {
    pub(crate) fn new(spec: &SpawnSpec<'_>) -> io::Result<Self> {
        use std::ffi::CString;
        let nul = |s: &str| {
            CString::new(s).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{s:?} contains a NUL byte"),
                )
            })
        };
        let program = resolve_program(spec.program, spec.path)?;
        let program =
            CString::new(program.into_os_string().into_encoded_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "program contains a NUL byte")
            })?;
        let argv: Vec<CString> = std::iter::once(nul(spec.argv0.unwrap_or(spec.program)))
            .chain(spec.args.iter().map(|a| nul(a)))
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = spec.env.iter().map(|e| nul(e)).collect::<io::Result<_>>()?;
        let cwd = CString::new(spec.cwd.as_os_str().as_encoded_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "working directory contains a NUL byte",
            )
        })?;
        let mut argv_p: Vec<*mut libc::c_char> =
            argv.iter().map(|c| c.as_ptr().cast_mut()).collect();
        argv_p.push(std::ptr::null_mut());
        let mut envp_p: Vec<*mut libc::c_char> =
            envp.iter().map(|c| c.as_ptr().cast_mut()).collect();
        envp_p.push(std::ptr::null_mut());
        Ok(Self {
            program,
            _argv: argv,
            _envp: envp,
            argv_p,
            envp_p,
            cwd,
        })
    }
}

/// A program name looked up in `path` as `execvp` would: the first directory holding
/// an executable file of that name; a name with a `/` is used as it is.
pub fn resolve_program(program: &str, path: &str) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(std::path::PathBuf::from(program));
    }
    let mut found_any = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if let Ok(meta) = fs::metadata(&candidate)
            && meta.is_file()
        {
            if meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
            found_any.get_or_insert(candidate);
        }
    }
    // A file that is there but not executable reports EACCES on exec, as execvp.
    found_any.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

/// What an exec of `program` (searched in `path` when it has no `/`) would find wrong
/// before running it: no such file (or its interpreter missing, ENOENT), or not an
/// executable file (EACCES). For a node started through a shell, whose own exec would
/// turn those into an exit code. A relative path with a `/` is left to the exec: it
/// may name a file the spawn is yet to write in the working directory.
pub fn check_executable(program: &str, path: &str) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let file = resolve_program(program, path)?;
    if file.is_relative() {
        return Ok(file);
    }
    let meta = fs::metadata(&file)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    if missing_interpreter(&file).is_some() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    Ok(file)
}

/// Spawns a child with `posix_spawn` (`CLONE_VM | CLONE_VFORK`: no copy of the
/// agent's page tables) in a process group of its own, with an empty signal mask and
/// EVERY signal at its default disposition: glibc's `posix_spawn` would otherwise
/// leave ignored what the agent ignores and set its two internal real-time signals to
/// ignored, and std's `Command` resets only SIGPIPE. Returns the child's pid; exec
/// errors (`ENOENT`, `EACCES`, `ENOEXEC`, ...) are the error. The child inherits the
/// calling thread's CPU affinity. Reap it with [`wait_child`]. A spec with a
/// non-empty [`SpawnSpec::exec`] plan, a [`SpawnSpec::cgroup`] or cgroups to
/// [`SpawnSpec::join`] is spawned by [`crate::exec::spawn`] instead.
pub fn spawn_clean(spec: &SpawnSpec<'_>) -> io::Result<i32> {
    if let Some(plan) = spec.exec.filter(|p| !p.is_empty()) {
        return crate::exec::spawn(spec, plan);
    }
    if spec.cgroup.is_some() || !spec.join.is_empty() {
        return crate::exec::spawn(spec, &crate::exec::Plan::default());
    }
    // Kept whole: the pointer arrays point into its strings.
    let c = CArgs::new(spec)?;
    let check = |ret: libc::c_int| {
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(ret))
        }
    };
    // SAFETY: the attribute and file-action objects are initialised before use and
    // destroyed on every path by the guards; every pointer passed points into the
    // CStrings and vectors above, which outlive the posix_spawn call.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        let actions = Guard(&mut actions, |a| {
            libc::posix_spawn_file_actions_destroy(a);
        });
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        check(libc::posix_spawnattr_init(&mut attr))?;
        let attr = Guard(&mut attr, |a| {
            libc::posix_spawnattr_destroy(a);
        });
        check(libc::posix_spawn_file_actions_addopen(
            actions.0,
            0,
            c"/dev/null".as_ptr(),
            libc::O_RDONLY,
            0,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            actions.0,
            spec.stdout.as_raw_fd(),
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            actions.0,
            spec.stderr.as_raw_fd(),
            2,
        ))?;
        check(libc::posix_spawn_file_actions_addchdir_np(
            actions.0,
            c.cwd.as_ptr(),
        ))?;
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        // Every bit, also those of glibc's internal signals, which sigfillset leaves
        // out: set in the raw mask.
        let mut all: libc::sigset_t = std::mem::zeroed();
        std::ptr::write_bytes(
            (&raw mut all).cast::<u8>(),
            0xff,
            size_of::<libc::sigset_t>(),
        );
        check(libc::posix_spawnattr_setsigmask(attr.0, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(attr.0, &all))?;
        check(libc::posix_spawnattr_setpgroup(attr.0, 0))?;
        let flags = libc::POSIX_SPAWN_SETPGROUP
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
        check(libc::posix_spawnattr_setflags(
            attr.0,
            libc::c_short::try_from(flags).unwrap_or_default(),
        ))?;
        let mut pid: libc::pid_t = 0;
        check(libc::posix_spawn(
            &mut pid,
            c.program.as_ptr(),
            actions.0,
            attr.0,
            c.argv_p.as_ptr(),
            c.envp_p.as_ptr(),
        ))?;
        Ok(pid)
    }
}

/// Runs `drop` on the pointer when it goes out of scope.
struct Guard<T>(*mut T, unsafe fn(*mut T));

impl<T> Drop for Guard<T> {
    fn drop(&mut self) {
        // SAFETY: the guard was made right after the object's successful init.
        unsafe { (self.1)(self.0) }
    }
}

/// Waits for the child behind `fd` (spawned by this process) to exit and reaps it.
/// Cancel-safe until the exit; then the status is collected at once.
pub async fn wait_child(fd: &PidFd) -> io::Result<ExitKind> {
    wait_child_owned(fd.try_clone()?).await
}

/// As [`wait_child`], on a descriptor given to it, which it registers as it is: an
/// exit watcher holds one per node, and a duplicate would be one more descriptor in
/// the table every spawn copies.
pub async fn wait_child_owned(fd: PidFd) -> io::Result<ExitKind> {
    let id = libc::id_t::try_from(fd.as_raw_fd()).map_err(io::Error::other)?;
    // SAFETY: the OwnedFd moves into the AsyncFd: it stays open and keeps its number
    // (`id`) until the AsyncFd drops it at the end of this function.
    let fd = unsafe { AsyncFd::register_with_interest(fd.0, Interest::READABLE) }?;
    loop {
        let _ready = fd.readable().await?;
        if let Some(kind) = wait_exited(libc::P_PIDFD, id) {
            return Ok(kind);
        }
        // Readable but not collectable: someone else reaped it.
        if !is_child(id) {
            return Err(io::Error::other("the child was reaped elsewhere"));
        }
        tokio::task::yield_now().await;
    }
}

/// Reaps the child behind `fd` if it has exited; `None` while it runs (or once it
/// has been reaped).
pub fn reap_exited(fd: &PidFd) -> Option<ExitKind> {
    let id = libc::id_t::try_from(fd.as_raw_fd()).ok()?;
    wait_exited(libc::P_PIDFD, id)
}

/// True while waitid still knows the child behind pidfd `id` (it has not been reaped).
fn is_child(id: libc::id_t) -> bool {
    // SAFETY: siginfo_t is plain old data.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid and writable; WNOWAIT leaves the child waitable.
    unsafe {
        libc::waitid(
            libc::P_PIDFD,
            id,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
    }
}

/// The cause of an OS error as a lower-case phrase without the error number
/// ("no such file or directory"), for messages that name their subject first.
pub fn cause(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(n) => {
            let desc = Errno::from_raw(n).desc();
            let mut c = desc.chars();
            match c.next() {
                Some(f) => f.to_lowercase().chain(c).collect(),
                None => err.to_string(),
            }
        }
        None => err.to_string(),
    }
}

/// [`cause`] of a failed exec of `program` (searched in `path` when it has no `/`,
/// relative to `cwd` when it has one). An exec of a file that is there fails with
/// "no such file or directory" when the interpreter its `#!` line or its ELF header
/// names is missing; that interpreter is then named, since the program is not what
/// is missing.
pub fn exec_cause(err: &io::Error, program: &str, path: &str, cwd: &Path) -> String {
    let cause = cause(err);
    if err.raw_os_error() != Some(libc::ENOENT) {
        return cause;
    }
    let file = match resolve_program(program, path) {
        Ok(p) => cwd.join(p),
        Err(_) => return cause,
    };
    match missing_interpreter(&file) {
        Some(interp) => format!("{cause} (the file is there; its interpreter {interp} is not)"),
        None => cause,
    }
}

/// The interpreter that `file`'s `#!` line or ELF `PT_INTERP` header names, if that
/// interpreter does not exist.
fn missing_interpreter(file: &Path) -> Option<String> {
    interpreter(file).filter(|i| !Path::new(i).exists())
}

/// The interpreter that `file`'s `#!` line or ELF `PT_INTERP` header (ELF64,
/// little-endian) names.
fn interpreter(file: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(file).ok()?;
    let mut head = [0u8; 256];
    let n = f.read(&mut head).ok()?;
    let head = &head[..n];
    let interp = if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|&b| b == b'\n').next()?;
        let word = line
            .split(u8::is_ascii_whitespace)
            .find(|w| !w.is_empty())?;
        String::from_utf8_lossy(word).into_owned()
    } else if head.starts_with(b"\x7fELF\x02\x01") && head.len() >= 0x40 {
        // ELF64, little-endian: the program headers, for the PT_INTERP one.
        let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        let phoff = u64_of(&head[0x20..0x28]);
        let (phentsize, phnum) = (u64::from(u16_at(0x36)), u64::from(u16_at(0x38)));
        let mut found = None;
        for i in 0..phnum.min(64) {
            let mut ph = [0u8; 56];
            let at = i.checked_mul(phentsize)?.checked_add(phoff)?;
            f.seek(SeekFrom::Start(at)).ok()?;
            f.read_exact(&mut ph).ok()?;
            if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == libc::PT_INTERP {
                let (offset, size) = (u64_of(&ph[8..16]), u64_of(&ph[32..40]).min(4096));
                let mut name = vec![0u8; usize::try_from(size).ok()?];
                f.seek(SeekFrom::Start(offset)).ok()?;
                f.read_exact(&mut name).ok()?;
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                found = Some(String::from_utf8_lossy(&name[..end]).into_owned());
                break;
            }
        }
        found?
    } else {
        return None;
    };
    Some(interp)
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Refuses process groups that `killpg` must never be aimed at: 0 (our own group),
/// 1 (init's), negatives, and the agent's own group.
fn check_pgid(pgid: i32) -> io::Result<()> {
    if pgid <= 1 || pgid == nix::unistd::getpgrp().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process group {pgid}"),
        ));
    }
    Ok(())
}

/// Sends `sig` to the whole process group `pgid` (`killpg`). ESRCH (group gone) is
/// `Ok(false)`, success `Ok(true)` — also when every member is a zombie, since the
/// kernel still counts them. Refuses (`InvalidInput`) group ids of 1 or less and the
/// agent's own process group, so a corrupt record can never make the agent signal
/// init's group or itself.
pub fn signal_group(pgid: i32, sig: Signal) -> io::Result<bool> {
    check_pgid(pgid)?;
    match nix::sys::signal::killpg(Pid::from_raw(pgid), sig) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// True if any process still belongs to process group `pgid`, zombies not counted.
/// A cheap `kill(-pgid, 0)` answers "no" for a group that is gone altogether; otherwise
/// `/proc` is scanned. False for `pgid <= 0`.
pub fn group_alive(pgid: i32) -> bool {
    if pgid <= 0 {
        return false;
    }
    if nix::sys::signal::killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH) {
        return false;
    }
    scan_procs()
        .iter()
        .any(|s| s.pgrp == pgid && !is_dead_state(s.state))
}

/// Every live (non-zombie) process whose parent chain leads to `root_pid`, root
/// excluded, parents before their children: finds the grandchildren that left the
/// node's process group or session with `setsid()`. `/proc` is scanned once, so a
/// process forked during the scan can be missed: kill what this returns, then call it
/// again until it is empty (or stop the tree with SIGSTOP first). A process whose
/// parent exited has been re-parented (to the subreaper or PID 1) and is no longer
/// found from `root_pid`. Empty for `root_pid <= 1`, which would name (nearly)
/// everything.
pub fn descendants(root_pid: i32) -> Vec<i32> {
    if root_pid <= 1 {
        return Vec::new();
    }
    let procs = scan_procs();
    let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
    for p in &procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut seen = HashSet::from([root_pid]);
    let mut queue = VecDeque::from([root_pid]);
    while let Some(parent) = queue.pop_front() {
        for child in children.get(&parent).into_iter().flatten() {
            if seen.insert(child.pid) {
                if !is_dead_state(child.state) {
                    out.push(child.pid);
                }
                queue.push_back(child.pid);
            }
        }
    }
    out
}

/// Marks this process as a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`), so
/// orphaned grandchildren of nodes are re-parented to us instead of PID 1. The
/// attribute is process-wide and inherited by no child. The agent must then reap those
/// orphans: see [`reap_orphans`].
pub fn set_child_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal number (realtime signals included).
    Signal(i32),
}

/// Reaps zombie children of this process for which `tracked` returns false, and
/// returns their pids and how they ended.
///
/// `tracked` must return true for every child whose status someone else will collect
/// (children spawned through `tokio::process` or `std::process`): those are never
/// touched. It must already do so for a child whose `spawn()` has returned but whose
/// pid has not been recorded yet, so record the pid under the same lock that this is
/// called under, or call this only from the task that spawns.
///
/// Never calls `waitpid(-1)` or `waitid(P_ALL)`: this process's children (zombies
/// included) are listed from `/proc/self/task/*/children`, the untracked ones looked
/// at in `/proc`, and each zombie is reaped by itself, through a pidfd checked against
/// the start time seen, so even a pid that was reaped and reused meanwhile cannot make
/// it collect the wrong process. Listing children rather than scanning all of `/proc`
/// keeps this cheap when the agent runs hundreds of nodes: it runs on every SIGCHLD.
pub fn reap_orphans(tracked: &dyn Fn(i32) -> bool) -> Vec<(i32, ExitKind)> {
    let me = nix::unistd::getpid().as_raw();
    children()
        .into_iter()
        .filter(|pid| !tracked(*pid))
        .filter_map(|pid| proc_stat(pid).ok())
        .filter(|s| s.ppid == me && s.state == 'Z')
        .filter_map(|s| Some((s.pid, reap_zombie(&s)?)))
        .collect()
}

/// This process's children (zombies included), from `/proc/self/task/*/children`.
pub fn children() -> Vec<i32> {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Reaps the zombie `seen` in a scan, if it still is one.
fn reap_zombie(seen: &ProcStat) -> Option<ExitKind> {
    match PidFd::open(seen.pid) {
        Ok(fd) => {
            let now = proc_stat(seen.pid).ok()?;
            if now.starttime_ticks != seen.starttime_ticks || now.ppid != seen.ppid {
                return None;
            }
            let id = libc::id_t::try_from(fd.as_raw_fd()).ok()?;
            wait_exited(libc::P_PIDFD, id)
        }
        // Kernels before 5.3: the zombie keeps its pid until we reap it, and only
        // this process can reap it.
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            wait_exited(libc::P_PID, libc::id_t::try_from(seen.pid).ok()?)
        }
        Err(_) => None,
    }
}

/// `waitid(idtype, id, WEXITED | WNOHANG)`, decoding the status without rejecting
/// signal numbers that `nix::sys::signal::Signal` does not know (realtime signals).
fn wait_exited(idtype: libc::idtype_t, id: libc::id_t) -> Option<ExitKind> {
    // SAFETY: siginfo_t is plain old data, for which all-zero bytes are a valid value
    // (and waitid(WNOHANG) leaves si_pid at 0 when nothing has exited).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call.
    let ret = unsafe { libc::waitid(idtype, id, &mut info, libc::WEXITED | libc::WNOHANG) };
    if ret != 0 {
        return None;
    }
    // SAFETY: waitid filled `info` in for SIGCHLD (or left it zeroed), so the union
    // members read here are the child-status ones.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return None;
    }
    match info.si_code {
        libc::CLD_EXITED => Some(ExitKind::Code(status)),
        libc::CLD_KILLED | libc::CLD_DUMPED => Some(ExitKind::Signal(status)),
        _ => None,
    }
}

/// A CPU affinity mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuMask(CpuSet);

impl CpuMask {
    /// The CPUs in the mask, ascending.
    pub fn cpus(&self) -> Vec<usize> {
        (0..CpuSet::count())
            .filter(|&c| self.0.is_set(c).unwrap_or(false))
            .collect()
    }
}

/// The calling thread's CPU affinity mask.
pub fn thread_affinity() -> io::Result<CpuMask> {
    Ok(CpuMask(nix::sched::sched_getaffinity(Pid::from_raw(0))?))
}

/// Pins the CALLING THREAD to `cpus` (`sched_setaffinity(0, ..)` applies to the calling
/// thread only) and returns its previous mask, to be put back with
/// [`restore_thread_affinity`]. Children spawned by this thread meanwhile inherit the
/// mask (see the module docs). Fails with `InvalidInput` for an empty list or a CPU
/// number past the mask's size, and with `EINVAL` if none of `cpus` is online.
pub fn set_thread_affinity(cpus: &[usize]) -> io::Result<CpuMask> {
    if cpus.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty cpu list",
        ));
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpu {cpu} out of range"),
            )
        })?;
    }
    let previous = thread_affinity()?;
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)?;
    Ok(previous)
}

/// Puts back a mask returned by [`set_thread_affinity`] or [`thread_affinity`] on the
/// calling thread.
pub fn restore_thread_affinity(m: &CpuMask) -> io::Result<()> {
    nix::sched::sched_setaffinity(Pid::from_raw(0), &m.0).map_err(io::Error::from)
}

/// Number of CPUs online (`sysconf(_SC_NPROCESSORS_ONLN)`), at least 1. Not reduced by
/// the agent's own affinity or cgroup limits.
pub fn online_cpus() -> usize {
    nix::unistd::sysconf(SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1)
        .max(1)
}

/// `Cpus_allowed_list` from `/proc/<pid>/status` (e.g. "0-1,3" -> [0, 1, 3]): the
/// affinity of the process's main thread.
pub fn cpus_allowed(pid: i32) -> io::Result<Vec<usize>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no cpus_allowed_list in /proc/{pid}/status"),
            )
        })?;
    parse_cpu_list(list)
}

/// Parses a kernel CPU list ("0-3,8,10-11"); the result is sorted and deduplicated.
fn parse_cpu_list(list: &str) -> io::Result<Vec<usize>> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed cpu list {list:?}"),
        )
    };
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let lo: usize = lo.trim().parse().map_err(|_| bad())?;
        let hi: usize = hi.trim().parse().map_err(|_| bad())?;
        if hi < lo {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Whether `e` says the process (EMFILE) or the system (ENFILE) is out of file
/// descriptors.
pub fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{BufRead, BufReader};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Once, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    #[test]
    fn inherited_descriptors_become_close_on_exec_and_own_ones_stay() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let own = fs::File::open("/dev/null").unwrap();
        let changed = cloexec_inherited().unwrap();
        assert!(
            changed.contains(&fds[0]) && changed.contains(&fds[1]),
            "{changed:?}"
        );
        assert!(!changed.contains(&own.as_raw_fd()), "{changed:?}");
        // Changed once only. (Other tests of this process may open descriptors of
        // their own meanwhile: only ours are looked at.)
        let again = cloexec_inherited().unwrap();
        assert!(
            !again.contains(&fds[0]) && !again.contains(&fds[1]),
            "{again:?}"
        );
        for fd in fds {
            // SAFETY: reads the flags of a descriptor this test owns, then closes it.
            unsafe {
                assert_ne!(libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC, 0);
                libc::close(fd);
            }
        }
    }

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Tests that have children of their own hold this shared; a test that calls
    /// `reap_orphans` with a filter that would reap other tests' zombies holds it
    /// exclusively.
    static CHILDREN: RwLock<()> = RwLock::new(());

    /// The test process is a subreaper, as the agent is: the orphans tests make are
    /// re-parented to it and reaped by the tests, instead of being left to PID 1.
    fn subreaper() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| set_child_subreaper().expect("set child subreaper"));
    }

    fn shared() -> RwLockReadGuard<'static, ()> {
        subreaper();
        CHILDREN.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn exclusive() -> RwLockWriteGuard<'static, ()> {
        subreaper();
        CHILDREN.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls `cond` until it holds, failing the test after [`DEADLINE`].
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn pid_of(child: &Child) -> i32 {
        i32::try_from(child.id()).expect("pid fits i32")
    }

    fn me() -> i32 {
        nix::unistd::getpid().as_raw()
    }

    /// Kills and reaps the child when dropped, also when the test fails.
    struct Guard(Child);

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// SIGKILLs a process that is not our child when dropped, through a pidfd, so a
    /// reused pid is never hit.
    struct KillOnDrop(PidFd);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.signal(Signal::SIGKILL);
        }
    }

    /// Reaps the given orphans (re-parented to the test process), waiting for each
    /// one's exit; returns how each ended, in the order given.
    fn reap_these(pids: &[i32]) -> Vec<ExitKind> {
        let mut got: HashMap<i32, ExitKind> = HashMap::new();
        wait_until("orphans to be reaped", || {
            got.extend(reap_orphans(&|p| !pids.contains(&p)));
            pids.iter().all(|p| got.contains_key(p))
        });
        pids.iter().map(|p| got[p]).collect()
    }

    /// Reads the first line the child printed, as a pid.
    fn read_pid(child: &mut Child) -> i32 {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read pid");
        line.trim().parse().expect("pid line")
    }

    #[test]
    fn parse_stat_splits_at_last_paren() {
        let line = b"4242 (a b) c) S 1 4242 4242 0 -1 4194560 10 0 0 0 7 3 0 0 20 0 1 0 123456 1000 55 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let s = parse_stat(line).expect("parse");
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                comm: "a b) c".into(),
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                session: 4242,
                utime_ticks: 7,
                stime_ticks: 3,
                starttime_ticks: 123456,
                rss_pages: 55,
            }
        );
        assert_eq!(parse_stat(b"1 (x) ) R 0 1 1").ok(), None, "too few fields");
        assert!(parse_stat(b"garbage").is_err());
        let weird = b"7 ()(\xff) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        let s = parse_stat(weird).expect("non-utf-8 comm");
        assert_eq!(
            (s.comm.as_str(), s.state, s.starttime_ticks),
            (")(\u{fffd}", 'Z', 5)
        );
    }

    #[test]
    fn parse_cpu_lists() {
        assert_eq!(parse_cpu_list("0-1,3\n").unwrap(), vec![0, 1, 3]);
        assert_eq!(parse_cpu_list("\t0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("8-9,0-2").unwrap(), vec![0, 1, 2, 8, 9]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn system_constants() {
        assert!(clock_ticks_per_sec() > 0);
        assert!(page_size().is_power_of_two());
        assert!(online_cpus() >= 1);
        let boot = boot_time_epoch_ms().expect("btime");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(boot > 0 && u128::from(boot) < now.as_millis());
    }

    #[test]
    fn pseudo_files_are_read_whole_at_any_size() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0, 1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 7] {
            let path = dir.path().join(format!("f{len}"));
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            fs::write(&path, &bytes).unwrap();
            assert_eq!(read_pseudo(&path).unwrap(), bytes, "{len} bytes");
        }
        // A file that reports no size, larger than one buffer.
        let maps = read_pseudo_text(Path::new("/proc/self/maps")).unwrap();
        assert!(maps.lines().count() > 5, "{maps}");
        assert_eq!(
            read_pseudo(&dir.path().join("missing")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        fs::write(dir.path().join("bad"), [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_pseudo_text(&dir.path().join("bad"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn proc_stat_of_self() {
        let s = proc_stat(me()).expect("own stat");
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(s.pid, me());
        assert_eq!(s.comm, comm.trim_end_matches('\n'));
        // The leader thread may be waiting for the test threads.
        assert!(matches!(s.state, 'R' | 'S'), "state {}", s.state);
        assert_eq!(s.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw());
        assert_eq!(s.session, nix::unistd::getsid(None).unwrap().as_raw());
        assert!(s.starttime_ticks > 0);
        assert!(rss_bytes(&s) > 1 << 20, "rss {}", rss_bytes(&s));
        let id = proc_id(me()).unwrap();
        assert!(is_alive(id));
        let started = start_time_epoch_ms(id).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(u128::from(started) <= now.as_millis() + 2000);
        // Burn some CPU and check it shows.
        let before = cpu_ms(&s);
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        wait_until("cpu time to grow", || {
            cpu_ms(&proc_stat(me()).unwrap()) >= before + 20
        });
        assert!(proc_stat(0).is_err() && proc_stat(-5).is_err());
    }

    #[test]
    fn proc_stat_of_child_with_weird_name() {
        let _g = shared();
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("a b) c");
        fs::copy("/bin/sleep", &exe).unwrap();
        // A concurrent fork in another test thread can briefly hold the copy's write
        // descriptor open: exec then fails with ETXTBSY.
        let end = Instant::now() + DEADLINE;
        let child = loop {
            match Command::new(&exe).arg("1000").spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < end => {
                    std::thread::yield_now();
                }
                other => break Guard(other.expect("spawn renamed sleep")),
            }
        };
        let pid = pid_of(&child.0);
        // comm changes early in execve, while the new image is not mapped yet (rss 0):
        // wait for the program to be asleep in its nanosleep.
        wait_until("exec", || {
            proc_stat(pid).is_ok_and(|s| s.comm == "a b) c" && s.state == 'S' && s.rss_pages > 0)
        });
        let s = proc_stat(pid).unwrap();
        assert_eq!(s.pid, pid);
        assert_eq!(s.ppid, me());
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw());
        assert!(s.starttime_ticks >= proc_stat(me()).unwrap().starttime_ticks);
        let started = start_time_epoch_ms(proc_id(pid).unwrap()).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let skew = u128::from(started).abs_diff(now.as_millis());
        assert!(skew < 5000, "start time off by {skew} ms");
    }

    #[test]
    fn the_boot_id_is_read_and_stays() {
        let id = boot_id().expect("a boot id");
        assert_eq!(id.len(), 36, "a UUID: {id}");
        assert_eq!(boot_id(), Some(id));
    }

    #[test]
    fn is_alive_through_life_zombie_and_reuse() {
        let _g = shared();
        let mut child = Guard(Command::new("/bin/sleep").arg("1000").spawn().unwrap());
        let pid = pid_of(&child.0);
        let id = proc_id(pid).unwrap();
        assert!(is_alive(id));
        let recycled = ProcId {
            pid,
            start_ticks: id.start_ticks + 1,
        };
        assert!(!is_alive(recycled), "wrong start time");
        child.0.kill().unwrap();
        wait_until("zombie", || proc_stat(pid).is_ok_and(|s| s.state == 'Z'));
        assert!(!is_alive(id), "zombie counts as dead");
        assert_eq!(proc_id(pid).unwrap(), id, "a zombie keeps its identity");
        assert_eq!(child.0.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(!is_alive(id), "reaped");
        assert!(!is_alive(ProcId {
            pid: i32::MAX,
            start_ticks: 0
        }));
    }

    #[test]
    fn pidfd_exited_for_a_non_child() {
        let _g = shared();
        // sh stays the sleep's parent (and reaps it): the sleep is not our child.
        let mut sh = Guard(
            Command::new("/bin/sh")
                .args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!; wait"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let gpid = read_pid(&mut sh.0);
        let fd = KillOnDrop(PidFd::open(gpid).unwrap());
        assert_eq!(proc_stat(gpid).unwrap().ppid, pid_of(&sh.0));
        let id = proc_id(gpid).unwrap();
        assert!(is_alive(id));
        block_on(async {
            let early = tokio::time::timeout(Duration::from_millis(50), fd.0.exited()).await;
            assert!(early.is_err(), "exited() resolved for a live process");
            nix::sys::signal::kill(Pid::from_raw(gpid), Signal::SIGKILL).unwrap();
            tokio::time::timeout(DEADLINE, fd.0.exited())
                .await
                .expect("exited() within the deadline")
                .unwrap();
            // Again, and after the parent reaped it: still ready.
            fd.0.exited().await.unwrap();
        });
        assert!(!is_alive(id));
        assert!(sh.0.wait().unwrap().success());
        assert!(PidFd::open_id(id).is_err(), "reaped process");
        assert!(PidFd::open(0).is_err());
    }

    #[test]
    fn pidfd_and_reap_orphans_under_subreaper() {
        let _g = shared();
        // sh exits at once: its background sleep is orphaned and, as the test process
        // is a subreaper, re-parented to us. It is still not a child we spawned.
        let out = Command::new("/bin/sh")
            .args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let gpid: i32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let id = proc_id(gpid).unwrap();
        let fd = KillOnDrop(PidFd::open_id(id).unwrap());
        assert_eq!(proc_stat(gpid).unwrap().ppid, me(), "re-parented to us");
        assert!(
            reap_orphans(&|p| p != gpid).is_empty(),
            "alive: nothing to reap"
        );
        let wrong = ProcId {
            pid: gpid,
            start_ticks: id.start_ticks + 1,
        };
        assert_eq!(
            PidFd::open_id(wrong).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        fd.0.signal(Signal::SIGKILL).unwrap();
        block_on(async {
            tokio::time::timeout(DEADLINE, fd.0.exited())
                .await
                .expect("exited() within the deadline")
                .unwrap();
        });
        assert!(!is_alive(id));
        assert_eq!(reap_these(&[gpid]), vec![ExitKind::Signal(libc::SIGKILL)]);
        assert!(fd.0.signal(Signal::SIGKILL).is_err(), "reaped: ESRCH");
    }

    #[test]
    fn signal_group_kills_the_whole_group() {
        let _g = shared();
        let mut sh = Guard(
            Command::new("/bin/sh")
                .args(["-c", "sleep 1000 & sleep 1000 & wait"])
                .process_group(0)
                .spawn()
                .unwrap(),
        );
        let pgid = pid_of(&sh.0);
        let mut kids = Vec::new();
        wait_until("two sleeps", || {
            kids = descendants(pgid);
            kids.len() == 2
                && kids
                    .iter()
                    .all(|&k| proc_stat(k).is_ok_and(|s| s.comm == "sleep" && s.pgrp == pgid))
        });
        let _kill: Vec<_> = kids
            .iter()
            .map(|&k| KillOnDrop(PidFd::open(k).unwrap()))
            .collect();
        assert!(group_alive(pgid));
        assert!(signal_group(pgid, Signal::SIGKILL).unwrap());
        wait_until("group to die", || !group_alive(pgid));
        assert_eq!(sh.0.wait().unwrap().signal(), Some(libc::SIGKILL));
        // The sleeps died with sh: the test process inherited their zombies.
        assert_eq!(reap_these(&kids), vec![ExitKind::Signal(libc::SIGKILL); 2]);
        assert!(!group_alive(pgid));

        // A group that is gone altogether.
        let mut t = Command::new("/bin/true").process_group(0).spawn().unwrap();
        let gone = pid_of(&t);
        assert!(t.wait().unwrap().success());
        assert!(!signal_group(gone, Signal::SIGCONT).unwrap());
        assert!(!group_alive(gone));
    }

    #[test]
    fn signal_group_refuses_dangerous_groups() {
        for pgid in [-1, 0, 1, nix::unistd::getpgrp().as_raw()] {
            let err = signal_group(pgid, Signal::SIGCONT).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "pgid {pgid}");
        }
        assert!(!group_alive(0));
        assert!(descendants(1).is_empty());
    }

    #[test]
    fn descendants_find_a_setsid_grandchild() {
        let _g = shared();
        let mut sh = Guard(
            Command::new("/bin/sh")
                .args(["-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!; wait"])
                .process_group(0)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let pgid = pid_of(&sh.0);
        let gpid = read_pid(&mut sh.0);
        let _kill = KillOnDrop(PidFd::open(gpid).unwrap());
        wait_until("setsid + exec", || {
            proc_stat(gpid).is_ok_and(|s| s.session == gpid && s.comm == "sleep")
        });
        let s = proc_stat(gpid).unwrap();
        assert_eq!(s.ppid, pgid);
        assert_ne!(s.pgrp, pgid, "left the node's group");
        let tree = descendants(pgid);
        assert_eq!(tree, vec![gpid]);

        // What the agent does: collect the tree, kill the group, kill the stragglers.
        let pidfds: Vec<_> = tree.iter().map(|&p| PidFd::open(p).unwrap()).collect();
        assert!(signal_group(pgid, Signal::SIGKILL).unwrap());
        assert_eq!(sh.0.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(is_alive(proc_id(gpid).unwrap()), "a group kill misses it");
        assert!(
            descendants(pgid).is_empty(),
            "re-parented away from the node"
        );
        for fd in &pidfds {
            fd.signal(Signal::SIGKILL).unwrap();
        }
        assert_eq!(reap_these(&[gpid]), vec![ExitKind::Signal(libc::SIGKILL)]);
    }

    #[test]
    fn reap_orphans_never_reaps_a_tracked_child() {
        let _g = exclusive();
        block_on(async {
            let mut child = tokio::process::Command::new("/bin/sh")
                .args(["-c", "exit 7"])
                .spawn()
                .unwrap();
            let pid = i32::try_from(child.id().unwrap()).unwrap();
            // An untracked child, to show the filter is what protects the other.
            let mut stray = Command::new("/bin/sh")
                .args(["-c", "exit 3"])
                .spawn()
                .unwrap();
            let stray_pid = pid_of(&stray);
            wait_until("both zombies", || {
                [pid, stray_pid]
                    .iter()
                    .all(|&p| proc_stat(p).is_ok_and(|s| s.state == 'Z'))
            });
            let reaped = reap_orphans(&|p| p == pid);
            assert!(reaped.iter().all(|&(p, _)| p != pid), "{reaped:?}");
            assert!(
                reaped.contains(&(stray_pid, ExitKind::Code(3))),
                "{reaped:?}"
            );
            assert_eq!(proc_stat(pid).unwrap().state, 'Z', "still tokio's to reap");
            let status = tokio::time::timeout(DEADLINE, child.wait())
                .await
                .expect("wait within the deadline")
                .unwrap();
            assert_eq!(status.code(), Some(7));
            assert!(stray.try_wait().is_err(), "its status was collected by us");
        });
    }

    #[test]
    fn thread_affinity_is_inherited_and_restored() {
        let _g = shared();
        std::thread::spawn(|| {
            let orig = thread_affinity().unwrap();
            assert!(!orig.cpus().is_empty());
            let prev = set_thread_affinity(&[0]).unwrap();
            assert_eq!(prev, orig);
            assert_eq!(thread_affinity().unwrap().cpus(), vec![0]);
            let spawned = Command::new("/bin/sleep").arg("1000").spawn();
            restore_thread_affinity(&prev).unwrap();
            let pinned = Guard(spawned.unwrap());
            assert_eq!(thread_affinity().unwrap(), orig);
            assert_eq!(cpus_allowed(pid_of(&pinned.0)).unwrap(), vec![0]);
            let free = Guard(Command::new("/bin/sleep").arg("1000").spawn().unwrap());
            assert_eq!(cpus_allowed(pid_of(&free.0)).unwrap(), orig.cpus());
            assert!(set_thread_affinity(&[]).is_err());
            assert!(set_thread_affinity(&[CpuSet::count()]).is_err());
            assert_eq!(thread_affinity().unwrap(), orig);
        })
        .join()
        .unwrap();
    }

    /// A mask line (`SigIgn:` etc.) of `/proc/<pid>/status`.
    fn sig_mask(pid: i32, field: &str) -> u64 {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = s.lines().find_map(|l| l.strip_prefix(field)).unwrap();
        u64::from_str_radix(line.trim(), 16).unwrap()
    }

    fn spec<'a>(
        program: &'a str,
        args: &'a [String],
        cwd: &'a Path,
        out: &'a fs::File,
    ) -> SpawnSpec<'a> {
        SpawnSpec {
            program,
            argv0: None,
            args,
            env: vec!["A=b".to_owned()],
            path: "/nonexistent:/usr/bin:/bin",
            cwd,
            stdout: out.as_fd(),
            stderr: out.as_fd(),
            exec: None,
            cgroup: None,
            join: &[],
        }
    }

    #[test]
    fn spawn_clean_starts_with_default_signals_and_an_empty_mask() {
        let _g = shared();
        std::thread::spawn(|| {
            use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, pthread_sigmask, signal};
            let dir = tempfile::tempdir().unwrap();
            let out = fs::File::create(dir.path().join("out")).unwrap();
            // What the agent may inherit: SIGHUP ignored (nohup), SIGUSR2 blocked.
            // SAFETY: setting SIG_IGN installs no handler.
            unsafe { signal(Signal::SIGHUP, SigHandler::SigIgn) }.unwrap();
            let mut block = SigSet::empty();
            block.add(Signal::SIGUSR2);
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&block), None).unwrap();
            assert!(unignore_inherited_signals().contains(&libc::SIGHUP));
            assert!(
                !unignore_inherited_signals().contains(&libc::SIGHUP),
                "once"
            );
            let args = vec!["1000".to_owned()];
            let pid = spawn_clean(&spec("sleep", &args, dir.path(), &out)).unwrap();
            let fd = KillOnDrop(PidFd::open(pid).unwrap());
            // The name changes early in exec, the environment's place in the new image
            // is set later: wait for both.
            let environ = format!("/proc/{pid}/environ");
            wait_until("exec", || {
                proc_stat(pid).is_ok_and(|s| s.comm == "sleep")
                    && fs::read(&environ).is_ok_and(|e| !e.is_empty())
            });
            assert_eq!(sig_mask(pid, "SigIgn:"), 0, "nothing ignored");
            assert_eq!(sig_mask(pid, "SigBlk:"), 0, "nothing blocked");
            let s = proc_stat(pid).unwrap();
            assert_eq!(s.pgrp, pid, "a process group of its own");
            assert_eq!(s.ppid, me());
            assert_eq!(
                fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
                dir.path().canonicalize().unwrap()
            );
            let env = fs::read(&environ).unwrap();
            assert_eq!(env, b"A=b\0", "exactly the environment given");
            fd.0.signal(Signal::SIGHUP).unwrap();
            let exit = block_on(async { tokio::time::timeout(DEADLINE, wait_child(&fd.0)).await });
            assert_eq!(exit.unwrap().unwrap(), ExitKind::Signal(libc::SIGHUP));
            pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&block), None).unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn spawn_timed_gives_the_start_time_proc_reports() {
        let _g = shared();
        let dir = tempfile::tempdir().unwrap();
        let out = fs::File::create(dir.path().join("out")).unwrap();
        let (mut known, mut checked) = (0, 0);
        // Enough spawns that some cross a tick and most do not, whatever the machine.
        for _ in 0..300 {
            let (pid, start) =
                spawn_timed(|| spawn_clean(&spec("true", &[], dir.path(), &out))).unwrap();
            // Unreaped, the child's stat stays readable after it exits.
            let proc = proc_stat(pid).unwrap().starttime_ticks;
            if let Some(start) = start {
                assert_eq!(start, proc, "the start time of pid {pid}");
                known += 1;
            }
            checked += 1;
            nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
        }
        assert!(
            known > 0,
            "no start time known by the clock in {checked} spawns"
        );
        let err = spawn_timed(|| spawn_clean(&spec("/nonexistent/x", &[], dir.path(), &out)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn an_exec_error_names_the_missing_interpreter_of_a_file_that_is_there() {
        use std::os::unix::fs::PermissionsExt;
        let _g = shared();
        let dir = tempfile::tempdir().unwrap();
        let out = fs::File::create(dir.path().join("out")).unwrap();
        let exec = |program: &Path| {
            fs::set_permissions(program, fs::Permissions::from_mode(0o755)).unwrap();
            let program = program.to_str().unwrap();
            // A child another test forks while the file is open for writing holds it
            // open until it execs: "text file busy" for a moment.
            let deadline = Instant::now() + DEADLINE;
            loop {
                let err = spawn_clean(&spec(program, &[], dir.path(), &out)).unwrap_err();
                if err.raw_os_error() != Some(libc::ETXTBSY) || Instant::now() > deadline {
                    break exec_cause(&err, program, "/usr/bin:/bin", dir.path());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let script = dir.path().join("script");
        fs::write(&script, "#!/nonexistent/interp -x\necho hi\n").unwrap();
        assert_eq!(
            exec(&script),
            "no such file or directory (the file is there; its interpreter /nonexistent/interp is not)"
        );
        // A binary linked for a loader this host lacks: /bin/true with its loader's
        // name changed, same length.
        let loader = interpreter(Path::new("/bin/true")).expect("/bin/true is dynamically linked");
        let other = format!("{}X", &loader[..loader.len() - 1]);
        let mut bytes = fs::read("/bin/true").unwrap();
        let at = bytes
            .windows(loader.len())
            .position(|w| w == loader.as_bytes())
            .unwrap();
        bytes[at..at + loader.len()].copy_from_slice(other.as_bytes());
        let binary = dir.path().join("binary");
        fs::write(&binary, bytes).unwrap();
        assert_eq!(
            exec(&binary),
            format!(
                "no such file or directory (the file is there; its interpreter {other} is not)"
            )
        );
        // What is missing is the program itself: the cause alone.
        let err = spawn_clean(&spec("no-such-program-here", &[], dir.path(), &out)).unwrap_err();
        assert_eq!(
            exec_cause(&err, "no-such-program-here", "/usr/bin:/bin", dir.path()),
            "no such file or directory"
        );
        // A header whose program headers lie past the end of any file names nothing.
        let mut bad = b"\x7fELF\x02\x01".to_vec();
        bad.resize(0x40, 0);
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        bad[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bad[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let malformed = dir.path().join("malformed");
        fs::write(&malformed, bad).unwrap();
        assert_eq!(interpreter(&malformed), None);
        // Other errors are left as they are.
        let plain = dir.path().join("plain");
        fs::write(&plain, "echo hi\n").unwrap();
        assert_eq!(exec(&plain), "exec format error");
    }

    #[test]
    fn spawn_clean_reports_exec_errors() {
        use std::os::unix::fs::PermissionsExt;
        let _g = shared();
        let dir = tempfile::tempdir().unwrap();
        let out = fs::File::create(dir.path().join("out")).unwrap();
        let plain = dir.path().join("plain");
        fs::write(&plain, "#!/bin/sh\n").unwrap();
        let garbage = dir.path().join("garbage");
        fs::write(&garbage, [0x7f, b'E', b'L', b'F', 9, 9, 9]).unwrap();
        fs::set_permissions(&garbage, fs::Permissions::from_mode(0o755)).unwrap();
        let cases = [
            (
                "/nonexistent/prog",
                libc::ENOENT,
                "no such file or directory",
            ),
            (
                "no-such-program-anywhere",
                libc::ENOENT,
                "no such file or directory",
            ),
            (plain.to_str().unwrap(), libc::EACCES, "permission denied"),
            (
                garbage.to_str().unwrap(),
                libc::ENOEXEC,
                "exec format error",
            ),
        ];
        for (program, errno, text) in cases {
            let err = spawn_clean(&spec(program, &[], dir.path(), &out)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(errno), "{program}: {err}");
            assert_eq!(cause(&err), text);
        }
        let missing_dir = dir.path().join("gone");
        let err = spawn_clean(&spec("/bin/true", &[], &missing_dir, &out)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let nul = vec!["a\0b".to_owned()];
        let err = spawn_clean(&spec("/bin/true", &nul, dir.path(), &out)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(cause(&io::Error::other("plain text")), "plain text");
    }

    #[test]
    fn signal_led_group_reaches_members_after_the_leader_is_gone() {
        let _g = shared();
        let dir = tempfile::tempdir().unwrap();
        let out = fs::File::create(dir.path().join("out")).unwrap();
        let pidfile = dir.path().join("pid");
        // The leader starts a sleep in its group, writes its pid, and exits.
        let args = vec![
            "-c".to_owned(),
            format!(
                "sleep 1000 & echo $! > {}.t; mv {0}.t {0}",
                pidfile.display()
            ),
        ];
        let leader = spawn_clean(&spec("/bin/sh", &args, dir.path(), &out)).unwrap();
        let id = proc_id(leader).unwrap();
        let fd = PidFd::open(leader).unwrap();
        let member: i32 = {
            let mut pid = None;
            wait_until("member pid", || {
                pid = fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                pid.is_some()
            });
            pid.unwrap()
        };
        let _kill = KillOnDrop(PidFd::open(member).unwrap());
        let exit = block_on(async { tokio::time::timeout(DEADLINE, wait_child(&fd)).await });
        assert_eq!(exit.unwrap().unwrap(), ExitKind::Code(0));
        assert_eq!(
            proc_stat(member).unwrap().pgrp,
            leader,
            "still in the group"
        );
        // Reaped leader: its pidfd cannot reach the group; the scan does.
        assert!(signal_led_group(id, Some(&fd), Signal::SIGKILL).unwrap());
        assert_eq!(reap_these(&[member]), vec![ExitKind::Signal(libc::SIGKILL)]);
        assert!(
            !signal_led_group(id, Some(&fd), Signal::SIGKILL).unwrap(),
            "none left"
        );
        assert!(
            signal_led_group(
                ProcId {
                    pid: 1,
                    start_ticks: 0
                },
                None,
                Signal::SIGCONT
            )
            .is_err()
        );
    }
}
