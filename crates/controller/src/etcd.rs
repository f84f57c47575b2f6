//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/...`, keys and values in
//! base64), on plain HTTP/1.1 or HTTPS with a client certificate.
//!
//! etcd's native API is gRPC; every Rust client for it generates its code from `.proto`
//! files at build time, which needs `protoc` and a gRPC stack. The gateway serves the same
//! calls as JSON on the same port, so the controller needs neither: one request per
//! connection (`Connection: close`), which costs a TCP (and TLS) handshake per call, small
//! next to etcd's own disk write on the paths that write.
//!
//! Only what the controller uses is here: range, transactions of puts, deletes and
//! compares, leases, and compaction.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use drover_daemon::reload::{Stamp, stamp};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The longest one attempt of a call waits for one member.
const ATTEMPT: Duration = Duration::from_millis(1500);

/// The largest answer read from etcd.
const MAX_RESPONSE: usize = 256 << 20;

/// Errors talking to etcd. Every message names etcd, so that a refused write tells the
/// operator where to look.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd is unreachable ({0})")]
    Unreachable(String),
    /// etcd answered with an error.
    #[error("etcd at {endpoint} refused {call}: {message}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The call.
        call: String,
        /// etcd's message.
        message: String,
    },
    /// The answer was not what the gateway sends.
    #[error("etcd at {endpoint}: unexpected answer to {call}: {message}")]
    Protocol {
        /// The endpoint.
        endpoint: String,
        /// The call.
        call: String,
        /// What was wrong.
        message: String,
    },
    /// The TLS files given for etcd are unusable.
    #[error("etcd tls: {0}")]
    Tls(String),
    /// An endpoint URL is malformed.
    #[error("invalid etcd endpoint '{0}': expected http://HOST:PORT or https://HOST:PORT")]
    Endpoint(String),
    /// An endpoint URL carries a user name or password, which is not how drover
    /// authenticates to etcd (and would end up in logs).
    #[error(
        "invalid etcd endpoint '{0}': it carries credentials; drover authenticates to etcd \
         with a client certificate (--etcd-cert, --etcd-key), so give http://HOST:PORT or \
         https://HOST:PORT"
    )]
    EndpointCredentials(String),
    /// TLS files were given for etcd, but no endpoint uses TLS.
    #[error(
        "--etcd-ca, --etcd-cert and --etcd-key are for https:// endpoints, but every \
         --etcd-endpoints URL is http://: use https:// to have them used"
    )]
    TlsUnused,
}

/// TLS files for etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificates; the system's roots are not used.
    pub ca: Option<PathBuf>,
    /// A client certificate, when etcd requires one.
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    host: String,
    port: u16,
    https: bool,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, EtcdError> {
        let bad = || EtcdError::Endpoint(url.to_owned());
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let rest = rest.trim_end_matches('/');
        if let Some((_, at)) = rest.rsplit_once('@') {
            // Named without what precedes the '@': it may be a password.
            let scheme = if https { "https" } else { "http" };
            return Err(EtcdError::EndpointCredentials(format!(
                "{scheme}://...@{at}"
            )));
        }
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let bracketed = host.starts_with('[') && host.ends_with(']');
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host_ok = if bracketed {
            host.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        };
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            host: host.to_owned(),
            port,
            https,
        })
    }
}

/// One key as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
    /// The revision that created the key (0 when absent).
    pub create_revision: i64,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// The lease attached, 0 for none.
    pub lease: i64,
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Put a value, optionally attached to a lease.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// A lease id, 0 for none.
        lease: i64,
    },
    /// Delete a key, or every key under a prefix.
    Delete {
        /// The key, or the prefix.
        key: Vec<u8>,
        /// Delete the whole prefix.
        prefix: bool,
    },
    /// Delete every key from `key` (included) to `end` (excluded).
    DeleteRange {
        /// The first key.
        key: Vec<u8>,
        /// The key past the last.
        end: Vec<u8>,
    },
    /// Read a key (answers appear in [`TxnResult::ranges`]).
    Get {
        /// The key.
        key: Vec<u8>,
    },
}

/// A comparison a transaction is conditional on.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key's create revision equals this (0: the key does not exist).
    CreateRevision(Vec<u8>, i64),
}

/// The outcome of a transaction.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Whether every comparison held (and the success branch ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: i64,
    /// The answers of `Get` operations of the branch that ran, in order.
    pub ranges: Vec<Vec<Kv>>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The key just past every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The gateway writes 64-bit numbers as strings, and leaves out zero values.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn bytes(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("bad base64: {e}")),
        other => Err(format!("expected base64, found {other}")),
    }
}

fn kvs(v: &Value) -> Result<Vec<Kv>, String> {
    let Some(list) = v.get("kvs").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|kv| {
            Ok(Kv {
                key: bytes(&kv["key"])?,
                value: bytes(&kv["value"])?,
                create_revision: int(&kv["create_revision"]),
                mod_revision: int(&kv["mod_revision"]),
                lease: int(&kv["lease"]),
            })
        })
        .collect()
}

/// Warns when the etcd client certificate `leaf` (from `path`) is within 30 days of its
/// end, or past it.
fn warn_if_ending(path: &std::path::Path, leaf: &CertificateDer<'_>) {
    if let Ok(info) = drover_net::tls::cert_info(leaf)
        && let Some(w) = drover_net::tls::expiry_warning(
            &format!("the etcd client certificate {}", path.display()),
            &info,
            drover_net::trust::unix_now(),
            drover_net::trust::EXPIRY_WARNING_DAYS,
        )
    {
        tracing::warn!("{w}");
    }
}

fn stamps(files: &EtcdTls) -> [Stamp; 3] {
    let one = |p: &Option<PathBuf>| stamp(p.as_deref().unwrap_or(std::path::Path::new("")));
    [one(&files.ca), one(&files.cert), one(&files.key)]
}

/// The TLS files for etcd, read again when one changes: every request opens a new
/// connection, which then uses the renewed client certificate or CA, with no restart
/// (a certificate issued for a year would otherwise cut every controller off etcd at
/// once when it ends).
struct TlsSource {
    files: EtcdTls,
    /// The files' stamps when last read, and the connector built from them.
    current: std::sync::Mutex<([Stamp; 3], tokio_rustls::TlsConnector)>,
    /// When the client certificate's end was last looked at: once a day, as the
    /// warning when it is read says nothing to a controller that runs for months.
    checked: std::sync::Mutex<std::time::Instant>,
}

impl TlsSource {
    fn new(files: &EtcdTls) -> Result<Self, EtcdError> {
        let stamps = stamps(files);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(files)?));
        Ok(Self {
            files: files.clone(),
            current: std::sync::Mutex::new((stamps, connector)),
            checked: std::sync::Mutex::new(std::time::Instant::now()),
        })
    }

    /// Warns (see [`warn_if_ending`]) once a day.
    fn check_daily(&self) {
        let mut checked = self
            .checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if checked.elapsed() < Duration::from_secs(86_400) {
            return;
        }
        *checked = std::time::Instant::now();
        if let Some(cert) = &self.files.cert
            && let Ok(pem) = std::fs::read(cert)
            && let Some(Ok(leaf)) = CertificateDer::pem_slice_iter(&pem).next()
        {
            warn_if_ending(cert, &leaf);
        }
    }

    /// The connector for a new connection, from the files as they are now; files that
    /// changed into something unusable keep the previous ones in use, said once.
    fn connector(&self) -> tokio_rustls::TlsConnector {
        self.check_daily();
        let now = stamps(&self.files);
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 != now {
            current.0 = now;
            match tls_config(&self.files) {
                Ok(c) => {
                    tracing::info!("the etcd tls files changed; new connections to etcd use them");
                    current.1 = tokio_rustls::TlsConnector::from(Arc::new(c));
                }
                Err(e) => tracing::warn!(
                    "the etcd tls files changed but cannot be used ({e}); keeping the ones in use"
                ),
            }
        }
        current.1.clone()
    }
}

/// A client of one etcd cluster.
#[derive(Clone)]
pub struct Etcd {
    endpoints: Arc<[Endpoint]>,
    tls: Option<Arc<TlsSource>>,
    /// The endpoint that answered last, tried first.
    preferred: Arc<AtomicUsize>,
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.endpoints.iter().map(|e| e.url.as_str()).collect();
        f.debug_struct("Etcd").field("endpoints", &urls).finish()
    }
}

fn tls_config(tls: &EtcdTls) -> Result<rustls::ClientConfig, EtcdError> {
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| EtcdError::Tls(format!("{}: {e}", p.display())));
    let mut roots = rustls::RootCertStore::empty();
    let Some(ca) = &tls.ca else {
        return Err(EtcdError::Tls(
            "an https:// endpoint needs --etcd-ca (the CA of etcd's server certificates)".into(),
        ));
    };
    for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
        let cert = cert.map_err(|e| EtcdError::Tls(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| EtcdError::Tls(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(EtcdError::Tls(format!(
            "{}: no certificate in it",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            drover_net::tls::check_key_permissions(key)
                .map_err(|e| EtcdError::Tls(e.to_string()))?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<_, _>>()
                .map_err(|e| EtcdError::Tls(format!("{}: {e}", cert.display())))?;
            let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| EtcdError::Tls(format!("{}: {e}", key.display())))?;
            if let Some(leaf) = chain.first() {
                warn_if_ending(cert, leaf);
            }
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| EtcdError::Tls(format!("{}: {e}", cert.display())))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(EtcdError::Tls(
            "--etcd-cert and --etcd-key go together".into(),
        )),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Etcd {
    /// A client of the cluster at `endpoints` (`http://HOST:PORT` or `https://...`).
    pub fn new(endpoints: &[String], tls: &EtcdTls, timeout: Duration) -> Result<Self, EtcdError> {
        let endpoints: Vec<Endpoint> = endpoints
            .iter()
            .map(|e| Endpoint::parse(e))
            .collect::<Result<_, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::Endpoint(String::new()));
        }
        let tls = if endpoints.iter().any(|e| e.https) {
            Some(Arc::new(TlsSource::new(tls)?))
        } else if tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some() {
            // Silently unused, they would leave etcd's traffic in the clear unawares.
            return Err(EtcdError::TlsUnused);
        } else {
            None
        };
        Ok(Self {
            endpoints: endpoints.into(),
            tls,
            preferred: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// The endpoints, comma-separated, for messages.
    pub fn endpoints(&self) -> String {
        let urls: Vec<&str> = self.endpoints.iter().map(|e| e.url.as_str()).collect();
        urls.join(",")
    }

    /// The same client with another per-call timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }

    /// Posts one gateway call, trying the endpoint that answered last first, then the
    /// others in turn, until one answers or the client's timeout passed. Each attempt
    /// gets at most [`ATTEMPT`] (and half the timeout, with several members): a member that lost its etcd leader may hold a request
    /// for seconds while another member, or the same one a moment later, answers at
    /// once. Retrying is safe for every call the controller makes (reads, renewals, and
    /// writes that put the same values under the same fence). An answer is final
    /// unless etcd says it is unavailable or timed out (HTTP 503 or 504: no leader).
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let body = serde_json::to_vec(body).expect("json serializes");
        let deadline = tokio::time::Instant::now() + self.timeout;
        let count = self.endpoints.len();
        let mut n = self.preferred.load(Ordering::Relaxed) % count;
        let mut failures: Vec<Option<String>> = vec![None; count];
        let mut round = 0;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let ep = &self.endpoints[n];
            // With several members, at most half the call's time on one, so that a
            // member without an etcd leader (it holds requests) leaves time to ask
            // another.
            let attempt = if count > 1 {
                ATTEMPT.min(self.timeout / 2)
            } else {
                ATTEMPT
            }
            .min(deadline - now);
            match tokio::time::timeout(attempt, self.post(ep, path, &body)).await {
                Ok(Ok((status, answer))) if status != 503 && status != 504 => {
                    self.preferred.store(n, Ordering::Relaxed);
                    return decode(ep, path, status, &answer);
                }
                Ok(Ok((status, answer))) => {
                    let e = decode(ep, path, status, &answer)
                        .err()
                        .map(|e| e.to_string());
                    failures[n] = Some(e.unwrap_or_else(|| format!("{}: http {status}", ep.url)));
                }
                Ok(Err(e)) => failures[n] = Some(format!("{}: {e}", ep.url)),
                Err(_) => failures[n] = Some(format!("{}: no answer within {attempt:?}", ep.url)),
            }
            n = (n + 1) % count;
            if n == self.preferred.load(Ordering::Relaxed) % count {
                // Every member failed once: pause a little before the next round.
                round += 1;
                let pause = Duration::from_millis(50 * round.min(4));
                tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(deadline)).await;
            }
        }
        let failures: Vec<String> = failures.into_iter().flatten().collect();
        Err(EtcdError::Unreachable(if failures.is_empty() {
            format!("no answer within {:?}", self.timeout)
        } else {
            failures.join("; ")
        }))
    }

    async fn post(
        &self,
        ep: &Endpoint,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)).await?;
        tcp.set_nodelay(true)?;
        let mut stream: Box<dyn Stream> = match (&self.tls, ep.https) {
            (Some(tls), true) => {
                let name = ServerName::try_from(ep.host.clone())
                    .map_err(|e| std::io::Error::other(format!("server name: {e}")))?;
                Box::new(tls.connector().connect(name, tcp).await?)
            }
            _ => Box::new(tcp),
        };
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            ep.host,
            ep.port,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await?;
        let mut answer = Vec::new();
        let mut limited = (&mut stream).take(MAX_RESPONSE as u64);
        // A TLS peer may close without close_notify; what arrived is complete when the
        // framing below says so.
        if let Err(e) = limited.read_to_end(&mut answer).await
            && answer.is_empty()
        {
            return Err(e);
        }
        parse_http(&answer)
    }

    /// The value of `key`, if any.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Kv>, EtcdError> {
        let v = self
            .call("/v3/kv/range", &json!({ "key": b64(key) }))
            .await?;
        let list = kvs(&v).map_err(|m| self.protocol("/v3/kv/range", m))?;
        Ok(list.into_iter().next())
    }

    /// Every key under `prefix`.
    pub async fn get_prefix(&self, prefix: &[u8]) -> Result<Vec<Kv>, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) }),
            )
            .await?;
        kvs(&v).map_err(|m| self.protocol("/v3/kv/range", m))
    }

    /// The keys under `prefix`, without their values (cheap even over large values).
    pub async fn get_prefix_keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)), "keys_only": true }),
            )
            .await?;
        let list = kvs(&v).map_err(|m| self.protocol("/v3/kv/range", m))?;
        Ok(list.into_iter().map(|kv| kv.key).collect())
    }

    fn protocol(&self, call: &str, message: String) -> EtcdError {
        EtcdError::Protocol {
            endpoint: self.endpoints[self.preferred.load(Ordering::Relaxed) % self.endpoints.len()]
                .url
                .clone(),
            call: call.into(),
            message,
        }
    }

    /// Runs `success` if every comparison holds, `failure` otherwise, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult, EtcdError> {
        let cmp: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::CreateRevision(key, rev) => json!({
                    "key": b64(key),
                    "target": "CREATE",
                    "result": "EQUAL",
                    "create_revision": rev.to_string(),
                }),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        let mut put = json!({ "key": b64(key), "value": b64(value) });
                        if *lease != 0 {
                            put["lease"] = json!(lease.to_string());
                        }
                        json!({ "request_put": put })
                    }
                    Op::Delete { key, prefix } => {
                        let mut del = json!({ "key": b64(key) });
                        if *prefix {
                            del["range_end"] = json!(b64(&prefix_end(key)));
                        }
                        json!({ "request_delete_range": del })
                    }
                    Op::DeleteRange { key, end } => json!({
                        "request_delete_range": { "key": b64(key), "range_end": b64(end) }
                    }),
                    Op::Get { key } => json!({ "request_range": { "key": b64(key) } }),
                })
                .collect()
        };
        let body = json!({ "compare": cmp, "success": ops(success), "failure": ops(failure) });
        let v = self.call("/v3/kv/txn", &body).await?;
        let mut ranges = Vec::new();
        if let Some(responses) = v.get("responses").and_then(Value::as_array) {
            for r in responses {
                if let Some(range) = r.get("response_range") {
                    ranges.push(kvs(range).map_err(|m| self.protocol("/v3/kv/txn", m))?);
                }
            }
        }
        Ok(TxnResult {
            succeeded: v.get("succeeded").and_then(Value::as_bool).unwrap_or(false),
            revision: int(&v["header"]["revision"]),
            ranges,
        })
    }

    /// etcd's current revision (of its whole key space).
    pub async fn revision(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(key), "count_only": true }),
            )
            .await?;
        match int(&v["header"]["revision"]) {
            0 => Err(self.protocol("/v3/kv/range", format!("no revision in {v}"))),
            r => Ok(r),
        }
    }

    /// Drops the history before `revision`: every key keeps its value as of then and
    /// later, older versions go (etcd keeps them all until asked, or until its own
    /// `--auto-compaction-retention`). `Ok(false)` when etcd had already compacted past
    /// it.
    pub async fn compact(&self, revision: i64) -> Result<bool, EtcdError> {
        match self
            .call(
                "/v3/kv/compaction",
                &json!({ "revision": revision.to_string() }),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(EtcdError::Refused { message, .. })
                if message.contains("required revision has been compacted") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// A new lease of `ttl` seconds; returns its id and the TTL etcd granted.
    pub async fn lease_grant(&self, ttl: u64) -> Result<(i64, i64), EtcdError> {
        let v = self
            .call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }))
            .await?;
        let id = int(&v["ID"]);
        if id == 0 {
            return Err(self.protocol("/v3/lease/grant", format!("no lease id in {v}")));
        }
        Ok((id, int(&v["TTL"])))
    }

    /// Renews a lease; returns the TTL it now has, 0 or less when it is gone.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))
            .await?;
        Ok(int(&v["result"]["TTL"]))
    }

    /// Ends a lease at once, deleting the keys attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .await
            .map(drop)
    }
}

/// Turns an HTTP answer into the gateway's JSON, or etcd's error.
fn decode(ep: &Endpoint, call: &str, status: u16, body: &[u8]) -> Result<Value, EtcdError> {
    // A streaming call answers with one object per message; the first is ours.
    let first = serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .next();
    let value = match first {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            return Err(EtcdError::Protocol {
                endpoint: ep.url.clone(),
                call: call.into(),
                message: format!("http {status}, not json: {e}"),
            });
        }
        None => Value::Null,
    };
    // A stream reports its error inside a 200 answer, as `{"error": {...}}`.
    let error = value.get("error").map(|e| match e {
        Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| other.to_string(), str::to_owned),
    });
    if status != 200 || error.is_some() {
        let mut message = error.unwrap_or_else(|| format!("http status {status}"));
        if message.contains("database space exceeded") {
            message.push_str(NOSPACE_HINT);
        }
        return Err(EtcdError::Refused {
            endpoint: ep.url.clone(),
            call: call.into(),
            message,
        });
    }
    Ok(value)
}

/// What an operator does once etcd's database reached its quota: etcd then refuses every
/// write (its NOSPACE alarm) until it is compacted, defragmented and the alarm disarmed,
/// which it does not do by itself.
const NOSPACE_HINT: &str = " (etcd's database reached its quota, --quota-backend-bytes, and etcd refuses writes until an operator compacts it, runs `etcdctl defrag` and `etcdctl alarm disarm`)";

/// Splits an HTTP/1.1 answer read to its end into status and body (chunked or not).
fn parse_http(raw: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::other(format!("bad http answer: {m}"));
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("headers not utf-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = &raw[end + 4..];
    if !chunked {
        return match length {
            Some(n) if body.len() < n => Err(bad("truncated body")),
            Some(n) => Ok((status, body[..n].to_vec())),
            None => Ok((status, body.to_vec())),
        };
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk"))?;
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .ok_or_else(|| bad("bad chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size + 2 {
            // A streaming answer cut short still carries whole messages before the cut.
            out.extend_from_slice(&rest[..rest.len().min(size)]);
            return Ok((status, out));
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_database_is_refused_with_what_to_do() {
        let ep = Endpoint::parse("http://127.0.0.1:2379").unwrap();
        let body = br#"{"error":"etcdserver: mvcc: database space exceeded","code":8}"#;
        let e = decode(&ep, "/v3/kv/txn", 400, body)
            .unwrap_err()
            .to_string();
        assert!(e.contains("database space exceeded"), "{e}");
        assert!(e.contains("etcdctl alarm disarm"), "{e}");
        let other = br#"{"error":"etcdserver: request timed out","code":14}"#;
        let e = decode(&ep, "/v3/kv/txn", 503, other)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("alarm"), "{e}");
    }

    #[test]
    fn endpoints_parse_or_say_what_is_expected() {
        let e = Endpoint::parse("http://127.0.0.1:2379/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.https),
            ("127.0.0.1", 2379, false)
        );
        let e = Endpoint::parse("https://[::1]:2379").unwrap();
        assert_eq!((e.host.as_str(), e.https), ("::1", true));
        for bad in [
            "127.0.0.1:2379",
            "http://host",
            "http://:2379",
            "ftp://h:1",
            "http://h:0",
            "http://no such host:2379",
            "http://[not-v6]:2379",
        ] {
            let err = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(bad) && err.contains("http://HOST:PORT"),
                "{err}"
            );
        }
        let err = Endpoint::parse("http://user:s3cret@127.0.0.1:2379")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'http://...@127.0.0.1:2379': it carries credentials")
                && !err.contains("s3cret"),
            "{err}"
        );
        let tls = EtcdTls {
            ca: Some("ca.crt".into()),
            cert: None,
            key: None,
        };
        let err = Etcd::new(
            &["http://127.0.0.1:2379".into()],
            &tls,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("every --etcd-endpoints URL is http://"),
            "{err}"
        );
    }

    #[test]
    fn http_answers_are_split_chunked_or_not() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_http(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_http(chunked).unwrap(), (200, b"{\"a\":1}".to_vec()));
        assert!(parse_http(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse_http(b"garbage").is_err());
    }

    #[test]
    fn prefix_ends_are_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
