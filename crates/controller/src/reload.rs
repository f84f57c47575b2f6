//! Reloading the controller's certificate, key, CA bundle and deny list while it runs.
//!
//! The daemon calls [`Reloader::reload`] on SIGHUP and, with `--watch-certs`, when the
//! files change. New connections use the new material at once; connections of peers
//! now revoked or no longer trusted are closed (each an `error` event and a log line);
//! every other connection, agent and node is left alone. A reload that cannot read or
//! use a file changes nothing and says why (log, `error` event, and the
//! `drover_cert_reload_failing` and `drover_cert_reloads_total` metrics).

use std::sync::Arc;

use drover_proto::msg::Event;

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
            Ok(closed) => {
                for message in closed {
                    self.shared.emit(Event::Error { message });
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

    /// The files a reload reads, for a daemon that watches them.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        self.shared.trust.watched_files()
    }
}
