//! Keeps the state dir the running agent's own when it is removed or replaced under it
//! (`rm -rf` by a cleanup script, a tmpfiles rule, an operator's mistake).
//!
//! The nodes run on without it, but nothing would say so: the lock file is gone, so a
//! second agent could start on the directory and take the nodes for strays; the node
//! records are gone, so the next agent process could adopt none of them; the notify
//! sockets are gone, so a node could no longer say it is ready or ping its watchdog;
//! the log files' directories are gone, so their output would be lost. Every
//! [`CHECK`] the agent compares its lock file's path with the file it holds locked; once
//! they differ it makes the directory again, takes the lock anew and has the supervisor
//! make every node's directory and notify socket again and write every record anew
//! (a node's log files come back with the next line it writes). The log keeper does
//! the same for its own lock and socket. What the nodes made there themselves (a query
//! socket bound at start, files in a working directory the agent made) is theirs to
//! make again: it comes back when they restart.
//!
//! Should another agent have taken the directory meanwhile, that one owns it now: this
//! one exits, leaving the nodes to it.

use std::sync::Arc;
use std::time::Duration;

use drover_net::state_lock::{Check, Held};
use tracing::{error, info, warn};

use crate::supervisor::Supervisor;

/// How often the agent checks that its lock file is still in place.
pub const CHECK: Duration = Duration::from_secs(1);

/// The role name of the agent's lock file.
const ROLE: &str = "agent";

/// The state dir's lock as the agent holds it.
#[derive(Debug)]
pub struct StateDir(Held);

impl StateDir {
    /// Takes the lock of `dir` (see [`drover_net::state_lock`]).
    pub fn lock(dir: &std::path::Path) -> Result<Self, drover_net::state_lock::Error> {
        Held::take(dir, ROLE).map(Self)
    }

    /// Whether the lock file is in place, making the directory (with its `nodes`) again
    /// and taking the lock anew if not. Blocking.
    fn check(&self) -> Check {
        self.0
            .check(|dir| std::fs::create_dir_all(dir.join("nodes")).map_err(|e| e.to_string()))
    }
}

/// Checks the state dir every [`CHECK`] and restores it as the module docs say.
/// Resolves only when another agent took the directory, with why.
pub async fn watch(state: Arc<StateDir>, supervisor: Supervisor) -> String {
    let mut every = tokio::time::interval(CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let s = state.clone();
        let Ok(found) = tokio::task::spawn_blocking(move || s.check()).await else {
            continue;
        };
        match found {
            Check::InPlace => {}
            Check::Retaken => {
                let failed = supervisor.restore().await;
                for (node, why) in &failed {
                    warn!(node = %node, "cannot make its directory again: {why}");
                }
                info!(
                    dir = %state.0.dir().display(),
                    failed = failed.len(),
                    "state dir made again: lock, node directories, notify sockets and records"
                );
            }
            Check::Taken(why) => {
                error!("{why}; another agent took this state dir while its lock was gone");
                return why;
            }
        }
    }
}
