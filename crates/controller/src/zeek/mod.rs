//! The Zeek compatibility front: the unmodified `zeek-client` drives drover's controller.
//!
//! zeek-client speaks Zeek's WebSocket API (Broker's JSON data model, "v1") to
//! `ws://HOST:2149/v1/messages/json`, publishing `Management::Controller::API::*_request`
//! events on `zeek/management/controller` and waiting for the matching `*_response`.
//! This module serves that endpoint (off unless `--zeek-websocket ADDR:PORT`) and maps
//! every request onto the controller's own API ([`crate::api`]), whose results already
//! have Zeek's shape and error strings.
//!
//! - [`broker`]: the data model and messages (pure).
//! - [`records`]: Zeek's Management records to and from drover's model (pure).
//! - [`events`]: request events in, response events out (pure).
//! - [`roles`]: command templates and node defaults for Zeek-style nodes, which name
//!   no program (`--zeek-roles FILE`).
//! - [`layout`]: what Zeek's Supervisor gives each cluster node (`CLUSTER_NODE` and the
//!   `Cluster::nodes` layout), added to the nodes of Zeek clusters when they are sent to
//!   agents, whichever client deployed them.
//! - [`front`]: the WebSocket server, `ws://` or, with `--zeek-websocket-tls`, `wss://`
//!   with mutual TLS (a client certificate from the cluster CA, role client).
//!
//! As on Zeek's controller, a deploy of a new configuration restarts every node and
//! lists every node in its results (`--zeek-deploy changed` restarts only the nodes
//! whose spec changed); get-nodes lists the controller under the instance on its host;
//! an agent that does not answer a deploy or restart in time is one `request timed out`
//! of the controller's. Ports are assigned by [`drover_proto::ports`] for both fronts.
//!
//! Where drover differs from Zeek's controller:
//! - The controller's get-nodes entry carries its own port, not the agent's (Zeek's
//!   shows the agent port, a known quirk), and appears only when an agent connects from
//!   the controller's host.
//! - A deploy to instances whose agents dial in and are not connected fails at once
//!   with `instances not connected: …` instead of Zeek's `request timed out` after
//!   10 s; agents the controller dials are waited for, as in Zeek.
//! - get-id-value asks drover's nodes through the query protocol of
//!   `crates/testprog/QUERY-PROTOCOL.md`; a node's `unknown identifier 'X'` becomes
//!   Zeek's `unknown id`, other node errors pass through as the node wrote them.
//! - `wss://` requires a client certificate (zeek-client's `ssl.certificate`); Zeek's
//!   anonymous TLS (`ssl.enable` alone) is refused.
//! - Requests are held to a client scope as on the native protocol (stage and deploy
//!   need `admin`, restart `operator`), refused with an error result naming the scope
//!   needed, and those that change something are written to the audit trail. On
//!   `wss://` a client acts with its certificate's scope, at most `--zeek-scope`; on
//!   `ws://`, which has no client identity, every client acts as `zeek-client` with
//!   `--zeek-scope` (default `admin`, as Zeek's own controller).

pub(crate) mod broker;
pub(crate) mod events;
pub(crate) mod front;
pub(crate) mod layout;
pub(crate) mod records;
pub(crate) mod roles;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_net::Credentials;
use drover_net::conn::Answer;
use drover_net::tls::{TcpTlsAcceptor, TlsPeer};
use drover_proto::access::Scope;
use drover_proto::model::{Configuration, MgmtResult, MgmtRole, ResultData};
use drover_proto::msg::{ClientRequest, ClientResponse, PeerRole, Request};
use tokio_util::sync::CancellationToken;

use self::broker::Event;
use self::events::ZeekRequest;
use self::roles::Roles;
use crate::Shared;
use crate::audit::Caller;

/// Zeek's WebSocket port for the controller.
pub const DEFAULT_PORT: u16 = 2149;

/// Why the Zeek front cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket.
    #[error("cannot listen for zeek-client on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The certificate for `wss://`.
    #[error("cannot serve zeek-client over tls: {0}")]
    Tls(#[from] drover_net::NetError),
    /// The roles file.
    #[error("zeek roles file {}: {message}", path.display())]
    Roles {
        /// The file.
        path: PathBuf,
        /// What is wrong: its problems, each on a line of its own with the file's
        /// name and its line, or why it cannot be read.
        message: String,
    },
}

/// What a deploy through zeek-client restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeployMode {
    /// As Zeek: every node of a configuration with a new id (a configuration already
    /// deployed restarts nothing, as Zeek's agents skip a configuration they run).
    #[default]
    RestartAll,
    /// As drover's own CLI: only nodes whose spec changed.
    Changed,
}

impl std::str::FromStr for DeployMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "restart-all" => Ok(Self::RestartAll),
            "changed" => Ok(Self::Changed),
            other => Err(format!(
                "unknown zeek deploy mode '{other}': expected restart-all or changed"
            )),
        }
    }
}

/// A bound, not yet serving, Zeek front.
#[derive(Debug)]
pub struct Front {
    listener: std::net::TcpListener,
    roles: Roles,
    tls: Option<TcpTlsAcceptor>,
    deploy: DeployMode,
    scope: Scope,
}

impl Front {
    /// Reads the roles file and binds the listener, so that both fail at start-up.
    /// With `tls`, the front serves `wss://` with those credentials and requires a
    /// client certificate from their CA.
    pub fn bind(
        addr: SocketAddr,
        roles: Option<&Path>,
        tls: Option<&Credentials>,
        deploy: DeployMode,
        scope: Scope,
    ) -> Result<Self, Error> {
        let tls = tls.map(TcpTlsAcceptor::new).transpose()?;
        let roles = match roles {
            Some(path) => Roles::load(path).map_err(|message| Error::Roles {
                path: path.to_owned(),
                message,
            })?,
            None => Roles::default(),
        };
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| Error::Bind { addr, source })?;
        Ok(Self {
            listener,
            roles,
            tls,
            deploy,
            scope,
        })
    }

    /// Reads a roles file given without the front that uses it: a bad one is found at
    /// start-up, not when the front is turned on later.
    pub fn check_roles(path: &Path) -> Result<(), Error> {
        Roles::load(path).map(drop).map_err(|message| Error::Roles {
            path: path.to_owned(),
            message,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves zeek-client in a task of its own until `shutdown`.
    pub(crate) fn spawn(self, shared: Arc<Shared>, shutdown: CancellationToken) {
        let listener = match tokio::net::TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cannot serve zeek-client: {e}");
                return;
            }
        };
        if let Ok(addr) = listener.local_addr() {
            front::announce(addr, self.tls.is_some(), self.scope);
        }
        let tls = self.tls.map(|acceptor| {
            let shared = shared.clone();
            let authorize: front::Authorize =
                Arc::new(move |peer: &TlsPeer, addr, ended: CancellationToken| {
                    if peer.identity.role != PeerRole::Client {
                        return Err(format!(
                            "{} is not a client: zeek-client needs a client certificate",
                            peer.identity
                        ));
                    }
                    // Tracked before the check, so that a reload meanwhile is not missed.
                    let tracked = shared
                        .trust
                        .peers()
                        .track_accepted(peer.chain.clone(), addr, move |_| ended.cancel())
                        .map_err(|e| e.to_string())?;
                    crate::check_revoked(&shared, &peer.identity, &peer.cert)
                        .map_err(|e| e.message)?;
                    Ok(tracked)
                });
            front::Tls {
                acceptor,
                authorize,
            }
        });
        let roles: Vec<&str> = self.roles.names().collect();
        tracing::debug!(?roles, "zeek role templates");
        let endpoint = drover_proto::model::new_id();
        let roles = Arc::new(self.roles);
        let deploy = self.deploy;
        let ceiling = self.scope;
        let handler: front::Handler = Arc::new(move |client, reqid, req| {
            let shared = shared.clone();
            let roles = roles.clone();
            let caller = caller(&client, ceiling);
            Box::pin(async move { answer(&shared, &caller, &roles, deploy, reqid, req).await })
        });
        tokio::spawn(front::serve(
            listener,
            front::Limits::default(),
            endpoint,
            crate::software(),
            handler,
            tls,
            shutdown,
        ));
    }
}

/// Who a zeek-client is: its certificate's identity and scope (at most `ceiling`) on
/// `wss://`; `zeek-client` with scope `ceiling` on `ws://`.
fn caller(client: &front::Client, ceiling: Scope) -> Caller {
    match &client.tls {
        Some(peer) => Caller {
            role: peer.identity.role,
            name: peer.identity.name.clone(),
            serial: peer.cert.serial.clone(),
            scope: peer.scope.unwrap_or(Scope::Admin).min(ceiling),
            addr: client.addr,
            front: "zeek",
        },
        None => Caller {
            role: PeerRole::Client,
            name: "zeek-client".to_owned(),
            serial: String::new(),
            scope: ceiling,
            addr: client.addr,
            front: "zeek",
        },
    }
}

/// The native request a Zeek request that changes something becomes, by kind, and the
/// scope it needs.
fn needs(req: &ZeekRequest) -> Option<(&'static str, Scope)> {
    match req {
        ZeekRequest::StageConfiguration(_) | ZeekRequest::StageRefused(_) => {
            Some(("stage_config", Scope::Admin))
        }
        ZeekRequest::Deploy => Some(("deploy", Scope::Admin)),
        ZeekRequest::Restart { .. } => Some(("restart", Scope::Operator)),
        _ => None,
    }
}

/// An error response to `req`.
fn error_response(reqid: &str, req: &ZeekRequest, message: String) -> Event {
    let results = vec![MgmtResult::err(reqid, message)];
    events::response(reqid, req, ClientResponse::Results(results))
}

/// Runs one request through the controller's API; `None` when Zeek sends no response
/// (`test_timeout_request` without state, `test_noop_request`).
async fn answer(
    shared: &Arc<Shared>,
    caller: &Caller,
    roles: &Roles,
    deploy: DeployMode,
    reqid: String,
    req: ZeekRequest,
) -> Option<Event> {
    // Refused before anything else is looked at (a staged configuration's templates, a
    // deploy's wait for agents).
    if let Some((what, need)) = needs(&req)
        && caller.scope < need
    {
        // Over ws:// there is no certificate: the front's scope is what counts.
        let whose = if caller.serial.is_empty() {
            "the front's --zeek-scope"
        } else {
            "its certificate's scope, at most the front's --zeek-scope"
        };
        let message = format!(
            "{} needs scope {need}; this zeek-client connection has scope {} ({whose})",
            what.replace('_', "-"),
            caller.scope
        );
        let args = match &req {
            ZeekRequest::StageConfiguration(z) => format!("config {}", z.id),
            ZeekRequest::Restart { nodes } => crate::audit::args(&ClientRequest::Restart {
                nodes: nodes.clone(),
                batch: None,
                progress: false,
            }),
            _ => String::new(),
        };
        let error = crate::api::refuse(shared, caller, what, args, message).await;
        return Some(error_response(&reqid, &req, error.message));
    }
    let restart = matches!(req, ZeekRequest::Restart { .. });
    let (req, unknown) = match literal_nodes(shared, &reqid, req) {
        Ok(split) => split,
        Err(unknown) => {
            if restart {
                let message = "no node of the deployed configuration named".to_owned();
                crate::api::record_failure(shared, caller, "restart", message).await;
            }
            return Some(unknown);
        }
    };
    let body = match &req {
        ZeekRequest::GetInstances => ClientRequest::GetInstances,
        ZeekRequest::StageConfiguration(z) => match roles.configuration(z.clone()) {
            Ok(config) => ClientRequest::StageConfig {
                config: Box::new(config),
            },
            Err(errors) => {
                crate::api::record_failure(shared, caller, "stage_config", errors.join("; ")).await;
                let results = errors
                    .into_iter()
                    .map(|e| MgmtResult::err(&reqid, e))
                    .collect();
                return Some(events::response(
                    &reqid,
                    &req,
                    ClientResponse::Results(results),
                ));
            }
        },
        ZeekRequest::StageRefused(error) => {
            crate::api::record_failure(shared, caller, "stage_config", error.clone()).await;
            return Some(error_response(&reqid, &req, error.clone()));
        }
        ZeekRequest::GetConfiguration { deployed } => ClientRequest::GetConfig {
            deployed: *deployed,
        },
        ZeekRequest::Deploy => ClientRequest::Deploy {
            restart_all: deploy == DeployMode::RestartAll && is_new(shared),
            expect_id: None,
            expect_stage: None,
            // Zeek's controller times a deploy out as a whole.
            progress: false,
        },
        ZeekRequest::GetNodes => ClientRequest::GetNodes { fresh: true },
        ZeekRequest::GetIdValue { id, nodes } => ClientRequest::GetIdValue {
            id: id.clone(),
            nodes: nodes.clone(),
        },
        // As Zeek's: within the request timeout, one answer.
        ZeekRequest::Restart { nodes } => ClientRequest::Restart {
            nodes: nodes.clone(),
            batch: None,
            progress: false,
        },
        ZeekRequest::TestTimeout { with_state: true } => {
            ClientRequest::TestTimeout { with_state: true }
        }
        ZeekRequest::TestTimeout { with_state: false } | ZeekRequest::TestNoop => return None,
    };
    // A follower of a high-availability group answers every request with the leader's
    // address rather than forwarding it: zeek-client is pointed at the leader.
    // A leader cut off from etcd answers reads (Zeek's result records have no room for
    // a warning; its log says so) and refuses changes (in `api::handle_as`).
    if let Some(gate) = &shared.gate
        && let Err(refusal) = gate.answering()
    {
        let result = MgmtResult::err(&reqid, refusal);
        return Some(events::response(
            &reqid,
            &req,
            ClientResponse::Results(vec![result]),
        ));
    }
    shared
        .metrics
        .counter(
            "drover_zeek_requests_total",
            "Requests from zeek-client by type.",
            &[("request", req.kind())],
        )
        .inc();
    if matches!(req, ZeekRequest::Deploy)
        && let Some(staged) = shared.store.staged()
    {
        // Pending from now, as on Zeek's controller: a second deploy while this one
        // waits for its agents is told so at once.
        let pending = match crate::api::Pending::claim(shared, &reqid) {
            Ok(p) => p,
            Err(e) => {
                crate::api::record_failure(shared, caller, "deploy", e.clone()).await;
                return Some(error_response(&reqid, &req, e));
            }
        };
        let deadline = tokio::time::Instant::now() + shared.request_timeout;
        let connected = all_connected(shared, &staged, deadline).await;
        drop(pending);
        if !connected {
            // Zeek's controller sends nothing until every instance of the configuration
            // has checked in, and answers a controller-side timeout after waiting in vain.
            let message =
                "request timed out: not every instance of the staged configuration connected";
            crate::api::record_failure(shared, caller, "deploy", message.to_owned()).await;
            let results = vec![MgmtResult::err(&reqid, "request timed out")];
            return Some(events::response(
                &reqid,
                &req,
                ClientResponse::Results(results),
            ));
        }
    }
    let request = Request {
        id: reqid.clone(),
        timeout_ms: None,
        body,
    };
    let reply = match crate::api::handle_as(shared, caller, request).await {
        Ok(Answer::One(r)) => r,
        Ok(Answer::Stream(mut rx)) => rx.recv().await?,
        Err(e) => return Some(error_response(&reqid, &req, e.message)),
    };
    let reply = match (reply, unknown.is_empty()) {
        (ClientResponse::Results(rs), false) => {
            ClientResponse::Results(unknown.into_iter().chain(rs).collect())
        }
        (reply, _) => reply,
    };
    let reply = match req {
        ZeekRequest::GetNodes => {
            let home = controller_home(shared);
            let dialled = shared
                .store
                .desired_config()
                .map(|c| {
                    // As `dial::ensure` picks the instances it dials.
                    c.instances
                        .iter()
                        .filter(|i| i.host.is_some_and(|h| !h.is_unspecified()))
                        .filter_map(|i| Some((i.name.clone(), i.port?)))
                        .collect()
                })
                .unwrap_or_default();
            zeek_nodes(
                &reqid,
                agent_ports(
                    &dialled,
                    controller_under(
                        &shared.name,
                        home.as_deref(),
                        shared.ports.controller_port,
                        reply,
                    ),
                ),
            )
        }
        ZeekRequest::GetIdValue { .. } => zeek_id_errors(reply),
        ZeekRequest::Deploy | ZeekRequest::Restart { .. } => controller_timeout(&reqid, reply),
        _ => reply,
    };
    Some(events::response(&reqid, &req, reply))
}

/// Waits until every instance of `config` has an agent connected, agents that dial in
/// as well as those the controller dials, or until `deadline`; true when they all have.
async fn all_connected(
    shared: &Arc<Shared>,
    config: &Configuration,
    deadline: tokio::time::Instant,
) -> bool {
    // Subscribe before looking, so that a connection in between is not missed.
    let mut events = shared.events.subscribe();
    crate::dial::ensure(shared, config);
    loop {
        if config
            .instances
            .iter()
            .all(|i| shared.registry.get(&i.name).is_some())
        {
            return true;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) | Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return false,
            Ok(_) => {}
        }
    }
}

/// Whether the staged configuration is not the deployed one: Zeek's agents restart
/// every node for a configuration id they do not run, and nothing for the one they do.
fn is_new(shared: &Shared) -> bool {
    let staged = shared.store.staged().map(|c| c.id);
    staged.is_some() && staged != shared.store.deployed().map(|d| d.config.id.clone())
}

/// The first connected instance (by name) whose agent runs on the controller's host:
/// it connected over loopback, or from the address it reached us at.
fn controller_home(shared: &Shared) -> Option<String> {
    let mut agents = shared.registry.connections();
    agents.sort_by(|a, b| a.0.cmp(&b.0));
    agents.into_iter().find_map(|(name, conn)| {
        let remote = conn.remote_address().ip().to_canonical();
        let local = conn.local_ip().map(|ip| ip.to_canonical());
        (remote.is_loopback() || Some(remote) == local).then_some(name)
    })
}

/// Moves the controller's own get-nodes entry under the instance on its host, with its
/// port, as Zeek lists a controller that shares the agent's Supervisor; without such an
/// instance it is left out, as Zeek leaves out a controller elsewhere.
fn controller_under(
    name: &str,
    home: Option<&str>,
    port: Option<u16>,
    reply: ClientResponse,
) -> ClientResponse {
    let is_controller = |r: &MgmtResult| {
        r.instance.as_deref() == Some(name)
            && matches!(&r.data, Some(ResultData::NodeStatuses(s))
                if s.iter().all(|s| s.mgmt_role == MgmtRole::Controller))
    };
    let ClientResponse::Results(rs) = reply else {
        return reply;
    };
    let (mine, mut rest): (Vec<MgmtResult>, Vec<MgmtResult>) =
        rs.into_iter().partition(is_controller);
    let statuses = mine.into_iter().filter_map(|r| match r.data {
        Some(ResultData::NodeStatuses(s)) => Some(s),
        _ => None,
    });
    let mut me: Vec<_> = statuses.flatten().collect();
    for s in &mut me {
        s.port = port;
    }
    if let Some(target) = rest
        .iter_mut()
        .find(|r| r.instance.as_deref() == home && home.is_some())
        && let Some(ResultData::NodeStatuses(s)) = &mut target.data
    {
        // zeek-client keys an instance's entries by name: a cluster node named as the
        // controller is, keeps its entry.
        me.retain(|m| s.iter().all(|n| n.node != m.node));
        s.extend(me);
    }
    ClientResponse::Results(rest)
}

/// Gives the entry of each agent the controller dials (an instance with a port in the
/// deployed configuration) that port, as Zeek's agent lists its own listening port when
/// the controller connects to it.
fn agent_ports(
    dialled: &std::collections::BTreeMap<String, u16>,
    reply: ClientResponse,
) -> ClientResponse {
    let ClientResponse::Results(mut rs) = reply else {
        return reply;
    };
    for r in &mut rs {
        let (Some(instance), Some(ResultData::NodeStatuses(statuses))) =
            (r.instance.as_deref(), &mut r.data)
        else {
            continue;
        };
        let Some(port) = dialled.get(instance) else {
            continue;
        };
        for s in statuses
            .iter_mut()
            .filter(|s| s.mgmt_role == MgmtRole::Agent && s.node == instance)
        {
            s.port = Some(*port);
        }
    }
    ClientResponse::Results(rs)
}

/// Zeek's node names are literal: in a restart or get-id-value, a name that is no node
/// of the deployed configuration is `unknown cluster node` (drover's selectors and
/// patterns, `role:worker` or `w*`, are its own CLI's). The request with the known names
/// and the errors of the others; the whole response when no name is left. Untouched
/// while there is no deployment (or for a restart, no agent): the controller's answer
/// to that comes first, as on Zeek's.
fn literal_nodes(
    shared: &Shared,
    reqid: &str,
    req: ZeekRequest,
) -> Result<(ZeekRequest, Vec<MgmtResult>), Event> {
    let (ZeekRequest::Restart { nodes } | ZeekRequest::GetIdValue { nodes, .. }) = &req else {
        return Ok((req, Vec::new()));
    };
    let deployed = match shared.store.desired_config() {
        Some(d) if !nodes.is_empty() && !d.instances.is_empty() => d,
        _ => return Ok((req, Vec::new())),
    };
    if matches!(req, ZeekRequest::Restart { .. }) && shared.registry.snapshot().is_empty() {
        return Ok((req, Vec::new()));
    }
    let (known, unknown): (Vec<String>, Vec<String>) = nodes
        .iter()
        .cloned()
        .partition(|n| deployed.node(n).is_some());
    let unknown: Vec<MgmtResult> = unknown
        .into_iter()
        .map(|n| MgmtResult::err(reqid, "unknown cluster node").on_node(n))
        .collect();
    if known.is_empty() {
        return Err(events::response(
            reqid,
            &req,
            ClientResponse::Results(unknown),
        ));
    }
    let req = match req {
        ZeekRequest::Restart { .. } => ZeekRequest::Restart { nodes: known },
        ZeekRequest::GetIdValue { id, .. } => ZeekRequest::GetIdValue { id, nodes: known },
        other => other,
    };
    Ok((req, unknown))
}

/// get-nodes as Zeek's controller answers it: from the agents connected, so deployed
/// instances whose agent is away are left out (with none at all, `no instances
/// connected`); an agent that did not answer, or went while it was asked, is the
/// timeout Zeek's would report, under its instance's name.
fn zeek_nodes(reqid: &str, reply: ClientResponse) -> ClientResponse {
    let ClientResponse::Results(rs) = reply else {
        return reply;
    };
    let rs: Vec<MgmtResult> = rs
        .into_iter()
        .filter(|r| !r.is_not_connected())
        .map(|mut r| {
            if !r.success && r.instance.is_some() && r.node.is_none() {
                r.error = Some("request timed out".to_owned());
            }
            r
        })
        .collect();
    if rs.is_empty() {
        return ClientResponse::Results(vec![MgmtResult::err(reqid, "no instances connected")]);
    }
    ClientResponse::Results(rs)
}

/// An agent that did not answer a deploy or restart in time, or went while it was asked
/// (a lost connection, an agent started again), is, as on Zeek's controller, one
/// `request timed out` without an instance: zeek-client reports it as an error rather
/// than as a result that lacks a node. What drover knows beyond that is in the
/// controller's log, the audit trail and `drover monitor`.
fn controller_timeout(reqid: &str, reply: ClientResponse) -> ClientResponse {
    let ClientResponse::Results(rs) = reply else {
        return reply;
    };
    let late = |r: &MgmtResult| !r.success && r.node.is_none() && r.instance.is_some();
    for r in rs.iter().filter(|r| late(r)) {
        tracing::info!(
            instance = r.instance.as_deref().unwrap_or_default(),
            "zeek-client told 'request timed out' for: {}",
            r.error.as_deref().unwrap_or_default()
        );
    }
    let timed_out = rs.iter().any(late);
    // Zeek's controller answers a timed-out request with the timeout alone: drover's
    // own whole-request error (the deploy is not acknowledged yet) says the same.
    let whole = |r: &MgmtResult| !r.success && r.node.is_none() && r.instance.is_none();
    let mut rs: Vec<MgmtResult> = rs
        .into_iter()
        .filter(|r| !(late(r) || (timed_out && whole(r))))
        .collect();
    if timed_out {
        rs.push(MgmtResult::err(reqid, "request timed out"));
    }
    ClientResponse::Results(rs)
}

/// A node's "unknown identifier 'X'" (drover's query protocol) is Zeek's "unknown id".
fn zeek_id_errors(reply: ClientResponse) -> ClientResponse {
    match reply {
        ClientResponse::Results(mut rs) => {
            for r in &mut rs {
                if r.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("unknown identifier '"))
                {
                    r.error = Some("unknown id".to_owned());
                }
            }
            ClientResponse::Results(rs)
        }
        other => other,
    }
}

/// Entry points for the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::broker::{self, Data};
    use super::events::ZeekRequest;
    use super::roles::Roles;
    use super::{front, layout, records};

    /// Everything the front does with one text message from a client before the
    /// controller's API sees it, checking what must hold; panics only on a bug:
    /// - as the subscription that opens a connection;
    /// - as a data message: decoded, encoded and decoded again, the same value;
    /// - as a request (the front's decoding); a staged configuration is converted,
    ///   validated and laid out, and a valid one reads back the same through
    ///   get-config's encoding.
    pub fn websocket_message(text: &str) {
        let _ = broker::parse_handshake(text);
        if let Ok((topic, data)) = broker::parse_data_message(text) {
            let again = broker::data_message(&topic, &data);
            let back = broker::parse_data_message(&again)
                .unwrap_or_else(|e| panic!("{again} does not decode: {e}"));
            assert!(
                same(&back.1, &data) && back.0 == topic,
                "{text} -> {again} -> {back:?}"
            );
            if let Ok(ev) = broker::Event::from_data(&data) {
                let _ = super::events::decode(&ev);
            }
        }
        if let Ok(Some((_, ZeekRequest::StageConfiguration(z)))) = front::incoming(text) {
            let _ = staged(z);
        }
    }

    /// Equality, with NaN equal to itself (JSON has none, but be safe).
    fn same(a: &Data, b: &Data) -> bool {
        match (a, b) {
            (Data::Real(x), Data::Real(y)) => x == y || (x.is_nan() && y.is_nan()),
            (Data::Vector(x), Data::Vector(y)) | (Data::Set(x), Data::Set(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
            }
            (Data::Table(x), Data::Table(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
            }
            _ => a == b,
        }
    }

    /// Templates for Zeek's four roles, so staged configurations can be valid.
    fn roles() -> &'static Roles {
        static ROLES: std::sync::OnceLock<Roles> = std::sync::OnceLock::new();
        ROLES.get_or_init(|| {
            Roles::parse_named(
                "fuzzing-roles.toml",
                "[roles.manager]\ncommand = [\"zeek\"]\n\
                 [roles.logger]\ncommand = [\"zeek\"]\n\
                 [roles.proxy]\ncommand = [\"zeek\"]\n\
                 [roles.worker]\ncommand = [\"zeek\", \"-i\", \"{interface}\"]\n",
            )
            .unwrap_or_else(|e| panic!("the fuzzing roles: {e}"))
        })
    }

    /// Converts, validates and lays out a staged configuration; true when it was valid
    /// and so also went through the get-config round trip.
    pub(super) fn staged(z: records::ZeekConfig) -> bool {
        let roles = roles();
        let Ok(config) = roles.configuration(z) else {
            return false;
        };
        let _ = layout::layout(&config);
        if !drover_proto::config::validate(&config).is_empty() {
            return false;
        }
        let data = records::configuration(&config);
        let z = records::parse_configuration(&data)
            .unwrap_or_else(|e| panic!("{config:?} does not read back: {e}"));
        let back = roles
            .configuration(z)
            .unwrap_or_else(|e| panic!("{config:?} does not convert back: {e:?}"));
        assert_eq!(back, config, "get-config changes a staged configuration");
        true
    }
}

#[cfg(test)]
mod tests {
    use drover_proto::model::{NodeStatus, State};

    use super::*;

    #[test]
    fn the_fuzzing_entry_takes_what_clients_send() {
        let seed = include_str!("../../../../fuzz/corpus/zeek_ws/stage_configuration_request.json");
        for text in [
            seed,
            include_str!("testdata/deploy_response.json"),
            include_str!("testdata/get_nodes_response.json"),
            r#"["zeek/management/controller"]"#,
            "",
            "{",
            r#"{"type":"data-message","topic":"t","@data-type":"real","data":1e300}"#,
            r#"{"type":"data-message","topic":"t","@data-type":"port","data":"0/unknown"}"#,
        ] {
            fuzzing::websocket_message(text);
        }
        // The seed is a valid configuration once it has templates, so the fuzzer gets
        // to the get-config round trip.
        let Ok(Some((_, ZeekRequest::StageConfiguration(z)))) = front::incoming(seed) else {
            panic!("the seed is a stage request");
        };
        assert_eq!(z.nodes.len(), 2);
        assert!(fuzzing::staged(z), "the seed is valid with templates");
    }

    fn nodes_reply() -> ClientResponse {
        let me = NodeStatus::new("ctl", State::Running, MgmtRole::Controller);
        let a = NodeStatus::new("a", State::Running, MgmtRole::Agent);
        let b = NodeStatus::new("b", State::Running, MgmtRole::Agent);
        ClientResponse::Results(vec![
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![a]))).on_instance("a"),
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![b]))).on_instance("b"),
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![me]))).on_instance("ctl"),
        ])
    }

    fn names(r: &MgmtResult) -> Vec<(String, Option<u16>)> {
        match &r.data {
            Some(ResultData::NodeStatuses(s)) => {
                s.iter().map(|s| (s.node.clone(), s.port)).collect()
            }
            _ => Vec::new(),
        }
    }

    #[test]
    fn get_nodes_lists_the_controller_under_its_host() {
        let ClientResponse::Results(rs) =
            controller_under("ctl", Some("b"), Some(2150), nodes_reply())
        else {
            panic!("results stay results");
        };
        assert_eq!(rs.len(), 2);
        assert_eq!(names(&rs[0]), vec![("a".to_owned(), None)]);
        assert_eq!(
            names(&rs[1]),
            vec![("b".to_owned(), None), ("ctl".to_owned(), Some(2150))]
        );
        // No instance on the controller's host: left out, as Zeek does.
        let ClientResponse::Results(rs) = controller_under("ctl", None, Some(2150), nodes_reply())
        else {
            panic!("results stay results");
        };
        assert_eq!(rs.len(), 2);
        assert!(rs.iter().all(|r| names(r).iter().all(|(n, _)| n != "ctl")));
    }

    /// An agent the controller dials lists its port, as Zeek's agent does when the
    /// controller connects to it; one that dials in lists none.
    #[test]
    fn get_nodes_gives_a_dialled_agent_its_port() {
        let dialled = [("b".to_owned(), 2151)].into_iter().collect();
        let ClientResponse::Results(rs) = agent_ports(&dialled, nodes_reply()) else {
            panic!("results stay results");
        };
        assert_eq!(names(&rs[0]), vec![("a".to_owned(), None)]);
        assert_eq!(names(&rs[1]), vec![("b".to_owned(), Some(2151))]);
        assert_eq!(names(&rs[2]), vec![("ctl".to_owned(), None)]);
    }

    #[test]
    fn an_agent_that_did_not_answer_is_one_controller_timeout() {
        let reply = ClientResponse::Results(vec![
            MgmtResult::ok("a1", None).on_instance("a").on_node("n1"),
            MgmtResult::err("r", "request timed out").on_instance("b"),
            MgmtResult::err("r", "request timed out").on_instance("c"),
            MgmtResult::err("a1", "request timed out")
                .on_instance("a")
                .on_node("n2"),
        ]);
        let ClientResponse::Results(rs) = controller_timeout("r", reply) else {
            panic!("results stay results");
        };
        assert_eq!(rs.len(), 3);
        assert_eq!(rs[1].node.as_deref(), Some("n2"), "node results stay");
        let last = &rs[2];
        assert!(!last.success && last.instance.is_none() && last.node.is_none());
        assert_eq!(last.error.as_deref(), Some("request timed out"));
        // An agent lost under the request, and drover's own whole-request error: one
        // timeout of the controller's, no result without a node.
        let reply = ClientResponse::Results(vec![
            MgmtResult::ok("a1", None).on_instance("a").on_node("n1"),
            MgmtResult::err(
                "r",
                "no answer from peer 127.0.0.1:1 within the idle timeout",
            )
            .on_instance("b"),
            MgmtResult::err("r", "configuration 'x' (generation 3) is not deployed yet"),
        ]);
        let ClientResponse::Results(rs) = controller_timeout("r", reply) else {
            panic!("results stay results");
        };
        assert_eq!(rs.len(), 2, "{rs:?}");
        assert_eq!(rs[0].node.as_deref(), Some("n1"));
        assert_eq!(rs[1].error.as_deref(), Some("request timed out"));
        assert!(rs[1].instance.is_none());
    }

    #[test]
    fn get_nodes_leaves_out_away_agents_as_zeeks_controller_asks_only_those_it_has() {
        let away = |i: &str| MgmtResult::err("r", crate::api::not_connected(i)).on_instance(i);
        let reply = ClientResponse::Results(vec![
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![]))).on_instance("a"),
            away("b"),
            MgmtResult::err(
                "r",
                "no answer from peer 127.0.0.1:1 within the idle timeout",
            )
            .on_instance("c"),
        ]);
        let ClientResponse::Results(rs) = zeek_nodes("r", reply) else {
            panic!("results stay results");
        };
        let seen: Vec<_> = rs
            .iter()
            .map(|r| (r.instance.as_deref(), r.error.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [(Some("a"), None), (Some("c"), Some("request timed out"))]
        );
        let ClientResponse::Results(rs) = zeek_nodes("r", ClientResponse::Results(vec![away("b")]))
        else {
            panic!("results stay results");
        };
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].error.as_deref(), Some("no instances connected"));
        assert!(rs[0].instance.is_none());
    }

    #[test]
    fn a_cluster_node_named_as_the_controller_keeps_its_entry() {
        let mut node = NodeStatus::new("ctl", State::Running, MgmtRole::None);
        node.pid = Some(7);
        let me = NodeStatus::new("ctl", State::Running, MgmtRole::Controller);
        let reply = ClientResponse::Results(vec![
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![node]))).on_instance("b"),
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![me]))).on_instance("ctl"),
        ]);
        let ClientResponse::Results(rs) = controller_under("ctl", Some("b"), Some(2150), reply)
        else {
            panic!("results stay results");
        };
        let Some(ResultData::NodeStatuses(s)) = &rs[0].data else {
            panic!("statuses");
        };
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].mgmt_role, s[0].pid), (MgmtRole::None, Some(7)));
    }
}
