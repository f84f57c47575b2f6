//! Keeps the state dir the running agent's own when it is removed or replaced under it
//! (`rm -rf` by a cleanup script, a tmpfiles rule, an operator's mistake).
//!
//! The nodes run on without it, but nothing would say so: the lock file is gone, so a
//! second agent could start on the directory and take the nodes for strays; the node
//! records are gone, so the next agent process could adopt none of them; the notify
//! sockets are gone, so a node could no longer say it is ready or ping its watchdog;
//! the log files' directories are gone, so their output would be lost. Every
//! [`CHECK`] the agent compares its lock file's path with the file it holds locked; once
//! they differ it makes the directory again, takes the lock anew and has the supervisor
//! make every node's directory, log files and notify socket again and write every
//! record anew. The log keeper does the same for its own lock and socket. What the
//! nodes made there themselves (a query socket bound at start, files in a working
//! directory the agent made) is theirs to make again: it comes back when they restart.
//!
//! Should another agent have taken the directory meanwhile, that one owns it now: this
//! one exits, leaving the nodes to it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tracing::{error, info, warn};

use crate::supervisor::Supervisor;

/// How often the agent checks that its lock file is still in place.
pub const CHECK: Duration = Duration::from_secs(1);

/// The state dir's lock as the agent holds it.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// The lock file, held for the life of the process (the kernel releases it when
    /// the process dies, however it dies); replaced when it is taken anew.
    lock: Mutex<std::fs::File>,
    /// The last failure to make the directory again, said once rather than every check.
    failing: Mutex<Option<String>>,
}

/// What a check found.
#[derive(Debug)]
enum Found {
    /// The lock file is the one held.
    InPlace,
    /// It was gone or another file; the directory is made again and the lock taken anew.
    Retaken,
    /// Another agent holds the directory now.
    Taken(String),
}

impl StateDir {
    /// Takes the lock of `dir` (see [`drover_net::state_lock`]).
    pub fn lock(dir: &Path) -> Result<Self, drover_net::state_lock::Error> {
        let lock = drover_net::state_lock::lock(dir, "agent")?;
        Ok(Self {
            dir: dir.to_owned(),
            lock: Mutex::new(lock),
            failing: Mutex::new(None),
        })
    }

    /// The failure last said, if the directory is not back yet.
    fn failing(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Says `why` unless it was the last thing said: a directory that cannot be made
    /// again is tried every check, and one warning a second would bury the log.
    fn fail(&self, why: String) {
        let mut last = self.failing();
        if last.as_deref() != Some(&why) {
            warn!("{why}");
            *last = Some(why);
        }
    }

    /// Whether the lock file at its path is the one held, and if not, makes the
    /// directory again and takes the lock anew. Blocking.
    fn check(&self) -> Found {
        let mut held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let path = drover_net::state_lock::lock_path(&self.dir, "agent");
        let in_place = match (held.metadata(), std::fs::metadata(&path)) {
            (Ok(h), Ok(p)) => h.ino() == p.ino() && h.dev() == p.dev(),
            // Unknowable: nothing to do about it.
            (Err(_), _) => true,
            (Ok(_), Err(_)) => false,
        };
        if in_place {
            return Found::InPlace;
        }
        if self.failing().is_none() {
            warn!(
                "the state dir lock {} was removed or replaced under this agent; making the state dir again",
                path.display()
            );
        }
        if let Err(e) = std::fs::create_dir_all(self.dir.join("nodes")) {
            self.fail(format!("cannot make {} again: {e}", self.dir.display()));
            return Found::InPlace;
        }
        match drover_net::state_lock::lock(&self.dir, "agent") {
            Ok(lock) => {
                *held = lock;
                *self.failing() = None;
                Found::Retaken
            }
            Err(e @ drover_net::state_lock::Error::InUse { .. }) => Found::Taken(e.to_string()),
            Err(e) => {
                self.fail(format!("{e}; trying again every {}s", CHECK.as_secs()));
                Found::InPlace
            }
        }
    }
}

/// Checks the state dir every [`CHECK`] and restores it as the module docs say.
/// Resolves only when another agent took the directory, with why.
pub async fn watch(state: std::sync::Arc<StateDir>, supervisor: Supervisor) -> String {
    let mut every = tokio::time::interval(CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let s = state.clone();
        let Ok(found) = tokio::task::spawn_blocking(move || s.check()).await else {
            continue;
        };
        match found {
            Found::InPlace => {}
            Found::Retaken => {
                let failed = supervisor.restore().await;
                for (node, why) in &failed {
                    warn!(node = %node, "cannot make its directory again: {why}");
                }
                info!(
                    dir = %state.dir.display(),
                    failed = failed.len(),
                    "state dir made again: lock, node directories, log files, notify sockets and records"
                );
            }
            Found::Taken(why) => {
                error!("{why}; another agent took this state dir while its lock was gone");
                return why;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dir_that_cannot_be_made_again_is_tried_until_it_can() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let state = StateDir::lock(&dir).unwrap();
        assert!(matches!(state.check(), Found::InPlace));

        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"in the way").unwrap();
        for _ in 0..3 {
            assert!(matches!(state.check(), Found::InPlace));
        }
        let said = state.failing().clone().expect("the failure is kept");
        assert!(said.contains("cannot make"), "{said}");

        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(state.check(), Found::Retaken));
        assert!(state.failing().is_none());
        assert!(dir.join("nodes").is_dir());
        assert!(matches!(state.check(), Found::InPlace));
    }
}
