//! Files written on a node's behalf, with the node's rights.
//!
//! The agent writes a node's `files` into its working directory before each start. A
//! working directory may be the node's user's (one the cluster file names, or the
//! default one the agent gives it): written with root's rights, a file lands wherever
//! that user points the path meanwhile (a directory swapped for a symlink), and lands
//! even where the user may not write. So the spawner thread takes the node's user,
//! group and groups as its filesystem identity while it writes ([`FsIdentity`]), as
//! the node itself would write them: its files are the node's, and only where it may
//! put them.
//!
//! The switch is the calling thread's alone: `setfsuid`, `setfsgid` and the raw
//! `setgroups` system call act on the thread that makes them (glibc's `setgroups`
//! wrapper would apply it to every thread of the agent).

use std::io;

use crate::exec::Plan;

/// The calling thread's filesystem identity as a node's, until dropped.
#[derive(Debug)]
pub struct FsIdentity {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

/// What `setfsuid`/`setfsgid` are given to learn the current value without a change.
const QUERY: u32 = u32::MAX;

fn fsuid() -> u32 {
    // SAFETY: an invalid id changes nothing and returns the current one.
    u32::try_from(unsafe { libc::setfsuid(QUERY) }).unwrap_or(QUERY)
}

fn fsgid() -> u32 {
    // SAFETY: as in `fsuid`.
    u32::try_from(unsafe { libc::setfsgid(QUERY) }).unwrap_or(QUERY)
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `groups`; the raw system call changes the
    // calling thread's groups only.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a size of 0 asks for the count only.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let Ok(len) = usize::try_from(n) else {
        return Err(io::Error::last_os_error());
    };
    let mut groups = vec![0; len];
    // SAFETY: `groups` holds `n` entries.
    let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    let Ok(got) = usize::try_from(got) else {
        return Err(io::Error::last_os_error());
    };
    groups.truncate(got);
    Ok(groups)
}

fn set_fsgid(gid: u32) -> io::Result<()> {
    // SAFETY: changes the calling thread's filesystem gid only.
    unsafe { libc::setfsgid(gid) };
    if fsgid() == gid {
        Ok(())
    } else {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
}

fn set_fsuid(uid: u32) -> io::Result<()> {
    // SAFETY: changes the calling thread's filesystem uid only.
    unsafe { libc::setfsuid(uid) };
    if fsuid() == uid {
        Ok(())
    } else {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
}

impl FsIdentity {
    /// Takes the node's user, group and groups of `plan` as the calling thread's
    /// filesystem identity. `None` when there is nothing to take: the node runs as the
    /// agent, or the agent is not root (then it runs nodes as itself only).
    pub fn assume(plan: &Plan) -> io::Result<Option<Self>> {
        let Some((uid, gid)) = plan.owner() else {
            return Ok(None);
        };
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(None);
        }
        let saved = Self {
            uid: fsuid(),
            gid: fsgid(),
            groups: groups()?,
        };
        // Groups and group first, while the thread is root on the filesystem too; the
        // user last. Whatever was changed is changed back by `saved`'s drop.
        if let Some(g) = &plan.groups {
            set_groups(g)?;
        }
        let switched = set_fsgid(gid).and_then(|()| set_fsuid(uid));
        match switched {
            Ok(()) => Ok(Some(saved)),
            Err(e) => {
                drop(saved);
                Err(e)
            }
        }
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // The user first: back to root on the filesystem, the thread may set the rest.
        let restored = set_fsuid(self.uid)
            .and_then(|()| set_fsgid(self.gid))
            .and_then(|()| set_groups(&self.groups));
        if let Err(e) = restored {
            // A spawner thread left with a node's rights would make later nodes' files
            // and processes wrongly: the agent ends, its nodes run on, and the next
            // agent adopts them.
            tracing::error!("cannot give the spawner thread its own identity back: {e}");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn nothing_is_switched_for_a_node_of_the_agents_own() {
        assert!(FsIdentity::assume(&Plan::default()).unwrap().is_none());
    }

    /// As root: files made meanwhile are the node's, where it may write only, and the
    /// thread (not the process) had the identity, which it has back afterwards.
    #[test]
    fn files_are_made_as_the_node_and_the_thread_gets_its_own_back() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::os::unix::fs::chown(&open, Some(65534), Some(65534)).unwrap();
        let plan = Plan {
            uid: Some(65534),
            gid: Some(65534),
            groups: Some(vec![65534]),
            ..Plan::default()
        };
        let before = (fsuid(), fsgid(), groups().unwrap());
        // Another thread of the process, made before the switch (a thread starts with
        // the identity of the one that makes it).
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            asked.recv().unwrap();
            (fsuid(), fsgid())
        });
        {
            let _as = FsIdentity::assume(&plan).unwrap().expect("switched");
            assert_eq!((fsuid(), fsgid()), (65534, 65534));
            ask.send(()).unwrap();
            assert_eq!(
                other.join().unwrap(),
                (before.0, before.1),
                "it keeps root's"
            );
            std::fs::write(open.join("f"), "x").unwrap();
            let e = std::fs::write(dir.path().join("g"), "x").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
        assert_eq!((fsuid(), fsgid(), groups().unwrap()), before);
        let made = std::fs::metadata(open.join("f")).unwrap();
        assert_eq!((made.uid(), made.gid()), (65534, 65534));
        assert!(!dir.path().join("g").exists());
        std::fs::write(dir.path().join("g"), "x").expect("root again");
    }
}
