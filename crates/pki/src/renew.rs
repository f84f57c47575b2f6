//! Renewal: a successor for an issued certificate, from the same or another CA.
//!
//! The successor has a new key and serial and a new validity, and everything else of its
//! predecessor: subject, subject alternative names (so role and name), key usages for
//! its role, and every extension this crate does not itself write, copied as it is
//! (with its criticality), so that whatever a certificate carries besides its identity
//! survives renewal. Issued by another CA it moves its holder over to that CA, which is
//! how a CA rollover proceeds.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::extensions::GeneralName;

use crate::{Ca, Error, IDENTITY_PREFIX, Pem, Validity, io};

/// Extensions [`Ca::issue`] writes itself, which renewal therefore does not copy.
const OWN_EXTENSIONS: &[&str] = &[
    "2.5.29.17", // subject alternative name
    "2.5.29.15", // key usage
    "2.5.29.37", // extended key usage
    "2.5.29.19", // basic constraints
    "2.5.29.35", // authority key identifier
    "2.5.29.14", // subject key identifier
];

fn invalid(what: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("cannot renew: {what}"))
}

/// Facts about a certificate for messages: serial (hex) and the issuer's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Serial number, lower-case hex.
    pub serial: String,
    /// The issuer's subject.
    pub issuer: String,
    /// The holder's identity URI.
    pub identity: String,
}

/// Reads serial, issuer and identity of a PEM certificate.
pub fn describe(cert_pem: &str) -> Result<Issued, Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let x509 = pem
        .parse_x509()
        .map_err(|e| invalid(format!("unreadable certificate: {e}")))?;
    let identity = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|s| {
            s.value.general_names.iter().find_map(|g| match g {
                GeneralName::URI(u) if u.starts_with(IDENTITY_PREFIX) => Some((*u).to_owned()),
                _ => None,
            })
        })
        .ok_or_else(|| invalid("the certificate carries no drover identity"))?;
    Ok(Issued {
        // As daemons' logs, metrics and deny lists write it: lower-case hex without
        // leading zeros.
        serial: x509
            .raw_serial_as_string()
            .replace(':', "")
            .to_ascii_lowercase()
            .trim_start_matches('0')
            .to_owned(),
        issuer: x509.issuer().to_string(),
        identity,
    })
}

impl Ca {
    /// Issues the successor of `cert_pem` (see the module doc), valid for `validity`.
    pub fn renew(&self, cert_pem: &str, validity: Validity) -> Result<Pem, Error> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
        let x509 = pem
            .parse_x509()
            .map_err(|e| invalid(format!("unreadable certificate: {e}")))?;
        if x509.is_ca() {
            return Err(invalid(
                "it is a CA certificate; create a new CA with `ca init`",
            ));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        for attr in x509.subject().iter_attributes() {
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .ok_or_else(|| invalid("a subject attribute has an unusable type"))?
                .collect();
            let value = attr
                .as_str()
                .map_err(|e| invalid(format!("a subject attribute is not text: {e}")))?;
            dn.push(
                DnType::from_oid(&oid),
                DnValue::Utf8String(value.to_owned()),
            );
        }
        params.distinguished_name = dn;
        let mut role = None;
        let sans = x509
            .subject_alternative_name()
            .map_err(|e| invalid(format!("bad subject alternative names: {e}")))?
            .ok_or_else(|| invalid("the certificate has no subject alternative names"))?;
        for g in &sans.value.general_names {
            let san = match g {
                GeneralName::URI(u) => {
                    if let Some(rest) = u.strip_prefix(IDENTITY_PREFIX) {
                        role = rest
                            .split('/')
                            .next()
                            .and_then(drover_proto::msg::PeerRole::parse);
                    }
                    SanType::URI((*u).try_into()?)
                }
                GeneralName::DNSName(d) => SanType::DnsName((*d).try_into()?),
                GeneralName::IPAddress(b) => SanType::IpAddress(match b.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()),
                    16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()),
                    n => return Err(invalid(format!("an IP address SAN of {n} bytes"))),
                }),
                other => {
                    return Err(invalid(format!(
                        "unsupported subject alternative name {other}"
                    )));
                }
            };
            params.subject_alt_names.push(san);
        }
        let role = role.ok_or_else(|| invalid("the certificate carries no drover identity"))?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            drover_proto::msg::PeerRole::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            _ => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        for ext in x509.extensions() {
            let oid = ext.oid.to_id_string();
            if OWN_EXTENSIONS.contains(&oid.as_str()) {
                continue;
            }
            let arcs: Vec<u64> = ext
                .oid
                .iter()
                .ok_or_else(|| invalid(format!("extension {oid} has an unusable id")))?
                .collect();
            let mut copy = CustomExtension::from_oid_content(&arcs, ext.value.to_vec());
            copy.set_criticality(ext.critical);
            params.custom_extensions.push(copy);
        }
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// What [`renew_in_place`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The previous certificate, kept.
    pub cert_prev: PathBuf,
    /// The previous key, kept.
    pub key_prev: PathBuf,
    /// An earlier renewal had stopped between its two renames (the new key in place,
    /// the new certificate still at `<cert>.new`): it was finished, and no other
    /// certificate issued.
    pub finished_earlier: bool,
}

/// Renews the certificate `cert` (its key at `key`) with the CA in `dir`, in place: the
/// successor's key and certificate are written to temporary files (the key with mode
/// 0600), synced, and renamed over `key` and then `cert`; the previous ones stay as
/// `<cert>.prev` and `<key>.prev`. A reader between the two renames sees the new key
/// with the old certificate, and waits for the pair to match (daemons reload once the
/// directory is quiet); a renewal stopped there (a crash, a power cut) is finished by
/// the next one.
pub fn renew_in_place(
    dir: &Path,
    cert: &Path,
    key: &Path,
    validity: Validity,
) -> Result<Renewal, Error> {
    let ca = Ca::load(dir)?;
    let old = fs::read_to_string(cert).map_err(io(cert))?;
    let with = |p: &Path, ext: &str| {
        let mut s = p.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (key_tmp, cert_tmp) = (with(key, ".new"), with(cert, ".new"));
    let (key_prev, cert_prev) = (with(key, ".prev"), with(cert, ".prev"));
    // The file replaced must be this certificate's key: renewing a pair with another
    // file's path (another holder's key, the CA's own) would replace that file.
    let old_key = fs::read_to_string(key).map_err(io(key))?;
    let pair = KeyPair::from_pem(&old_key)
        .map_err(|e| Error::Invalid(format!("{}: not a private key: {e}", key.display())))?;
    if !crate::key_matches_cert(&pair, &old)
        && fs::read_to_string(&cert_tmp).is_ok_and(|new| crate::key_matches_cert(&pair, &new))
    {
        fs::rename(&cert_tmp, cert).map_err(io(cert))?;
        sync_parents(&[cert])?;
        return Ok(Renewal {
            cert_prev,
            key_prev,
            finished_earlier: true,
        });
    }
    if !crate::key_matches_cert(&pair, &old) {
        return Err(Error::Invalid(format!(
            "{} is not the key of {}: renewing would replace another key; give the \
             certificate's own key with --key",
            key.display(),
            cert.display()
        )));
    }
    let pem = ca.renew(&old, validity).map_err(|e| match e {
        Error::Invalid(m) => Error::Invalid(format!("{}: {m}", cert.display())),
        other => other,
    })?;
    // The new files are the old ones' owner's (the daemon's user, when root renews
    // them); the key is the owner's alone, as daemons require.
    use std::os::unix::fs::MetadataExt as _;
    let key_meta = fs::metadata(key).map_err(io(key))?;
    let cert_meta = fs::metadata(cert).map_err(io(cert))?;
    let owner = |m: &fs::Metadata| (m.uid(), m.gid());
    write_fresh(&key_tmp, &pem.key, 0o600, owner(&key_meta))?;
    if let Err(e) = write_fresh(&cert_tmp, &pem.cert, 0o644, owner(&cert_meta)) {
        // No fresh private key left lying about.
        let _ = fs::remove_file(&key_tmp);
        return Err(e);
    }
    // The previous pair, kept by a second link to each file (the key keeps its mode).
    for (cur, prev) in [(key, &key_prev), (cert, &cert_prev)] {
        match fs::remove_file(prev) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(prev)(e)),
        }
        fs::hard_link(cur, prev).map_err(io(prev))?;
    }
    fs::rename(&key_tmp, key).map_err(io(key))?;
    fs::rename(&cert_tmp, cert).map_err(io(cert))?;
    sync_parents(&[key, cert])?;
    Ok(Renewal {
        cert_prev,
        key_prev,
        finished_earlier: false,
    })
}

/// Syncs the directories holding `files`, so that their renames last.
fn sync_parents(files: &[&Path]) -> Result<(), Error> {
    for d in files.iter().filter_map(|f| f.parent()) {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(io(d))?;
    }
    Ok(())
}

/// Writes a file with `mode` and `owner` (uid, gid), replacing a leftover of an
/// interrupted renewal. The owner is given before anything is written; a file that
/// cannot be given to its owner is not written.
fn write_fresh(
    path: &Path,
    contents: &str,
    mode: u32,
    (uid, gid): (u32, u32),
) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    let now = {
        use std::os::unix::fs::MetadataExt as _;
        let m = f.metadata().map_err(io(path))?;
        (m.uid(), m.gid())
    };
    // The owner must be the old one's (its daemon reads the file); the group is kept
    // where it can be (an owner outside the file's group cannot give it).
    if now.0 != uid
        && let Err(e) = std::os::unix::fs::fchown(&f, Some(uid), None)
    {
        drop(f);
        let _ = fs::remove_file(path);
        return Err(Error::Invalid(format!(
            "{}: cannot give the renewed file to the old one's owner (uid {uid}), whose \
             daemon could not read it otherwise: {e}; renew as root or as that user",
            path.display()
        )));
    }
    if now.1 != gid {
        let _ = std::os::unix::fs::fchown(&f, None, Some(gid));
    }
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LeafSpec;
    use drover_proto::msg::PeerRole;
    use std::os::unix::fs::PermissionsExt;

    fn parse(pem: &str) -> x509_parser::pem::Pem {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1
    }

    #[test]
    fn a_successor_keeps_subject_names_and_unknown_extensions() {
        let ca = Ca::generate("old").unwrap();
        let mut spec = LeafSpec::new(PeerRole::Controller, "ctl");
        spec.sans.push("10.0.0.9".into());
        // A certificate with an extension this crate does not know, as a later version
        // might write.
        let issued = ca.issue(&spec).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ops");
        dn.push(DnType::OrganizationalUnitName, "client");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://drover/client/ops".try_into().unwrap(),
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let mut ext =
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![4, 1, 7]);
        ext.set_criticality(false);
        params.custom_extensions.push(ext);
        let key = KeyPair::generate().unwrap();
        let scoped = params.signed_by(&key, &ca.issuer).unwrap().pem();

        let new_ca = Ca::generate("new").unwrap();
        for old in [issued.cert.as_str(), scoped.as_str()] {
            let next = new_ca.renew(old, Validity::days(30)).unwrap();
            let (a, b) = (parse(old), parse(&next.cert));
            let (a, b) = (a.parse_x509().unwrap(), b.parse_x509().unwrap());
            assert_eq!(a.subject(), b.subject());
            assert_eq!(
                a.subject_alternative_name().unwrap().unwrap().value,
                b.subject_alternative_name().unwrap().unwrap().value
            );
            assert_ne!(a.raw_serial(), b.raw_serial());
            assert_ne!(a.public_key().raw, b.public_key().raw, "a new key");
            assert!(b.issuer().to_string().contains("new"), "{}", b.issuer());
            let unknown = |c: &x509_parser::certificate::X509Certificate<'_>| {
                c.extensions()
                    .iter()
                    .filter(|e| e.oid.to_id_string().starts_with("1.3.6.1.4.1.99999"))
                    .map(|e| (e.value.to_vec(), e.critical))
                    .collect::<Vec<_>>()
            };
            assert_eq!(unknown(&a), unknown(&b));
            assert_eq!(
                a.extended_key_usage().unwrap().map(|e| e.value.clone()),
                b.extended_key_usage().unwrap().map(|e| e.value.clone())
            );
        }
        assert!(describe(&scoped).unwrap().identity.ends_with("client/ops"));
    }

    #[test]
    fn a_client_keeps_its_scope_through_renewal() {
        let ca = Ca::generate("ca").unwrap();
        let mut spec = LeafSpec::new(PeerRole::Client, "dash");
        spec.scope = Some(drover_proto::access::Scope::Viewer);
        let issued = ca.issue(&spec).unwrap();
        let next = ca.renew(&issued.cert, Validity::days(30)).unwrap();
        let scope = |pem: &str| {
            let der = parse(pem).contents;
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            cert.subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => u.strip_prefix("urn:drover:scope:"),
                    _ => None,
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(scope(&issued.cert), ["viewer"]);
        assert_eq!(scope(&next.cert), ["viewer"], "a viewer stays a viewer");
    }

    #[test]
    fn a_renewal_given_another_files_key_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        crate::init_dir(dir.path()).unwrap();
        let (cert, _) =
            crate::issue_in_dir(dir.path(), &LeafSpec::new(PeerRole::Agent, "a1")).unwrap();
        let (_, other_key) =
            crate::issue_in_dir(dir.path(), &LeafSpec::new(PeerRole::Client, "ops")).unwrap();
        let ca_key = dir.path().join(crate::CA_KEY);
        let listing = || {
            let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        fs::read(e.path()).unwrap_or_default(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        let before = listing();
        for key in [&other_key, &ca_key] {
            let err = renew_in_place(dir.path(), &cert, key, Validity::days(5))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!(
                    "{} is not the key of {}",
                    key.display(),
                    cert.display()
                )),
                "{err}"
            );
            assert_eq!(listing(), before, "nothing written");
        }
        let err = renew_in_place(dir.path(), &cert, dir.path(), Validity::days(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert_eq!(listing(), before, "nothing written");
        // A CA directory whose key is not its certificate's issues nothing.
        fs::copy(&other_key, &ca_key).unwrap();
        let err = crate::issue_in_dir(dir.path(), &LeafSpec::new(PeerRole::Agent, "a2"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the CA key is not the CA certificate's key ("),
            "{err}"
        );
    }

    #[test]
    fn renewal_in_place_replaces_the_pair_and_keeps_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        crate::init_dir(dir.path()).unwrap();
        let (cert, key) =
            crate::issue_in_dir(dir.path(), &LeafSpec::new(PeerRole::Agent, "a1")).unwrap();
        let old = fs::read_to_string(&cert).unwrap();
        let Renewal {
            cert_prev,
            key_prev,
            finished_earlier,
        } = renew_in_place(dir.path(), &cert, &key, Validity::days(5)).unwrap();
        assert!(!finished_earlier);
        assert_eq!(fs::read_to_string(&cert_prev).unwrap(), old);
        assert_ne!(fs::read_to_string(&cert).unwrap(), old);
        for k in [&key, &key_prev] {
            assert_eq!(fs::metadata(k).unwrap().permissions().mode() & 0o777, 0o600);
        }
        // Again: the previous pair is replaced, nothing else is left behind.
        renew_in_place(dir.path(), &cert, &key, Validity::days(5)).unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "a1.crt",
                "a1.crt.prev",
                "a1.key",
                "a1.key.prev",
                "ca.crt",
                "ca.key"
            ]
        );
    }

    /// A renewal cut short between its renames (the new key in place, the new
    /// certificate not) leaves a pair no daemon can load; the next renewal finishes it
    /// rather than refuse the mismatched pair.
    #[test]
    fn a_renewal_stopped_between_its_renames_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        crate::init_dir(dir.path()).unwrap();
        let (cert, key) =
            crate::issue_in_dir(dir.path(), &LeafSpec::new(PeerRole::Agent, "a1")).unwrap();
        let (old_cert, old_key) = (fs::read(&cert).unwrap(), fs::read(&key).unwrap());
        renew_in_place(dir.path(), &cert, &key, Validity::days(5)).unwrap();
        let (new_cert, new_key) = (fs::read(&cert).unwrap(), fs::read(&key).unwrap());
        // As the renewal left things had it stopped after its first rename.
        let pending = dir.path().join("a1.crt.new");
        fs::write(&pending, &new_cert).unwrap();
        fs::write(&cert, &old_cert).unwrap();
        let mismatched = crate::key_matches_cert(
            &KeyPair::from_pem(&String::from_utf8(new_key.clone()).unwrap()).unwrap(),
            &String::from_utf8(old_cert.clone()).unwrap(),
        );
        assert!(!mismatched);
        let r = renew_in_place(dir.path(), &cert, &key, Validity::days(5)).unwrap();
        assert!(r.finished_earlier);
        assert_eq!(fs::read(&cert).unwrap(), new_cert);
        assert_eq!(fs::read(&key).unwrap(), new_key);
        assert!(!pending.exists());
        assert_eq!(fs::read(&r.cert_prev).unwrap(), old_cert);
        assert_eq!(fs::read(&r.key_prev).unwrap(), old_key);
        // A `.new` file that is not the key's certificate changes nothing.
        fs::write(&cert, &old_cert).unwrap();
        fs::write(&pending, &old_cert).unwrap();
        let err = renew_in_place(dir.path(), &cert, &key, Validity::days(5)).unwrap_err();
        assert!(err.to_string().contains("is not the key of"), "{err}");
        assert_eq!(fs::read(&cert).unwrap(), old_cert);
    }

    /// Renewed by root for a daemon that runs as another user: the new pair is that
    /// user's, as the old one was, so the daemon can read it.
    #[test]
    fn a_renewed_pair_keeps_its_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        crate::init_dir(dir.path()).unwrap();
        let (cert, key) =
            crate::issue_in_dir(dir.path(), &LeafSpec::new(PeerRole::Agent, "a1")).unwrap();
        for f in [&cert, &key] {
            if let Err(e) = std::os::unix::fs::chown(f, Some(65534), Some(65534)) {
                eprintln!("skipped: giving a file away takes root ({e})");
                return;
            }
        }
        renew_in_place(dir.path(), &cert, &key, Validity::days(5)).unwrap();
        for f in [&cert, &key] {
            let m = fs::metadata(f).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", f.display());
        }
        assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn what_cannot_be_renewed_is_a_clear_error() {
        let ca = Ca::generate("t").unwrap();
        let err = ca
            .renew("garbage", Validity::days(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot renew: not a PEM certificate"),
            "{err}"
        );
        let err = ca
            .renew(&ca.pem().cert, Validity::days(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("it is a CA certificate"), "{err}");
    }
}
