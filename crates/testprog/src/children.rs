//! `--spawn-children`: idle copies of this program, left running.

use std::fs;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::notify::NOTIFY_SOCKET;
use crate::query::QUERY_SOCKET;

/// Starts `count` copies of this program running `--sleep-forever` (with
/// `--own-session` too when `own_session`, so each child calls `setsid()`
/// and leaves our session and process group), and writes their PIDs, one per
/// line, to `pids_file` if given.
///
/// The children are not waited on: like the forks of a sloppy service, they
/// live as long as they live (and stay zombies if they die before we do).
/// They inherit stdout and stderr but not the notification or query sockets.
pub(crate) fn spawn(count: u32, own_session: bool, pids_file: Option<&Path>) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut pids = String::new();
    for _ in 0..count {
        let mut command = Command::new(&exe);
        command.arg("--sleep-forever");
        if own_session {
            command.arg("--own-session");
        }
        command
            .env_remove(NOTIFY_SOCKET)
            .env_remove(QUERY_SOCKET)
            .stdin(Stdio::null());
        let child = command.spawn()?;
        pids.push_str(&format!("{}\n", child.id()));
    }
    if let Some(path) = pids_file {
        write_atomically(path, &pids)?;
    }
    Ok(())
}

/// Writes `contents` to a temporary file beside `path`, then renames it over
/// `path`, so readers see either no file or the whole list.
fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    fs::write(&temp, contents)?;
    fs::rename(&temp, path).inspect_err(|_| {
        let _ = fs::remove_file(&temp);
    })
}
