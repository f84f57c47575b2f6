//! When a daemon reloads its certificates: on SIGHUP (`systemctl reload`), and, with
//! `--watch-certs`, when the files change.
//!
//! Files are watched with inotify on their directories, not on the files: certificates
//! are usually replaced by a rename (`drover ca renew`, `install`, editors, a symlink
//! swapped by a secrets manager), which a watch on the old file would not see. A file
//! reached through a symlink has the directory of the file it leads to watched too
//! (and, when the link is swapped, the new one's), and so are the directories those are in
//! (a directory of certificates renamed into place, or its symlink swapped). Any event in those directories makes the watcher wait until they have been quiet for
//! [`SETTLE`] (a certificate and its key are written one after the other) and compare
//! the files' identities (device, inode, size, modification and change times, following
//! symlinks) with those of the last reload; only a change triggers one. While nothing is
//! written the watcher sleeps in the kernel: no timer, no wake-ups. Without inotify it
//! falls back to comparing the identities every [`POLL`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// Quiet time after the last change before a watched change triggers a reload.
pub const SETTLE: Duration = Duration::from_millis(100);
/// How often files are compared when inotify is not available.
pub const POLL: Duration = Duration::from_secs(1);

/// Runs `reload(cause)` on every SIGHUP and, when `watch`, whenever one of `files`
/// changes, until `shutdown`. Installs the SIGHUP handler before it returns, so that a
/// SIGHUP never ends the daemon (the default action). `reload` returns when it is worth
/// trying again (a certificate refused as not valid yet); the try is made then, unless
/// another reload came first.
pub fn spawn(
    files: Vec<PathBuf>,
    watch: bool,
    shutdown: CancellationToken,
    reload: impl Fn(&str) -> Option<Duration> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("cannot handle SIGHUP: {e}"))?;
    let reloads = Reloads {
        reload: Arc::new(reload),
        latest: Arc::default(),
        shutdown: shutdown.clone(),
    };
    let r = reloads.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            r.start("SIGHUP".to_owned()).await;
        }
    });
    if watch {
        tokio::spawn(Watch::new(files).run(shutdown, move |cause| {
            let r = reloads.clone();
            let cause = cause.to_owned();
            async move { r.start(cause).await }
        }));
    }
    Ok(())
}

/// Reloads, and the tries again they ask for.
struct Reloads<R> {
    reload: Arc<R>,
    /// Counts reloads begun: a try again is made only if no reload began since.
    latest: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
}

impl<R> Clone for Reloads<R> {
    fn clone(&self) -> Self {
        Self {
            reload: self.reload.clone(),
            latest: self.latest.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

impl<R: Fn(&str) -> Option<Duration> + Send + Sync + 'static> Reloads<R> {
    /// Runs a reload (on a blocking thread: it reads files) and returns once it is done;
    /// a try again it asks for waits in a task of its own.
    async fn start(&self, cause: String) {
        use std::sync::atomic::Ordering;
        let mine = self.latest.fetch_add(1, Ordering::SeqCst) + 1;
        let Some(wait) = self.once(cause).await else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut wait = wait;
            loop {
                tokio::select! {
                    () = me.shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                if me.latest.load(Ordering::SeqCst) != mine {
                    return;
                }
                let cause = "trying again: the certificate refused was not valid yet".to_owned();
                match me.once(cause).await {
                    Some(w) => wait = w,
                    None => return,
                }
            }
        });
    }

    async fn once(&self, cause: String) -> Option<Duration> {
        let r = self.reload.clone();
        tokio::task::spawn_blocking(move || r(&cause))
            .await
            .ok()
            .flatten()
    }
}

/// What identifies a file's content without reading it (none for a missing file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp(Option<(u64, u64, u64, i64, i64, i64, i64)>);

/// The [`Stamp`] of the file at `path` now, following symlinks.
pub fn stamp(path: &Path) -> Stamp {
    Stamp(std::fs::metadata(path).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    }))
}

fn stamps(files: &[PathBuf]) -> Vec<Stamp> {
    files.iter().map(|f| stamp(f)).collect()
}

/// Names the files that changed between two sets of stamps.
fn changed(files: &[PathBuf], before: &[Stamp], now: &[Stamp]) -> Option<String> {
    let names: Vec<String> = files
        .iter()
        .zip(before.iter().zip(now))
        .filter(|(_, (a, b))| a != b)
        .map(|(f, _)| f.display().to_string())
        .collect();
    (!names.is_empty()).then(|| format!("{} changed", names.join(", ")))
}

/// What a watched directory's events are looked at for: any (a directory holding one
/// of the files, where a file is replaced by a rename), or only those naming one of
/// these entries (the directory above, where a whole directory of certificates is
/// renamed into place or its symlink swapped, and where other files, logs say, may be
/// written all the time).
type Interest = Option<BTreeSet<std::ffi::OsString>>;

/// The directories to watch for `files`: each file's own, and, for a file reached
/// through symlinks, the directory of the file it leads to now, where a secrets manager
/// may replace the file and leave the link alone; and the directories those are in, for
/// events naming them (the watch on a directory replaced follows it away).
fn watched_dirs(files: &[PathBuf]) -> BTreeMap<PathBuf, Interest> {
    let parent = |f: &Path| match f.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut own = BTreeSet::new();
    for f in files {
        own.insert(parent(f));
        if let Ok(real) = std::fs::canonicalize(f) {
            own.insert(parent(&real));
        }
    }
    let mut dirs: BTreeMap<PathBuf, Interest> = BTreeMap::new();
    for d in &own {
        let d = if d == Path::new(".") {
            match std::env::current_dir() {
                Ok(cwd) => cwd,
                Err(_) => continue,
            }
        } else {
            d.clone()
        };
        if let (Some(up), Some(name)) = (d.parent(), d.file_name()) {
            let up = if up.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                up.to_owned()
            };
            if let Some(names) = dirs.entry(up).or_insert_with(|| Some(BTreeSet::new())) {
                names.insert(name.to_owned());
            }
        }
    }
    for d in own {
        dirs.insert(d, None);
    }
    dirs
}

/// Watches files for changes; see the module doc.
struct Watch {
    files: Vec<PathBuf>,
    last: Vec<Stamp>,
    inotify: Option<AsyncFd<Inotify>>,
    /// Each watch's interest, by watch descriptor.
    interest: BTreeMap<i32, Interest>,
}

impl Watch {
    /// Sets the watches up now, so that nothing written after this returns is missed.
    /// Must be called within a runtime.
    fn new(files: Vec<PathBuf>) -> Self {
        let dirs = watched_dirs(&files);
        let last = stamps(&files);
        let mut interest = BTreeMap::new();
        let inotify = Inotify::new().and_then(|i| {
            for (d, what) in &dirs {
                match i.add(d) {
                    Ok(wd) => note_interest(&mut interest, wd, what.clone()),
                    // The directory above may not be readable; its own is.
                    Err(_) if what.is_some() => {}
                    Err(e) => return Err(e),
                }
            }
            // SAFETY: the AsyncFd owns the instance, whose descriptor stays open and
            // keeps its number until the AsyncFd drops it.
            unsafe { AsyncFd::register_with_interest(i, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)
        });
        let inotify = match inotify {
            Ok(i) => {
                tracing::info!(dirs = ?dirs.keys().collect::<Vec<_>>(), "watching the certificate files for changes");
                Some(i)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot watch the certificate files with inotify ({e}); checking them every {}s",
                    POLL.as_secs()
                );
                None
            }
        };
        Self {
            files,
            last,
            inotify,
            interest,
        }
    }

    /// Calls `reload` with the names of the changed files after each change, until
    /// `shutdown`.
    async fn run<F, Fut>(mut self, shutdown: CancellationToken, reload: F)
    where
        F: Fn(&str) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut buf = vec![0u8; 4096];
        loop {
            match &self.inotify {
                Some(fd) => {
                    // Wait for a first event that matters, then until the directories
                    // are quiet.
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            r = read_events(fd, &mut buf, &self.interest) => match r {
                                Ok(true) => break,
                                Ok(false) => {}
                                Err(_) => return,
                            },
                        }
                    }
                    let mut quiet_at = tokio::time::Instant::now() + SETTLE;
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep_until(quiet_at) => break,
                            r = read_events(fd, &mut buf, &self.interest) => match r {
                                Ok(true) => quiet_at = tokio::time::Instant::now() + SETTLE,
                                Ok(false) => {}
                                Err(_) => return,
                            },
                        }
                    }
                }
                None => tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(POLL) => {}
                },
            }
            if let Some(fd) = &self.inotify {
                // Watched again each time: a link may lead elsewhere now, and a directory
                // removed and made again lost its watch (adding one twice changes nothing).
                let mut interest = BTreeMap::new();
                for (d, what) in watched_dirs(&self.files) {
                    if let Ok(wd) = fd.get_ref().add(&d) {
                        note_interest(&mut interest, wd, what);
                    }
                }
                self.interest.extend(interest);
            }
            let now = stamps(&self.files);
            if let Some(cause) = changed(&self.files, &self.last, &now) {
                self.last = now;
                reload(&cause).await;
            }
        }
    }
}

/// Notes what watch `wd` is looked at for; two paths to one directory (a symlink)
/// share a watch, which then matters for either: any event wins, names add up.
fn note_interest(interest: &mut BTreeMap<i32, Interest>, wd: i32, what: Interest) {
    match (interest.get_mut(&wd), what) {
        (None, what) => {
            interest.insert(wd, what);
        }
        (Some(Some(names)), Some(more)) => names.extend(more),
        (Some(slot), None) => *slot = None,
        (Some(None), Some(_)) => {}
    }
}

/// Waits for and drains the pending events: whether one of them matters (see
/// [`Interest`]; an overflow of the queue does, as events may be lost).
async fn read_events(
    fd: &AsyncFd<Inotify>,
    buf: &mut [u8],
    interest: &BTreeMap<i32, Interest>,
) -> io::Result<bool> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|i| i.get_ref().read(buf)) {
            Ok(Ok(n)) => return Ok(matters(&buf[..n], interest)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
}

/// Whether the events in `bytes` (`struct inotify_event`s) hold one that matters.
fn matters(bytes: &[u8], interest: &BTreeMap<i32, Interest>) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    const HEADER: usize = size_of::<libc::inotify_event>();
    let mut at = 0;
    let mut any = false;
    while at + HEADER <= bytes.len() {
        let field = |off: usize| {
            let b: [u8; 4] = bytes[at + off..at + off + 4].try_into().unwrap_or_default();
            u32::from_ne_bytes(b)
        };
        let (wd, mask, len) = (field(0).cast_signed(), field(4), field(12) as usize);
        let name_bytes = bytes
            .get(at + HEADER..at + HEADER + len)
            .unwrap_or_default();
        let name =
            std::ffi::OsStr::from_bytes(name_bytes.split(|b| *b == 0).next().unwrap_or_default());
        at += HEADER + len;
        any |= mask & libc::IN_Q_OVERFLOW != 0
            || match interest.get(&wd) {
                Some(Some(names)) => names.contains(name),
                // A watch's own directory, or one replaced since (its new watch is
                // looked at once the events are read).
                Some(None) | None => true,
            };
    }
    any
}

/// An inotify instance (non-blocking).
struct Inotify {
    fd: OwnedFd,
}

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
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
        Ok(Self { fd })
    }

    /// Watches a directory for anything that may replace or change a file in it; the
    /// watch descriptor.
    fn add(&self, dir: &Path) -> io::Result<i32> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("path contains a nul byte"))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ATTRIB
            | libc::IN_MODIFY
            | libc::IN_ONLYDIR;
        // SAFETY: the descriptor is open and `c` a valid C string for the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
        }
        Ok(wd)
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch of `cert` running on its own task, and what it reports.
    struct Watching {
        causes: tokio::sync::mpsc::UnboundedReceiver<String>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Watching {
        fn start(watch: Watch) -> Self {
            let (tx, causes) = tokio::sync::mpsc::unbounded_channel();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(watch.run(shutdown.clone(), move |c| {
                let _ = tx.send(c.to_owned());
                async {}
            }));
            Self {
                causes,
                shutdown,
                task,
            }
        }

        /// The cause of the next reload, which must come within 10 s.
        async fn reload(&mut self, what: &str) -> String {
            tokio::time::timeout(Duration::from_secs(10), self.causes.recv())
                .await
                .unwrap_or_else(|_| panic!("{what} within 10 s"))
                .expect("the watch runs")
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_renamed_file_triggers_one_reload_and_a_touch_of_another_none() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("a.crt");
        std::fs::write(&cert, "one").unwrap();
        std::fs::write(dir.path().join("other"), "x").unwrap();
        let watch = Watch::new(vec![cert.clone()]);
        assert!(watch.inotify.is_some(), "inotify is available here");
        let mut w = Watching::start(watch);
        std::fs::write(dir.path().join("other"), "y").unwrap();
        let tmp = dir.path().join("a.crt.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &cert).unwrap();
        let cause = w.reload("a reload").await;
        assert!(cause.contains("a.crt changed"), "{cause}");
        // The other file's change alone triggered nothing more.
        std::fs::write(dir.path().join("other"), "z").unwrap();
        let more = tokio::time::timeout(SETTLE * 5, w.causes.recv()).await;
        assert!(more.is_err(), "{more:?}");
        w.stop().await;
    }

    #[tokio::test]
    async fn a_file_replaced_behind_a_symlink_into_another_directory_triggers_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (links, store, next) = (
            dir.path().join("links"),
            dir.path().join("store"),
            dir.path().join("next"),
        );
        for d in [&links, &store, &next] {
            std::fs::create_dir(d).unwrap();
        }
        let cert = links.join("a.crt");
        std::fs::write(store.join("a.crt"), "one").unwrap();
        std::os::unix::fs::symlink(store.join("a.crt"), &cert).unwrap();
        let mut w = Watching::start(Watch::new(vec![cert.clone()]));
        // The target replaced where it is, the link untouched.
        std::fs::write(store.join("a.crt.tmp"), "two").unwrap();
        std::fs::rename(store.join("a.crt.tmp"), store.join("a.crt")).unwrap();
        let cause = w.reload("a reload").await;
        assert!(cause.contains("a.crt changed"), "{cause}");
        // The link swapped to a file in a third directory; then that file replaced.
        std::fs::write(next.join("a.crt"), "three").unwrap();
        std::os::unix::fs::symlink(next.join("a.crt"), links.join("tmp")).unwrap();
        std::fs::rename(links.join("tmp"), &cert).unwrap();
        w.reload("a reload of the swapped link").await;
        std::fs::write(next.join("a.crt.tmp"), "four").unwrap();
        std::fs::rename(next.join("a.crt.tmp"), next.join("a.crt")).unwrap();
        w.reload("a reload of the swapped link's target being replaced")
            .await;
        w.stop().await;
    }

    /// A whole directory of certificates renamed into place (a deploy tool's
    /// `mv new current`): reloaded, and a later change in the new directory too.
    #[tokio::test]
    async fn a_directory_renamed_into_place_triggers_a_reload_and_is_watched_after() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join("current");
        std::fs::create_dir(&current).unwrap();
        let cert = current.join("a.crt");
        std::fs::write(&cert, "one").unwrap();
        let mut w = Watching::start(Watch::new(vec![cert.clone()]));
        // A log written all the time beside the directory: no reason to wait.
        let log = dir.path().join("busy.log");
        let writing = CancellationToken::new();
        let writer = tokio::spawn({
            let (log, writing) = (log.clone(), writing.clone());
            async move {
                while !writing.is_cancelled() {
                    std::fs::write(&log, "line").unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        let next = dir.path().join("next");
        std::fs::create_dir(&next).unwrap();
        std::fs::write(next.join("a.crt"), "two").unwrap();
        std::fs::rename(&current, dir.path().join("old")).unwrap();
        std::fs::rename(&next, &current).unwrap();
        let cause = w.reload("a reload").await;
        assert!(cause.contains("a.crt changed"), "{cause}");
        // The directory now in place is the one watched.
        std::fs::write(current.join("a.crt.tmp"), "three").unwrap();
        std::fs::rename(current.join("a.crt.tmp"), &cert).unwrap();
        let cause = w.reload("a second reload").await;
        assert!(cause.contains("a.crt changed"), "{cause}");
        writing.cancel();
        writer.await.unwrap();
        w.stop().await;
    }
}
