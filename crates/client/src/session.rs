//! A client's connection to the controller.

use std::time::Duration;

use anyhow::Context;
use drover_net::conn::{self, TransportSettings};
use drover_net::{Credentials, TlsFiles};
use drover_proto::msg::{API_VERSION, ClientRequest, ClientResponse, Hello, PeerRole};

use crate::Cli;

/// An established connection to the controller.
#[derive(Debug)]
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    timeout: Duration,
}

fn tls_files(cli: &Cli) -> anyhow::Result<TlsFiles> {
    let need = |v: &Option<std::path::PathBuf>, flag: &str| {
        v.clone().with_context(|| {
            format!(
                "missing --{flag} (or DROVER_{}): the client needs the cluster CA and a client certificate; create them with `drover ca init` and `drover ca issue --role client`",
                flag.to_uppercase()
            )
        })
    };
    Ok(TlsFiles {
        ca: need(&cli.ca, "ca")?,
        cert: need(&cli.cert, "cert")?,
        key: need(&cli.key, "key")?,
    })
}

impl Session {
    /// Connects, verifies the controller, and exchanges Hello/Welcome.
    pub async fn connect(cli: &Cli) -> anyhow::Result<Self> {
        let creds = Credentials::load(&tls_files(cli)?)?;
        if creds.identity().role != PeerRole::Client {
            anyhow::bail!(
                "the certificate {} belongs to {}; the client needs a client certificate (`drover ca issue --role client`)",
                cli.cert
                    .as_deref()
                    .unwrap_or_else(|| std::path::Path::new("?"))
                    .display(),
                creds.identity()
            );
        }
        let addr = tokio::net::lookup_host(&cli.controller)
            .await
            .with_context(|| format!("cannot resolve controller address '{}'", cli.controller))?
            .next()
            .with_context(|| {
                format!(
                    "controller address '{}' resolves to nothing",
                    cli.controller
                )
            })?;
        let host = cli
            .controller
            .rsplit_once(':')
            .map_or(cli.controller.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let settings = TransportSettings {
            hello_timeout: cli.timeout.min(Duration::from_secs(5)),
            ..TransportSettings::default()
        };
        let endpoint = conn::client_endpoint(&creds, &settings, addr)?;
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Client,
            name: creds.identity().name.clone(),
            software: format!("drover {}", env!("CARGO_PKG_VERSION")),
        };
        let est = conn::dial(
            &endpoint,
            None,
            addr,
            host,
            hello,
            PeerRole::Controller,
            None,
            settings.hello_timeout,
        )
        .await
        .map_err(|e| match e {
            drover_net::NetError::Timeout { .. } => anyhow::anyhow!(
                "{e} (is the controller running at {} and reachable?)",
                cli.controller
            ),
            drover_net::NetError::Refused(w) => {
                anyhow::anyhow!("controller {} refused us: {}", cli.controller, w.message)
            }
            other => other.into(),
        })?;
        Ok(Self {
            endpoint,
            conn: est.conn,
            timeout: cli.timeout,
        })
    }

    /// Sends one request and waits for its reply.
    pub async fn request(&self, req: &ClientRequest) -> anyhow::Result<ClientResponse> {
        Ok(conn::call(&self.conn, req, self.timeout).await?)
    }

    /// Sends one request whose replies come as a stream.
    pub async fn request_stream(&self, req: &ClientRequest) -> anyhow::Result<conn::ReplyStream> {
        Ok(conn::call_stream(&self.conn, req, self.timeout).await?)
    }

    /// Closes the connection politely so the controller sees it go at once.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}
