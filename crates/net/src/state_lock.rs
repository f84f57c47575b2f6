//! One daemon process per state dir: an exclusive `flock` on a lock file in the dir,
//! holding the holder's pid so that a second process can name it.
//!
//! Two processes on one state dir would each rewrite the other's files (an agent's node
//! records, a controller's deploy records and reset key) and each act on what it last
//! read. The kernel releases the lock when its holder dies, however it dies, so a crash
//! never leaves a dir locked. It lives here, beside [`crate::reset_key`], because both
//! daemons' libraries take it and neither depends on the other.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another live process holds it.
    #[error(
        "state dir {path} is in use by another {role} (pid {holder}, lock {lock}); \
         one {role} per state dir"
    )]
    InUse {
        /// The directory.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid as it wrote it, or `unknown`.
        holder: String,
        /// What kind of daemon locks it (`agent`, `controller`).
        role: &'static str,
    },
    /// The lock file cannot be opened, locked or written.
    #[error("state dir lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The lock file of `role` (`agent`, `controller`) in `dir`.
pub fn lock_path(dir: &Path, role: &str) -> PathBuf {
    dir.join(format!("{role}.lock"))
}

/// Takes the exclusive lock of `dir` through `dir/<role>.lock` and writes this process's
/// pid into it. The lock lasts as long as the returned file is open.
pub fn lock(dir: &Path, role: &'static str) -> Result<File, Error> {
    let path = lock_path(dir, role);
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    // 0600, as every file of a state dir.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = text.trim();
            return Err(Error::InUse {
                path: dir.to_owned(),
                lock: path.clone(),
                holder: if holder.is_empty() {
                    "unknown".to_owned()
                } else {
                    holder.to_owned()
                },
                role,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    // Written in place, then cut to length: a file that held a pid keeps its block, so
    // a full disk does not need a new one. The pid only serves messages (the flock is
    // the lock), so a file that cannot take it is no reason for a daemon not to run: on
    // a full disk its nodes need their agent more than ever.
    let pid = format!("{}\n", std::process::id());
    let written = file
        .rewind()
        .and_then(|()| file.write_all(pid.as_bytes()))
        .and_then(|()| file.set_len(pid.len() as u64));
    if let Err(e) = written {
        let _ = file.set_len(0);
        tracing::warn!(
            "cannot write this process's pid into {}: {e}; a second {role} will not be able to name it",
            path.display()
        );
    }
    Ok(file)
}

/// A state dir's lock as its daemon holds it for its whole life, watched by the daemon's
/// guard: a directory removed or replaced under the running daemon (`rm -rf` by a
/// cleanup script) is made again and its lock taken anew, unless another daemon of the
/// role took it meanwhile.
#[derive(Debug)]
pub struct Held {
    dir: PathBuf,
    role: &'static str,
    /// The lock file; the kernel releases the lock when the process dies, however it
    /// dies. Replaced when the lock is taken anew.
    file: Mutex<File>,
    /// The last failure to make the directory again, said once rather than every check.
    failing: Mutex<Option<String>>,
}

/// What [`Held::check`] found.
#[derive(Debug)]
pub enum Check {
    /// The lock file at its path is the one held.
    InPlace,
    /// It was gone or another file: the directory is made again and the lock taken
    /// anew; the daemon's guard puts back what the directory held.
    Retaken,
    /// Another process of the role holds the directory now, with why.
    Taken(String),
}

impl Held {
    /// Takes the lock of `dir` for `role` (see [`lock`]).
    pub fn take(dir: &Path, role: &'static str) -> Result<Self, Error> {
        Ok(Self {
            dir: dir.to_owned(),
            role,
            file: Mutex::new(lock(dir, role)?),
            failing: Mutex::new(None),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the lock file at its path is the one held; if not, makes the directory
    /// again with `remake` and takes the lock anew. A failure is said once (and tried
    /// again at the next check). Blocking.
    pub fn check(&self, remake: impl FnOnce(&Path) -> Result<(), String>) -> Check {
        use std::os::unix::fs::MetadataExt;
        let mut held = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let path = lock_path(&self.dir, self.role);
        let in_place = match (held.metadata(), std::fs::metadata(&path)) {
            (Ok(h), Ok(p)) => h.ino() == p.ino() && h.dev() == p.dev(),
            // Unknowable: nothing to do about it.
            (Err(_), _) => true,
            (Ok(_), Err(_)) => false,
        };
        if in_place {
            return Check::InPlace;
        }
        if self.failing().is_none() {
            tracing::warn!(
                "the state dir lock {} was removed or replaced under this {}; making the state dir again",
                path.display(),
                self.role
            );
        }
        if let Err(why) = remake(&self.dir) {
            self.fail(format!("cannot make {} again: {why}", self.dir.display()));
            return Check::InPlace;
        }
        match lock(&self.dir, self.role) {
            Ok(file) => {
                *held = file;
                *self.failing() = None;
                Check::Retaken
            }
            Err(e @ Error::InUse { .. }) => Check::Taken(e.to_string()),
            Err(e) => {
                self.fail(format!("{e}; trying again at the next check"));
                Check::InPlace
            }
        }
    }

    /// The failure last said, while the directory is not back.
    fn failing(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Says `why` unless it was the last thing said: a directory that cannot be made
    /// again is tried at every check, and one warning a second would bury the log.
    fn fail(&self, why: String) {
        let mut last = self.failing();
        if last.as_deref() != Some(&why) {
            tracing::warn!("{why}");
            *last = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Check, Error, Held, lock};

    fn make(dir: &std::path::Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())
    }

    #[test]
    fn a_dir_that_cannot_be_made_again_is_tried_until_it_can() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let held = Held::take(&dir, "agent").unwrap();
        assert!(matches!(held.check(make), Check::InPlace));
        assert!(held.failing().is_none());

        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"in the way").unwrap();
        for _ in 0..3 {
            assert!(matches!(held.check(make), Check::InPlace));
        }
        let said = held.failing().clone().expect("the failure is kept");
        assert!(said.starts_with("cannot make"), "{said}");

        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(held.check(make), Check::Retaken));
        assert!(held.failing().is_none(), "said again should it fail again");
        let pid = std::fs::read_to_string(dir.join("agent.lock")).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        assert!(matches!(held.check(make), Check::InPlace));
    }

    #[test]
    fn a_dir_taken_by_another_process_meanwhile_is_left_to_it() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let held = Held::take(&dir, "controller").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Another daemon made it again first (an open file description of its own
        // conflicts with this one's, as another process's would).
        std::fs::create_dir(&dir).unwrap();
        let _other = lock(&dir, "controller").unwrap();
        match held.check(make) {
            Check::Taken(why) => {
                assert!(why.contains("is in use by another controller"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_locked_dir_names_its_holder_and_is_free_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path(), "controller").unwrap();
        let text = std::fs::read_to_string(dir.path().join("controller.lock")).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file, so a second open in this process
        // conflicts as another process's would.
        match lock(dir.path(), "controller") {
            Err(e @ Error::InUse { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!(
                        "in use by another controller (pid {}",
                        std::process::id()
                    )),
                    "{msg}"
                );
                assert!(msg.contains("controller.lock"), "{msg}");
            }
            other => panic!("expected the dir to be in use, got {other:?}"),
        }
        // Each role has its own lock file.
        drop(lock(dir.path(), "agent").unwrap());
        drop(held);
        drop(lock(dir.path(), "controller").unwrap());
    }

    #[test]
    fn a_new_lock_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let _held = lock(dir.path(), "controller").unwrap();
        let mode = std::fs::metadata(dir.path().join("controller.lock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_pid_is_written_over_the_last_holders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        std::fs::write(&path, "12345678901234567890\nleft by an older holder\n").unwrap();
        let _held = lock(dir.path(), "agent").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn a_dir_that_cannot_hold_the_lock_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let msg = lock(&missing, "agent").unwrap_err().to_string();
        assert!(msg.contains("missing/agent.lock"), "{msg}");
    }
}
