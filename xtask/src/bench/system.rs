//! The interface each measured system (drover, supervisord, pm2) offers the scenario,
//! and the process helpers the adapters share: commands that run while the scenario
//! polls ([`Pending`]), warm status clients on a line protocol ([`LineHelper`]), and the
//! guard that kills whatever managed process outlives a run ([`Leftovers`]).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::procfs;

/// One managed program as the tool's status API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prog {
    /// In the tool's running state (`RUNNING`, `online`).
    pub(crate) running: bool,
    /// The pid the tool reports, if any.
    pub(crate) pid: Option<u32>,
}

/// Every program the status API lists, by name.
pub(crate) type Listing = BTreeMap<String, Prog>;

/// A supervisor under test, set up in a scratch directory with its N programs configured
/// but not started. Dropping it shuts it down.
pub(crate) trait System {
    /// Issues the start command (for supervisord and pm2 this also starts the daemon).
    fn start(&mut self) -> anyhow::Result<Pending>;
    /// One call of the tool's status API.
    fn status(&mut self) -> anyhow::Result<Listing>;
    /// Issues the command that stops every program.
    fn stop_all(&mut self) -> anyhow::Result<Pending>;
    /// The process whose children the programs are, once it exists.
    fn supervisor_pid(&mut self) -> Option<u32>;
    /// How a watcher thread finds that process before it exists.
    fn supervisor_source(&self) -> PidSource;
    /// Every daemon of the system (for drover the agent and the controller).
    fn daemon_pids(&mut self) -> Vec<u32>;
    /// Checks the result of a finished start or stop command.
    fn check(&self, done: &Finished) -> anyhow::Result<()> {
        done.check_status()
    }
    /// Shuts the system down with its own command; kills what does not stop.
    fn shutdown(&mut self) -> anyhow::Result<()>;
}

/// Where the supervisor's pid comes from.
#[derive(Debug, Clone)]
pub(crate) enum PidSource {
    /// Known already (drover's agent).
    Pid(u32),
    /// A pidfile the daemon writes once it runs.
    File(PathBuf),
}

impl PidSource {
    /// The pid, once it is known and alive.
    pub(crate) fn get(&self) -> Option<u32> {
        match self {
            Self::Pid(p) => Some(*p),
            Self::File(f) => read_pidfile(f),
        }
    }
}

/// A finished command: its exit status and output.
#[derive(Debug)]
pub(crate) struct Finished {
    /// What was run, for messages (`pm2 start`).
    pub(crate) label: String,
    /// How it ended.
    pub(crate) status: ExitStatus,
    /// Its standard output.
    pub(crate) stdout: String,
    /// Its standard error.
    pub(crate) stderr: String,
}

impl Finished {
    /// Fails unless the command exited with status 0; the error carries the first line
    /// of its stderr (or stdout).
    pub(crate) fn check_status(&self) -> anyhow::Result<()> {
        if !self.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                self.label,
                self.status,
                first_line(if self.stderr.trim().is_empty() {
                    &self.stdout
                } else {
                    &self.stderr
                })
            );
        }
        Ok(())
    }
}

/// The first non-empty line of a text, trimmed (`(no output)` when there is none).
pub(crate) fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)")
        .to_owned()
}

/// A command running in the background, its output going to files, so daemons it
/// leaves behind cannot hold a pipe open. Killed if dropped while still running.
#[derive(Debug)]
pub(crate) struct Pending {
    label: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
    done: bool,
}

impl Pending {
    /// Starts `cmd`, writing its output to `<dir>/<file>.out` and `.err`.
    pub(crate) fn spawn(
        cmd: &mut Command,
        dir: &Path,
        file: &str,
        label: &str,
    ) -> anyhow::Result<Self> {
        let out = dir.join(format!("{file}.out"));
        let err = dir.join(format!("{file}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(
                fs::File::create(&out)
                    .with_context(|| format!("cannot create {}", out.display()))?,
            )
            .stderr(
                fs::File::create(&err)
                    .with_context(|| format!("cannot create {}", err.display()))?,
            )
            .spawn()
            .with_context(|| format!("cannot run `{label}`"))?;
        Ok(Self {
            label: label.to_owned(),
            child,
            out,
            err,
            done: false,
        })
    }

    /// The result once the command has exited.
    pub(crate) fn try_done(&mut self) -> anyhow::Result<Option<Finished>> {
        let Some(status) = self.child.try_wait()? else {
            return Ok(None);
        };
        self.done = true;
        Ok(Some(Finished {
            label: self.label.clone(),
            status,
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
        }))
    }

    /// Waits for the command to exit; kills it and fails after `patience`.
    pub(crate) fn wait(&mut self, patience: Duration) -> anyhow::Result<Finished> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(f) = self.try_done()? {
                return Ok(f);
            }
            if Instant::now() > deadline {
                bail!("`{}` did not finish within {patience:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Pending {
    /// Waits for the command on a thread of its own, so that the moment it returns is
    /// recorded exactly while the caller polls other things.
    pub(crate) fn in_background(mut self) -> Background {
        let pid = self.child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let status = self.child.wait();
            let at = Instant::now();
            self.done = true;
            let result = status.map_err(anyhow::Error::from).map(|status| Finished {
                label: self.label.clone(),
                status,
                stdout: fs::read_to_string(&self.out).unwrap_or_default(),
                stderr: fs::read_to_string(&self.err).unwrap_or_default(),
            });
            let _ = tx.send((at, result));
        });
        Background {
            rx,
            pid,
            done: false,
        }
    }
}

/// A command waited for by a thread (see [`Pending::in_background`]); killed if dropped
/// while still running.
#[derive(Debug)]
pub(crate) struct Background {
    rx: mpsc::Receiver<(Instant, anyhow::Result<Finished>)>,
    pid: u32,
    done: bool,
}

impl Background {
    /// When the command returned, and its result, once it has.
    pub(crate) fn try_done(&mut self) -> Option<(Instant, anyhow::Result<Finished>)> {
        let got = self.rx.try_recv().ok()?;
        self.done = true;
        Some(got)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if !self.done
            && self.rx.try_recv().is_err()
            && let Ok(raw) = i32::try_from(self.pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion within `patience`, output to files in `dir`; fails on a
/// non-zero exit.
pub(crate) fn run(
    cmd: &mut Command,
    dir: &Path,
    file: &str,
    label: &str,
    patience: Duration,
) -> anyhow::Result<Finished> {
    let done = Pending::spawn(cmd, dir, file, label)?.wait(patience)?;
    done.check_status()?;
    Ok(done)
}

/// A warm status client: a helper process that answers each line on its stdin with
/// one line of JSON. Killed when dropped.
#[derive(Debug)]
pub(crate) struct LineHelper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LineHelper {
    /// Starts the helper and reads its first line (`{"ready": true}` or `{"err": ...}`).
    pub(crate) fn spawn(cmd: &mut Command, stderr: &Path) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(stderr)?)
            .spawn()
            .context("cannot start the status helper")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("the status helper has no pipes");
        };
        let mut helper = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let hello = helper.read_line()?;
        if hello.get("ready").is_none() {
            bail!("status helper: {}", helper_error(&hello));
        }
        Ok(helper)
    }

    fn read_line(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the status helper exited");
        }
        serde_json::from_str(&line).with_context(|| format!("status helper said {line:?}"))
    }

    /// Asks once; returns the helper's JSON answer.
    pub(crate) fn ask(&mut self) -> anyhow::Result<Value> {
        self.stdin.write_all(b"status\n")?;
        self.stdin.flush()?;
        self.read_line()
    }
}

impl Drop for LineHelper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn helper_error(v: &Value) -> String {
    v.get("err")
        .and_then(Value::as_str)
        .map_or_else(|| v.to_string(), str::to_owned)
}

/// Turns a helper's answer `{"ok": {name: [state, pid]}}` into a listing; `running`
/// is the tool's name for the running state.
pub(crate) fn parse_helper_listing(v: &Value, running: &str) -> anyhow::Result<Listing> {
    let Some(ok) = v.get("ok").and_then(Value::as_object) else {
        bail!("{}", helper_error(v));
    };
    let mut out = Listing::new();
    for (name, entry) in ok {
        let state = entry.get(0).and_then(Value::as_str).unwrap_or("");
        let pid = entry
            .get(1)
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p != 0);
        out.insert(
            name.clone(),
            Prog {
                running: state == running,
                pid,
            },
        );
    }
    Ok(out)
}

/// The managed processes seen during a run, as (pid, start time). Whatever of them
/// still runs when this guard is dropped is SIGKILLed, so an aborted run leaves no
/// `sleep` behind.
#[derive(Debug, Default)]
pub(crate) struct Leftovers(HashMap<u32, u64>);

impl Leftovers {
    /// Remembers processes.
    pub(crate) fn extend(&mut self, procs: impl IntoIterator<Item = (u32, u64)>) {
        self.0.extend(procs);
    }

    /// Kills what still runs; returns how many.
    pub(crate) fn kill(&mut self) -> usize {
        let n = procfs::kill_matching(&self.0);
        self.0.clear();
        n
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let n = self.kill();
        if n > 0 {
            eprintln!("killed {n} leftover program process(es)");
        }
    }
}

/// Whether `pid` runs; `false` for a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    !procfs::exited(pid)
}

/// Waits up to `patience` for `pid` to exit, then SIGKILLs it.
pub(crate) fn ensure_gone(pid: u32, patience: Duration) {
    let deadline = Instant::now() + patience;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive(pid)
        && let Ok(raw) = i32::try_from(pid)
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A pid from a pidfile, if it names a live process.
pub(crate) fn read_pidfile(path: &Path) -> Option<u32> {
    let pid = fs::read_to_string(path).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}
