//! drover-pki: the cluster's certificate authority.
//!
//! Every drover process holds a certificate signed by the cluster CA. The certificate says
//! who its holder is with a URI subject alternative name `spiffe://drover/<role>/<name>`,
//! where role is `controller`, `agent` or `client`; the controller enforces it (an agent
//! registers only under its certificate's name, a client certificate cannot register as
//! an agent, an agent certificate cannot make client requests).
//!
//! Keys are ECDSA P-256. Private keys are written with mode 0600 and never overwritten.
//! Only the `drover` CLI (`drover ca ...`) and tests link this crate: the daemons only load
//! PEM files.

mod renew;

pub use renew::{Issued, Renewal, describe, renew_in_place};

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use drover_proto::access::Scope;
use drover_proto::msg::PeerRole;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate in a PKI directory.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA key in a PKI directory.
pub const CA_KEY: &str = "ca.key";

/// The default validity of a CA, in days (ten years).
pub const CA_DAYS: i64 = 3650;

/// The URI SAN prefix that carries role and name.
pub const IDENTITY_PREFIX: &str = "spiffe://drover/";

/// Errors of CA operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file to be created exists already.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    /// A name or SAN is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate and its key, PEM-encoded.
#[derive(Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Whether `key` is the key of the first certificate in `cert_pem` (false when that is
/// not a certificate).
pub(crate) fn key_matches_cert(key: &KeyPair, cert_pem: &str) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return false;
    };
    pem.parse_x509()
        .is_ok_and(|x| x.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// Validity of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not valid before.
    pub not_before: OffsetDateTime,
    /// Not valid after.
    pub not_after: OffsetDateTime,
}

/// The longest validity, in days, `drover ca` issues: a hundred years keeps every date
/// well inside what X.509 and the date arithmetic can express.
pub const MAX_DAYS: i64 = 36_500;

impl Validity {
    /// From a minute ago (tolerating clock skew) for `days` days.
    ///
    /// # Panics
    ///
    /// When `days` is outside `1..=MAX_DAYS`; use [`Validity::for_days`] for user input.
    pub fn days(days: i64) -> Self {
        match Self::for_days(days) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// From a minute ago (tolerating clock skew) for `days` days, which must be within
    /// `1..=MAX_DAYS`.
    pub fn for_days(days: i64) -> Result<Self, Error> {
        if !(1..=MAX_DAYS).contains(&days) {
            return Err(Error::Invalid(format!(
                "validity of {days} days is out of range: it must be 1..={MAX_DAYS} days"
            )));
        }
        let now = OffsetDateTime::now_utc();
        Ok(Self {
            not_before: now - Duration::minutes(1),
            not_after: now + Duration::days(days),
        })
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// The holder's role.
    pub role: PeerRole,
    /// The holder's name (an instance name for agents).
    pub name: String,
    /// Extra DNS names or IP addresses the holder is reachable at.
    pub sans: Vec<String>,
    /// Validity period.
    pub validity: Validity,
    /// For a client: what it may do ([`Scope`]), carried as a URI SAN
    /// `urn:drover:scope:<scope>`; a client certificate without one is `admin`.
    pub scope: Option<Scope>,
}

impl LeafSpec {
    /// A spec valid for a year, with no extra SANs.
    pub fn new(role: PeerRole, name: impl Into<String>) -> Self {
        Self {
            role,
            name: name.into(),
            sans: Vec::new(),
            validity: Validity::days(365),
            scope: None,
        }
    }
}

/// A certificate authority held in memory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: Pem,
}

impl Ca {
    /// Generates a new CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, Error> {
        Self::generate_for(common_name, Validity::days(CA_DAYS))
    }

    /// Generates a new CA valid for `validity`.
    pub fn generate_for(common_name: &str, validity: Validity) -> Result<Self, Error> {
        Self::generate_with(KeyPair::generate()?, common_name, validity)
    }

    /// A new cluster CA: named `drover cluster CA`, the day it begins and the start of
    /// its public key in hex, so that the CAs of a bundle during a rollover (and in a
    /// metric's `ca` label, and in "issued by") can be told apart.
    pub fn generate_cluster(validity: Validity) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        // An uncompressed EC point: a constant tag, then the key's x coordinate.
        let id: String = key
            .public_key_raw()
            .iter()
            .skip(1)
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        let day = validity.not_before.date();
        let name = format!(
            "drover cluster CA {:04}-{:02}-{:02} {id}",
            day.year(),
            u8::from(day.month()),
            day.day()
        );
        Self::generate_with(key, &name, validity)
    }

    fn generate_with(key: KeyPair, common_name: &str, validity: Validity) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "drover");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        let pem = Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// Loads a CA from PEM text.
    pub fn from_pem(cert: &str, key: &str) -> Result<Self, Error> {
        let key_pair = KeyPair::from_pem(key)?;
        if !key_matches_cert(&key_pair, cert) {
            return Err(Error::Invalid(
                "the CA key is not the CA certificate's key".to_owned(),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert, key_pair)?;
        Ok(Self {
            issuer,
            pem: Pem {
                cert: cert.to_owned(),
                key: key.to_owned(),
            },
        })
    }

    /// Loads the CA of a PKI directory.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert = fs::read_to_string(&cert_path).map_err(|e| {
            let e = if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "No such file or directory: no CA there (`drover ca init --dir {}` makes one)",
                        dir.display()
                    ),
                )
            } else {
                e
            };
            io(&cert_path)(e)
        })?;
        // As the daemons refuse their own keys: the CA's key is the cluster's.
        let mode = {
            use std::os::unix::fs::PermissionsExt as _;
            fs::metadata(&key_path)
                .map_err(io(&key_path))?
                .permissions()
                .mode()
                & 0o777
        };
        if mode & 0o077 != 0 {
            return Err(Error::Invalid(format!(
                "CA key {} is accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
                key_path.display(),
                key_path.display()
            )));
        }
        let key = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        Self::from_pem(&cert, &key).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!(
                "{m} ({}, {})",
                cert_path.display(),
                key_path.display()
            )),
            other => other,
        })
    }

    /// The CA certificate and key.
    pub fn pem(&self) -> &Pem {
        &self.pem
    }

    /// Issues a leaf certificate.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Pem, Error> {
        drover_proto::name::check(&spec.name)
            .map_err(|e| Error::Invalid(format!("invalid certificate name: {e}")))?;
        if let Some(scope) = spec.scope
            && spec.role != PeerRole::Client
        {
            return Err(Error::Invalid(format!(
                "scope {scope} is for client certificates, not for a {}",
                spec.role
            )));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.name.as_str());
        dn.push(DnType::OrganizationalUnitName, spec.role.as_str());
        params.distinguished_name = dn;
        let uri = format!("{IDENTITY_PREFIX}{}/{}", spec.role.as_str(), spec.name);
        let mut sans = vec![SanType::URI(uri.try_into()?)];
        if let Some(scope) = spec.scope {
            sans.push(SanType::URI(scope.uri().try_into()?));
        }
        // The name doubles as a DNS name so peers can verify it as a server name.
        sans.push(SanType::DnsName(spec.name.clone().try_into()?));
        if spec.role == PeerRole::Controller {
            for default in ["localhost", "127.0.0.1", "::1"] {
                if !spec.sans.iter().any(|s| s == default) {
                    sans.push(san(default)?);
                }
            }
        }
        for s in &spec.sans {
            sans.push(san(s)?);
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Controllers and agents both accept and dial connections (agents may listen for
        // the controller); clients only dial.
        params.extended_key_usages = match spec.role {
            PeerRole::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            PeerRole::Controller | PeerRole::Agent => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.not_before = spec.validity.not_before;
        params.not_after = spec.validity.not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

fn san(s: &str) -> Result<SanType, Error> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        return Err(Error::Invalid(format!(
            "'{s}' is neither an IP address nor a DNS name"
        )));
    }
    Ok(SanType::DnsName(s.to_owned().try_into()?))
}

/// Writes `contents` to a new file with `mode`, refusing to overwrite.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists(path.to_owned())
            } else {
                Error::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Creates a CA valid for ten years in `dir` (`ca.crt`, and `ca.key` with mode 0600).
pub fn init_dir(dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
    init_dir_for(dir, Validity::days(CA_DAYS))
}

/// Creates a CA valid for `validity` in `dir` (`ca.crt`, and `ca.key` with mode 0600).
pub fn init_dir_for(dir: &Path, validity: Validity) -> Result<(PathBuf, PathBuf), Error> {
    // Made 0700 whatever the umask: whoever may write the directory may swap `ca.crt`
    // (or remove `ca.key`). One that exists keeps its mode, as do the parents made for
    // it (`/etc/drover` for `/etc/drover/pki`: other users read certificates there).
    if !dir.is_dir() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(Error::Exists(p.clone()));
        }
    }
    let ca = Ca::generate_cluster(validity)?;
    write_new(&key_path, &ca.pem.key, 0o600)?;
    write_new(&cert_path, &ca.pem.cert, 0o644)?;
    Ok((cert_path, key_path))
}

/// Issues `NAME.crt` and `NAME.key` (mode 0600) in `dir` with the CA found there.
pub fn issue_in_dir(dir: &Path, spec: &LeafSpec) -> Result<(PathBuf, PathBuf), Error> {
    let ca = Ca::load(dir)?;
    let pem = ca.issue(spec)?;
    let cert_path = dir.join(format!("{}.crt", spec.name));
    let key_path = dir.join(format!("{}.key", spec.name));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(Error::Exists(p.clone()));
        }
    }
    write_new(&key_path, &pem.key, 0o600)?;
    write_new(&cert_path, &pem.cert, 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_dir_has_private_key_mode_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init_dir(dir.path()).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            fs::read_to_string(cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        assert!(matches!(init_dir(dir.path()), Err(Error::Exists(_))));
        // A directory it makes is the owner's alone, whatever the umask allowed.
        let made = dir.path().join("new/pki");
        init_dir(&made).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&made), 0o700);
        // Its parent is made as any directory is: others may need to go through it.
        fs::create_dir(dir.path().join("plain")).unwrap();
        assert_eq!(
            mode(&dir.path().join("new")),
            mode(&dir.path().join("plain"))
        );
    }

    /// Two CAs, as during a rollover, have names that tell them apart.
    #[test]
    fn each_cluster_ca_has_a_name_of_its_own() {
        // Its common name, and the prefix it should have: the day its validity begins.
        let cn = |dir: &Path| -> (String, String) {
            let pem = fs::read(dir.join(CA_CERT)).unwrap();
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            let cert = pem.parse_x509().unwrap();
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned();
            let day = cert.validity().not_before.to_datetime().date();
            let prefix = format!(
                "drover cluster CA {:04}-{:02}-{:02} ",
                day.year(),
                u8::from(day.month()),
                day.day()
            );
            (cn, prefix)
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_dir(a.path()).unwrap();
        init_dir(b.path()).unwrap();
        let (a, b) = (cn(a.path()), cn(b.path()));
        assert_ne!(a.0, b.0);
        for (cn, prefix) in [&a, &b] {
            let id = cn
                .strip_prefix(prefix.as_str())
                .unwrap_or_else(|| panic!("{cn}"));
            assert!(
                id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()),
                "{cn}"
            );
        }
    }

    #[test]
    fn leaf_carries_role_and_name() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path()).unwrap();
        let mut spec = LeafSpec::new(PeerRole::Agent, "agent-1");
        spec.sans.push("10.1.2.3".into());
        let (cert, key) = issue_in_dir(dir.path(), &spec).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pem = fs::read(cert).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let x509 = pem.parse_x509().unwrap();
        let sans = x509.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", sans.value.general_names);
        assert!(text.contains("spiffe://drover/agent/agent-1"), "{text}");
        assert!(
            text.contains("10.1.2.3") || text.contains("[10, 1, 2, 3]"),
            "{text}"
        );
        assert!(matches!(
            issue_in_dir(dir.path(), &spec),
            Err(Error::Exists(_))
        ));
    }

    #[test]
    fn bad_names_and_sans_are_refused() {
        let ca = Ca::generate("t").unwrap();
        assert!(ca.issue(&LeafSpec::new(PeerRole::Agent, "../x")).is_err());
        let mut spec = LeafSpec::new(PeerRole::Agent, "a");
        spec.sans.push("not a host".into());
        let err = ca.issue(&spec).unwrap_err().to_string();
        assert!(
            err.contains("neither an IP address nor a DNS name"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_key_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = init_dir(dir.path()).unwrap();
        Ca::load(dir.path()).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let Err(err) = Ca::load(dir.path()) else {
            panic!("a CA key of mode 0640 was taken");
        };
        assert_eq!(
            err.to_string(),
            format!(
                "CA key {} is accessible by group or others (mode 0640); run: chmod 600 {}",
                key.display(),
                key.display()
            )
        );
    }

    #[test]
    fn validity_out_of_range_is_an_error_not_a_panic() {
        for days in [0, -1, -365, MAX_DAYS + 1, i64::MAX, i64::MIN] {
            let err = Validity::for_days(days).unwrap_err().to_string();
            assert!(err.contains(&format!("{days} days")), "{err}");
            assert!(err.contains("1..=36500"), "{err}");
        }
        let v = Validity::for_days(MAX_DAYS).unwrap();
        let ca = Ca::generate_for("t", v).unwrap();
        let mut spec = LeafSpec::new(PeerRole::Client, "ops");
        spec.validity = Validity::for_days(1).unwrap();
        ca.issue(&spec).unwrap();
        spec.validity = v;
        ca.issue(&spec).unwrap();
    }

    #[test]
    fn a_client_scope_is_a_uri_san_and_only_clients_get_one() {
        let ca = Ca::generate("t").unwrap();
        let mut spec = LeafSpec::new(PeerRole::Client, "dash");
        spec.scope = Some(Scope::Viewer);
        let pem = ca.issue(&spec).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.cert.as_bytes()).unwrap();
        let x509 = pem.parse_x509().unwrap();
        let sans = x509.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", sans.value.general_names);
        assert!(text.contains("spiffe://drover/client/dash"), "{text}");
        assert!(text.contains("urn:drover:scope:viewer"), "{text}");
        for role in [PeerRole::Agent, PeerRole::Controller] {
            let mut spec = LeafSpec::new(role, "x");
            spec.scope = Some(Scope::Admin);
            let err = ca.issue(&spec).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("scope admin is for client certificates, not for a {role}")
            );
        }
    }

    #[test]
    fn debug_output_hides_the_key() {
        let ca = Ca::generate("t").unwrap();
        let pem = ca.issue(&LeafSpec::new(PeerRole::Client, "ops")).unwrap();
        assert!(!format!("{pem:?}").contains("PRIVATE KEY"));
    }
}
