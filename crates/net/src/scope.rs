//! A client's scope, read from its verified certificate (see [`drover_proto::access`]).
//!
//! The scope is a URI subject alternative name `urn:drover:scope:<scope>`. A certificate
//! without one has none (the controller treats such a client as `admin`); one with an
//! unknown scope, or with more than one, is refused rather than guessed at: a typo must
//! not widen or narrow what a client may do silently.

use drover_proto::access::{SCOPE_URI_PREFIX, Scope};
use rustls::pki_types::CertificateDer;

use crate::NetError;

/// The scope a certificate carries, if any.
pub fn scope_of_cert(cert: &CertificateDer<'_>) -> Result<Option<Scope>, NetError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| NetError::Identity(format!("cannot parse certificate: {e}")))?;
    let Some(sans) = x509
        .subject_alternative_name()
        .map_err(|e| NetError::Identity(format!("bad subject alternative names: {e}")))?
    else {
        return Ok(None);
    };
    let mut found = None;
    for gn in &sans.value.general_names {
        let x509_parser::extensions::GeneralName::URI(uri) = gn else {
            continue;
        };
        // URNs compare their "urn" and namespace case-insensitively (RFC 8141), and a
        // URN of drover's namespace that is not a scope is a misspelt one: either way
        // it must not leave the client unscoped, which would make it an admin.
        let lower = uri.to_ascii_lowercase();
        if lower.starts_with("spiffe://") {
            // The identity, read elsewhere.
            continue;
        }
        if !lower.starts_with("urn:drover:") {
            // Nor may a near miss of the namespace or its encoding (`urn:drovr:scope:`,
            // `urn:drover%3Ascope:`): whatever names drover or a scope and is not a
            // scope URN is refused, not passed over.
            if lower.contains("drover") || lower.contains("scope") {
                return Err(NetError::Identity(format!(
                    "certificate carries '{uri}', which is not a scope (expected \
                     {SCOPE_URI_PREFIX}viewer, operator or admin; a URI naming drover or \
                     a scope is taken for a misspelt one)"
                )));
            }
            continue;
        }
        let Some(name) = lower.strip_prefix(SCOPE_URI_PREFIX) else {
            return Err(NetError::Identity(format!(
                "certificate carries '{uri}', which is not a scope (expected \
                 {SCOPE_URI_PREFIX}viewer, operator or admin)"
            )));
        };
        {
            let scope = Scope::parse(name).ok_or_else(|| {
                NetError::Identity(format!(
                    "unknown scope '{name}' in certificate (expected viewer, operator or admin)"
                ))
            })?;
            if found.is_some() {
                return Err(NetError::Identity(
                    "certificate carries more than one scope".into(),
                ));
            }
            found = Some(scope);
        }
    }
    Ok(found)
}

/// The scope of the peer's certificate on an established connection, if any.
pub fn peer_scope(conn: &quinn::Connection) -> Result<Option<Scope>, NetError> {
    scope_of_cert(&crate::tls::peer_leaf(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_pki::{Ca, LeafSpec};
    use drover_proto::msg::PeerRole;
    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn scopes_are_read_from_issued_certificates() {
        let ca = Ca::generate("t").unwrap();
        let plain = ca.issue(&LeafSpec::new(PeerRole::Client, "ops")).unwrap();
        assert_eq!(scope_of_cert(&der(&plain.cert)).unwrap(), None);
        for scope in Scope::ALL {
            let mut spec = LeafSpec::new(PeerRole::Client, "c");
            spec.scope = Some(scope);
            let pem = ca.issue(&spec).unwrap();
            assert_eq!(scope_of_cert(&der(&pem.cert)).unwrap(), Some(scope));
        }
    }

    fn self_signed(uris: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).to_owned().try_into().unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn other_uris_are_left_alone() {
        assert_eq!(
            scope_of_cert(&self_signed(&[
                "spiffe://drover/client/x",
                "https://example.com/teams/net"
            ]))
            .unwrap(),
            None
        );
    }

    #[test]
    fn unknown_and_repeated_scopes_are_errors() {
        let err = scope_of_cert(&self_signed(&[
            "spiffe://drover/client/x",
            "urn:drover:scope:root",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown scope 'root'"), "{err}");
        let err = scope_of_cert(&self_signed(&[
            "urn:drover:scope:viewer",
            "urn:drover:scope:admin",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("more than one scope"), "{err}");
        assert_eq!(scope_of_cert(&self_signed(&[])).unwrap(), None);
    }

    #[test]
    fn a_scope_urn_spelt_otherwise_is_read_or_refused_never_ignored() {
        // The same URN (RFC 8141 compares "urn" and the namespace case-insensitively).
        assert_eq!(
            scope_of_cert(&self_signed(&["URN:DROVER:SCOPE:viewer"])).unwrap(),
            Some(Scope::Viewer)
        );
        assert_eq!(
            scope_of_cert(&self_signed(&["urn:Drover:scope:Operator"])).unwrap(),
            Some(Scope::Operator)
        );
        // A misspelt one: without a scope the client would be an admin.
        for uri in [
            "urn:drover:scopes:viewer",
            "URN:drover:role:viewer",
            "urn:drovr:scope:viewer",
            "urn:drover%3Ascope:viewer",
            "urn:drover",
            "https://example.com/scope/viewer",
        ] {
            let err = scope_of_cert(&self_signed(&[uri])).unwrap_err().to_string();
            assert!(
                err.contains(&format!("carries '{uri}', which is not a scope")),
                "{err}"
            );
        }
    }
}
