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
//! - [`front`]: the WebSocket server.
//!
//! Where drover differs from Zeek's controller:
//! - get-nodes does not list the controller: drover's runs on its own, like a Zeek
//!   controller outside the agent's Supervisor tree, which Zeek does not list either.
//! - A deploy restarts only the nodes whose spec changed (Zeek restarts every node of a
//!   new configuration id), and its results list only those nodes.
//! - Broker and metrics ports are not auto-assigned: nodes get the ports they were given.
//! - A deploy to instances whose agents are not connected fails at once with
//!   `instances not connected: …` instead of Zeek's `request timed out` after 10 s.
//! - get-id-value asks drover's nodes through the query protocol of
//!   `crates/testprog/QUERY-PROTOCOL.md`; a node's `unknown identifier 'X'` becomes
//!   Zeek's `unknown id`, other node errors pass through as the node wrote them.
//! - Only `ws://`: no TLS (zeek-client's `ssl.enable` cannot be used).

pub(crate) mod broker;
pub(crate) mod events;
pub(crate) mod front;
pub(crate) mod records;
pub(crate) mod roles;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_net::conn::Answer;
use drover_proto::model::{MgmtResult, MgmtRole, ResultData};
use drover_proto::msg::{ClientRequest, ClientResponse, Request};
use tokio_util::sync::CancellationToken;

use self::broker::Event;
use self::events::ZeekRequest;
use self::roles::Roles;
use crate::Shared;

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
    /// The roles file.
    #[error("zeek roles file {path}: {message}")]
    Roles {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A bound, not yet serving, Zeek front.
#[derive(Debug)]
pub struct Front {
    listener: std::net::TcpListener,
    roles: Roles,
}

impl Front {
    /// Reads the roles file and binds the listener, so that both fail at start-up.
    pub fn bind(addr: SocketAddr, roles: Option<&Path>) -> Result<Self, Error> {
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
        Ok(Self { listener, roles })
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
            front::announce(addr);
        }
        let roles: Vec<&str> = self.roles.names().collect();
        tracing::debug!(?roles, "zeek role templates");
        let endpoint = drover_proto::model::new_id();
        let roles = Arc::new(self.roles);
        let handler: front::Handler = Arc::new(move |reqid, req| {
            let shared = shared.clone();
            let roles = roles.clone();
            Box::pin(async move { answer(&shared, &roles, reqid, req).await })
        });
        tokio::spawn(front::serve(
            listener,
            front::Limits::default(),
            endpoint,
            crate::software(),
            handler,
            shutdown,
        ));
    }
}

/// Runs one request through the controller's API; `None` when Zeek sends no response
/// (`test_timeout_request` without state, `test_noop_request`).
async fn answer(
    shared: &Arc<Shared>,
    roles: &Roles,
    reqid: String,
    req: ZeekRequest,
) -> Option<Event> {
    let body = match &req {
        ZeekRequest::GetInstances => ClientRequest::GetInstances,
        ZeekRequest::StageConfiguration(z) => match roles.configuration(z.clone()) {
            Ok(config) => ClientRequest::StageConfig {
                config: Box::new(config),
            },
            Err(errors) => {
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
        ZeekRequest::GetConfiguration { deployed } => ClientRequest::GetConfig {
            deployed: *deployed,
        },
        ZeekRequest::Deploy => ClientRequest::Deploy { restart_all: false },
        ZeekRequest::GetNodes => ClientRequest::GetNodes,
        ZeekRequest::GetIdValue { id, nodes } => ClientRequest::GetIdValue {
            id: id.clone(),
            nodes: nodes.clone(),
        },
        ZeekRequest::Restart { nodes } => ClientRequest::Restart {
            nodes: nodes.clone(),
            batch: None,
        },
        ZeekRequest::TestTimeout { with_state: true } => {
            ClientRequest::TestTimeout { with_state: true }
        }
        ZeekRequest::TestTimeout { with_state: false } | ZeekRequest::TestNoop => return None,
    };
    shared
        .metrics
        .counter(
            "drover_zeek_requests_total",
            "Requests from zeek-client by type.",
            &[("request", req.kind())],
        )
        .inc();
    let request = Request {
        id: reqid.clone(),
        timeout_ms: None,
        body,
    };
    let reply = match crate::api::handle(shared, request).await {
        Answer::One(r) => r,
        Answer::Stream(mut rx) => rx.recv().await?,
    };
    let reply = match req {
        ZeekRequest::GetNodes => without_controller(&shared.name, reply),
        ZeekRequest::GetIdValue { .. } => zeek_id_errors(reply),
        _ => reply,
    };
    Some(events::response(&reqid, &req, reply))
}

/// Drops the controller's own entry from get-nodes results (see the module docs).
fn without_controller(name: &str, reply: ClientResponse) -> ClientResponse {
    let is_controller = |r: &MgmtResult| {
        r.instance.as_deref() == Some(name)
            && matches!(&r.data, Some(ResultData::NodeStatuses(s))
                if s.iter().all(|s| s.mgmt_role == MgmtRole::Controller))
    };
    match reply {
        ClientResponse::Results(rs) => {
            ClientResponse::Results(rs.into_iter().filter(|r| !is_controller(r)).collect())
        }
        other => other,
    }
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

#[cfg(test)]
mod tests {
    use drover_proto::model::{NodeStatus, State};

    use super::*;

    #[test]
    fn get_nodes_leaves_the_controller_out() {
        let me = NodeStatus::new("ctl", State::Running, MgmtRole::Controller);
        let agent = NodeStatus::new("a", State::Running, MgmtRole::Agent);
        let reply = ClientResponse::Results(vec![
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![agent]))).on_instance("a"),
            MgmtResult::ok("r", Some(ResultData::NodeStatuses(vec![me]))).on_instance("ctl"),
        ]);
        let ClientResponse::Results(rs) = without_controller("ctl", reply) else {
            panic!("results stay results");
        };
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].instance.as_deref(), Some("a"));
    }
}
