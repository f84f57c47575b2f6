//! Holds the logs of nodes that write their files themselves to their bound while they
//! write, at any rate.
//!
//! With a log keeper (see [`crate::keeper`]) the keeper writes the files and bounds them
//! itself: only nodes adopted from an agent that ran without one are watched
//! ([`Scope::Only`]), and nodes started while no keeper answered, added as they start
//! ([`Adder`]). Without a keeper every node writes its files itself ([`Scope::All`]).
//!
//! Nothing tells the agent that a file grew except the kernel: one inotify instance
//! watches `IN_MODIFY` in each watched node directory under `<state-dir>/nodes/` (and,
//! for [`Scope::All`], that directory itself for new nodes). Each event on a `stdout.log` or `stderr.log` makes the watcher check that
//! file's size and rotate it when it is over the bound
//! ([`NodeLogs::check`]). It all runs on one thread of its own, blocked in `poll` while
//! nothing is written: under CPU contention every hand-over between threads waits for a
//! turn on a core, while the node it races keeps writing. Rotated copies are synced by
//! another thread, so that a slow disk does not hold the checks up.
//! While a batch is checked the kernel merges further events of the same file into one,
//! and after a batch the watcher pauses: for half the time the fastest-growing file
//! checked lately, at the rate it grew since its previous check, needs to reach its
//! bound, between [`MIN_PAUSE`] and [`MAX_PAUSE`]. So a node writing at an ordinary rate costs some
//! checks a second, one writing flat out is checked every [`MIN_PAUSE`] near its bound,
//! and a quiet node costs nothing: there is no timer.
//!
//! At start-up every watched node's files are checked once, which bounds what nodes
//! wrote while no agent ran. Without inotify (no instance, or the per-user watch limit reached) the
//! supervisor's periodic check is what remains; the watcher says so in the log.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::fs::File;
use std::sync::Arc;

use tracing::{debug, trace, warn};

use crate::logs::{LogConfig, NodeLogs, Stream};

/// Shortest pause between two batches of checks.
pub const MIN_PAUSE: Duration = Duration::from_micros(100);
/// Longest pause between two batches of checks.
pub const MAX_PAUSE: Duration = Duration::from_millis(50);

/// The pause after a check found a file at `len` bytes, growing from `last` (size and
/// time of its previous check), with `bound` bytes allowed.
fn pause(last: Option<(u64, Instant)>, len: u64, now: Instant, bound: u64) -> Duration {
    let Some((was, at)) = last else {
        return MIN_PAUSE;
    };
    if len <= was {
        // Rotated since (it is written fast) or not grown (nothing to hurry for).
        return if len < was { MIN_PAUSE } else { MAX_PAUSE };
    }
    let rate = (len - was) as f64 / now.duration_since(at).as_secs_f64().max(1e-6);
    let eta = bound.saturating_sub(len) as f64 / rate;
    Duration::from_secs_f64(eta / 2.0).clamp(MIN_PAUSE, MAX_PAUSE)
}

/// The watcher's thread; dropping this stops it.
pub struct LogWatch {
    /// Written to stop the thread: it waits on this beside inotify, so that it sleeps
    /// until something happens instead of waking up to look at a flag.
    stop: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    adder: Adder,
}

impl LogWatch {
    /// What adds node directories to watch while the watcher runs.
    pub fn adder(&self) -> Adder {
        self.adder.clone()
    }
}

/// Adds a node directory to the watch from another thread (under [`Scope::Only`], a
/// node that writes its files itself because no log keeper answered when it started):
/// the watch is added to the watcher's inotify instance at once, so that no write goes
/// unseen, and the watcher learns of it with its next wake-up, before the events.
#[derive(Clone)]
pub struct Adder {
    inotify: Arc<OwnedFd>,
    pending: Arc<std::sync::Mutex<Vec<(i32, PathBuf)>>>,
}

impl std::fmt::Debug for Adder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adder").finish_non_exhaustive()
    }
}

impl Adder {
    /// Watches node directory `dir` (again: a directory watched already stays so).
    pub fn watch(&self, dir: &Path) {
        let inotify = Inotify {
            fd: self.inotify.clone(),
        };
        match inotify.add(dir, libc::IN_MODIFY | libc::IN_ONLYDIR) {
            Ok(wd) => self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((wd, dir.to_owned())),
            Err(e) => warn!(
                "cannot watch the logs in {} ({e}); their sizes are only checked periodically",
                dir.display()
            ),
        }
    }
}

impl Drop for LogWatch {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: the descriptor is an open eventfd and `one` 8 readable bytes.
        let _ = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An eventfd for [`LogWatch::stop`].
fn stop_fd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a negative result is an error.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we own and nothing else refers to.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Which node directories the watcher watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every node directory under `nodes_dir`, those made later too: the nodes write
    /// their log files themselves (there is no log keeper).
    All,
    /// Only these: the log keeper writes every other node's files and holds them to
    /// their bound itself, so their writes need no watching (and would wake the watcher
    /// for nothing). These are nodes adopted from an agent that ran without a keeper,
    /// which still write their files themselves.
    Only(Vec<PathBuf>),
}

/// Starts watching node directories under `nodes_dir` as `scope` says; see the module
/// doc. `None` when there is nothing to watch, or (with a warning) when inotify is not
/// available.
pub fn spawn(nodes_dir: PathBuf, config: LogConfig, scope: Scope) -> Option<LogWatch> {
    // Also with nothing to watch yet: a node started while no log keeper answers
    // writes its files itself (see [`Adder`]). Blocked in `poll`, it costs nothing.
    let watcher = match Watcher::new(&nodes_dir, config, scope) {
        Ok(w) => w,
        Err(e) => {
            warn!(
                "cannot watch node logs in {} ({e}); their sizes are only checked periodically",
                nodes_dir.display()
            );
            return None;
        }
    };
    let stop = match stop_fd() {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            warn!("cannot start the log watcher: {e}; log sizes are only checked periodically");
            return None;
        }
    };
    let stopped = stop.clone();
    let adder = Adder {
        inotify: watcher.inotify.fd.clone(),
        pending: watcher.pending.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("logwatch".into())
        .spawn(move || watcher.run(&stopped))
        .map_err(|e| warn!("cannot start the log watcher: {e}"))
        .ok()?;
    Some(LogWatch {
        stop,
        adder,
        thread: Some(thread),
    })
}

struct Watcher {
    inotify: Inotify,
    nodes_dir: PathBuf,
    /// The watch on `nodes_dir`, when every node directory is watched.
    top: Option<i32>,
    /// The directories watched from the start: `None` for all of them.
    only: Option<Vec<PathBuf>>,
    /// Node directories by watch descriptor.
    dirs: HashMap<i32, PathBuf>,
    /// Size and time of each file's last check, and the pause it asked for then.
    seen: HashMap<(PathBuf, Stream), (u64, Instant, Duration)>,
    config: LogConfig,
    /// Directories an [`Adder`] watched, to be told of at the next wake-up.
    pending: Arc<std::sync::Mutex<Vec<(i32, PathBuf)>>>,
}

impl Watcher {
    fn new(nodes_dir: &Path, config: LogConfig, scope: Scope) -> io::Result<Self> {
        let inotify = Inotify::new()?;
        let (top, only) = match scope {
            Scope::All => (
                Some(inotify.add(
                    nodes_dir,
                    libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR,
                )?),
                None,
            ),
            Scope::Only(dirs) => (None, Some(dirs)),
        };
        Ok(Self {
            inotify,
            nodes_dir: nodes_dir.to_owned(),
            top,
            only,
            dirs: HashMap::new(),
            seen: HashMap::new(),
            config,
            pending: Arc::default(),
        })
    }

    fn run(mut self, stop: &OwnedFd) {
        raise_priority();
        let syncer = Syncer::start();
        // Every node there now, checked once: what they wrote while no agent ran.
        let mut dirty = BTreeSet::new();
        match self.only.take() {
            Some(dirs) => {
                for dir in dirs {
                    self.watch(dir, &mut dirty);
                }
            }
            None => {
                if let Ok(entries) = std::fs::read_dir(&self.nodes_dir) {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            self.watch(e.path(), &mut dirty);
                        }
                    }
                }
            }
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !dirty.is_empty() {
                let checked = check(std::mem::take(&mut dirty), self.config, &syncer);
                let now = Instant::now();
                for (key, len) in checked {
                    let last = self.seen.get(&key).map(|&(len, at, _)| (len, at));
                    let p = pause(last, len, now, self.config.max_bytes);
                    self.seen.insert(key, (len, now, p));
                }
                // Let a writer's further events merge into one, but for no longer than
                // any file checked lately asked: a batch of slow writers alone must not
                // hold up the check of a fast one.
                let next = self
                    .seen
                    .values()
                    .filter(|(_, at, _)| now.duration_since(*at) < MAX_PAUSE)
                    .map(|&(_, _, p)| p)
                    .min()
                    .unwrap_or(MAX_PAUSE);
                std::thread::sleep(next);
            }
            let n = match self.inotify.read(&mut buf, stop) {
                Ok(Some(n)) => n,
                Ok(None) => return,
                Err(e) => {
                    warn!("cannot read log events: {e}; log sizes are only checked periodically");
                    return;
                }
            };
            let added = std::mem::take(
                &mut *self
                    .pending
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            for (wd, dir) in added {
                for s in Stream::ALL {
                    dirty.insert((dir.clone(), s));
                }
                self.dirs.insert(wd, dir);
            }
            for ev in events(&buf[..n]) {
                self.event(ev, &mut dirty);
            }
        }
    }

    fn event(&mut self, ev: Event<'_>, dirty: &mut BTreeSet<(PathBuf, Stream)>) {
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            // Events were lost: check everything.
            for dir in self.dirs.values() {
                for s in Stream::ALL {
                    dirty.insert((dir.clone(), s));
                }
            }
            return;
        }
        if ev.mask & libc::IN_IGNORED != 0 {
            if let Some(dir) = self.dirs.remove(&ev.wd) {
                self.seen.retain(|(d, _), _| *d != dir);
            }
            return;
        }
        if Some(ev.wd) == self.top {
            if ev.mask & libc::IN_ISDIR != 0
                && let Some(name) = ev.name
            {
                self.watch(self.nodes_dir.join(name), dirty);
            }
            return;
        }
        let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), ev.name) else {
            return;
        };
        if let Some(s) = Stream::ALL.into_iter().find(|s| name == s.file_name()) {
            dirty.insert((dir.clone(), s));
        }
    }

    /// Watches a node directory and marks its files for a check (they may have been
    /// written before the watch began).
    fn watch(&mut self, dir: PathBuf, dirty: &mut BTreeSet<(PathBuf, Stream)>) {
        match self.inotify.add(&dir, libc::IN_MODIFY | libc::IN_ONLYDIR) {
            Ok(wd) => {
                for s in Stream::ALL {
                    dirty.insert((dir.clone(), s));
                }
                self.dirs.insert(wd, dir);
            }
            Err(e) => warn!(
                "cannot watch the logs in {} ({e}); their sizes are only checked periodically",
                dir.display()
            ),
        }
    }
}

/// Asks for a higher scheduling priority (nice [`NICE`]) for this thread: a node that
/// writes flat out is busy on a core whenever it may run, and every moment the watcher
/// waits for a turn it writes on past the bound. Allowed with `CAP_SYS_NICE` or an
/// `RLIMIT_NICE` (systemd's `LimitNICE=`) that reaches it; otherwise the thread keeps the
/// agent's priority.
fn raise_priority() {
    // SAFETY: gettid takes no arguments.
    let tid = unsafe { libc::gettid() };
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: plain integer arguments; the result is checked.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NICE) } != 0 {
        debug!(
            "log watcher keeps its priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// The log watcher's nice value, when it may have it.
const NICE: i32 = -10;

/// Rotates the files of `batch` that are over the bound; the size each had.
fn check(
    batch: BTreeSet<(PathBuf, Stream)>,
    config: LogConfig,
    syncer: &Syncer,
) -> Vec<((PathBuf, Stream), u64)> {
    let mut sizes = Vec::with_capacity(batch.len());
    for (dir, s) in batch {
        let logs = NodeLogs::new(&dir, config);
        match logs.check(s) {
            Ok(c) => {
                if let Some(copy) = c.copy {
                    // Trace, not debug: a node writing flat out rotates hundreds of times a
                    // second, and a log write can wait for the disk as long as it likes.
                    trace!(dir = %dir.display(), stream = ?s, len = c.len, "rotated logs");
                    syncer.sync(copy);
                }
                sizes.push(((dir, s), c.len));
            }
            Err(e) => warn!("cannot rotate logs: {e}"),
        }
    }
    sizes
}

/// Syncs rotated copies on a thread of its own.
struct Syncer(Option<std::sync::mpsc::SyncSender<File>>);

impl Syncer {
    /// Copies waiting to be synced. The queue is bounded: when the disk cannot keep up,
    /// a copy is left to the kernel's writeback instead.
    const QUEUE: usize = 64;

    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<File>(Self::QUEUE);
        let started = std::thread::Builder::new()
            .name("logsync".into())
            .spawn(move || {
                for copy in rx {
                    let _ = copy.sync_data();
                }
            });
        Self(started.ok().map(|_| tx))
    }

    fn sync(&self, copy: File) {
        if let Some(tx) = &self.0 {
            let _ = tx.try_send(copy);
        }
    }
}

/// An inotify instance.
struct Inotify {
    fd: Arc<OwnedFd>,
}

impl Inotify {
    fn new() -> io::Result<Self> {
        // SAFETY: inotify_init1 takes no pointers; a negative result is an error.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we own and nothing else refers to.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        Ok(Self { fd })
    }

    /// Adds (or replaces) the watch on `path`; its watch descriptor.
    fn add(&self, path: &Path, mask: u32) -> io::Result<i32> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("path contains a nul byte"))?;
        // SAFETY: the descriptor is open and `c` a valid C string for the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Reads whole events into `buf`, waiting for them as long as it takes; 0 when
    /// woken without any, `None` once `stop` is readable.
    fn read(&self, buf: &mut [u8], stop: &OwnedFd) -> io::Result<Option<usize>> {
        let mut pfds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let ready = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Some(0))
            } else {
                Err(e)
            };
        }
        if pfds[1].revents != 0 {
            return Ok(None);
        }
        if pfds[0].revents == 0 {
            return Ok(Some(0));
        }
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => Ok(Some(n)),
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Some(0)),
                    _ => Err(e),
                }
            }
        }
    }
}

/// One inotify event.
struct Event<'a> {
    wd: i32,
    mask: u32,
    name: Option<&'a OsStr>,
}

/// Splits what a read of an inotify descriptor returned into its events.
fn events(mut buf: &[u8]) -> Vec<Event<'_>> {
    const HEADER: usize = 16;
    let mut out = Vec::new();
    while buf.len() >= HEADER {
        let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
        let wd = i32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes"));
        let mask = word(4);
        let len = word(12) as usize;
        let Some(raw) = buf.get(HEADER..HEADER + len) else {
            break;
        };
        let name = raw.split(|&b| b == 0).next().filter(|n| !n.is_empty());
        out.push(Event {
            wd,
            mask,
            name: name.map(OsStr::from_bytes),
        });
        buf = &buf[HEADER + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::time::Instant;

    use super::*;

    fn event_bytes(wd: i32, mask: u32, name: &str) -> Vec<u8> {
        let mut padded = name.as_bytes().to_vec();
        if !padded.is_empty() {
            padded.resize(name.len().div_ceil(16) * 16 + 16, 0);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&wd.to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&u32::try_from(padded.len()).unwrap().to_ne_bytes());
        b.extend_from_slice(&padded);
        b
    }

    #[test]
    fn pauses_shrink_as_a_file_nears_its_bound() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(pause(None, 10, t0, 1000), MIN_PAUSE);
        assert_eq!(pause(Some((10, t0)), 10, ms(5), 1000), MAX_PAUSE);
        assert_eq!(
            pause(Some((900, t0)), 10, ms(5), 1000),
            MIN_PAUSE,
            "rotated"
        );
        // 100 bytes in 10 ms, 800 to go: 80 ms at that rate, so half of it.
        assert_eq!(pause(Some((100, t0)), 200, ms(10), 1000), ms(40) - t0);
        assert_eq!(
            pause(Some((100, t0)), 200, ms(20), 1000),
            MAX_PAUSE,
            "capped"
        );
        // 100 bytes per ms, 200 to go: 2 ms, so 1 ms.
        let p = pause(Some((500, t0)), 800, ms(3), 1000);
        assert!(
            p > Duration::from_micros(900) && p < Duration::from_micros(1100),
            "{p:?}"
        );
        assert_eq!(pause(Some((500, t0)), 1500, ms(1), 1000), MIN_PAUSE, "over");
    }

    #[test]
    fn events_are_split_and_named() {
        let mut buf = event_bytes(3, libc::IN_MODIFY, "stdout.log");
        buf.extend(event_bytes(1, libc::IN_IGNORED, ""));
        buf.extend(event_bytes(7, libc::IN_CREATE | libc::IN_ISDIR, "n"));
        buf.extend_from_slice(&[1, 2, 3]); // a cut-off header is ignored
        let evs = events(&buf);
        assert_eq!(evs.len(), 3);
        assert_eq!((evs[0].wd, evs[0].mask), (3, libc::IN_MODIFY));
        assert_eq!(evs[0].name, Some(OsStr::new("stdout.log")));
        assert_eq!(evs[1].name, None);
        assert_eq!(evs[2].name, Some(OsStr::new("n")));
    }

    fn size(logs: &NodeLogs, s: Stream) -> u64 {
        std::fs::metadata(logs.path(s)).map_or(0, |m| m.len())
    }

    #[tokio::test]
    async fn files_over_the_bound_are_rotated_as_they_grow_and_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = dir.path().join("nodes");
        let config = LogConfig {
            max_bytes: 1000,
            keep: 2,
        };
        // A node that wrote while no agent ran.
        let early = NodeLogs::new(nodes.join("early"), config);
        let (_out, mut err) = early.open_for_child().unwrap();
        err.write_all("x\n".repeat(5000).as_bytes()).unwrap();

        let watch = spawn(nodes.clone(), config, Scope::All).expect("inotify");
        let deadline = Instant::now() + Duration::from_secs(10);
        while early.dropped(Stream::Stderr) == 0 {
            assert!(Instant::now() < deadline, "not rotated at start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(size(&early, Stream::Stderr) <= config.max_bytes);
        assert!(early.disk_usage() <= 3 * config.max_bytes);

        // A node created later, written to line by line.
        let late = NodeLogs::new(nodes.join("late"), config);
        let deadline = Instant::now() + Duration::from_secs(10);
        std::fs::create_dir_all(nodes.join("late")).unwrap();
        let mut out = OpenOptions::new()
            .append(true)
            .create(true)
            .open(late.path(Stream::Stdout))
            .unwrap();
        for i in 0..200 {
            writeln!(out, "line {i:04}").unwrap();
        }
        while !late.rotated_path(Stream::Stdout, 1).exists() {
            assert!(Instant::now() < deadline, "not rotated while written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while size(&late, Stream::Stdout) > config.max_bytes {
            assert!(Instant::now() < deadline, "still over the bound");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(late.disk_usage() <= 3 * config.max_bytes);
        drop(watch);
    }

    #[tokio::test]
    async fn a_watcher_of_listed_directories_leaves_the_others_to_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = dir.path().join("nodes");
        let config = LogConfig {
            max_bytes: 1000,
            keep: 2,
        };
        let over = "x\n".repeat(1000);
        let direct = NodeLogs::new(nodes.join("direct"), config);
        let kept = NodeLogs::new(nodes.join("kept"), config);
        let (mut direct_out, _) = direct.open_for_child().unwrap();
        let (mut kept_out, _) = kept.open_for_child().unwrap();
        // Over the bound before the start: the listed one is checked at once.
        kept_out.write_all(over.as_bytes()).unwrap();
        direct_out.write_all(over.as_bytes()).unwrap();
        let watch = spawn(
            nodes.clone(),
            config,
            Scope::Only(vec![nodes.join("direct")]),
        )
        .expect("inotify");
        let deadline = Instant::now() + Duration::from_secs(10);
        while size(&direct, Stream::Stdout) > config.max_bytes {
            assert!(
                Instant::now() < deadline,
                "the listed node was not checked at start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Written while watched, each time before the listed one: had the watcher
        // looked at them, they would have been rotated by the time the listed one was.
        let later = NodeLogs::new(nodes.join("later"), config);
        let (mut later_out, _) = later.open_for_child().unwrap();
        for _ in 0..2 {
            kept_out.write_all(over.as_bytes()).unwrap();
            later_out.write_all(over.as_bytes()).unwrap();
            direct_out.write_all(over.as_bytes()).unwrap();
            while size(&direct, Stream::Stdout) > config.max_bytes {
                assert!(Instant::now() < deadline, "the listed node was not rotated");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for (what, logs) in [("kept", &kept), ("later", &later)] {
            assert!(
                size(logs, Stream::Stdout) > config.max_bytes,
                "{what} was rotated"
            );
            assert!(!logs.rotated_path(Stream::Stdout, 1).exists(), "{what}");
        }
        // Added while it runs (a node started while no keeper answered): held to its
        // bound from then on.
        watch.adder().watch(&nodes.join("later"));
        for _ in 0..2 {
            later_out.write_all(over.as_bytes()).unwrap();
            while size(&later, Stream::Stdout) > config.max_bytes {
                assert!(Instant::now() < deadline, "the added node was not rotated");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert!(later.rotated_path(Stream::Stdout, 1).exists());
        assert!(
            size(&kept, Stream::Stdout) > config.max_bytes,
            "kept stays unwatched"
        );
        drop(watch);
        // Nothing listed yet: a watcher all the same, for nodes added later.
        assert!(spawn(nodes, config, Scope::Only(Vec::new())).is_some());
    }

    /// Voluntary context switches of this process's threads named `name`.
    fn switches(name: &str) -> u64 {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    }

    #[test]
    fn an_idle_watcher_sleeps_until_written_to_or_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = dir.path().join("nodes");
        std::fs::create_dir_all(nodes.join("quiet")).unwrap();
        let watch = spawn(nodes, LogConfig::default(), Scope::All).expect("inotify");
        // Once it has settled into its wait, nothing wakes it while nothing is written.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut before = switches("logwatch");
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = switches("logwatch");
            if now == before {
                break;
            }
            assert!(Instant::now() < deadline, "the watcher never settles");
            before = now;
        }
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(switches("logwatch"), before, "woke up with nothing to do");
        // And a drop still ends it at once.
        let began = Instant::now();
        drop(watch);
        assert!(began.elapsed() < Duration::from_secs(5));
        assert_eq!(switches("logwatch"), 0, "the thread is gone");
    }
}
