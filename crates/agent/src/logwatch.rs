//! Holds node logs to their bound while nodes write, at any rate.
//!
//! Nodes write their log files themselves (see [`crate::logs`]), so nothing tells the
//! agent that a file grew except the kernel: one inotify instance watches `IN_MODIFY` in
//! every node directory under `<state-dir>/nodes/` (and that directory itself for new
//! nodes). Each event on a `stdout.log` or `stderr.log` makes the watcher check that
//! file's size and rotate it when it is over the bound
//! ([`NodeLogs::rotate_stream_if_needed`]), on a blocking thread, one batch at a time.
//! While a batch is checked the kernel merges further events of the same file into one,
//! and after a batch that found files being written the watcher pauses for
//! [`CHECK_PAUSE`], so a node that writes flat out costs at most some hundred checks a
//! second, and a quiet node none: there is no timer.
//!
//! At start-up every node's files are checked once, which bounds what nodes wrote while
//! no agent ran. Without inotify (no instance, or the per-user watch limit reached) the
//! supervisor's periodic check is what remains; the watcher says so in the log.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::logs::{LogConfig, NodeLogs, Stream};

/// Pause after a batch of checks that found files being written.
pub const CHECK_PAUSE: Duration = Duration::from_millis(1);

/// Watches the node directories under `nodes_dir` until `shutdown`; see the module doc.
pub async fn run(nodes_dir: PathBuf, config: LogConfig, shutdown: CancellationToken) {
    let watcher = match Watcher::new(&nodes_dir, config) {
        Ok(w) => w,
        Err(e) => {
            warn!(
                "cannot watch node logs in {} ({e}); their sizes are only checked periodically",
                nodes_dir.display()
            );
            return;
        }
    };
    watcher.run(shutdown).await;
}

struct Watcher {
    inotify: Inotify,
    nodes_dir: PathBuf,
    /// The watch on `nodes_dir`.
    top: i32,
    /// Node directories by watch descriptor.
    dirs: HashMap<i32, PathBuf>,
    config: LogConfig,
}

impl Watcher {
    fn new(nodes_dir: &Path, config: LogConfig) -> io::Result<Self> {
        let inotify = Inotify::new()?;
        let top = inotify.add(
            nodes_dir,
            libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR,
        )?;
        Ok(Self {
            inotify,
            nodes_dir: nodes_dir.to_owned(),
            top,
            dirs: HashMap::new(),
            config,
        })
    }

    async fn run(mut self, shutdown: CancellationToken) {
        // Every node there now, checked once: what they wrote while no agent ran.
        let mut dirty = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(&self.nodes_dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    self.watch(e.path(), &mut dirty);
                }
            }
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !dirty.is_empty() {
                let config = self.config;
                let batch = std::mem::take(&mut dirty);
                let checked = tokio::task::spawn_blocking(move || check(&batch, config));
                if checked.await.is_err() {
                    return;
                }
                // Let a writer's further events merge into one.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(CHECK_PAUSE) => {}
                }
            }
            let n = tokio::select! {
                () = shutdown.cancelled() => return,
                n = self.inotify.read(&mut buf) => n,
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    warn!("cannot read log events: {e}; log sizes are only checked periodically");
                    return;
                }
            };
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
            self.dirs.remove(&ev.wd);
            return;
        }
        if ev.wd == self.top {
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

/// Rotates the files of `batch` that are over the bound. Blocking.
fn check(batch: &BTreeSet<(PathBuf, Stream)>, config: LogConfig) {
    for (dir, s) in batch {
        let logs = NodeLogs::new(dir, config);
        match logs.rotate_stream_if_needed(*s) {
            Ok(true) => debug!(dir = %dir.display(), stream = ?s, "rotated logs"),
            Ok(false) => {}
            Err(e) => warn!("cannot rotate logs: {e}"),
        }
    }
}

/// An inotify instance, read through tokio.
struct Inotify {
    fd: AsyncFd<OwnedFd>,
}

impl Inotify {
    fn new() -> io::Result<Self> {
        // SAFETY: inotify_init1 takes no pointers; a negative result is an error.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we own and nothing else refers to.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and keeps its
        // number until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
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

    /// Reads whole events into `buf` (at least one), waiting for them.
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match read {
                Ok(r) => return r,
                Err(_would_block) => {}
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

        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(nodes.clone(), config, shutdown.clone()));
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
        assert_eq!(late.dropped(Stream::Stdout), 0);
        shutdown.cancel();
        task.await.unwrap();
    }
}
