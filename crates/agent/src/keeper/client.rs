//! The agent's side of the log keeper: starting it, handing it pipes, and starting it
//! again when it dies.
//!
//! [`Keeper::hand`] passes a new pipe's read end to the keeper and keeps it (see the
//! module doc of [`crate::keeper`]); it never waits for the keeper: when the socket is
//! full (a burst of spawns while the keeper is busy), a thread of its own sends the
//! rest as the keeper takes them. A thread of its own reads the connection: the
//! keeper's `Closed` notices, which let the agent close its duplicate, and the end of
//! the connection, which means the keeper died: the thread starts another and hands it
//! every read end held.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::proto::{self, Heard, Msg, PipeInfo, Received};
use crate::logs::{LogConfig, Stream};

/// How long the agent waits for a keeper it started to listen, and for its answers.
const PATIENCE: Duration = Duration::from_secs(5);
/// Longest wait between attempts to start a keeper again.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long no keeper may answer before nodes started meanwhile write their own log
/// files: a keeper starts in milliseconds; one that does not come up (it cannot take
/// its lock, say) must not leave every node started after it blocked on a pipe nobody
/// reads.
const DOWN_GRACE: Duration = Duration::from_secs(1);

/// How many times an agent starting asks a keeper that listens but does not answer,
/// [`PATIENCE`] each, before it goes on without it (the watcher goes on asking).
const HANDSHAKES_AT_START: u32 = 3;

/// Keepers started again after one was lost, since the agent started.
static RESTARTS: AtomicU64 = AtomicU64::new(0);
/// Whether a keeper answers this agent now (for the metric: without one, new nodes
/// write their own files).
static UP: AtomicBool = AtomicBool::new(false);

/// Whether the agent is connected to a log keeper now.
pub fn up() -> bool {
    UP.load(Ordering::Relaxed)
}

/// Keepers this agent started again after losing one.
pub fn restarts() -> u64 {
    RESTARTS.load(Ordering::Relaxed)
}

/// Node output lost because its log file could not be written (a full disk), by node
/// and stream, as the keeper tells: bytes lost so far, and whether writes fail now.
static LOSSES: Mutex<BTreeMap<(String, Stream), Losses>> = Mutex::new(BTreeMap::new());

/// What the keeper told of one stream's failed writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Bytes lost in failures that have ended.
    pub bytes: u64,
    /// Whether its writes fail now.
    pub failing: bool,
}

/// Every stream whose writes failed since the agent started.
pub fn losses() -> Vec<((String, Stream), Losses)> {
    LOSSES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Takes the keeper's word on a stream's failed writes.
fn note_loss(msg: Msg) {
    let mut losses = LOSSES.lock().unwrap_or_else(PoisonError::into_inner);
    match msg {
        Msg::WriteFailing {
            node,
            stream,
            error,
        } => {
            warn!(
                node = %node,
                "the log keeper cannot write its {}: {error}; its output is lost until a write succeeds",
                stream.file_name()
            );
            losses.entry((node, stream)).or_default().failing = true;
        }
        Msg::Lost {
            node,
            stream,
            bytes,
            error,
            ended,
        } => {
            let file = stream.file_name();
            if ended {
                warn!(
                    node = %node,
                    "its output ended while its {file} could not be written; {bytes} bytes of it were lost ({error})"
                );
            } else {
                warn!(
                    node = %node,
                    "its {file} is written again; {bytes} bytes of its output were lost ({error}), where a marker line says"
                );
            }
            let l = losses.entry((node, stream)).or_default();
            l.failing = false;
            l.bytes += bytes;
        }
        _ => {}
    }
}

/// A handle to the state dir's log keeper; cheap to clone.
#[derive(Debug, Clone)]
pub struct Keeper {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state_dir: PathBuf,
    config: LogConfig,
    state: Mutex<State>,
    /// Wakes the flusher when a pipe could not be handed at once.
    unsent_added: Condvar,
    /// Told of every pipe the keeper closed (the supervisor, which may be waiting for a
    /// failed process's output).
    on_closed: Mutex<Option<OnClosed>>,
}

/// See [`Inner::on_closed`].
struct OnClosed(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OnClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnClosed")
    }
}

/// How many closed pipes' tails are kept (the oldest go first).
const TAILS_KEPT: usize = 1024;

/// A pipe handed to the keeper, as far as its end is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipeEnd {
    /// Still open, or not known to have closed.
    Open,
    /// Closed; what came through it last (see [`proto::Msg::Closed`]).
    Tail(String),
    /// Closed by a keeper that does not tell what came last.
    Closed,
}

/// A message waiting for room in the keeper's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unsent {
    /// The pipe of this inode (in [`State::held`]).
    Pipe(u64),
    /// This node's notify socket (in [`State::notify_held`]).
    Notify(String),
    /// This node is gone.
    Forget(String),
}

#[derive(Debug, Default)]
struct State {
    /// The connection, while there is one.
    conn: Option<Arc<OwnedFd>>,
    /// Since when there has been none (see [`Keeper::available`]), and whether that was
    /// said in the log.
    down_since: Option<(Instant, bool)>,
    /// The read end of every pipe handed over and not yet closed, by inode.
    held: BTreeMap<u64, (PipeInfo, OwnedFd)>,
    /// A duplicate of each node's notify socket handed over, to hand it again to a
    /// keeper started anew.
    notify_held: BTreeMap<String, OwnedFd>,
    /// The notify sockets the keeper held when this agent first met it (of nodes a
    /// previous agent process started) and what it heard on them, until the supervisor
    /// takes them.
    notify_found: BTreeMap<String, (OwnedFd, Vec<Heard>)>,
    /// What the keeper has not been sent yet, because its socket was full (the keeper
    /// is busy), in order: the flusher sends it, so that a spawn never waits.
    unsent: Vec<Unsent>,
    /// The flusher is sending what it took from `unsent`: what comes meanwhile queues
    /// behind it, so that a node's notify socket and its removal reach the keeper in
    /// order.
    flushing: bool,
    /// The tails of the last [`TAILS_KEPT`] pipes closed, by inode, and their order.
    tails: BTreeMap<u64, Option<String>>,
    tail_order: std::collections::VecDeque<u64>,
}

impl Keeper {
    /// Connects to the state dir's keeper, starting one if none answers, and takes the
    /// read ends it holds (of nodes a previous agent process started). Blocking.
    pub fn start(state_dir: &Path, config: LogConfig) -> io::Result<Self> {
        super::raise_nofile();
        let inner = Arc::new(Inner {
            state_dir: state_dir.to_owned(),
            config,
            state: Mutex::new(State::default()),
            unsent_added: Condvar::new(),
            on_closed: Mutex::new(None),
        });
        // A keeper that runs is greeted now (it holds the pipes of nodes a previous
        // agent started); a new one is waited for by the watcher, so that the agent's
        // start does not wait for it (pipes handed meanwhile are handed once it listens).
        let (conn, started) = if super::connect(&super::socket_path(state_dir)).is_ok() {
            // A keeper that listens but does not answer in time (a busy host) is asked
            // again: what it holds of the nodes a previous agent started is best had
            // before this agent adopts them. Then the watcher goes on asking, as after
            // losing it; meanwhile the nodes it reads are read on.
            let mut answered = inner.connect();
            for _ in 1..HANDSHAKES_AT_START {
                let Err(e) = &answered else { break };
                warn!("the log keeper did not answer ({e}); asking again");
                answered = inner.connect();
            }
            match answered {
                Ok(conn) => {
                    info!(pipes = inner.lock().held.len(), "log keeper connected");
                    (Some(conn), Started::NotYet)
                }
                Err(e) => {
                    warn!("the log keeper did not answer ({e}); trying again");
                    inner.lock().down_since = Some((Instant::now(), false));
                    (None, Started::NotYet)
                }
            }
        } else {
            inner.spawn_keeper()?;
            inner.lock().down_since = Some((Instant::now(), false));
            (None, Started::Already)
        };
        let monitor = inner.clone();
        std::thread::Builder::new()
            .name("log-keeper".into())
            .spawn(move || monitor.watch(conn, started))?;
        let flusher = inner.clone();
        std::thread::Builder::new()
            .name("log-keeper-send".into())
            .spawn(move || flusher.flush())?;
        Ok(Self { inner })
    }

    /// Hands a node stream's pipe (its read end) to the keeper, and keeps it until the
    /// keeper reports the pipe closed. Never fails: while no keeper runs, the pipe waits
    /// for the next.
    pub fn hand(&self, pipe: PipeInfo, read: OwnedFd) {
        let ino = match super::pipe_ino(read.as_fd()) {
            Ok(ino) => ino,
            Err(e) => {
                warn!(node = %pipe.node, "not a pipe for the log keeper: {e}");
                return;
            }
        };
        let mut state = self.inner.lock();
        let msg = Msg::Pipe { pipe: pipe.clone() };
        self.inner.send_or_queue(
            &mut state,
            &pipe.node,
            &msg,
            Some(read.as_fd()),
            Unsent::Pipe(ino),
        );
        state.held.insert(ino, (pipe, read));
    }

    /// Hands a node's notify socket to the keeper, which holds it past this agent's
    /// end (see [`super::notify`]). Never blocks: one the keeper cannot take now goes to
    /// it when it is next connected.
    pub fn hold_notify(&self, node: &str, sock: BorrowedFd<'_>) {
        let fd = match sock.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                warn!(%node, "cannot hand the node's notify socket to the log keeper: {e}");
                return;
            }
        };
        let mut state = self.inner.lock();
        let msg = Msg::Notify {
            node: node.to_owned(),
        };
        let queued = Unsent::Notify(node.to_owned());
        self.inner
            .send_or_queue(&mut state, node, &msg, Some(fd.as_fd()), queued);
        state.notify_held.insert(node.to_owned(), fd);
    }

    /// Lets the keeper close a removed node's notify socket.
    pub fn forget_notify(&self, node: &str) {
        let mut state = self.inner.lock();
        let found = state.notify_found.remove(node).is_some();
        if state.notify_held.remove(node).is_none() && !found {
            return;
        }
        let msg = Msg::Forget {
            node: node.to_owned(),
        };
        let queued = Unsent::Forget(node.to_owned());
        self.inner
            .send_or_queue(&mut state, node, &msg, None, queued);
    }

    /// The notify socket of `node` the keeper held when this agent met it (the socket a
    /// previous agent process bound) and what the keeper heard there meanwhile, oldest
    /// first.
    pub fn take_notify(&self, node: &str) -> Option<(OwnedFd, Vec<Heard>)> {
        self.inner.lock().notify_found.remove(node)
    }

    /// Lets the keeper close the notify sockets it held of nodes the supervisor did not
    /// take (not adopted: gone, or started anew with a socket of their own).
    pub fn forget_unclaimed(&self) {
        let nodes: Vec<String> = self.inner.lock().notify_found.keys().cloned().collect();
        for node in nodes {
            if !self.inner.lock().notify_held.contains_key(&node) {
                self.forget_notify(&node);
            } else {
                self.inner.lock().notify_found.remove(&node);
            }
        }
    }

    /// Whether nodes started now write to pipes for the keeper: false once no keeper
    /// has answered for [`DOWN_GRACE`], when they write their files themselves
    /// (bounded by rotation, as without a keeper) until one answers again.
    pub fn available(&self) -> bool {
        let mut state = self.inner.lock();
        if state.conn.is_some() {
            return true;
        }
        match &mut state.down_since {
            Some((since, said)) if since.elapsed() >= DOWN_GRACE => {
                if !std::mem::replace(said, true) {
                    warn!(
                        "no log keeper for {:?}; nodes started until one answers write their log files themselves",
                        since.elapsed()
                    );
                }
                false
            }
            _ => true,
        }
    }

    /// Pipes held (handed over and not yet closed).
    pub fn held(&self) -> usize {
        self.inner.lock().held.len()
    }

    /// Whether the pipe `ino` (handed with [`Keeper::hand`]) has closed, and what came
    /// through it last.
    pub fn pipe_end(&self, ino: u64) -> PipeEnd {
        let state = self.inner.lock();
        match state.tails.get(&ino) {
            Some(Some(tail)) => PipeEnd::Tail(tail.clone()),
            Some(None) => PipeEnd::Closed,
            None if state.held.contains_key(&ino) => PipeEnd::Open,
            // Neither held nor told closed: a pipe of a keeper that died meanwhile,
            // whose tail is lost.
            None => PipeEnd::Closed,
        }
    }

    /// Calls `f` (from a thread of the keeper's) whenever a pipe has closed.
    pub fn on_closed(&self, f: impl Fn() + Send + Sync + 'static) {
        *self
            .inner
            .on_closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(OnClosed(Box::new(f)));
    }
}

/// Ends the connection to a keeper that cannot take a pipe: the watcher wakes up to
/// it, starts another keeper and hands it every pipe held.
fn lose(state: &mut State, conn: &Arc<OwnedFd>) {
    // SAFETY: shutdown takes no pointers.
    unsafe { libc::shutdown(conn.as_raw_fd(), libc::SHUT_RDWR) };
    if state.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
        state.conn = None;
        // The watcher, woken by the shutdown, finds no current connection to clear.
        UP.store(false, Ordering::Relaxed);
        state.down_since = Some((Instant::now(), false));
    }
    state.unsent.clear();
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `msg` about `node` (with `fd`) to the keeper now if nothing waits before
    /// it and its socket has room; else queues `queued` for the flusher, in order.
    /// Never blocks; without a connection nothing is sent (what is held goes to the
    /// next keeper).
    fn send_or_queue(
        &self,
        state: &mut State,
        node: &str,
        msg: &Msg,
        fd: Option<BorrowedFd<'_>>,
        queued: Unsent,
    ) {
        let Some(conn) = state.conn.clone() else {
            return;
        };
        let sent = if state.unsent.is_empty() && !state.flushing {
            proto::try_send(conn.as_fd(), msg, fd)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                state.unsent.push(queued);
                self.unsent_added.notify_one();
            }
            Err(e) => {
                warn!(
                    %node,
                    "cannot send the log keeper a {} message: {e}",
                    proto::kind(msg)
                );
                lose(state, &conn);
            }
        }
    }

    /// The keeper closed pipe `ino`: its duplicate goes, its tail is kept for a while.
    fn closed(&self, ino: u64, tail: Option<String>) {
        {
            let mut state = self.lock();
            state.held.remove(&ino);
            if state.tails.insert(ino, tail).is_none() {
                state.tail_order.push_back(ino);
            }
            while state.tail_order.len() > TAILS_KEPT {
                if let Some(old) = state.tail_order.pop_front() {
                    state.tails.remove(&old);
                }
            }
        }
        if let Some(f) = &*self
            .on_closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            (f.0)();
        }
    }

    /// Sends what [`Keeper::hand`], [`Keeper::hold_notify`] and
    /// [`Keeper::forget_notify`] could not, in order, waiting for room in the socket
    /// (within its send timeout), off the spawning thread; forever.
    fn flush(&self) {
        loop {
            let (conn, batch) = {
                let mut state = self.lock();
                while state.unsent.is_empty() || state.conn.is_none() {
                    state = self
                        .unsent_added
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                let conn = state.conn.clone().expect("checked above");
                state.flushing = true;
                let batch: Vec<(Msg, Option<io::Result<OwnedFd>>, String)> =
                    std::mem::take(&mut state.unsent)
                        .into_iter()
                        .filter_map(|u| match u {
                            Unsent::Pipe(ino) => state.held.get(&ino).map(|(pipe, fd)| {
                                let msg = Msg::Pipe { pipe: pipe.clone() };
                                (msg, Some(fd.try_clone()), pipe.node.clone())
                            }),
                            Unsent::Notify(node) => state.notify_held.get(&node).map(|fd| {
                                let msg = Msg::Notify { node: node.clone() };
                                (msg, Some(fd.try_clone()), node)
                            }),
                            Unsent::Forget(node) => {
                                Some((Msg::Forget { node: node.clone() }, None, node))
                            }
                        })
                        .collect();
                (conn, batch)
            };
            for (msg, fd, node) in batch {
                let sent = match fd {
                    Some(fd) => fd.and_then(|fd| proto::send(conn.as_fd(), &msg, Some(fd.as_fd()))),
                    None => proto::send(conn.as_fd(), &msg, None),
                };
                if let Err(e) = sent {
                    warn!(%node, "cannot hand the log keeper what is the node's: {e}");
                    lose(&mut self.lock(), &conn);
                    break;
                }
            }
            self.lock().flushing = false;
        }
    }

    /// Connects (starting a keeper if none answers), greets, takes what it holds and
    /// hands it what this agent holds. On success the connection is the current one.
    fn connect(&self) -> io::Result<Arc<OwnedFd>> {
        self.connect_to(Started::NotYet)
    }

    /// As [`Inner::connect`]; with [`Started::Already`], a keeper that does not answer
    /// yet was just started and is waited for instead of started again.
    fn connect_to(&self, started: Started) -> io::Result<Arc<OwnedFd>> {
        let path = super::socket_path(&self.state_dir);
        let conn = match super::connect(&path) {
            Ok(c) => c,
            Err(_) => {
                if started == Started::NotYet {
                    self.spawn_keeper()?;
                }
                let started = Instant::now();
                loop {
                    match super::connect(&path) {
                        Ok(c) => break c,
                        Err(e) if started.elapsed() > PATIENCE => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("the log keeper did not listen on {}: {e}", path.display()),
                            ));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
        };
        set_timeouts(&conn, PATIENCE)?;
        proto::send(
            conn.as_fd(),
            &Msg::Hello {
                max_bytes: self.config.max_bytes,
                keep: self.config.keep,
            },
            None,
        )?;
        let mut theirs = BTreeMap::new();
        let mut notify = Vec::new();
        loop {
            match proto::recv(conn.as_fd())? {
                Received::Eof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the log keeper closed the connection",
                    ));
                }
                Received::Packet(Ok((Msg::Holding { ino, pipe }, Some(fd)))) => {
                    theirs.insert(ino, (pipe, fd));
                }
                Received::Packet(Ok((Msg::HoldingNotify { node, heard }, Some(fd)))) => {
                    notify.push((node, fd, heard));
                }
                Received::Packet(Ok((Msg::Ready, _))) => break,
                Received::Packet(Ok((Msg::Closed { ino, tail }, _))) => {
                    theirs.remove(&ino);
                    self.closed(ino, tail);
                }
                Received::Packet(other) => warn!("ignoring a log keeper message: {other:?}"),
            }
        }
        // Blocking reads from now on (the watcher waits for the keeper's messages);
        // sends still time out.
        set_timeouts(&conn, Duration::ZERO)?;
        set_send_timeout(&conn, PATIENCE)?;
        let conn = Arc::new(conn);
        let mut state = self.lock();
        for (ino, (pipe, fd)) in theirs {
            state.held.entry(ino).or_insert((pipe, fd));
        }
        // What the keeper did not list (a new keeper lists nothing) goes to it again;
        // it ignores pipes it already reads.
        for (pipe, fd) in state.held.values() {
            proto::send(
                conn.as_fd(),
                &Msg::Pipe { pipe: pipe.clone() },
                Some(fd.as_fd()),
            )?;
        }
        for (node, fd) in &state.notify_held {
            let msg = Msg::Notify { node: node.clone() };
            proto::send(conn.as_fd(), &msg, Some(fd.as_fd()))?;
        }
        // A socket this agent handed over is read by its supervisor already (the keeper
        // reads none while this agent lives). The others are of nodes a previous agent
        // process started.
        for (node, fd, heard) in notify {
            if !state.notify_held.contains_key(&node) {
                state.notify_found.insert(node, (fd, heard));
            }
        }
        state.unsent.clear();
        state.conn = Some(conn.clone());
        UP.store(true, Ordering::Relaxed);
        if let Some((since, true)) = state.down_since.take() {
            info!(
                "a log keeper answers again after {:?}; nodes started from now on write through it",
                since.elapsed()
            );
        }
        drop(state);
        Ok(conn)
    }

    /// Starts a keeper: this binary in keeper mode, in the state dir. The very file
    /// this agent runs, through `/proc/self/exe`: its path may name another file by now
    /// (a package upgrade replaced it) or none, and a keeper started later must still
    /// start, and speak this agent's protocol. The path is only the fallback, without
    /// `/proc`, and the keeper's name in `ps`.
    fn spawn_keeper(&self) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let exe = std::env::current_exe()?;
        let exe = exe.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the agent's path {} is not UTF-8", exe.display()),
            )
        })?;
        // What Linux shows for a file that was unlinked.
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
        let dir = self.state_dir.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the state dir {} is not UTF-8", self.state_dir.display()),
            )
        })?;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(super::log_path(&self.state_dir))?;
        let mut env = vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_owned()];
        for key in ["RUST_LOG", "NO_COLOR"] {
            if let Some(v) = std::env::var_os(key).and_then(|v| v.into_string().ok()) {
                env.push(format!("{key}={v}"));
            }
        }
        let args = [super::KEEPER_ARG.to_owned(), dir.to_owned()];
        let spawn = |program: &str| {
            crate::sys::spawn_clean(&crate::sys::SpawnSpec {
                program,
                argv0: Some(exe),
                args: &args,
                env: env.clone(),
                path: "",
                cwd: &self.state_dir,
                stdout: log.as_fd(),
                stderr: log.as_fd(),
                exec: None,
                cgroup: None,
                join: &[],
            })
        };
        let pid = spawn("/proc/self/exe").or_else(|_| spawn(exe))?;
        debug!(pid, "started a log keeper");
        Ok(())
    }

    /// Reads the keeper's notices until the connection ends, then starts another
    /// keeper; forever.
    fn watch(self: Arc<Self>, conn: Option<Arc<OwnedFd>>, started: Started) {
        let mut conn = match conn {
            Some(c) => c,
            None => {
                // A keeper `start` started is waited for, not started again; one that
                // did not answer it is asked again, and replaced if it is gone.
                let c = self.connect_to(started).unwrap_or_else(|e| {
                    warn!("the log keeper did not answer: {e}; trying again");
                    self.reconnect()
                });
                info!(pipes = self.lock().held.len(), "log keeper connected");
                c
            }
        };
        loop {
            loop {
                match proto::recv(conn.as_fd()) {
                    Ok(Received::Packet(Ok((Msg::Closed { ino, tail }, _)))) => {
                        self.closed(ino, tail);
                    }
                    Ok(Received::Packet(Ok((
                        msg @ (Msg::WriteFailing { .. } | Msg::Lost { .. }),
                        _,
                    )))) => note_loss(msg),
                    Ok(Received::Packet(other)) => {
                        warn!("ignoring a log keeper message: {other:?}");
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Received::Eof) | Err(_) => break,
                }
            }
            {
                let mut state = self.lock();
                if state.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                    state.conn = None;
                    UP.store(false, Ordering::Relaxed);
                    state.down_since = Some((Instant::now(), false));
                }
            }
            warn!("lost the log keeper; starting another");
            conn = self.reconnect();
            RESTARTS.fetch_add(1, Ordering::Relaxed);
            info!(pipes = self.lock().held.len(), "log keeper connected again");
        }
    }
}

/// Whether a keeper was started for the connection about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Started {
    /// Start one if none answers.
    NotYet,
    /// One was started: wait for it to listen.
    Already,
}

impl Inner {
    /// Connects, starting a keeper when none answers, until that succeeds.
    fn reconnect(&self) -> Arc<OwnedFd> {
        let mut wait = Duration::from_millis(50);
        loop {
            match self.connect() {
                Ok(c) => return c,
                Err(e) => {
                    warn!("cannot start the log keeper: {e}; trying again in {wait:?}");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

fn set_timeouts(conn: &OwnedFd, t: Duration) -> io::Result<()> {
    set_timeout(conn, libc::SO_RCVTIMEO, t)?;
    set_timeout(conn, libc::SO_SNDTIMEO, t)
}

fn set_send_timeout(conn: &OwnedFd, t: Duration) -> io::Result<()> {
    set_timeout(conn, libc::SO_SNDTIMEO, t)
}

fn set_timeout(conn: &OwnedFd, which: libc::c_int, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(t.subsec_micros().cast_signed()),
    };
    // SAFETY: `tv` is a valid timeval of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            which,
            (&raw const tv).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(0),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
