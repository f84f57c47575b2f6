//! Keeps the state dir the running controller's own when it is removed or replaced under
//! it (`rm -rf` by a cleanup script, a tmpfiles rule, an operator's mistake).
//!
//! The controller serves on from memory without it, but quietly worse: every stage and
//! deploy is refused (their records cannot be written), the lock file is gone so a second
//! controller could start on the directory, and the next start would find no deployed
//! configuration and a new reset key. Every [`CHECK`] the controller compares its lock
//! file's path with the file it holds locked; once they differ it makes the directory
//! again (0700), takes the lock anew and writes the staged, desired and deployed records
//! and the reset key from memory. The audit trail reopens its file on the next record
//! ([`crate::audit`]); the records written before the removal are gone with it.
//!
//! Should another controller have taken the directory meanwhile, that one owns it now:
//! this one stops serving and exits with an error. Controllers on etcd keep no state dir
//! and run no guard.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use drover_net::{reset_key, state_lock};
use tracing::{error, info, warn};

use crate::store::Store;

/// How often the controller checks that its lock file is still in place.
pub const CHECK: Duration = Duration::from_secs(1);

/// The role name of the controller's lock file.
const ROLE: &str = "controller";

/// The state dir's lock as the controller holds it.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// The lock file, held for the life of the process (the kernel releases it when the
    /// process dies, however it dies); replaced when it is taken anew.
    lock: Mutex<std::fs::File>,
    /// The key of the stateless resets, written back if its file goes.
    reset_key: [u8; reset_key::LEN],
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
    /// Another controller holds the directory now.
    Taken(String),
}

impl StateDir {
    /// Makes `dir` private (creating it), takes its lock (see [`state_lock`]) and reads
    /// or makes its reset key.
    pub fn lock(dir: &Path) -> Result<Self, crate::Error> {
        crate::store::secure_dir(dir)?;
        let lock = state_lock::lock(dir, ROLE)?;
        let reset_key = reset_key::load_or_create(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            lock: Mutex::new(lock),
            reset_key,
            failing: Mutex::new(None),
        })
    }

    /// The key of the stateless resets kept in the directory.
    pub fn reset_key(&self) -> &[u8; reset_key::LEN] {
        &self.reset_key
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
        let path = state_lock::lock_path(&self.dir, ROLE);
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
                "the state dir lock {} was removed or replaced under this controller; making the state dir again",
                path.display()
            );
        }
        if let Err(e) = crate::store::secure_dir(&self.dir) {
            self.fail(format!("cannot make {} again: {e}", self.dir.display()));
            return Found::InPlace;
        }
        match state_lock::lock(&self.dir, ROLE) {
            Ok(lock) => {
                *held = lock;
                *self.failing() = None;
                Found::Retaken
            }
            Err(e @ state_lock::Error::InUse { .. }) => Found::Taken(e.to_string()),
            Err(e) => {
                self.fail(format!("{e}; trying again every {}s", CHECK.as_secs()));
                Found::InPlace
            }
        }
    }

    /// Writes the store's values and the reset key into the directory again. Blocking.
    fn restore(&self, store: &Store) {
        let written = match store.rewrite() {
            Ok(w) => w,
            Err(e) => {
                warn!("cannot write the state records again: {e}; the next deploy writes them");
                Vec::new()
            }
        };
        if let Err(e) = reset_key::restore(&self.dir, &self.reset_key) {
            warn!("{e}");
        }
        info!(
            dir = %self.dir.display(),
            records = ?written,
            "state dir made again: lock, state records and reset key"
        );
    }
}

/// Checks the state dir every [`CHECK`] and restores it as the module docs say.
/// Resolves only when another controller took the directory, with why.
pub(crate) async fn watch(state: Arc<StateDir>, shared: Arc<crate::Shared>) -> String {
    let mut every = tokio::time::interval(CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let s = state.clone();
        let shared = shared.clone();
        let Ok(found) = tokio::task::spawn_blocking(move || {
            let found = s.check();
            if matches!(found, Found::Retaken) {
                s.restore(&shared.store);
            }
            found
        })
        .await
        else {
            continue;
        };
        if let Found::Taken(why) = found {
            error!("{why}; another controller took this state dir while its lock was gone");
            return why;
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
        let state = StateDir::lock(&dir).unwrap();
        assert!(matches!(state.check(), Found::InPlace));
        assert!(state.failing().is_none());

        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"in the way").unwrap();
        for _ in 0..3 {
            assert!(matches!(state.check(), Found::InPlace));
        }
        let said = state.failing().clone().expect("the failure is kept");
        assert!(said.contains("cannot make"), "{said}");

        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(state.check(), Found::Retaken));
        assert!(state.failing().is_none(), "said again should it fail again");
        assert!(matches!(state.check(), Found::InPlace));
        let store = Store::open(&dir).unwrap();
        state.restore(&store);
        assert_eq!(
            std::fs::read(dir.join(reset_key::FILE)).unwrap(),
            state.reset_key()
        );
    }

    #[test]
    fn a_dir_taken_by_another_process_meanwhile_is_left_to_it() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("state");
        let state = StateDir::lock(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Another controller made it again first (an open file description of its own
        // conflicts with this one's, as another process's would).
        std::fs::create_dir_all(&dir).unwrap();
        let _other = state_lock::lock(&dir, ROLE).unwrap();
        match state.check() {
            Found::Taken(why) => assert!(why.contains("is in use by another controller"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
