//! Short paths for the nodes' Unix sockets.
//!
//! A node's notify socket (bound by the agent) and query socket (bound by the node) live
//! in the node's 0700 directory under the state dir. A Unix socket's path must fit
//! `sun_path`, [`SUN_PATH_MAX`] bytes, so a long state dir (or a long node name) made a
//! node's socket paths too long and the node could not start. A node whose socket paths
//! would not fit reaches its directory through `/tmp/drover-<hash>`, a symlink to the
//! nodes directory: the sockets stay where they were (in the node's own directory),
//! only the name given to `bind`, `connect` and the node is short. Which name a node
//! gets depends only on the nodes directory and the node's name, so the next agent
//! process finds the same paths its adopted nodes were given. An agent that stops its
//! nodes on exit removes the link ([`SocketDirs::release`]); one that leaves them
//! running keeps it for them.
//!
//! `/tmp` is shared, so a link is used only if it is this user's symlink to this very
//! directory; anything else there is an error (at start-up, or when the node is made),
//! never followed.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The longest path a Unix socket may have (`sun_path` less its terminating NUL).
pub const SUN_PATH_MAX: usize = 107;

/// The longest socket path below a node's directory: the query socket of a node that
/// runs as its own user (see `crate::exec::query_path`).
const LONGEST_SOCKET: &str = "run/query.sock";

/// Where each node's sockets are reached.
#[derive(Debug, Clone)]
pub struct SocketDirs {
    nodes_dir: PathBuf,
    link: PathBuf,
}

impl SocketDirs {
    /// For the nodes under `nodes_dir` (absolute). When some node name could need the
    /// short link, an existing one is checked now, so that a foreign one stops the
    /// agent at start-up; a missing one is made when a node needs it.
    pub fn new(nodes_dir: &Path) -> std::io::Result<Self> {
        let this = Self {
            nodes_dir: nodes_dir.to_owned(),
            link: link_path(nodes_dir),
        };
        let longest_name = "n".repeat(drover_proto::name::MAX_LEN);
        if this.needs_link(&longest_name) && std::fs::symlink_metadata(&this.link).is_ok() {
            this.check_link(&longest_name)?;
        }
        Ok(this)
    }

    /// The directory through which node `name`'s sockets are bound and reached.
    pub fn dir(&self, name: &str) -> PathBuf {
        if self.needs_link(name) {
            self.link.join(name)
        } else {
            self.nodes_dir.join(name)
        }
    }

    /// Makes sure [`SocketDirs::dir`] of `name` leads to the node's directory: when it
    /// goes through the link, the link exists and is ours.
    pub fn ensure(&self, name: &str) -> std::io::Result<()> {
        if !self.needs_link(name) {
            return Ok(());
        }
        match std::os::unix::fs::symlink(&self.nodes_dir, &self.link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.check_link(name),
            Err(e) => Err(self.refuse(name, &e.to_string())),
        }
    }

    /// Removes the link, if it is ours: the agent stopped its nodes, so no process was
    /// given a path through it, and a later agent makes it again when a node needs it.
    /// A link left behind would outlive the state dir in `/tmp`.
    pub fn release(&self) {
        if self.not_ours().is_none() {
            let _ = std::fs::remove_file(&self.link);
        }
    }

    fn needs_link(&self, name: &str) -> bool {
        socket_path_len(&self.nodes_dir, name) > SUN_PATH_MAX
    }

    /// Whether the link is this user's symlink to the nodes directory.
    fn check_link(&self, name: &str) -> std::io::Result<()> {
        match self.not_ours() {
            None => Ok(()),
            Some(why) => Err(self.refuse(name, &why)),
        }
    }

    /// Why the link is not this user's symlink to the nodes directory; `None` when it is.
    fn not_ours(&self) -> Option<String> {
        let meta = match std::fs::symlink_metadata(&self.link) {
            Ok(meta) => meta,
            Err(e) => return Some(e.to_string()),
        };
        if !meta.file_type().is_symlink() {
            return Some("it exists and is not a symlink".to_owned());
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Some(format!(
                "it belongs to uid {}, not to this user",
                meta.uid()
            ));
        }
        match std::fs::read_link(&self.link) {
            Ok(target) if target == self.nodes_dir => None,
            Ok(target) => Some(format!("it points to {}", target.display())),
            Err(e) => Some(e.to_string()),
        }
    }

    fn refuse(&self, name: &str, why: &str) -> std::io::Error {
        std::io::Error::other(format!(
            "socket paths under {} would be up to {} bytes, more than the {SUN_PATH_MAX} a \
             unix socket path may have, and the short link {} cannot be used: {why}; remove \
             it or use a shorter state dir",
            self.nodes_dir.join(name).display(),
            socket_path_len(&self.nodes_dir, name),
            self.link.display(),
        ))
    }
}

/// The length of node `name`'s longest socket path directly under `dir`.
fn socket_path_len(dir: &Path, name: &str) -> usize {
    dir.as_os_str().len() + 1 + name.len() + 1 + LONGEST_SOCKET.len()
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
    fn nodes_whose_paths_fit_use_their_own_directory_and_make_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let socks = SocketDirs::new(dir.path()).unwrap();
        socks.ensure("n1").unwrap();
        assert_eq!(socks.dir("n1"), dir.path().join("n1"));
        assert!(std::fs::symlink_metadata(link_path(dir.path())).is_err());
    }

    #[test]
    fn a_long_dir_is_reached_through_a_short_link_whose_sockets_work() {
        let base = tempfile::tempdir().unwrap();
        let dir = long_dir(base.path());
        let socks = SocketDirs::new(&dir).unwrap();
        let node = "n".repeat(drover_proto::name::MAX_LEN);
        socks.ensure(&node).unwrap();
        let _cleanup = Unlink(link_path(&dir));
        let sock_dir = socks.dir(&node);
        assert!(socket_path_len(sock_dir.parent().unwrap(), &node) <= SUN_PATH_MAX);
        assert_eq!(std::fs::read_link(sock_dir.parent().unwrap()).unwrap(), dir);
        // The next agent process: the same paths, the link accepted.
        let again = SocketDirs::new(&dir).unwrap();
        again.ensure(&node).unwrap();
        assert_eq!(again.dir(&node), sock_dir);
        // A socket bound through the link lives in the long dir.
        std::fs::create_dir_all(dir.join(&node).join("run")).unwrap();
        let path = sock_dir.join(LONGEST_SOCKET);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        assert!(dir.join(&node).join(LONGEST_SOCKET).exists());
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        let mut buf = [0u8; 16];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn releasing_removes_only_our_own_link() {
        let base = tempfile::tempdir().unwrap();
        let dir = long_dir(base.path());
        let socks = SocketDirs::new(&dir).unwrap();
        let node = "n".repeat(drover_proto::name::MAX_LEN);
        socks.ensure(&node).unwrap();
        let link = link_path(&dir);
        let _cleanup = Unlink(link.clone());
        assert!(std::fs::symlink_metadata(&link).is_ok());
        socks.release();
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "our link is removed"
        );
        // Made again when a node needs it.
        socks.ensure(&node).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), dir);
        // Someone else's link at that place is left alone.
        std::fs::remove_file(&link).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
        socks.release();
        assert_eq!(std::fs::read_link(&link).unwrap(), elsewhere.path());
    }

    #[test]
    fn a_link_to_somewhere_else_is_refused_at_start_with_its_path() {
        let base = tempfile::tempdir().unwrap();
        let dir = long_dir(base.path());
        let link = link_path(&dir);
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
        let _cleanup = Unlink(link.clone());
        let err = SocketDirs::new(&dir).unwrap_err().to_string();
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
        let err = SocketDirs::new(&dir).unwrap_err().to_string();
        assert!(err.contains("is not a symlink"), "{err}");
        let socks = SocketDirs {
            nodes_dir: dir.clone(),
            link: link.clone(),
        };
        let err = socks.ensure("n1").unwrap_err().to_string();
        assert!(err.contains("is not a symlink"), "{err}");
    }

    struct Unlink(PathBuf);

    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
