//! Reloading the controller's certificate, key, CA bundle and deny list while it runs.
//!
//! The daemon calls [`Reloader::reload`] on SIGHUP and, with `--watch-certs`, when the
//! files change. New connections use the new material at once; connections of peers
//! now revoked or no longer trusted are closed (each an `error` event and a log line);
//! every other connection, agent and node is left alone. A reload that cannot read or
//! use a file changes nothing and says why (log, `error` event, and the
//! `drover_cert_reload_failing` and `drover_cert_reloads_total` metrics).

use std::sync::Arc;

use drover_proto::msg::{AgentResponse, ControllerRequest, Event};

use crate::Shared;

/// Reloads a running controller's trust material; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reloader {
    pub(crate) shared: Arc<Shared>,
}

impl Reloader {
    /// Reads the files again (`cause` says why, for the log) and puts them in force, or
    /// keeps the previous material and returns why not.
    pub fn reload(&self, cause: &str) -> Result<(), String> {
        match self
            .shared
            .trust
            .reload_logged(cause, "this controller's certificate")
        {
            Ok(done) => {
                for c in &done.closed {
                    self.shared.emit(Event::Error {
                        message: c.message(),
                    });
                }
                // Connections keep the certificates of their handshake: agents move to
                // new connections, so that none depends on the old material when a CA
                // is later removed.
                if done.adopted.cert_changed || done.adopted.roots_changed {
                    self.ask_agents_to_reconnect();
                }
                Ok(())
            }
            Err(message) => {
                self.shared.emit(Event::Error {
                    message: message.clone(),
                });
                Err(message)
            }
        }
    }

    /// Asks every connected agent to move to a new connection ([`ControllerRequest::Reconnect`]).
    fn ask_agents_to_reconnect(&self) {
        for (name, conn) in self.shared.registry.connections() {
            tokio::spawn(async move {
                let asked = drover_net::conn::call::<_, AgentResponse>(
                    &conn,
                    &ControllerRequest::Reconnect,
                    std::time::Duration::from_secs(5),
                )
                .await;
                if let Err(e) = asked {
                    tracing::debug!(agent = %name, "agent did not take the request to reconnect: {e}");
                }
            });
        }
    }

    /// When a reload is worth trying again: the last one refused a certificate not
    /// valid yet.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.shared.trust.retry_after(drover_net::trust::unix_now())
    }

    /// The files a reload reads, for a daemon that watches them.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        self.shared.trust.watched_files()
    }
}
