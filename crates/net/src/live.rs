//! The rustls side of reloadable credentials.
//!
//! Every configuration built from one [`crate::Credentials`] shares a [`Slot`] holding the
//! material loaded last. The certificate resolvers and verifiers here read the slot at
//! each handshake, so that replacing its content changes what new connections present
//! and accept, without new endpoints and without touching established connections.

use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::tls::Material;

/// The material of the moment.
#[derive(Debug)]
pub(crate) struct Slot(RwLock<Arc<Material>>);

impl Slot {
    pub(crate) fn new(m: Material) -> Self {
        Self(RwLock::new(Arc::new(m)))
    }

    /// The current material.
    pub(crate) fn get(&self) -> Arc<Material> {
        // Only whole `Arc`s are stored under the lock, so a poisoned one is still whole.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stores `m`; the previous material.
    pub(crate) fn replace(&self, m: Arc<Material>) -> Arc<Material> {
        let mut w = self.0.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *w, m)
    }
}

/// Presents the current certificate to clients.
#[derive(Debug)]
pub(crate) struct LiveServerCert(pub(crate) Arc<Slot>);

impl ResolvesServerCert for LiveServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().certified.clone())
    }
}

/// Presents the current certificate to servers.
#[derive(Debug)]
pub(crate) struct LiveClientCert(pub(crate) Arc<Slot>);

impl ResolvesClientCert for LiveClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates against the current roots.
#[derive(Debug)]
pub(crate) struct LiveClientVerifier(pub(crate) Arc<Slot>);

impl ClientCertVerifier for LiveClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    // No hints: every drover process holds one certificate, and the hints could not be
    // borrowed from material that may be replaced meanwhile.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified =
            self.0
                .get()
                .client_verifier
                .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &verified {
            // The connection's own refusal names only its address (the handshake ends
            // before a peer is known): who it claimed to be is said here, as far as the
            // refused certificate says it.
            let who = crate::tls::identity_of_cert(end_entity).map_or_else(
                |_| "a certificate without a drover identity".to_owned(),
                |id| format!("{} '{}'", id.role, id.name),
            );
            let serial = crate::tls::cert_info(end_entity)
                .map(|i| i.serial)
                .unwrap_or_default();
            tracing::warn!(serial, "refused the certificate of {who}: {e}");
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .get()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .get()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().client_verifier.supported_verify_schemes()
    }
}

/// Verifies server certificates against the current roots.
#[derive(Debug)]
pub(crate) struct LiveServerVerifier(pub(crate) Arc<Slot>);

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.get().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .get()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .get()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().server_verifier.supported_verify_schemes()
    }
}
