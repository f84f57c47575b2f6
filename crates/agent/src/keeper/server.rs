//! The log keeper process: reads the nodes' pipes and writes their log files.
//!
//! One thread, one tokio current-thread runtime. A task per pipe waits for it to be
//! readable, reads up to [`CHUNK`] bytes into the one buffer all pipes share, and
//! hands the whole lines to the stream's [`Writer`] (a trailing partial line waits for
//! its end, at most [`HOLD_FOR`] or until it is [`HOLD_MAX`] long, in the pipe's own
//! buffer). A task per agent connection answers its messages.
//! A pipe that reaches its end (the node and everything that inherited its stdout are
//! gone) is closed and the agent told. With no pipe and no agent the keeper has nothing
//! to do and exits.
//!
//! Every [`SOCKET_CHECK`] it looks for its lock file and socket where agents look for
//! them: if the state dir was removed or replaced under it (a cleanup script), it takes
//! the lock and binds the socket again, so that the next agent process finds it, and
//! the output of the nodes it reads goes on to their files (which it makes again,
//! with the node's directory if need be, at the next line). Should another keeper have
//! taken the lock meanwhile, that one serves new agents and this one only drains the
//! pipes it holds.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::notify::Held;
use super::proto::{self, Msg, PipeInfo, Received};
use super::writer::{Tail, Writer, whole_lines};
use crate::logs::{LogConfig, NodeLogs, Stream};

/// Bytes read from a pipe at once.
pub const CHUNK: usize = 64 * 1024;
/// A partial line at least this long is written without waiting for its end.
const HOLD_MAX: usize = 64 * 1024;
/// How long a partial line waits for its end before it is written as it is.
const HOLD_FOR: Duration = Duration::from_millis(200);
/// How often an idle keeper (no pipe, no agent) checks whether to exit.
const IDLE_CHECK: Duration = Duration::from_secs(10);
/// How often the keeper checks that its lock file and socket are still in place.
const SOCKET_CHECK: Duration = Duration::from_secs(1);

/// A pipe the keeper reads.
struct Pipe {
    info: RefCell<PipeInfo>,
    fd: AsyncFd<OwnedFd>,
}

impl Pipe {
    fn key(&self) -> (PathBuf, Stream) {
        let info = self.info.borrow();
        (info.dir.clone(), info.stream)
    }
}

/// A descriptor travelling with a message to an agent.
enum Carried {
    Pipe(Rc<Pipe>),
    Notify(OwnedFd),
}

impl Carried {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Self::Pipe(p) => p.fd.get_ref().as_fd(),
            Self::Notify(fd) => fd.as_fd(),
        }
    }
}

type Outbox = mpsc::UnboundedSender<(Msg, Option<Carried>)>;

/// How many agents are connected, for the notify sockets' readers (see
/// [`super::notify`]), which read only while none is.
struct Agents(watch::Sender<usize>);

impl Default for Agents {
    fn default() -> Self {
        Self(watch::channel(0).0)
    }
}

/// One stream's current file as the keeper writes it.
#[derive(Default)]
struct Slot {
    /// Its writer, once the file could be opened.
    writer: Option<Writer>,
    /// The pipes writing to it.
    pipes: usize,
    /// While writes fail (a full disk): the bytes lost since the first failure and
    /// why. The next write that succeeds puts a marker line before its data, so that a
    /// reader of the file sees where output is missing, and ends this.
    lost: Option<Loss>,
}

/// Output lost because a stream's file could not be written.
struct Loss {
    /// The node, for messages.
    node: String,
    bytes: u64,
    error: String,
}

/// The line that stands where output was lost to failed writes.
fn loss_marker(bytes: u64, error: &str) -> String {
    format!("[drover: {bytes} bytes of output lost: cannot write the log file: {error}]\n")
}

#[derive(Default)]
struct State {
    pipes: HashMap<u64, Rc<Pipe>>,
    /// Each stream's file, written by one or more pipes (a restarted node's new pipe and
    /// its old one, still draining).
    writers: HashMap<(PathBuf, Stream), Slot>,
    conns: HashMap<u64, Outbox>,
    /// Agent processes that connected and are alive (a connection lost by an agent that
    /// lives still counts until its process is gone: it reads its sockets), watched by
    /// the notify sockets' readers, which read only while there is none.
    agents: Agents,
    /// Nodes' notify sockets, held past the agent (see [`super::notify`]), with their
    /// readers.
    notify: HashMap<String, (Rc<Held>, tokio::task::AbortHandle)>,
    next_conn: u64,
    socket: PathBuf,
    state_dir: PathBuf,
    /// The keeper lock while this keeper holds it; `None` once another keeper took the
    /// state dir (see the module docs).
    lock: Option<std::fs::File>,
}

type Shared = Rc<RefCell<State>>;

/// Runs the keeper of `state_dir` until it has nothing left to do. Returns at once when
/// another keeper holds the state dir's keeper lock.
pub fn run(state_dir: &Path) -> io::Result<()> {
    // SAFETY: setting a signal's disposition to SIG_IGN has no handler to be unsafe in.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    super::raise_nofile();
    let Some(lock) = super::lock(state_dir)? else {
        info!("another log keeper serves {}", state_dir.display());
        return Ok(());
    };
    leave_agent_leaf();
    let socket = super::socket_path(state_dir);
    let listener = super::listen(&socket)?;
    info!(socket = %socket.display(), "log keeper started");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let shared: Shared = Rc::new(RefCell::new(State {
        socket,
        state_dir: state_dir.to_owned(),
        lock: Some(lock),
        ..State::default()
    }));
    local.block_on(&rt, serve(shared, listener))
}

async fn serve(shared: Shared, listener: OwnedFd) -> io::Result<()> {
    let mut listener = Some(register(listener)?);
    let mut idle = tokio::time::interval(IDLE_CHECK);
    idle.tick().await;
    let mut check = tokio::time::interval(SOCKET_CHECK);
    check.tick().await;
    loop {
        tokio::select! {
            _ = check.tick() => {
                if let Some(now) = still_in_place(&shared, listener.is_some()) {
                    listener = now;
                }
            }
            ready = readable(listener.as_ref()) => {
                let mut guard = ready?;
                match guard.try_io(|l| super::accept(l.as_fd())) {
                    Ok(Ok(conn)) => {
                        let shared = shared.clone();
                        tokio::task::spawn_local(async move {
                            if let Err(e) = serve_conn(shared.clone(), conn).await {
                                warn!("agent connection: {e}");
                            }
                        });
                    }
                    Ok(Err(e)) => warn!("cannot accept an agent connection: {e}"),
                    Err(_would_block) => {}
                }
            }
            _ = idle.tick() => exit_if_idle(&shared),
        }
    }
}

/// Resolves once the listener is readable; never without one.
async fn readable(
    listener: Option<&AsyncFd<OwnedFd>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match listener {
        Some(l) => l.readable().await,
        None => std::future::pending().await,
    }
}

/// Whether the lock file and socket are still where agents look for them (see the
/// module docs). `None` when nothing changes; otherwise the listener from now on: a
/// new one, or none once another keeper holds the state dir.
fn still_in_place(shared: &Shared, listening: bool) -> Option<Option<AsyncFd<OwnedFd>>> {
    use std::os::unix::fs::MetadataExt;
    let mut state = shared.borrow_mut();
    let held = state.lock.as_ref()?.metadata().ok()?;
    let lock_path = super::lock_path(&state.state_dir);
    let lock_kept =
        std::fs::metadata(&lock_path).is_ok_and(|m| m.ino() == held.ino() && m.dev() == held.dev());
    if lock_kept && std::fs::symlink_metadata(&state.socket).is_ok() {
        return None;
    }
    if state.pipes.is_empty() && state.conns.is_empty() {
        // Nothing to keep (an uninstall removing the state dir, say): not made again.
        info!(
            "the log keeper's lock file or socket was removed, and it has nothing to keep: it exits"
        );
        std::process::exit(0);
    }
    warn!(
        "the log keeper's lock file or socket in {} was removed; taking them again",
        state.state_dir.display()
    );
    if let Err(e) = std::fs::create_dir_all(&state.state_dir) {
        warn!("cannot make {} again: {e}", state.state_dir.display());
        return None;
    }
    if !lock_kept {
        match super::lock(&state.state_dir) {
            Ok(Some(lock)) => state.lock = Some(lock),
            Ok(None) => {
                warn!(
                    "another log keeper took the state dir; this one only drains the pipes it holds"
                );
                state.lock = None;
                return listening.then_some(None);
            }
            Err(e) => {
                warn!("cannot take the keeper lock again: {e}");
                return None;
            }
        }
    }
    match super::listen(&state.socket).and_then(register) {
        Ok(l) => Some(Some(l)),
        Err(e) => {
            warn!("cannot listen on {} again: {e}", state.socket.display());
            None
        }
    }
}

/// Exits when there is nothing to keep and no agent to serve; the socket goes first,
/// while the lock still keeps another keeper from binding it (not when another keeper
/// holds the state dir: the socket is that one's).
fn exit_if_idle(shared: &Shared) {
    let state = shared.borrow();
    if state.pipes.is_empty() && state.conns.is_empty() {
        info!("no pipes and no agent: the log keeper exits");
        if state.lock.is_some() {
            let _ = std::fs::remove_file(&state.socket);
        }
        std::process::exit(0);
    }
}

async fn serve_conn(shared: Shared, conn: OwnedFd) -> io::Result<()> {
    let conn = register(conn)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut state = shared.borrow_mut();
        state.next_conn += 1;
        let id = state.next_conn;
        state.conns.insert(id, tx.clone());
        state.agents.0.send_modify(|n| *n += 1);
        id
    };
    let result = async {
        loop {
            tokio::select! {
                ready = conn.readable() => {
                    let mut guard = ready?;
                    match guard.try_io(|c| proto::recv(c.as_fd())) {
                        Ok(Ok(Received::Eof)) => return Ok(()),
                        Ok(Ok(Received::Packet(Ok((msg, fd))))) => handle(&shared, &tx, msg, fd),
                        Ok(Ok(Received::Packet(Err(e)))) => warn!("ignoring a message: {e}"),
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => {}
                    }
                }
                Some((msg, fd)) = rx.recv() => send(&conn, &msg, fd.as_ref()).await?,
            }
        }
    }
    .await;
    shared.borrow_mut().conns.remove(&id);
    // The agent is gone once its process is: watched through a pidfd, else (out of
    // descriptors, say) by its /proc entry, looked at every second.
    let pid = peer_pid(conn.get_ref().as_fd());
    let gone_shared = shared.clone();
    tokio::task::spawn_local(async move {
        if let Some(pid) = pid {
            match crate::sys::PidFd::open(pid) {
                Ok(fd) => {
                    let _ = fd.exited().await;
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(_) => {
                    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
                    while proc_dir.exists() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        gone_shared
            .borrow()
            .agents
            .0
            .send_modify(|n| *n = n.saturating_sub(1));
    });
    exit_if_idle(&shared);
    result
}

/// The pid of the process at the other end of a unix socket connection.
fn peer_pid(conn: std::os::fd::BorrowedFd<'_>) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).ok()?;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (ret == 0 && cred.pid > 0).then_some(cred.pid)
}

async fn send(conn: &AsyncFd<OwnedFd>, msg: &Msg, carried: Option<&Carried>) -> io::Result<()> {
    loop {
        let mut guard = conn.writable().await?;
        let fd = carried.map(Carried::fd);
        match guard.try_io(|c| proto::send(c.as_fd(), msg, fd)) {
            Ok(result) => return result,
            Err(_would_block) => {}
        }
    }
}

fn handle(shared: &Shared, tx: &Outbox, msg: Msg, fd: Option<OwnedFd>) {
    match (msg, fd) {
        (Msg::Hello { max_bytes, keep }, _) => {
            let config = LogConfig { max_bytes, keep };
            let mut state = shared.borrow_mut();
            for w in state.writers.values_mut().filter_map(|s| s.writer.as_mut()) {
                w.set_config(config);
            }
            for (&ino, pipe) in &state.pipes {
                {
                    let mut info = pipe.info.borrow_mut();
                    info.max_bytes = max_bytes;
                    info.keep = keep;
                }
                let info = pipe.info.borrow().clone();
                let _ = tx.send((
                    Msg::Holding { ino, pipe: info },
                    Some(Carried::Pipe(pipe.clone())),
                ));
            }
            // This agent reads the sockets from now on (their readers stopped when it
            // connected), after what was heard before.
            for (node, (held, _)) in &state.notify {
                match held.dup() {
                    Ok(fd) => {
                        let msg = super::notify::holding(node, held.take_heard());
                        let _ = tx.send((msg, Some(Carried::Notify(fd))));
                    }
                    Err(e) => warn!(%node, "cannot pass on the node's notify socket: {e}"),
                }
            }
            let _ = tx.send((Msg::Ready, None));
            // Losses under way, after the hand-over, where the agent reads notices.
            for ((_, stream), slot) in &state.writers {
                if let Some(loss) = &slot.lost {
                    let msg = Msg::WriteFailing {
                        node: loss.node.clone(),
                        stream: *stream,
                        error: loss.error.clone(),
                    };
                    let _ = tx.send((msg, None));
                }
            }
        }
        (Msg::Pipe { pipe }, Some(fd)) => take_pipe(shared, pipe, fd),
        (Msg::Notify { node }, Some(fd)) => {
            let mut state = shared.borrow_mut();
            let agents = state.agents.0.subscribe();
            match Held::start(fd, agents) {
                Ok(held) => {
                    if let Some((_, old)) = state.notify.insert(node, held) {
                        old.abort();
                    }
                }
                Err(e) => warn!(%node, "cannot hold the node's notify socket: {e}"),
            }
        }
        (Msg::Forget { node }, _) => {
            if let Some((_, reader)) = shared.borrow_mut().notify.remove(&node) {
                reader.abort();
            }
        }
        (other, _) => warn!("ignoring an unexpected {other:?} message"),
    }
}

fn take_pipe(shared: &Shared, info: PipeInfo, fd: OwnedFd) {
    let ino = match super::pipe_ino(fd.as_fd()) {
        Ok(ino) => ino,
        Err(e) => {
            warn!(node = %info.node, "ignoring a pipe: {e}");
            return;
        }
    };
    let mut state = shared.borrow_mut();
    if let Some(held) = state.pipes.get(&ino) {
        // Handed again (the agent re-hands what it holds after a reconnection).
        *held.info.borrow_mut() = info;
        return;
    }
    if let Err(e) = super::set_nonblocking(fd.as_fd()) {
        warn!(node = %info.node, "ignoring a pipe: {e}");
        return;
    }
    let fd = match register(fd) {
        Ok(fd) => fd,
        Err(e) => {
            warn!(node = %info.node, "ignoring a pipe: {e}");
            return;
        }
    };
    let pipe = Rc::new(Pipe {
        info: RefCell::new(info),
        fd,
    });
    state.writers.entry(pipe.key()).or_default().pipes += 1;
    state.pipes.insert(ino, pipe.clone());
    drop(state);
    let shared = shared.clone();
    tokio::task::spawn_local(async move {
        let tail = drain(&shared, &pipe).await;
        let mut state = shared.borrow_mut();
        state.pipes.remove(&ino);
        if let Some(w) = state.writers.get_mut(&pipe.key()) {
            w.pipes -= 1;
            if w.pipes == 0
                && let Some(slot) = state.writers.remove(&pipe.key())
            {
                ended(&state, slot, pipe.info.borrow().stream);
            }
        }
        for tx in state.conns.values() {
            let _ = tx.send((
                Msg::Closed {
                    ino,
                    tail: Some(tail.clone()),
                },
                None,
            ));
        }
        drop(state);
        exit_if_idle(&shared);
    });
}

thread_local! {
    /// The one buffer pipes are read into: the keeper's single thread reads one pipe at
    /// a time, so a pipe holds memory only for a partial line waiting for its end, and
    /// the many quiet ones hold none.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; CHUNK]);
}

/// What one read of a pipe came to.
enum Read {
    /// Nothing to read after all.
    Again,
    /// Data, handled.
    Data,
    /// The pipe's end.
    End,
    Failed(io::Error),
}

/// Copies a pipe into its files until its end; the end of what it wrote (see
/// [`Msg::Closed`]).
async fn drain(shared: &Shared, pipe: &Pipe) -> String {
    // A trailing partial line waiting for its end.
    let mut held: Vec<u8> = Vec::new();
    let mut tail = Tail::new(proto::TAIL_MAX);
    let mut put = |shared: &Shared, pipe: &Pipe, data: &[u8]| {
        tail.push(data);
        write(shared, pipe, data);
    };
    loop {
        let ready = if held.is_empty() {
            pipe.fd.readable().await.map(Some)
        } else {
            match tokio::time::timeout(HOLD_FOR, pipe.fd.readable()).await {
                Ok(ready) => ready.map(Some),
                Err(_elapsed) => Ok(None),
            }
        };
        let mut guard = match ready {
            Ok(Some(guard)) => guard,
            Ok(None) => {
                // A partial line waited long enough.
                put(shared, pipe, &held);
                held = Vec::new();
                continue;
            }
            Err(e) => {
                warn!(node = %pipe.info.borrow().node, "cannot wait for its output: {e}");
                break;
            }
        };
        let outcome =
            SCRATCH.with_borrow_mut(
                |scratch| match guard.try_io(|fd| read(fd.as_fd(), scratch)) {
                    Err(_would_block) => Read::Again,
                    Ok(Ok(0)) => Read::End,
                    Ok(Ok(n)) => {
                        let data = &scratch[..n];
                        if held.is_empty() {
                            let whole = whole_lines(data, 0, HOLD_MAX);
                            put(shared, pipe, &data[..whole]);
                            held.extend_from_slice(&data[whole..]);
                        } else {
                            let before = held.len();
                            held.extend_from_slice(data);
                            let whole = whole_lines(&held, before, HOLD_MAX);
                            put(shared, pipe, &held[..whole]);
                            held.drain(..whole);
                        }
                        Read::Data
                    }
                    Ok(Err(e)) => Read::Failed(e),
                },
            );
        match outcome {
            Read::Again => {}
            // A pipe that is readable again at once (a node writing flat out) would
            // never give the thread back: an `AsyncFd` that is ready already does not
            // count against the task's budget. Its turn ends with the budget, so that
            // every other pipe, and agents, are served meanwhile.
            Read::Data => tokio::task::consume_budget().await,
            Read::End => break,
            Read::Failed(e) => {
                warn!(node = %pipe.info.borrow().node, "cannot read its output: {e}");
                break;
            }
        }
    }
    put(shared, pipe, &held);
    tail.text()
}

/// Moves the keeper out of the agent's cgroup leaf `agent/`, which must hold the agent
/// alone (what else is found there is taken for a node's stray, see [`crate::cgroup`]),
/// into a sibling leaf `keeper/` of the agent's subtree. Before the socket is bound, so
/// before the agent spawns a node. Without such a leaf (no cgroup v2 subtree) nothing
/// to do; a failure is logged.
fn leave_agent_leaf() {
    let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return;
    };
    // The cgroup v2 mount: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host.
    let Some(mount) = std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
                (kind == "cgroup2").then(|| PathBuf::from(at))
            })
        })
    else {
        return;
    };
    let leaf = mount.join(path.trim_start_matches('/'));
    let Some(root) = leaf.parent().filter(|_| leaf.ends_with("agent")) else {
        return;
    };
    if !root.join("nodes").is_dir() {
        return;
    }
    let keeper = root.join("keeper");
    let moved = std::fs::create_dir_all(&keeper)
        .and_then(|()| std::fs::write(keeper.join("cgroup.procs"), std::process::id().to_string()));
    if let Err(e) = moved {
        warn!("cannot move the log keeper to {}: {e}", keeper.display());
    }
}

/// Registers a descriptor with the runtime.
pub(super) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is a valid descriptor that the `AsyncFd` owns from now on:
    // nothing else closes or replaces it while it is registered.
    unsafe { AsyncFd::register(fd).map_err(io::Error::from) }
}

fn read(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.cast_unsigned())
}

/// A stream's last pipe closed. Output lost to writes that failed until then is marked
/// in the file if it can be written now, and told to the agents either way, so that they
/// do not take the stream for failing still.
fn ended(state: &State, mut slot: Slot, stream: Stream) {
    let Some(loss) = slot.lost.take() else {
        return;
    };
    if let Some(w) = &mut slot.writer {
        let _ = w.write_on_new_line(loss_marker(loss.bytes, &loss.error).as_bytes());
    }
    let msg = Msg::Lost {
        node: loss.node,
        stream,
        bytes: loss.bytes,
        error: loss.error,
        ended: true,
    };
    for tx in state.conns.values() {
        let _ = tx.send((msg.clone(), None));
    }
}

/// Writes to the pipe's stream. A failure (a full disk) loses `data`: the agents are
/// told when that begins and when a write succeeds again, which first writes a marker
/// line saying how much was lost.
fn write(shared: &Shared, pipe: &Pipe, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let info = pipe.info.borrow().clone();
    let mut state = shared.borrow_mut();
    let state = &mut *state;
    let Some(slot) = state.writers.get_mut(&(info.dir.clone(), info.stream)) else {
        return;
    };
    let marked;
    let (bytes, after_loss) = match &slot.lost {
        Some(loss) => {
            marked = [loss_marker(loss.bytes, &loss.error).as_bytes(), data].concat();
            (&marked[..], true)
        }
        None => (data, false),
    };
    let result = match &mut slot.writer {
        Some(w) => {
            w.set_config(info.config());
            if after_loss {
                w.write_on_new_line(bytes)
            } else {
                w.write(bytes)
            }
        }
        None => Writer::open(NodeLogs::new(&info.dir, info.config()), info.stream)
            .and_then(|w| slot.writer.insert(w).write_on_new_line(bytes)),
    };
    let file = info.stream.file_name();
    let msg = match (result, &mut slot.lost) {
        (Ok(()), None) => return,
        (Ok(()), lost @ Some(_)) => {
            let Some(loss) = lost.take() else { return };
            info!(node = %info.node, bytes = loss.bytes, "its {file} is written again; output was lost meanwhile");
            Msg::Lost {
                node: info.node,
                stream: info.stream,
                bytes: loss.bytes,
                error: loss.error,
                ended: false,
            }
        }
        (Err(_), Some(loss)) => {
            loss.bytes += data.len() as u64;
            return;
        }
        (Err(e), lost @ None) => {
            let error = e.to_string();
            warn!(
                node = %info.node,
                "cannot write its {file} in {}: {error}; its output is lost until a write succeeds",
                info.dir.display()
            );
            *lost = Some(Loss {
                node: info.node.clone(),
                bytes: data.len() as u64,
                error: error.clone(),
            });
            Msg::WriteFailing {
                node: info.node,
                stream: info.stream,
                error,
            }
        }
    };
    for tx in state.conns.values() {
        let _ = tx.send((msg.clone(), None));
    }
}
