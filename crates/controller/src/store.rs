//! The controller's persistent state: the staged and the deployed configuration.
//!
//! Each is one JSON file in the state dir, written atomically: a temp file, fsync,
//! rename over the old file, fsync of the directory. A crash at any point leaves either
//! the old or the new file, never a mix. A file that cannot be read or parsed stops the
//! controller with an error naming it, rather than starting with silently lost state.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

#[derive(Debug, Default)]
struct Slots {
    staged: Option<Configuration>,
    deployed: Option<Configuration>,
}

/// The staged and deployed configurations, in memory and on disk.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// A std mutex: held only to copy a value in or out, never across I/O or awaits.
    slots: Mutex<Slots>,
}

fn load(path: &Path) -> Result<Option<Configuration>, StoreError> {
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

/// Writes `bytes` to `path` atomically and durably.
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

impl Store {
    /// Loads the state in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let slots = Slots {
            staged: load(&dir.join(STAGED))?,
            deployed: load(&dir.join(DEPLOYED))?,
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
        self.lock().staged.clone()
    }

    /// The deployed configuration.
    pub fn deployed(&self) -> Option<Configuration> {
        self.lock().deployed.clone()
    }

    /// Records a new staged configuration (on disk first).
    pub fn set_staged(&self, config: Configuration) -> Result<(), StoreError> {
        self.save(STAGED, &config)?;
        self.lock().staged = Some(config);
        Ok(())
    }

    /// Records a new deployed configuration (on disk first).
    pub fn set_deployed(&self, config: Configuration) -> Result<(), StoreError> {
        self.save(DEPLOYED, &config)?;
        self.lock().deployed = Some(config);
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

        fs::write(dir.path().join(DEPLOYED), b"{\"id\": ").unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("deployed.json: not a valid configuration"),
            "{err}"
        );
    }
}
