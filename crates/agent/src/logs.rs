//! Node output logs: the files a node's stdout and stderr go to, their size-bounded
//! rotation, and reading them back ([`NodeLogs::tail`], [`NodeLogs::follow`]).
//!
//! # Pipes and the log keeper
//!
//! Where the agent runs a log keeper ([`crate::keeper`]) a node writes into pipes and
//! the keeper alone writes these files, rotating by rename before a write would pass
//! `max_bytes` (whole lines; see [`crate::keeper::writer`]): the files never exceed the
//! bound and nothing is dropped. What follows describes the fallback, where there is no
//! keeper, and nodes adopted from an agent without one: files the node writes itself.
//! Reading is the same for both.
//!
//! # Files the node holds open
//!
//! Nodes outlive the agent: the agent may be SIGKILLed and restarted while its nodes run
//! on. So a node's stdout and stderr are not pipes to the agent (a pipe nobody reads
//! blocks the node once full, and one whose reader died raises SIGPIPE) but two regular
//! files in the node's directory, `stdout.log` and `stderr.log`, that the node itself
//! holds open: [`NodeLogs::open_for_child`] opens them `O_WRONLY|O_APPEND|O_CREAT`
//! (a new file gets mode 0640) and the agent passes them to the child as its stdout and
//! stderr. Nothing is lost and nothing blocks while no agent runs; the files then just
//! grow past their bound until an agent rotates them again.
//!
//! # Rotation: copy the head and the rest, truncate
//!
//! The node keeps its descriptor, so the agent cannot rename the file away (the node
//! would go on writing to the renamed file). [`NodeLogs::check`] (and
//! [`NodeLogs::rotate_if_needed`]) instead, for a stream whose file is larger than
//! [`LogConfig::max_bytes`]:
//!
//! 1. shifts the rotated files (`.1` → `.2`, …), deleting what would go past
//!    [`LogConfig::keep`], so that the copy never makes one file too many;
//! 2. copies the head, the file's whole lines up to `max_bytes`, into
//!    `<stream>.log.tmp` (in the kernel where it can, with `copy_file_range`) and renames
//!    it to `<stream>.log.1`, keeping its descriptor open;
//! 3. reads the rest, what lies past the head, into memory, and reads the file's size
//!    (`lseek(SEEK_END)`): while it grew, reads the new bytes too (at most 16 more
//!    rounds). Of the rest it keeps the last eighth of `max_bytes`;
//! 4. truncates the file to 0 right after a size check that showed no growth, and
//!    appends the kept rest to `.1`: when the rest was larger, after a line
//!    `[drover: N bytes dropped]` and from the first line that starts in it. Because the
//!    node's descriptor has `O_APPEND`, its next write goes to offset 0 of the emptied
//!    file (a writer without `O_APPEND` would leave a sparse hole instead).
//!
//! So a rotated file holds at most `max_bytes` of whole lines (a line longer than the
//! last [`MAX_LINE_BYTES`] before the limit is cut there) and then what the node wrote
//! while it was rotated, at most an eighth of `max_bytes` and a marker; at an ordinary
//! rate that is the line or two written since the file passed the bound, and nothing is
//! dropped. A node that outruns the agent loses what it wrote between the head and the
//! kept rest; those bytes are counted ([`NodeLogs::dropped`], [`dropped_bytes`], the
//! agent's `drover_agent_log_dropped_bytes_total`) and the marker line says where.
//!
//! A node that outran the agent (its file's last rotation dropped bytes) gets room: the
//! next head is smaller by twice how far past the bound the file had grown by that
//! truncation (at most a quarter of `max_bytes`; see `PRESSURE`), so that while it writes
//! flat out the rotated files leave the current one space for what it writes during a
//! rotation. The room fades as rotations stop dropping.
//!
//! The copy is synced (`fsync`) after the truncation, and by the log watcher off its own
//! thread (a sync can take longer than a fast node needs to write the bound many times
//! over): a power loss right after a rotation can lose the copy.
//!
//! ## The bound, and who holds it
//!
//! While an agent runs, its log watcher ([`crate::logwatch`]) checks a file as soon as
//! the node writes to it (inotify), so a stream's files stay within
//! `(keep + 1) * max_bytes`, plus per rotated file what the node wrote while it was
//! rotated (above), plus what the node writes until the watcher's next check. While the
//! watcher keeps pace that is a few kilobytes, also for a node writing flat out (it then
//! rotates every couple of milliseconds); but a node keeps writing while the watcher
//! waits for a core or for the disk. Measured on a shared 2-core VM (load 3 to 12) with
//! testprog writing tens of megabytes a second and a bound of 192 KiB: the median sample
//! within the bound, a fifth to a half of the samples over it, peaks of 2 to 5 MB, where
//! without the watcher the files grew by the whole output. While no agent runs the files
//! grow unchecked (nothing blocks the node); the next agent checks every node's files
//! when it starts and brings them within the bound at once, dropping (and counting) what
//! does not fit.
//!
//! ## What can still be lost
//!
//! The `write()` calls that the node completes between the last size check of step 4
//! and the moment the `ftruncate` that follows it takes effect (when it gets the inode
//! lock). The two are consecutive system calls on a descriptor the agent already holds,
//! with no I/O, allocation or lock of the agent's between them, so the window is
//! normally a few microseconds; it grows when the agent's thread is preempted between
//! the two calls, or when the `ftruncate` waits for the inode lock or the filesystem's
//! journal while the node keeps writing (on a VM under heavy CPU and disk load, up to
//! some tens of milliseconds of a node's output). These losses are not counted. Closing
//! the window entirely would need `fallocate(FALLOC_FL_COLLAPSE_RANGE)` (only some
//! filesystems, only whole blocks) or stopping the node's processes around steps 3
//! and 4.
//!
//! Linux serialises `write` and `ftruncate` on the inode lock, so each `write()` call is
//! kept or lost as a whole; a line written in one call (as line-buffered stdio does) is
//! never cut, except that `.1` can end in the start of a write that fell into the
//! window. A line the node emits in several calls can be split, its start at the end of
//! `.1` and its rest at the start of the new file.
//!
//! Outside that window rotation loses nothing it does not count, also when the agent
//! dies during it: before the truncation the original is untouched (a stale `.tmp` is
//! overwritten by the next rotation), and between the rename and the truncation the head
//! is both in `.1` and in the current file (it shows twice, it is not lost); only the
//! rest held in memory between the truncation and its write to `.1` is lost with the
//! agent.
//!
//! # Reading
//!
//! [`NodeLogs::tail`] reads backwards from the end in 64 KiB chunks and continues into
//! `.1`, `.2`, … when the current file has too few lines. [`NodeLogs::follow`] polls the
//! file's size from a tokio task and streams complete new lines. Lines are returned
//! without their `'\n'` (and without a `'\r'` before it), decoded lossily as UTF-8, and
//! cut at [`MAX_LINE_BYTES`] with [`TRUNCATION_MARK`] appended.
//!
//! Rotation is blocking file I/O: async code calls it through `spawn_blocking`. All
//! rotations in the process are serialised on one lock, so the log watcher, the
//! supervisor and any other [`NodeLogs`] value never rotate the same files at once.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{self, MissedTickBehavior};

/// Mode of the log files and rotated copies the agent creates.
pub const LOG_FILE_MODE: u32 = 0o640;
/// Lines longer than this many bytes are cut to it (at a character boundary) and get
/// [`TRUNCATION_MARK`] appended.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Appended to a line that was cut at [`MAX_LINE_BYTES`].
pub const TRUNCATION_MARK: &str = "…";
/// Capacity of the channel [`NodeLogs::follow`] returns.
pub const FOLLOW_CHANNEL_CAPACITY: usize = 1024;

/// Chunk size of backward reads in [`NodeLogs::tail`].
const TAIL_CHUNK: usize = 64 * 1024;
/// Rounds of copying the tail that grew during a rotation's copy, before truncating anyway.
const CATCH_UP_ROUNDS: u32 = 16;
/// How long a follower waits for room in the channel before it starts dropping lines.
const FOLLOW_SEND_WAIT: Duration = Duration::from_secs(1);
/// Read size of a follower.
const FOLLOW_READ_CHUNK: usize = 64 * 1024;
/// Most bytes a follower reads in one poll, so that a fast writer cannot starve it.
const FOLLOW_MAX_READ_PER_POLL: u64 = 8 * 1024 * 1024;
/// Bytes before its offset a follower re-reads to notice a truncated and regrown file.
const FOLLOW_CHECK_BYTES: usize = 64;
/// How many rotated files a follower looks through for the file it followed when that
/// was rotated away by rename.
const FOLLOW_ROTATED_SEARCH: u32 = 16;
/// Shortest poll interval a follower accepts.
const MIN_POLL: Duration = Duration::from_millis(10);

/// How long a followed line without its newline waits, the file not growing, before it
/// is shown as it is.
const PARTIAL_AFTER: Duration = Duration::from_secs(1);

/// Most bytes [`NodeLogs::follow_from`] sends of what was written before it started.
pub const FROM_MARK_MAX_BYTES: u64 = 1024 * 1024;

/// A place in a stream's file: its inode number (a rotation by rename gives the stream a
/// new one) and a length of it.
pub use drover_proto::model::LogMark as Mark;

/// A line a follower delivers, and where its stream's file stands after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line, without its newline.
    pub text: String,
    /// Just past its newline in its file (the current one, or a rotated one a resumed
    /// follow reads first); `None` for a line read from the rest of a file rotated or
    /// truncated under the follower, and for one the follower made (a notice).
    pub end: Option<Mark>,
}

impl Line {
    fn notice(text: String) -> Self {
        Self { text, end: None }
    }
}

impl PartialEq<&str> for Line {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

/// Size bound of a node's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// A stream's current file is rotated once it is larger than this.
    pub max_bytes: u64,
    /// Rotated files kept per stream (`.1` … `.keep`); 0 = rotation just empties the file.
    pub keep: u32,
}

impl Default for LogConfig {
    /// 10 MiB, 5 rotated files per stream.
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            keep: 5,
        }
    }
}

/// One of a node's two output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The node's standard output, `stdout.log`.
    Stdout,
    /// The node's standard error, `stderr.log`.
    Stderr,
}

impl Stream {
    /// Both streams, stdout first.
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    /// The stream's name, `stdout` or `stderr`.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// The name of the stream's current file in the node directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout.log",
            Stream::Stderr => "stderr.log",
        }
    }
}

/// What [`NodeLogs::check`] found.
#[derive(Debug, Default)]
pub struct Checked {
    /// The current file's size before any rotation (0 when missing).
    pub len: u64,
    /// When it was rotated: the rotated copy, to be synced (`sync_data`) once the
    /// caller can afford the wait.
    pub copy: Option<File>,
}

/// The output logs of one node, in its directory `<state-dir>/nodes/<name>/`.
#[derive(Debug, Clone)]
pub struct NodeLogs {
    dir: PathBuf,
    config: LogConfig,
}

impl NodeLogs {
    /// The logs in `dir` (the node directory), bounded by `config`. Touches no file.
    pub fn new(dir: impl Into<PathBuf>, config: LogConfig) -> Self {
        Self {
            dir: dir.into(),
            config,
        }
    }

    /// The node directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size bound.
    pub fn config(&self) -> LogConfig {
        self.config
    }

    /// The current file of a stream.
    pub fn path(&self, s: Stream) -> PathBuf {
        self.dir.join(s.file_name())
    }

    /// Rotated file number `index` (1 = newest) of a stream.
    pub fn rotated_path(&self, s: Stream, index: u32) -> PathBuf {
        self.dir.join(format!("{}.{index}", s.file_name()))
    }

    fn tmp_path(&self, s: Stream) -> PathBuf {
        self.dir.join(format!("{}.tmp", s.file_name()))
    }

    /// Opens (creating) both files for a child: `O_WRONLY|O_APPEND|O_CREAT`, close-on-exec
    /// in the agent (the child gets them as its fds 1 and 2 through `Stdio`). A file this
    /// call creates gets mode 0640 whatever the umask; an existing one keeps its mode.
    /// Creates the node directory if missing. Returns (stdout, stderr).
    pub fn open_for_child(&self) -> io::Result<(File, File)> {
        fs::create_dir_all(&self.dir).map_err(|e| with_path("creating", &self.dir, e))?;
        let open = |s: Stream| {
            let path = self.path(s);
            open_append(&path).map_err(|e| with_path("opening", &path, e))
        };
        Ok((open(Stream::Stdout)?, open(Stream::Stderr)?))
    }

    /// Where each stream's current file ends now (stdout, stderr), which is where the
    /// node's own output will begin: the directory of a node deployed again holds its
    /// earlier output. One `stat` per stream; nothing is made. A file not there yet (the
    /// log keeper makes it with the first line the node writes, so a new node that stays
    /// quiet costs no inodes) ends at its start: inode 0, which no file has, so a
    /// follower from this mark reads the file that appears from its first byte.
    pub fn marks(&self) -> io::Result<[Mark; 2]> {
        let mark = |s: Stream| {
            let path = self.path(s);
            match fs::metadata(&path) {
                Ok(meta) => Ok(Mark {
                    ino: meta.ino(),
                    len: meta.len(),
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Mark { ino: 0, len: 0 }),
                Err(e) => Err(with_path("reading", &path, e)),
            }
        };
        Ok([mark(Stream::Stdout)?, mark(Stream::Stderr)?])
    }

    /// Rotates each stream whose current file is larger than `max_bytes` (see the module
    /// doc), and returns the streams rotated. One `stat` per stream when there is nothing
    /// to do. Blocking.
    pub fn rotate_if_needed(&self) -> io::Result<Vec<Stream>> {
        let mut rotated = Vec::new();
        for s in Stream::ALL {
            if self.rotate_stream_if_needed(s)? {
                rotated.push(s);
            }
        }
        Ok(rotated)
    }

    /// Rotates one stream if its current file is larger than `max_bytes`; whether it
    /// did. One `stat` when there is nothing to do. Blocking.
    pub fn rotate_stream_if_needed(&self, s: Stream) -> io::Result<bool> {
        let c = self.check(s)?;
        if let Some(copy) = c.copy {
            copy.sync_data()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// As [`NodeLogs::rotate_stream_if_needed`], but tells the size seen and leaves the
    /// rotated copy's sync to the caller. Blocking.
    pub fn check(&self, s: Stream) -> io::Result<Checked> {
        let path = self.path(s);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Checked::default()),
            Err(e) => return Err(with_path("checking", &path, e)),
        };
        if len <= self.config.max_bytes {
            return Ok(Checked { len, copy: None });
        }
        let _serialised = ROTATION.lock().unwrap_or_else(PoisonError::into_inner);
        let copy = self
            .rotate(s)
            .map_err(|e| with_path("rotating", &path, e))?;
        Ok(Checked { len, copy })
    }

    /// Bytes of a stream dropped to hold the bound since this process started.
    pub fn dropped(&self, s: Stream) -> u64 {
        dropped_bytes(&self.path(s))
    }

    /// Rotates one stream if its file (still) exceeds the bound; see the module doc.
    /// Returns the rotated copy, still to be synced, if it rotated.
    fn rotate(&self, s: Stream) -> io::Result<Option<File>> {
        let path = self.path(s);
        // Read to copy, write only to truncate.
        let src = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let max = self.config.max_bytes;
        let size = src.metadata()?.len();
        if size <= max {
            return Ok(None);
        }
        if self.config.keep == 0 {
            self.drop_extra_rotated(s)?;
            src.set_len(0)?;
            return Ok(Some(src));
        }

        // 1. Room first, so that the copy never makes one file too many.
        self.shift_rotated(s)?;

        // 2. The head: whole lines up to `max_bytes` (less the room a node that outruns
        // the agent needs, see `PRESSURE`), into the copy, which becomes `.1` (its
        // descriptor stays open), so that `.1` is complete from the moment the file is
        // truncated.
        let pressure = pressure_of(&path);
        let room = pressure.saturating_mul(2).min(max / 4);
        let head = head_len(&src, size.min(max - room))?;
        let tmp = self.tmp_path(s);
        let mut copy = create_copy(&tmp)?;
        let copied = io::copy(&mut (&src).take(head), &mut copy);
        if let Err(e) = copied {
            // The original is untouched; a leftover copy would only waste space.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, self.rotated_path(s, 1))?;

        // 3. The rest, read until a size check right after a read shows no growth.
        let mut rest = Rest::new(rest_cap(max), head);
        let mut rounds = 0;
        loop {
            rest.read_to_end(&src)?;
            if rounds == CATCH_UP_ROUNDS {
                // Still growing: truncate right after this read reached the end.
                break;
            }
            // Loss window opens when this shows no growth ...
            if (&src).seek(SeekFrom::End(0))? <= rest.pos {
                break;
            }
            rounds += 1;
        }
        // ... and closes here. The node's next O_APPEND write lands at offset 0.
        src.set_len(0)?;
        let overshoot = rest.pos.saturating_sub(max);

        // 4. The rest goes onto the end of `.1` (after a marker when some of it was
        // dropped).
        let (dropped, tail) = rest.finish();
        copy.write_all(&tail)?;
        let pressure = if dropped > 0 {
            overshoot.max(pressure / 4 * 3)
        } else {
            pressure / 2
        };
        let mut pressures = PRESSURE.lock().unwrap_or_else(PoisonError::into_inner);
        if pressure > 0 {
            pressures.insert(path.clone(), pressure);
        } else {
            pressures.remove(&path);
        }
        drop(pressures);
        if dropped > 0 {
            let mut counts = DROPPED.lock().unwrap_or_else(PoisonError::into_inner);
            *counts.entry(path).or_default() += dropped;
        }
        Ok(Some(copy))
    }

    /// Makes room for a new `.1`: keeps the newest `keep - 1` rotated files, renumbered
    /// `.2` … `.keep` without gaps, and deletes the others.
    /// Removes a stream's rotated files beyond `keep` (left by a larger `keep` before):
    /// the bound holds from the moment a stream is written under the smaller one.
    pub(crate) fn drop_extra_rotated(&self, s: Stream) -> io::Result<()> {
        for i in self.rotated_indices(s)? {
            if i > self.config.keep {
                remove_if_exists(&self.rotated_path(s, i))?;
            }
        }
        Ok(())
    }

    pub(crate) fn shift_rotated(&self, s: Stream) -> io::Result<()> {
        let mut indices = self.rotated_indices(s)?;
        let room = usize::try_from(self.config.keep.saturating_sub(1)).unwrap_or(usize::MAX);
        for &i in indices.iter().skip(room) {
            remove_if_exists(&self.rotated_path(s, i))?;
        }
        indices.truncate(room);
        // indices[j] becomes j + 2. Targets grow by exactly 1 and sources by at least 1,
        // so the files moving down (target < source) come first, and doing those in
        // ascending order and then those moving up in descending order never renames
        // onto a file that has not moved yet.
        let target = |j: usize| u32::try_from(j + 2).unwrap_or(u32::MAX);
        for (j, &i) in indices.iter().enumerate() {
            if target(j) < i {
                fs::rename(self.rotated_path(s, i), self.rotated_path(s, target(j)))?;
            }
        }
        for (j, &i) in indices.iter().enumerate().rev() {
            if target(j) > i {
                fs::rename(self.rotated_path(s, i), self.rotated_path(s, target(j)))?;
            }
        }
        Ok(())
    }

    /// The numbers of a stream's rotated files present, ascending (newest first).
    fn rotated_indices(&self, s: Stream) -> io::Result<Vec<u32>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let prefix = format!("{}.", s.file_name());
        let mut indices = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            let Some(suffix) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            // Only canonical numbers: not "+1", "01" or "tmp".
            if let Ok(i) = suffix.parse::<u32>()
                && i > 0
                && i.to_string() == suffix
            {
                indices.push(i);
            }
        }
        indices.sort_unstable();
        Ok(indices)
    }

    /// The last `n` lines of a stream, oldest first: from the current file, then `.1`,
    /// `.2`, … while fewer than `n` were found. A final line without `'\n'` counts as a
    /// line (also at the end of a rotated file); missing files have no lines. A tail
    /// racing a rotation may miss or repeat lines. For a few lines; many go through
    /// [`NodeLogs::tail_each`].
    pub fn tail(&self, s: Stream, n: usize) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        self.tail_each(s, n, |line| {
            lines.push(line);
            true
        })?;
        Ok(lines)
    }

    /// The last `n` lines of a stream, oldest first, as [`NodeLogs::tail`] has them, each
    /// handed to `each` as it is read, until `each` says stop (returns false). What it
    /// holds stays bounded whatever `n` (a chunk and a line): the lines' start is found
    /// by counting backwards, then they are read forwards from there, each file up to
    /// the length it had when counted.
    pub fn tail_each(
        &self,
        s: Stream,
        n: usize,
        each: impl FnMut(String) -> bool,
    ) -> io::Result<()> {
        self.tail_each_in(s, n, TAIL_CHUNK, None, each)
    }

    /// [`NodeLogs::tail_each`], ending at `until` (where a follower began: see
    /// [`NodeLogs::follow_marked`]) rather than at the files' current end, so that a
    /// line written between the follower's start and this read is shown once, by the
    /// follower. Without the file `until` names (deleted since), as `tail_each`.
    pub fn tail_each_until(
        &self,
        s: Stream,
        n: usize,
        until: Option<Mark>,
        each: impl FnMut(String) -> bool,
    ) -> io::Result<()> {
        self.tail_each_in(s, n, TAIL_CHUNK, until, each)
    }

    /// [`NodeLogs::tail_each_until`], reading `chunk` bytes at a time.
    fn tail_each_in(
        &self,
        s: Stream,
        n: usize,
        chunk: usize,
        until: Option<Mark>,
        mut each: impl FnMut(String) -> bool,
    ) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        if n == 0 {
            return Ok(());
        }
        // Newest first: (file, offset of the first wanted byte, length when counted).
        let mut spans = Vec::new();
        let mut found = 0;
        let mut files: Vec<PathBuf> = std::iter::once(self.path(s))
            .chain(
                self.rotated_indices(s)?
                    .into_iter()
                    .map(|i| self.rotated_path(s, i)),
            )
            .collect();
        // Files newer than the one `until` names hold only what the follower delivers;
        // one that began before the current file existed (inode 0) delivers all of it.
        let mut cap = None;
        if let Some(m) = until {
            if m.ino == 0 {
                files.remove(0);
            } else if let Some(i) = files
                .iter()
                .position(|p| fs::metadata(p).is_ok_and(|meta| meta.ino() == m.ino))
            {
                files.drain(..i);
                cap = Some(m);
            }
        }
        for path in files {
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(with_path("opening", &path, e)),
            };
            let meta = f.metadata()?;
            let mut len = meta.len();
            if let Some(m) = cap.take()
                && meta.ino() == m.ino
            {
                len = len.min(m.len);
            }
            let (lines, start) = line_starts_back(&mut f, len, n - found, chunk)
                .map_err(|e| with_path("reading", &path, e))?;
            spans.push((path, start, len));
            found += lines;
            if found >= n {
                break;
            }
        }
        let mut buf = vec![0; chunk.max(1)];
        for (path, start, len) in spans.into_iter().rev() {
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(with_path("opening", &path, e)),
            };
            f.seek(SeekFrom::Start(start))?;
            let mut left = len - start;
            let mut split = LineSplitter::default();
            let mut lines = Vec::new();
            while left > 0 {
                let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                let got = read_full(&mut f, &mut buf[..want])
                    .map_err(|e| with_path("reading", &path, e))?;
                lines.clear();
                split.push_ends(&buf[..got], &mut lines);
                for (line, _) in lines.drain(..) {
                    if !each(line) {
                        return Ok(());
                    }
                }
                if got < want {
                    // Truncated under us (a rotation): what was complete was given.
                    break;
                }
                left -= got as u64;
            }
            if let Some(line) = split.finish()
                && !each(line)
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The last `n` lines of each stream joined with `'\n'` (Zeek's `NodeOutputs`):
    /// (stdout, stderr). A stream that cannot be read yields a one-line error note.
    pub fn outputs(&self, n: usize) -> (String, String) {
        let one = |s: Stream| match self.tail(s, n) {
            Ok(lines) => lines.join("\n"),
            Err(e) => format!("[drover: cannot read {}: {e}]", s.file_name()),
        };
        (one(Stream::Stdout), one(Stream::Stderr))
    }

    /// Follows a stream: a receiver of the complete lines written after this call. A
    /// trailing partial line is held until its `'\n'` arrives (one that was already
    /// being written at the call is delivered whole, if its start is within the last
    /// [`MAX_LINE_BYTES`]; after a [`NodeLogs::tail`], which shows it partial, it thus
    /// shows again, whole).
    ///
    /// A tokio task polls the file's size every `poll` (at least 10 ms) and ends once the
    /// receiver is dropped. It copes with the file not existing yet, with truncation
    /// (rotation included: what was written between its last read and a rotation is read
    /// back from `.1`), and with the file being replaced. The channel holds
    /// [`FOLLOW_CHANNEL_CAPACITY`] lines; when it stays full for a second, lines are
    /// dropped and replaced by one line `[drover: N lines dropped]` as soon as there is
    /// room again.
    ///
    /// Truncation is noticed when the file is shorter than the task's offset, or when the
    /// bytes just before that offset changed (checked whenever the file grew or its
    /// modification time changed). Lines written and rotated away within one poll
    /// interval, before the task saw any of them, are missed (they are in `.1`).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn follow(&self, s: Stream, poll: Duration) -> mpsc::Receiver<Line> {
        self.follow_marked(s, poll, None).0
    }

    /// Follows a stream from `mark` on, as [`NodeLogs::follow`] does from the end: the
    /// lines written since the file ended at `mark` come first, at most the last
    /// [`FROM_MARK_MAX_BYTES`] of them. Once the file was rotated since `mark` was
    /// taken, the rest of the rotated file `mark` is in and of the newer rotated files
    /// come first (or, past that bound or rotated away, a notice that they are skipped),
    /// then the current file from its start.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn follow_from(&self, s: Stream, poll: Duration, mark: Mark) -> mpsc::Receiver<Line> {
        self.follow_marked(s, poll, Some(mark)).0
    }

    /// [`NodeLogs::follow`] (without `from`) or [`NodeLogs::follow_from`], and where the
    /// follow begins (inode 0 while the file does not exist: the follower reads the file
    /// that appears from its first byte). When `from` is too far
    /// back, the first line says how many bytes were skipped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn follow_marked(
        &self,
        s: Stream,
        poll: Duration,
        from: Option<Mark>,
    ) -> (mpsc::Receiver<Line>, Option<Mark>) {
        spawn_follower(
            self.path(s),
            self.rotated_path(s, 1),
            poll,
            FOLLOW_SEND_WAIT,
            (),
            from,
        )
    }

    /// Total size in bytes of the node's log files: current, rotated and any leftover
    /// rotation copy. Unreadable entries count 0.
    pub fn disk_usage(&self) -> u64 {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                Stream::ALL.iter().any(|s| {
                    name.strip_prefix(s.file_name())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
                })
            })
            .filter_map(|e| e.metadata().ok())
            .filter(fs::Metadata::is_file)
            .map(|m| m.len())
            .sum()
    }
}

/// Serialises every rotation in the process, so that the log watcher, the supervisor and
/// any other [`NodeLogs`] value never rotate the same files at once.
static ROTATION: Mutex<()> = Mutex::new(());

/// Bytes dropped to hold the bound, by current log file, since this process started.
static DROPPED: Mutex<BTreeMap<PathBuf, u64>> = Mutex::new(BTreeMap::new());

/// For a file whose node outran the agent (its last rotation dropped bytes): how far past
/// the bound it had grown by that truncation, decaying by a quarter per such rotation and
/// halving with each that dropped nothing. The next head is smaller by twice that (at
/// most a quarter of the bound), which leaves the current file that room, so that the
/// files together stay near `(keep + 1) * max_bytes` while the node writes flat out.
static PRESSURE: Mutex<BTreeMap<PathBuf, u64>> = Mutex::new(BTreeMap::new());

fn pressure_of(path: &Path) -> u64 {
    PRESSURE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(path)
        .copied()
        .unwrap_or(0)
}

/// Bytes dropped to hold the bound from the log whose current file is `path`, since this
/// process started.
pub fn dropped_bytes(path: &Path) -> u64 {
    DROPPED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(path)
        .copied()
        .unwrap_or(0)
}

/// The most of what a node wrote past a rotation's head that goes onto the end of `.1`:
/// an eighth of the bound (at least a short line's worth). At an ordinary rate the rest is the line or
/// two written since the file passed the bound; what a node that outruns the agent wrote
/// beyond it is dropped.
fn rest_cap(max_bytes: u64) -> u64 {
    (max_bytes / 8).max(64)
}

/// The length of a rotation's head: up to and including the last `'\n'` before
/// `limit`, or `limit` when the last [`MAX_LINE_BYTES`] before it hold none.
fn head_len(f: &File, limit: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let from = limit.saturating_sub(MAX_LINE_BYTES as u64);
    let mut buf = vec![0; usize::try_from(limit - from).unwrap_or(MAX_LINE_BYTES)];
    let mut filled = 0;
    while filled < buf.len() {
        match f.read_at(&mut buf[filled..], from + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(match buf[..filled].iter().rposition(|&b| b == b'\n') {
        Some(i) => from + i as u64 + 1,
        None => limit,
    })
}

/// What a node wrote past a rotation's head: its last `cap` bytes are kept for `.1`, the
/// rest is dropped.
struct Rest {
    cap: u64,
    /// Offset in the file up to which it was read.
    pos: u64,
    kept: Vec<u8>,
    dropped: u64,
}

impl Rest {
    fn new(cap: u64, pos: u64) -> Self {
        Self {
            cap,
            pos,
            kept: Vec::new(),
            dropped: 0,
        }
    }

    /// Reads on to the end of `f`, skipping what could not be kept anyway.
    fn read_to_end(&mut self, f: &File) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = (&*f).seek(SeekFrom::End(0))?;
        if end >= self.pos + self.cap {
            let skip_to = end - self.cap;
            self.dropped += self.kept.len() as u64 + (skip_to - self.pos);
            self.kept.clear();
            self.pos = skip_to;
        }
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = match f.read_at(&mut buf, self.pos) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.pos += n as u64;
            self.kept.extend_from_slice(&buf[..n]);
            let excess = self
                .kept
                .len()
                .saturating_sub(usize::try_from(self.cap).unwrap_or(usize::MAX));
            if excess > 0 {
                self.kept.drain(..excess);
                self.dropped += excess as u64;
            }
        }
        Ok(())
    }

    /// The bytes dropped, and what goes onto `.1`: when something was dropped, a marker
    /// line, then the kept bytes from the first line that starts in them.
    fn finish(mut self) -> (u64, Vec<u8>) {
        if self.dropped == 0 {
            return (0, self.kept);
        }
        if let Some(i) = self.kept.iter().position(|&b| b == b'\n') {
            self.kept.drain(..=i);
            self.dropped += i as u64 + 1;
        }
        let mut back = drop_marker(self.dropped).into_bytes();
        back.extend_from_slice(&self.kept);
        (self.dropped, back)
    }
}

/// The line that stands where bytes were dropped to hold the bound.
pub fn drop_marker(bytes: u64) -> String {
    format!("[drover: {bytes} bytes dropped]\n")
}

fn with_path(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Sets [`LOG_FILE_MODE`] on a file the agent created (the umask may have cut it).
pub(crate) fn ensure_mode(f: &File) -> io::Result<()> {
    if f.metadata()?.permissions().mode() & 0o7777 != LOG_FILE_MODE {
        f.set_permissions(Permissions::from_mode(LOG_FILE_MODE))?;
    }
    Ok(())
}

/// Opens a log for appending, creating it with [`LOG_FILE_MODE`].
fn open_append(path: &Path) -> io::Result<File> {
    let created = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(LOG_FILE_MODE)
        .open(path);
    match created {
        Ok(f) => {
            ensure_mode(&f)?;
            Ok(f)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(path)
        }
        Err(e) => Err(e),
    }
}

/// Creates (or empties) a rotation copy with [`LOG_FILE_MODE`].
fn create_copy(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(LOG_FILE_MODE)
        .open(path)?;
    ensure_mode(&f)?;
    Ok(f)
}

/// Reads `r` (of length `len`) backwards in chunks of `chunk` bytes for the start of its
/// `want`-th last line: how many lines it found (at most `want`) and the offset where
/// the earliest of them begins. Lines end with `'\n'`; the bytes after the last one, if
/// any, are a line too. Reads only as far back as needed.
fn line_starts_back<R: Read + Seek>(
    r: &mut R,
    len: u64,
    want: usize,
    chunk: usize,
) -> io::Result<(usize, u64)> {
    if want == 0 || len == 0 {
        return Ok((0, len));
    }
    let chunk = chunk.max(1);
    let mut buf = vec![0; usize::try_from(len).map_or(chunk, |l| l.min(chunk))];
    let (mut found, mut start, mut pos) = (0, len, len);
    // Whether the line being crossed ends with '\n', and whether it has any byte.
    let (mut terminated, mut any) = (false, false);
    while pos > 0 {
        let n = usize::try_from(pos).map_or(chunk, |p| p.min(chunk));
        pos -= n as u64;
        r.seek(SeekFrom::Start(pos))?;
        if read_full(r, &mut buf[..n])? < n {
            // Truncated under us (a rotation): keep what was complete.
            return Ok((found, start));
        }
        let data = &buf[..n];
        let mut end = n;
        while let Some(i) = data[..end].iter().rposition(|&b| b == b'\n') {
            any |= i + 1 < end;
            // The empty "line" after a final '\n' is not a line.
            if terminated || any {
                found += 1;
                start = pos + i as u64 + 1;
                if found >= want {
                    return Ok((found, start));
                }
            }
            terminated = true;
            any = false;
            end = i;
        }
        any |= end > 0;
    }
    if terminated || any {
        found += 1;
        start = 0;
    }
    Ok((found, start))
}

/// Reads until `buf` is full or the end of the input; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Turns the first bytes of a line (at least `min(content_len, MAX_LINE_BYTES + 1)` of
/// them) whose content, without a final '\r', is `content_len` bytes into a string.
fn finish_line(mut bytes: Vec<u8>, content_len: usize) -> String {
    if content_len <= MAX_LINE_BYTES {
        bytes.truncate(content_len);
        return String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    }
    // Cut at MAX_LINE_BYTES, but not inside a multi-byte character.
    let mut end = MAX_LINE_BYTES.min(bytes.len());
    let floor = end.saturating_sub(3);
    while end > floor && end < bytes.len() && bytes[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    let mut line = String::from_utf8_lossy(&bytes[..end]).into_owned();
    line.push_str(TRUNCATION_MARK);
    line
}

/// Splits a byte stream into lines, holding the partial last one.
#[derive(Default)]
struct LineSplitter {
    /// The first MAX_LINE_BYTES + 1 bytes of the pending line.
    buf: Vec<u8>,
    /// The pending line's full length.
    len: usize,
}

impl LineSplitter {
    #[cfg(test)]
    fn push(&mut self, data: &[u8], lines: &mut Vec<String>) {
        let mut ends = Vec::new();
        self.push_ends(data, &mut ends);
        lines.extend(ends.into_iter().map(|(l, _)| l));
    }

    /// The lines `data` completes, each with how far into `data` its newline ends.
    fn push_ends(&mut self, data: &[u8], lines: &mut Vec<(String, usize)>) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.extend(&rest[..i]);
            let held_all = self.len == self.buf.len();
            let cr = held_all && self.buf.last() == Some(&b'\r');
            let len = self.len - usize::from(cr);
            self.len = 0;
            rest = &rest[i + 1..];
            let line = finish_line(std::mem::take(&mut self.buf), len);
            lines.push((line, data.len() - rest.len()));
        }
        self.extend(rest);
    }

    /// The pending line, which no `'\n'` ended (the end of a file), if it has a byte.
    fn finish(&mut self) -> Option<String> {
        if self.len == 0 {
            return None;
        }
        let held_all = self.len == self.buf.len();
        let cr = held_all && self.buf.last() == Some(&b'\r');
        let len = self.len - usize::from(cr);
        self.len = 0;
        Some(finish_line(std::mem::take(&mut self.buf), len))
    }

    fn extend(&mut self, bytes: &[u8]) {
        let room = (MAX_LINE_BYTES + 1).saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.len += bytes.len();
    }
}

/// The receiver of a follower's channel is gone.
struct Gone;

/// Spawns the task behind [`NodeLogs::follow`] (from the end) and
/// [`NodeLogs::follow_from`] (from `from`); it holds `guard` until it ends.
fn spawn_follower<G: Send + 'static>(
    path: PathBuf,
    rotated: PathBuf,
    poll: Duration,
    send_wait: Duration,
    guard: G,
    from: Option<Mark>,
) -> (mpsc::Receiver<Line>, Option<Mark>) {
    let (tx, rx) = mpsc::channel(FOLLOW_CHANNEL_CAPACITY);
    // The starting point is taken now, not when the task first runs, and the file held
    // from now on: lines written before its first read are read even if it is deleted.
    let opened = File::open(&path).ok();
    let start = opened.as_ref().and_then(|f| f.metadata().ok());
    let held = opened
        .zip(start.as_ref())
        .map(|(f, m)| (m.ino(), tokio::fs::File::from_std(f)));
    let follower = Follower {
        path,
        rotated,
        offset: 0,
        ino: start.as_ref().map(MetadataExt::ino),
        held,
        mtime: None,
        recent: Vec::new(),
        lines: LineSplitter::default(),
        dropped: 0,
        send_wait,
        partial_since: None,
        partial_seen: 0,
    };
    let mut catch_up = Vec::new();
    let start_len = match (&start, from) {
        (None, _) => 0,
        (Some(m), None) => m.len(),
        (Some(m), Some(mark)) => {
            let from = if m.ino() == mark.ino && m.len() >= mark.len {
                mark.len
            } else {
                0
            };
            // Rotated since the mark: what followed it in the rotated files comes first,
            // as long as that is within the bound; else a notice says it is skipped.
            let mut skipped = 0;
            if m.ino() != mark.ino && mark.ino != 0 {
                match rotated_since(&follower.path, mark, m.ino()) {
                    Some(files) => {
                        let rest: u64 = files.iter().map(|f| f.len - f.from).sum();
                        if rest + m.len() <= FROM_MARK_MAX_BYTES {
                            catch_up = files;
                        } else {
                            skipped = rest;
                        }
                    }
                    None => {
                        // The channel is empty: this cannot fail.
                        let _ = tx.try_send(Line::notice(
                            "[drover: what was written since the last line shown was rotated \
                             away; it is skipped]"
                                .to_owned(),
                        ));
                    }
                }
            }
            let start_len = from.max(m.len().saturating_sub(FROM_MARK_MAX_BYTES));
            skipped += start_len - from;
            if skipped > 0 {
                // The channel holds one notice at most: this cannot fail.
                let _ = tx.try_send(Line::notice(format!("[drover: {skipped} bytes skipped]")));
            }
            start_len
        }
    };
    // A file not there yet is read from its first byte once it appears: a follow
    // taken up again from this mark (inode 0, which no file has) does the same.
    let begins = Some(start.map_or(Mark { ino: 0, len: 0 }, |m| Mark {
        ino: m.ino(),
        len: start_len,
    }));
    tokio::spawn(async move {
        let _guard = guard;
        let mut follower = follower;
        if follower.catch_up(catch_up, &tx).await.is_err() {
            return;
        }
        follower.run(tx, poll, start_len).await;
    });
    (rx, begins)
}

/// The rest of a rotated file a follow resumes in: held open, read from `from`.
struct Rotated {
    file: File,
    ino: u64,
    from: u64,
    len: u64,
}

/// The rotated files of the stream at `path` that hold what was written after `mark`,
/// oldest first (the one `mark` is in, read from it, then the newer ones whole), held
/// open so that a rotation meanwhile cannot take them away; none past `current` (the
/// file followed now). `None` when `mark`'s file is no longer among them (or moved
/// while they were opened). Looks with `stat`; opens only the files it returns.
fn rotated_since(path: &Path, mark: Mark, current: u64) -> Option<Vec<Rotated>> {
    let name = |index: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{index}"));
        PathBuf::from(name)
    };
    // Newest first, up to the mark's file.
    let mut wanted = Vec::new();
    for index in 1..=MAX_ROTATED_SCAN {
        let meta = fs::metadata(name(index)).ok()?;
        if meta.ino() == current {
            // Rotated since the current file was opened: it is read as the current one.
            wanted.clear();
            continue;
        }
        wanted.push((index, meta.ino()));
        if meta.ino() == mark.ino {
            break;
        }
    }
    if wanted.last().map(|(_, ino)| *ino) != Some(mark.ino) {
        return None;
    }
    let mut files = Vec::new();
    for (index, ino) in wanted.into_iter().rev() {
        let file = File::open(name(index)).ok()?;
        let meta = file.metadata().ok()?;
        if meta.ino() != ino {
            return None;
        }
        files.push(Rotated {
            file,
            ino,
            from: if ino == mark.ino {
                mark.len.min(meta.len())
            } else {
                0
            },
            len: meta.len(),
        });
    }
    Some(files)
}

/// How many rotated files a resumed follow looks through for its mark's: as many as a
/// stream may keep.
const MAX_ROTATED_SCAN: u32 = drover_daemon::MAX_LOG_KEEP;

struct Follower {
    path: PathBuf,
    /// `.1`, where the rest of a truncated file is looked for.
    rotated: PathBuf,
    /// How far the file has been read.
    offset: u64,
    /// Inode of the file, once seen.
    ino: Option<u64>,
    /// The file read last and its inode, held open between polls: once the path names
    /// another file (rotated by rename, or deleted and created anew), what was written
    /// to this one after the last read is still read from here, even if it was deleted.
    held: Option<(u64, tokio::fs::File)>,
    /// Modification time at the last poll.
    mtime: Option<SystemTime>,
    /// The last (up to FOLLOW_CHECK_BYTES) bytes of the file before `offset`.
    recent: Vec<u8>,
    lines: LineSplitter,
    /// Lines dropped since the last one delivered.
    dropped: u64,
    /// How long to wait for room in the channel before dropping.
    send_wait: Duration,
    /// Since when a line without its newline has waited with the file not growing.
    partial_since: Option<std::time::Instant>,
    /// How many bytes of the pending line the reader has had already (the tail sent
    /// before the follow, or the mark it resumes from, ends inside it): not shown again.
    partial_seen: usize,
}

impl Follower {
    /// Sends the rest of each rotated file, lines marked in that file, before the
    /// current file is followed.
    async fn catch_up(&mut self, files: Vec<Rotated>, tx: &mpsc::Sender<Line>) -> Result<(), Gone> {
        for r in files {
            let mut f = tokio::fs::File::from_std(r.file);
            if f.seek(SeekFrom::Start(r.from)).await.is_err() {
                continue;
            }
            let mut at = r.from;
            let mut buf = vec![0u8; 64 * 1024];
            while at < r.len {
                let want = usize::try_from(r.len - at)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let n = match f.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mark = Mark {
                    ino: r.ino,
                    len: at,
                };
                self.deliver_bytes(&buf[..n], Some(mark), tx).await?;
                at += n as u64;
            }
        }
        Ok(())
    }

    async fn run(mut self, tx: mpsc::Sender<Line>, poll: Duration, start_len: u64) {
        self.seed(start_len).await;
        let mut tick = time::interval(poll.max(MIN_POLL));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = tick.tick() => {}
            }
            if self.poll_once(&tx).await.is_err() {
                return;
            }
        }
    }

    /// Starts at `start_len`, holding the partial line there as pending.
    async fn seed(&mut self, start_len: u64) {
        self.offset = start_len;
        if start_len == 0 {
            return;
        }
        let from = start_len.saturating_sub(MAX_LINE_BYTES as u64);
        let Ok(mut f) = tokio::fs::File::open(&self.path).await else {
            return;
        };
        let Ok(window) = read_exact_at(&mut f, from, start_len - from).await else {
            // Shrunk already: the first poll sees the truncation.
            return;
        };
        self.recent = window[window.len().saturating_sub(FOLLOW_CHECK_BYTES)..].to_vec();
        let mut none = Vec::new();
        match window.iter().rposition(|&b| b == b'\n') {
            Some(i) => self.lines.push_ends(&window[i + 1..], &mut none),
            None if from == 0 => self.lines.push_ends(&window, &mut none),
            // The partial line started before the window: only its rest will show.
            None => {}
        }
        self.partial_seen = self.lines.len;
    }

    async fn poll_once(&mut self, tx: &mpsc::Sender<Line>) -> Result<(), Gone> {
        let Ok(meta) = tokio::fs::metadata(&self.path).await else {
            if let Some(old) = self.ino.take() {
                // Removed: the rest of it, then whatever appears next is new.
                self.drain_held(old, tx).await?;
                self.reset();
            }
            return self.flush_dropped(tx);
        };
        // A deleted file held open keeps its inode number taken, so a new file at the
        // path always has another one.
        if let Some(old) = self.ino
            && old != meta.ino()
        {
            // Replaced by another file: rotated by rename (the log keeper's way), or
            // removed and created anew.
            self.replaced(old, meta.ino(), tx).await?;
            self.reset();
        }
        self.ino = Some(meta.ino());
        let mtime = meta.modified().ok();
        let touched = mtime != self.mtime;
        self.mtime = mtime;
        if meta.len() < self.offset {
            self.truncated(tx).await?;
        }
        // Same size but written to: truncated and regrown to exactly our offset?
        // `read_new` checks the bytes before the offset.
        let grows = meta.len() > self.offset;
        if grows || (touched && self.offset > 0) {
            self.read_new(tx).await?;
        }
        self.show_partial(grows, tx).await?;
        self.flush_dropped(tx)
    }

    /// A line without its newline (a prompt, or the last words of a node that failed)
    /// is shown once the file has not grown for [`PARTIAL_AFTER`], as `tail -f` shows
    /// it, rather than held for a newline that may never come; what the node writes to
    /// it later comes as a line of its own.
    async fn show_partial(&mut self, grew: bool, tx: &mpsc::Sender<Line>) -> Result<(), Gone> {
        if grew || self.lines.len <= self.partial_seen {
            self.partial_since = None;
            return Ok(());
        }
        let since = *self
            .partial_since
            .get_or_insert_with(std::time::Instant::now);
        if since.elapsed() < PARTIAL_AFTER {
            return Ok(());
        }
        self.partial_since = None;
        let seen = std::mem::take(&mut self.partial_seen);
        let Some(whole) = self.lines.finish() else {
            return Ok(());
        };
        // Only what the reader has not had.
        let mut cut = seen.min(whole.len());
        while !whole.is_char_boundary(cut) {
            cut -= 1;
        }
        let text = whole[cut..].to_owned();
        let end = self.ino.map(|ino| Mark {
            ino,
            len: self.offset,
        });
        self.deliver(Line { text, end }, tx).await
    }

    /// Delivers what the held file `old` got past our offset (it may be deleted by now);
    /// whether it was held.
    async fn drain_held(&mut self, old: u64, tx: &mpsc::Sender<Line>) -> Result<bool, Gone> {
        let Some((ino, mut f)) = self.held.take() else {
            return Ok(false);
        };
        if ino != old || f.seek(SeekFrom::Start(self.offset)).await.is_err() {
            return Ok(false);
        }
        let mut buf = vec![0; FOLLOW_READ_CHUNK];
        while let Ok(n @ 1..) = f.read(&mut buf).await {
            self.deliver_bytes(&buf[..n], None, tx).await?;
        }
        Ok(true)
    }

    /// The followed file was replaced: delivers what it got past our offset (from the
    /// file held open, or else from where it was renamed to), and every file rotated
    /// after it (a fast writer's files can rotate more than once between two polls) up
    /// to `current`, the file the path named when this poll looked, which is followed
    /// next: should it have been rotated too meanwhile, the next poll delivers it, once.
    async fn replaced(
        &mut self,
        old: u64,
        current: u64,
        tx: &mpsc::Sender<Line>,
    ) -> Result<(), Gone> {
        let drained = self.drain_held(old, tx).await?;
        let base = self.path.clone();
        let rotated = move |k: u32| {
            let mut p = base.clone().into_os_string();
            p.push(format!(".{k}"));
            PathBuf::from(p)
        };
        let mut found = None;
        for k in 1..=FOLLOW_ROTATED_SEARCH {
            match tokio::fs::metadata(rotated(k)).await {
                Ok(m) if m.ino() == old => {
                    found = Some(k);
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let Some(k) = found else {
            return Ok(());
        };
        let (mut from, newest_first) = if drained {
            (0, k - 1)
        } else {
            (self.offset, k)
        };
        for j in (1..=newest_first).rev() {
            let Ok(mut f) = tokio::fs::File::open(rotated(j)).await else {
                from = 0;
                continue;
            };
            if f.metadata().await.is_ok_and(|m| m.ino() == current) {
                break;
            }
            if f.seek(SeekFrom::Start(from)).await.is_ok() {
                let mut buf = vec![0; FOLLOW_READ_CHUNK];
                while let Ok(n @ 1..) = f.read(&mut buf).await {
                    self.deliver_bytes(&buf[..n], None, tx).await?;
                }
            }
            from = 0;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.offset = 0;
        self.recent.clear();
    }

    async fn read_new(&mut self, tx: &mpsc::Sender<Line>) -> Result<(), Gone> {
        let mut f = match self.held.take() {
            Some((ino, f)) if Some(ino) == self.ino => f,
            _ => {
                let Ok(f) = tokio::fs::File::open(&self.path).await else {
                    return Ok(());
                };
                // Replaced since the poll looked: the next poll reads the rest of the one
                // seen.
                match f.metadata().await {
                    Ok(m) if self.ino.is_some_and(|ino| ino != m.ino()) => return Ok(()),
                    _ => f,
                }
            }
        };
        let mut buf = vec![0; FOLLOW_CHECK_BYTES + FOLLOW_READ_CHUNK];
        let mut budget = FOLLOW_MAX_READ_PER_POLL;
        while budget > 0 {
            // The bytes before `offset` are read again by the same read() call as the new
            // ones: if they changed, the file was truncated (and maybe regrew) since they
            // were read, and the new bytes are not the continuation. Separate calls would
            // leave a truncation between the check and the read unnoticed.
            let k = self.recent.len();
            let Ok(n) = read_at(
                &mut f,
                self.offset - k as u64,
                &mut buf[..k + FOLLOW_READ_CHUNK],
            )
            .await
            else {
                break;
            };
            if n < k || buf[..k] != self.recent[..] {
                self.truncated(tx).await?;
                continue;
            }
            if n == k {
                break;
            }
            budget = budget.saturating_sub((n - k) as u64);
            let at = self.ino.map(|ino| Mark {
                ino,
                len: self.offset,
            });
            self.advance(&buf[k..n]);
            self.deliver_bytes(&buf[k..n], at, tx).await?;
        }
        self.held = self.ino.map(|ino| (ino, f));
        Ok(())
    }

    /// The file was truncated: deliver what it held past our offset from its copy in
    /// `.1` (if `.1` is that copy), then start over at offset 0.
    async fn truncated(&mut self, tx: &mpsc::Sender<Line>) -> Result<(), Gone> {
        if !self.recent.is_empty()
            && let Ok(mut f) = tokio::fs::File::open(&self.rotated).await
        {
            let n = self.recent.len() as u64;
            let is_copy = read_exact_at(&mut f, self.offset - n, n)
                .await
                .is_ok_and(|b| b == self.recent);
            if is_copy {
                let mut buf = vec![0; FOLLOW_READ_CHUNK];
                while let Ok(n @ 1..) = f.read(&mut buf).await {
                    self.deliver_bytes(&buf[..n], None, tx).await?;
                }
            }
        }
        self.reset();
        Ok(())
    }

    /// Notes that `data` was read from the file at `offset`.
    fn advance(&mut self, data: &[u8]) {
        self.offset += data.len() as u64;
        self.recent.extend_from_slice(data);
        let excess = self.recent.len().saturating_sub(FOLLOW_CHECK_BYTES);
        self.recent.drain(..excess);
    }

    /// Delivers the lines `data` completes; `at` is where `data` begins in the current
    /// file, if it was read from there.
    async fn deliver_bytes(
        &mut self,
        data: &[u8],
        at: Option<Mark>,
        tx: &mpsc::Sender<Line>,
    ) -> Result<(), Gone> {
        let mut lines = Vec::new();
        self.lines.push_ends(data, &mut lines);
        if !lines.is_empty() {
            // The pending line now is a new one.
            self.partial_seen = 0;
        }
        for (text, end) in lines {
            let end = at.map(|m| Mark {
                ino: m.ino,
                len: m.len + end as u64,
            });
            self.deliver(Line { text, end }, tx).await?;
        }
        Ok(())
    }

    /// Sends a line, waiting up to `send_wait` for room; drops it instead once the
    /// channel stayed full that long, and until the drop notice could be sent.
    async fn deliver(&mut self, line: Line, tx: &mpsc::Sender<Line>) -> Result<(), Gone> {
        self.flush_dropped(tx)?;
        if self.dropped > 0 {
            self.dropped += 1;
            return Ok(());
        }
        let permit = if self.send_wait.is_zero() {
            match tx.try_reserve() {
                Ok(permit) => Some(permit),
                Err(TrySendError::Full(())) => None,
                Err(TrySendError::Closed(())) => return Err(Gone),
            }
        } else {
            match time::timeout(self.send_wait, tx.reserve()).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) => return Err(Gone),
                Err(_) => None,
            }
        };
        match permit {
            Some(permit) => permit.send(line),
            None => self.dropped += 1,
        }
        Ok(())
    }

    /// Sends the drop notice if lines were dropped and there is room.
    fn flush_dropped(&mut self, tx: &mpsc::Sender<Line>) -> Result<(), Gone> {
        if self.dropped == 0 {
            return Ok(());
        }
        match tx.try_send(Line::notice(format!(
            "[drover: {} lines dropped]",
            self.dropped
        ))) {
            Ok(()) => self.dropped = 0,
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Closed(_)) => return Err(Gone),
        }
        Ok(())
    }
}

/// One read() call at `pos`; returns the bytes read (0 at the end).
async fn read_at(f: &mut tokio::fs::File, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
    f.seek(SeekFrom::Start(pos)).await?;
    loop {
        match f.read(buf).await {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            res => return res,
        }
    }
}

/// Reads exactly `n` bytes at `pos`.
async fn read_exact_at(f: &mut tokio::fs::File, pos: u64, n: u64) -> io::Result<Vec<u8>> {
    let n = usize::try_from(n).map_err(|_| io::Error::other("read too large"))?;
    f.seek(SeekFrom::Start(pos)).await?;
    let mut buf = vec![0; n];
    f.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::io::{BufWriter, Write};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use tokio::sync::mpsc::error::TryRecvError;
    use tokio::sync::oneshot;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);
    const POLL: Duration = Duration::from_millis(10);

    fn logs(dir: &Path, max_bytes: u64, keep: u32) -> NodeLogs {
        NodeLogs::new(dir, LogConfig { max_bytes, keep })
    }

    fn append(path: &Path, data: &[u8]) {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap();
        f.write_all(data).unwrap();
    }

    fn strings(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| (*l).to_owned()).collect()
    }

    /// All files of a stream, oldest first, the current one last.
    fn stream_files(logs: &NodeLogs, s: Stream) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = logs
            .rotated_indices(s)
            .unwrap()
            .into_iter()
            .rev()
            .map(|i| logs.rotated_path(s, i))
            .collect();
        files.push(logs.path(s));
        files
    }

    /// Lines of all files of a stream, oldest file first, as read whole.
    fn all_lines(logs: &NodeLogs, s: Stream) -> Vec<String> {
        let mut lines = Vec::new();
        for f in stream_files(logs, s) {
            let bytes = fs::read(f).unwrap();
            lines.extend(String::from_utf8_lossy(&bytes).lines().map(str::to_owned));
        }
        lines
    }

    async fn next(rx: &mut mpsc::Receiver<Line>) -> String {
        next_line(rx).await.text
    }

    async fn next_line(rx: &mut mpsc::Receiver<Line>) -> Line {
        time::timeout(WAIT, rx.recv())
            .await
            .expect("no line within the deadline")
            .expect("follower ended")
    }

    /// The status flags of an open file, from /proc (None where there is none).
    fn fd_flags(f: &File) -> Option<u32> {
        use std::os::fd::AsRawFd;
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).ok()?;
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
        u32::from_str_radix(flags.trim(), 8).ok()
    }

    #[test]
    fn open_for_child_creates_0640_append_files() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(&dir.path().join("nodes/n1"), 1 << 20, 5);
        let (mut out1, mut err1) = logs.open_for_child().unwrap();
        let (mut out2, _err2) = logs.open_for_child().unwrap();
        for s in Stream::ALL {
            let mode = fs::metadata(logs.path(s)).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o640, "{s:?}");
        }
        if let Some(flags) = fd_flags(&out1) {
            const O_ACCMODE: u32 = 0o3;
            const O_WRONLY: u32 = 0o1;
            const O_APPEND: u32 = 0o2000;
            assert_eq!(flags & O_ACCMODE, O_WRONLY);
            assert_ne!(flags & O_APPEND, 0);
        }
        out1.write_all(b"a1\n").unwrap();
        out2.write_all(b"b1\n").unwrap();
        out1.write_all(b"a2\n").unwrap();
        err1.write_all(b"e\n").unwrap();
        assert_eq!(
            fs::read_to_string(logs.path(Stream::Stdout)).unwrap(),
            "a1\nb1\na2\n"
        );
        assert_eq!(
            fs::read_to_string(logs.path(Stream::Stderr)).unwrap(),
            "e\n"
        );
        // Reopening appends to what is there.
        let (mut out3, _) = logs.open_for_child().unwrap();
        out3.write_all(b"c\n").unwrap();
        assert_eq!(
            logs.tail(Stream::Stdout, 10).unwrap(),
            strings(&["a1", "b1", "a2", "c"])
        );
    }

    #[test]
    fn tail_counts_lines() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let path = logs.path(Stream::Stdout);
        assert!(logs.tail(Stream::Stdout, 3).unwrap().is_empty(), "missing");
        fs::write(&path, "").unwrap();
        assert!(logs.tail(Stream::Stdout, 3).unwrap().is_empty(), "empty");

        fs::write(&path, "a\nb\nc\n").unwrap();
        assert!(logs.tail(Stream::Stdout, 0).unwrap().is_empty());
        assert_eq!(logs.tail(Stream::Stdout, 2).unwrap(), strings(&["b", "c"]));
        assert_eq!(
            logs.tail(Stream::Stdout, 10).unwrap(),
            strings(&["a", "b", "c"])
        );

        fs::write(&path, "a\nb").unwrap();
        assert_eq!(logs.tail(Stream::Stdout, 1).unwrap(), strings(&["b"]));
        assert_eq!(logs.tail(Stream::Stdout, 5).unwrap(), strings(&["a", "b"]));

        fs::write(&path, "a\r\n\r\n\nb\r\nc").unwrap();
        assert_eq!(
            logs.tail(Stream::Stdout, 9).unwrap(),
            strings(&["a", "", "", "b", "c"])
        );
        fs::write(&path, "\n").unwrap();
        assert_eq!(logs.tail(Stream::Stdout, 9).unwrap(), strings(&[""]));

        fs::write(&path, b"ok \xff\xfe bytes\n").unwrap();
        assert_eq!(
            logs.tail(Stream::Stdout, 1).unwrap(),
            strings(&["ok \u{fffd}\u{fffd} bytes"])
        );
    }

    /// The lines of `data` as a reader of whole files would see them.
    fn naive_lines(data: &[u8]) -> Vec<String> {
        let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
            .into_iter()
            .map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                finish_line(l.to_vec(), l.len())
            })
            .collect()
    }

    /// `tail` and `tail_each` give the last lines of a plain split of the files, for any
    /// count, across rotated files with and without a final newline, CRLF, long lines
    /// and odd bytes, at any chunk size.
    #[test]
    fn tail_gives_the_last_lines_of_the_files() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let s = Stream::Stdout;
        for round in 0..80 {
            for i in 0..4 {
                let path = if i == 0 {
                    logs.path(s)
                } else {
                    logs.rotated_path(s, i)
                };
                let _ = fs::remove_file(&path);
                if random() % 5 == 0 {
                    continue;
                }
                let len = usize::try_from(random() % 40).unwrap();
                let mut data: Vec<u8> = (0..len)
                    .map(|_| match random() % 8 {
                        0 | 1 => b'\n',
                        2 => b'\r',
                        3 => 0xc3,
                        _ => b'a' + u8::try_from(random() % 3).unwrap(),
                    })
                    .collect();
                if round % 10 == 0 {
                    // A line past the cap.
                    data.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 2));
                    data.extend_from_slice(b"\r\n");
                }
                fs::write(&path, &data).unwrap();
            }
            // Each file's lines, oldest file first, as a plain split has them.
            let mut all = Vec::new();
            for i in (0..4).rev() {
                let path = if i == 0 {
                    logs.path(s)
                } else {
                    logs.rotated_path(s, i)
                };
                if let Ok(data) = fs::read(&path) {
                    all.extend(naive_lines(&data));
                }
            }
            // Byte by byte through the long line would take long for nothing.
            let chunks: &[usize] = if round % 10 == 0 {
                &[4096, TAIL_CHUNK]
            } else {
                &[1, 3, 16, TAIL_CHUNK]
            };
            for n in (0..=all.len() + 2).chain([usize::MAX]) {
                let want = &all[all.len().saturating_sub(n)..];
                assert_eq!(logs.tail(s, n).unwrap(), want, "round {round}, n {n}");
                for &chunk in chunks {
                    let mut got = Vec::new();
                    logs.tail_each_in(s, n, chunk, None, |l| {
                        got.push(l);
                        true
                    })
                    .unwrap();
                    assert_eq!(got, want, "round {round}, n {n}, chunk {chunk}");
                }
            }
            // A consumer that stops is not handed more.
            let mut got = 0;
            logs.tail_each(s, usize::MAX, |_| {
                got += 1;
                got < 2
            })
            .unwrap();
            assert_eq!(got, all.len().min(2));
        }
    }

    #[test]
    fn a_tail_ends_where_its_follower_began() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 30, 5);
        let (cur, old) = (
            logs.path(Stream::Stdout),
            logs.rotated_path(Stream::Stdout, 1),
        );
        let tail = |until: Option<Mark>| {
            let mut got = Vec::new();
            logs.tail_each_until(Stream::Stdout, 10, until, |l| {
                got.push(l);
                true
            })
            .unwrap();
            got
        };
        fs::write(&old, "a\nb\n").unwrap();
        fs::write(&cur, "c\nd\n").unwrap();
        let mark = |p: &Path, len| Mark {
            ino: fs::metadata(p).unwrap().ino(),
            len,
        };
        // Begun after `c`: `d`, written since, is the follower's to show.
        assert_eq!(tail(Some(mark(&cur, 2))), ["a", "b", "c"]);
        assert_eq!(tail(None), ["a", "b", "c", "d"]);
        // Begun in a file rotated since: nothing of the newer one either.
        assert_eq!(tail(Some(mark(&old, 2))), ["a"]);
        // A file gone since: the whole tail.
        let gone = Mark {
            ino: u64::MAX,
            len: 0,
        };
        assert_eq!(tail(Some(gone)), ["a", "b", "c", "d"]);
    }

    #[test]
    fn tail_caps_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 30, 5);
        let path = logs.path(Stream::Stdout);
        let mut data = "x".repeat(200 * 1024);
        data.push_str("\nshort\n");
        // 80 001 bytes; MAX_LINE_BYTES falls inside an 'é'.
        data.push('x');
        data.push_str(&"é".repeat(40_000));
        data.push('\n');
        data.push_str(&"y".repeat(MAX_LINE_BYTES));
        data.push_str("\r\n");
        fs::write(&path, &data).unwrap();

        for chunk in [TAIL_CHUNK, 1000, 4096 + 3] {
            let mut out = Vec::new();
            logs.tail_each_in(Stream::Stdout, 10, chunk, None, |l| {
                out.push(l);
                true
            })
            .unwrap();
            assert_eq!(out.len(), 4, "chunk {chunk}");
            assert_eq!(out[0], format!("{}…", "x".repeat(MAX_LINE_BYTES)));
            assert_eq!(out[1], "short");
            assert!(out[2].ends_with(TRUNCATION_MARK));
            let body = out[2].strip_suffix(TRUNCATION_MARK).unwrap();
            let body = body.strip_prefix('x').unwrap();
            assert!(body.chars().all(|c| c == 'é'), "cut inside a character");
            assert_eq!(body.len(), MAX_LINE_BYTES - 2);
            assert_eq!(out[3], "y".repeat(MAX_LINE_BYTES), "'\\r' is not content");
        }
        assert_eq!(
            logs.tail(Stream::Stdout, 1).unwrap()[0].len(),
            MAX_LINE_BYTES
        );
    }

    /// Counts the bytes read through it.
    struct Counting<R> {
        inner: R,
        read: u64,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    impl<R: Seek> Seek for Counting<R> {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    #[test]
    fn tail_of_a_huge_file_reads_only_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 30, 5);
        let path = logs.path(Stream::Stdout);
        let total = 1_500_000;
        {
            let mut w = BufWriter::new(File::create(&path).unwrap());
            for i in 0..total {
                writeln!(w, "line {i:08}").unwrap();
            }
            w.flush().unwrap();
        }
        let len = fs::metadata(&path).unwrap().len();
        assert!(len > 20_000_000);

        let started = Instant::now();
        let lines = logs.tail(Stream::Stdout, 10).unwrap();
        let took = started.elapsed();
        let expected: Vec<String> = (total - 10..total)
            .map(|i| format!("line {i:08}"))
            .collect();
        assert_eq!(lines, expected);

        let mut r = Counting {
            inner: File::open(&path).unwrap(),
            read: 0,
        };
        let (found, start) = line_starts_back(&mut r, len, 10, TAIL_CHUNK).unwrap();
        assert_eq!((found, start), (10, len - 10 * 14));
        assert_eq!(r.read, TAIL_CHUNK as u64, "read more than one chunk");
        assert!(took < Duration::from_secs(5), "tail took {took:?}");
    }

    #[test]
    fn tail_continues_into_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let s = Stream::Stderr;
        fs::write(logs.rotated_path(s, 2), "1\n2\n").unwrap();
        fs::write(logs.rotated_path(s, 1), "3\n4").unwrap();
        fs::write(logs.path(s), "5\n6\n").unwrap();
        assert_eq!(logs.tail(s, 2).unwrap(), strings(&["5", "6"]));
        assert_eq!(logs.tail(s, 3).unwrap(), strings(&["4", "5", "6"]));
        assert_eq!(
            logs.tail(s, 5).unwrap(),
            strings(&["2", "3", "4", "5", "6"])
        );
        assert_eq!(
            logs.tail(s, 100).unwrap(),
            strings(&["1", "2", "3", "4", "5", "6"])
        );
        assert!(logs.tail(Stream::Stdout, 100).unwrap().is_empty());

        // Gaps and an empty current file (just rotated).
        fs::remove_file(logs.rotated_path(s, 1)).unwrap();
        fs::write(logs.path(s), "").unwrap();
        fs::write(logs.rotated_path(s, 3), "0\n").unwrap();
        assert_eq!(logs.tail(s, 2).unwrap(), strings(&["1", "2"]));
        assert_eq!(logs.tail(s, 9).unwrap(), strings(&["0", "1", "2"]));

        let (out, err) = logs.outputs(2);
        assert_eq!(out, "");
        assert_eq!(err, "1\n2");
    }

    #[test]
    fn rotation_keeps_every_line_in_order_and_bounds_disk_use() {
        let dir = tempfile::tempdir().unwrap();
        let (max_bytes, keep) = (1000, 3);
        let logs = logs(dir.path(), max_bytes, keep);
        let (mut node_out, _node_err) = logs.open_for_child().unwrap();
        assert!(logs.rotate_if_needed().unwrap().is_empty());

        let batch = 11;
        let batch_bytes = (batch * "n 000000\n".len()) as u64;
        let mut rotations = 0;
        for i in 0..5000 {
            writeln!(node_out, "n {i:06}").unwrap();
            if i % batch == batch - 1 {
                let rotated = logs.rotate_if_needed().unwrap();
                assert!(rotated.iter().all(|&s| s == Stream::Stdout));
                rotations += rotated.len();
                let usage = logs.disk_usage();
                assert!(
                    usage <= (u64::from(keep) + 1) * (max_bytes + batch_bytes),
                    "disk use {usage}"
                );
            }
        }
        assert!(rotations > 30, "{rotations} rotations");
        assert_eq!(logs.rotated_indices(Stream::Stdout).unwrap(), [1, 2, 3]);
        assert!(!logs.tmp_path(Stream::Stdout).exists());
        for i in 1..=keep {
            let meta = fs::metadata(logs.rotated_path(Stream::Stdout, i)).unwrap();
            // Whole lines up to the bound, then what came until the truncation.
            assert!(meta.len() > max_bytes - 9 && meta.len() <= max_bytes + batch_bytes);
            assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        }

        // Consecutive up to the last line written: nothing lost, nothing repeated.
        let lines = all_lines(&logs, Stream::Stdout);
        let numbers: Vec<u32> = lines
            .iter()
            .map(|l| l.strip_prefix("n ").unwrap().parse().unwrap())
            .collect();
        let first = numbers[0];
        assert!(first > 0, "the oldest files were not deleted");
        assert_eq!(numbers, (first..5000).collect::<Vec<_>>());
        assert_eq!(logs.dropped(Stream::Stdout), 0);

        // Tail reads across the same files.
        assert_eq!(
            logs.tail(Stream::Stdout, 300).unwrap(),
            lines[lines.len() - 300..]
        );
        assert_eq!(logs.tail(Stream::Stdout, 1_000_000).unwrap(), lines);
        let files: u64 = [logs.path(Stream::Stdout)]
            .into_iter()
            .chain((1..=keep).map(|i| logs.rotated_path(Stream::Stdout, i)))
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(logs.disk_usage(), files);
    }

    #[test]
    fn rotation_renumbers_gaps_and_deletes_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 8, 3);
        let s = Stream::Stdout;
        for i in [2, 5, 9] {
            fs::write(logs.rotated_path(s, i), format!("old {i}\n")).unwrap();
        }
        fs::write(logs.tmp_path(s), "stale copy").unwrap();
        fs::write(dir.path().join("stdout.log.01"), "not ours").unwrap();
        fs::write(logs.path(s), "c1\nc2\nc3\n").unwrap();

        assert_eq!(logs.rotate_if_needed().unwrap(), [s]);
        assert_eq!(logs.rotated_indices(s).unwrap(), [1, 2, 3]);
        let read = |i| fs::read_to_string(logs.rotated_path(s, i)).unwrap();
        // Whole lines up to the bound, then the rest written since.
        assert_eq!(read(1), "c1\nc2\nc3\n");
        assert_eq!(read(2), "old 2\n");
        assert_eq!(read(3), "old 5\n");
        assert_eq!(fs::metadata(logs.path(s)).unwrap().len(), 0);
        assert_eq!(logs.dropped(s), 0);
        assert!(!logs.tmp_path(s).exists());
        assert!(dir.path().join("stdout.log.01").exists());

        // Below the bound: nothing happens.
        fs::write(logs.path(s), "abc").unwrap();
        assert!(logs.rotate_if_needed().unwrap().is_empty());
        assert_eq!(read(1), "c1\nc2\nc3\n");
    }

    #[test]
    fn a_file_far_over_the_bound_keeps_its_head_and_tail_and_counts_the_rest() {
        // As the files of a node that wrote while no agent ran.
        let dir = tempfile::tempdir().unwrap();
        let (max_bytes, keep) = (10_000, 2);
        let logs = logs(dir.path(), max_bytes, keep);
        let s = Stream::Stdout;
        fs::write(logs.rotated_path(s, 1), "older\n").unwrap();
        let mut data = String::new();
        for i in 0..100_000 {
            data.push_str(&format!("n {i}\n"));
        }
        fs::write(logs.path(s), &data).unwrap();

        assert_eq!(logs.rotate_if_needed().unwrap(), [s]);
        assert_eq!(fs::metadata(logs.path(s)).unwrap().len(), 0);
        assert_eq!(
            fs::read_to_string(logs.rotated_path(s, 2)).unwrap(),
            "older\n"
        );
        // `.1`: whole lines up to the bound, the marker, whole lines up to the last one.
        let rotated = fs::read_to_string(logs.rotated_path(s, 1)).unwrap();
        let marker_at = rotated.find("[drover: ").unwrap();
        let head = &rotated[..marker_at];
        let (marker, tail) = rotated[marker_at..].split_once('\n').unwrap();
        assert!(data.starts_with(head) && head.ends_with('\n'));
        assert!(head.len() as u64 > max_bytes - 10 && head.len() as u64 <= max_bytes);
        assert!(data.ends_with(tail) && tail.starts_with("n "), "{tail:?}");
        assert!(tail.len() as u64 <= rest_cap(max_bytes));
        let dropped = (data.len() - head.len() - tail.len()) as u64;
        assert_eq!(marker, format!("[drover: {dropped} bytes dropped]"));
        assert_eq!(logs.dropped(s), dropped);
        assert_eq!(logs.dropped(Stream::Stderr), 0);
        let usage = logs.disk_usage();
        assert!(
            usage <= 6 + max_bytes + 64 + rest_cap(max_bytes),
            "disk use {usage}"
        );
        assert_eq!(
            logs.tail(s, 1_000_000).unwrap().len(),
            1 + head.lines().count() + 1 + tail.lines().count()
        );
    }

    #[test]
    fn rotation_with_keep_zero_only_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 4, 0);
        fs::write(logs.path(Stream::Stderr), "0123456789\n").unwrap();
        assert_eq!(logs.rotate_if_needed().unwrap(), [Stream::Stderr]);
        assert_eq!(fs::metadata(logs.path(Stream::Stderr)).unwrap().len(), 0);
        assert!(logs.rotated_indices(Stream::Stderr).unwrap().is_empty());
        assert_eq!(logs.disk_usage(), 0);
    }

    #[test]
    fn child_output_survives_concurrent_rotation() {
        // Every run must keep the lines in order without repeats. The last line is lost
        // only if a rotation's loss window (module doc) coincides with the shell's last
        // writes, which happens in a few runs in a hundred on a loaded machine: the
        // scenario is repeated (at most three times) until a run keeps it.
        for attempt in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let logs = logs(dir.path(), 4096, 3);
            let numbers = run_child_with_rotation(&logs);
            if numbers.last() == Some(&1999) {
                assert_eq!(
                    logs.tail(Stream::Stdout, 1).unwrap(),
                    strings(&["line 1999"])
                );
                assert!(logs.tail(Stream::Stderr, 10).unwrap().is_empty());
                return;
            }
            eprintln!("attempt {attempt}: the last lines fell into a loss window");
        }
        panic!("the last line was lost in every attempt");
    }

    /// Runs the shell loop with its stdout in `logs` while rotating, then checks the
    /// order of its lines and returns their numbers.
    fn run_child_with_rotation(logs: &NodeLogs) -> Vec<u32> {
        let (out, err) = logs.open_for_child().unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        let mut rotations = 0;
        let status = loop {
            rotations += logs.rotate_if_needed().unwrap().len();
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            std::thread::yield_now();
        };
        assert!(status.success());
        rotations += logs.rotate_if_needed().unwrap().len();
        assert!(rotations >= 1);
        assert!(logs.rotated_indices(Stream::Stdout).unwrap().len() <= 3);
        assert!(!logs.tmp_path(Stream::Stdout).exists());

        // Every line whole, in order, each once; where the shell outran a rotation, a
        // marker counts the bytes dropped, exactly those of the lines missing there. A
        // line cut by a rotation's loss window (module doc) may be torn.
        let files = stream_files(logs, Stream::Stdout);
        let mut numbers: Vec<u32> = Vec::new();
        let (mut torn, mut marked, mut missing) = (0, 0u64, 0u64);
        let line_len = |n: u32| format!("line {n}\n").len() as u64;
        for f in &files {
            let text = fs::read_to_string(f).unwrap();
            for l in text.lines() {
                if let Some(n) = l
                    .strip_prefix("[drover: ")
                    .and_then(|l| l.strip_suffix(" bytes dropped]"))
                {
                    marked += n.parse::<u64>().unwrap();
                    continue;
                }
                match l.strip_prefix("line ").and_then(|n| n.parse::<u32>().ok()) {
                    Some(n) if numbers.last().is_none_or(|p| n > *p) => {
                        let from = numbers.last().map_or(n, |p| p + 1);
                        missing += (from..n).map(line_len).sum::<u64>();
                        numbers.push(n);
                    }
                    _ => torn += 1,
                }
            }
        }
        assert!(
            torn <= rotations,
            "{torn} torn lines in {rotations} rotations"
        );
        // (Markers in files deleted since are counted, but not read.)
        assert!(marked <= logs.dropped(Stream::Stdout));
        assert!(
            marked <= missing,
            "{marked} bytes marked dropped, {missing} missing"
        );
        numbers
    }

    #[tokio::test]
    async fn follow_sees_only_lines_written_after_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let path = logs.path(Stream::Stdout);
        append(&path, b"old 1\nold 2\n");
        let mut rx = logs.follow(Stream::Stdout, POLL);
        append(&path, b"new 1\nnew 2\r\n");
        assert_eq!(next(&mut rx).await, "new 1");
        assert_eq!(next(&mut rx).await, "new 2");
        append(&path, b"new 3\n");
        assert_eq!(next(&mut rx).await, "new 3");
        // Stderr is followed on its own.
        let mut err = logs.follow(Stream::Stderr, POLL);
        append(&logs.path(Stream::Stderr), b"e\n");
        assert_eq!(next(&mut err).await, "e");
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn a_mark_taken_before_the_file_exists_makes_none_and_follows_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let marks = logs.marks().unwrap();
        assert_eq!(marks, [Mark { ino: 0, len: 0 }; 2]);
        assert!(!logs.path(Stream::Stdout).exists(), "a mark makes no file");
        assert!(!logs.path(Stream::Stderr).exists(), "a mark makes no file");
        let mut rx = logs.follow_from(Stream::Stdout, POLL, marks[0]);
        append(&logs.path(Stream::Stdout), b"first\nsecond\n");
        assert_eq!(next(&mut rx).await, "first");
        assert_eq!(next(&mut rx).await, "second");
        // Made after the mark: the whole file, also when it is there before the follow.
        let mut rx = logs.follow_from(Stream::Stdout, POLL, marks[0]);
        assert_eq!(next(&mut rx).await, "first");
        // A directory that cannot be read is an error naming the file, not an empty log.
        let blocked = NodeLogs::new(dir.path().join("file/below"), logs.config());
        fs::write(dir.path().join("file"), b"").unwrap();
        let err = blocked.marks().unwrap_err();
        assert!(err.to_string().contains("stdout.log"), "{err}");
    }

    #[tokio::test]
    async fn a_follow_begun_before_its_file_exists_is_taken_up_and_ends_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let path = logs.path(Stream::Stdout);
        // An earlier node's rotated output: a tail still shows that.
        append(&logs.rotated_path(Stream::Stdout, 1), b"earlier\n");
        let (mut rx, begins) = logs.follow_marked(Stream::Stdout, POLL, None);
        assert_eq!(
            begins,
            Some(Mark { ino: 0, len: 0 }),
            "a place to take it up from"
        );
        append(&path, b"first\n");
        // The tail ends where the follow began, before the file existed: what is in it
        // is the follower's to send, once.
        let mut tail = Vec::new();
        logs.tail_each_until(Stream::Stdout, 10, begins, |l| {
            tail.push(l);
            true
        })
        .unwrap();
        assert_eq!(tail, ["earlier"]);
        assert_eq!(next(&mut rx).await, "first");
        // Taken up again from where it began (its connection lost meanwhile): the file
        // that appeared, from its first line.
        append(&path, b"second\n");
        let (mut again, _) = logs.follow_marked(Stream::Stdout, POLL, begins);
        assert_eq!(next(&mut again).await, "first");
        assert_eq!(next(&mut again).await, "second");
    }

    #[tokio::test]
    async fn a_line_without_its_newline_is_shown_once_the_file_stops_growing() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let path = logs.path(Stream::Stdout);
        append(&path, b"before\n");
        let ino = fs::metadata(&path).unwrap().ino();
        let (mut rx, _) = logs.follow_marked(Stream::Stdout, POLL, None);
        append(&path, b"whole\nfatal: no newline");
        assert_eq!(next(&mut rx).await, "whole");
        let started = Instant::now();
        let partial = next_line(&mut rx).await;
        assert!(started.elapsed() >= PARTIAL_AFTER / 2, "shown at once");
        assert_eq!(partial.text, "fatal: no newline");
        assert_eq!(partial.end, Some(Mark { ino, len: 30 }));
        // What follows on that line later comes as a line of its own.
        append(&path, b" (more)\nnext\n");
        assert_eq!(next(&mut rx).await, " (more)");
        assert_eq!(next(&mut rx).await, "next");
        // A partial line the reader had already (the follow begins inside it) is not
        // shown again on its own; completed, it comes whole, as before.
        append(&path, b"old partial");
        let (mut rx, _) = logs.follow_marked(Stream::Stdout, POLL, None);
        let quiet = time::timeout(PARTIAL_AFTER * 2, rx.recv()).await;
        assert!(quiet.is_err(), "{quiet:?}");
        append(&path, b" rest\n");
        assert_eq!(next(&mut rx).await, "old partial rest");
    }

    #[tokio::test]
    async fn follow_from_a_mark_sends_what_was_written_since() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let path = logs.path(Stream::Stdout);
        append(&path, b"earlier node 1\nearlier node 2\n");
        let [mark, _] = logs.marks().unwrap();
        assert_eq!(mark.len, 30);
        append(&path, b"first\nsecond\n");
        let mut rx = logs.follow_from(Stream::Stdout, POLL, mark);
        assert_eq!(next(&mut rx).await, "first");
        assert_eq!(next(&mut rx).await, "second");
        append(&path, b"third\n");
        assert_eq!(next(&mut rx).await, "third");
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));

        // Rotated since the mark: the rest of the rotated file, then the current one.
        fs::rename(&path, logs.rotated_path(Stream::Stdout, 1)).unwrap();
        append(&path, b"after rotation\n");
        let mut rx = logs.follow_from(Stream::Stdout, POLL, mark);
        for want in ["first", "second", "third", "after rotation"] {
            assert_eq!(next(&mut rx).await, want);
        }
        // Rotated twice: both rotated files' rests, oldest first.
        fs::rename(
            logs.rotated_path(Stream::Stdout, 1),
            logs.rotated_path(Stream::Stdout, 2),
        )
        .unwrap();
        fs::rename(&path, logs.rotated_path(Stream::Stdout, 1)).unwrap();
        append(&path, b"after the second\n");
        let mut rx = logs.follow_from(Stream::Stdout, POLL, mark);
        for want in [
            "first",
            "second",
            "third",
            "after rotation",
            "after the second",
        ] {
            assert_eq!(next(&mut rx).await, want);
        }
        // Rotated away: a notice, then the current file.
        fs::remove_file(logs.rotated_path(Stream::Stdout, 2)).unwrap();
        let mut rx = logs.follow_from(Stream::Stdout, POLL, mark);
        assert_eq!(
            next(&mut rx).await,
            "[drover: what was written since the last line shown was rotated away; it is skipped]"
        );
        assert_eq!(next(&mut rx).await, "after the second");
        fs::rename(logs.rotated_path(Stream::Stdout, 1), &path).unwrap();

        // A lot since the mark: only the last FROM_MARK_MAX_BYTES, from a line start.
        let [mark, _] = logs.marks().unwrap();
        let line = format!("{}\n", "x".repeat(99));
        let lines = usize::try_from(2 * FROM_MARK_MAX_BYTES).unwrap() / line.len();
        append(&path, line.repeat(lines).as_bytes());
        append(&path, b"last\n");
        let mut rx = logs.follow_from(Stream::Stdout, POLL, mark);
        let skipped = next(&mut rx).await;
        let n: u64 = skipped
            .strip_prefix("[drover: ")
            .and_then(|l| l.strip_suffix(" bytes skipped]"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{skipped}"));
        assert!(
            n > FROM_MARK_MAX_BYTES / 2 && n < FROM_MARK_MAX_BYTES + 200,
            "{n}"
        );
        let mut got = Vec::new();
        while got.last().map(String::as_str) != Some("last") {
            got.push(next(&mut rx).await);
        }
        let max = usize::try_from(FROM_MARK_MAX_BYTES).unwrap() / line.len() + 2;
        assert!(got.len() <= max, "{} lines sent", got.len());
        assert!(got.len() >= max - 3, "{} lines sent", got.len());
        assert!(got[..got.len() - 1].iter().all(|l| l.len() == 99));
    }

    #[tokio::test]
    async fn followed_lines_say_where_the_file_stands_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let path = logs.path(Stream::Stdout);
        append(&path, b"before\n");
        let ino = fs::metadata(&path).unwrap().ino();
        let at = |len| Some(Mark { ino, len });
        let (mut rx, begins) = logs.follow_marked(Stream::Stdout, POLL, None);
        assert_eq!(begins, at(7));
        append(&path, b"one\ntwo\r\n");
        let one = next_line(&mut rx).await;
        assert_eq!((one.text.as_str(), one.end), ("one", at(11)));
        let two = next_line(&mut rx).await;
        assert_eq!((two.text.as_str(), two.end), ("two", at(16)));
        // A follow taken up after `one` sends `two` again, then what came since.
        append(&path, b"three\n");
        let mut again = logs.follow_from(Stream::Stdout, POLL, one.end.unwrap());
        assert_eq!(next(&mut again).await, "two");
        assert_eq!(next(&mut again).await, "three");
        // Rotated by rename under the follower: the new file's lines come with marks in
        // it. (`five` comes with its mark when the follower read it before the rename,
        // which its reads on the blocking pool may do, and without one when it read it
        // from the rotated file.)
        append(&path, b"four\n");
        let four = next_line(&mut rx).await;
        assert_eq!(four.text, "three");
        let four = next_line(&mut rx).await;
        assert_eq!(four.text, "four");
        append(&path, b"five\n");
        fs::rename(&path, logs.rotated_path(Stream::Stdout, 1)).unwrap();
        append(&path, b"six\n");
        let new_ino = fs::metadata(&path).unwrap().ino();
        let five = next_line(&mut rx).await;
        assert_eq!(five.text, "five");
        assert!(five.end.is_none() || five.end == at(32), "{five:?}");
        let six = next_line(&mut rx).await;
        assert_eq!(
            (six.text.as_str(), six.end),
            (
                "six",
                Some(Mark {
                    ino: new_ino,
                    len: 4
                })
            )
        );
    }

    #[tokio::test]
    async fn follow_holds_partial_lines() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        let path = logs.path(Stream::Stdout);
        append(&path, b"before\nhal");
        let mut rx = logs.follow(Stream::Stdout, POLL);
        append(&path, b"f\nfirst\npar");
        // A line already being written at the call comes whole.
        assert_eq!(next(&mut rx).await, "half");
        assert_eq!(next(&mut rx).await, "first");
        // "par" was read together with "first", and is held.
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        append(&path, b"tial");
        append(&path, b"\n");
        assert_eq!(next(&mut rx).await, "partial");
    }

    #[tokio::test]
    async fn follow_waits_for_the_file_to_appear() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(&dir.path().join("later"), 1 << 20, 5);
        let mut rx = logs.follow(Stream::Stderr, POLL);
        let (_out, mut err) = logs.open_for_child().unwrap();
        err.write_all(b"hello\n").unwrap();
        assert_eq!(next(&mut rx).await, "hello");
    }

    #[tokio::test]
    async fn follow_continues_after_truncation_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 8, 2);
        let path = logs.path(Stream::Stdout);
        let (mut node, _) = logs.open_for_child().unwrap();
        for i in 0..100 {
            writeln!(node, "pre {i}").unwrap();
        }
        let mut rx = logs.follow(Stream::Stdout, POLL);
        node.write_all(b"a\n").unwrap();
        assert_eq!(next(&mut rx).await, "a");

        // Truncated by someone else: starts over at 0.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        node.write_all(b"b\n").unwrap();
        assert_eq!(next(&mut rx).await, "b");
        node.write_all(b"c\n").unwrap();
        assert_eq!(next(&mut rx).await, "c");

        // Rotated, maybe before the follower read "d": "d" is read back from `.1`.
        node.write_all(b"d\nhal").unwrap();
        assert_eq!(logs.rotate_if_needed().unwrap(), [Stream::Stdout]);
        // (Lengths differ from every offset the follower can be at: see `follow`.)
        node.write_all(b"f\ne\nfine!\n").unwrap();
        assert_eq!(next(&mut rx).await, "d");
        assert_eq!(next(&mut rx).await, "half");
        assert_eq!(next(&mut rx).await, "e");
        assert_eq!(next(&mut rx).await, "fine!");

        // Replaced by a new file (rename-style rotation).
        fs::rename(&path, dir.path().join("moved")).unwrap();
        let (mut node2, _) = logs.open_for_child().unwrap();
        node2.write_all(b"fresh\n").unwrap();
        assert_eq!(next(&mut rx).await, "fresh");
    }

    /// The file a poll saw at the path is rotated too before the poll has delivered
    /// the files rotated ahead of it: it is delivered once, by the next poll, not by
    /// both.
    #[tokio::test]
    async fn a_file_rotated_while_a_poll_catches_up_is_delivered_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let at = |k: u32| dir.path().join(format!("out.{k}"));
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        append(&path, b"a1\na2\n");
        let mut f = Follower {
            path: path.clone(),
            rotated: at(1),
            offset: 0,
            ino: Some(ino(&path)),
            held: None,
            mtime: None,
            recent: Vec::new(),
            lines: LineSplitter::default(),
            dropped: 0,
            send_wait: WAIT,
            partial_since: None,
            partial_seen: 0,
        };
        let (tx, mut rx) = mpsc::channel(64);
        f.poll_once(&tx).await.ok().unwrap();
        let a = ino(&path);
        append(&path, b"a3\n");
        // Rotated: the poll that comes sees B at the path...
        fs::rename(&path, at(1)).unwrap();
        append(&path, b"b1\n");
        let b = ino(&path);
        // ...and B is rotated in its turn before that poll catches up.
        fs::rename(at(1), at(2)).unwrap();
        fs::rename(&path, at(1)).unwrap();
        append(&path, b"c1\n");
        // What that poll does once it saw B at the path.
        f.replaced(a, b, &tx).await.ok().unwrap();
        f.reset();
        f.ino = Some(b);
        f.read_new(&tx).await.ok().unwrap();
        // The next polls.
        f.poll_once(&tx).await.ok().unwrap();
        f.poll_once(&tx).await.ok().unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(line) = rx.recv().await {
            got.push(line.text);
        }
        assert_eq!(got, strings(&["a1", "a2", "a3", "b1", "c1"]));
    }

    #[tokio::test]
    async fn follow_sees_every_line_across_rename_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 200, 12);
        let mut w = crate::keeper::writer::Writer::open(logs.clone(), Stream::Stdout).unwrap();
        let mut rx = logs.follow(Stream::Stdout, POLL);
        let mut want = Vec::new();
        // Several rotations between two polls, and some with a poll between them.
        for round in 0..6 {
            for i in 0..30 {
                let line = format!("round {round} line {i}");
                w.write(format!("{line}\n").as_bytes()).unwrap();
                want.push(line);
            }
            if round % 2 == 0 {
                time::sleep(POLL * 3).await;
            }
        }
        assert!(logs.rotated_path(Stream::Stdout, 3).exists(), "rotated");
        for line in want {
            assert_eq!(next(&mut rx).await, line);
        }
    }

    #[tokio::test]
    async fn follow_reads_the_rest_of_a_deleted_file_then_its_successor() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 2);
        let path = logs.path(Stream::Stdout);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        // Polls far apart, so that what follows each line seen is done between two.
        let mut rx = logs.follow(Stream::Stdout, POLL * 30);
        writeln!(f, "a1").unwrap();
        assert_eq!(next(&mut rx).await, "a1");
        // Written, then deleted before a poll read them (or after, on a stalled machine:
        // the same lines), and a new file in its place.
        writeln!(f, "b1\nb2").unwrap();
        fs::remove_file(&path).unwrap();
        fs::write(&path, "c1\n").unwrap();
        for want in ["b1", "b2", "c1"] {
            assert_eq!(next(&mut rx).await, want);
        }
        // Deleted with nothing in its place for a while: the rest, then the new file.
        writeln!(f, "d1").unwrap();
        drop(f);
        let mut g = OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(g, "c2").unwrap();
        fs::remove_file(&path).unwrap();
        assert_eq!(next(&mut rx).await, "c2");
        fs::write(&path, "e1\n").unwrap();
        assert_eq!(next(&mut rx).await, "e1");
    }

    #[tokio::test]
    async fn follow_task_ends_when_the_receiver_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 20, 5);
        for exists in [false, true] {
            if exists {
                append(&logs.path(Stream::Stdout), b"x\n");
            }
            let (guard, ended) = oneshot::channel::<()>();
            let rx = spawn_follower(
                logs.path(Stream::Stdout),
                logs.rotated_path(Stream::Stdout, 1),
                Duration::from_secs(3600),
                FOLLOW_SEND_WAIT,
                guard,
                None,
            )
            .0;
            drop(rx);
            // The task drops the guard's sender when it ends.
            let ended = time::timeout(WAIT, ended).await;
            assert!(
                matches!(ended, Ok(Err(_))),
                "task still running (file exists: {exists})"
            );
        }
    }

    #[tokio::test]
    async fn follow_task_ends_while_the_consumer_is_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 30, 5);
        let path = logs.path(Stream::Stdout);
        let (guard, ended) = oneshot::channel::<()>();
        let rx = spawn_follower(
            path.clone(),
            logs.rotated_path(Stream::Stdout, 1),
            POLL,
            Duration::from_secs(3600),
            guard,
            None,
        )
        .0;
        let mut data = String::new();
        for i in 0..FOLLOW_CHANNEL_CAPACITY + 10 {
            data.push_str(&format!("{i}\n"));
        }
        append(&path, data.as_bytes());
        // Wait until the follower is blocked on the full channel.
        time::timeout(WAIT, async {
            while rx.len() < FOLLOW_CHANNEL_CAPACITY {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        drop(rx);
        assert!(matches!(time::timeout(WAIT, ended).await, Ok(Err(_))));
    }

    #[tokio::test]
    async fn follow_drops_lines_for_a_slow_consumer_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let logs = logs(dir.path(), 1 << 30, 5);
        let path = logs.path(Stream::Stdout);
        let mut rx = spawn_follower(
            path.clone(),
            logs.rotated_path(Stream::Stdout, 1),
            POLL,
            Duration::ZERO,
            (),
            None,
        )
        .0;
        let total = 5000;
        let mut data = String::new();
        for i in 0..total {
            data.push_str(&format!("{i}\n"));
        }
        append(&path, data.as_bytes());

        let (mut seen, mut dropped, mut notices) = (Vec::new(), 0, 0);
        while seen.len() + dropped < total {
            let line = next(&mut rx).await;
            if let Some(n) = line
                .strip_prefix("[drover: ")
                .and_then(|l| l.strip_suffix(" lines dropped]"))
            {
                dropped += n.parse::<usize>().unwrap();
                notices += 1;
            } else {
                seen.push(line.parse::<usize>().unwrap());
            }
        }
        assert_eq!(seen.len() + dropped, total);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(seen[0], 0);
        assert!(notices >= 1 && dropped > 0, "nothing was dropped");
        assert!(seen.len() >= FOLLOW_CHANNEL_CAPACITY);
        // And it goes on normally afterwards.
        append(&path, b"after\n");
        assert_eq!(next(&mut rx).await, "after");
    }

    #[tokio::test]
    async fn deliver_drops_when_full_and_reports_the_count_first() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut follower = Follower {
            path: PathBuf::new(),
            rotated: PathBuf::new(),
            offset: 0,
            ino: None,
            held: None,
            mtime: None,
            recent: Vec::new(),
            lines: LineSplitter::default(),
            dropped: 0,
            send_wait: Duration::ZERO,
            partial_since: None,
            partial_seen: 0,
        };
        let line = |text: String| Line { text, end: None };
        for i in 0..5 {
            assert!(follower.deliver(line(i.to_string()), &tx).await.is_ok());
        }
        assert_eq!(follower.dropped, 3);
        assert_eq!(rx.recv().await.unwrap(), "0");
        assert_eq!(rx.recv().await.unwrap(), "1");
        assert!(follower.deliver(line("5".to_owned()), &tx).await.is_ok());
        assert_eq!(rx.recv().await.unwrap(), "[drover: 3 lines dropped]");
        assert_eq!(rx.recv().await.unwrap(), "5");
        drop(rx);
        assert!(follower.deliver(line("6".to_owned()), &tx).await.is_err());
    }

    #[test]
    fn line_splitter_caps_and_strips() {
        let mut s = LineSplitter::default();
        let mut lines = Vec::new();
        s.push(b"a\r", &mut lines);
        s.push(b"\nb", &mut lines);
        assert_eq!(lines, strings(&["a"]));
        let long = vec![b'z'; 3 * MAX_LINE_BYTES];
        s.push(&long, &mut lines);
        assert_eq!(
            s.buf.len(),
            MAX_LINE_BYTES + 1,
            "holds only what can be shown"
        );
        s.push(b"\r\nc\n", &mut lines);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], format!("b{}…", "z".repeat(MAX_LINE_BYTES - 1)));
        assert_eq!(lines[2], "c");
    }

    #[test]
    fn config_defaults_and_stream_names() {
        let c = LogConfig::default();
        assert_eq!((c.max_bytes, c.keep), (10 * 1024 * 1024, 5));
        assert_eq!(Stream::Stdout.file_name(), "stdout.log");
        assert_eq!(Stream::Stderr.file_name(), "stderr.log");
        let logs = NodeLogs::new("/x/nodes/n", c);
        assert_eq!(
            logs.path(Stream::Stderr),
            Path::new("/x/nodes/n/stderr.log")
        );
        assert_eq!(
            logs.rotated_path(Stream::Stdout, 2),
            Path::new("/x/nodes/n/stdout.log.2")
        );
    }
}
