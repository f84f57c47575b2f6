//! drover-agent: one per host ("instance"); keeps a connection to the controller and
//! answers its requests.
//!
//! # Layout
//!
//! - [`Agent`]: loads credentials, checks that the certificate is an agent's and carries
//!   the configured name, and runs the connection loop: dial the controller, exchange
//!   Hello/Welcome, serve the controller's requests until the connection is lost, then
//!   dial again after a capped exponential backoff with jitter ([`backoff`]).
//! - [`supervisor`]: the node processes, driven by [`machine`] (the deterministic
//!   per-node state machine: no I/O, no clock) and [`converge`] (the multi-node
//!   decisions: applies by generation, spec diffs, recovery), with [`logs`] (per-node
//!   files, rotation, tails), [`cgroup`] (a cgroup v2 subtree with one cgroup per node)
//!   and [`sys`] (/proc, the spawn, process groups, pidfds, affinity).
//! - [`keeper`]: the log keeper process that writes the nodes' log files from pipes.
//! - [`logwatch`]: holds the log files of nodes that write them directly to their bound
//!   as they grow (inotify).
//! - [`query`]: asks running nodes for values (get-id-value) over their query sockets.
//! - [`sockdir`]: short paths for the nodes' sockets when the state dir is long.
//! - [`records`]: node records written in the order the supervisor made them, from the
//!   supervisor task and the spawner threads.
//!
//! The daemon binary (`main.rs`) only parses flags, sets up logging and signals, and calls
//! [`Agent::new`] and [`Agent::run_with_ready`] (which tells systemd when the agent
//! serves), so tests run agents in-process.

pub mod apply;
pub mod backoff;
pub mod book;
pub mod cgroup;
pub mod converge;
pub mod exec;
pub mod fsident;
pub mod guard;
mod handover;
pub mod keeper;
pub mod limits;
pub mod logs;
pub mod logwatch;
pub mod machine;
pub mod ops;
pub mod probe;
pub mod prune;
pub mod query;
pub mod records;
pub mod sockdir;
pub mod spawner;
mod standby;
pub mod supervisor;
pub mod sys;
pub mod waiters;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_net::conn::Answer;
use drover_net::conn::{self, TransportSettings};
use drover_net::{Identity, NetError, TlsFiles, Trust};
use drover_proto::model::{LogChunk, LogStream, MgmtResult, MgmtRole, NodeStatus, State};
use drover_proto::msg::{
    API_VERSION, AgentRequest, AgentResponse, ControllerRequest, ErrorCode, Hello, PeerRole,
    Progress, Request, Welcome, WireError,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::converge::Restart;
use crate::supervisor::{Op, ProgressTo, Supervisor, SupervisorConfig};

/// The most often an Apply that reports progress sends a count: each costs every hop to
/// the client a frame, and a deploy of hundreds of nodes settles many per millisecond.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The most time between two frames of a deploy's progress stream while it waits.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// How long the supervisor task may take to answer a watchdog ping.
const WATCHDOG_PATIENCE: Duration = Duration::from_secs(5);

/// After the connection to a controller of a high-availability group is lost (most
/// likely a failover), this many attempts pause at most [`FAILOVER_PAUSE`] (jittered)
/// whatever the backoff has reached: the successor serves within about a lease.
const FAILOVER_ATTEMPTS: u32 = 5;

/// The longest pause of the first attempts after a failover.
const FAILOVER_PAUSE: Duration = Duration::from_millis(800);

/// The port an agent listens on when the controller dials it.
pub const DEFAULT_PORT: u16 = 2151;

/// Everything an agent needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Instance name; must equal the name in the agent's certificate.
    pub name: String,
    /// The controller to dial, as `HOST:PORT`; resolved again before every attempt.
    /// `None` when the agent only listens for the controller.
    pub controller: Option<String>,
    /// Where to listen for the controller to dial in (Zeek's controller-to-agent mode).
    pub listen: Option<SocketAddr>,
    /// Directory for node records, logs and working directories.
    pub state_dir: PathBuf,
    /// Certificate files.
    pub tls: TlsFiles,
    /// Keep-alive, idle timeout and limits of the connection.
    pub transport: TransportSettings,
    /// Delays between connection attempts.
    pub reconnect: Backoff,
    /// Longest time an operation on nodes may take before it answers with a timeout.
    pub request_timeout: Duration,
    /// Stop every node when the agent exits (SIGTERM); otherwise leave them running
    /// for the next agent process to adopt.
    pub stop_nodes_on_exit: bool,
    /// Log rotation of node output.
    pub logs: logs::LogConfig,
    /// Where to serve Prometheus metrics (`/metrics`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the nodes' cgroups go.
    pub cgroup: cgroup::CgroupSetting,
    /// The agent exits with an error when its supervisor has not answered for this
    /// long (never when `None`); its nodes keep running for the next agent process.
    pub stall_timeout: Option<Duration>,
    /// Revoked identities and serials ([`drover_net::tls::DenyList`]) the controller's
    /// certificate is checked against; read at start and at every reload.
    pub deny_list: Option<PathBuf>,
    /// The least time between two status reports (see [`DEFAULT_REPORT_INTERVAL`]).
    pub report_interval: Duration,
    /// How long a removed node's directory is kept before it is deleted; for good when
    /// `None` (see [`prune`]).
    pub removed_node_retention: Option<Duration>,
}

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates or keys.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The certificate belongs to someone else.
    #[error("the certificate {cert} belongs to {identity}, but this is agent '{name}'")]
    WrongIdentity {
        /// The certificate file.
        cert: PathBuf,
        /// Whom it belongs to.
        identity: Identity,
        /// The configured name.
        name: String,
    },
    /// Neither a controller to dial nor an address to listen on.
    #[error("no --controller to dial and no --listen address: the agent needs at least one")]
    NoController,
    /// The controller address is malformed.
    #[error(
        "invalid controller address '{0}': expected HOST:PORT (an IPv6 address in brackets, \
         [ADDRESS]:PORT)"
    )]
    ControllerAddr(String),
    /// The supervisor could not start, or ended by a panic (the nodes keep running for
    /// the next agent process to adopt).
    #[error("the supervisor {0}")]
    Supervisor(String),
    /// The key of the stateless resets cannot be read or made.
    #[error(transparent)]
    ResetKey(#[from] drover_net::reset_key::Error),
    /// The state directory is unusable.
    #[error("state dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another agent process holds the state directory, or its lock cannot be taken.
    #[error(transparent)]
    StateDirLock(#[from] drover_net::state_lock::Error),
    /// Another agent process took the state directory while its lock file was gone.
    #[error("{0}")]
    StateDirTaken(String),
}

/// A configured agent, ready to run.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    /// Credentials, deny list and the connections they admitted; reloadable.
    trust: Arc<Trust>,
    /// The controllers of `config.controller` (comma-separated: the members of a
    /// high-availability group), each `HOST:PORT`.
    controllers: Vec<String>,
    /// Which controller of the group led when last heard of, to dial it first (or,
    /// once its connection is lost, last).
    leader: std::sync::Mutex<conn::LeaderMemory>,
    /// The listening endpoint, when the controller dials this agent.
    listener: Option<quinn::Endpoint>,
    /// The metrics listener, bound at start-up.
    metrics: std::sync::Mutex<Option<std::net::TcpListener>>,
    /// How many sessions the controller opened by dialling this agent are live: while
    /// one is, the agent does not dial the controller too.
    listened: tokio::sync::watch::Sender<usize>,
    /// Requests the controller sent, on any connection: each proves that connection
    /// admitted, so a refusal that comes after one is not the last word.
    admissions: Arc<std::sync::atomic::AtomicU64>,
    /// Set once the supervisor runs: see [`standby`].
    resumer: std::sync::OnceLock<standby::Resumer>,
    /// Bumped when the connection to the controller should move to a new one (a reload
    /// changed the material, or the controller asked).
    refresh: Arc<tokio::sync::watch::Sender<u64>>,
    /// The state dir's lock, held for the life of the process, and taken anew should
    /// the directory be removed under it (see [`guard`]).
    state: Arc<guard::StateDir>,
}

impl Agent {
    /// Loads and checks credentials and prepares the state dir.
    pub fn new(config: Config) -> Result<Self, Error> {
        let trust = Arc::new(Trust::load(&config.tls, config.deny_list.as_deref())?);
        let creds = trust.credentials().clone();
        let id = creds.identity();
        if id.role != PeerRole::Agent || id.name != config.name {
            return Err(Error::WrongIdentity {
                cert: config.tls.cert.clone(),
                identity: id.clone(),
                name: config.name.clone(),
            });
        }
        trust.check_at_start("this agent's certificate")?;
        let controllers: Vec<String> = match &config.controller {
            Some(list) => list
                .split(',')
                .map(|c| {
                    let c = c.trim();
                    split_host(c)
                        .map(|_| c.to_owned())
                        .ok_or_else(|| Error::ControllerAddr(c.to_owned()))
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        if config.controller.is_none() && config.listen.is_none() {
            return Err(Error::NoController);
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|source| Error::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        // Before anything reads the node records: a second agent on the same state dir
        // would adopt the first one's nodes and both would supervise them.
        let state = Arc::new(guard::StateDir::lock(&config.state_dir)?);
        // A state dir too long for the nodes' socket paths is an error now, not a node
        // that cannot start later.
        let nodes_dir = std::fs::canonicalize(&config.state_dir)
            .map(|d| d.join("nodes"))
            .and_then(|d| std::fs::create_dir_all(&d).map(|()| d))
            .map_err(|source| Error::StateDir {
                path: config.state_dir.clone(),
                source,
            })?;
        sockdir::SocketDirs::new(&nodes_dir).map_err(|source| Error::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let listener = match config.listen {
            // Kept with the state: a controller that dials this agent learns at once
            // that an agent started again after a crash lost its connection.
            Some(addr) => {
                let key = drover_net::reset_key::load_or_create(&config.state_dir)?;
                Some(conn::server_endpoint_keyed(
                    &creds,
                    addr,
                    &config.transport,
                    Some(&key),
                )?)
            }
            None => None,
        };
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| Error::Net(NetError::Bind { addr, source }))?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            trust,
            controllers,
            leader: std::sync::Mutex::default(),
            listener,
            metrics: std::sync::Mutex::new(metrics),
            listened: tokio::sync::watch::Sender::new(0),
            admissions: Arc::default(),
            resumer: std::sync::OnceLock::new(),
            refresh: Arc::new(tokio::sync::watch::Sender::new(0)),
            state,
        })
    }

    /// A handle that reloads this agent's certificates and deny list while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            trust: self.trust.clone(),
            refresh: self.refresh.clone(),
        }
    }

    /// Supervises the nodes and stays connected to the controller until `shutdown` is
    /// cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        self.run_with_ready(shutdown, || {}).await
    }

    /// As [`Agent::run`], calling `on_ready` once the nodes of a previous agent process
    /// are adopted (or started again), the metrics listener (if configured) serves and the
    /// agent begins to dial the controller or to accept it: the daemon tells systemd
    /// `READY=1` there. Being connected is not part of it, so the agent is ready (and its
    /// nodes supervised) while the controller is away.
    ///
    /// Under systemd with a watchdog, `WATCHDOG=1` is sent only while the supervisor task
    /// answers, so a stuck supervisor gets the agent restarted; a panic of it ends the
    /// agent with an error. Either way the nodes keep running and the next agent process
    /// adopts them.
    pub async fn run_with_ready(
        self,
        shutdown: CancellationToken,
        on_ready: impl FnOnce(),
    ) -> Result<(), Error> {
        let this = Arc::new(self);
        let expiry = this.trust.clone().warn_of_expiry(format!(
            "this agent's certificate {}",
            this.config.tls.cert.display()
        ));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = expiry => {}
            }
        });
        // Before the first child (the log keeper) is started.
        match sys::cloexec_inherited() {
            Ok(fds) if !fds.is_empty() => {
                info!(?fds, "descriptors inherited open are kept from the nodes");
            }
            Ok(_) => {}
            Err(e) => warn!(
                "cannot list this process's descriptors ({e}); nodes may inherit some it inherited"
            ),
        }
        let keeper = start_keeper(&this.config.state_dir, this.config.logs).await;
        let has_keeper = keeper.is_some();
        // Known once the keeper's start raised the limit as far as it goes.
        let room = nodes_max();
        if room < NODES_MAX_WARN {
            warn!(
                "the open-file limit ({}) leaves room for {room} nodes on this agent, and a deploy \
                 that gives it more is refused; raise it to run more (LimitNOFILE= in its unit, \
                 `ulimit -n`)",
                sys::open_file_limit()
            );
        }
        let supervisor = Supervisor::start(SupervisorConfig {
            instance: this.config.name.clone(),
            state_dir: this.config.state_dir.clone(),
            logs: this.config.logs,
            cgroup: this.config.cgroup.clone(),
            keeper,
            removed_node_retention: this.config.removed_node_retention,
        })
        .map_err(|e| Error::Supervisor(format!("cannot start: {e}")))?;
        let _ = this.resumer.set(standby::Resumer::new(
            supervisor.clone(),
            this.listened.subscribe(),
            this.resume_grace(),
        ));
        let sup = supervisor.clone();
        drover_daemon::notify::spawn_watchdog_with(move || {
            let sup = sup.clone();
            async move { sup.ping(WATCHDOG_PATIENCE).await }
        });
        // The supervisor made the state dir; its canonical path is the one it uses.
        let nodes_dir = std::fs::canonicalize(&this.config.state_dir)
            .unwrap_or_else(|_| this.config.state_dir.clone())
            .join("nodes");
        // The keeper holds the files it writes to their bound: the watcher is for the
        // nodes that write theirs themselves.
        let scope = if has_keeper {
            logwatch::Scope::Only(supervisor.direct_log_writers())
        } else {
            logwatch::Scope::All
        };
        let watch = logwatch::spawn(nodes_dir.clone(), this.config.logs, scope);
        if let Some(w) = &watch {
            supervisor.watch_own_writers_with(w.adder());
        }
        let metrics_listener = this.metrics.lock().ok().and_then(|mut m| m.take());
        if let Some(l) = metrics_listener {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    let sup = supervisor.clone();
                    let nodes_dir = nodes_dir.clone();
                    let trust = this.trust.clone();
                    let render: drover_metrics::Render = Arc::new(move || {
                        let sup = sup.clone();
                        let nodes_dir = nodes_dir.clone();
                        let trust = trust.clone();
                        Box::pin(async move {
                            let mut out = render_metrics(&sup, &nodes_dir).await;
                            trust.render_metrics(&mut out);
                            out
                        })
                    });
                    tokio::spawn(drover_metrics::serve(l, render, shutdown.clone()));
                }
                Err(e) => warn!("cannot serve metrics: {e}"),
            }
        }
        let dial = async {
            if this.config.controller.is_some() {
                this.connection_loop(&supervisor, &shutdown).await;
            }
        };
        let listen = async {
            if let Some(endpoint) = &this.listener {
                this.clone()
                    .listen_loop(endpoint.clone(), &supervisor, &shutdown)
                    .await;
            }
        };
        let stall = async {
            match this.config.stall_timeout {
                Some(limit) => supervisor.stalled(limit).await,
                None => std::future::pending().await,
            }
        };
        on_ready();
        tokio::select! {
            _ = async { tokio::join!(dial, listen) } => {}
            why = guard::watch(this.state.clone(), supervisor.clone()) => {
                tracing::error!("exiting, leaving the nodes to the agent that took the state dir");
                return Err(Error::StateDirTaken(why));
            }
            what = supervisor.failed() => {
                tracing::error!("the supervisor ended: {what}; exiting, leaving the nodes to the next agent process");
                return Err(Error::Supervisor(format!("ended: {what}")));
            }
            () = stall => {
                let limit = this.config.stall_timeout.unwrap_or_default();
                tracing::error!(
                    "the supervisor has not answered for {}; exiting, leaving the nodes to the next agent process",
                    humantime::format_duration(limit)
                );
                return Err(Error::Supervisor(format!(
                    "stalled: no answer for {}",
                    humantime::format_duration(limit)
                )));
            }
        }
        let stop = this.config.stop_nodes_on_exit;
        info!(stop_nodes = stop, "shutting down the supervisor");
        // Joining the watcher's thread takes a moment: not on a worker.
        let _ = tokio::task::spawn_blocking(move || drop(watch)).await;
        supervisor.shutdown(stop).await;
        info!(agent = %this.config.name, "agent stopped");
        Ok(())
    }

    /// Accepts the controller's connections (controller-to-agent mode): only a peer with
    /// a controller certificate, whose Hello matches it, is served.
    async fn listen_loop(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        supervisor: &Supervisor,
        shutdown: &CancellationToken,
    ) {
        let local = endpoint
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(addr = %local, "listening for the controller");
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            let incoming = tokio::select! {
                () = shutdown.cancelled() => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let this = self.clone();
            let supervisor = supervisor.clone();
            sessions.spawn(async move {
                let timeout = this.config.transport.hello_timeout;
                let (conn, identity) = match conn::accept(incoming, timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("{e}");
                        return;
                    }
                };
                let (hello, responder) = match conn::read_hello(&conn, timeout).await {
                    Ok(h) => h,
                    Err(e) => {
                        warn!(peer = %identity, "{e}");
                        return;
                    }
                };
                // Tracked for the session's whole life, so that a reload can close it.
                let tracked = this.trust.track_quic(&conn, None);
                let check = conn::check_hello(&hello, &identity, API_VERSION, &software()).and_then(|()| {
                    if identity.role == PeerRole::Controller {
                        Ok(())
                    } else {
                        Err(WireError::new(
                            ErrorCode::Forbidden,
                            format!("only the controller may connect to an agent, not a {}", identity.role),
                        ))
                    }
                })
                .and_then(|()| this.check_revoked(&conn, &identity))
                .and_then(|()| {
                    tracked.as_ref().map(|_| ()).map_err(|e| {
                        WireError::new(ErrorCode::Forbidden, e.to_string())
                    })
                });
                if let Err(e) = check {
                    warn!(peer = %identity, "refused connection: {}", e.message);
                    responder.refuse(e).await;
                    return;
                }
                let welcome = Welcome {
                    api_version: API_VERSION,
                    name: this.config.name.clone(),
                    software: software(),
                    warning: None,
                    term: None,
                };
                if responder.welcome(welcome).await.is_err() {
                    return;
                }
                info!(controller = %identity.name, addr = %conn.remote_address(), "controller connected");
                this.listened.send_modify(|n| *n += 1);
                let _live = ListenedSession(&this.listened);
                // Welcomed before the controller decides: the grace's end looks again.
                this.resumer().admitted_now();
                let state = Arc::new(handover::SessionState::default());
                let reason = this.serve(conn, &supervisor, state).await;
                this.resumer().lost();
                warn!("lost the controller: {}", conn::explain(&reason, "controller"));
                this.stand_by_if_let_go(&reason, &supervisor).await;
            });
        }
        sessions.abort_all();
        endpoint.close(0u32.into(), b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }

    async fn connection_loop(&self, supervisor: &Supervisor, shutdown: &CancellationToken) {
        let mut backoff = self.config.reconnect.clone();
        // One endpoint per address family, created on first use and kept, so that
        // reconnecting does not churn UDP sockets.
        let mut endpoints: [Option<quinn::Endpoint>; 2] = [None, None];
        let name = &self.config.name;
        let Some(controller) = &self.config.controller else {
            return;
        };
        info!(agent = %name, %controller, "agent connecting");
        let mut listened = self.listened.subscribe();
        let mut refresh = self.refresh.subscribe();
        // Attempts left whose pause is at most FAILOVER_PAUSE.
        let mut quick = 0u32;
        'dial: loop {
            // One connection to the controller is enough: while the controller's own
            // (it dialled our listener) lives, do not dial it too.
            if *listened.borrow_and_update() > 0 {
                info!(
                    "the controller dialled this agent; not dialling it while that connection lives"
                );
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = listened.wait_for(|n| *n == 0) => {}
                }
                backoff.reset();
            }
            let admitted_before = self.admissions.load(std::sync::atomic::Ordering::SeqCst);
            let result = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.dial_controller(&mut endpoints) => r,
            };
            match result {
                Ok((est, tracked)) => {
                    backoff.reset();
                    info!(
                        controller = %est.welcome.name,
                        addr = %est.conn.remote_address(),
                        "connected to controller"
                    );
                    // A reload before this connection was made needs no new one.
                    refresh.borrow_and_update();
                    let mut live = self.start_serving(est.conn, tracked, supervisor);
                    // Welcomed, so admitted: this process holds the identity now.
                    self.resumer().admitted_now();
                    let reason = loop {
                        tokio::select! {
                            () = shutdown.cancelled() => {
                                live.conn.close(0u32.into(), b"agent shutting down");
                                break 'dial;
                            }
                            r = &mut live.task => {
                                break r.unwrap_or(quinn::ConnectionError::LocallyClosed);
                            }
                            r = refresh.changed() => {
                                if r.is_err() {
                                    continue;
                                }
                                live = self.hand_over(live, &mut endpoints, supervisor).await;
                            }
                        }
                    };
                    warn!(
                        "lost the controller: {}",
                        conn::explain(&reason, "controller")
                    );
                    self.resumer().lost();
                    self.stand_by_if_let_go(&reason, supervisor).await;
                    if self.controllers.len() > 1 {
                        // Probably a failover: its successor is being elected, and the
                        // first attempts come quickly.
                        self.leader_memory().lost();
                        quick = FAILOVER_ATTEMPTS;
                    }
                }
                Err(e) => {
                    warn!("cannot connect to the controller: {e}");
                    // Not when the connection the controller keeps is the one it made
                    // to this agent's own listener.
                    if drover_proto::msg::is_already_connected(&e.to_string())
                        && *listened.borrow() == 0
                        && supervisor.stand_by().await
                    {
                        if self.admissions.load(std::sync::atomic::Ordering::SeqCst)
                            == admitted_before
                        {
                            warn!(
                                "the controller keeps another process's connection with this agent's identity (a second agent with the same certificate): this agent's nodes are stopped until the controller accepts it"
                            );
                        } else {
                            // The connection it keeps is one the controller made to this
                            // agent's listener meanwhile, which it has sent requests on.
                            self.resumer().admitted_now();
                        }
                    }
                }
            }
            let mut delay = backoff.next_delay();
            if quick > 0 {
                quick -= 1;
                delay = delay.min(FAILOVER_PAUSE.mul_f64(0.5 + 0.5 * backoff::random_unit()));
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        for endpoint in endpoints.into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    fn leader_memory(&self) -> std::sync::MutexGuard<'_, conn::LeaderMemory> {
        self.leader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Dials the controller, exchanges Hello/Welcome and checks its certificate against
    /// the deny list and the material in force (which a reload may have replaced since
    /// the handshake); the connection is tracked for later reloads.
    async fn dial_controller(
        &self,
        endpoints: &mut [Option<quinn::Endpoint>; 2],
    ) -> Result<(conn::Established, drover_net::peers::Tracked), NetError> {
        if self.controllers.is_empty() {
            return Err(NetError::Connection("no controller to dial".into()));
        }
        let endpoints = std::sync::Mutex::new(endpoints);
        // The name each connection was dialled by, for the checks of later reloads.
        let names = std::sync::Mutex::new(std::collections::BTreeMap::<usize, String>::new());
        let mut memory = self.leader_memory().clone();
        let lost_term = memory.lost_term();
        // Before the handshakes verify the controllers: unless a reload happens
        // meanwhile, that verification stands and is not repeated when tracked.
        let epoch = self.trust.credentials().epoch();
        let est = conn::dial_leader_with(&self.controllers, &mut memory, |target| {
            let (endpoints, names) = (&endpoints, &names);
            async move {
                let server_name = split_host(&target)
                    .ok_or_else(|| {
                        NetError::Connection(format!("invalid controller address '{target}'"))
                    })?
                    .to_owned();
                let addr = resolve(&target).await?;
                let endpoint = {
                    let mut slots = endpoints.lock().unwrap_or_else(|p| p.into_inner());
                    let slot = &mut slots[usize::from(addr.is_ipv6())];
                    match slot {
                        Some(e) => e.clone(),
                        None => slot
                            .insert(conn::client_endpoint(
                                self.trust.credentials(),
                                &self.config.transport,
                                addr,
                            )?)
                            .clone(),
                    }
                };
                let hello = Hello {
                    api_version: API_VERSION,
                    role: PeerRole::Agent,
                    name: self.config.name.clone(),
                    software: software(),
                    lost_term,
                };
                let est = conn::dial(
                    &endpoint,
                    None,
                    addr,
                    &server_name,
                    hello,
                    PeerRole::Controller,
                    None,
                    self.config.transport.hello_timeout,
                )
                .await?;
                names
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(est.conn.stable_id(), server_name);
                Ok(est)
            }
        })
        .await;
        *self.leader_memory() = memory;
        let est = est?;
        let server_name = names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&est.conn.stable_id())
            .unwrap_or_default();
        let server_name = server_name.as_str();
        let checked = self
            .check_revoked(&est.conn, &est.peer)
            .map_err(NetError::Refused)
            .and_then(|()| {
                self.trust
                    .track_quic_since(&est.conn, Some(server_name), &epoch)
            });
        match checked {
            Ok(tracked) => Ok((est, tracked)),
            Err(e) => {
                est.conn.close(
                    drover_net::peers::CLOSE_UNTRUSTED.into(),
                    e.to_string().as_bytes(),
                );
                Err(e)
            }
        }
    }

    /// How long an agent that stood by waits, once admitted, before it starts its nodes
    /// (see [`standby`]): long enough for the process it stood by for to notice that
    /// its controller went (at its next keep-alive after a restart, at its idle timeout
    /// after a host's death or a failover) and dial again (its backoff), and be let in
    /// instead.
    fn resume_grace(&self) -> Duration {
        self.config.transport.idle_timeout
            + 2 * (self.config.reconnect.max() + self.config.transport.keep_alive)
            + Duration::from_secs(2)
    }

    /// Let go for standing by while it was deciding to start its nodes: the process the
    /// controller let in runs them.
    async fn stand_by_if_let_go(&self, reason: &quinn::ConnectionError, supervisor: &Supervisor) {
        if let quinn::ConnectionError::ApplicationClosed(c) = reason
            && c.reason.as_ref() == drover_proto::msg::REPLACED_STANDING_BY.as_bytes()
            && supervisor.stand_by().await
        {
            warn!(
                "the controller let in another process with this agent's identity: this agent's nodes are stopped until the controller accepts it"
            );
        }
    }

    fn resumer(&self) -> &standby::Resumer {
        self.resumer
            .get()
            .expect("the resumer is set before any connection is made")
    }

    /// Serves a connection in a task of its own.
    fn start_serving(
        &self,
        conn: quinn::Connection,
        tracked: drover_net::peers::Tracked,
        supervisor: &Supervisor,
    ) -> handover::Live {
        let state = Arc::new(handover::SessionState::default());
        self.resumer().serving(&conn);
        let task = tokio::spawn(self.serve(conn.clone(), supervisor, state.clone()));
        handover::Live {
            conn,
            state,
            task,
            _tracked: tracked,
        }
    }

    /// Moves to a new connection made with the material in force (see [`handover`]);
    /// keeps `live` when that fails.
    async fn hand_over(
        &self,
        live: handover::Live,
        endpoints: &mut [Option<quinn::Endpoint>; 2],
        supervisor: &Supervisor,
    ) -> handover::Live {
        live.state
            .handing_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match self.dial_controller(endpoints).await {
            Ok((est, tracked)) => {
                info!(
                    addr = %est.conn.remote_address(),
                    "moved to a new connection to the controller, made with the certificates in force; the previous one closes once its requests are answered"
                );
                let next = self.start_serving(est.conn, tracked, supervisor);
                tokio::spawn(live.retire(self.config.request_timeout));
                next
            }
            Err(e) => {
                live.state
                    .handing_over
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                warn!(
                    "cannot move to a new connection to the controller ({e}); keeping the current one"
                );
                live
            }
        }
    }

    /// Refuses a controller whose certificate the deny list in force names.
    fn check_revoked(
        &self,
        conn: &quinn::Connection,
        identity: &Identity,
    ) -> Result<(), WireError> {
        let deny = self.trust.deny();
        if deny.is_empty() {
            return Ok(());
        }
        let info = drover_net::tls::peer_cert_info(conn)
            .map_err(|e| WireError::new(ErrorCode::Forbidden, e.to_string()))?;
        if deny.denies(identity, &info) {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                format!(
                    "the certificate of {identity} (serial {}) is revoked",
                    info.serial
                ),
            ));
        }
        Ok(())
    }

    /// Serves the controller's requests on `conn` and reports statuses over it, until
    /// it ends (status reports also stop when `state` is retired).
    fn serve(
        &self,
        conn: quinn::Connection,
        supervisor: &Supervisor,
        state: Arc<handover::SessionState>,
    ) -> impl Future<Output = quinn::ConnectionError> + Send + 'static {
        let reporting = report_status(
            conn.clone(),
            supervisor.clone(),
            self.config.name.clone(),
            self.config.report_interval,
        );
        let retired = state.retired.clone();
        let reporter = tokio::spawn(async move {
            tokio::select! {
                () = reporting => {}
                () = retired.cancelled() => {}
            }
        });
        // A controller that died without a word is noticed after the idle timeout, even
        // on a connection whose round-trip estimates are still those of a reconnect
        // storm (see `drover_net::silence`).
        let idle = self.config.transport.idle_timeout;
        let watched = conn.clone();
        let silence = tokio::spawn(async move {
            if drover_net::silence::close_when_silent(watched, idle).await {
                warn!(
                    "no word from the controller for {}; closing the connection",
                    drover_net::humanize(idle)
                );
            }
        });
        let name = self.config.name.clone();
        let sup = supervisor.clone();
        let limit = self.config.request_timeout;
        let transport = self.config.transport;
        let refresh = self.refresh.clone();
        let admissions = self.admissions.clone();
        let resumer = self.resumer().clone();
        let admitted = conn.clone();
        let handler = move |req: Request<ControllerRequest>| {
            let name = name.clone();
            let sup = sup.clone();
            let state = state.clone();
            let refresh = refresh.clone();
            let admissions = admissions.clone();
            let admitted = admitted.clone();
            let resumer = resumer.clone();
            async move {
                let _in_flight = state.enter();
                // The controller asks nothing of a connection it has not admitted (one
                // it made to this agent's listener is welcomed before that): this agent
                // holds its identity.
                admissions.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if sup.standing_by() {
                    resumer.admitted_now();
                }
                // A request that changes nodes, read from a connection that has been
                // closed since (the agent was paused, and replaced meanwhile): its
                // requester is gone, and another process may hold this agent's
                // identity now.
                if admitted.close_reason().is_some()
                    && matches!(
                        req.body,
                        ControllerRequest::Apply { .. }
                            | ControllerRequest::Restart { .. }
                            | ControllerRequest::Stop { .. }
                            | ControllerRequest::Start { .. }
                            | ControllerRequest::Signal { .. }
                    )
                {
                    return Err(WireError::new(
                        ErrorCode::Unavailable,
                        "the connection closed before the request was carried out",
                    ));
                }
                // Answer before the requester gives up, so a timeout is a result.
                let budget = req.timeout_ms.map_or(limit, |ms| {
                    limit.min(Duration::from_millis(ms.saturating_mul(4) / 5))
                });
                let deadline = Instant::now() + budget;
                // The longest the requester waits: a stop or restart may wait up to it
                // for its nodes' own stop and readiness timeouts.
                let cap = Instant::now()
                    + req
                        .timeout_ms
                        .map_or(budget, |ms| Duration::from_millis(ms.saturating_mul(4) / 5));
                let results = |mut rs: Vec<MgmtResult>| {
                    for r in &mut rs {
                        r.reqid.clone_from(&req.id);
                    }
                    AgentResponse::Results(rs)
                };
                Ok::<_, WireError>(Answer::One(match req.body {
                    ControllerRequest::Logs {
                        node,
                        lines,
                        follow,
                        stream,
                        from_start,
                        resume,
                    } => {
                        let Some((logs, marks)) = sup.logs(&node).await else {
                            return Err(WireError::new(
                                ErrorCode::BadRequest,
                                format!("unknown cluster node '{node}'"),
                            ));
                        };
                        // Where each stream's follow begins, when not at its end.
                        let from = match (follow, resume, marks) {
                            (false, _, _) => None,
                            (true, Some(r), _) => Some([r.stdout, r.stderr]),
                            (true, None, Some([out, err])) if from_start => {
                                Some([Some(out), Some(err)])
                            }
                            (true, None, _) => None,
                        };
                        return Ok(Answer::Stream(stream_logs(
                            logs, lines, follow, stream, from,
                        )));
                    }
                    ControllerRequest::GetIdValue { id, nodes } => {
                        let targets = sup.queryable(nodes).await;
                        results(query::ask_all(&name, &id, targets).await)
                    }
                    ControllerRequest::Ping => {
                        if state.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
                            AgentResponse::HandingOver
                        } else if resumer.answer_standing_by() {
                            AgentResponse::StandingBy
                        } else {
                            AgentResponse::Ack
                        }
                    }
                    ControllerRequest::Reconnect => {
                        // The controller asks every agent at once: spread the new
                        // handshakes rather than have them all arrive together.
                        let delay = handover::RECONNECT_SPREAD.mul_f64(backoff::random_unit());
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            refresh.send_modify(|n| *n += 1);
                        });
                        AgentResponse::Ack
                    }
                    ControllerRequest::GetNodes => {
                        let mut nodes = sup.status().await;
                        nodes.push(own_status(&name, sup.applied_generation()));
                        AgentResponse::Nodes(nodes)
                    }
                    ControllerRequest::Apply {
                        config,
                        restart_all,
                        generation,
                        restart_since,
                        progress: true,
                        ..
                    } => {
                        let (tx, rx) = tokio::sync::watch::channel(Progress::default());
                        let beats = tx.clone();
                        let progress = ProgressTo { tx, idle: budget };
                        let sup = sup.clone();
                        let restart = Restart {
                            all: restart_all,
                            since: restart_since,
                        };
                        // Frames at least every second: the deploy may wait for its
                        // nodes' readiness timeouts, longer than the requester waits
                        // between two frames.
                        let every = HEARTBEAT_EVERY
                            .min(budget / 2)
                            .max(Duration::from_millis(10));
                        // As long as its nodes may take, and no longer: an Apply stuck
                        // (on a write that never returns) lets the controller time out.
                        let quiet = config
                            .nodes
                            .iter()
                            .filter(|n| n.instance == name)
                            .map(|n| n.settle_within(true, true))
                            .max()
                            .unwrap_or_default()
                            + supervisor::SETTLE_GRACE
                            + budget;
                        let apply = async move {
                            let work =
                                sup.apply(*config, restart, generation, deadline, Some(progress));
                            conn::with_heartbeats(work, beats, every, Some(quiet)).await
                        };
                        let reqid = req.id;
                        return Ok(Answer::Stream(conn::progress_stream(
                            apply,
                            rx,
                            PROGRESS_EVERY,
                            AgentResponse::Progress,
                            move |mut rs: Vec<MgmtResult>| {
                                for r in &mut rs {
                                    r.reqid.clone_from(&reqid);
                                }
                                AgentResponse::Results(rs)
                            },
                        )));
                    }
                    ControllerRequest::Apply {
                        generation,
                        catch_up: true,
                        ..
                    } if generation != 0 && generation == sup.applied_generation() => {
                        // Already there: nothing to wait for on the controller's behalf.
                        AgentResponse::Results(Vec::new())
                    }
                    ControllerRequest::Apply {
                        config,
                        restart_all,
                        generation,
                        restart_since,
                        progress: false,
                        ..
                    } => {
                        let restart = Restart {
                            all: restart_all,
                            since: restart_since,
                        };
                        results(
                            sup.apply(*config, restart, generation, deadline, None)
                                .await,
                        )
                    }
                    ControllerRequest::Restart { nodes } => {
                        results(sup.act(Op::Restart, nodes, deadline, cap).await)
                    }
                    ControllerRequest::Stop { nodes } => {
                        results(sup.act(Op::Stop, nodes, deadline, cap).await)
                    }
                    ControllerRequest::Start { nodes } => {
                        results(sup.act(Op::Start, nodes, deadline, cap).await)
                    }
                    ControllerRequest::Signal { nodes, signal } => {
                        results(sup.act(Op::Signal(signal), nodes, deadline, deadline).await)
                    }
                }))
            }
        };
        async move {
            let reason = conn::serve_answers(conn, transport, handler).await;
            reporter.abort();
            silence.abort();
            reason
        }
    }
}

/// Reloads a running agent's certificates and deny list; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reloader {
    trust: Arc<Trust>,
    refresh: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Reloader {
    /// Reads the files again (`cause` says why, for the log) and puts them in force,
    /// closing a controller connection that is no longer trusted, and moving a trusted
    /// one to a new connection when the certificate or CA bundle changed ([`handover`]);
    /// or keeps the previous material and returns why not (logged either way).
    pub fn reload(&self, cause: &str) -> Result<(), String> {
        let done = self
            .trust
            .reload_logged(cause, "this agent's certificate")?;
        if done.adopted.cert_changed || done.adopted.roots_changed {
            self.refresh.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// When a reload is worth trying again: the last one refused a certificate not
    /// valid yet.
    pub fn retry_after(&self) -> Option<Duration> {
        self.trust.retry_after(drover_net::trust::unix_now())
    }

    /// The files a reload reads, for a daemon that watches them.
    pub fn files(&self) -> Vec<PathBuf> {
        self.trust.watched_files()
    }
}

/// Connects to the state dir's log keeper, starting it if needed; `None`, with a
/// warning, when that fails: nodes then write their log files themselves.
async fn start_keeper(
    state_dir: &std::path::Path,
    config: logs::LogConfig,
) -> Option<keeper::Keeper> {
    let dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    match tokio::task::spawn_blocking(move || keeper::Keeper::start(&dir, config)).await {
        Ok(Ok(k)) => Some(k),
        Ok(Err(e)) => {
            warn!(
                "cannot start the log keeper ({e}); nodes write their log files themselves, \
                 rotated by copy and truncation, which a node writing fast can outrun"
            );
            None
        }
        Err(e) => {
            warn!("cannot start the log keeper ({e}); nodes write their log files themselves");
            None
        }
    }
}

/// Counts a session the controller opened through the listener as over when dropped,
/// however the session's task ends.
struct ListenedSession<'a>(&'a tokio::sync::watch::Sender<usize>);

impl Drop for ListenedSession<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Sends node statuses (and the agent's own entry) to the controller whenever they
/// change: once changes have settled for [`REPORT_QUIET`], so that the steps of one
/// restart (exit, spawn, ready) make one report, and at most one report per
/// report interval, so that a burst of changes (500 nodes starting) costs a few
/// reports, not hundreds; but within [`REPORT_ANSWERED_GAP`] of an answer to a request
/// waiting for nodes, so that the controller's view is not behind what it answered.
async fn report_status(
    conn: quinn::Connection,
    supervisor: Supervisor,
    name: String,
    interval: Duration,
) {
    let mut changes = supervisor.changes();
    let mut answered = supervisor.answered();
    // A full report at once, so a controller that just met us knows our nodes; then
    // only the nodes that changed, unless a report failed (the next is full again).
    let mut full = true;
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        match last_sent {
            None => {}
            // A failed report is retried as soon as the default allows, not a long
            // configured interval later: the controller's view is stale meanwhile.
            Some(t) if full => {
                tokio::time::sleep_until(t + interval.min(DEFAULT_REPORT_INTERVAL)).await;
            }
            Some(t) => {
                let settled = settle(&mut changes, t + interval);
                let open = tokio::select! {
                    open = settled => open,
                    // A request waiting for nodes was answered: the controller (and
                    // whoever follows its events) learns of their states with the
                    // answer, not a report interval later.
                    r = answered.changed() => {
                        tokio::time::sleep_until(t + REPORT_ANSWERED_GAP).await;
                        r.is_ok()
                    }
                };
                if !open {
                    return;
                }
            }
        }
        changes.borrow_and_update();
        answered.borrow_and_update();
        let (sent_full, mut statuses) = supervisor.changes_since_last(full).await;
        statuses.push(own_status(&name, supervisor.applied_generation()));
        last_sent = Some(tokio::time::Instant::now());
        let req = AgentRequest::Status {
            statuses,
            full: sent_full,
        };
        full = match conn::call::<_, AgentResponse>(&conn, &req, Duration::from_secs(10)).await {
            Ok(_) => false,
            Err(e) => {
                tracing::debug!("status report failed: {e}");
                true
            }
        };
    }
}

/// Waits for node changes to report: until no change came for [`REPORT_QUIET`] (the
/// steps of a restart come within a few milliseconds), but no longer than
/// [`REPORT_SETTLE_MAX`], and not before `not_before`. False when the supervisor is gone.
async fn settle(
    changes: &mut tokio::sync::watch::Receiver<u64>,
    not_before: tokio::time::Instant,
) -> bool {
    if changes.changed().await.is_err() {
        return false;
    }
    let first = tokio::time::Instant::now();
    loop {
        let quiet = tokio::time::sleep(REPORT_QUIET);
        tokio::select! {
            () = quiet => break,
            r = changes.changed() => if r.is_err() { return false },
        }
        if first.elapsed() >= REPORT_SETTLE_MAX {
            break;
        }
    }
    tokio::time::sleep_until(not_before).await;
    true
}

/// How often a followed log file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Most lines in one log reply.
const LOG_BATCH_LINES: usize = 512;

/// Most bytes (as JSON) of the lines in one log reply: far below the frame limit, with
/// room for the envelopes the controller wraps around them.
pub const LOG_BATCH_BYTES: usize = 1024 * 1024;

/// The last `lines` lines of the node's streams, then (with `follow`) new lines in
/// batches until the receiver is dropped. Followers start before the tails are read, so
/// no line falls between the two; a line written in that instant may come twice. Every
/// reply holds at most [`LOG_BATCH_LINES`] lines and [`LOG_BATCH_BYTES`] bytes plus one
/// line (a line is at most [`logs::MAX_LINE_BYTES`]), so it always fits in a frame.
/// With `from` (for stdout and stderr: where the node first ran, or where a broken-off
/// follow stood), the followers of the streams it has a mark for begin there instead,
/// and no tail is sent. Each reply says where its stream's file stands after it, when
/// known ([`LogChunk::end`]).
fn stream_logs(
    logs: logs::NodeLogs,
    lines: usize,
    follow: bool,
    only: Option<LogStream>,
    from: Option<[Option<logs::Mark>; 2]>,
) -> tokio::sync::mpsc::Receiver<AgentResponse> {
    let lines = if from.is_some() { 0 } else { lines };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let streams: Vec<LogStream> = match only {
        Some(s) => vec![s],
        None => vec![LogStream::Stdout, LogStream::Stderr],
    };
    let file_stream = |s: LogStream| match s {
        LogStream::Stdout => logs::Stream::Stdout,
        LogStream::Stderr => logs::Stream::Stderr,
    };
    let mut begins = [None, None];
    let followers: Vec<_> = if follow {
        streams
            .iter()
            .map(|s| {
                let i = usize::from(*s == LogStream::Stderr);
                let mark = from.and_then(|f| f[i]);
                let (rx, begin) = logs.follow_marked(file_stream(*s), FOLLOW_POLL, mark);
                begins[i] = begin;
                (*s, rx)
            })
            .collect()
    } else {
        Vec::new()
    };
    tokio::spawn(async move {
        for s in &streams {
            let (l, fs, stream, out) = (logs.clone(), file_stream(*s), *s, tx.clone());
            // The tail ends where the follower began, which delivers what came since.
            let until = begins[usize::from(*s == LogStream::Stderr)];
            // Sent batch by batch as the files are read, so that a tail of millions of
            // lines never sits in memory whole; the channel's bound holds the reading
            // back while the client takes its time.
            let read = tokio::task::spawn_blocking(move || {
                let mut batch = Batch::default();
                let mut open = true;
                let read = l.tail_each_until(fs, lines, until, |line| {
                    if let Some(full) = batch.push(line) {
                        let chunk = LogChunk {
                            stream,
                            lines: full,
                            end: None,
                        };
                        open = out.blocking_send(AgentResponse::Log(chunk)).is_ok();
                    }
                    open
                });
                if let Err(e) = read {
                    tracing::debug!(file = fs.file_name(), "cannot read the tail of a log: {e}");
                }
                open.then(|| batch.take())
            })
            .await;
            let Ok(Some(last)) = read else { return };
            // An empty tail still answers, so that the client sees the stream. The
            // follower goes on from where the last batch says the file stands.
            let chunk = LogChunk {
                stream: *s,
                lines: last,
                end: begins[usize::from(*s == LogStream::Stderr)],
            };
            if tx.send(AgentResponse::Log(chunk)).await.is_err() {
                return;
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (stream, mut rx) in followers {
            let tx = tx.clone();
            tasks.spawn(async move {
                loop {
                    // On a quiet node no line comes to fail a send: watch the reply
                    // stream's end as well, so that an abandoned follow lets go at once.
                    let first = tokio::select! {
                        line = rx.recv() => line,
                        () = tx.closed() => None,
                    };
                    let Some(first) = first else { return };
                    let mut bytes = json_str_len(&first.text);
                    let mut end = first.end;
                    let mut lines = vec![first.text];
                    while lines.len() < LOG_BATCH_LINES && bytes < LOG_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(l) => {
                                bytes += json_str_len(&l.text);
                                end = l.end.or(end);
                                lines.push(l.text);
                            }
                            Err(_) => break,
                        }
                    }
                    let chunk = LogChunk { stream, lines, end };
                    if tx.send(AgentResponse::Log(chunk)).await.is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        while tasks.join_next().await.is_some() {}
    });
    rx
}

/// Lines gathered into batches of at most [`LOG_BATCH_LINES`] lines and about
/// [`LOG_BATCH_BYTES`] bytes as JSON (a batch ends after the line that reached it).
#[derive(Default)]
struct Batch {
    lines: Vec<String>,
    bytes: usize,
}

impl Batch {
    /// Adds `line`; the batch it completed, if it was full.
    fn push(&mut self, line: String) -> Option<Vec<String>> {
        let full = (self.lines.len() >= LOG_BATCH_LINES || self.bytes >= LOG_BATCH_BYTES)
            .then(|| self.take());
        self.bytes += json_str_len(&line);
        self.lines.push(line);
        full
    }

    /// The lines gathered, the batch left empty.
    fn take(&mut self) -> Vec<String> {
        self.bytes = 0;
        std::mem::take(&mut self.lines)
    }
}

/// Splits lines into batches as [`Batch`] does; no lines make one empty batch.
#[cfg(test)]
fn log_batches(lines: Vec<String>) -> Vec<Vec<String>> {
    let mut batch = Batch::default();
    let mut batches: Vec<Vec<String>> = lines.into_iter().filter_map(|l| batch.push(l)).collect();
    batches.push(batch.take());
    batches
}

/// The length of a string as a JSON string with its comma (escapes included).
fn json_str_len(s: &str) -> usize {
    3 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// A status report waits for this long without a change, for the rest of the change
/// that prompted it (a restart is an exit, a spawn and readiness within a few
/// milliseconds)...
const REPORT_QUIET: Duration = Duration::from_millis(3);

/// ...but not longer than this after the first change.
const REPORT_SETTLE_MAX: Duration = Duration::from_millis(20);

/// The least time between two status reports unless told otherwise
/// ([`Config::report_interval`])...
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_millis(50);

/// ...and, when requests waiting for nodes were answered, this.
const REPORT_ANSWERED_GAP: Duration = Duration::from_millis(2);

/// The labels of a node stream's series.
fn stream_labels(node: &str, stream: logs::Stream) -> String {
    drover_metrics::labels(&[("node", node), ("stream", stream.name())])
}

/// The agent's `/metrics` page, computed from the supervisor's current statuses.
async fn render_metrics(sup: &Supervisor, nodes_dir: &std::path::Path) -> String {
    let statuses = sup.status().await;
    let mut out = String::new();
    let mut by_state: std::collections::BTreeMap<&'static str, f64> =
        State::ALL.iter().map(|s| (s.as_str(), 0.0)).collect();
    for s in &statuses {
        *by_state.entry(s.state.as_str()).or_default() += 1.0;
    }
    let samples: Vec<(String, f64)> = by_state
        .into_iter()
        .filter(|(s, _)| *s != "UNKNOWN")
        .map(|(state, n)| (drover_metrics::labels(&[("state", state)]), n))
        .collect();
    drover_metrics::gauge(
        &mut out,
        "drover_agent_nodes",
        "This agent's nodes by state.",
        &samples,
    );
    let restarts: Vec<(String, f64)> = statuses
        .iter()
        .map(|s| {
            (
                drover_metrics::labels(&[("node", &s.node)]),
                f64::from(s.restarts),
            )
        })
        .collect();
    drover_metrics::gauge(
        &mut out,
        "drover_agent_node_restarts",
        "Automatic restarts per node.",
        &restarts,
    );
    let rss: Vec<(String, f64)> = statuses
        .iter()
        .filter_map(|s| {
            Some((
                drover_metrics::labels(&[("node", &s.node)]),
                s.rss_bytes? as f64,
            ))
        })
        .collect();
    drover_metrics::gauge(
        &mut out,
        "drover_agent_node_rss_bytes",
        "Resident memory per node.",
        &rss,
    );
    // --- resources and liveness ---
    let per_node = |value: &dyn Fn(&NodeStatus) -> Option<f64>| -> Vec<(String, f64)> {
        statuses
            .iter()
            .filter(|s| s.mgmt_role == MgmtRole::None)
            .filter_map(|s| Some((drover_metrics::labels(&[("node", &s.node)]), value(s)?)))
            .collect()
    };
    drover_metrics::gauge(
        &mut out,
        "drover_agent_node_memory_bytes",
        "Memory charged to each node's cgroup, its children's included.",
        &per_node(&|s| Some(s.memory_bytes? as f64)),
    );
    drover_metrics::counter_samples(
        &mut out,
        "drover_agent_node_cpu_seconds_total",
        "CPU time of each node's cgroup, its children's included.",
        &per_node(&|s| Some(s.cgroup_cpu_ms? as f64 / 1000.0)),
    );
    drover_metrics::counter_samples(
        &mut out,
        "drover_agent_node_oom_kills_total",
        "Processes of each node the kernel killed for exceeding its memory limit, since the agent started.",
        &per_node(&|s| Some(f64::from(s.oom_kills))),
    );
    drover_metrics::counter_samples(
        &mut out,
        "drover_agent_node_liveness_failures_total",
        "Restarts of each node forced by its watchdog or liveness probe, since the agent started.",
        &per_node(&|s| Some(f64::from(s.liveness_failures))),
    );
    let dropped: Vec<(String, f64)> = statuses
        .iter()
        .filter(|s| s.mgmt_role != MgmtRole::Agent)
        .flat_map(|s| {
            logs::Stream::ALL.map(|stream| {
                let path = nodes_dir.join(&s.node).join(stream.file_name());
                (
                    stream_labels(&s.node, stream),
                    logs::dropped_bytes(&path) as f64,
                )
            })
        })
        .collect();
    drover_metrics::counter_samples(
        &mut out,
        "drover_agent_log_dropped_bytes_total",
        "Bytes of node output dropped to hold the log bound (a marker line in the log says where).",
        &dropped,
    );
    let losses = keeper::client::losses();
    let lost: Vec<(String, f64)> = losses
        .iter()
        .map(|((node, stream), l)| (stream_labels(node, *stream), l.bytes as f64))
        .collect();
    drover_metrics::counter_samples(
        &mut out,
        "drover_agent_log_lost_bytes_total",
        "Bytes of node output lost because the log file could not be written (a full disk), counted once writes succeed again (a marker line in the log says where).",
        &lost,
    );
    let failing: Vec<(String, f64)> = losses
        .iter()
        .map(|((node, stream), l)| (stream_labels(node, *stream), f64::from(u8::from(l.failing))))
        .collect();
    drover_metrics::gauge(
        &mut out,
        "drover_agent_log_write_failing",
        "1 while a node stream's log file cannot be written (a full disk) and its output is lost.",
        &failing,
    );
    drover_metrics::counter_samples(
        &mut out,
        "drover_agent_log_keeper_restarts_total",
        "Log keepers the agent started again after losing one.",
        &[(String::new(), keeper::client::restarts() as f64)],
    );
    drover_metrics::gauge(
        &mut out,
        "drover_agent_log_keeper_up",
        "1 while the agent is connected to its log keeper; 0 while it is not, when nodes started a second later write their own files.",
        &[(String::new(), f64::from(u8::from(keeper::client::up())))],
    );
    drover_metrics::gauge(
        &mut out,
        "drover_agent_standby",
        "1 while the agent stands by: refused because another process with its certificate was connected, until it has held a connection of its own for its grace; its nodes are stopped meanwhile.",
        &[(String::new(), f64::from(u8::from(sup.standing_by())))],
    );
    drover_metrics::gauge(
        &mut out,
        "drover_agent_streams_served",
        "Streams the controller opened that the agent is serving (log follows included).",
        &[(String::new(), conn::served_streams() as f64)],
    );
    let me = own_status("self", sup.applied_generation());
    drover_metrics::gauge(
        &mut out,
        "drover_agent_rss_bytes",
        "The agent's own resident memory.",
        &[(String::new(), me.rss_bytes.unwrap_or(0) as f64)],
    );
    out
}

/// The agent's own NodeStatus entry (management role AGENT), with the deploy
/// generation it has applied and the number of CPUs its nodes may be pinned to.
fn own_status(name: &str, generation: u64) -> NodeStatus {
    let mut s = NodeStatus::new(name, State::Running, MgmtRole::Agent);
    s.pid = Some(std::process::id());
    s.ready = true;
    s.generation = Some(generation);
    s.cpus = Some(cpu_count());
    s.nodes_max = Some(nodes_max());
    s.unenforceable = limits::HOST
        .get()
        .map(|h| h.unenforceable())
        .unwrap_or_default();
    s.started_at_ms = process_start_ms();
    if let Some(stat) = i32::try_from(std::process::id())
        .ok()
        .and_then(|pid| sys::proc_stat(pid).ok())
    {
        s.rss_bytes = Some(sys::rss_bytes(&stat));
        s.cpu_ms = Some(sys::cpu_ms(&stat));
    }
    s
}

/// Descriptors the agent holds per running node: the read ends of its two pipes to the
/// log keeper, two pidfds (one of them watches for the exit), its notify socket and the
/// duplicate of it kept for a keeper started anew. The keeper, under the same limit,
/// holds three (the pipes and the notify socket).
const FDS_PER_NODE: u64 = 6;

/// Descriptors the agent holds whatever its nodes: its sockets, files and the like,
/// and the two log files each of the most log follows a controller keeps open to it
/// (so that an agent at its capacity can still follow, and still stop its nodes).
const FDS_BASE: u64 = 64 + 2 * drover_proto::msg::FOLLOWS_PER_AGENT as u64;

/// Below this many nodes of room, the agent warns at start.
const NODES_MAX_WARN: u32 = 1000;

/// How many nodes the agent's open-file limit leaves room for: more cannot run, so the
/// controller refuses a deploy that gives the agent more.
fn nodes_max() -> u32 {
    let room = sys::open_file_limit().saturating_sub(FDS_BASE) / FDS_PER_NODE;
    u32::try_from(room).unwrap_or(u32::MAX)
}

/// The CPUs this process may run on (its affinity mask), which its nodes inherit and
/// may be pinned to; what std says is available when the mask cannot be read.
fn cpu_count() -> u32 {
    let n = i32::try_from(std::process::id())
        .ok()
        .and_then(|pid| sys::cpus_allowed(pid).ok())
        .map(|c| c.len())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn process_start_ms() -> Option<u64> {
    let pid = i32::try_from(std::process::id()).ok()?;
    sys::start_time_epoch_ms(sys::proc_id(pid).ok()?)
}

/// The host part of `HOST:PORT` or `[V6]:PORT` ([`drover_proto::name::host_of`]).
fn split_host(addr: &str) -> Option<&str> {
    drover_proto::name::host_of(addr)
}

async fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| NetError::Connection(format!("cannot resolve controller '{addr}': {e}")))?;
    addrs
        .next()
        .ok_or_else(|| NetError::Connection(format!("controller '{addr}' resolves to nothing")))
}

/// Name and version of this build, as told to peers.
pub fn software() -> String {
    format!("drover-agent {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::{
        LOG_BATCH_BYTES, LOG_BATCH_LINES, json_str_len, log_batches, own_status, split_host,
    };
    use drover_proto::model::{LogChunk, LogStream};
    use drover_proto::msg::{AgentResponse, MAX_FRAME_LEN};
    use proptest::prelude::*;

    #[test]
    fn own_status_carries_the_applied_generation_and_the_cpus() {
        let s = own_status("agent-1", 7);
        assert_eq!(s.generation, Some(7));
        let mask = super::sys::cpus_allowed(i32::try_from(std::process::id()).unwrap())
            .unwrap()
            .len();
        assert!(mask > 0);
        assert_eq!(s.cpus, Some(u32::try_from(mask).unwrap()));
        assert_eq!(s.mgmt_role, drover_proto::model::MgmtRole::Agent);
    }

    proptest! {
        #[test]
        fn json_str_len_is_the_encoded_length(s in "\\PC{0,40}|[\\x00-\\x7f]{0,40}") {
            prop_assert_eq!(json_str_len(&s), serde_json::to_string(&s).unwrap().len() + 1);
        }
    }

    /// Encoded size of a log reply as the agent sends it.
    fn reply_len(lines: &[String]) -> usize {
        serde_json::to_vec(&AgentResponse::Log(LogChunk {
            stream: LogStream::Stdout,
            lines: lines.to_vec(),
            end: Some(crate::logs::Mark {
                ino: u64::MAX,
                len: u64::MAX,
            }),
        }))
        .unwrap()
        .len()
    }

    #[test]
    fn log_batches_stay_under_the_frame_limit() {
        let max_line = crate::logs::MAX_LINE_BYTES;
        // Control characters take six bytes each as JSON.
        let worst = "\u{1}".repeat(max_line);
        let cases: Vec<Vec<String>> = vec![
            Vec::new(),
            vec![worst.clone()],
            (0..300).map(|_| worst.clone()).collect(),
            (0..100_000).map(|i| format!("line {i}")).collect(),
            (0..2000)
                .map(|i| format!("{i}{}", "x".repeat(max_line - 8)))
                .collect(),
        ];
        for lines in cases {
            let batches = log_batches(lines.clone());
            assert!(!batches.is_empty());
            for b in &batches {
                assert!(b.len() <= LOG_BATCH_LINES);
                let len = reply_len(b);
                assert!(len <= LOG_BATCH_BYTES + 6 * max_line + 64, "{len} bytes");
                assert!(len < MAX_FRAME_LEN / 4);
            }
            // Nothing lost, nothing reordered, no empty batch unless there were no lines.
            assert_eq!(batches.concat(), lines);
            assert!(lines.is_empty() || batches.iter().all(|b| !b.is_empty()));
        }
    }

    #[test]
    fn host_part_of_addresses() {
        assert_eq!(split_host("127.0.0.1:2150"), Some("127.0.0.1"));
        assert_eq!(split_host("[::1]:2150"), Some("::1"));
        assert_eq!(split_host("ctl.example:2150"), Some("ctl.example"));
        assert_eq!(split_host("ctl.example"), None);
        assert_eq!(split_host(":2150"), None);
        assert_eq!(split_host("h:99999"), None);
        assert_eq!(split_host("::1"), None, "an IPv6 address out of brackets");
        assert_eq!(split_host("[nope]:1"), None);
        assert_eq!(split_host("no such host:1"), None);
        assert_eq!(split_host("h:0"), None);
    }
}
