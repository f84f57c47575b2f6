//! The controller's persistent state: the staged configuration, the desired deploy and
//! the deployed one.
//!
//! - `staged.json`: the configuration last staged (what `deploy` would send).
//! - `desired.json`: the last deploy the controller accepted, `{generation, config}`.
//!   It is written before any agent is told about it, so agents are only ever brought
//!   to a generation that survives a controller restart; a deploy whose record fails
//!   changes nothing anywhere.
//! - `deployed.json`: the last deploy every agent acknowledged, `{generation, config}`
//!   (what `get-config --deployed` shows). It lags `desired.json` while a deploy is
//!   under way or after one that some agent did not acknowledge.
//!
//! Generations strictly increase over the state dir's life: a new deploy takes one more
//! than any generation recorded or reported by an agent. State dirs from before
//! generations hold a bare configuration in `deployed.json` and no `desired.json`; that
//! configuration is loaded as generation 1, desired and deployed alike.
//!
//! Each file is written atomically and durably: a temp file (mode 0600) with fsync, the
//! current file renamed to `<name>.prev` (the last good copy), the temp file renamed into
//! place, fsync of the directory. A crash at any point leaves the old or the new content,
//! never a mix: if it struck between the two renames, only the `.prev` file exists and
//! is used. The files hold node environments, so the directory is kept at 0700 and the
//! files at 0600; looser modes found at start-up are tightened (and logged).
//!
//! A current file that cannot be parsed is reported (error log naming it and why), kept
//! aside as `<name>.corrupt` for inspection, and the last good copy is used; only when
//! that is unusable too does the controller refuse to start. State is never lost
//! silently.
//!
//! With `--store etcd` the same three values live in etcd instead ([`crate::etcd_store`]),
//! loaded when this controller becomes the leader ([`Store::reload`]) and written only
//! while it leads; the in-memory side below is shared by both.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use drover_proto::model::Configuration;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// File name of the staged configuration.
pub const STAGED: &str = "staged.json";
/// File name of the desired deploy.
pub const DESIRED: &str = "desired.json";
/// File name of the deployed configuration.
pub const DEPLOYED: &str = "deployed.json";

/// Mode of the state directory.
const DIR_MODE: u32 = 0o700;
/// Mode of every state file.
const FILE_MODE: u32 = 0o600;

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
    /// The state dir cannot be created or its modes tightened.
    #[error("state dir {path}: {source}")]
    StateDir {
        /// The directory or file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The etcd store failed; nothing was written.
    #[error(transparent)]
    Etcd(#[from] crate::etcd_store::EtcdStoreError),
    /// A value in etcd holds something else than a configuration.
    #[error("etcd value {name}: not a valid configuration ({source})")]
    CorruptEtcd {
        /// The value.
        name: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// A state file holds something else than a configuration.
    #[error("{path}: not a valid configuration ({source})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A corrupt state file whose last good copy cannot stand in for it.
    #[error("{corrupt}; {copy}")]
    NoGoodCopy {
        /// What is wrong with the file.
        corrupt: String,
        /// What is wrong with its copy, and what to do.
        copy: String,
    },
}

/// One deploy: a configuration and the generation it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deploy {
    /// Strictly increasing over the state dir's life; never 0.
    pub generation: u64,
    /// The configuration as sent to agents (instance hosts filled in).
    pub config: Configuration,
    /// The generation of the latest deploy, up to this one, that restarted every node
    /// (0: none): an agent brought to this deploy later, having missed that one,
    /// restarts every node too (see `ControllerRequest::Apply`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restart_since: u64,
    /// The audit record of the request that made it, as it began (its outcome and
    /// generation are set when it ends): a deploy that becomes the deployed one after
    /// its request ended (the controller died or restarted meanwhile, or an agent
    /// acknowledged it late) is recorded in the trail with its requester.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Box<drover_proto::access::AuditRecord>>,
    /// Where the state dir's audit trail stood as the deploy was desired: its
    /// request's record goes there or later. At start, a deployed deploy whose record
    /// the trail lacks is recorded as unrecorded only while the trail still holds
    /// everything since this mark (see `AuditLog::holds_since`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trail: Option<crate::audit::TrailMark>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `deployed.json` as written before generations existed, or now.
#[derive(Deserialize)]
#[serde(untagged)]
enum DeployFile {
    Current(Deploy),
    Legacy(Configuration),
}

impl From<DeployFile> for Deploy {
    fn from(f: DeployFile) -> Self {
        match f {
            DeployFile::Current(d) => d,
            DeployFile::Legacy(config) => Deploy {
                generation: 1,
                config,
                restart_since: 0,
                by: None,
                trail: None,
            },
        }
    }
}

/// Shared, so that readers on hot paths (get-nodes) need not copy a whole configuration.
#[derive(Debug, Default)]
struct Slots {
    staged: Option<Arc<Configuration>>,
    desired: Option<Arc<Deploy>>,
    deployed: Option<Arc<Deploy>>,
}

/// Where the state persists.
#[derive(Debug)]
enum Backend {
    /// The state dir.
    File(PathBuf),
    /// etcd, written under the leader's fence.
    Etcd(crate::etcd_store::EtcdStore),
}

/// The staged configuration and the desired and deployed deploys, in memory and on disk
/// (or in etcd).
#[derive(Debug)]
pub struct Store {
    backend: Backend,
    /// A std mutex: held only to copy a value in or out, never across I/O or awaits.
    slots: Mutex<Slots>,
    /// Held across each write (and the check before it), so that writes of one file
    /// never interleave and a deployed deploy is never replaced by an older one.
    writing: Mutex<()>,
}

fn prev_path(path: &Path) -> PathBuf {
    path.with_extension("json.prev")
}

/// Loads a state file, falling back to its last good copy when it is missing or corrupt.
fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let prev = prev_path(path);
    match load_one(path) {
        Ok(Some(c)) => Ok(Some(c)),
        Ok(None) => {
            let found = load_one(&prev).map_err(|err| match err {
                StoreError::Corrupt { .. } => StoreError::NoGoodCopy {
                    corrupt: err.to_string(),
                    copy: format!(
                        "and {} itself is missing; move the copy away to start without it",
                        path.display()
                    ),
                },
                other => other,
            })?;
            if found.is_some() {
                tracing::warn!(
                    "{} is missing (interrupted write?); using the last good copy {}",
                    path.display(),
                    prev.display()
                );
            }
            Ok(found)
        }
        Err(err @ StoreError::Corrupt { .. }) => match load_one(&prev) {
            Ok(Some(c)) => {
                let aside = path.with_extension("json.corrupt");
                let _ = fs::rename(path, &aside);
                tracing::error!(
                    "{err}; using the last good copy {} (the corrupt file is kept as {})",
                    prev.display(),
                    aside.display()
                );
                Ok(Some(c))
            }
            Ok(None) => Err(StoreError::NoGoodCopy {
                corrupt: err.to_string(),
                copy: format!(
                    "there is no last good copy {}; move it away to start without it",
                    prev.display()
                ),
            }),
            Err(copy) => Err(StoreError::NoGoodCopy {
                corrupt: err.to_string(),
                copy: format!(
                    "nor can its last good copy be used: {copy}; move both away to start without them"
                ),
            }),
        },
        Err(err) => Err(err),
    }
}

fn load_one<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
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

/// Writes `bytes` to `path` atomically and durably (the new file has mode 0600), keeping
/// the previous content as `<path>.prev`.
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = path.with_extension("json.tmp");
    // The caller names `path`: a failure of the temporary file names that file too.
    let at_tmp = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!("its temporary file {}: {e}", tmp.display()),
        )
    };
    // A leftover temp file may have a looser mode, which create would keep.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(at_tmp(e)),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(at_tmp)?;
    let placed = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| match fs::rename(path, prev_path(path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => fs::rename(&tmp, path),
        });
    drop(f);
    if let Err(e) = placed {
        // On a full disk the partial file holds what space there was: every other
        // writer there would fail until the next write removed it.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir)?.sync_all()
}

/// Creates the state dir with mode 0700, or tightens an existing one and the state files
/// in it to 0700 and 0600; what was tightened is logged once.
pub fn secure_dir(dir: &Path) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::StateDir { path, source }
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io(dir))?;
    }
    let mut tightened = Vec::new();
    // The directory may be a link to where the state lives; a state file is only ever a
    // regular file this store wrote, and whatever a link there points to is not ours to
    // change (a link to /dev/full would otherwise make a device private).
    let mut tighten = |path: &Path, mode: u32, follow: bool| -> Result<(), StoreError> {
        let meta = match if follow {
            fs::metadata(path)
        } else {
            fs::symlink_metadata(path)
        } {
            Ok(m) if follow || m.is_file() => m,
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(path)(e)),
        };
        let old = meta.permissions().mode() & 0o777;
        if old & !mode != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(old & mode)).map_err(io(path))?;
            tightened.push(format!(
                "{} ({:o} to {:o})",
                path.display(),
                old,
                old & mode
            ));
        }
        Ok(())
    };
    tighten(dir, DIR_MODE, true)?;
    for name in [STAGED, DESIRED, DEPLOYED] {
        let path = dir.join(name);
        for suffix in ["", ".prev", ".corrupt", ".tmp"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            tighten(Path::new(&p), FILE_MODE, false)?;
        }
    }
    if !tightened.is_empty() {
        tracing::warn!(
            "the state holds node environments; tightened the modes of {}",
            tightened.join(", ")
        );
    }
    Ok(())
}

impl Store {
    /// Secures and loads the state in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        secure_dir(dir)?;
        let staged = load::<Configuration>(&dir.join(STAGED))?;
        let deployed = load::<DeployFile>(&dir.join(DEPLOYED))?.map(Deploy::from);
        let desired = load::<Deploy>(&dir.join(DESIRED))?;
        // No desired deploy (a state dir from before generations), or one older than
        // the deployed one (not written by this code): the deployed one is desired.
        let desired = match (desired, &deployed) {
            (Some(d), Some(dep)) if d.generation < dep.generation => Some(dep.clone()),
            (None, dep) => dep.clone(),
            (d, _) => d,
        };
        let slots = Slots {
            staged: staged.map(Arc::new),
            desired: desired.map(Arc::new),
            deployed: deployed.map(Arc::new),
        };
        Ok(Self {
            backend: Backend::File(dir.to_owned()),
            slots: Mutex::new(slots),
            writing: Mutex::new(()),
        })
    }

    /// A store in etcd, empty until [`Store::reload`] (done when leadership is won).
    pub fn etcd(store: crate::etcd_store::EtcdStore) -> Self {
        Self {
            backend: Backend::Etcd(store),
            slots: Mutex::default(),
            writing: Mutex::new(()),
        }
    }

    /// Reads the state afresh from etcd (a no-op for the state dir, read at open):
    /// a new leader starts from what the last one wrote.
    pub fn reload(&self) -> Result<(), StoreError> {
        let Backend::Etcd(etcd) = &self.backend else {
            return Ok(());
        };
        let _writing = self.writing();
        fn parse<T: DeserializeOwned>(
            etcd: &crate::etcd_store::EtcdStore,
            name: &str,
        ) -> Result<Option<T>, StoreError> {
            match etcd.load(name)? {
                Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| {
                    StoreError::CorruptEtcd {
                        name: name.trim_end_matches(".json").to_owned(),
                        source,
                    }
                }),
                None => Ok(None),
            }
        }
        let staged = parse::<Configuration>(etcd, STAGED)?;
        let desired = parse::<Deploy>(etcd, DESIRED)?;
        let deployed = parse::<Deploy>(etcd, DEPLOYED)?;
        *self.lock() = Slots {
            staged: staged.map(Arc::new),
            desired: desired.map(Arc::new),
            deployed: deployed.map(Arc::new),
        };
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Every update replaces a whole value, so a poisoned lock holds consistent data.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one state file; the caller holds [`Store::writing`].
    fn save(&self, file: &str, value: &impl Serialize) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File(dir) => {
                let path = dir.join(file);
                let bytes = serde_json::to_vec(value).expect("state serializes");
                write_durable(&path, &bytes).map_err(|source| StoreError::Io { path, source })
            }
            Backend::Etcd(etcd) => {
                let bytes = serde_json::to_vec(value).expect("state serializes");
                Ok(etcd.save(file, &bytes)?)
            }
        }
    }

    /// The staged configuration.
    pub fn staged(&self) -> Option<Configuration> {
        self.lock().staged.as_deref().cloned()
    }

    /// The desired deploy: what agents are brought to.
    pub fn desired(&self) -> Option<Arc<Deploy>> {
        self.lock().desired.clone()
    }

    /// The deployed deploy: the last one every agent acknowledged.
    pub fn deployed(&self) -> Option<Arc<Deploy>> {
        self.lock().deployed.clone()
    }

    /// The desired configuration, copied.
    pub fn desired_config(&self) -> Option<Configuration> {
        self.lock().desired.as_ref().map(|d| d.config.clone())
    }

    /// The deployed configuration, copied.
    pub fn deployed_config(&self) -> Option<Configuration> {
        self.lock().deployed.as_ref().map(|d| d.config.clone())
    }

    /// The generation of the desired deploy, 0 before the first.
    pub fn desired_generation(&self) -> u64 {
        self.lock().desired.as_ref().map_or(0, |d| d.generation)
    }

    /// Records a new staged configuration (on disk first).
    pub fn set_staged(&self, config: Configuration) -> Result<(), StoreError> {
        let _writing = self.writing();
        self.save(STAGED, &config)?;
        self.lock().staged = Some(Arc::new(config));
        Ok(())
    }

    /// Records `config` as the desired deploy, durably, under a new generation above
    /// every recorded one and above `floor` (the highest an agent reported); with
    /// `restart_all`, as one that restarts every node; `by`, the request's audit record
    /// (see [`Deploy::by`]). On error nothing changed, in memory or on disk.
    pub fn set_desired(
        &self,
        config: Configuration,
        floor: u64,
        restart_all: bool,
        by: Option<Box<drover_proto::access::AuditRecord>>,
        trail: Option<crate::audit::TrailMark>,
    ) -> Result<Arc<Deploy>, StoreError> {
        let _writing = self.writing();
        let (last, restart_since) = {
            let slots = self.lock();
            let g = |d: &Option<Arc<Deploy>>| d.as_ref().map_or(0, |d| d.generation);
            let r = |d: &Option<Arc<Deploy>>| d.as_ref().map_or(0, |d| d.restart_since);
            (
                g(&slots.desired).max(g(&slots.deployed)),
                r(&slots.desired).max(r(&slots.deployed)),
            )
        };
        let generation = last.max(floor) + 1;
        let deploy = Arc::new(Deploy {
            generation,
            config,
            restart_since: if restart_all {
                generation
            } else {
                restart_since
            },
            by,
            trail,
        });
        self.save(DESIRED, &*deploy)?;
        self.lock().desired = Some(deploy.clone());
        Ok(deploy)
    }

    /// Records `deploy` as the deployed one (on disk first), unless a newer one is
    /// recorded already.
    pub fn set_deployed(&self, deploy: &Arc<Deploy>) -> Result<(), StoreError> {
        self.set_deployed_with(deploy, None).map(drop)
    }

    /// As [`Store::set_deployed`]; with the etcd store, `also` (an audit record's put)
    /// goes in the same fenced transaction. `Ok(None)` when nothing was written (as new a
    /// deploy is recorded already); `Ok(Some(true))` when `also` was written with it,
    /// `Ok(Some(false))` when it was not (the state dir takes nothing else).
    pub fn set_deployed_with(
        &self,
        deploy: &Arc<Deploy>,
        also: Option<crate::etcd::Op>,
    ) -> Result<Option<bool>, StoreError> {
        let _writing = self.writing();
        if self
            .lock()
            .deployed
            .as_ref()
            .is_some_and(|d| d.generation >= deploy.generation)
        {
            return Ok(None);
        }
        let carried = match (&self.backend, also) {
            (Backend::Etcd(etcd), Some(op)) => {
                let bytes = serde_json::to_vec(&**deploy).expect("state serializes");
                etcd.save_with(DEPLOYED, &bytes, vec![op])?;
                true
            }
            _ => {
                self.save(DEPLOYED, &**deploy)?;
                false
            }
        };
        self.lock().deployed = Some(deploy.clone());
        Ok(Some(carried))
    }

    /// Writes every value held in memory to the state dir again (see
    /// [`crate::guard`]); nothing for etcd. Returns the files written.
    pub fn rewrite(&self) -> Result<Vec<&'static str>, StoreError> {
        if matches!(self.backend, Backend::Etcd(_)) {
            return Ok(Vec::new());
        }
        let _writing = self.writing();
        let (staged, desired, deployed) = {
            let slots = self.lock();
            (
                slots.staged.clone(),
                slots.desired.clone(),
                slots.deployed.clone(),
            )
        };
        let mut written = Vec::new();
        if let Some(c) = staged {
            self.save(STAGED, &*c)?;
            written.push(STAGED);
        }
        if let Some(d) = desired {
            self.save(DESIRED, &*d)?;
            written.push(DESIRED);
        }
        if let Some(d) = deployed {
            self.save(DEPLOYED, &*d)?;
            written.push(DEPLOYED);
        }
        Ok(written)
    }

    /// With the etcd store, deletes value parts that no value names (see
    /// [`crate::etcd_store::EtcdStore::sweep_parts`]), fenced by term `revision`; a no-op
    /// for the state dir.
    pub fn sweep_parts(&self, revision: i64) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Etcd(etcd) => {
                let _writing = self.writing();
                Ok(etcd.sweep_parts(revision)?)
            }
            Backend::File(_) => Ok(0),
        }
    }

    /// Where a state file lives (`None` with the etcd store).
    pub fn path(&self, file: &str) -> Option<PathBuf> {
        match &self.backend {
            Backend::File(dir) => Some(dir.join(file)),
            Backend::Etcd(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str) -> Configuration {
        let mut c = Configuration::empty();
        c.id = id.into();
        c
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn survives_a_reopen_and_refuses_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.staged().is_none());
        let c = Configuration::empty();
        store.set_staged(c.clone()).unwrap();
        let d = store.set_desired(c.clone(), 0, false, None, None).unwrap();
        store.set_deployed(&d).unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.staged(), Some(c.clone()));
        assert_eq!(again.deployed_config(), Some(c.clone()));
        assert_eq!(again.desired(), Some(d));
        assert!(!dir.path().join("staged.json.tmp").exists());

        // Both copies corrupt: a clear error, never a silent start without state.
        fs::write(dir.path().join(DEPLOYED), b"{\"id\": ").unwrap();
        fs::write(dir.path().join("deployed.json.prev"), b"garbage").unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("deployed.json: not a valid configuration")
                && err.contains("deployed.json.prev: not a valid configuration")
                && err.ends_with("move both away to start without them"),
            "{err}"
        );
        // The file missing and its copy corrupt: the copy is named, with what to do.
        fs::remove_file(dir.path().join(DEPLOYED)).unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("deployed.json.prev: not a valid configuration")
                && err.ends_with("itself is missing; move the copy away to start without it"),
            "{err}"
        );
        fs::write(dir.path().join(DEPLOYED), b"{\"id\": ").unwrap();
        // Without a copy at all: the one file to move is named.
        fs::remove_file(dir.path().join("deployed.json.prev")).unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("there is no last good copy")
                && err.ends_with("move it away to start without it"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_or_missing_file_falls_back_to_the_last_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store
            .set_desired(config("first"), 0, false, None, None)
            .unwrap();
        store.set_deployed(&first).unwrap();
        let second = store
            .set_desired(config("second"), 0, false, None, None)
            .unwrap();
        store.set_deployed(&second).unwrap();
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

    #[test]
    fn generations_strictly_increase_across_reopens_and_above_what_agents_report() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        for round in 0..4 {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.desired_generation(), last);
            let d = store
                .set_desired(config("same-id"), 0, false, None, None)
                .unwrap();
            assert!(
                d.generation > last,
                "round {round}: {} after {last}",
                d.generation
            );
            last = d.generation;
            // Every other deploy is not acknowledged: the deployed one lags.
            if round % 2 == 0 {
                store.set_deployed(&d).unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.deployed().unwrap().generation, last - 1);
        assert_eq!(store.desired().unwrap().generation, last);
        // An agent that remembers a generation from a lost state dir is not sent an
        // older one.
        let d = store
            .set_desired(config("x"), last + 40, false, None, None)
            .unwrap();
        assert_eq!(d.generation, last + 41);
        // An older deploy never replaces a newer deployed one.
        let newer = store
            .set_desired(config("newer"), 0, false, None, None)
            .unwrap();
        store.set_deployed(&newer).unwrap();
        store.set_deployed(&d).unwrap();
        assert_eq!(store.deployed(), Some(newer));
    }

    #[test]
    fn the_last_restart_of_every_node_is_carried_to_later_deploys_and_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let plain = store
            .set_desired(config("a"), 0, false, None, None)
            .unwrap();
        assert_eq!(plain.restart_since, 0);
        let all = store.set_desired(config("a"), 0, true, None, None).unwrap();
        assert_eq!(all.restart_since, all.generation);
        let later = store
            .set_desired(config("b"), 0, false, None, None)
            .unwrap();
        assert_eq!(later.restart_since, all.generation);
        // Read back after a restart, and carried on by the next deploy.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.desired(), Some(later));
        let next = store
            .set_desired(config("c"), 0, false, None, None)
            .unwrap();
        assert_eq!(next.restart_since, all.generation);
        let again = store.set_desired(config("c"), 0, true, None, None).unwrap();
        assert_eq!(again.restart_since, again.generation);
    }

    #[test]
    fn a_write_that_fails_leaves_no_temp_file_and_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staged.json");
        write_durable(&path, b"old").unwrap();
        // The previous copy cannot be put aside: a non-empty directory in its place.
        fs::create_dir(dir.path().join("staged.json.prev")).unwrap();
        fs::write(dir.path().join("staged.json.prev/x"), b"").unwrap();
        write_durable(&path, b"new").unwrap_err();
        assert!(!dir.path().join("staged.json.tmp").exists());
        assert_eq!(fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn a_failed_record_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = store
            .set_desired(config("old"), 0, false, None, None)
            .unwrap();
        store.set_deployed(&old).unwrap();
        let before: Vec<_> = [DESIRED, DEPLOYED]
            .iter()
            .map(|f| fs::read(dir.path().join(f)).unwrap())
            .collect();
        // A directory where the temp file goes: the write fails even for root.
        fs::create_dir(dir.path().join("desired.json.tmp")).unwrap();
        let err = store
            .set_desired(config("new"), 0, false, None, None)
            .unwrap_err()
            .to_string();
        // Named as the file in the way, not as the state file it was to replace.
        assert!(
            err.contains("desired.json: its temporary file ") && err.contains("desired.json.tmp: "),
            "{err}"
        );
        assert_eq!(store.desired(), Some(old.clone()));
        assert_eq!(store.deployed(), Some(old.clone()));
        let after: Vec<_> = [DESIRED, DEPLOYED]
            .iter()
            .map(|f| fs::read(dir.path().join(f)).unwrap())
            .collect();
        assert_eq!(before, after);
        fs::remove_dir(dir.path().join("desired.json.tmp")).unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.desired(), Some(old.clone()));
        // The failed attempt used up no generation anyone saw; the next is one above.
        assert_eq!(
            again
                .set_desired(config("new"), 0, false, None, None)
                .unwrap()
                .generation,
            old.generation + 1
        );
    }

    #[test]
    fn a_state_dir_from_before_generations_loads_as_generation_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = config("legacy");
        fs::write(dir.path().join(DEPLOYED), serde_json::to_vec(&c).unwrap()).unwrap();
        fs::write(dir.path().join(STAGED), serde_json::to_vec(&c).unwrap()).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let want = Arc::new(Deploy {
            generation: 1,
            config: c.clone(),
            restart_since: 0,
            by: None,
            trail: None,
        });
        assert_eq!(store.deployed(), Some(want.clone()));
        assert_eq!(store.desired(), Some(want));
        assert_eq!(store.staged(), Some(c));
        assert_eq!(
            store
                .set_desired(config("next"), 0, false, None, None)
                .unwrap()
                .generation,
            2
        );
    }

    #[test]
    fn a_state_dir_that_cannot_be_made_is_a_clear_error() {
        let parent = tempfile::tempdir().unwrap();
        let file = parent.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let err = Store::open(&file.join("state")).unwrap_err().to_string();
        assert!(
            err.starts_with("state dir ") && err.contains("not-a-dir"),
            "{err}"
        );
    }

    #[test]
    fn state_is_private_and_loose_modes_are_tightened() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let store = Store::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        store.set_staged(config("a")).unwrap();
        store.set_staged(config("b")).unwrap();
        store
            .set_desired(config("b"), 0, false, None, None)
            .unwrap();
        for f in [STAGED, "staged.json.prev", DESIRED] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        // Loosened by hand, or from an older version: tightened at the next start.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.join(STAGED), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(
            dir.join("staged.json.prev"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        Store::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(STAGED)), 0o600);
        assert_eq!(mode(&dir.join("staged.json.prev")), 0o600);
        // A leftover temp file with a loose mode does not pass its mode on.
        fs::write(dir.join("desired.json.tmp"), b"x").unwrap();
        fs::set_permissions(
            dir.join("desired.json.tmp"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let store = Store::open(&dir).unwrap();
        fs::set_permissions(
            dir.join("desired.json.tmp"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        store
            .set_desired(config("c"), 0, false, None, None)
            .unwrap();
        assert_eq!(mode(&dir.join(DESIRED)), 0o600);
    }

    #[test]
    fn a_link_in_place_of_a_state_file_leaves_its_target_alone() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        Store::open(&dir).unwrap();
        let elsewhere = parent.path().join("shared.txt");
        fs::write(&elsewhere, b"not ours").unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("staged.json.corrupt")).unwrap();
        Store::open(&dir).unwrap();
        assert_eq!(mode(&elsewhere), 0o644);
    }
}
