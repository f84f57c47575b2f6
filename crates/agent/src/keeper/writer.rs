//! The keeper's log files: appending a node's output and rotating by rename so that no
//! file ever grows past the bound.
//!
//! [`cut`] decides, for a file of some length and the bytes to append, how much goes
//! into the file before it must be rotated: everything when it fits; otherwise the
//! whole lines that fit, and a rotation; a line that does not fit into what is left
//! starts the next file; only a line longer than the whole bound is cut, at the bound.
//! So every file holds at most `max_bytes`, and a stream's files at most
//! `(keep + 1) * max_bytes`, whatever the rate. The pipes' readers
//! ([`crate::keeper::server`]) hand over whole lines (they hold a trailing partial line
//! back), so files end at line boundaries.
//!
//! Rotation shifts `.1` → `.2` … (dropping what would pass `keep`), renames the current
//! file to `.1` and creates a new one (mode 0640), as a reader expects: the current
//! file is replaced, never truncated. With `keep` 0 the current file is removed and
//! created anew. A current file deleted or moved away by someone else is let go and
//! created anew at the next write, as is the node's directory, should it be gone.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;

use crate::logs::{LOG_FILE_MODE, LogConfig, NodeLogs, Stream};

/// What to do with `data` appended to a file of `len` bytes bounded by `max`: the
/// number of bytes to write before the file must be rotated, or `None` when all of it
/// fits. The rest goes to the next file (and is cut again).
pub fn cut(len: u64, max: u64, data: &[u8]) -> Option<usize> {
    let max = max.max(1);
    if len.saturating_add(data.len() as u64) <= max {
        return None;
    }
    let room = usize::try_from(max.saturating_sub(len))
        .unwrap_or(usize::MAX)
        .min(data.len());
    if let Some(i) = data[..room].iter().rposition(|&b| b == b'\n') {
        return Some(i + 1);
    }
    if len > 0 {
        // The line starts the next file.
        return Some(0);
    }
    // A line longer than the bound: as much as fits.
    Some(room)
}

/// The end of what came through a pipe, at most `max` bytes, kept for the notice of
/// its close (see [`crate::keeper::proto::Msg::Closed`]).
#[derive(Debug)]
pub struct Tail {
    bytes: Vec<u8>,
    max: usize,
    /// Whether anything was dropped from the front.
    cut: bool,
}

impl Tail {
    /// An empty tail of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            bytes: Vec::new(),
            max,
            cut: false,
        }
    }

    /// Adds what was written.
    pub fn push(&mut self, data: &[u8]) {
        if data.len() >= self.max {
            self.bytes.clear();
            self.bytes.extend_from_slice(&data[data.len() - self.max..]);
            self.cut = true;
            return;
        }
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > self.max {
            let excess = self.bytes.len() - self.max;
            self.bytes.drain(..excess);
            self.cut = true;
        }
    }

    /// The tail as text: from its first line start when its front was dropped (unless
    /// that leaves nothing of a long last line), invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        let from = match self.bytes.iter().position(|&b| b == b'\n') {
            Some(i) if self.cut && i + 1 < self.bytes.len() => i + 1,
            _ => 0,
        };
        String::from_utf8_lossy(&self.bytes[from..]).into_owned()
    }
}

/// Where `data` ends its last whole line: the bytes up to it are written now, the rest
/// is held until its line ends. A rest of `hold_max` or more is not held (a line that
/// long is written as it comes).
///
/// The first `held` bytes of `data` are a partial line held from earlier reads, which
/// has no line end by construction: only what came after it is looked through, so a
/// node writing a long line a byte at a time costs a byte's work per byte, not a scan
/// of everything held.
pub fn whole_lines(data: &[u8], held: usize, hold_max: usize) -> usize {
    let held = held.min(data.len());
    match data[held..].iter().rposition(|&b| b == b'\n') {
        Some(i) if data.len() - (held + i + 1) < hold_max => held + i + 1,
        None if data.len() < hold_max => 0,
        _ => data.len(),
    }
}

/// The current file of one stream, as the keeper writes it.
#[derive(Debug)]
pub struct Writer {
    logs: NodeLogs,
    stream: Stream,
    file: File,
    len: u64,
}

impl Writer {
    /// Opens (creating) the stream's current file for appending.
    pub fn open(logs: NodeLogs, stream: Stream) -> io::Result<Self> {
        // A smaller `keep` than the files were rotated with holds from now on.
        logs.drop_extra_rotated(stream)?;
        let file = open_current(&logs, stream)?;
        let len = file.metadata()?.len();
        Ok(Self {
            logs,
            stream,
            file,
            len,
        })
    }

    /// Takes a new bound, for the next write.
    pub fn set_config(&mut self, config: LogConfig) {
        if config != self.logs.config() {
            self.logs = NodeLogs::new(self.logs.dir(), config);
            if let Err(e) = self.logs.drop_extra_rotated(self.stream) {
                tracing::warn!("cannot remove rotated log files beyond log_keep: {e}");
            }
        }
    }

    /// Appends `data` as [`Writer::write`] does, on a line of its own: after a newline
    /// when the file ends inside a line (a write that failed part way, a full disk).
    pub fn write_on_new_line(&mut self, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata()?.len();
        let mut last = [b'\n'];
        if len > 0 {
            self.file.read_exact_at(&mut last, len - 1)?;
        }
        if last[0] == b'\n' {
            return self.write(data);
        }
        self.write(&[b"\n", data].concat())
    }

    /// Appends `data`, rotating as [`cut`] says.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        // What the file holds now, should anything else have changed it.
        let held = self.file.metadata()?;
        self.len = held.len();
        if self.replaced(&held) {
            // Deleted or moved away (an operator freeing a full disk): writing on into
            // the unlinked file would keep its space taken and its lines out of reach.
            self.file = open_current(&self.logs, self.stream)?;
            self.len = self.file.metadata()?.len();
        }
        while !data.is_empty() {
            match cut(self.len, self.logs.config().max_bytes, data) {
                None => {
                    self.append(data)?;
                    break;
                }
                Some(n) => {
                    self.append(&data[..n])?;
                    data = &data[n..];
                    self.rotate()?;
                }
            }
        }
        Ok(())
    }

    /// Appends `data` whole or not at all: a write that fails part way (a full disk) is
    /// cut off again, so that the file holds no torn line.
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            if let Err(e) = self.file.write_all(data) {
                let _ = self.file.set_len(self.len);
                return Err(e);
            }
            self.len += data.len() as u64;
        }
        Ok(())
    }

    /// Whether the path no longer names the file held open (`held` its metadata).
    fn replaced(&self, held: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(self.logs.path(self.stream)) {
            Ok(now) => now.ino() != held.ino() || now.dev() != held.dev(),
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    /// Replaces the current file by a new, empty one (see the module doc).
    fn rotate(&mut self) -> io::Result<()> {
        let path = self.logs.path(self.stream);
        if self.logs.config().keep > 0 {
            self.logs.shift_rotated(self.stream)?;
            match std::fs::rename(&path, self.logs.rotated_path(self.stream, 1)) {
                // Deleted meanwhile: nothing to keep, a new file follows.
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        } else {
            self.logs.drop_extra_rotated(self.stream)?;
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.file = open_current(&self.logs, self.stream)?;
        self.len = self.file.metadata()?.len();
        Ok(())
    }
}

fn open_current(logs: &NodeLogs, stream: Stream) -> io::Result<File> {
    let path = logs.path(stream);
    // Readable too, so that a write after a failed one can see how the file ends.
    let open = || {
        OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(LOG_FILE_MODE)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
    };
    let f = match open() {
        // The node's directory deleted by hand (to free a disk): made again, as the
        // agent makes it, so that its output is not lost until it restarts. Only the
        // node's own directory: a state dir deleted whole is not made again piecemeal.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(logs.dir()) {
                Err(d) if d.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => open()?,
            }
        }
        other => other?,
    };
    crate::logs::ensure_mode(&f)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_whole_lines_and_never_passes_the_bound() {
        // Fits.
        assert_eq!(cut(0, 10, b"abc\n"), None);
        assert_eq!(cut(6, 10, b"abc\n"), None);
        // The whole lines that fit, then rotate.
        assert_eq!(cut(4, 10, b"ab\ncd\nef\n"), Some(6));
        // No line fits in what is left: rotate first.
        assert_eq!(cut(8, 10, b"abcd\n"), Some(0));
        // A line longer than the bound in an empty file: cut at the bound.
        assert_eq!(cut(0, 4, b"abcdefgh\n"), Some(4));
        // A file already past the bound (an older agent's): rotate first.
        assert_eq!(cut(50, 10, b"a\n"), Some(0));
    }

    #[test]
    fn cut_applied_repeatedly_never_makes_a_file_too_large() {
        // Lines of many lengths, appended in chunks of many sizes.
        let mut data = Vec::new();
        for i in 0..500usize {
            data.extend(std::iter::repeat_n(b'x', i * 7 % 97));
            data.push(b'\n');
        }
        for max in [1u64, 5, 64, 100, 1000] {
            for chunk in [1usize, 3, 64, 4096] {
                let mut files = vec![0u64];
                for mut piece in data.chunks(chunk) {
                    while !piece.is_empty() {
                        let len = *files.last().unwrap();
                        match cut(len, max, piece) {
                            None => {
                                *files.last_mut().unwrap() += piece.len() as u64;
                                piece = &[];
                            }
                            Some(n) => {
                                *files.last_mut().unwrap() += n as u64;
                                piece = &piece[n..];
                                files.push(0);
                            }
                        }
                    }
                }
                assert!(files.iter().all(|&f| f <= max), "max {max} chunk {chunk}");
                assert_eq!(files.iter().sum::<u64>(), data.len() as u64);
            }
        }
    }

    #[test]
    fn a_tail_keeps_the_last_whole_lines_within_its_bound() {
        let mut t = Tail::new(10);
        assert_eq!(t.text(), "");
        t.push(b"one\n");
        t.push(b"two\n");
        assert_eq!(t.text(), "one\ntwo\n", "nothing dropped: all of it");
        t.push(b"three\n");
        // "one\ntwo\nthree\n" is 14 bytes: the front goes, from the next line start.
        assert_eq!(t.text(), "three\n");
        t.push(b"a very long line\n");
        assert_eq!(t.text(), "long line\n", "a long last line: its end");
        // Cut: the front up to the first line start goes, and bad UTF-8 is replaced.
        let mut t = Tail::new(5);
        t.push(b"ab\ncd\n\xff");
        assert_eq!(t.text(), "cd\n\u{fffd}");
    }

    #[test]
    fn whole_lines_holds_back_a_partial_line() {
        assert_eq!(whole_lines(b"ab\ncd", 0, 16), 3);
        assert_eq!(whole_lines(b"ab\n", 0, 16), 3);
        assert_eq!(whole_lines(b"abcd", 0, 16), 0);
        // Too long to hold: written as it comes.
        assert_eq!(whole_lines(b"abcd", 0, 4), 4);
        assert_eq!(whole_lines(b"a\nbcdef", 0, 4), 7);
        // After a held partial line.
        assert_eq!(whole_lines(b"abc", 2, 16), 0);
        assert_eq!(whole_lines(b"abc\nd", 2, 16), 4);
        assert_eq!(whole_lines(b"abcd", 3, 4), 4);
        assert_eq!(whole_lines(b"abc\ndefg", 2, 4), 8);
    }

    #[test]
    fn a_held_partial_line_is_not_looked_through_again() {
        // The held part has no line end by construction; were it looked through again,
        // a line written a byte at a time would cost its whole length per byte.
        // A newline hidden in the held part shows whether it was looked at.
        assert_eq!(whole_lines(b"a\nbc", 3, 16), 0);
        let mut held = Vec::new();
        let mut written = 0;
        for &b in b"hello world\nmore" {
            held.push(b);
            let whole = whole_lines(&held, held.len() - 1, 64);
            written += whole;
            held.drain(..whole);
        }
        assert_eq!((written, held.as_slice()), (12, &b"more"[..]));
    }

    #[test]
    fn writer_rotates_by_rename_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            max_bytes: 100,
            keep: 2,
        };
        let logs = NodeLogs::new(dir.path(), config);
        let mut w = Writer::open(logs.clone(), Stream::Stdout).unwrap();
        let mut all = String::new();
        for i in 0..100 {
            let line = format!("line {i:04}\n");
            all.push_str(&line);
            w.write(line.as_bytes()).unwrap();
            for f in [
                logs.path(Stream::Stdout),
                logs.rotated_path(Stream::Stdout, 1),
                logs.rotated_path(Stream::Stdout, 2),
            ] {
                let len = std::fs::metadata(&f).map_or(0, |m| m.len());
                assert!(len <= 100, "{} has {len} bytes", f.display());
            }
        }
        assert!(!logs.rotated_path(Stream::Stdout, 3).exists());
        let mut kept = String::new();
        for f in [
            logs.rotated_path(Stream::Stdout, 2),
            logs.rotated_path(Stream::Stdout, 1),
            logs.path(Stream::Stdout),
        ] {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.ends_with('\n'));
            kept.push_str(&text);
        }
        assert!(all.ends_with(&kept), "the newest lines, in order");
        assert!(kept.len() > 200);
    }

    #[test]
    fn a_smaller_keep_removes_the_rotated_files_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let wide = NodeLogs::new(
            dir.path(),
            LogConfig {
                max_bytes: 10,
                keep: 3,
            },
        );
        let mut w = Writer::open(wide.clone(), Stream::Stdout).unwrap();
        for _ in 0..5 {
            w.write(b"0123456789\n").unwrap();
        }
        assert!(wide.rotated_path(Stream::Stdout, 3).exists());
        // Taken by a running writer: the files beyond the new keep go at once.
        w.set_config(LogConfig {
            max_bytes: 10,
            keep: 1,
        });
        assert!(wide.rotated_path(Stream::Stdout, 1).exists());
        assert!(!wide.rotated_path(Stream::Stdout, 2).exists());
        assert!(!wide.rotated_path(Stream::Stdout, 3).exists());
        // A writer opened with none kept (the agent started again with log_keep 0).
        let none = NodeLogs::new(
            dir.path(),
            LogConfig {
                max_bytes: 10,
                keep: 0,
            },
        );
        let mut w = Writer::open(none.clone(), Stream::Stdout).unwrap();
        assert!(!none.rotated_path(Stream::Stdout, 1).exists());
        for _ in 0..3 {
            w.write(b"0123456789\n").unwrap();
            assert!(!none.rotated_path(Stream::Stdout, 1).exists());
        }
    }

    #[test]
    fn a_file_deleted_or_moved_away_is_created_anew() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            max_bytes: 1000,
            keep: 2,
        };
        let logs = NodeLogs::new(dir.path(), config);
        let path = logs.path(Stream::Stdout);
        let mut w = Writer::open(logs.clone(), Stream::Stdout).unwrap();
        w.write(b"one\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        w.write(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        let moved = dir.path().join("saved.log");
        std::fs::rename(&path, &moved).unwrap();
        w.write(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "two\n");
        // Deleted when nearly full: the new file starts empty, nothing is rotated.
        w.write(&[b'x'; 990]).unwrap();
        std::fs::remove_file(&path).unwrap();
        w.write(&[b'y'; 20]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [b'y'; 20]);
        assert!(!logs.rotated_path(Stream::Stdout, 1).exists());
    }

    #[test]
    fn a_node_directory_deleted_is_made_again_but_not_its_parent() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("nodes").join("w1");
        std::fs::create_dir_all(&node).unwrap();
        let logs = NodeLogs::new(&node, LogConfig::default());
        let mut w = Writer::open(logs.clone(), Stream::Stdout).unwrap();
        w.write(b"one\n").unwrap();
        std::fs::remove_dir_all(&node).unwrap();
        w.write(b"two\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(logs.path(Stream::Stdout)).unwrap(),
            "two\n"
        );
        let mode = std::fs::metadata(&node).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "for the agent and the node only");
        // The whole state dir gone: not made again piecemeal.
        std::fs::remove_dir_all(dir.path().join("nodes")).unwrap();
        let e = w.write(b"three\n").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!node.exists());
    }

    #[test]
    fn a_write_after_a_torn_line_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let logs = NodeLogs::new(dir.path(), LogConfig::default());
        let path = logs.path(Stream::Stdout);
        let mut w = Writer::open(logs, Stream::Stdout).unwrap();
        w.write_on_new_line(b"first\n").unwrap();
        w.write(b"cut sho").unwrap();
        w.write_on_new_line(b"[marker]\n").unwrap();
        w.write_on_new_line(b"next\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "first\ncut sho\n[marker]\nnext\n"
        );
    }
}
