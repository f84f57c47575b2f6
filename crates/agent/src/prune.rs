//! The directories of removed nodes, deleted once they have been removed for the
//! retention the operator set (`--removed-node-retention`; off by default, as a node's
//! working directory may hold its program's data).
//!
//! A removed node leaves `<state dir>/nodes/NAME` behind: its log files, its working
//! directory, what its program left. [`expired`] decides (no I/O) which directories may
//! go: not a node the supervisor has, holding no record, unchanged for the retention (a
//! directory's mtime moves when its record is deleted at removal, and whenever a file in
//! it is made or rotated). The supervisor looks at each such directory once more
//! ([`look`]: a node may have come and gone under its name since the scan) and renames
//! it to a hidden name on its own task, where no node can be added meanwhile, so a
//! node deployed again under that name gets a new directory; the renamed ones are
//! deleted off that task ([`remove`]), and leftovers of an agent killed while deleting
//! are deleted after the next agent's first scan ([`scan`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The prefix of a directory being deleted. Node names start with a letter or digit,
/// so it never names a node.
pub const PRUNED_PREFIX: &str = ".pruned-";

/// One node directory as [`scan`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    /// The node's name (the directory's).
    pub name: String,
    /// Whether it holds a node record (a node this or an earlier agent process has).
    pub has_record: bool,
    /// Time since the directory last changed; `None` when its mtime is in the future.
    pub unchanged_for: Option<Duration>,
}

/// The names of `dirs` that may be deleted: not in `live` (the nodes the supervisor
/// has, being removed or not), without a record, unchanged for at least `retention`.
pub fn expired<'a, V>(
    dirs: &'a [Dir],
    live: &BTreeMap<String, V>,
    retention: Duration,
) -> Vec<&'a str> {
    dirs.iter()
        .filter(|d| {
            !live.contains_key(&d.name)
                && !d.has_record
                && d.unchanged_for.is_some_and(|age| age >= retention)
        })
        .map(|d| d.name.as_str())
        .collect()
}

/// How often to look, for a retention: often enough that a directory goes within a
/// quarter of the retention after it expired, at most hourly.
pub fn interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600))
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The node directories.
    pub dirs: Vec<Dir>,
    /// Directories renamed for deletion that are still there.
    pub leftovers: Vec<PathBuf>,
}

/// Lists the node directories in `nodes_dir` (blocking). Only real directories count;
/// what cannot be read is left alone.
pub fn scan(nodes_dir: &Path, now: SystemTime) -> Scan {
    let mut scan = Scan::default();
    let Ok(entries) = std::fs::read_dir(nodes_dir) else {
        return scan;
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with(PRUNED_PREFIX) {
            if entry.path().symlink_metadata().is_ok_and(|m| m.is_dir()) {
                scan.leftovers.push(entry.path());
            }
        } else if !name.starts_with('.') {
            scan.dirs.extend(look(&entry.path(), name, now));
        }
    }
    scan
}

/// Node directory `dir` (named `name`) as it is now; `None` when it is no directory or
/// its mtime cannot be read. One `stat` of it and one of its record.
pub fn look(dir: &Path, name: String, now: SystemTime) -> Option<Dir> {
    let meta = dir
        .symlink_metadata()
        .ok()
        .filter(std::fs::Metadata::is_dir)?;
    let mtime = meta.modified().ok()?;
    Some(Dir {
        has_record: dir.join("record.json").symlink_metadata().is_ok(),
        unchanged_for: now.duration_since(mtime).ok(),
        name,
    })
}

/// Deletes `dirs` and all they hold (blocking); what cannot be deleted is logged.
pub fn remove(dirs: Vec<PathBuf>) {
    for dir in dirs {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("cannot delete {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;

    use super::{Dir, expired, interval, scan};

    fn dir(name: &str, has_record: bool, secs: Option<u64>) -> Dir {
        Dir {
            name: name.to_owned(),
            has_record,
            unchanged_for: secs.map(Duration::from_secs),
        }
    }

    #[test]
    fn only_old_directories_of_nodes_the_supervisor_lacks_and_without_a_record_go() {
        let live: BTreeMap<String, ()> = [("kept".to_owned(), ())].into();
        let dirs = [
            dir("old", false, Some(100)),
            dir("young", false, Some(9)),
            dir("kept", false, Some(100)),
            dir("recorded", true, Some(100)),
            dir("future", false, None),
            dir("exactly", false, Some(10)),
        ];
        assert_eq!(
            expired(&dirs, &live, Duration::from_secs(10)),
            ["old", "exactly"]
        );
    }

    #[test]
    fn the_interval_is_a_quarter_of_the_retention_within_bounds() {
        assert_eq!(interval(Duration::from_secs(4)), Duration::from_secs(1));
        assert_eq!(
            interval(Duration::from_millis(1)),
            Duration::from_millis(100)
        );
        assert_eq!(
            interval(Duration::from_secs(7 * 86_400)),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn a_scan_lists_node_directories_and_leftovers_only() {
        let t = tempfile::tempdir().unwrap();
        let nodes = t.path();
        std::fs::create_dir(nodes.join("a")).unwrap();
        std::fs::write(nodes.join("a/record.json"), "{}").unwrap();
        std::fs::create_dir(nodes.join("b")).unwrap();
        std::fs::create_dir(nodes.join(".pruned-c-1")).unwrap();
        std::fs::create_dir(nodes.join(".other")).unwrap();
        std::fs::write(nodes.join("file"), "").unwrap();
        std::os::unix::fs::symlink(nodes.join("b"), nodes.join("link")).unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        let mut found = scan(nodes, later);
        found.dirs.sort_by(|x, y| x.name.cmp(&y.name));
        let names: Vec<_> = found
            .dirs
            .iter()
            .map(|d| (d.name.as_str(), d.has_record))
            .collect();
        assert_eq!(names, [("a", true), ("b", false)]);
        assert!(found.dirs.iter().all(|d| {
            d.unchanged_for
                .is_some_and(|a| a >= Duration::from_secs(59))
        }));
        assert_eq!(found.leftovers, [nodes.join(".pruned-c-1")]);
    }

    proptest! {
        /// Whatever the directories, nothing the supervisor has, nothing with a record
        /// and nothing younger than the retention is ever chosen.
        #[test]
        fn nothing_live_recorded_or_young_is_chosen(
            dirs in proptest::collection::vec(
                ("[a-e]", any::<bool>(), proptest::option::of(0u64..20)),
                0..12,
            ),
            live in proptest::collection::btree_set("[a-e]", 0..5),
            retention in 0u64..20,
        ) {
            let dirs: Vec<Dir> = dirs.into_iter().map(|(n, r, s)| dir(&n, r, s)).collect();
            let live: BTreeMap<String, ()> = live.into_iter().map(|n| (n, ())).collect();
            let retention = Duration::from_secs(retention);
            for name in expired(&dirs, &live, retention) {
                prop_assert!(!live.contains_key(name));
                prop_assert!(dirs.iter().any(|d| d.name == name
                    && !d.has_record
                    && d.unchanged_for.is_some_and(|a| a >= retention)));
            }
        }
    }
}
