//! The live connections of a process, so that a reload can look at them again.
//!
//! Every authenticated connection is tracked with the chain its peer presented and a way
//! to close it, for as long as its [`Tracked`] guard lives. After new credentials or a
//! new deny list are adopted, [`Peers::sweep`] checks each one as a new handshake would
//! and closes those whose peer is now revoked or whose chain no longer verifies against
//! the roots trusted now; the others are not touched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, ServerName};

use crate::NetError;
use crate::tls::{CertInfo, Credentials, DenyList, Identity, cert_info, identity_of_cert};

/// The QUIC application close code of a connection closed because its peer is revoked or
/// no longer trusted.
pub const CLOSE_UNTRUSTED: u32 = 6;

/// The close code of every connection of a controller that stops.
pub const CLOSE_STOPPING: u32 = 0;

/// The close code of a connection a controller lets go of while it runs on: it stepped
/// down as leader, or the connection was replaced by a newer one of the same peer.
pub const CLOSE_LET_GO: u32 = 5;

type Closer = Box<dyn Fn(&str) + Send + Sync>;

struct Entry {
    identity: Identity,
    cert: CertInfo,
    addr: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    /// The name we dialled the peer by; `None` when it dialled us.
    dialled: Option<ServerName<'static>>,
    close: Closer,
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    entries: Mutex<BTreeMap<u64, Entry>>,
}

impl Inner {
    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        // Entries are inserted and removed whole; a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The tracked connections of a process. Clones share the set.
#[derive(Clone, Default)]
pub struct Peers(Arc<Inner>);

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("tracked", &self.0.entries().len())
            .finish()
    }
}

/// Keeps a connection tracked while it lives.
#[must_use = "the connection is tracked only while the guard lives"]
pub struct Tracked {
    peers: Arc<Inner>,
    id: u64,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked").field("id", &self.id).finish()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.peers.entries().remove(&self.id);
    }
}

/// A connected peer, as seen by [`Peers::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Who it is.
    pub identity: Identity,
    /// Where it connects from.
    pub addr: SocketAddr,
    /// The certificate it presented.
    pub cert: CertInfo,
}

/// A connection [`Peers::sweep`] closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// Whose it was.
    pub peer: PeerCert,
    /// Why: revoked, or the cause its chain fails.
    pub reason: String,
}

impl Closed {
    /// One line for logs and events.
    pub fn message(&self) -> String {
        format!(
            "closed the connection of {} from {}: {}",
            self.peer.identity, self.peer.addr, self.reason
        )
    }
}

/// The chain a QUIC connection's peer presented.
pub fn peer_chain(conn: &quinn::Connection) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let chain = conn
        .peer_identity()
        .ok_or_else(|| NetError::Identity("peer presented no certificate".into()))?
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| NetError::Identity("unexpected peer identity type".into()))?;
    Ok(*chain)
}

impl Peers {
    /// Tracks a QUIC connection: `dialled` is the name we dialled it by, `None` when the
    /// peer dialled us. A sweep closes it with [`CLOSE_UNTRUSTED`].
    pub fn track_quic(
        &self,
        conn: &quinn::Connection,
        dialled: Option<&str>,
    ) -> Result<Tracked, NetError> {
        let chain = peer_chain(conn)?;
        let dialled = dialled
            .map(|n| {
                ServerName::try_from(n.to_owned())
                    .map_err(|e| NetError::Identity(format!("bad server name '{n}': {e}")))
            })
            .transpose()?;
        let c = conn.clone();
        let close = move |reason: &str| c.close(CLOSE_UNTRUSTED.into(), reason.as_bytes());
        self.track(chain, conn.remote_address(), dialled, Box::new(close))
    }

    /// Tracks any connection whose peer presented `chain` (it dialled us), closed by
    /// `close` (with the reason) when a sweep finds it untrusted.
    pub fn track_accepted(
        &self,
        chain: Vec<CertificateDer<'static>>,
        addr: SocketAddr,
        close: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<Tracked, NetError> {
        self.track(chain, addr, None, Box::new(close))
    }

    fn track(
        &self,
        chain: Vec<CertificateDer<'static>>,
        addr: SocketAddr,
        dialled: Option<ServerName<'static>>,
        close: Closer,
    ) -> Result<Tracked, NetError> {
        let leaf = chain
            .first()
            .ok_or_else(|| NetError::Identity("peer presented an empty chain".into()))?;
        let entry = Entry {
            identity: identity_of_cert(leaf)?,
            cert: cert_info(leaf)?,
            addr,
            chain,
            dialled,
            close,
        };
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        self.0.entries().insert(id, entry);
        Ok(Tracked {
            peers: self.0.clone(),
            id,
        })
    }

    /// Every tracked peer.
    pub fn list(&self) -> Vec<PeerCert> {
        self.0.entries().values().map(Entry::peer).collect()
    }

    /// Closes every tracked connection whose peer `deny` revokes or whose chain `creds`
    /// no longer trusts; the rest are left alone.
    pub fn sweep(&self, creds: &Credentials, deny: &DenyList) -> Vec<Closed> {
        let mut closed = Vec::new();
        let mut entries = self.0.entries();
        entries.retain(|_, e| {
            let reason = if deny.denies(&e.identity, &e.cert) {
                format!("the certificate (serial {}) is revoked", e.cert.serial)
            } else {
                match creds.verify_peer(&e.chain, e.dialled.as_ref()) {
                    Ok(()) => return true,
                    Err(cause) => format!("the certificate is no longer trusted: {cause}"),
                }
            };
            (e.close)(&reason);
            closed.push(Closed {
                peer: e.peer(),
                reason,
            });
            false
        });
        closed
    }
}

impl Entry {
    fn peer(&self) -> PeerCert {
        PeerCert {
            identity: self.identity.clone(),
            addr: self.addr,
            cert: self.cert.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_pki::{Ca, LeafSpec};
    use drover_proto::msg::PeerRole;
    use rustls::pki_types::pem::PemObject;

    fn chain(ca: &Ca, role: PeerRole, name: &str) -> Vec<CertificateDer<'static>> {
        let pem = ca.issue(&LeafSpec::new(role, name)).unwrap();
        vec![CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap()]
    }

    #[test]
    fn a_sweep_closes_the_revoked_and_the_untrusted_and_nothing_else() {
        let ca = Ca::generate("ours").unwrap();
        let stranger = Ca::generate("theirs").unwrap();
        let me = ca
            .issue(&LeafSpec::new(PeerRole::Controller, "ctl"))
            .unwrap();
        let creds = Credentials::from_pem(
            ca.pem().cert.as_bytes(),
            me.cert.as_bytes(),
            me.key.as_bytes(),
        )
        .unwrap();
        let peers = Peers::default();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let closes = Arc::new(Mutex::new(Vec::new()));
        let track = |c: Vec<CertificateDer<'static>>, tag: &'static str| {
            let closes = closes.clone();
            peers
                .track_accepted(c, addr, move |why| {
                    closes.lock().unwrap().push(format!("{tag}: {why}"));
                })
                .unwrap()
        };
        let _kept = track(chain(&ca, PeerRole::Agent, "a1"), "a1");
        let _revoked = track(chain(&ca, PeerRole::Client, "ops"), "ops");
        let _untrusted = track(chain(&stranger, PeerRole::Agent, "a2"), "a2");
        let gone = track(chain(&ca, PeerRole::Client, "gone"), "gone");
        drop(gone);
        assert_eq!(peers.list().len(), 3);

        let deny = DenyList::parse("client/ops\nclient/gone\n").unwrap();
        let closed = peers.sweep(&creds, &deny);
        let mut names: Vec<&str> = closed
            .iter()
            .map(|c| c.peer.identity.name.as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["a2", "ops"]);
        let mut seen = closes.lock().unwrap().clone();
        seen.sort();
        assert!(
            seen[0].starts_with("a2: the certificate is no longer trusted"),
            "{seen:?}"
        );
        assert!(
            seen[1].starts_with("ops: the certificate (serial "),
            "{seen:?}"
        );
        assert!(seen[1].ends_with(") is revoked"), "{seen:?}");
        // What is left is tracked; a second sweep closes nothing more.
        assert_eq!(peers.list().len(), 1);
        assert!(peers.sweep(&creds, &deny).is_empty());
        assert_eq!(seen.len(), 2);
    }
}
