//! A node process's stdout and stderr at its spawn: two pipes for the log keeper, or,
//! without a keeper, the log files themselves (see [`crate::logs`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::Keeper;
use super::proto::PipeInfo;
use crate::logs::{NodeLogs, Stream};

/// What becomes a child's fds 1 and 2.
#[derive(Debug)]
pub enum ChildOutput {
    /// The log files, opened for appending; the node writes them itself.
    Files {
        /// `stdout.log`.
        out: File,
        /// `stderr.log`.
        err: File,
    },
    /// Pipes (read end, write end) whose read ends go to the keeper.
    Pipes {
        /// For stdout.
        out: (OwnedFd, OwnedFd),
        /// For stderr.
        err: (OwnedFd, OwnedFd),
    },
}

impl ChildOutput {
    /// Pipes when there is a keeper; otherwise the files, rotated first if over the
    /// bound. Creates the node directory if missing.
    pub fn open(logs: &NodeLogs, keeper: Option<&Keeper>) -> io::Result<Self> {
        if !keeper.is_some_and(Keeper::available) {
            let _ = logs.rotate_if_needed();
            let (out, err) = logs.open_for_child()?;
            return Ok(Self::Files { out, err });
        }
        Ok(Self::Pipes {
            out: super::node_pipe()?,
            err: super::node_pipe()?,
        })
    }

    /// What becomes the child's stdout.
    pub fn stdout(&self) -> BorrowedFd<'_> {
        match self {
            Self::Files { out, .. } => out.as_fd(),
            Self::Pipes { out, .. } => out.1.as_fd(),
        }
    }

    /// What becomes the child's stderr.
    pub fn stderr(&self) -> BorrowedFd<'_> {
        match self {
            Self::Files { err, .. } => err.as_fd(),
            Self::Pipes { err, .. } => err.1.as_fd(),
        }
    }

    /// After a successful spawn: closes the agent's write ends and hands the read ends
    /// to the keeper. The inode numbers of the stdout and stderr pipes, when the node
    /// writes to pipes.
    pub fn spawned(self, node: &str, logs: &NodeLogs, keeper: Option<&Keeper>) -> Option<[u64; 2]> {
        let (Self::Pipes { out, err }, Some(keeper)) = (self, keeper) else {
            return None;
        };
        let dir = std::path::absolute(logs.dir()).unwrap_or_else(|_| logs.dir().to_owned());
        let config = logs.config();
        let inos = [
            super::pipe_ino(out.0.as_fd()).unwrap_or(0),
            super::pipe_ino(err.0.as_fd()).unwrap_or(0),
        ];
        for (stream, (read, write)) in [(Stream::Stdout, out), (Stream::Stderr, err)] {
            drop(write);
            keeper.hand(
                PipeInfo {
                    node: node.to_owned(),
                    stream,
                    dir: dir.clone(),
                    max_bytes: config.max_bytes,
                    keep: config.keep,
                },
                read,
            );
        }
        Some(inos)
    }
}
