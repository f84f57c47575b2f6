//! The key of a daemon's QUIC stateless resets, kept in its state dir so that a daemon
//! started again after a crash ends its peers' old connections at their next keep-alive,
//! rather than each peer waiting out its idle timeout before it dials again (see
//! [`crate::conn::server_endpoint_keyed`]).
//!
//! Whoever holds the key can end others' connections to this daemon, so it is a secret:
//! mode 0600 in the state dir, never logged. It is made once, written whole (a temp
//! file renamed into place) and read at every start.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The key's file in the state dir.
pub const FILE: &str = "quic-reset.key";

/// The length of a key.
pub const LEN: usize = 32;

/// Why the key cannot be had.
#[derive(Debug, thiserror::Error)]
#[error("stateless reset key {path}: {reason}")]
pub struct Error {
    /// The key's file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// Reads the key from `dir` (a secured state dir), making it first if there is none.
pub fn load_or_create(dir: &Path) -> Result<[u8; LEN], Error> {
    let path = dir.join(FILE);
    let fail = |reason: String| Error {
        path: path.clone(),
        reason,
    };
    match fs::read(&path) {
        Ok(bytes) if bytes.len() != LEN => {
            // Not one this daemon wrote whole: as good as none.
            tracing::warn!(
                "stateless reset key {} holds {} bytes, not {LEN}: making a new one \
                 (peers connected before this start reconnect after their idle timeout)",
                path.display(),
                bytes.len()
            );
            fresh(dir, &path).map_err(|e| fail(e.to_string()))
        }
        Ok(bytes) => {
            let key = <[u8; LEN]>::try_from(bytes.as_slice()).expect("length checked");
            let meta = fs::metadata(&path).map_err(|e| fail(e.to_string()))?;
            if meta.permissions().mode() & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(|e| fail(format!("cannot make it private: {e}")))?;
                tracing::warn!("tightened the mode of {} to 600", path.display());
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fresh(dir, &path).map_err(|e| fail(e.to_string()))
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// A new key, written to `path` if it can be. One that cannot be (a full disk) is
/// used all the same: the daemon runs, and only the prompt end of its peers' old
/// connections after its next restart is lost.
fn fresh(dir: &Path, path: &Path) -> std::io::Result<[u8; LEN]> {
    let key = generate()?;
    if let Err(e) = write(dir, path, &key) {
        tracing::warn!(
            "cannot write the stateless reset key {}: {e}; using one for this run only \
             (after a restart, peers reconnect after their idle timeout)",
            path.display()
        );
    }
    Ok(key)
}

/// Writes `key` to `dir` again if its file is missing (a state dir removed under the
/// running daemon): the next start must read the key the daemon's peers know. `Ok(true)`
/// when it was written.
pub fn restore(dir: &Path, key: &[u8; LEN]) -> Result<bool, Error> {
    let path = dir.join(FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write(dir, &path, key).map(|()| true).map_err(|e| Error {
                path: path.clone(),
                reason: format!("cannot write it: {e}"),
            })
        }
        Err(e) => Err(Error {
            path: path.clone(),
            reason: e.to_string(),
        }),
    }
}

/// A new random key.
fn generate() -> std::io::Result<[u8; LEN]> {
    let mut key = [0u8; LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| std::io::Error::other("the system gave no random bytes"))?;
    Ok(key)
}

/// Writes the key through a temp file, so that a crash leaves no partial key.
fn write(dir: &Path, path: &Path, key: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    let result = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(key).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| fs::File::open(dir)?.sync_all());
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let path = dir.path().join(FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create(dir.path()).unwrap(), first, "read back");
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());
        // Another state dir, another key.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), first);
    }

    #[test]
    fn a_removed_key_is_written_back_and_a_present_one_left() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        assert!(!restore(dir.path(), &[7; LEN]).unwrap(), "present: left");
        assert_eq!(load_or_create(dir.path()).unwrap(), key);
        fs::remove_file(dir.path().join(FILE)).unwrap();
        assert!(restore(dir.path(), &key).unwrap());
        assert_eq!(
            load_or_create(dir.path()).unwrap(),
            key,
            "the same key back"
        );
        assert_eq!(
            fs::metadata(dir.path().join(FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let gone = dir.path().join("gone");
        let err = restore(&gone, &key).unwrap_err();
        assert!(err.to_string().contains("cannot write it"), "{err}");
    }

    #[test]
    fn a_loose_mode_is_tightened_and_a_wrong_size_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        let path = dir.path().join(FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), key);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(&path, b"short").unwrap();
        let new = load_or_create(dir.path()).unwrap();
        assert_ne!(new, key);
        assert_eq!(fs::read(&path).unwrap(), new, "written in its place");
    }

    /// A key that cannot be written (no room, or a directory where its file goes) is
    /// used for the run all the same: the daemon starts.
    #[test]
    fn a_key_that_cannot_be_written_is_used_for_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(format!("{FILE}.tmp"));
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("x"), b"").unwrap();
        let key = load_or_create(dir.path()).unwrap();
        assert!(!dir.path().join(FILE).exists());
        assert_ne!(
            load_or_create(tempfile::tempdir().unwrap().path()).unwrap(),
            key
        );
    }
}
