//! What a daemon trusts, reloadable as a whole: its credentials (CA bundle, certificate,
//! key) and its deny list, with the connections they admitted.
//!
//! [`Trust::reload`] reads every file first and changes nothing unless all of them are
//! usable: a broken key, a certificate of another identity or a deny list with a bad line
//! keeps the material in use and returns the cause. When they are, new handshakes use
//! them at once, and every live connection whose peer is now revoked or no longer
//! trusted is closed ([`Peers::sweep`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::NetError;
use crate::peers::{Closed, Peers, Tracked};
use crate::tls::{Adopted, Credentials, DenyList, Epoch, TlsFiles};

/// Credentials, deny list and live connections of a daemon.
#[derive(Debug)]
pub struct Trust {
    files: TlsFiles,
    deny_path: Option<PathBuf>,
    creds: Credentials,
    deny: RwLock<Arc<DenyList>>,
    peers: Peers,
    /// Held for a whole reload, so that two never interleave.
    reloading: Mutex<()>,
    /// How reloads went: a lock of its own, taken only briefly, so that `/metrics`
    /// never waits for a reload that is reading files.
    stats: Mutex<ReloadStats>,
}

/// How reloads went so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStats {
    /// Reloads that took effect.
    pub succeeded: u64,
    /// Reloads refused (the previous material stayed).
    pub failed: u64,
    /// Why the last reload failed, while no later one succeeded.
    pub failing: Option<String>,
    /// When the certificate the last reload refused as not valid yet becomes valid (Unix
    /// seconds): a reload is worth trying again then.
    pub valid_from: Option<i64>,
}

/// What a reload changed.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// Certificate and CA bundle.
    pub adopted: Adopted,
    /// Entries of the deny list now in force.
    pub deny_entries: usize,
    /// Connections closed because their peer is revoked or no longer trusted.
    pub closed: Vec<Closed>,
}

/// How many days before its end a daemon warns that its certificate expires.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Trust {
    /// Loads the credentials and, when configured, the deny list.
    pub fn load(files: &TlsFiles, deny_path: Option<&Path>) -> Result<Self, NetError> {
        let creds = Credentials::load(files)?;
        let deny = match deny_path {
            Some(p) => DenyList::load(p)?,
            None => DenyList::default(),
        };
        Ok(Self {
            files: files.clone(),
            deny_path: deny_path.map(Path::to_owned),
            creds,
            deny: RwLock::new(Arc::new(deny)),
            peers: Peers::default(),
            reloading: Mutex::default(),
            stats: Mutex::default(),
        })
    }

    /// The credentials; configurations built from them follow reloads.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The files reloads read.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The deny list file, if any.
    pub fn deny_path(&self) -> Option<&Path> {
        self.deny_path.as_deref()
    }

    /// The deny list in force.
    pub fn deny(&self) -> Arc<DenyList> {
        self.deny.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The tracked connections.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// How reloads went so far.
    pub fn stats(&self) -> ReloadStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tracks an authenticated QUIC connection (see [`Peers::track_quic`]) and checks it
    /// against what is trusted now, so that a connection verified with material a
    /// concurrent reload just replaced is not let through: either the reload's sweep
    /// sees it tracked, or this check sees the new material.
    pub fn track_quic(
        &self,
        conn: &quinn::Connection,
        dialled: Option<&str>,
    ) -> Result<Tracked, NetError> {
        let tracked = self.peers.track_quic(conn, dialled)?;
        self.check_chain(conn, dialled)?;
        Ok(tracked)
    }

    /// As [`Trust::track_quic`] for a connection whose handshake started after
    /// `before` was taken ([`Credentials::epoch`]): when the material is still the same,
    /// the handshake's verifier checked the peer with what is trusted now, and a reload
    /// that replaces it later sweeps the connection, which is tracked by then; so the
    /// chain is checked again only when a reload happened meanwhile. Checking it again
    /// costs as much as the handshake's own verification, which shows when hundreds of
    /// agents reconnect at once.
    pub fn track_quic_since(
        &self,
        conn: &quinn::Connection,
        dialled: Option<&str>,
        before: &Epoch,
    ) -> Result<Tracked, NetError> {
        let tracked = self.peers.track_quic(conn, dialled)?;
        // Read after tracking: a reload whose new material this misses replaces it
        // only afterwards, and then sweeps what is tracked.
        if !before.is_current(&self.creds) {
            self.check_chain(conn, dialled)?;
        }
        Ok(tracked)
    }

    /// Checks a connection's peer chain against the material in force now.
    fn check_chain(&self, conn: &quinn::Connection, dialled: Option<&str>) -> Result<(), NetError> {
        let chain = crate::peers::peer_chain(conn)?;
        let dialled = dialled
            .map(|n| rustls::pki_types::ServerName::try_from(n.to_owned()))
            .transpose()
            .map_err(|e| NetError::Identity(format!("bad server name: {e}")))?;
        self.creds
            .verify_peer(&chain, dialled.as_ref())
            .map_err(|cause| {
                NetError::Identity(format!("the certificate is no longer trusted: {cause}"))
            })
    }

    /// Reads every file again and, if all are usable, puts them in force and closes the
    /// connections of peers now revoked or untrusted. On error nothing changed.
    pub fn reload(&self) -> Result<Reloaded, NetError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let mut valid_from = None;
        let result = self.reload_locked(&mut valid_from);
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.valid_from = valid_from;
        match &result {
            Ok(_) => {
                stats.succeeded += 1;
                stats.failing = None;
            }
            Err(e) => {
                stats.failed += 1;
                stats.failing = Some(e.to_string());
            }
        }
        result
    }

    /// How long until a reload is worth trying again, when the last one refused a
    /// certificate not valid yet: until it is (at most five minutes, so that a clock
    /// set right meanwhile is noticed).
    pub fn retry_after(&self, now: i64) -> Option<std::time::Duration> {
        let from = self.stats().valid_from?;
        let wait = (from - now).clamp(0, 299) + 1;
        Some(std::time::Duration::from_secs(wait.unsigned_abs()))
    }

    fn reload_locked(&self, valid_from: &mut Option<i64>) -> Result<Reloaded, NetError> {
        let next = Credentials::load(&self.files)?;
        // A certificate that peers would refuse must not replace one they accept.
        if let Err(why) = next.check_own(unix_now()) {
            if let crate::tls::Unusable::NotYetValid { from, .. } = why {
                *valid_from = Some(from);
            }
            return Err(NetError::Credentials(format!(
                "certificate {} {why}",
                self.files.cert.display()
            )));
        }
        let deny = match &self.deny_path {
            Some(p) => DenyList::load(p)?,
            None => DenyList::default(),
        };
        let adopted = self.creds.adopt(&next)?;
        let deny = Arc::new(deny);
        *self.deny.write().unwrap_or_else(|p| p.into_inner()) = deny.clone();
        let closed = self.peers.sweep(&self.creds, &deny);
        Ok(Reloaded {
            adopted,
            deny_entries: deny.len(),
            closed,
        })
    }
}

impl Trust {
    /// Appends the certificate gauges and reload counters to a `/metrics` page: this
    /// process's certificate, each trusted CA and each connected peer's certificate
    /// (expiry as Unix time), and how reloads went.
    pub fn render_metrics(&self, out: &mut String) {
        use drover_metrics::{counter_samples, gauge, labels};
        let own = self
            .creds
            .cert_info()
            .map(|i| vec![(labels(&[("serial", i.serial.as_str())]), i.not_after as f64)])
            .unwrap_or_default();
        gauge(
            out,
            "drover_cert_expiry_seconds",
            "When this daemon's certificate expires (Unix time).",
            &own,
        );
        let cas: Vec<(String, f64)> = self
            .creds
            .cas()
            .iter()
            .map(|c| {
                (
                    labels(&[
                        ("ca", c.subject.as_str()),
                        ("serial", c.cert.serial.as_str()),
                    ]),
                    c.cert.not_after as f64,
                )
            })
            .collect();
        gauge(
            out,
            "drover_ca_cert_expiry_seconds",
            "When each CA of the trusted bundle expires (Unix time).",
            &cas,
        );
        // The soonest expiry per peer, whose connections may be several (clients).
        let mut peers = std::collections::BTreeMap::<String, i64>::new();
        for p in self.peers.list() {
            let key = format!("{}/{}", p.identity.role, p.identity.name);
            let e = peers.entry(key).or_insert(p.cert.not_after);
            *e = (*e).min(p.cert.not_after);
        }
        let peers: Vec<(String, f64)> = peers
            .iter()
            .map(|(k, v)| (labels(&[("peer", k.as_str())]), *v as f64))
            .collect();
        gauge(
            out,
            "drover_peer_cert_expiry_seconds",
            "When the certificate of each connected peer (role/name) expires (Unix time).",
            &peers,
        );
        let stats = self.stats();
        counter_samples(
            out,
            "drover_cert_reloads_total",
            "Reloads of certificates, key, CA bundle and deny list, by result.",
            &[
                (labels(&[("result", "ok")]), stats.succeeded as f64),
                (labels(&[("result", "failed")]), stats.failed as f64),
            ],
        );
        gauge(
            out,
            "drover_cert_reload_failing",
            "1 while the last reload failed (the previous material is still in use).",
            &[(String::new(), f64::from(u8::from(stats.failing.is_some())))],
        );
    }
}

impl Reloaded {
    /// One line for the log: what is in force now.
    pub fn summary(&self, now: i64) -> String {
        let days = (self.adopted.cert.not_after - now).div_euclid(86_400);
        format!(
            "{} certificate serial {} (expires in {days} days), {} trusted CA{}{}, deny list of {} entr{}",
            if self.adopted.cert_changed {
                "new"
            } else {
                "same"
            },
            self.adopted.cert.serial,
            self.adopted.cas.len(),
            if self.adopted.cas.len() == 1 { "" } else { "s" },
            if self.adopted.roots_changed {
                " (changed)"
            } else {
                ""
            },
            self.deny_entries,
            if self.deny_entries == 1 { "y" } else { "ies" },
        )
    }
}

impl Trust {
    /// [`Trust::reload`], logged: what is in force now and each connection closed, or
    /// why nothing changed. `cause` says what asked for it, `whose` names this process
    /// in expiry warnings ("this agent's certificate"). Returns what changed, or the
    /// failure's message.
    pub fn reload_logged(&self, cause: &str, whose: &str) -> Result<Reloaded, String> {
        let now = unix_now();
        match self.reload() {
            Ok(done) => {
                tracing::info!("reloaded certificates ({cause}): {}", done.summary(now));
                if let Some(w) =
                    crate::tls::expiry_warning(whose, &done.adopted.cert, now, EXPIRY_WARNING_DAYS)
                {
                    tracing::warn!("{w}");
                }
                for c in &done.closed {
                    tracing::warn!("{}", c.message());
                }
                Ok(done)
            }
            Err(e) => {
                let m = format!(
                    "reload failed ({cause}), keeping the certificates, key, CA bundle and deny list in use: {e}"
                );
                tracing::error!("{m}");
                Err(m)
            }
        }
    }

    /// Checks this daemon's own certificate as it starts (`whose` names it in messages):
    /// one its own CA bundle does not verify is an error, as peers sharing the bundle
    /// would refuse every connection; one outside its validity or expiring within 30
    /// days is a warning, as the daemon still has nodes to look after and a reload can
    /// bring a good certificate.
    pub fn check_at_start(&self, whose: &str) -> Result<(), NetError> {
        let now = unix_now();
        match self.creds.check_own(now) {
            Err(why @ crate::tls::Unusable::Untrusted(_)) => Err(NetError::Credentials(format!(
                "{whose} {} {why} (ca {})",
                self.files.cert.display(),
                self.files.ca.display()
            ))),
            Err(why) => {
                tracing::warn!(
                    "{whose} {} {why}: peers refuse it; install a valid one and reload",
                    self.files.cert.display()
                );
                Ok(())
            }
            Ok(()) => {
                if let Ok(info) = self.creds.cert_info()
                    && let Some(w) = crate::tls::expiry_warning(
                        &format!("{whose} {}", self.files.cert.display()),
                        &info,
                        now,
                        EXPIRY_WARNING_DAYS,
                    )
                {
                    tracing::warn!("{w}");
                }
                Ok(())
            }
        }
    }

    /// Runs for the life of the daemon: warns in the log once this daemon's certificate
    /// (whichever is in force) comes within 30 days of its end, and again every day
    /// while it is, as the warning at start says nothing to a daemon that runs for
    /// months.
    pub async fn warn_of_expiry(self: Arc<Self>, whose: String) {
        const DAY: i64 = 86_400;
        let mut now = unix_now();
        loop {
            let Ok(info) = self.creds.cert_info() else {
                return;
            };
            let window = info.not_after - EXPIRY_WARNING_DAYS * DAY;
            // Past the window's start (which is not in it), and a day at most, so that a
            // renewal or a clock change is seen.
            let wait = if now >= window {
                DAY
            } else {
                (window - now + 1).min(DAY)
            };
            tokio::time::sleep(std::time::Duration::from_secs(wait.unsigned_abs())).await;
            now = unix_now();
            let Ok(info) = self.creds.cert_info() else {
                return;
            };
            if let Some(w) = crate::tls::expiry_warning(&whose, &info, now, EXPIRY_WARNING_DAYS) {
                tracing::warn!("{w}");
            }
        }
    }

    /// Every file a reload reads, for a daemon that watches them.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let f = &self.files;
        let mut v = vec![f.ca.clone(), f.cert.clone(), f.key.clone()];
        v.extend(self.deny_path.clone());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_pki::{Ca, LeafSpec};
    use drover_proto::msg::PeerRole;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;

    struct Files {
        _dir: tempfile::TempDir,
        files: TlsFiles,
        deny: PathBuf,
    }

    fn write_key(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn files(ca: &Ca, role: PeerRole, name: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let leaf = ca.issue(&LeafSpec::new(role, name)).unwrap();
        let files = TlsFiles {
            ca: dir.path().join("ca.crt"),
            cert: dir.path().join("me.crt"),
            key: dir.path().join("me.key"),
        };
        std::fs::write(&files.ca, &ca.pem().cert).unwrap();
        std::fs::write(&files.cert, &leaf.cert).unwrap();
        write_key(&files.key, &leaf.key);
        let deny = dir.path().join("deny");
        std::fs::write(&deny, "").unwrap();
        Files {
            _dir: dir,
            files,
            deny,
        }
    }

    fn chain(ca: &Ca, role: PeerRole, name: &str) -> Vec<CertificateDer<'static>> {
        let pem = ca.issue(&LeafSpec::new(role, name)).unwrap();
        vec![CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap()]
    }

    #[test]
    fn a_broken_file_keeps_everything_in_use_and_says_why() {
        let ca = Ca::generate("a").unwrap();
        let f = files(&ca, PeerRole::Controller, "ctl");
        let trust = Trust::load(&f.files, Some(&f.deny)).unwrap();
        let before = trust.credentials().cert_info().unwrap();
        let peer = chain(&ca, PeerRole::Agent, "a1");

        // A key that is not a key; then a certificate of another CA with a key that
        // does not match it, then with its own; then a deny list with a bad line.
        write_key(
            &f.files.key,
            "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
        );
        let err = trust.reload().unwrap_err().to_string();
        assert!(err.starts_with("unusable private key"), "{err}");
        let other = Ca::generate("b").unwrap();
        let leaf = other
            .issue(&LeafSpec::new(PeerRole::Controller, "ctl"))
            .unwrap();
        std::fs::write(&f.files.cert, &leaf.cert).unwrap();
        write_key(
            &f.files.key,
            &ca.issue(&LeafSpec::new(PeerRole::Controller, "ctl"))
                .unwrap()
                .key,
        );
        let err = trust.reload().unwrap_err().to_string();
        assert!(
            err.contains("certificate and key do not match: the key is not the certificate's"),
            "{err}"
        );
        assert!(!err.contains("renewal"), "{err}");
        // Left so by a renewal stopped between its renames: the error says what to do.
        let mut pending = f.files.cert.as_os_str().to_owned();
        pending.push(".new");
        std::fs::write(&pending, &leaf.cert).unwrap();
        let err = trust.reload().unwrap_err().to_string();
        assert!(
            err.contains(
                ".new exists: a renewal stopped before its end? `drover ca renew` again finishes it"
            ),
            "{err}"
        );
        std::fs::remove_file(&pending).unwrap();
        // Its own key now: a certificate the bundle does not verify, which peers sharing
        // the bundle would refuse.
        write_key(&f.files.key, &leaf.key);
        let err = trust.reload().unwrap_err().to_string();
        assert!(
            err.contains("does not verify against its own CA bundle: unknown issuer"),
            "{err}"
        );
        let renewed = ca
            .issue(&LeafSpec::new(PeerRole::Controller, "ctl"))
            .unwrap();
        std::fs::write(&f.files.cert, &renewed.cert).unwrap();
        write_key(&f.files.key, &renewed.key);
        std::fs::write(&f.deny, "agent/a1\nnonsense\n").unwrap();
        let err = trust.reload().unwrap_err().to_string();
        assert!(
            err.contains("invalid deny list") && err.contains("line 2"),
            "{err}"
        );

        assert_eq!(trust.credentials().cert_info().unwrap(), before);
        assert!(trust.deny().is_empty());
        trust.credentials().verify_peer(&peer, None).unwrap();
        let stats = trust.stats();
        assert_eq!((stats.succeeded, stats.failed), (0, 5));
        assert!(stats.failing.unwrap().contains("invalid deny list"));

        // Fixed: all of it in force at once.
        std::fs::write(&f.deny, "agent/a1\n").unwrap();
        let done = trust.reload().unwrap();
        assert!(done.adopted.cert_changed && !done.adopted.roots_changed);
        assert_eq!(done.deny_entries, 1);
        assert_eq!(trust.stats().failing, None);
        let mut page = String::new();
        trust.render_metrics(&mut page);
        assert!(
            page.contains("drover_cert_reloads_total{result=\"failed\"} 5"),
            "{page}"
        );
        assert!(page.contains("drover_cert_reload_failing 0"), "{page}");
    }

    #[test]
    fn an_epoch_is_current_until_a_reload_puts_new_material_in_force() {
        let ca = Ca::generate("a").unwrap();
        let f = files(&ca, PeerRole::Controller, "ctl");
        let trust = Trust::load(&f.files, None).unwrap();
        let creds = trust.credentials();
        let before = creds.epoch();
        assert!(before.is_current(creds));
        // A refused reload changes nothing, so what was verified before stands.
        write_key(&f.files.key, "not a key");
        trust.reload().unwrap_err();
        assert!(before.is_current(creds));
        // Once one takes effect, connections verified under the old material are
        // checked again when tracked ([`Trust::track_quic_since`]).
        let leaf = ca
            .issue(&LeafSpec::new(PeerRole::Controller, "ctl"))
            .unwrap();
        std::fs::write(&f.files.cert, &leaf.cert).unwrap();
        write_key(&f.files.key, &leaf.key);
        trust.reload().unwrap();
        assert!(!before.is_current(creds));
        assert!(creds.epoch().is_current(creds));
    }

    #[test]
    fn a_new_bundle_decides_which_peers_verify() {
        let old = Ca::generate("old").unwrap();
        let new = Ca::generate("new").unwrap();
        let f = files(&old, PeerRole::Controller, "ctl");
        let trust = Trust::load(&f.files, None).unwrap();
        let from_old = chain(&old, PeerRole::Agent, "a1");
        let from_new = chain(&new, PeerRole::Agent, "a1");
        let creds = trust.credentials();
        creds.verify_peer(&from_old, None).unwrap();
        assert!(
            creds
                .verify_peer(&from_new, None)
                .unwrap_err()
                .contains("unknown issuer")
        );

        // Both CAs, then only the new one (with our own certificate renewed by it).
        std::fs::write(&f.files.ca, format!("{}{}", old.pem().cert, new.pem().cert)).unwrap();
        let done = trust.reload().unwrap();
        assert!(done.adopted.roots_changed && !done.adopted.cert_changed);
        assert_eq!(done.adopted.cas.len(), 2);
        creds.verify_peer(&from_old, None).unwrap();
        creds.verify_peer(&from_new, None).unwrap();
        let server = rustls::pki_types::ServerName::try_from("a1").unwrap();
        creds.verify_peer(&from_new, Some(&server)).unwrap();

        let renewed = new
            .renew(
                &std::fs::read_to_string(&f.files.cert).unwrap(),
                drover_pki::Validity::days(9),
            )
            .unwrap();
        std::fs::write(&f.files.cert, &renewed.cert).unwrap();
        write_key(&f.files.key, &renewed.key);
        std::fs::write(&f.files.ca, &new.pem().cert).unwrap();
        trust.reload().unwrap();
        assert!(
            creds
                .verify_peer(&from_old, None)
                .unwrap_err()
                .contains("unknown issuer")
        );
        creds.verify_peer(&from_new, None).unwrap();
    }

    #[test]
    fn a_certificate_of_another_identity_is_refused() {
        let ca = Ca::generate("a").unwrap();
        let f = files(&ca, PeerRole::Agent, "a1");
        let trust = Trust::load(&f.files, None).unwrap();
        let other = ca.issue(&LeafSpec::new(PeerRole::Agent, "a2")).unwrap();
        std::fs::write(&f.files.cert, &other.cert).unwrap();
        write_key(&f.files.key, &other.key);
        let err = trust.reload().unwrap_err().to_string();
        assert_eq!(
            err,
            "the new certificate belongs to agent 'a2', but this process is agent 'a1'"
        );
        assert_eq!(trust.credentials().identity().name, "a1");
    }
}
