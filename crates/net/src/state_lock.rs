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
use std::path::{Path, PathBuf};

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
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
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

#[cfg(test)]
mod tests {
    use super::{Error, lock};

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
