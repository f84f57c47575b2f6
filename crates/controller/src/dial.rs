//! Connections the controller makes to agents that listen (Zeek's controller-to-agent
//! mode): an instance with a `host` and a `port` in a staged or deployed configuration
//! gets a dialler task that connects to it, verifies that the peer holds the agent
//! certificate of that instance, says Hello as the controller, and then runs the same
//! agent session as for agents that dial in. When the connection is lost, the dialler
//! tries again with capped exponential backoff.
//!
//! The controller starts dialling when a configuration is staged, and zeek-client
//! deploys right after staging, so a deploy waits (within its time limit) for the
//! instances being dialled to connect, as Zeek's controller waits for its agents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_net::conn;
use drover_proto::model::Configuration;
use drover_proto::msg::{API_VERSION, Hello, PeerRole};
use tracing::{debug, info, warn};

use crate::{Shared, admit_agent, serve_agent, software};

/// Starts (or re-targets) a dialler for every listening instance of `config`.
pub(crate) fn ensure(shared: &Arc<Shared>, config: &Configuration) {
    let mut dialers = shared.dialers.lock().unwrap_or_else(|p| p.into_inner());
    for inst in &config.instances {
        let (Some(host), Some(port)) = (inst.host, inst.port) else {
            continue;
        };
        if host.is_unspecified() {
            continue;
        }
        let addr = SocketAddr::new(host, port);
        if let Some((known, task)) = dialers.get(&inst.name) {
            if *known == addr && !task.is_finished() {
                continue;
            }
            task.abort();
        }
        info!(agent = %inst.name, %addr, "dialling agent '{}' at {addr}", inst.name);
        let task = tokio::spawn(dial_loop(shared.clone(), inst.name.clone(), addr));
        dialers.insert(inst.name.clone(), (addr, task.abort_handle()));
    }
}

/// Waits until every instance of `config` that the controller dials is connected, or
/// until `deadline`; starts diallers that are missing first.
pub(crate) async fn wait_for_dialled(
    shared: &Arc<Shared>,
    config: &Configuration,
    deadline: tokio::time::Instant,
) {
    let dialled: Vec<&str> = config
        .instances
        .iter()
        .filter(|i| i.port.is_some() && i.host.is_some_and(|h| !h.is_unspecified()))
        .map(|i| i.name.as_str())
        .collect();
    if dialled.is_empty() {
        return;
    }
    // Subscribe before looking, so a connection in between is not missed.
    let mut events = shared.events.subscribe();
    ensure(shared, config);
    loop {
        let waiting: Vec<&str> = dialled
            .iter()
            .copied()
            .filter(|n| shared.registry.get(n).is_none())
            .collect();
        if waiting.is_empty() {
            return;
        }
        debug!(?waiting, "deploy waits for agents being dialled");
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) | Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
            Ok(_) => {}
        }
    }
}

/// How often a dialler whose agent is connected checks whether it still is.
const WATCH: Duration = Duration::from_secs(1);

async fn dial_loop(shared: Arc<Shared>, name: String, addr: SocketAddr) {
    let mut delay = Duration::from_millis(200);
    // The last failure warned of: an agent refusing this controller (another API
    // version, a certificate it does not trust) is said once, and again when the cause
    // changes, not at every attempt.
    let mut warned: Option<String> = None;
    loop {
        // One connection per agent: an agent that dialled in (or that this dialler
        // reached before) is not dialled again while that connection lives.
        if shared.registry.get(&name).is_some() {
            delay = Duration::from_millis(200);
            tokio::time::sleep(WATCH).await;
            if !still_wanted(&shared, &name, addr) {
                warn!(agent = %name, %addr, "agent left every configuration; no longer dialling it");
                return;
            }
            continue;
        }
        // A leader cut off from etcd takes no agent: another controller may lead soon.
        if shared.gate.as_ref().is_some_and(|g| g.serving().is_err()) {
            tokio::time::sleep(WATCH).await;
            continue;
        }
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Controller,
            name: shared.name.clone(),
            software: software(),
            lost_term: None,
        };
        let attempt = conn::dial(
            &shared.endpoint,
            None,
            addr,
            &name,
            hello,
            PeerRole::Agent,
            Some(&name),
            shared.transport.hello_timeout,
        )
        .await;
        match attempt {
            Ok(est) => {
                delay = Duration::from_millis(200);
                if warned.take().is_some() {
                    info!(agent = %name, %addr, "connected to agent");
                }
                // Tracked while it lives, so that a reload can close it.
                let _tracked = match shared.trust.track_quic(&est.conn, Some(&name)) {
                    Ok(t) => t,
                    Err(e) => {
                        warn!(agent = %name, %addr, "closing the connection just made: {e}");
                        est.conn.close(
                            drover_net::peers::CLOSE_UNTRUSTED.into(),
                            e.to_string().as_bytes(),
                        );
                        continue;
                    }
                };
                // The agent may have dialled in while this connection was made: the
                // connection that was first stays, this one is closed.
                match admit_agent(&shared, &name, &est.conn, Some(addr.port())).await {
                    Ok(moved) => {
                        serve_agent(
                            shared.clone(),
                            est.conn,
                            name.clone(),
                            est.welcome.software,
                            moved,
                        )
                        .await;
                    }
                    Err(why) => {
                        debug!(agent = %name, %addr, "closing the connection just made: {why}");
                        est.conn.close(0u32.into(), b"already connected");
                    }
                }
            }
            Err(e) => {
                let why = e.to_string();
                if warned.as_deref() == Some(why.as_str()) {
                    debug!(agent = %name, %addr, "cannot connect to agent: {why}");
                } else {
                    warn!(agent = %name, %addr, "cannot connect to agent: {why}");
                    warned = Some(why);
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        if !still_wanted(&shared, &name, addr) {
            warn!(agent = %name, %addr, "agent left every configuration; no longer dialling it");
            return;
        }
    }
}

/// Whether a staged or desired configuration still has agent `name` listening at `addr`.
fn still_wanted(shared: &Shared, name: &str, addr: SocketAddr) -> bool {
    [shared.store.desired_config(), shared.store.staged()]
        .into_iter()
        .flatten()
        .any(|c| {
            c.instances
                .iter()
                .any(|i| i.name == name && i.port == Some(addr.port()) && i.host == Some(addr.ip()))
        })
}
