//! Mutual TLS: loading credentials, building rustls configurations, reading identities.
//!
//! [`Credentials`] can be reloaded while the process runs ([`Credentials::adopt`]): every
//! configuration built from them resolves its certificate and verifies peers through the
//! material of the moment (see [`crate::live`]), so new connections use what was loaded
//! last and established ones are untouched.
//!
//! Only the ring crypto provider is used, always passed explicitly (never the process
//! default), so a second provider in the dependency tree cannot make a builder panic.
//! Only TLS 1.3 is offered. Server-side session tickets are off: a resumed session skips
//! certificate verification, and a revoked peer must be refused on its next connection.
//! Besides QUIC, [`TcpTlsAcceptor`] does the same mutual TLS over TCP (the controller's
//! `wss://` front for zeek-client).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_proto::msg::{ALPN, PeerRole};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

use crate::NetError;
use crate::live::{LiveClientCert, LiveClientVerifier, LiveServerCert, LiveServerVerifier, Slot};

/// Who a peer is: the role and name its verified certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Controller, agent or client.
    pub role: PeerRole,
    /// The holder's name.
    pub name: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} '{}'", self.role, self.name)
    }
}

/// Paths of the PEM files a process needs.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This process's certificate.
    pub cert: PathBuf,
    /// This process's private key (must not be readable by group or others).
    pub key: PathBuf,
}

/// A process's credentials: the roots it trusts, its own chain and key, and the identity
/// its certificate claims. Clones share one slot of material, which
/// [`Credentials::adopt`] replaces for every configuration built from any of them.
#[derive(Clone)]
pub struct Credentials {
    slot: Arc<Slot>,
    identity: Identity,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The material in force at one moment ([`Credentials::epoch`]). Holding it keeps it
/// alive, so a later reload's material is never mistaken for it.
#[derive(Clone)]
pub struct Epoch(Arc<Material>);

impl Epoch {
    /// Whether `creds` still verify handshakes with this material.
    pub(crate) fn is_current(&self, creds: &Credentials) -> bool {
        Arc::ptr_eq(&self.0, &creds.slot.get())
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoch").finish_non_exhaustive()
    }
}

/// One load of the PEM files, with the verifiers built from its roots.
pub(crate) struct Material {
    pub(crate) certified: Arc<CertifiedKey>,
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    pub(crate) server_verifier: Arc<dyn ServerCertVerifier>,
    /// Every CA of the bundle, in file order.
    pub(crate) cas: Vec<CaInfo>,
    /// Our own certificate.
    pub(crate) info: CertInfo,
    /// Start of our own certificate's validity, seconds since the Unix epoch.
    pub(crate) not_before: i64,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("info", &self.info)
            .field("cas", &self.cas)
            .finish_non_exhaustive()
    }
}

/// A CA certificate of the trusted bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInfo {
    /// Its subject's common name (or the whole subject when it has none).
    pub subject: String,
    /// Serial and expiry.
    pub cert: CertInfo,
}

/// What a successful [`Credentials::adopt`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// Our own certificate is another one (renewed).
    pub cert_changed: bool,
    /// The trusted CA bundle changed.
    pub roots_changed: bool,
    /// Our certificate now.
    pub cert: CertInfo,
    /// The trusted CAs now.
    pub cas: Vec<CaInfo>,
}

fn cred_err(path: &Path, what: &str, e: &std::io::Error) -> NetError {
    // As the other messages: lower case, without Rust's "(os error N)".
    let text = e.to_string();
    let text = text
        .rfind(" (os error ")
        .map_or(text.as_str(), |i| &text[..i]);
    let mut chars = text.chars();
    let text: String = chars
        .next()
        .map_or_else(String::new, |c| c.to_lowercase().chain(chars).collect());
    NetError::Credentials(format!("{what} {}: {text}", path.display()))
}

/// The largest certificate, key, CA bundle or deny list read: far above any real one,
/// and a bound on what a wrong path (a device, a log) can make a daemon hold.
const MAX_MATERIAL_BYTES: u64 = 16 << 20;

/// Reads a credential file that must be a regular file: opened without blocking, so
/// that a FIFO or a device put in its place is refused at once instead of holding up
/// the reload (and whatever waits for it) until something writes to it.
pub(crate) fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_MATERIAL_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes, more than the {MAX_MATERIAL_BYTES} read",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_MATERIAL_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Refuses a private key file that group or others may read.
pub fn check_key_permissions(path: &Path) -> Result<(), NetError> {
    let meta = fs::metadata(path).map_err(|e| cred_err(path, "cannot read private key", &e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        // A certificate is readable by all: given as the key, the mode is not the fault.
        if read_regular(path)
            .is_ok_and(|b| pem_holds(&b, "CERTIFICATE") && !pem_holds(&b, "PRIVATE KEY"))
        {
            return Err(NetError::Credentials(format!(
                "private key {} holds a certificate, not a private key: are the certificate and key files swapped?",
                path.display()
            )));
        }
        return Err(NetError::Credentials(format!(
            "private key {} is accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Whether PEM text holds a block whose label ends with `label` (`PRIVATE KEY` also
/// matches `EC PRIVATE KEY`).
fn pem_holds(pem: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(pem).lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    })
}

impl Credentials {
    /// Loads and checks the PEM files.
    pub fn load(files: &TlsFiles) -> Result<Self, NetError> {
        check_key_permissions(&files.key)?;
        let ca = read_regular(&files.ca).map_err(|e| cred_err(&files.ca, "cannot read CA", &e))?;
        let cert = read_regular(&files.cert)
            .map_err(|e| cred_err(&files.cert, "cannot read certificate", &e))?;
        let key = read_regular(&files.key)
            .map_err(|e| cred_err(&files.key, "cannot read private key", &e))?;
        Self::from_pem(&ca, &cert, &key).map_err(|e| match e {
            NetError::Credentials(m) => {
                let mut pending = files.cert.as_os_str().to_owned();
                pending.push(".new");
                let pending = PathBuf::from(pending);
                // What `drover ca renew` leaves when stopped between its two renames.
                let hint = if m.starts_with("certificate and key do not match")
                    && pending.exists()
                {
                    format!(
                        "; {} exists: a renewal stopped before its end? `drover ca renew` again finishes it",
                        pending.display()
                    )
                } else {
                    String::new()
                };
                NetError::Credentials(format!(
                    "{m} (ca {}, cert {}, key {}){hint}",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display()
                ))
            }
            other => other,
        })
    }

    /// Builds credentials from PEM text.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, NetError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        let mut cas = Vec::new();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| {
                NetError::Credentials(format!("bad CA certificate PEM: {}", pem_error(&e)))
            })?;
            cas.push(ca_info(&c)?);
            roots
                .add(c)
                .map_err(|e| NetError::Credentials(format!("unusable CA certificate: {e}")))?;
        }
        if cas.is_empty() {
            return Err(NetError::Credentials(
                "the CA file holds no certificate".into(),
            ));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                NetError::Credentials(format!("bad certificate PEM: {}", pem_error(&e)))
            })?;
        let leaf = chain.first().ok_or_else(|| {
            NetError::Credentials(if pem_holds(cert, "PRIVATE KEY") {
                "the certificate file holds a private key, not a certificate: are the certificate and key files swapped?".into()
            } else {
                "the certificate file holds no certificate".into()
            })
        })?;
        // Our own certificate, not a peer's: said as such.
        let identity = identity_of_cert(leaf).map_err(|e| match e {
            NetError::Identity(why) => NetError::Credentials(format!(
                "the certificate is not a drover certificate of a role and name: {why}"
            )),
            other => other,
        })?;
        let info = cert_info(leaf)?;
        let not_before = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map(|(_, x)| x.validity().not_before.timestamp())
            .map_err(|e| NetError::Identity(format!("cannot parse certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            NetError::Credentials(format!("bad private key PEM: {}", pem_error(&e)))
        })?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| NetError::Credentials(format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(NetError::Credentials(
                    "certificate and key do not match: the key is not the certificate's".into(),
                ));
            }
            Err(e) => {
                return Err(NetError::Credentials(format!(
                    "certificate and key do not match: {e}"
                )));
            }
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| NetError::Credentials(format!("cannot build client verifier: {e}")))?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| NetError::Credentials(format!("cannot build server verifier: {e}")))?;
        let material = Material {
            certified: Arc::new(certified),
            client_verifier,
            server_verifier,
            cas,
            info,
            not_before,
        };
        Ok(Self {
            slot: Arc::new(Slot::new(material)),
            identity,
        })
    }

    /// Makes `next` (freshly loaded) this process's material, for every configuration
    /// built from these credentials: new handshakes use it, established connections are
    /// untouched. Refused, changing nothing, when `next` carries another identity.
    pub fn adopt(&self, next: &Self) -> Result<Adopted, NetError> {
        if next.identity != self.identity {
            return Err(NetError::Credentials(format!(
                "the new certificate belongs to {}, but this process is {}",
                next.identity, self.identity
            )));
        }
        let new = next.slot.get();
        let old = self.slot.replace(new.clone());
        Ok(Adopted {
            cert_changed: old.certified.cert != new.certified.cert,
            roots_changed: old.cas != new.cas,
            cert: new.info.clone(),
            cas: new.cas.clone(),
        })
    }

    /// The material new handshakes are verified with now. Taken before a handshake, it
    /// lets [`crate::Trust::track_quic_since`] tell whether a reload replaced the
    /// material while the handshake ran.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.slot.get())
    }

    /// The identity this process's own certificate claims.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Serial and expiry of this process's own certificate.
    pub fn cert_info(&self) -> Result<CertInfo, NetError> {
        Ok(self.slot.get().info.clone())
    }

    /// Whether this process's own certificate can serve at `now` (Unix seconds), by this
    /// host's clock and its own CA bundle: peers that share the bundle refuse one that
    /// does not verify against it, and any peer refuses one outside its validity.
    pub fn check_own(&self, now: i64) -> Result<(), Unusable> {
        let m = self.slot.get();
        if now < m.not_before {
            return Err(Unusable::NotYetValid {
                from: m.not_before,
                now,
            });
        }
        if now > m.info.not_after {
            return Err(Unusable::Expired {
                at: m.info.not_after,
                now,
            });
        }
        let (leaf, intermediates) = m
            .certified
            .cert
            .split_first()
            .ok_or_else(|| Unusable::Untrusted("it holds no certificate".to_owned()))?;
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now).unwrap_or(0),
        ));
        m.client_verifier
            .verify_client_cert(leaf, intermediates, at)
            .map(|_| ())
            .map_err(|e| Unusable::Untrusted(crate::conn::tls_error_text(&e.to_string())))
    }

    /// The CAs trusted now.
    pub fn cas(&self) -> Vec<CaInfo> {
        self.slot.get().cas.clone()
    }

    /// Checks a peer's chain against the roots trusted now, as a new handshake would:
    /// for a peer that dialled us as a client certificate, for one we dialled as a server
    /// certificate for `dialled` (the name we dialled it by).
    pub fn verify_peer(
        &self,
        chain: &[CertificateDer<'static>],
        dialled: Option<&ServerName<'static>>,
    ) -> Result<(), String> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| "it presented no certificate".to_owned())?;
        let m = self.slot.get();
        let now = UnixTime::now();
        let r = match dialled {
            None => m
                .client_verifier
                .verify_client_cert(leaf, intermediates, now)
                .map(|_| ()),
            Some(name) => m
                .server_verifier
                .verify_server_cert(leaf, intermediates, name, &[], now)
                .map(|_| ()),
        };
        r.map_err(|e| crate::conn::tls_error_text(&e.to_string()))
    }

    /// A rustls server configuration that requires a client certificate from the CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, NetError> {
        let mut cfg = self.server_config_without_alpn()?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// As [`Credentials::server_config`], with no ALPN id: for TLS over TCP to clients
    /// that send none (zeek-client's `wss://`).
    fn server_config_without_alpn(&self) -> Result<rustls::ServerConfig, NetError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(Arc::new(LiveClientVerifier(self.slot.clone())))
            .with_cert_resolver(Arc::new(LiveServerCert(self.slot.clone())));
        cfg.max_early_data_size = 0;
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(cfg)
    }

    /// A rustls client configuration that presents this process's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, NetError> {
        self.client_config_with_alpn(ALPN)
    }

    /// As [`Credentials::client_config`] with another ALPN id (for version tests).
    pub fn client_config_with_alpn(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, NetError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LiveServerVerifier(self.slot.clone())))
            .with_client_cert_resolver(Arc::new(LiveClientCert(self.slot.clone())));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }

    /// A client configuration that trusts the CA but presents no certificate (tests).
    pub fn anonymous_client_config(&self) -> Result<rustls::ClientConfig, NetError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LiveServerVerifier(self.slot.clone())))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// A TLS stream over TCP accepted by a [`TcpTlsAcceptor`].
pub type TcpTlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Mutual TLS 1.3 over TCP, for listeners that are not QUIC (the controller's `wss://`
/// front for zeek-client): the server presents this process's certificate, and a client
/// must present one issued by the cluster CA. No ALPN id is required, session tickets
/// and resumption are off, as on QUIC.
#[derive(Clone)]
pub struct TcpTlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TcpTlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTlsAcceptor").finish_non_exhaustive()
    }
}

/// A verified TLS client: who it is and which certificate it showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPeer {
    /// Role and name from the certificate.
    pub identity: Identity,
    /// Serial and expiry, for deny lists and warnings.
    pub cert: CertInfo,
    /// The client's scope, if its certificate carries one.
    pub scope: Option<drover_proto::access::Scope>,
    /// The chain it presented, for [`crate::peers::Peers::track_accepted`].
    pub chain: Vec<CertificateDer<'static>>,
}

impl TcpTlsAcceptor {
    /// An acceptor with `creds` as the server's certificate and the CA as the only root
    /// for client certificates.
    pub fn new(creds: &Credentials) -> Result<Self, NetError> {
        let cfg = creds.server_config_without_alpn()?;
        Ok(Self {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    /// Runs the TLS handshake on an accepted connection (callers bound it with a
    /// deadline) and reads the client's identity from its verified certificate.
    pub async fn accept(
        &self,
        stream: tokio::net::TcpStream,
    ) -> Result<(TcpTlsStream, TlsPeer), NetError> {
        let tls = self
            .inner
            .accept(stream)
            .await
            .map_err(|e| NetError::Connection(format!("tls handshake failed: {e}")))?;
        let chain: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let leaf = chain
            .first()
            .ok_or_else(|| NetError::Identity("peer presented no certificate".into()))?;
        let peer = TlsPeer {
            identity: identity_of_cert(leaf)?,
            cert: cert_info(leaf)?,
            scope: crate::scope::scope_of_cert(leaf)?,
            chain: chain.clone(),
        };
        Ok((tls, peer))
    }
}

fn tls_err(e: rustls::Error) -> NetError {
    NetError::Credentials(format!("tls configuration: {e}"))
}

/// The one crypto provider drover uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Facts about a certificate that matter for revocation and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The serial number, lower-case hex without separators.
    pub serial: String,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Why a process's own certificate cannot serve ([`Credentials::check_own`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// Its validity begins later, by this host's clock.
    NotYetValid {
        /// When it begins (Unix seconds).
        from: i64,
        /// Now, as checked.
        now: i64,
    },
    /// Its validity ended.
    Expired {
        /// When it ended (Unix seconds).
        at: i64,
        /// Now, as checked.
        now: i64,
    },
    /// The CA bundle does not verify it; why.
    Untrusted(String),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotYetValid { from, now } => write!(
                f,
                "is not valid before {} (in {}; is the clock of this host or of the \
                 machine that issued it wrong?)",
                utc(*from),
                humanize_secs(from - now)
            ),
            Self::Expired { at, now } => write!(
                f,
                "expired at {} ({} ago)",
                utc(*at),
                humanize_secs(now - at)
            ),
            Self::Untrusted(why) => {
                write!(f, "does not verify against its own CA bundle: {why}")
            }
        }
    }
}

impl std::error::Error for Unusable {}

/// A Unix time as `2026-12-07 04:30:00 UTC`.
fn utc(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t).map_or_else(
        |_| format!("{t} (Unix time)"),
        |d| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        },
    )
}

/// A span of seconds as `3d 4h`, `2h 5m`, `7m 3s` or `12s`.
fn humanize_secs(secs: i64) -> String {
    let s = secs.max(0);
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

/// Reads serial and expiry from a certificate.
pub fn cert_info(cert: &CertificateDer<'_>) -> Result<CertInfo, NetError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| NetError::Identity(format!("cannot parse certificate: {e}")))?;
    let serial = x509
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .trim_start_matches('0')
        .to_owned();
    Ok(CertInfo {
        serial,
        not_after: x509.validity().not_after.timestamp(),
    })
}

/// Subject and facts of a CA certificate.
fn ca_info(cert: &CertificateDer<'_>) -> Result<CaInfo, NetError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| NetError::Credentials(format!("cannot parse CA certificate: {e}")))?;
    let subject = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map_or_else(|| x509.subject().to_string(), str::to_owned);
    Ok(CaInfo {
        subject,
        cert: cert_info(cert)?,
    })
}

/// A warning when a certificate expires within `within_days` of `now` (Unix seconds).
pub fn expiry_warning(what: &str, info: &CertInfo, now: i64, within_days: i64) -> Option<String> {
    let left = info.not_after - now;
    if left < 0 {
        Some(format!("{what} expired {} days ago", -left / 86_400))
    } else if left < within_days * 86_400 {
        Some(format!(
            "{what} expires in {} days; renew it with `drover ca renew`",
            left / 86_400
        ))
    } else {
        None
    }
}

/// Revoked identities and certificates, one per line: `ROLE/NAME` (e.g. `agent/sensor-3`)
/// or `serial:HEX`; `#` starts a comment. Read at start and at every reload; each new
/// connection is checked against it (server-side session resumption is off, so this
/// cannot be bypassed), and a reload closes the live connections it now names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyList {
    names: std::collections::BTreeSet<(PeerRole, String)>,
    serials: std::collections::BTreeSet<String>,
}

impl DenyList {
    /// Parses a deny-list file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut list = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if let Some(serial) = line.strip_prefix("serial:") {
                let serial = serial.trim().to_ascii_lowercase().replace(':', "");
                if serial.is_empty() || !serial.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(format!("line {}: '{line}' is not a hex serial", i + 1));
                }
                list.serials
                    .insert(serial.trim_start_matches('0').to_owned());
            } else if let Some((role, name)) = line.split_once('/') {
                let role = PeerRole::parse(role.trim())
                    .ok_or_else(|| format!("line {}: unknown role in '{line}'", i + 1))?;
                list.names.insert((role, name.trim().to_owned()));
            } else {
                return Err(format!(
                    "line {}: '{line}' is neither ROLE/NAME nor serial:HEX",
                    i + 1
                ));
            }
        }
        Ok(list)
    }

    /// Reads and parses a deny-list file; errors name the file and the line.
    pub fn load(path: &Path) -> Result<Self, NetError> {
        let bytes =
            read_regular(path).map_err(|e| cred_err(path, "cannot read the deny list", &e))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            NetError::Credentials(format!(
                "invalid deny list {}: it is not UTF-8 text",
                path.display()
            ))
        })?;
        Self::parse(&text).map_err(|e| {
            NetError::Credentials(format!("invalid deny list {}: {e}", path.display()))
        })
    }

    /// How many identities and serials it names.
    pub fn len(&self) -> usize {
        self.names.len() + self.serials.len()
    }

    /// Whether it names nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a peer is revoked.
    pub fn denies(&self, identity: &Identity, info: &CertInfo) -> bool {
        self.names.contains(&(identity.role, identity.name.clone()))
            || self.serials.contains(&info.serial)
    }
}

/// Reads the identity (`spiffe://drover/<role>/<name>`) from a certificate.
pub fn identity_of_cert(cert: &CertificateDer<'_>) -> Result<Identity, NetError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| NetError::Identity(format!("cannot parse certificate: {e}")))?;
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| NetError::Identity(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| NetError::Identity("certificate has no subject alternative names".into()))?;
    let mut found: Option<(Identity, &str)> = None;
    for gn in &sans.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = gn
            && let Some(rest) = uri.strip_prefix(drover_pki_prefix())
        {
            let (role, name) = rest
                .split_once('/')
                .ok_or_else(|| NetError::Identity(format!("malformed identity uri '{uri}'")))?;
            let role = PeerRole::parse(role).ok_or_else(|| {
                NetError::Identity(format!("unknown role in identity uri '{uri}'"))
            })?;
            drover_proto::name::check(name)
                .map_err(|e| NetError::Identity(format!("bad name in identity uri: {e}")))?;
            // Two identities would leave which one acts to the order of the SANs, as two
            // scopes would leave the scope: refused, as those are.
            if let Some((_, first)) = &found {
                return Err(NetError::Identity(format!(
                    "certificate carries two drover identities, '{}' and '{}'",
                    first.escape_default(),
                    uri.escape_default()
                )));
            }
            found = Some((
                Identity {
                    role,
                    name: name.to_owned(),
                },
                uri,
            ));
        }
    }
    found.map(|(identity, _)| identity).ok_or_else(|| {
        NetError::Identity(
            "certificate carries no drover identity (spiffe://drover/<role>/<name>)".into(),
        )
    })
}

/// The URI prefix of identities; equal to `drover_pki::IDENTITY_PREFIX` (the daemons do
/// not link the PKI crate, a test keeps the two equal).
pub const fn drover_pki_prefix() -> &'static str {
    "spiffe://drover/"
}

/// Serial and expiry of the peer's certificate on an established connection.
pub fn peer_cert_info(conn: &quinn::Connection) -> Result<CertInfo, NetError> {
    cert_info(&peer_leaf(conn)?)
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, NetError> {
    identity_of_cert(&peer_leaf(conn)?)
}

/// The certificate the peer of an established connection presented for itself.
pub(crate) fn peer_leaf(conn: &quinn::Connection) -> Result<CertificateDer<'static>, NetError> {
    crate::peers::peer_chain(conn)?
        .into_iter()
        .next()
        .ok_or_else(|| NetError::Identity("peer presented an empty chain".into()))
}

/// A PEM parse error in words: the parser's own text shows the lines it quotes as
/// lists of byte values.
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "no '-----END {}-----' line: the file is cut short (being written?)",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line '{}'", String::from_utf8_lossy(line))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_cut_short_pem_is_told_in_words() {
        use rustls::pki_types::pem::PemObject as _;
        let cut = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        let e = CertificateDer::pem_slice_iter(cut)
            .next()
            .expect("an item")
            .unwrap_err();
        assert_eq!(
            pem_error(&e),
            "no '-----END CERTIFICATE-----' line: the file is cut short (being written?)"
        );
    }
    use super::*;
    use drover_pki::{Ca, LeafSpec};

    #[test]
    fn prefix_matches_the_pki_crate() {
        assert_eq!(drover_pki_prefix(), drover_pki::IDENTITY_PREFIX);
    }

    #[test]
    fn identity_is_read_from_the_certificate() {
        let ca = Ca::generate("t").unwrap();
        let leaf = ca
            .issue(&LeafSpec::new(PeerRole::Agent, "agent-7"))
            .unwrap();
        let creds = Credentials::from_pem(
            ca.pem().cert.as_bytes(),
            leaf.cert.as_bytes(),
            leaf.key.as_bytes(),
        )
        .unwrap();
        assert_eq!(
            creds.identity(),
            &Identity {
                role: PeerRole::Agent,
                name: "agent-7".into()
            }
        );
    }

    #[test]
    fn a_certificate_with_two_identities_is_refused() {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = [
            "spiffe://drover/client/tw",
            "spiffe://drover/agent/sensor-1",
        ]
        .iter()
        .map(|u| SanType::URI((*u).to_owned().try_into().unwrap()))
        .collect();
        let der = params.self_signed(&key).unwrap().der().clone();
        let err = identity_of_cert(&der).unwrap_err().to_string();
        assert!(
            err.contains(
                "two drover identities, 'spiffe://drover/client/tw' and 'spiffe://drover/agent/sensor-1'"
            ),
            "{err}"
        );
    }

    #[test]
    fn deny_lists_parse_and_match() {
        let list =
            DenyList::parse("# revoked\nagent/sensor-3\nserial:00AB:cd # old ops\n\n").unwrap();
        let id = |role, name: &str| Identity {
            role,
            name: name.into(),
        };
        let info = |serial: &str| CertInfo {
            serial: serial.into(),
            not_after: 0,
        };
        assert!(list.denies(&id(PeerRole::Agent, "sensor-3"), &info("1")));
        assert!(!list.denies(&id(PeerRole::Client, "sensor-3"), &info("1")));
        assert!(list.denies(&id(PeerRole::Client, "ops"), &info("abcd")));
        let err = DenyList::parse("ok/x\nnonsense\n").unwrap_err();
        assert!(err.starts_with("line 1: unknown role"), "{err}");
        assert!(
            DenyList::parse("serial:xyz")
                .unwrap_err()
                .contains("not a hex serial")
        );
    }

    #[test]
    fn expiry_warnings() {
        let info = CertInfo {
            serial: "1".into(),
            not_after: 100 * 86_400,
        };
        assert!(expiry_warning("c", &info, 0, 30).is_none());
        assert_eq!(
            expiry_warning("c", &info, 80 * 86_400, 30).unwrap(),
            "c expires in 20 days; renew it with `drover ca renew`"
        );
        assert_eq!(
            expiry_warning("c", &info, 101 * 86_400, 30).unwrap(),
            "c expired 1 days ago"
        );
    }

    #[test]
    fn certificate_facts_are_read() {
        let ca = Ca::generate("t").unwrap();
        let leaf = ca.issue(&LeafSpec::new(PeerRole::Agent, "a")).unwrap();
        let creds = Credentials::from_pem(
            ca.pem().cert.as_bytes(),
            leaf.cert.as_bytes(),
            leaf.key.as_bytes(),
        )
        .unwrap();
        let info = creds.cert_info().unwrap();
        assert!(!info.serial.is_empty());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(info.not_after > now + 300 * 86_400);
    }

    #[test]
    fn world_readable_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        fs::write(&key, "x").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_key_permissions(&key).unwrap_err().to_string();
        assert!(err.contains("mode 0644"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        check_key_permissions(&key).unwrap();
        // A certificate given as the key (the two files swapped): said so, not chmod.
        let cert = dir.path().join("ops.crt");
        fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_key_permissions(&cert).unwrap_err().to_string();
        assert!(
            err.contains("holds a certificate, not a private key"),
            "{err}"
        );
        assert!(err.contains("swapped"), "{err}");
        assert!(pem_holds(
            b"-----BEGIN EC PRIVATE KEY-----\n",
            "PRIVATE KEY"
        ));
        assert!(!pem_holds(b"BEGIN PRIVATE KEY", "PRIVATE KEY"));
    }

    /// A CA, a controller's credentials and an agent's.
    fn pki() -> (Credentials, Credentials) {
        let ca = Ca::generate("t").unwrap();
        let creds = |role, name: &str| {
            let leaf = ca.issue(&LeafSpec::new(role, name)).unwrap();
            Credentials::from_pem(
                ca.pem().cert.as_bytes(),
                leaf.cert.as_bytes(),
                leaf.key.as_bytes(),
            )
            .unwrap()
        };
        (
            creds(PeerRole::Controller, "ctl"),
            creds(PeerRole::Client, "ops"),
        )
    }

    /// Connects to `addr` with `cfg` and writes a byte; the result of the handshake.
    async fn tls_client(
        addr: std::net::SocketAddr,
        cfg: rustls::ClientConfig,
    ) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        // TLS 1.3 reports a refused client certificate only after the handshake.
        let mut buf = [0u8; 1];
        match tls.read(&mut buf).await {
            Ok(1) => Ok(()),
            Ok(_) => Err("closed".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn tcp_tls_requires_a_client_certificate_from_the_ca() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, client) = pki();
        let acceptor = TcpTlsAcceptor::new(&server).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // One message per connection this test makes.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok((mut tls, peer)) => {
                            let mut b = [0u8; 1];
                            let _ = tls.read_exact(&mut b).await;
                            let _ = tls.write_all(b"y").await;
                            let _ = tx.send(Ok(peer.identity));
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                });
            }
        });
        tls_client(addr, client.client_config().unwrap())
            .await
            .unwrap();
        let id = rx.recv().await.unwrap().unwrap();
        assert_eq!((id.role, id.name.as_str()), (PeerRole::Client, "ops"));

        let refused = tls_client(addr, client.anonymous_client_config().unwrap()).await;
        assert!(refused.is_err(), "{refused:?}");
        let err = rx.recv().await.unwrap().unwrap_err();
        assert!(err.contains("tls handshake failed"), "{err}");

        // A certificate from another CA is refused as well.
        let (_, stranger) = pki();
        assert!(
            tls_client(addr, stranger.client_config().unwrap())
                .await
                .is_err()
        );
        assert!(rx.recv().await.unwrap().is_err());
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = Credentials::from_pem(b"nope", b"nope", b"nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("CA file holds no certificate"), "{err}");
    }
}
