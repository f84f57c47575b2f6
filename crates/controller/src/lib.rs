//! drover-controller: the cluster's control point.
//!
//! # Layout
//!
//! - [`Controller`]: binds the QUIC endpoint and runs the accept loop. Each connection is
//!   authenticated (mutual TLS, then a Hello checked against the certificate) and handed
//!   to the agent side or the client side by the role its certificate carries.
//! - [`registry`]: the connected agents.
//! - [`api`]: the client requests: staging and deploying configurations, node statuses,
//!   actions on node subsets, fanned out to agents with timeouts.
//! - [`audit`]: the audit trail of requests that change something, and who sent them
//!   (in the state dir, or in etcd: [`etcd_audit`]).
//! - [`store`]: the staged configuration and the desired and deployed deploys with their
//!   generations, persisted atomically.
//! - [`ha`], [`etcd`], `etcd_store`: high availability on etcd (`--store etcd`): leader
//!   election on a lease, the gate that lets only the leader serve, the fenced store.
//! - `view`: every agent's nodes as last reported, which answers get-nodes while it is
//!   current (no I/O, tested on its own).
//! - `catchup`: connected agents that lag the desired deploy (they answered an Apply
//!   without applying it) are sent it again, with backoff.
//! - `dial`: connections the controller makes itself, to agents that listen (instances
//!   with a `port`), as Zeek's controller-to-agent mode.
//! - [`guard`]: the state dir made again, with its lock and records, when it is removed
//!   under the running controller.
//! - `reload`: certificates, key, CA bundle and deny list read again on request
//!   ([`Reloader`]), closing the connections of peers no longer trusted.
//!
//! The daemon binary (`main.rs`) only parses flags, sets up logging and signals, and calls
//! [`Controller::bind`] and [`Controller::run_with_ready`] (which tells systemd when the
//! controller serves), so tests run controllers in-process.

pub mod api;
pub mod audit;
mod catchup;
mod dial;
pub mod etcd;
pub mod etcd_audit;
pub mod etcd_store;
pub mod guard;
pub mod ha;
pub mod refused;
pub mod registry;
mod reload;
pub mod store;
mod view;
pub mod zeek;

pub use reload::Reloader;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_net::conn::{self, TransportSettings};
use drover_net::{Identity, NetError, TlsFiles, Trust};
use drover_proto::access::Scope;
use drover_proto::model::{MgmtRole, NodeStatus, State};
use drover_proto::msg::{
    API_VERSION, AgentRequest, AgentResponse, ClientRequest, ControllerRequest, ErrorCode, Event,
    EventRecord, PeerRole, Request, Welcome, WireError,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::registry::Registry;
use crate::store::Store;
use crate::view::View;

/// The controller's default QUIC port.
pub const DEFAULT_PORT: u16 = 2150;

/// Streams an agent may have open towards the controller at once. Agents open one per
/// status report, so a few suffice; quinn keeps state for every stream a peer may open
/// from the start of each connection, which at the transport's default of 256 cost some
/// 20 KiB of every agent connection. Every connection starts with this limit; a client's
/// is raised to the transport's `max_streams` once its Hello is accepted.
pub const PEER_STREAMS: u32 = 32;

/// Everything a controller needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory for persistent state.
    pub state_dir: PathBuf,
    /// Certificate files.
    pub tls: TlsFiles,
    /// Keep-alive, idle timeout and limits of connections.
    pub transport: TransportSettings,
    /// How long a request fanned out to agents may take before it answers with a
    /// timeout (Zeek: 10 s; agents' own limit is shorter, clients' longer).
    pub request_timeout: Duration,
    /// A file of revoked identities and serials ([`drover_net::tls::DenyList`]), read at
    /// start and at every reload.
    pub deny_list: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`/metrics`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve zeek-client (Zeek's WebSocket API, [`zeek`]); off when `None`.
    pub zeek_websocket: Option<SocketAddr>,
    /// Serve zeek-client over `wss://` with this controller's certificate, requiring a
    /// client certificate from the cluster CA (mutual TLS), instead of plain `ws://`.
    pub zeek_websocket_tls: bool,
    /// Command templates and node defaults for Zeek-style configurations
    /// ([`zeek`]).
    pub zeek_roles: Option<PathBuf>,
    /// What a deploy through zeek-client restarts ([`zeek::DeployMode`]).
    pub zeek_deploy: zeek::DeployMode,
    /// High availability: the state in etcd and leader election (`--store etcd`); the
    /// state dir is not used then.
    pub ha: Option<ha::HaSettings>,
    /// Port auto-assignment and checks for Zeek clusters ([`drover_proto::ports`]); the
    /// controller's own port is filled in when it binds.
    pub ports: drover_proto::ports::PortPolicy,
    /// The most a zeek-client may do ([`zeek`]): the scope of every client of a `ws://`
    /// front, which has no certificates, and a ceiling on a `wss://` client's own.
    pub zeek_scope: Scope,
    /// Size at which the audit trail ([`audit`]) is rotated.
    pub audit_max_bytes: u64,
    /// Rotated audit files kept.
    pub audit_keep: u32,
}

/// Why a controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates, keys or the socket.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The certificate is not a controller's.
    #[error("the certificate {cert} belongs to {identity}, not to a controller")]
    WrongRole {
        /// The certificate file.
        cert: PathBuf,
        /// Whom it belongs to.
        identity: Identity,
    },
    /// The zeek-client front cannot start.
    #[error(transparent)]
    Zeek(#[from] zeek::Error),
    /// The persisted state is unusable.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The key of the stateless resets cannot be read or made.
    #[error(transparent)]
    ResetKey(#[from] drover_net::reset_key::Error),
    /// Another controller holds the state dir, or its lock cannot be taken.
    #[error(transparent)]
    StateDirLock(#[from] drover_net::state_lock::Error),
    /// Another controller took the state dir while its lock file was gone ([`guard`]).
    #[error("{0}")]
    StateDirTaken(String),
    /// The audit trail cannot be opened.
    #[error("audit trail {path}: {source}")]
    Audit {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// State shared by every connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Our own name, from our certificate.
    pub(crate) name: String,
    /// Connected agents. Written on connect and loss, read by client requests.
    pub(crate) registry: Registry,
    /// Staged and deployed configurations.
    pub(crate) store: Store,
    /// With `--store etcd`: whether this controller leads, and its term.
    pub(crate) gate: Option<Arc<ha::Gate>>,
    /// The id of the deploy in progress: only one runs at a time, and no stage while
    /// it runs.
    pub(crate) deploying: std::sync::Mutex<Option<String>>,
    /// The request that staged the staged configuration, so that a deploy can expect
    /// its own stage (`expect_stage`); unknown after a restart or a failover. Written
    /// and read under `config_ops`.
    pub(crate) staged_by: std::sync::Mutex<Option<String>>,
    /// Held by a stage and by a deploy for their whole duration, so that they never
    /// overlap (a deploy sends exactly what was staged when it began).
    pub(crate) config_ops: tokio::sync::Mutex<()>,
    pub(crate) transport: TransportSettings,
    /// Streams a client may have open at once (the configured `max_streams`).
    pub(crate) client_streams: u32,
    pub(crate) request_timeout: Duration,
    /// Credentials, deny list and the connections they admitted; reloadable.
    pub(crate) trust: Arc<Trust>,
    /// Events for `monitor` subscribers; a subscriber that falls behind is told how
    /// many it missed rather than slowing anyone down.
    pub(crate) events: tokio::sync::broadcast::Sender<EventRecord>,
    /// How often, and last why, this controller let its agents go while keeping its term
    /// (cut off from etcd): its clients' connections close then too, so that their
    /// follows (`logs -f`, `monitor`) look for the leader elsewhere.
    pub(crate) let_go: tokio::sync::watch::Sender<(u64, &'static [u8])>,
    /// Every agent's nodes as last reported. Written by status reports, direct answers,
    /// operations and agent loss; read by get-nodes and `/metrics`. A std mutex: no
    /// critical section awaits.
    pub(crate) view: std::sync::Mutex<View>,
    /// The endpoint, for dialling agents that listen.
    pub(crate) endpoint: quinn::Endpoint,
    /// Counters and histograms for `/metrics`.
    pub(crate) metrics: drover_metrics::Registry,
    /// Dialler tasks by instance name, with the address each dials. Written when
    /// configurations are staged or deployed.
    pub(crate) dialers: std::sync::Mutex<BTreeMap<String, (SocketAddr, tokio::task::AbortHandle)>>,
    /// Port auto-assignment and checks, with our own port.
    pub(crate) ports: drover_proto::ports::PortPolicy,
    /// The audit trail.
    pub(crate) audit: audit::Trail,
    /// Every instance's share of the desired deploy, made once per deploy for the
    /// re-applies of returning agents: made for each agent on its own, a reconnect
    /// storm of N agents would scan the whole configuration N times.
    pub(crate) shares: std::sync::Mutex<Option<DeployShares>>,
    /// The last reason each agent gave for not applying the desired generation, so that
    /// a retry that meets the same refusal (every 30 s, while it lasts) is logged at
    /// debug level rather than warned about again.
    pub(crate) refusals: std::sync::Mutex<BTreeMap<String, (u64, String)>>,
    /// The desired generation each agent was last warned to be ahead of, so that its
    /// reports, which come every report interval while anything changes, warn once.
    pub(crate) ahead: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Each client's budget of refusals recorded one by one, so that the least of
    /// clients cannot rotate everyone else's records out of the audit trail.
    pub(crate) refused: std::sync::Mutex<refused::Budget>,
}

/// The shares of one deploy, by instance; the deploy is held so that its address
/// identifies it.
#[derive(Debug)]
pub(crate) struct DeployShares {
    deploy: Arc<store::Deploy>,
    shares: BTreeMap<String, drover_proto::model::Configuration>,
}

impl DeployShares {
    /// `instance`'s share of `deploy`, from `cache`, which is made anew (in one pass over
    /// the configuration) when it holds another deploy's shares or none.
    fn share(
        cache: &std::sync::Mutex<Option<Self>>,
        deploy: &Arc<store::Deploy>,
        instance: &str,
    ) -> drover_proto::model::Configuration {
        let mut cached = cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cached
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.deploy, deploy));
        if !fresh {
            let names = deploy.config.instances.iter().map(|i| i.name.as_str());
            *cached = Some(Self {
                deploy: deploy.clone(),
                shares: zeek::layout::shares(&deploy.config, names),
            });
        }
        match cached.as_ref().and_then(|c| c.shares.get(instance)) {
            Some(share) => share.clone(),
            // Not an instance of the deploy: its (empty) share, as a deploy sends it.
            None => zeek::layout::share_for(&deploy.config, instance),
        }
    }
}

impl Shared {
    /// Publishes an event to every `monitor` subscriber.
    pub(crate) fn emit(&self, event: Event) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // No subscriber is not an error.
        let _ = self.events.send(EventRecord { at_ms, event });
    }

    /// Whether a deploy is in progress.
    pub(crate) fn is_deploying(&self) -> bool {
        self.deploying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The view of every agent's nodes, locked.
    pub(crate) fn view(&self) -> std::sync::MutexGuard<'_, View> {
        // Every change to the view is made under one lock call that cannot panic
        // half-way, so poisoning is ignored.
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `instance`'s share of `deploy` (see [`Shared::shares`]).
    pub(crate) fn share_of(
        &self,
        deploy: &Arc<store::Deploy>,
        instance: &str,
    ) -> drover_proto::model::Configuration {
        DeployShares::share(&self.shares, deploy, instance)
    }

    /// Publishes events produced under the view's lock, once it is released.
    pub(crate) fn emit_all(&self, events: Vec<Event>) {
        for e in events {
            self.emit(e);
        }
    }

    /// Records an agent's report over `conn` (every node's status when `full`, else
    /// those that changed), emitting an event per changed node.
    pub(crate) fn record_report(
        &self,
        instance: &str,
        conn: usize,
        full: bool,
        statuses: Vec<NodeStatus>,
    ) {
        let (events, applied) = {
            let mut view = self.view();
            let events = view.report(instance, conn, full, statuses);
            (events, view.applied(instance))
        };
        self.emit_all(events);
        self.note_ahead(instance, applied);
    }

    /// Warns, once per desired generation, of an agent that applied a newer generation
    /// than the desired one: no agent takes an older generation, so the controller's
    /// state is older than what was deployed (restored from an older copy, say), and
    /// what the agent runs stays until a deploy makes a newer one.
    fn note_ahead(&self, instance: &str, applied: Option<u64>) {
        let desired = self.store.desired_generation();
        let mut ahead = self
            .ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match applied {
            Some(applied) if desired > 0 && applied > desired => {
                if ahead.insert(instance.to_owned(), desired) != Some(desired) {
                    warn!(
                        agent = %instance,
                        generation = desired,
                        "agent '{instance}' has applied generation {applied}, newer than the desired generation {desired}: this controller's state is older than the deploys the agents have seen (restored from an older copy?); the agent keeps what it runs until a deploy (`drover deploy` or `drover deploy-config`) makes a newer generation"
                    );
                }
            }
            _ => {
                ahead.remove(instance);
            }
        }
    }

    /// Marks every node of a lost agent UNKNOWN (their processes are untouched).
    pub(crate) fn mark_unknown(&self, instance: &str) {
        let events = self.view().lost(instance);
        self.emit_all(events);
    }

    /// The `/metrics` page: registered counters and histograms, plus gauges computed now.
    pub(crate) fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        if let Some(gate) = &self.gate {
            // Its term, renewed in time or not (that is `_stale`), until its lease runs
            // out: a group whose etcd is slow for a moment still has one leader here,
            // and one cut off from etcd gives way on the gauge when a successor may lead.
            let leading = if gate.leads() { 1.0 } else { 0.0 };
            drover_metrics::gauge(
                &mut out,
                "drover_controller_leader",
                "1 while this controller holds the leader term of its high-availability group (with drover_controller_leader_stale 1 when it could not renew it in time).",
                &[(String::new(), leading)],
            );
            let stale = if gate.stale().is_some() { 1.0 } else { 0.0 };
            drover_metrics::gauge(
                &mut out,
                "drover_controller_leader_stale",
                "1 while this controller leads on a lease it could not renew in etcd: it answers clients, refuses changes.",
                &[(String::new(), stale)],
            );
        }
        let agents = self.registry.snapshot().len();
        drover_metrics::gauge(
            &mut out,
            "drover_agents_connected",
            "Agents connected to the controller.",
            &[(String::new(), agents as f64)],
        );
        let mut by_state: BTreeMap<&'static str, f64> =
            State::ALL.iter().map(|s| (s.as_str(), 0.0)).collect();
        let mut restarts = 0.0;
        for s in self.view().all_nodes() {
            *by_state.entry(s.state.as_str()).or_default() += 1.0;
            restarts += f64::from(s.restarts);
        }
        let samples: Vec<(String, f64)> = by_state
            .into_iter()
            .map(|(state, n)| (drover_metrics::labels(&[("state", state)]), n))
            .collect();
        drover_metrics::gauge(
            &mut out,
            "drover_nodes",
            "Nodes by state, as agents last reported them.",
            &samples,
        );
        drover_metrics::gauge(
            &mut out,
            "drover_node_restarts",
            "Automatic restarts of all nodes, as agents last reported them.",
            &[(String::new(), restarts)],
        );
        self.render_generations(&mut out);
        self.trust.render_metrics(&mut out);
        out
    }

    /// Gauges of deploy generations: desired, deployed, and each connected agent's
    /// applied one, with how many agents lag the desired one.
    fn render_generations(&self, out: &mut String) {
        let desired = self.store.desired_generation();
        let deployed = self.store.deployed().map_or(0, |d| d.generation);
        drover_metrics::gauge(
            out,
            "drover_desired_generation",
            "The generation of the last deploy the controller recorded (0: none).",
            &[(String::new(), desired as f64)],
        );
        drover_metrics::gauge(
            out,
            "drover_deployed_generation",
            "The generation of the last deploy every agent acknowledged (0: none).",
            &[(String::new(), deployed as f64)],
        );
        let connected = self.registry.snapshot();
        let view = self.view();
        let mut applied = Vec::new();
        let mut lagging = 0.0;
        let mut ahead = 0.0;
        for agent in &connected {
            // An agent that neither reported nor acknowledged any generation lags once
            // there is a desired one; it has no applied sample.
            let g = view.applied(&agent.name);
            if g.unwrap_or(0) < desired {
                lagging += 1.0;
            }
            if desired > 0 && g.unwrap_or(0) > desired {
                ahead += 1.0;
            }
            if let Some(g) = g {
                applied.push((
                    drover_metrics::labels(&[("instance", agent.name.as_str())]),
                    g as f64,
                ));
            }
        }
        drop(view);
        drover_metrics::gauge(
            out,
            "drover_agent_applied_generation",
            "The generation each connected agent applied (reported, or answered an apply of).",
            &applied,
        );
        drover_metrics::gauge(
            out,
            "drover_agents_lagging",
            "Connected agents whose applied generation is below the desired one.",
            &[(String::new(), lagging)],
        );
        drover_metrics::gauge(
            out,
            "drover_agents_ahead",
            "Connected agents whose applied generation is above the desired one: the controller's state is older than what was deployed (restored from an older copy); a deploy ends it.",
            &[(String::new(), ahead)],
        );
    }
}

/// A bound controller, ready to run.
#[derive(Debug)]
pub struct Controller {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    /// Bound at start-up so a busy port is an error then, not later.
    metrics: Option<std::net::TcpListener>,
    /// The zeek-client front, bound at start-up too.
    zeek: Option<zeek::Front>,
    /// The election to run, with `--store etcd`.
    ha: Option<ha::HaSettings>,
    /// The state dir's lock and reset key, held while the controller lives and watched
    /// by [`guard`] (none on etcd, whose controllers keep no state dir of their own).
    state_dir: Option<Arc<guard::StateDir>>,
}

impl Controller {
    /// Loads credentials, prepares the state dir and binds the listening socket.
    pub fn bind(config: Config) -> Result<Self, Error> {
        let trust = Arc::new(Trust::load(&config.tls, config.deny_list.as_deref())?);
        let creds = trust.credentials().clone();
        if creds.identity().role != PeerRole::Controller {
            return Err(Error::WrongRole {
                cert: config.tls.cert.clone(),
                identity: creds.identity().clone(),
            });
        }
        trust.check_at_start("this controller's certificate")?;
        // Before anything reads the state files: a second controller on the same dir
        // would overwrite the first one's deploys (and set aside a file it found
        // half-written while the first was writing it).
        let state_dir = match &config.ha {
            None => Some(Arc::new(guard::StateDir::lock(&config.state_dir)?)),
            Some(_) => None,
        };
        let (store, gate) = match &config.ha {
            Some(ha) => {
                let gate = Arc::new(ha::Gate::new(ha.lease, ha.etcd.endpoints()));
                let etcd = etcd_store::EtcdStore::new(ha.etcd.clone(), &ha.prefix, gate.clone())
                    .map_err(store::StoreError::from)?;
                (Store::etcd(etcd), Some(gate))
            }
            None => (Store::open(&config.state_dir)?, None),
        };
        let audit = match (&config.ha, &gate) {
            // With etcd the trail is there too: one history for the whole group.
            (Some(ha), Some(gate)) => audit::Trail::Etcd(etcd_audit::EtcdAudit::new(
                ha.etcd.clone(),
                &ha.prefix,
                gate.clone(),
            )),
            _ => {
                store::secure_dir(&config.state_dir)?;
                let log = audit::AuditLog::open(
                    &config.state_dir,
                    config.audit_max_bytes,
                    config.audit_keep,
                )
                .map_err(|source| Error::Audit {
                    path: config.state_dir.join(audit::FILE),
                    source,
                })?;
                audit::Trail::File(Arc::new(log))
            }
        };
        let transport = TransportSettings {
            max_streams: config.transport.max_streams.min(PEER_STREAMS),
            ..config.transport
        };
        // Kept with the state, so that agents of a controller started again after a
        // crash learn at once that their connections are gone. Controllers on etcd
        // have no state dir of their own; their agents' idle timeout is short anyway.
        let reset_key = state_dir.as_ref().map(|s| s.reset_key());
        let endpoint = conn::server_endpoint_keyed(&creds, config.listen, &transport, reset_key)?;
        let metrics = match config.metrics_listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| Error::Net(NetError::Bind { addr, source }))?;
                Some(l)
            }
            None => None,
        };
        let zeek = config
            .zeek_websocket
            .map(|addr| {
                let tls = config.zeek_websocket_tls.then_some(&creds);
                zeek::Front::bind(
                    addr,
                    config.zeek_roles.as_deref(),
                    tls,
                    config.zeek_deploy,
                    config.zeek_scope,
                )
            })
            .transpose()?;
        if config.zeek_websocket.is_none() && config.zeek_websocket_tls {
            warn!(
                "--zeek-websocket-tls is not used: it secures the zeek websocket, and none is configured (--zeek-websocket)"
            );
        }
        if let (None, Some(roles)) = (config.zeek_websocket, &config.zeek_roles) {
            zeek::Front::check_roles(roles)?;
            warn!(
                "the zeek roles file {} is not used: it serves zeek-client, and no zeek websocket is configured",
                roles.display()
            );
        }
        let ports = drover_proto::ports::PortPolicy {
            controller_port: endpoint.local_addr().ok().map(|a| a.port()),
            ..config.ports
        };
        let ha = config.ha.clone().map(|mut ha| {
            if ha.advertise.is_empty()
                && let Ok(addr) = endpoint.local_addr()
            {
                ha.advertise = addr.to_string();
            }
            ha
        });
        Ok(Self {
            metrics,
            zeek,
            ha,
            state_dir,
            endpoint: endpoint.clone(),
            shared: Arc::new(Shared {
                name: creds.identity().name.clone(),
                registry: Registry::default(),
                store,
                gate,
                deploying: std::sync::Mutex::new(None),
                staged_by: std::sync::Mutex::new(None),
                config_ops: tokio::sync::Mutex::new(()),
                transport,
                client_streams: config.transport.max_streams,
                request_timeout: config.request_timeout,
                trust,
                events: tokio::sync::broadcast::channel(4096).0,
                let_go: tokio::sync::watch::channel((0, &b""[..])).0,
                view: std::sync::Mutex::default(),
                endpoint,
                metrics: {
                    let metrics = drover_metrics::Registry::default();
                    api::register_audit_metrics(&metrics);
                    metrics
                },
                dialers: std::sync::Mutex::default(),
                ports,
                audit,
                shares: std::sync::Mutex::default(),
                refusals: std::sync::Mutex::default(),
                refused: std::sync::Mutex::default(),
                ahead: std::sync::Mutex::default(),
            }),
        })
    }

    /// A handle that reloads this controller's certificates and deny list while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// Serves until `shutdown` is cancelled, then closes every connection. Ends early,
    /// with an error, only when another controller took the state dir ([`guard`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        self.run_with_ready(shutdown, || {}).await
    }

    /// As [`Controller::run`], calling `on_ready` once, when the QUIC endpoint and the
    /// metrics and zeek-client listeners (those configured) are serving: the daemon tells
    /// systemd `READY=1` there.
    pub async fn run_with_ready(
        mut self,
        shutdown: CancellationToken,
        on_ready: impl FnOnce(),
    ) -> Result<(), Error> {
        // Its own, so that losing the state dir stops every task started here too.
        let shutdown = shutdown.child_token();
        info!(addr = %self.local_addr(), name = %self.shared.name, "controller listening");
        let trust = self.shared.trust.clone();
        let whose = format!(
            "this controller's certificate {}",
            trust.files().cert.display()
        );
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = trust.warn_of_expiry(whose) => {}
            }
        });
        if let Some(listener) = self.metrics.take() {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving metrics");
                    let shared = self.shared.clone();
                    let render: drover_metrics::Render = Arc::new(move || {
                        let shared = shared.clone();
                        Box::pin(async move { shared.render_metrics() })
                    });
                    tokio::spawn(drover_metrics::serve(l, render, shutdown.clone()));
                }
                Err(e) => warn!("cannot serve metrics: {e}"),
            }
        }
        if let Some(front) = self.zeek.take() {
            front.spawn(self.shared.clone(), shutdown.clone());
        }
        for config in [
            self.shared.store.desired_config(),
            self.shared.store.staged(),
        ]
        .into_iter()
        .flatten()
        {
            dial::ensure(&self.shared, &config);
        }
        let tasks = TaskTracker::new();
        tasks.spawn(catchup::run(self.shared.clone(), shutdown.clone()));
        tasks.spawn(api::record_unrecorded_deploy(self.shared.clone()));
        if let (Some(settings), Some(gate)) = (self.ha.take(), self.shared.gate.clone()) {
            if let Some(every) = settings.compact_every {
                tasks.spawn(ha::compact(
                    settings.etcd.clone(),
                    settings.leader_key(),
                    gate.clone(),
                    every,
                    shutdown.clone(),
                ));
            }
            let shared = self.shared.clone();
            let stepped = self.shared.clone();
            let expired = self.shared.clone();
            tasks.spawn(ha::run(
                settings,
                gate,
                shutdown.clone(),
                move |revision| {
                    let shared = shared.clone();
                    async move { take_over(shared, revision).await }
                },
                move || {
                    let why = b"controller cut off from etcd: it may not lead any more";
                    let_agents_go(&expired, why);
                    // A leader that steps down closes its clients' connections with its
                    // term's; one cut off keeps its term, so it lets them go here.
                    expired.let_go.send_modify(|(n, reason)| {
                        *n += 1;
                        *reason = why;
                    });
                },
                move || {
                    let_agents_go(
                        &stepped,
                        b"controller stepped down: not the leader any more",
                    )
                },
            ));
        }
        let taken = async {
            match self.state_dir.clone() {
                Some(dir) => guard::watch(dir, self.shared.clone()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(taken);
        let mut outcome = Ok(());
        // Every socket was bound in `bind` and the servers of the side listeners are
        // spawned; the accept loop starts right below.
        on_ready();
        loop {
            let incoming = tokio::select! {
                () = shutdown.cancelled() => break,
                why = &mut taken => {
                    tracing::error!("stopping: the state dir is another controller's now");
                    outcome = Err(Error::StateDirTaken(why));
                    shutdown.cancel();
                    break;
                }
                incoming = self.endpoint.accept() => match incoming {
                    Some(i) => i,
                    None => break,
                },
            };
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = handle_connection(shared, incoming) => {}
                }
            });
        }
        tasks.close();
        self.endpoint.close(
            drover_net::peers::CLOSE_STOPPING.into(),
            b"controller shutting down",
        );
        tasks.wait().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        info!("controller stopped");
        outcome
    }
}

/// Stops what only a leader does toward agents: dialling those that listen, and every
/// agent connection (dialled ones included), so that agents find the next leader. The
/// view keeps their nodes as last reported (shown as such while the term is stale).
fn let_agents_go(shared: &Shared, reason: &[u8]) {
    let mut dialers = shared.dialers.lock().unwrap_or_else(|p| p.into_inner());
    for (_, (_, task)) in std::mem::take(&mut *dialers) {
        task.abort();
    }
    drop(dialers);
    for (name, conn) in shared.registry.connections() {
        // Out of the registry first, so that the agent's session, seeing its connection
        // end, does not mark its nodes UNKNOWN.
        shared.registry.remove_if_same(&name, &conn);
        conn.close(drover_net::peers::CLOSE_LET_GO.into(), reason);
    }
}

/// Makes this controller the leader's state holder for term `revision`: the state as
/// the last leader left it in etcd, parts of values no value names deleted, and the
/// agents of its configurations dialled (those that listen).
async fn take_over(shared: Arc<Shared>, revision: i64) -> Result<(), String> {
    let loaded = shared.clone();
    tokio::task::spawn_blocking(move || loaded.store.reload())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // Orphaned parts cost space, never correctness: a failure to delete them is said,
    // and the next leader tries again.
    let sweeping = shared.clone();
    match tokio::task::spawn_blocking(move || sweeping.store.sweep_parts(revision)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => info!("deleted the parts of {n} unfinished or replaced values from etcd"),
        Ok(Err(e)) => warn!("cannot delete orphaned parts from etcd: {e}"),
        Err(e) => warn!("cannot delete orphaned parts from etcd: {e}"),
    }
    for config in [shared.store.desired_config(), shared.store.staged()]
        .into_iter()
        .flatten()
    {
        dial::ensure(&shared, &config);
    }
    info!(
        generation = shared.store.desired_generation(),
        "state loaded from etcd"
    );
    Ok(())
}

async fn handle_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let addr = incoming.remote_address();
    let timeout = shared.transport.hello_timeout;
    // Before the handshake verifies the peer: unless a reload happens meanwhile, that
    // verification stands and the peer is not checked a second time when tracked.
    let epoch = shared.trust.credentials().epoch();
    let (conn, identity) = match conn::accept(incoming, timeout).await {
        Ok(c) => c,
        Err(e) => {
            warn!("{e}");
            return;
        }
    };
    // Tracked for the connection's whole life, so that a reload can close it.
    let _tracked = match shared.trust.track_quic_since(&conn, None, &epoch) {
        Ok(t) => t,
        Err(e) => {
            warn!(%addr, peer = %identity, "refused connection: {e}");
            conn.close(
                drover_net::peers::CLOSE_UNTRUSTED.into(),
                e.to_string().as_bytes(),
            );
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
    if let Ok(info) = drover_net::tls::peer_cert_info(&conn)
        && let Some(w) = drover_net::tls::expiry_warning(
            &format!("the certificate of {identity}"),
            &info,
            unix_now(),
            30,
        )
    {
        warn!(%addr, "{w}");
    }
    let mut term = None;
    let mut warning = None;
    let mut revision = None;
    let scope = client_scope(&conn, &identity);
    let checked = conn::check_hello(&hello, &identity, API_VERSION, &software())
        .and_then(|()| scope.as_ref().map(|_| ()).map_err(Clone::clone))
        .and_then(|()| check_deny_list(&shared, &conn, &identity))
        .and_then(|()| {
            if identity.role == PeerRole::Controller {
                Err(WireError::new(
                    ErrorCode::Forbidden,
                    "a controller certificate cannot connect to a controller",
                ))
            } else {
                Ok(())
            }
        });
    // A dialer that lost the leader this controller still knows (its lease has not
    // expired yet), or that asks during an election, waits for the outcome here rather
    // than be told a leader that is probably gone and ask again: one handshake, and the
    // answer names the successor or, if this controller is it, welcomes the dialer.
    let learning = shared.gate.as_ref().is_some_and(|g| g.learning_leader());
    let mut hold_until = match (&shared.gate, hello.lost_term) {
        (Some(gate), lost) if lost.is_some() || learning => {
            let wait = responder
                .dialer_timeout()
                .unwrap_or(shared.transport.hello_timeout)
                * 3
                / 5;
            Some(tokio::time::Instant::now() + wait.min(gate.lease() * 2))
        }
        _ => None,
    };
    let check = loop {
        let news = shared.gate.as_ref().map(|g| g.subscribe());
        let check = checked.clone().and_then(|()| match &shared.gate {
            // A leader cut off from etcd still answers clients (with a warning), but
            // takes no agent: it may not lead any more, and the agent should find the
            // one that does.
            Some(gate) if identity.role == PeerRole::Client => gate
                .answering()
                .map(|(token, w)| {
                    term = Some(token);
                    warning = w;
                })
                .map_err(|m| WireError::new(ErrorCode::Unavailable, m)),
            Some(gate) => gate
                .serving()
                .map(|(token, r)| {
                    term = Some(token);
                    revision = Some(r);
                })
                .map_err(|m| WireError::new(ErrorCode::Unavailable, m)),
            None => Ok(()),
        });
        if checked.is_ok()
            && check.is_err()
            && let (Some(gate), Some(until), Some(mut news)) = (&shared.gate, hold_until, news)
            && hello
                .lost_term
                .map_or_else(|| gate.learning_leader(), |lost| gate.holds(lost))
        {
            tokio::select! {
                _ = news.changed() => {}
                // One more look, then the answer.
                () = tokio::time::sleep_until(until) => hold_until = None,
                _ = conn.closed() => return,
            }
            continue;
        }
        break check;
    };
    // An agent is admitted (and registered) last, once nothing else refuses it.
    let mut moved = false;
    let check = match check {
        Ok(()) if identity.role == PeerRole::Agent => {
            admit_agent(&shared, &identity.name, &conn, None)
                .await
                .map(|m| moved = m)
                .map_err(|message| {
                    shared.emit(Event::Error {
                        message: format!("{message}; refused another connection from {addr}"),
                    });
                    WireError::new(ErrorCode::Unavailable, message)
                })
        }
        other => other,
    };
    if let Err(e) = check {
        if shared.gate.is_some() && e.message.starts_with("not the leader") {
            // Every dialer tries every controller of the group: not worth a warning.
            debug!(%addr, peer = %identity, "refused connection: {}", e.message);
        } else {
            warn!(%addr, peer = %identity, "refused connection: {}", e.message);
        }
        responder.refuse(e).await;
        return;
    }
    if identity.role == PeerRole::Client {
        conn.set_max_concurrent_bi_streams(shared.client_streams.into());
    }
    let welcome = Welcome {
        api_version: API_VERSION,
        name: shared.name.clone(),
        software: software(),
        warning,
        term: revision,
    };
    if let Err(e) = responder.welcome(welcome).await {
        warn!(%addr, peer = %identity, "hello failed: {e}");
        if identity.role == PeerRole::Agent {
            shared.registry.remove_if_same(&identity.name, &conn);
        }
        return;
    }
    if let Some(term) = term {
        // A leader that steps down closes its term's connections; the peers dial again
        // and are pointed at the new leader.
        let conn = conn.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = term.cancelled() => {
                    // Long enough for the answer to a request that found out (a write
                    // etcd refused) to leave.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    conn.close(drover_net::peers::CLOSE_LET_GO.into(), b"controller stepped down: not the leader any more");
                }
                _ = conn.closed() => {}
            }
        });
    }
    match identity.role {
        PeerRole::Agent => serve_agent(shared, conn, identity.name, hello.software, moved).await,
        PeerRole::Client => {
            // Refused above when unreadable; the least scope is the safe fallback.
            let scope = scope.unwrap_or(Scope::Viewer);
            serve_client(shared, conn, identity, scope).await;
        }
        PeerRole::Controller => unreachable!("refused above"),
    }
}

/// How long an agent's registered connection has to answer when another connection
/// claims its name: long enough for a busy agent (the answer does not wait for its
/// supervisor), short enough that a genuine reconnect after a network change wins
/// within a second.
const LIVENESS_PROBE: Duration = Duration::from_millis(500);

/// Decides whether `conn` may become agent `name`'s connection: yes when none is
/// registered; when one is, it is asked whether it is there ([`LIVENESS_PROBE`]).
/// `Ok(true)` when the agent moves to `conn` from its registered connection itself
/// (it answered `HandingOver`).
/// If it answers, a second process holds this agent's certificate and `conn` is refused
/// (the message says so), so that two agents never take turns being connected and
/// every node does not run twice. If it does not answer, it is a connection whose end
/// the controller has not noticed yet (the agent restarted, its network changed): it is
/// closed and `conn` wins.
pub(crate) async fn admit_agent(
    shared: &Shared,
    name: &str,
    conn: &quinn::Connection,
    dialled_port: Option<u16>,
) -> Result<bool, String> {
    // Registering is a compare-and-set against what was probed, so two connections
    // admitted at once cannot both end up registered: the loser looks again.
    loop {
        let Some(old) = shared.registry.get(name) else {
            if shared
                .registry
                .register(name, conn.clone(), dialled_port, None)
            {
                return Ok(false);
            }
            continue;
        };
        if old.stable_id() == conn.stable_id() {
            return Ok(false);
        }
        let old_addr = old.remote_address();
        let probe =
            conn::call::<_, AgentResponse>(&old, &ControllerRequest::Ping, LIVENESS_PROBE).await;
        match probe {
            // The agent itself moves to this connection (it reloaded its certificates):
            // it closes the old one once its requests are answered.
            Ok(AgentResponse::HandingOver) => {
                if shared
                    .registry
                    .register(name, conn.clone(), dialled_port, Some(old.stable_id()))
                {
                    info!(
                        agent = %name,
                        "agent '{name}' moves from its connection from {old_addr} to a new one from {}",
                        conn.remote_address()
                    );
                    return Ok(true);
                }
            }
            // A process that stands by, with its nodes stopped, gives way to the one that
            // claims the name now (which probably runs them): a controller restart does
            // not move the nodes to whichever process happened to dial first.
            Ok(AgentResponse::StandingBy) => {
                if shared
                    .registry
                    .register(name, conn.clone(), dialled_port, Some(old.stable_id()))
                {
                    info!(
                        agent = %name,
                        "the connection of agent '{name}' from {old_addr} stands by; a new connection from {} replaces it",
                        conn.remote_address()
                    );
                    old.close(
                        drover_net::peers::CLOSE_LET_GO.into(),
                        drover_proto::msg::REPLACED_STANDING_BY.as_bytes(),
                    );
                    return Ok(false);
                }
            }
            // An error reply (an agent that does not know the request) is an answer too.
            Ok(_) | Err(NetError::Refused(_) | NetError::Protocol(_)) => {
                return Err(drover_proto::msg::already_connected(
                    name,
                    &old_addr.to_string(),
                ));
            }
            Err(e) => {
                if shared
                    .registry
                    .register(name, conn.clone(), dialled_port, Some(old.stable_id()))
                {
                    info!(
                        agent = %name,
                        "the connection of agent '{name}' from {old_addr} does not answer ({e}); a new connection from {} replaces it",
                        conn.remote_address()
                    );
                    old.close(
                        drover_net::peers::CLOSE_LET_GO.into(),
                        b"replaced: it did not answer",
                    );
                    return Ok(false);
                }
            }
        }
    }
}

/// Runs an admitted agent's session ([`admit_agent`] registered it) until its connection
/// ends: re-applying the deployed configuration, status reports, loss. `moved`: the
/// agent came over from its previous connection (a handover), which is no join.
pub(crate) async fn serve_agent(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    name: String,
    software: String,
    moved: bool,
) {
    let addr = conn.remote_address();
    if moved {
        // The agent did not leave: no event, not counted as a connection.
        info!(agent = %name, %addr, "agent '{name}' continues on its new connection from {addr}");
    } else {
        info!(agent = %name, %addr, %software, "agent '{name}' connected from {addr}");
        shared
            .metrics
            .counter(
                "drover_agent_connections_total",
                "Agent connections established.",
                &[],
            )
            .inc();
        shared.emit(Event::AgentJoined {
            instance: name.clone(),
            addr: addr.to_string(),
        });
    }
    // Bring a returning agent up to the desired deploy (Zeek's notify_agents_ready); it
    // restarts nothing that already runs that generation's spec.
    if let Some(desired) = shared.store.desired() {
        let shared = shared.clone();
        let conn = conn.clone();
        let name = name.clone();
        tokio::spawn(async move { api::reapply(&shared, &name, &conn, &desired).await });
    }
    let reporter = shared.clone();
    let instance = name.clone();
    let conn_id = conn.stable_id();
    let handler = move |req: Request<AgentRequest>| {
        let shared = reporter.clone();
        let instance = instance.clone();
        async move {
            match req.body {
                AgentRequest::Status { statuses, full } => {
                    debug!(count = statuses.len(), full, "status report");
                    // A report still on its way over a connection the agent has moved
                    // away from (a handover) is older than what the new one tells.
                    if shared.registry.get(&instance).map(|c| c.stable_id()) != Some(conn_id) {
                        return Ok(AgentResponse::Ack);
                    }
                    let applied = statuses
                        .iter()
                        .any(|s| s.mgmt_role == MgmtRole::Agent && s.generation.is_some());
                    shared.record_report(&instance, conn_id, full, statuses);
                    if applied {
                        api::converge(&shared);
                    }
                    Ok(AgentResponse::Ack)
                }
            }
        }
    };
    let reason = conn::serve(conn.clone(), shared.transport, handler).await;
    if shared.registry.remove_if_same(&name, &conn) {
        let reason = conn::explain(&reason, "agent");
        warn!(agent = %name, %addr, "agent '{name}' lost: {reason}");
        shared
            .metrics
            .counter("drover_agent_losses_total", "Agent connections lost.", &[])
            .inc();
        shared.mark_unknown(&name);
        shared.emit(Event::AgentLost {
            instance: name.clone(),
            reason,
        });
    }
}

/// A client's scope from its certificate (`admin` when it carries none); an unreadable
/// or unknown scope refuses the client. Not a client: unused, `admin`.
fn client_scope(conn: &quinn::Connection, identity: &Identity) -> Result<Scope, WireError> {
    if identity.role != PeerRole::Client {
        return Ok(Scope::Admin);
    }
    drover_net::scope::peer_scope(conn)
        .map(|s| s.unwrap_or(Scope::Admin))
        .map_err(|e| WireError::new(ErrorCode::Forbidden, e.to_string()))
}

async fn serve_client(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    identity: Identity,
    scope: Scope,
) {
    debug!(client = %identity.name, addr = %conn.remote_address(), %scope, "client connected");
    // A client following here (`logs -f`, `monitor`) would wait for agents that went to
    // another leader: let go of it too, so that it looks for them there. Dialling
    // again, it prefers a controller that does not warn of a stale term.
    let mut let_go = shared.let_go.subscribe();
    let_go.mark_unchanged();
    let closing = conn.clone();
    tokio::spawn(async move {
        tokio::select! {
            changed = let_go.changed() => {
                if changed.is_ok() {
                    let why = let_go.borrow().1;
                    // As for a term's end: answers under way leave first.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    closing.close(drover_net::peers::CLOSE_LET_GO.into(), why);
                }
            }
            _ = closing.closed() => {}
        }
    });
    let caller = Arc::new(audit::Caller {
        role: identity.role,
        name: identity.name,
        serial: drover_net::tls::peer_cert_info(&conn)
            .map(|i| i.serial)
            .unwrap_or_default(),
        scope,
        addr: conn.remote_address(),
        front: "native",
    });
    let settings = shared.transport;
    let gate = shared.gate.clone();
    let handler = move |req: Request<ClientRequest>| {
        let shared = shared.clone();
        let caller = caller.clone();
        async move {
            let kind = req.body.kind();
            let started = std::time::Instant::now();
            let answer = api::handle_as(&shared, &caller, req).await;
            shared
                .metrics
                .counter(
                    "drover_requests_total",
                    "Client requests by type.",
                    &[("request", kind)],
                )
                .inc();
            shared
                .metrics
                .histogram(
                    "drover_request_duration_seconds",
                    "Time to answer client requests (streams: to the first reply).",
                    &[("request", kind)],
                )
                .observe(started.elapsed());
            answer
        }
    };
    // Every answer of a leader cut off from etcd says that it may be stale.
    let gate = gate.clone();
    let warning = move || gate.as_ref().and_then(|g| g.stale());
    let _ = conn::serve_answers_warned(conn, settings, handler, warning).await;
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Refuses revoked peers of the QUIC endpoint (see [`check_revoked`]).
fn check_deny_list(
    shared: &Shared,
    conn: &quinn::Connection,
    identity: &Identity,
) -> Result<(), WireError> {
    if shared.trust.deny().is_empty() {
        return Ok(());
    }
    let info = drover_net::tls::peer_cert_info(conn)
        .map_err(|e| WireError::new(ErrorCode::Forbidden, e.to_string()))?;
    check_revoked(shared, identity, &info)
}

/// Refuses a peer the deny list in force names, by identity or certificate serial.
pub(crate) fn check_revoked(
    shared: &Shared,
    identity: &Identity,
    info: &drover_net::tls::CertInfo,
) -> Result<(), WireError> {
    if shared.trust.deny().denies(identity, info) {
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

/// Name and version of this build, as told to peers.
pub fn software() -> String {
    format!("drover-controller {}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use drover_proto::model::{Configuration, Instance, Node};

    use super::*;

    fn deploy(generation: u64, nodes: &[(&str, &str)]) -> Arc<store::Deploy> {
        let mut config = Configuration::empty();
        config.instances = ["a", "b"]
            .iter()
            .map(|name| Instance {
                name: (*name).into(),
                host: None,
                port: None,
            })
            .collect();
        config.nodes = nodes.iter().map(|&(n, i)| Node::new(n, i)).collect();
        Arc::new(store::Deploy {
            generation,
            config,
            restart_since: 0,
            by: None,
            trail: None,
        })
    }

    #[test]
    fn a_reapplied_share_is_the_instances_share_of_the_deploy_of_the_moment() {
        let cache = std::sync::Mutex::default();
        let first = deploy(1, &[("n1", "a"), ("n2", "b"), ("n3", "a")]);
        for name in ["a", "b", "not-an-instance"] {
            assert_eq!(
                DeployShares::share(&cache, &first, name),
                zeek::layout::share_for(&first.config, name),
                "{name}"
            );
        }
        // Another deploy is shared out afresh.
        let second = deploy(2, &[("n1", "b")]);
        assert_eq!(
            DeployShares::share(&cache, &second, "b"),
            zeek::layout::share_for(&second.config, "b")
        );
        assert!(DeployShares::share(&cache, &second, "a").nodes.is_empty());
        assert_eq!(
            DeployShares::share(&cache, &first, "a").nodes.len(),
            2,
            "the first deploy again"
        );
    }
}
