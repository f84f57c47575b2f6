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
//! - `wss://` requires a client certificate (zeek-client's `ssl.certificate`); Zeek's
//!   anonymous TLS (`ssl.enable` alone) is refused.

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
use drover_proto::model::{MgmtResult, MgmtRole, ResultData};
use drover_proto::msg::{ClientRequest, ClientResponse, PeerRole, Request};
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
    /// The certificate for `wss://`.
    #[error("cannot serve zeek-client over tls: {0}")]
    Tls(#[from] drover_net::NetError),
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
    tls: Option<TcpTlsAcceptor>,
}

impl Front {
    /// Reads the roles file and binds the listener, so that both fail at start-up.
    /// With `tls`, the front serves `wss://` with those credentials and requires a
    /// client certificate from their CA.
    pub fn bind(
        addr: SocketAddr,
        roles: Option<&Path>,
        tls: Option<&Credentials>,
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
            front::announce(addr, self.tls.is_some());
        }
        let tls = self.tls.map(|acceptor| {
            let shared = shared.clone();
            let authorize: front::Authorize = Arc::new(move |peer: &TlsPeer| {
                if peer.identity.role != PeerRole::Client {
                    return Err(format!(
                        "{} is not a client: zeek-client needs a client certificate",
                        peer.identity
                    ));
                }
                crate::check_revoked(&shared, &peer.identity, &peer.cert).map_err(|e| e.message)
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
            tls,
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
        ZeekRequest::Deploy => ClientRequest::Deploy {
            restart_all: false,
            expect_id: None,
        },
        ZeekRequest::GetNodes => ClientRequest::GetNodes { fresh: true },
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
            Roles::parse(
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
