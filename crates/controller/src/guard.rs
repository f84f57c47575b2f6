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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drover_net::reset_key;
use drover_net::state_lock::{Check, Held};
use tracing::{error, info, warn};

use crate::store::Store;

/// How often the controller checks that its lock file is still in place.
pub const CHECK: Duration = Duration::from_secs(1);

/// The role name of the controller's lock file.
const ROLE: &str = "controller";

/// The state dir's lock as the controller holds it.
#[derive(Debug)]
pub struct StateDir {
    held: Held,
    /// The key of the stateless resets, written back if its file goes.
    reset_key: [u8; reset_key::LEN],
}

impl StateDir {
    /// Makes `dir` private (creating it), takes its lock (see
    /// [`drover_net::state_lock`]) and reads or makes its reset key.
    pub fn lock(dir: &Path) -> Result<Self, crate::Error> {
        crate::store::secure_dir(dir)?;
        let held = Held::take(dir, ROLE)?;
        let reset_key = reset_key::load_or_create(dir)?;
        Ok(Self { held, reset_key })
    }

    /// The key of the stateless resets kept in the directory.
    pub fn reset_key(&self) -> &[u8; reset_key::LEN] {
        &self.reset_key
    }

    /// Whether the lock file is in place, making the directory (0700) again and taking
    /// the lock anew if not. Blocking.
    fn check(&self) -> Check {
        self.held
            .check(|dir| crate::store::secure_dir(dir).map_err(|e| e.to_string()))
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
        if let Err(e) = reset_key::restore(self.held.dir(), &self.reset_key) {
            warn!("{e}");
        }
        info!(
            dir = %self.held.dir().display(),
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
            if matches!(found, Check::Retaken) {
                s.restore(&shared.store);
            }
            found
        })
        .await
        else {
            continue;
        };
        if let Check::Taken(why) = found {
            error!("{why}; another controller took this state dir while its lock was gone");
            return why;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_removed_dir_comes_back_private_with_its_key() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("state");
        let state = StateDir::lock(&dir).unwrap();
        let store = Store::open(&dir).unwrap();
        assert!(matches!(state.check(), Check::InPlace));

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(state.check(), Check::Retaken));
        state.restore(&store);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            std::fs::read(dir.join(reset_key::FILE)).unwrap(),
            state.reset_key(),
            "the key the peers know"
        );
        assert_eq!(mode(&dir.join(reset_key::FILE)), 0o600);
        assert!(matches!(state.check(), Check::InPlace));
    }
}
