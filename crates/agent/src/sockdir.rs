//! Short paths for the nodes' Unix sockets.
//!
//! A node's notify socket (bound by the agent) and query socket (bound by the node) live
//! in the node's 0700 directory under the state dir. A Unix socket's path must fit
//! `sun_path`, [`SUN_PATH_MAX`] bytes, so a long state dir made every node's socket path
//! too long and no node could start. When the longest socket path under the nodes
//! directory would not fit, sockets are reached through `/tmp/drover-<hash>`, a symlink
//! to the nodes directory: the sockets stay where they were (in the nodes' own 0700
//! directories), only the name given to `bind`, `connect` and the nodes is short. The
//! link's name depends only on the nodes directory, so the next agent process finds
//! the same paths its adopted nodes were given.
//!
//! `/tmp` is shared, so a link is used only if it is this user's symlink to this very
//! directory; anything else there is an error at start-up, never followed.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The longest path a Unix socket may have (`sun_path` less its terminating NUL).
pub const SUN_PATH_MAX: usize = 107;

/// The longest socket file name in a node's directory.
const LONGEST_SOCKET: &str = "notify.sock";

/// Where the nodes' sockets are to be reached: `nodes_dir` itself when every socket
/// path under it fits, else a short link to it (made here when missing).
pub fn socket_root(nodes_dir: &Path) -> std::io::Result<PathBuf> {
    if fits(nodes_dir) {
        return Ok(nodes_dir.to_owned());
    }
    let link = link_path(nodes_dir);
    let too_long = longest(nodes_dir);
    let refuse = |why: String| {
        std::io::Error::other(format!(
            "node socket paths under {} would be up to {too_long} bytes, more than the \
             {SUN_PATH_MAX} a unix socket path may have, and the short link {} cannot be \
             used: {why}; remove it or use a shorter state dir",
            nodes_dir.display(),
            link.display(),
        ))
    };
    match std::os::unix::fs::symlink(nodes_dir, &link) {
        Ok(()) => return Ok(link),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(refuse(e.to_string())),
    }
    let meta = std::fs::symlink_metadata(&link).map_err(|e| refuse(e.to_string()))?;
    if !meta.file_type().is_symlink() {
        return Err(refuse("it exists and is not a symlink".to_owned()));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(refuse(format!(
            "it belongs to uid {}, not to this user",
            meta.uid()
        )));
    }
    let target = std::fs::read_link(&link).map_err(|e| refuse(e.to_string()))?;
    if target != nodes_dir {
        return Err(refuse(format!("it points to {}", target.display())));
    }
    Ok(link)
}

/// Whether every node's socket path under `dir` fits.
fn fits(dir: &Path) -> bool {
    longest(dir) <= SUN_PATH_MAX
}

/// The length of the longest node socket path under `dir`.
fn longest(dir: &Path) -> usize {
    dir.as_os_str().len() + 1 + drover_proto::name::MAX_LEN + 1 + LONGEST_SOCKET.len()
}

/// `/tmp/drover-` and 12 hex digits of a hash of `nodes_dir` that is the same in every
/// build (FNV-1a), so that upgraded agents find the links of their predecessors.
fn link_path(nodes_dir: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in nodes_dir.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    PathBuf::from(format!("/tmp/drover-{:012x}", h & 0xffff_ffff_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_dir(base: &Path) -> PathBuf {
        let mut dir = base.to_owned();
        while dir.as_os_str().len() < 150 {
            dir.push("a-rather-long-directory-name");
        }
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_short_dir_is_used_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(socket_root(dir.path()).unwrap(), dir.path());
    }

    #[test]
    fn a_long_dir_is_reached_through_a_short_link_whose_sockets_work() {
        let base = tempfile::tempdir().unwrap();
        let dir = long_dir(base.path());
        let root = socket_root(&dir).unwrap();
        let _cleanup = Unlink(root.clone());
        assert!(fits(&root), "{}", root.display());
        assert_eq!(std::fs::read_link(&root).unwrap(), dir);
        // Again (the next agent process): the same link.
        assert_eq!(socket_root(&dir).unwrap(), root);
        // A socket bound through the link with the longest node name lives in the
        // long dir.
        let node = "n".repeat(drover_proto::name::MAX_LEN);
        std::fs::create_dir(dir.join(&node)).unwrap();
        let path = root.join(&node).join(LONGEST_SOCKET);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        assert!(dir.join(&node).join(LONGEST_SOCKET).exists());
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        let mut buf = [0u8; 16];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_link_to_somewhere_else_is_refused_with_its_path() {
        let base = tempfile::tempdir().unwrap();
        let dir = long_dir(base.path());
        let link = link_path(&dir);
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
        let _cleanup = Unlink(link.clone());
        let err = socket_root(&dir).unwrap_err().to_string();
        assert!(err.contains(&link.display().to_string()), "{err}");
        assert!(
            err.contains(&format!("points to {}", elsewhere.path().display())),
            "{err}"
        );
        assert!(err.contains("more than the 107"), "{err}");
    }

    #[test]
    fn a_file_in_place_of_the_link_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let dir = long_dir(base.path());
        let link = link_path(&dir);
        std::fs::write(&link, b"").unwrap();
        let _cleanup = Unlink(link.clone());
        let err = socket_root(&dir).unwrap_err().to_string();
        assert!(err.contains("is not a symlink"), "{err}");
    }

    struct Unlink(PathBuf);

    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
