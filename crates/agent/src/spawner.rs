//! The spawners: threads of the agent's that make node processes, so that the
//! supervisor task never blocks on a spawn.
//!
//! Spawning a node is blocking work: its working directory and files, its output
//! (pipes handed to the log keeper, or log files rotated and opened), the record that
//! announces the spawn's token, cgroup limits, the affinity of the spawning thread,
//! and `posix_spawn` or the vfork-style clone into the node's cgroups. The supervisor task prepares a [`Job`]
//! (cheap: names, environment, the resolved plan), hands it over and goes on answering
//! requests and firing timers; the spawners take jobs in the order given and report
//! each as an [`Outcome`] through the supervisor's event queue. The node's machine
//! waits in its spawning phase meanwhile (a stop asked for then is carried out once the
//! spawn is known).
//!
//! Two threads, each carrying out a job from start to end, so that one child's exec
//! (which a vfork-style spawn waits for) overlaps the next spawn. A node's announcement
//! record is written before its spawn, and a node has at most one job at a time (its
//! machine asks for no other spawn until it learns the outcome), so the queue holds at
//! most one job per node and two jobs under way are for different nodes. Each child is
//! created in its own node's cgroup, so two spawns under way never mix processes. While
//! a job is out, the node's record names the spec being spawned (an Apply may change
//! the node's spec meanwhile): the process carrying the announced token runs that one.
//!
//! A child the spawner made is not yet known to the supervisor until its outcome is
//! handled; the supervisor's reaper of orphaned zombies must not take it meanwhile (see
//! [`InFlightPids`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use drover_proto::model::Node;
use tracing::warn;

use crate::cgroup::Cgroups;
use crate::keeper::output::ChildOutput;
use crate::limits::{self, Limits};
use crate::logs::NodeLogs;
use crate::sys;

/// Pids the spawners made that the supervisor has not taken over yet.
pub type InFlight = Arc<InFlightPids>;

/// See [`InFlight`].
#[derive(Debug, Default)]
pub struct InFlightPids {
    /// Read-held by a spawner from its spawn until its child is in `pids` (spawners
    /// spawn at once); the orphan reaper takes it for writing, so that it never sees a
    /// child that is in neither place.
    spawning: RwLock<()>,
    pids: Mutex<BTreeSet<i32>>,
}

impl InFlightPids {
    /// The pids, unless a spawn is under way (then `None`: reap later).
    pub fn settled(&self) -> Option<BTreeSet<i32>> {
        let _quiet = self.spawning.try_write().ok()?;
        Some(
            self.pids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// The supervisor has taken `pid` over.
    pub fn done(&self, pid: i32) {
        self.pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid);
    }
}

/// Everything one spawn needs, owned.
#[derive(Debug)]
pub struct Job {
    /// The node.
    pub node: String,
    /// The node's spawn count this job is for.
    pub generation: u64,
    /// The spec spawned.
    pub spec: Node,
    /// The program (after the watchdog shim, if any) and its arguments.
    pub program: String,
    /// See `program`.
    pub args: Vec<String>,
    /// The whole environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The node's `PATH`, where a program name is looked up.
    pub path: String,
    /// The working directory, made if missing; the spec's `files` are written there.
    pub workdir: PathBuf,
    /// The node's logs: rotated if due, then opened as its stdout and stderr.
    pub logs: NodeLogs,
    /// User, groups, capabilities and limits.
    pub plan: Arc<crate::exec::Plan>,
    /// CPUs to pin the node to.
    pub cpus: Option<Vec<usize>>,
    /// Its cgroup resource limits.
    pub limits: Limits,
    /// The record announcing the spawn's token, written before the spawn.
    pub announce: Option<crate::records::Write>,
    /// A node's first spawn makes its directory and notify socket first; a later one
    /// makes them again if its notify socket is gone.
    pub fresh: Option<Fresh>,
}

/// What a node needs before its first spawn (see [`prepare_fresh`]).
#[derive(Debug, Clone)]
pub struct Fresh {
    /// `<state-dir>/nodes/<name>`.
    pub dir: PathBuf,
    /// Where its sockets go (see [`crate::sockdir`]).
    pub socks: crate::sockdir::SocketDirs,
    /// Made before: made again only if its notify socket is gone (the node's directory
    /// deleted by hand), which would leave the node unable to say it is ready.
    pub if_gone: bool,
}

/// A node process the spawner made.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid and start time.
    pub id: sys::ProcId,
    /// A pidfd of it, the supervisor's child.
    pub pidfd: sys::PidFd,
    /// The node's cgroup it was moved into, if any.
    pub cgroup: Option<PathBuf>,
    /// OOM kills in its memory cgroup before it started.
    pub oom_base: Option<u64>,
    /// Milliseconds since the epoch when it was spawned.
    pub started_at_ms: u64,
    /// The inode numbers of its stdout and stderr pipes to the log keeper, if any.
    pub pipes: Option<[u64; 2]>,
}

/// How a [`Job`] ended.
#[derive(Debug)]
pub struct Outcome {
    /// The job's node.
    pub node: String,
    /// The job's generation.
    pub generation: u64,
    /// The job's spec.
    pub spec: Node,
    /// The process, or why there is none (naming the node, the program and the cause).
    pub result: Result<Spawned, String>,
    /// What a first spawn made for the node, whether the spawn itself worked or not.
    pub made: Option<Made>,
}

/// What [`prepare_fresh`] made for a new node.
#[derive(Debug)]
pub struct Made {
    /// Its notify socket, bound.
    pub sock: std::os::unix::net::UnixDatagram,
    /// Where its log files (stdout, stderr) ended before it ran: its own output starts
    /// there, after what an earlier node of that name left.
    pub marks: [crate::logs::Mark; 2],
}

/// What the spawner threads hold for all jobs.
#[derive(Debug, Clone)]
pub struct Context {
    /// The agent's cgroup subtree, for containment.
    pub cgroups: Option<Cgroups>,
    /// The host's cgroup controllers, for limits.
    pub host: Arc<limits::Host>,
    /// See [`InFlight`].
    pub in_flight: InFlight,
    /// The log keeper new processes' output goes to, if any.
    pub keeper: Option<crate::keeper::Keeper>,
    /// Keeps an announcement from overwriting a newer record of its node.
    pub records: Arc<crate::records::Records>,
}

/// Starts the spawner threads: they take `jobs` in order and hand each outcome to
/// `done`, and end when the job sender is dropped.
pub fn start(
    cx: Context,
    jobs: std::sync::mpsc::Receiver<Job>,
    done: impl Fn(Outcome) + Send + Sync + 'static,
) -> std::io::Result<()> {
    // See the module docs.
    let threads = 2;
    let jobs = Arc::new(Mutex::new(jobs));
    let done = Arc::new(done);
    for _ in 0..threads {
        let (cx, jobs, done) = (cx.clone(), jobs.clone(), done.clone());
        std::thread::Builder::new()
            .name("drover-spawner".to_owned())
            .spawn(move || spawner(&cx, &jobs, &*done))?;
    }
    Ok(())
}

/// One spawner thread: jobs until the sender is gone.
fn spawner(cx: &Context, jobs: &Mutex<std::sync::mpsc::Receiver<Job>>, done: &dyn Fn(Outcome)) {
    loop {
        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = next else {
            return;
        };
        let (node, generation) = (job.node.clone(), job.generation);
        let spec = job.spec.clone();
        let mut made = None;
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cx, job, &mut made)))
                .unwrap_or_else(|_| Err(format!("node '{node}': the spawn panicked")));
        done(Outcome {
            node,
            generation,
            spec,
            result,
            made,
        });
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes a node's `files` into its working directory (each through a temp file and a
/// rename, so a node never reads half a file), leaving alone those that already hold
/// the text, as on most restarts. Names must be plain file names.
pub(crate) fn write_node_files(
    workdir: &std::path::Path,
    files: &BTreeMap<String, String>,
) -> Result<(), String> {
    for (name, text) in files {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(format!("node file name '{name}' is not a plain file name"));
        }
        let path = workdir.join(name);
        if std::fs::read(&path).is_ok_and(|old| old == text.as_bytes()) {
            continue;
        }
        let tmp = workdir.join(format!(".{name}.drover-tmp"));
        // A working directory may belong to the node's own user: never follow what
        // it may have put in the temp file's place.
        let _ = std::fs::remove_file(&tmp);
        let mut made = false;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| {
                made = true;
                std::io::Write::write_all(&mut f, text.as_bytes())
            })
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|err| {
                // A partly written temp file would hold space (on a full disk, the last
                // of it) until the next spawn.
                if made {
                    let _ = std::fs::remove_file(&tmp);
                }
                format!("cannot write {}: {}", path.display(), sys::cause(&err))
            })?;
    }
    Ok(())
}

/// Makes a node's working directory if it is missing: one `mkdir` when it is there, as
/// on every spawn but the first. Whether it made it.
pub(crate) fn make_workdir(dir: &std::path::Path) -> std::io::Result<bool> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map(|()| true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        other => other.map(|()| true),
    }
}

/// Makes a new node's directory (for the agent and the node only) and its bound notify
/// socket, which receives the sender's credentials from the first datagram on, and
/// notes where its log files end (they are made by the first line written to them).
pub(crate) fn prepare_fresh(
    name: &str,
    dir: &std::path::Path,
    logs: &NodeLogs,
    socks: &crate::sockdir::SocketDirs,
) -> std::io::Result<Made> {
    crate::supervisor::make_node_dir(dir)?;
    let marks = logs.marks()?;
    socks.ensure(name)?;
    let sock = crate::supervisor::bind_notify(&socks.dir(name))?;
    crate::probe::pass_credentials(&sock)?;
    Ok(Made { sock, marks })
}

/// Whether the notify socket of a node made before is gone (its directory deleted by
/// hand): one `stat`.
fn notify_gone(name: &str, fresh: &Fresh) -> bool {
    let path = crate::supervisor::notify_path(&fresh.socks.dir(name));
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(
                node = %name,
                "its notify socket {} is gone (its directory deleted?); making it again",
                path.display()
            );
            true
        }
        _ => false,
    }
}

/// Carries out one job; what a first spawn made (or made again) goes to `made`.
fn run(cx: &Context, job: Job, made: &mut Option<Made>) -> Result<Spawned, String> {
    let name = job.node.as_str();
    let program = job.program.as_str();
    let fresh = match &job.fresh {
        Some(fresh) if fresh.if_gone && !notify_gone(name, fresh) => None,
        Some(fresh) => Some((
            fresh,
            prepare_fresh(name, &fresh.dir, &job.logs, &fresh.socks).map_err(|err| {
                format!(
                    "cannot set up node '{name}' in {}: {}",
                    fresh.dir.display(),
                    sys::cause(&err)
                )
            })?,
        )),
        None => None,
    };
    let made_workdir = match make_workdir(&job.workdir) {
        // A directory the cluster file names may be one only the node's user can reach
        // (a home on NFS with root squashed): the node's own `chdir` decides.
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied && job.spec.workdir.is_some() =>
        {
            Ok(false)
        }
        other => other,
    }
    .map_err(|err| {
        format!(
            "node '{name}': cannot create its working directory {}: {}",
            job.workdir.display(),
            sys::cause(&err)
        )
    })?;
    // One the cluster file names and the agent made is the node's, as systemd's
    // `StateDirectory=` is: a node running as its own user can write where it runs.
    if made_workdir
        && job.spec.workdir.is_some()
        && let Some((uid, gid)) = job.plan.owner()
    {
        std::os::unix::fs::chown(&job.workdir, Some(uid), Some(gid)).map_err(|err| {
            format!(
                "node '{name}': cannot give its working directory {} to its user: {}",
                job.workdir.display(),
                sys::cause(&err)
            )
        })?;
    }
    if let Some((fresh, prepared)) = fresh {
        // What the Apply could not give the node's user before they existed. Until
        // that is done the node stays to be made: its socket is handed back only then,
        // so a failure here is tried again by its next spawn.
        if let Some(owner) = job.plan.owner() {
            let work = job.spec.workdir.is_none().then_some(job.workdir.as_path());
            let socket = crate::supervisor::notify_path(&fresh.socks.dir(name));
            crate::exec::own_node_paths(owner, &fresh.dir, work, Some(&socket))
                .map_err(|err| format!("node '{name}': {}", sys::cause(&err)))?;
        }
        *made = Some(prepared);
    }
    if !job.spec.files.is_empty() {
        let as_node = crate::fsident::FsIdentity::assume(&job.plan).map_err(|err| {
            format!(
                "node '{name}': cannot take its user's identity to write its files: {}",
                sys::cause(&err)
            )
        })?;
        let written = write_node_files(&job.workdir, &job.spec.files);
        let by_node = as_node.is_some();
        drop(as_node);
        written.map_err(|err| {
            if by_node {
                format!("node '{name}': {err} (its files are written with its user's rights)")
            } else {
                format!("node '{name}': {err}")
            }
        })?;
    }
    let output = ChildOutput::open(&job.logs, cx.keeper.as_ref()).map_err(|err| {
        format!(
            "cannot set up the output of node '{name}' in {}: {err}",
            job.logs.dir().display()
        )
    })?;
    if let Some(w) = &job.announce
        && let Err(err) = cx.records.write(w, crate::supervisor::write_record)
    {
        warn!(node = %name, "cannot write {}: {err}", w.path.display());
    }
    // The node's cgroup, emptied of what an earlier process of it left (and made
    // anew, so before its limits are written): the child starts in it.
    let cgroup = cx.cgroups.as_ref().and_then(|cgroups| {
        let cg = cgroups.node(name);
        match cgroups.prepare(&cg) {
            Ok(ready) => Some((cg, ready)),
            Err(err) => {
                warn!(node = %name, "cannot prepare {} for the node; it runs uncontained: {err}", cg.display());
                None
            }
        }
    });
    let placement = cx
        .host
        .prepare(
            name,
            &job.limits,
            cgroup.as_ref().is_none_or(|(_, ready)| ready.fresh),
        )
        .map_err(|err| format!("node '{name}': cannot set its resource limits: {err}"))?;
    let oom_base = if cx.host.counts_oom(&job.limits) {
        cx.host.oom_kills(name)
    } else {
        None
    };
    // The child moves itself into its cgroup v1 limits (see [`crate::limits`]).
    let v1 = placement
        .open_procs()
        .map_err(|err| format!("node '{name}': cannot set its resource limits: {err}"))?;
    let join: Vec<std::os::fd::BorrowedFd<'_>> = v1.iter().map(std::os::fd::AsFd::as_fd).collect();
    let launch = sys::SpawnSpec {
        program,
        argv0: None,
        args: &job.args,
        env: job.env,
        path: &job.path,
        cwd: &job.workdir,
        stdout: output.stdout(),
        stderr: output.stderr(),
        exec: Some(&job.plan),
        cgroup: cgroup.as_ref().map(|(_, ready)| sys::IntoCgroup {
            dir: std::os::fd::AsFd::as_fd(&ready.dir),
            create: ready.fresh,
        }),
        join: &join,
    };
    let previous = match &job.cpus {
        Some(c) => Some(sys::set_thread_affinity(c).map_err(|err| {
            let list: Vec<String> = c.iter().map(ToString::to_string).collect();
            format!(
                "node '{name}': cannot execute {program} on cpus {}: {} (this host has {} cpus online)",
                list.join(","),
                sys::cause(&err),
                sys::online_cpus()
            )
        })?),
        None => None,
    };
    let spawned = {
        let _spawning = cx
            .in_flight
            .spawning
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let spawned = sys::spawn_timed(|| sys::spawn_clean(&launch));
        if let Ok((pid, _)) = spawned {
            cx.in_flight
                .pids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(pid);
        }
        spawned
    };
    if let Some(prev) = &previous
        && let Err(err) = sys::restore_thread_affinity(prev)
    {
        warn!("cannot restore the spawner thread's cpu affinity: {err}");
    }
    let (pid, start_ticks) = spawned.map_err(|err| {
        format!(
            "node '{name}': cannot execute {program}: {}",
            sys::exec_cause(&err, program, &job.path, &job.workdir)
        )
    })?;
    let pipes = output.spawned(name, &job.logs, cx.keeper.as_ref());
    if let Err(err) = placement.finish() {
        warn!(node = %name, "a resource limit could not be set once the node ran: {err}");
    }
    let started_at_ms = epoch_ms();
    let start_ticks = start_ticks
        .or_else(|| sys::proc_id(pid).ok().map(|p| p.start_ticks))
        .unwrap_or(0);
    // Our unreaped child: the pid is still its own.
    let pidfd = match sys::PidFd::open(pid) {
        Ok(fd) => fd,
        Err(err) => {
            cx.in_flight.done(pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(format!("node '{name}': cannot watch process {pid}: {err}"));
        }
    };
    Ok(Spawned {
        id: sys::ProcId { pid, start_ticks },
        pidfd,
        oom_base,
        started_at_ms,
        cgroup: cgroup.map(|(cg, _)| cg),
        pipes,
    })
}
