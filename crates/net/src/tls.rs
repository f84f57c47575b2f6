//! Mutual TLS: loading credentials, building rustls configurations, reading identities.
//!
//! Only the ring crypto provider is used, always passed explicitly (never the process
//! default), so a second provider in the dependency tree cannot make a builder panic.
//! Only TLS 1.3 is offered. Server-side session tickets are off: a resumed session skips
//! certificate verification, and a revoked peer must be refused on its next connection.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_proto::msg::{ALPN, PeerRole};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::NetError;

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

/// A process's loaded credentials: the roots it trusts, its own chain and key, and the
/// identity its certificate claims.
#[derive(Clone)]
pub struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    identity: Identity,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn cred_err(path: &Path, what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Credentials(format!("{what} {}: {e}", path.display()))
}

/// Refuses a private key file that group or others may read.
pub fn check_key_permissions(path: &Path) -> Result<(), NetError> {
    let meta = fs::metadata(path).map_err(|e| cred_err(path, "cannot read private key", e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(NetError::Credentials(format!(
            "private key {} is accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

impl Credentials {
    /// Loads and checks the PEM files.
    pub fn load(files: &TlsFiles) -> Result<Self, NetError> {
        check_key_permissions(&files.key)?;
        let ca = fs::read(&files.ca).map_err(|e| cred_err(&files.ca, "cannot read CA", e))?;
        let cert = fs::read(&files.cert)
            .map_err(|e| cred_err(&files.cert, "cannot read certificate", e))?;
        let key =
            fs::read(&files.key).map_err(|e| cred_err(&files.key, "cannot read private key", e))?;
        Self::from_pem(&ca, &cert, &key).map_err(|e| match e {
            NetError::Credentials(m) => NetError::Credentials(format!(
                "{m} (ca {}, cert {}, key {})",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            )),
            other => other,
        })
    }

    /// Builds credentials from PEM text.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, NetError> {
        let mut roots = RootCertStore::empty();
        let mut any = false;
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| NetError::Credentials(format!("bad CA certificate PEM: {e}")))?;
            roots
                .add(c)
                .map_err(|e| NetError::Credentials(format!("unusable CA certificate: {e}")))?;
            any = true;
        }
        if !any {
            return Err(NetError::Credentials(
                "the CA file holds no certificate".into(),
            ));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| NetError::Credentials(format!("bad certificate PEM: {e}")))?;
        let leaf = chain.first().ok_or_else(|| {
            NetError::Credentials("the certificate file holds no certificate".into())
        })?;
        let identity = identity_of_cert(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| NetError::Credentials(format!("bad private key PEM: {e}")))?;
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            identity,
        })
    }

    /// The identity this process's own certificate claims.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A rustls server configuration that requires a client certificate from the CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, NetError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| NetError::Credentials(format!("cannot build client verifier: {e}")))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| NetError::Credentials(format!("certificate and key do not match: {e}")))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
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
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| NetError::Credentials(format!("certificate and key do not match: {e}")))?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }

    /// A client configuration that trusts the CA but presents no certificate (tests).
    pub fn anonymous_client_config(&self) -> Result<rustls::ClientConfig, NetError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

fn tls_err(e: rustls::Error) -> NetError {
    NetError::Credentials(format!("tls configuration: {e}"))
}

/// The one crypto provider drover uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the identity (`spiffe://drover/<role>/<name>`) from a certificate.
pub fn identity_of_cert(cert: &CertificateDer<'_>) -> Result<Identity, NetError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| NetError::Identity(format!("cannot parse certificate: {e}")))?;
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| NetError::Identity(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| NetError::Identity("certificate has no subject alternative names".into()))?;
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
            return Ok(Identity {
                role,
                name: name.to_owned(),
            });
        }
    }
    Err(NetError::Identity(
        "certificate carries no drover identity (spiffe://drover/<role>/<name>)".into(),
    ))
}

/// The URI prefix of identities; equal to `drover_pki::IDENTITY_PREFIX` (the daemons do
/// not link the PKI crate, a test keeps the two equal).
pub const fn drover_pki_prefix() -> &'static str {
    "spiffe://drover/"
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, NetError> {
    let chain = conn
        .peer_identity()
        .ok_or_else(|| NetError::Identity("peer presented no certificate".into()))?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| NetError::Identity("unexpected peer identity type".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| NetError::Identity("peer presented an empty chain".into()))?;
    identity_of_cert(leaf)
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = Credentials::from_pem(b"nope", b"nope", b"nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("CA file holds no certificate"), "{err}");
    }
}
