//! Node records written in the order the supervisor made them.
//!
//! The supervisor task makes every node record (see [`crate::supervisor`]) and writes
//! most of them itself; the record announcing a spawn's token is written by a spawner
//! thread just before that spawn (see [`crate::spawner`]), so that the supervisor task
//! does not wait for the disk. Meanwhile the supervisor may make a newer record of the
//! same node (an operator's stop during the spawn, a deploy that changes its config id):
//! written first, it must not be overwritten by the older announcement, or an agent
//! killed then would recover from the older one (and, say, start a node the operator
//! stopped).
//!
//! So each record carries a sequence number, taken on the supervisor task when the
//! record is made, and a write of a record older than the last one written to the same
//! file is skipped. A write holds its file's lock while it checks and writes, so two
//! writers never interleave on one file; writers of different files do not wait for
//! each other.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// A record to write: the file, its sequence number, its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The node's `record.json`.
    pub path: PathBuf,
    /// When the supervisor made it: higher is newer.
    pub seq: u64,
    /// The record.
    pub bytes: Vec<u8>,
}

/// What a [`Records::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file holds this record now.
    Written,
    /// A newer record was written to the file already; this one was not.
    Outdated,
}

/// The last sequence number written to each record file. Shared by the supervisor task
/// and the spawner threads.
#[derive(Debug, Default)]
pub struct Records {
    /// One lock per file, held across a check and its write: the outer lock only finds
    /// it, so that a slow write does not hold up writes of other nodes.
    files: Mutex<HashMap<PathBuf, Arc<Mutex<u64>>>>,
}

impl Records {
    /// Writes `w` with `write` (the file's bytes, whole), unless a newer record was
    /// written to the same file already.
    pub fn write(
        &self,
        w: &Write,
        write: impl FnOnce(&Path, &[u8]) -> io::Result<()>,
    ) -> io::Result<Written> {
        let file = self
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(w.path.clone())
            .or_default()
            .clone();
        let mut last = file.lock().unwrap_or_else(PoisonError::into_inner);
        if *last > w.seq {
            return Ok(Written::Outdated);
        }
        write(&w.path, &w.bytes)?;
        *last = w.seq;
        Ok(Written::Written)
    }

    /// Forgets a record file: its node is gone, with no spawn of it under way, so no
    /// write of it can come any more (a node of the same name later gets newer
    /// sequence numbers anyway). Keeps the table to the nodes that exist.
    pub fn forget(&self, path: &Path) {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(path);
    }

    /// Record files with a write on record.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(path: &str, seq: u64, text: &str) -> Write {
        Write {
            path: PathBuf::from(path),
            seq,
            bytes: text.as_bytes().to_vec(),
        }
    }

    /// Writes into a map instead of files.
    fn into(files: &Mutex<HashMap<PathBuf, Vec<u8>>>) -> impl Fn(&Path, &[u8]) -> io::Result<()> {
        |path, bytes| {
            files
                .lock()
                .unwrap()
                .insert(path.to_owned(), bytes.to_vec());
            Ok(())
        }
    }

    #[test]
    fn an_older_record_does_not_overwrite_a_newer_one_of_the_same_file() {
        let records = Records::default();
        let files = Mutex::new(HashMap::new());
        let put = into(&files);
        assert_eq!(
            records.write(&w("a", 2, "stopped"), &put).unwrap(),
            Written::Written
        );
        // The announcement made before, written after.
        assert_eq!(
            records.write(&w("a", 1, "spawning"), &put).unwrap(),
            Written::Outdated
        );
        // Another file is not held back by it.
        assert_eq!(
            records.write(&w("b", 1, "spawning"), &put).unwrap(),
            Written::Written
        );
        // A rewrite of the same record, and a newer one, go through.
        assert_eq!(
            records.write(&w("a", 2, "stopped"), &put).unwrap(),
            Written::Written
        );
        assert_eq!(
            records.write(&w("a", 3, "running"), &put).unwrap(),
            Written::Written
        );
        drop(put);
        let files = files.into_inner().unwrap();
        assert_eq!(files[Path::new("a")], b"running");
        assert_eq!(files[Path::new("b")], b"spawning");
    }

    #[test]
    fn a_forgotten_file_is_no_longer_held() {
        let records = Records::default();
        let files = Mutex::new(HashMap::new());
        records.write(&w("a", 3, "x"), into(&files)).unwrap();
        records.write(&w("b", 4, "y"), into(&files)).unwrap();
        assert_eq!(records.held(), 2);
        records.forget(Path::new("a"));
        assert_eq!(records.held(), 1);
        // A node of the same name made later writes newer records; they go through.
        assert_eq!(
            records.write(&w("a", 5, "z"), into(&files)).unwrap(),
            Written::Written
        );
    }

    #[test]
    fn a_failed_write_leaves_the_file_open_to_older_records() {
        let records = Records::default();
        let err = records
            .write(&w("a", 5, "x"), |_, _| Err(io::Error::other("disk full")))
            .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        let files = Mutex::new(HashMap::new());
        assert_eq!(
            records.write(&w("a", 4, "y"), into(&files)).unwrap(),
            Written::Written
        );
    }

    #[test]
    fn racing_writers_leave_the_newest_record_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        for round in 0..50u64 {
            let records = Arc::new(Records::default());
            // Even sequence numbers from one thread, odd from the other, each in order.
            let threads: Vec<_> = (0..2u64)
                .map(|parity| {
                    let (records, path) = (records.clone(), path.clone());
                    std::thread::spawn(move || {
                        for i in 0..20u64 {
                            let seq = round * 100 + i * 2 + parity;
                            let rec = Write {
                                path: path.clone(),
                                seq,
                                bytes: format!("{seq:>40}").into_bytes(),
                            };
                            records.write(&rec, |p, b| std::fs::write(p, b)).unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let newest = round * 100 + 39;
            assert_eq!(
                std::fs::read_to_string(&path).unwrap().trim(),
                newest.to_string(),
                "round {round}"
            );
        }
    }
}
