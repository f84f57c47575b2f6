//! The controller's persistent state: the staged and the deployed configuration.
//!
//! Each is one JSON file in the state dir, written atomically and durably: a temp file
//! with fsync, the current file renamed to `<name>.prev` (the last good copy), the temp
//! file renamed into place, fsync of the directory. A crash at any point leaves the old
//! or the new configuration, never a mix: if it struck between the two renames, only the
//! `.prev` file exists and is used.
//!
//! A current file that cannot be parsed is reported (error log naming it and why), kept
//! aside as `<name>.corrupt` for inspection, and the last good copy is used; only when
//! that is unusable too does the controller refuse to start. State is never lost
//! silently.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use drover_proto::model::Configuration;

/// File name of the staged configuration.
pub const STAGED: &str = "staged.json";
/// File name of the deployed configuration.
pub const DEPLOYED: &str = "deployed.json";

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A state file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A state file holds something else than a configuration.
    #[error("{path}: not a valid configuration ({source}); move it away to start without it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Shared, so that readers on hot paths (get-nodes) need not copy a whole configuration.
#[derive(Debug, Default)]
struct Slots {
    staged: Option<Arc<Configuration>>,
    deployed: Option<Arc<Configuration>>,
}

/// The staged and deployed configurations, in memory and on disk.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// A std mutex: held only to copy a value in or out, never across I/O or awaits.
    slots: Mutex<Slots>,
}

fn prev_path(path: &Path) -> PathBuf {
    path.with_extension("json.prev")
}

/// Loads a state file, falling back to its last good copy when it is missing or corrupt.
fn load(path: &Path) -> Result<Option<Configuration>, StoreError> {
    let prev = prev_path(path);
    match load_one(path) {
        Ok(Some(c)) => Ok(Some(c)),
        Ok(None) => {
            let found = load_one(&prev)?;
            if found.is_some() {
                tracing::warn!(
                    "{} is missing (interrupted write?); using the last good copy {}",
                    path.display(),
                    prev.display()
                );
            }
            Ok(found)
        }
        Err(err @ StoreError::Corrupt { .. }) => {
            tracing::error!("{err}");
            match load_one(&prev) {
                Ok(Some(c)) => {
                    let aside = path.with_extension("json.corrupt");
                    let _ = fs::rename(path, &aside);
                    tracing::warn!(
                        "using the last good copy {} (the corrupt file is kept as {})",
                        prev.display(),
                        aside.display()
                    );
                    Ok(Some(c))
                }
                _ => Err(err),
            }
        }
        Err(err) => Err(err),
    }
}

fn load_one(path: &Path) -> Result<Option<Configuration>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` atomically and durably, keeping the previous content as
/// `<path>.prev`.
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    match fs::rename(path, prev_path(path)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

impl Store {
    /// Loads the state in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let slots = Slots {
            staged: load(&dir.join(STAGED))?.map(Arc::new),
            deployed: load(&dir.join(DEPLOYED))?.map(Arc::new),
        };
        Ok(Self {
            dir: dir.to_owned(),
            slots: Mutex::new(slots),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Every update replaces a whole value, so a poisoned lock holds consistent data.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, file: &str, config: &Configuration) -> Result<(), StoreError> {
        let path = self.dir.join(file);
        let bytes = serde_json::to_vec_pretty(config).expect("configurations serialize");
        write_durable(&path, &bytes).map_err(|source| StoreError::Io { path, source })
    }

    /// The staged configuration.
    pub fn staged(&self) -> Option<Configuration> {
        self.lock().staged.as_deref().cloned()
    }

    /// The deployed configuration.
    pub fn deployed(&self) -> Option<Configuration> {
        self.lock().deployed.as_deref().cloned()
    }

    /// The deployed configuration, shared rather than copied.
    pub fn deployed_shared(&self) -> Option<Arc<Configuration>> {
        self.lock().deployed.clone()
    }

    /// Records a new staged configuration (on disk first).
    pub fn set_staged(&self, config: Configuration) -> Result<(), StoreError> {
        self.save(STAGED, &config)?;
        self.lock().staged = Some(Arc::new(config));
        Ok(())
    }

    /// Records a new deployed configuration (on disk first).
    pub fn set_deployed(&self, config: Configuration) -> Result<(), StoreError> {
        self.save(DEPLOYED, &config)?;
        self.lock().deployed = Some(Arc::new(config));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reopen_and_refuses_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.staged().is_none());
        let c = Configuration::empty();
        store.set_staged(c.clone()).unwrap();
        store.set_deployed(c.clone()).unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.staged(), Some(c.clone()));
        assert_eq!(again.deployed(), Some(c));
        assert!(!dir.path().join("staged.json.tmp").exists());

        // Both copies corrupt: a clear error, never a silent start without state.
        fs::write(dir.path().join(DEPLOYED), b"{\"id\": ").unwrap();
        fs::write(dir.path().join("deployed.json.prev"), b"garbage").unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("deployed.json: not a valid configuration"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_or_missing_file_falls_back_to_the_last_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut first = Configuration::empty();
        first.id = "first".into();
        let mut second = Configuration::empty();
        second.id = "second".into();
        store.set_deployed(first.clone()).unwrap();
        store.set_deployed(second.clone()).unwrap();
        assert_eq!(Store::open(dir.path()).unwrap().deployed(), Some(second));

        // Truncated current file: the last good copy is used, the bad one kept aside.
        let current = dir.path().join(DEPLOYED);
        let text = fs::read(&current).unwrap();
        fs::write(&current, &text[..text.len() / 2]).unwrap();
        assert_eq!(
            Store::open(dir.path()).unwrap().deployed(),
            Some(first.clone())
        );
        assert!(dir.path().join("deployed.json.corrupt").exists());

        // A crash between the two renames leaves only the .prev file.
        fs::remove_file(&current).ok();
        assert_eq!(Store::open(dir.path()).unwrap().deployed(), Some(first));
    }
}
