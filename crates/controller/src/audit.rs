//! The audit trail: every client request that changes something (stage, deploy,
//! restart, stop, start, signal), carried out, failed or refused, one JSON line each in
//! `<state dir>/audit.jsonl`.
//!
//! A record is appended and synced to disk before its request is answered, so that a
//! client never sees an answer the trail lacks; a record that cannot be written turns
//! into an error result of that request (the change itself has happened by then). The
//! file is rotated by size (`audit.jsonl.1` is the newest rotated file), so the trail
//! takes at most `(keep + 1) x max_bytes`; every file has mode 0600, since the trail
//! says who may do what and from where. Records are also published as `audit` events to
//! `monitor` subscribers. `drover audit` reads them through the controller
//! ([`AuditLog::read`]). With `--store etcd` the trail is in etcd instead, one for the
//! whole group ([`crate::etcd_audit`]); [`Trail`] is either.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use drover_proto::access::{AuditRecord, Outcome, Scope};
use drover_proto::msg::{ClientRequest, PeerRole};

/// The audit trail's file name in the state dir.
pub const FILE: &str = "audit.jsonl";

/// Default size at which the trail is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// Default number of rotated files kept.
pub const DEFAULT_KEEP: u32 = 5;

/// The smallest and largest `max_bytes` accepted.
pub const MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = 4096..=(1 << 40);

/// The largest `keep` accepted.
pub const MAX_KEEP: u32 = 1000;

/// Arguments longer than this are cut, so that one record stays well below `max_bytes`.
const MAX_ARGS: usize = 1024;

/// Messages longer than this are cut: a refusal's message may repeat what the client
/// sent (a node name as given), and a record must not let one request push pages of
/// others out of the trail.
const MAX_MESSAGE: usize = 1024;

/// Entries `drover audit` gets when it names no limit.
pub const DEFAULT_READ_LIMIT: usize = 1000;

/// Who sent a request, as the controller knows it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The certificate's role.
    pub role: PeerRole,
    /// The certificate's name (`zeek-client` on a `ws://` front).
    pub name: String,
    /// The certificate's serial; empty without a certificate.
    pub serial: String,
    /// What the caller may do.
    pub scope: Scope,
    /// Where it connected from.
    pub addr: SocketAddr,
    /// `native` or `zeek`.
    pub front: &'static str,
}

/// The trail on disk.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    /// The open file and its size; `None` until the first append (or after a failed
    /// rotation, so the next append opens it again).
    file: Mutex<Option<(File, u64)>>,
}

impl AuditLog {
    /// The trail in `dir` (the state dir, which exists), rotated at `max_bytes` with
    /// `keep` rotated files, its current file opened (so that one that cannot be is an
    /// error at start-up). Existing files with looser modes are tightened to 0600.
    pub fn open(dir: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        let log = Self {
            path: dir.join(FILE),
            max_bytes,
            keep,
            file: Mutex::new(None),
        };
        for path in log.files() {
            // Regular files only: never chmod what a link points to.
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o077 != 0 => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
                    tracing::warn!("tightened the mode of {} to 600", path.display());
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        log.trim()?;
        *log.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(log.open_for_append()?);
        Ok(log)
    }

    /// Holds the trail to its bound after `keep` or `max_bytes` was lowered: rotated
    /// files beyond `keep` are removed, a current file over `max_bytes` is rotated,
    /// and the oldest rotated files are removed while the trail is over its bound.
    fn trim(&self) -> std::io::Result<()> {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return Ok(());
        };
        let prefix = format!("{}.", name.to_string_lossy());
        for entry in fs::read_dir(dir)?.flatten() {
            let file = entry.file_name();
            let beyond = file
                .to_string_lossy()
                .strip_prefix(&prefix)
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > self.keep);
            if beyond && entry.file_type().is_ok_and(|t| t.is_file()) {
                fs::remove_file(entry.path())?;
                tracing::warn!(
                    "removed {}: the audit trail keeps {} rotated files",
                    entry.path().display(),
                    self.keep
                );
            }
        }
        if fs::metadata(&self.path).is_ok_and(|m| m.len() > self.max_bytes) {
            self.rotate()?;
        }
        // Files rotated under a larger `max_bytes`: the oldest go until the bound holds.
        let bound = (u64::from(self.keep) + 1).saturating_mul(self.max_bytes);
        let size = |p: &PathBuf| fs::metadata(p).map_or(0, |m| m.len());
        let mut total: u64 = self.files().iter().map(size).sum();
        for oldest in (1..=self.keep).rev().map(|n| self.rotated(n)) {
            if total <= bound {
                break;
            }
            let len = size(&oldest);
            if len > 0 {
                fs::remove_file(&oldest)?;
                total -= len;
                tracing::warn!(
                    "removed {}: the audit trail takes at most {bound} bytes",
                    oldest.display()
                );
            }
        }
        Ok(())
    }

    /// The trail's current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the current file stands now (`None` while there is none): the next
    /// record goes into this file, or into a newer one should it be rotated first.
    pub fn mark(&self) -> Option<TrailMark> {
        let m = fs::metadata(&self.path).ok()?;
        Some(TrailMark {
            dev: m.dev(),
            ino: m.ino(),
            born_ns: born_ns(&m),
            len: m.len(),
        })
    }

    /// Whether every record appended since `mark` is still in the trail: the file it
    /// names is one of the trail's, at least as long as then. Rotated out, moved away
    /// or truncated since (logrotate's `copytruncate`), it is not, and what the trail
    /// lacks tells nothing. A file rotated by the controller keeps its inode.
    pub fn holds_since(&self, mark: &TrailMark) -> bool {
        self.files().iter().any(|p| {
            fs::metadata(p).is_ok_and(|m| {
                m.dev() == mark.dev
                    && m.ino() == mark.ino
                    && born_ns(&m) == mark.born_ns
                    && m.len() >= mark.len
            })
        })
    }

    /// Rotated file `n` (1 is the newest).
    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// Every file of the trail, oldest first.
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = (1..=self.keep).rev().map(|n| self.rotated(n)).collect();
        files.push(self.path.clone());
        files
    }

    /// Appends one record and syncs it to disk (blocking).
    pub fn append(&self, record: &AuditRecord) -> std::io::Result<()> {
        let mut line = fit(record, self.max_bytes)?;
        line.push(b'\n');
        let mut slot = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // A file removed or moved away under the controller (by hand, logrotate, the
        // whole state dir removed) would take every later record with it: open the
        // path anew.
        if let Some((f, _)) = slot.as_ref() {
            let held = f.metadata().ok().map(|m| (m.dev(), m.ino()));
            let named = fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
            if held.is_some() && held != named {
                tracing::warn!(
                    "the audit trail {} was removed or replaced; writing to the file at its path",
                    self.path.display()
                );
                *slot = None;
            }
        }
        let size = match slot.as_ref() {
            Some((_, size)) => *size,
            None => fs::metadata(&self.path).map_or(0, |m| m.len()),
        };
        if size > 0 && size + line.len() as u64 > self.max_bytes {
            *slot = None;
            self.rotate()?;
        }
        if slot.is_none() {
            *slot = Some(self.open_for_append()?);
        }
        let (f, size) = slot.as_mut().expect("opened above");
        if let Err(e) = f.write_all(&line).and_then(|()| f.sync_data()) {
            // What part of the record was written (a full disk) goes: the trail holds
            // whole records. Reopen next time: the file may have been replaced or the
            // disk freed.
            let _ = f.set_len(*size);
            *slot = None;
            return Err(e);
        }
        *size += line.len() as u64;
        Ok(())
    }

    /// Opens the current file for appending; a record a crash cut short is ended with a
    /// newline first, so that it cannot swallow the next one.
    fn open_for_append(&self) -> std::io::Result<(File, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)?;
        let meta = f.metadata()?;
        // One made anew by someone else (logrotate's `create 0644`) is made private;
        // never what a link points to.
        let regular = fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_file());
        if regular && meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            match f.set_permissions(fs::Permissions::from_mode(0o600)) {
                Ok(()) => tracing::warn!("tightened the mode of {} to 600", self.path.display()),
                Err(e) => tracing::warn!(
                    "the audit trail {} is readable by others, and its mode cannot be tightened: {e}",
                    self.path.display()
                ),
            }
        }
        let mut size = meta.len();
        if size > 0 {
            let mut last = [0u8];
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                f.write_all(b"\n")?;
                size += 1;
            }
        }
        Ok((f, size))
    }

    /// Shifts `audit.jsonl` to `.1`, `.1` to `.2`, ..., dropping the oldest beyond
    /// `keep` (with `keep` 0 the current file is dropped).
    fn rotate(&self) -> std::io::Result<()> {
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
        if self.keep == 0 {
            gone(fs::remove_file(&self.path))?;
        } else {
            gone(fs::remove_file(self.rotated(self.keep)))?;
            for n in (1..self.keep).rev() {
                gone(fs::rename(self.rotated(n), self.rotated(n + 1)))?;
            }
            gone(fs::rename(&self.path, self.rotated(1)))?;
        }
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The newest `limit` records at or after `since_ms` by `who` (see
    /// [`AuditRecord::is_by`]), oldest first (blocking). Lines that do not parse (a
    /// record cut by a crash) are skipped.
    pub fn read(
        &self,
        since_ms: Option<u64>,
        who: Option<&str>,
        limit: usize,
    ) -> std::io::Result<Vec<AuditRecord>> {
        // The files are opened while appends wait, so that a rotation cannot move one
        // between two opens; they are read after, so that a long read holds no change
        // up (a rotation renames: an open file stays the same file).
        let files = {
            let _slot = self.file.lock().unwrap_or_else(|p| p.into_inner());
            let mut files = Vec::new();
            for path in self.files() {
                match File::open(&path) {
                    Ok(f) => files.push(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            files
        };
        let mut out = VecDeque::new();
        for f in files {
            for line in BufReader::new(f).split(b'\n') {
                let Ok(record) = serde_json::from_slice::<AuditRecord>(&line?) else {
                    continue;
                };
                if since_ms.is_some_and(|s| record.at_ms < s)
                    || who.is_some_and(|w| !record.is_by(w))
                {
                    continue;
                }
                if out.len() == limit {
                    out.pop_front();
                }
                if limit > 0 {
                    out.push_back(record);
                }
            }
        }
        Ok(out.into())
    }
}

/// A place in a state dir's trail: its current file (by device and inode, which a
/// rotation keeps) and that file's length at the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrailMark {
    pub dev: u64,
    pub ino: u64,
    /// The file's birth time, where the filesystem keeps one: an inode freed by a
    /// rotation is soon given to the next new file, which this tells apart.
    #[serde(default)]
    pub born_ns: Option<u64>,
    pub len: u64,
}

/// A file's birth time in nanoseconds since the epoch, where known.
fn born_ns(m: &fs::Metadata) -> Option<u64> {
    let age = m
        .created()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    u64::try_from(age.as_nanos()).ok()
}

/// A request whose audit record may be written by the request's own last state write
/// (with `--store etcd`, a successful deploy's: the deployed deploy and the record in
/// one fenced transaction, one etcd write fewer). The request's answer then finds the
/// record written ([`Fold::take_written`]) instead of appending it.
#[derive(Debug)]
pub struct Fold {
    caller: Caller,
    what: &'static str,
    args: String,
    written: Mutex<Option<AuditRecord>>,
}

impl Fold {
    /// For `caller`'s request `what` with `args`.
    pub fn new(caller: &Caller, what: &'static str, args: String) -> Arc<Self> {
        Arc::new(Self {
            caller: caller.clone(),
            what,
            args,
            written: Mutex::default(),
        })
    }

    /// The record of this request ending so, made now.
    pub fn record(
        &self,
        at_ms: u64,
        generation: Option<u64>,
        outcome: Outcome,
        message: Option<String>,
    ) -> AuditRecord {
        record(
            &self.caller,
            at_ms,
            self.what,
            self.args.clone(),
            generation,
            outcome,
            message,
        )
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<AuditRecord>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `record` is written (durably, with the state).
    pub fn written(&self, record: AuditRecord) {
        *self.slot() = Some(record);
    }

    /// The record written for this request, if one was.
    pub fn take_written(&self) -> Option<AuditRecord> {
        self.slot().take()
    }
}

/// Where the trail is kept: the state dir, or etcd with `--store etcd`.
#[derive(Debug)]
pub enum Trail {
    /// Files in the state dir.
    File(Arc<AuditLog>),
    /// Keys in etcd, shared by the controllers of a group.
    Etcd(crate::etcd_audit::EtcdAudit),
}

impl Trail {
    /// Where, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::File(log) => log.path().display().to_string(),
            Self::Etcd(etcd) => etcd.describe(),
        }
    }

    /// The put of `record` for a state write to carry, when the trail is in etcd.
    pub fn put(&self, record: &AuditRecord) -> Option<crate::etcd::Op> {
        match self {
            Self::File(_) => None,
            Self::Etcd(etcd) => etcd.put(record).ok(),
        }
    }

    /// Counts a record that a state write carried (see [`Trail::put`]).
    pub async fn folded(&self) {
        if let Self::Etcd(etcd) = self {
            etcd.folded().await;
        }
    }

    /// Whether a state write can carry records ([`Trail::put`]).
    pub fn folds(&self) -> bool {
        matches!(self, Self::Etcd(_))
    }

    /// Appends one record, durably.
    pub async fn append(&self, record: &AuditRecord) -> Result<(), String> {
        match self {
            Self::File(log) => {
                let (log, record) = (log.clone(), record.clone());
                tokio::task::spawn_blocking(move || log.append(&record))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Self::Etcd(etcd) => etcd.append(record).await,
        }
    }

    /// The newest `limit` records at or after `since_ms` by `who`, oldest first.
    pub async fn read(
        &self,
        since_ms: Option<u64>,
        who: Option<String>,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, String> {
        match self {
            Self::File(log) => {
                let log = log.clone();
                tokio::task::spawn_blocking(move || log.read(since_ms, who.as_deref(), limit))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Self::Etcd(etcd) => etcd.read(since_ms, who.as_deref(), limit).await,
        }
    }
}

/// A request's arguments, briefly, for its record: nodes, signal, configuration id.
pub fn args(req: &ClientRequest) -> String {
    let nodes = |nodes: &[String]| {
        if nodes.is_empty() {
            "all nodes".to_owned()
        } else {
            nodes.join(" ")
        }
    };
    let mut text = match req {
        ClientRequest::StageConfig { config } => format!("config {}", config.id),
        ClientRequest::Deploy {
            restart_all,
            expect_id,
            ..
        } => {
            let mut parts = Vec::new();
            if let Some(id) = expect_id {
                parts.push(format!("expect-id {id}"));
            }
            if *restart_all {
                parts.push("restart-all".to_owned());
            }
            parts.join(" ")
        }
        ClientRequest::Restart {
            nodes: n, batch, ..
        } => match batch {
            Some(b) => format!("{} batch {b}", nodes(n)),
            None => nodes(n),
        },
        ClientRequest::Stop { nodes: n, .. } | ClientRequest::Start { nodes: n, .. } => nodes(n),
        ClientRequest::Signal { nodes: n, signal } => format!("{signal} {}", nodes(n)),
        _ => String::new(),
    };
    if text.len() > MAX_ARGS {
        text = cut(&text, MAX_ARGS);
    }
    text
}

/// `record` as one JSON line (without its newline) of fewer than `max_bytes`, so that
/// every file of the trail stays within `max_bytes`: a record too long for it has its
/// message and arguments cut, and lists fewer nodes (the list then ends with `...`).
fn fit(record: &AuditRecord, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    let max = usize::try_from(max_bytes)
        .unwrap_or(usize::MAX)
        .saturating_sub(1);
    let mut r = std::borrow::Cow::Borrowed(record);
    loop {
        let line = serde_json::to_vec(&r).map_err(std::io::Error::other)?;
        if line.len() <= max {
            return Ok(line);
        }
        let r = r.to_mut();
        let listed = r.nodes.iter().filter(|n| *n != "...").count();
        if r.message.as_ref().is_some_and(|m| m.len() > 256) {
            r.message = r.message.as_deref().map(|m| cut(m, 256));
        } else if r.args.len() > 256 {
            r.args = cut(&r.args, 256);
        } else if listed > 0 {
            r.nodes.truncate(listed / 2);
            r.nodes.push("...".to_owned());
        } else if r.message.as_ref().is_some_and(|m| m.len() > 64) {
            let m = r.message.take().unwrap_or_default();
            r.message = Some(cut(&m, m.len() / 2));
        } else if r.args.len() > 64 {
            r.args = cut(&r.args, r.args.len() / 2);
        } else {
            // What is left is the caller's identity and the request's name, which a
            // trail of the smallest size holds many times over.
            return Ok(line);
        }
    }
}

/// `text` cut at a character boundary and marked with ` ...`, at most `len` bytes in all.
fn cut(text: &str, len: usize) -> String {
    let mut at = len.saturating_sub(4).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    format!("{} ...", &text[..at])
}

/// The record of a deploy request `by` that ended before its `generation` took effect,
/// written at `at_ms` when it did: a success under the same requester, saying how.
pub fn deployed_later(by: &AuditRecord, generation: u64, at_ms: u64, how: &str) -> AuditRecord {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
    AuditRecord {
        at_ms,
        time: humantime::format_rfc3339_millis(time).to_string(),
        generation: Some(generation),
        outcome: Outcome::Ok,
        message: Some(format!("generation {generation} is deployed{how}")),
        ..by.clone()
    }
}

/// A record of `caller`'s request `what` at `at_ms`.
pub fn record(
    caller: &Caller,
    at_ms: u64,
    what: &str,
    args: String,
    generation: Option<u64>,
    outcome: Outcome,
    message: Option<String>,
) -> AuditRecord {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
    let message = message.map(|m| {
        if m.len() > MAX_MESSAGE {
            cut(&m, MAX_MESSAGE)
        } else {
            m
        }
    });
    AuditRecord {
        at_ms,
        time: humantime::format_rfc3339_millis(time).to_string(),
        role: caller.role,
        name: caller.name.clone(),
        serial: caller.serial.clone(),
        scope: caller.scope,
        from: caller.addr.to_string(),
        front: caller.front.to_owned(),
        what: what.to_owned(),
        args,
        nodes: Vec::new(),
        generation,
        outcome,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str) -> Caller {
        Caller {
            role: PeerRole::Client,
            name: name.to_owned(),
            serial: "1a2b".to_owned(),
            scope: Scope::Operator,
            addr: "127.0.0.1:4000".parse().unwrap(),
            front: "native",
        }
    }

    fn rec(name: &str, at_ms: u64) -> AuditRecord {
        record(
            &caller(name),
            at_ms,
            "restart",
            "w1".into(),
            Some(3),
            Outcome::Ok,
            None,
        )
    }

    /// The times of `records`, in their order.
    fn stamps(records: &[AuditRecord]) -> Vec<u64> {
        records.iter().map(|r| r.at_ms).collect()
    }

    /// A write that fails part way (a full disk; here the file-size limit, which fails
    /// the same way) takes back what it wrote: the trail holds whole records only.
    #[test]
    fn a_mark_is_held_until_its_file_is_rotated_out_moved_or_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), 4096, 1).unwrap();
        log.append(&rec("ops", 1)).unwrap();
        let mark = log.mark().unwrap();
        log.append(&rec("ops", 2)).unwrap();
        assert!(log.holds_since(&mark));
        // Rotated once, the file is `.1`, the same inode: still held.
        let mut at = 3;
        while log.files().iter().filter(|p| p.exists()).count() < 2 {
            log.append(&rec("ops", at)).unwrap();
            at += 1;
        }
        assert!(log.holds_since(&mark));
        // Rotated out.
        let newest = || {
            fs::metadata(log.rotated(1))
                .map(|m| (m.ino(), born_ns(&m)))
                .ok()
        };
        while newest() == Some((mark.ino, mark.born_ns)) {
            log.append(&rec("ops", at)).unwrap();
            at += 1;
        }
        assert!(!log.holds_since(&mark));

        let mark = log.mark().unwrap();
        fs::rename(log.path(), dir.path().join("moved")).unwrap();
        log.append(&rec("ops", at)).unwrap();
        assert!(!log.holds_since(&mark), "moved away");

        let mark = log.mark().unwrap();
        fs::write(log.path(), b"").unwrap();
        assert!(!log.holds_since(&mark), "truncated");
    }

    #[test]
    fn a_long_message_is_cut_in_the_record() {
        let long = "q".repeat(131_000);
        let r = record(
            &caller("ops"),
            1,
            "stop",
            String::new(),
            None,
            Outcome::Failed,
            Some(format!("node '{long}' is not deployed")),
        );
        let m = r.message.unwrap();
        assert!(m.len() <= MAX_MESSAGE, "{}", m.len());
        assert!(m.starts_with("node 'qqq") && m.ends_with(" ..."), "{m}");
        let short = record(
            &caller("ops"),
            1,
            "stop",
            String::new(),
            None,
            Outcome::Ok,
            Some("fine".into()),
        );
        assert_eq!(short.message.as_deref(), Some("fine"));
    }

    #[test]
    fn a_record_cut_short_by_a_failed_write_is_taken_back() {
        if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() != Ok("process-per-test") {
            eprintln!("skipped: it limits its process's file sizes");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, 2).unwrap();
        log.append(&rec("a", 1)).unwrap();
        let path = dir.path().join(FILE);
        let len = fs::metadata(&path).unwrap().len();
        let limit = |bytes: u64| {
            let mut now = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: valid rlimit structs; SIG_IGN for SIGXFSZ, so that passing the
            // limit is an error (EFBIG) rather than the end of the process.
            unsafe {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &raw mut now), 0);
                now.rlim_cur = bytes;
                assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &raw const now), 0);
            }
        };
        limit(len + 10);
        log.append(&rec("b", 2)).unwrap_err();
        limit(libc::RLIM_INFINITY);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            len,
            "nothing of b is left"
        );
        log.append(&rec("c", 3)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(stamps(&log.read(None, None, 10).unwrap()), [1, 3]);
    }

    fn total_size(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn records_are_appended_read_back_filtered_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        for (i, name) in ["ops", "dash", "ops"].iter().enumerate() {
            log.append(&rec(name, 1000 + i as u64)).unwrap();
        }
        let mode = fs::metadata(log.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let all = log.read(None, None, 100).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].time, "1970-01-01T00:00:01.000Z");
        assert_eq!(log.read(None, Some("ops"), 100).unwrap().len(), 2);
        assert_eq!(log.read(None, Some("client/dash"), 100).unwrap().len(), 1);
        assert_eq!(log.read(None, Some("serial:001A2B"), 100).unwrap().len(), 3);
        assert_eq!(log.read(None, Some("nobody"), 100).unwrap().len(), 0);
        let since = log.read(Some(1001), None, 100).unwrap();
        assert_eq!(stamps(&since), [1001, 1002]);
        let newest = log.read(None, None, 1).unwrap();
        assert_eq!(newest[0].at_ms, 1002);
        assert!(log.read(None, None, 0).unwrap().is_empty());
    }

    #[test]
    fn a_trail_removed_or_moved_under_the_log_is_written_anew() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        log.append(&rec("ops", 1)).unwrap();
        fs::remove_file(log.path()).unwrap();
        log.append(&rec("ops", 2)).unwrap();
        assert_eq!(
            stamps(&log.read(None, None, 10).unwrap()),
            [2],
            "the record after the removal is in the new file"
        );
        let mode = fs::metadata(log.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Moved away (as logrotate does): the next record goes to the path.
        let moved = dir.path().join("moved.jsonl");
        fs::rename(log.path(), &moved).unwrap();
        log.append(&rec("ops", 3)).unwrap();
        assert_eq!(log.read(None, None, 10).unwrap()[0].at_ms, 3);
        assert_eq!(fs::read_to_string(&moved).unwrap().lines().count(), 1);
        // Moved away and made anew by someone else, readable by all (logrotate's
        // `create 0644`): the next record makes it private.
        fs::rename(log.path(), &moved).unwrap();
        fs::write(log.path(), b"").unwrap();
        fs::set_permissions(log.path(), fs::Permissions::from_mode(0o644)).unwrap();
        log.append(&rec("ops", 4)).unwrap();
        let mode = fs::metadata(log.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(stamps(&log.read(None, None, 10).unwrap()), [4]);
    }

    /// Lowered `keep` and `max_bytes` hold at the next start: rotated files beyond
    /// `keep` are removed, a current file over `max_bytes` is rotated, and the oldest
    /// rotated files go while the trail is over its bound.
    #[test]
    fn a_lowered_bound_holds_from_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = AuditLog::open(dir.path(), 4096, 5).unwrap();
            for at in 0..200 {
                log.append(&rec("ops", at)).unwrap();
            }
        }
        assert!(dir.path().join("audit.jsonl.5").exists());
        let log = AuditLog::open(dir.path(), 4096, 1).unwrap();
        assert!(!dir.path().join("audit.jsonl.2").exists());
        assert!(!dir.path().join("audit.jsonl.5").exists());
        assert!(
            total_size(dir.path()) <= 2 * 4096,
            "{}",
            total_size(dir.path())
        );
        drop(log);
        // The same with a smaller size: the current file, now too large, is rotated.
        let big = fs::metadata(dir.path().join("audit.jsonl")).unwrap().len();
        assert!(big > 1024, "{big}");
        let log = AuditLog::open(dir.path(), 1024, 1).unwrap();
        assert_eq!(fs::metadata(log.path()).unwrap().len(), 0);
        assert!(
            total_size(dir.path()) <= 2 * 1024,
            "{}",
            total_size(dir.path())
        );
        log.append(&rec("ops", 500)).unwrap();
        assert_eq!(stamps(&log.read(None, None, 10).unwrap()), [500]);
    }

    #[test]
    fn a_torn_line_is_skipped_and_the_next_record_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        log.append(&rec("ops", 1)).unwrap();
        let mut f = OpenOptions::new().append(true).open(log.path()).unwrap();
        f.write_all(b"{\"at_ms\": 2, \"ro").unwrap();
        drop(f);
        // A new controller process appends after the torn line.
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        log.append(&rec("ops", 3)).unwrap();
        assert_eq!(stamps(&log.read(None, None, 10).unwrap()), [1, 3]);
    }

    #[test]
    fn rotation_keeps_the_trail_within_its_bound_and_the_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4096;
        let keep = 2;
        let log = AuditLog::open(dir.path(), max, keep).unwrap();
        for i in 0..500 {
            log.append(&rec("ops", i)).unwrap();
            assert!(
                total_size(dir.path()) <= u64::from(keep + 1) * max,
                "after {i} records: {} bytes",
                total_size(dir.path())
            );
        }
        let files: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        for f in &files {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let kept = log.read(None, None, usize::MAX).unwrap();
        assert_eq!(kept.last().unwrap().at_ms, 499);
        let at = stamps(&kept);
        assert!(at.windows(2).all(|w| w[1] == w[0] + 1), "{at:?}");
    }

    #[test]
    fn records_too_long_for_the_smallest_trail_are_cut_to_fit_it() {
        let dir = tempfile::tempdir().unwrap();
        let (max, keep) = (4096, 0);
        let log = AuditLog::open(dir.path(), max, keep).unwrap();
        for i in 0..20 {
            let mut r = rec("ops", i);
            r.nodes = (0..drover_proto::access::AUDIT_NODES_MAX)
                .map(|n| format!("{n:0>60}"))
                .collect();
            r.message = Some("é".repeat(3000));
            r.args = "x".repeat(MAX_ARGS);
            log.append(&r).unwrap();
            assert!(
                total_size(dir.path()) <= u64::from(keep + 1) * max,
                "after {i} records: {} bytes",
                total_size(dir.path())
            );
        }
        let kept = log.read(None, None, usize::MAX).unwrap();
        let last = kept.last().unwrap();
        assert_eq!(last.at_ms, 19);
        assert_eq!(last.nodes.last().map(String::as_str), Some("..."));
        assert!(last.nodes.len() > 1, "{:?}", last.nodes);
        assert!(last.message.as_ref().unwrap().ends_with(" ..."));
    }

    #[test]
    fn loose_modes_are_tightened_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_trail_that_cannot_be_opened_or_written_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(FILE)).unwrap();
        let err = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::IsADirectory, "{err}");
        let mode = fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_ne!(
            mode & 0o777,
            0o600,
            "a directory is not a trail file to tighten"
        );

        // A full disk.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join(FILE)).unwrap();
        let log = AuditLog::open(dir.path(), DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        let err = log.append(&rec("ops", 1)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
        // And again: the file is opened afresh, and fails the same way.
        assert!(log.append(&rec("ops", 2)).is_err());
    }

    #[test]
    fn long_arguments_are_cut() {
        let nodes = (0..1000).map(|i| format!("node-{i}")).collect();
        let text = args(&ClientRequest::Stop {
            nodes,
            progress: false,
        });
        assert!(text.len() <= MAX_ARGS + 4, "{}", text.len());
        assert!(text.ends_with(" ..."));
    }
}
