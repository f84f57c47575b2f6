//! Leader election on an etcd lease, and the gate that lets only the leader serve.
//!
//! Every controller of an HA group campaigns for one key, `<prefix>leader`, holding its
//! advertised address and attached to a lease of `--leader-lease`. The one whose
//! transaction creates the key leads; the key's create revision names its term. The
//! others poll the key and answer every Hello with "not the leader; the leader is ADDR".
//!
//! The leader renews its lease every quarter of the lease (one renewal lost costs
//! nothing). When two thirds of the lease passed since the last renewal it sent that etcd
//! acknowledged (before etcd can expire the lease), its term goes stale: no write and no
//! command to agents passes the gate, clients are still answered with a warning that
//! answers may be stale. When twice the lease passed, it closes its agents' connections
//! (another controller may lead by then, and they should find it; closing them is not
//! what keeps two leaders apart, the gate is). A renewal acknowledged before then makes
//! the term fresh again, so an etcd leader election (one to two seconds, during which
//! etcd renews nothing) costs no step-down; learning that the lease or the key is gone
//! ends the term. Writes are fenced independently: each is a transaction conditional on
//! the leader key still having this term's create revision (see `etcd_store`), so a
//! controller that was paused past its lease cannot write even before it notices.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::{Compare, Etcd, Op};

/// Refusal text of a follower; clients and agents follow the address after it.
pub use drover_proto::msg::NOT_LEADER;

/// How a controller of an HA group reaches etcd and names itself.
#[derive(Debug, Clone)]
pub struct HaSettings {
    /// The etcd client.
    pub etcd: Etcd,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// The leader lease.
    pub lease: Duration,
    /// The address clients and agents should dial to reach this controller.
    pub advertise: String,
    /// How often the leader compacts etcd's history ([`compact`]); `None`: never.
    pub compact_every: Option<Duration>,
}

impl HaSettings {
    /// The leader key.
    pub fn leader_key(&self) -> Vec<u8> {
        format!("{}leader", self.prefix).into_bytes()
    }
}

#[derive(Debug, Clone)]
struct Term {
    create_revision: i64,
    /// When the last acknowledged renewal was sent (or the lease granted).
    renewed: Instant,
    token: CancellationToken,
}

#[derive(Debug, Default)]
struct GateState {
    term: Option<Term>,
    /// The leader's address and term (its key's create revision) as last read from
    /// etcd, when we do not lead.
    leader: Option<(String, i64)>,
    /// When this controller last ended a term of its own: until it learns who leads
    /// now, a dialer is held for the answer rather than told no leader is elected
    /// (one most likely is: the term ended because another took over).
    stepped_down: Option<Instant>,
    /// Why this controller's last campaign failed (etcd answered with an error, such as
    /// its quota being full), while no leader is known: said in refusals, since etcd is
    /// reachable then and "no leader is elected" alone points away from the cause.
    campaign_error: Option<String>,
}

/// Whether this controller may serve and write, and for which term.
#[derive(Debug)]
pub struct Gate {
    lease: Duration,
    /// etcd's endpoints, named in what a leader cut off from etcd answers.
    endpoints: String,
    state: Mutex<GateState>,
    /// Bumped whenever this controller starts or ends a term or learns of another
    /// leader, for Hellos held until then ([`Gate::holds`]).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Gate {
    /// A gate for a lease of `lease` on the etcd cluster at `endpoints`, closed until a
    /// term begins.
    pub fn new(lease: Duration, endpoints: impl Into<String>) -> Self {
        Self {
            lease,
            endpoints: endpoints.into(),
            state: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes (`changed()`) at the next start or end of a term or news of another
    /// leader; subscribe before reading the gate, so that no change is missed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether a Hello from a dialer that lost the leader of term `lost` should wait
    /// for news rather than be refused now: this controller does not lead, and the
    /// leader it knows is that very term's (probably gone: its lease has not expired
    /// yet) or it knows none (an election is under way, or etcd is away). Its answer
    /// then names the successor, or welcomes the dialer when this controller is it.
    pub fn holds(&self, lost: i64) -> bool {
        let state = self.lock();
        state.term.is_none() && state.leader.as_ref().is_none_or(|(_, term)| *term == lost)
    }

    /// Whether this controller ended its own term within two leases and has not learnt
    /// the next leader yet: a dialer that knows of no lost term is held for the answer
    /// too (see [`Gate::holds`]).
    pub fn learning_leader(&self) -> bool {
        let state = self.lock();
        state.term.is_none()
            && state.leader.is_none()
            && state
                .stepped_down
                .is_some_and(|t| t.elapsed() < self.lease * 2)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long after the last renewal the leader stops writing and commanding agents.
    pub fn serve_for(&self) -> Duration {
        self.lease * 2 / 3
    }

    fn refusal(state: &GateState) -> String {
        match &state.leader {
            Some((addr, _)) => format!("{NOT_LEADER}{addr}"),
            None => match &state.campaign_error {
                Some(e) => format!(
                    "not the leader; no leader is elected yet (this controller cannot \
                     campaign: {e})"
                ),
                None => "not the leader; no leader is elected yet (or etcd is unreachable)".into(),
            },
        }
    }

    fn stale_message(&self, t: &Term) -> String {
        format!(
            "this controller has had no answer from etcd ({}) for {:.1}s, so it cannot renew its leader lease: it refuses changes until etcd answers, and what it answers may be stale",
            self.endpoints,
            t.renewed.elapsed().as_secs_f64()
        )
    }

    /// The current term's token and create revision while this controller leads and its
    /// lease is fresh: it may write and command agents. Otherwise why not.
    pub fn serving(&self) -> Result<(CancellationToken, i64), String> {
        let state = self.lock();
        match &state.term {
            Some(t) if t.token.is_cancelled() => Err(Self::refusal(&state)),
            Some(t) if t.renewed.elapsed() < self.serve_for() => {
                Ok((t.token.clone(), t.create_revision))
            }
            Some(t) => Err(self.stale_message(t)),
            None => Err(Self::refusal(&state)),
        }
    }

    /// The current term's token while this controller leads, fresh or not, with a
    /// warning when its lease could not be renewed in time (its answers may be stale);
    /// otherwise the refusal. Clients are served on this; agents and writes need
    /// [`Gate::serving`].
    pub fn answering(&self) -> Result<(CancellationToken, Option<String>), String> {
        let state = self.lock();
        match &state.term {
            Some(t) if t.token.is_cancelled() => Err(Self::refusal(&state)),
            Some(t) if t.renewed.elapsed() < self.serve_for() => Ok((t.token.clone(), None)),
            Some(t) => Ok((t.token.clone(), Some(self.stale_message(t)))),
            None => Err(Self::refusal(&state)),
        }
    }

    /// Whether this controller holds a term whose lease has not run out by its own
    /// count (renewed in time or not): once it has, another may lead.
    pub fn leads(&self) -> bool {
        let state = self.lock();
        state
            .term
            .as_ref()
            .is_some_and(|t| !t.token.is_cancelled() && t.renewed.elapsed() < self.lease)
    }

    /// Why this controller's answers may be stale: it leads on a lease it could not
    /// renew in time. `None` when it leads normally or does not lead.
    pub fn stale(&self) -> Option<String> {
        self.answering().ok().and_then(|(_, w)| w)
    }

    /// How long this controller may still serve without another renewal (zero when it
    /// does not lead).
    pub fn time_left(&self) -> Duration {
        self.lock().term.as_ref().map_or(Duration::ZERO, |t| {
            (t.renewed + self.serve_for()).saturating_duration_since(Instant::now())
        })
    }

    fn lead(&self, create_revision: i64, renewed: Instant) -> CancellationToken {
        let token = CancellationToken::new();
        {
            let mut state = self.lock();
            state.leader = None;
            state.campaign_error = None;
            state.term = Some(Term {
                create_revision,
                renewed,
                token: token.clone(),
            });
        }
        self.bump();
        token
    }

    fn renewed(&self, sent: Instant) {
        if let Some(t) = &mut self.lock().term
            && sent > t.renewed
        {
            t.renewed = sent;
        }
    }

    fn renewed_at(&self) -> Option<Instant> {
        self.lock().term.as_ref().map(|t| t.renewed)
    }

    /// Ends the term (if any): its connections close, its writes are refused.
    pub fn step_down(&self) {
        let ended = {
            let mut state = self.lock();
            let ended = state.term.take();
            if ended.is_some() {
                state.stepped_down = Some(Instant::now());
            }
            ended
        };
        if let Some(t) = ended {
            t.token.cancel();
            self.bump();
        }
    }

    /// Follows `leader` (its address and term), or none known.
    fn follow(&self, leader: Option<(String, i64)>) {
        self.follow_failing(leader, None);
    }

    /// [`Gate::follow`], this controller's campaign having failed with `error`.
    fn follow_failing(&self, leader: Option<(String, i64)>, error: Option<String>) {
        let changed = {
            let mut state = self.lock();
            state.campaign_error = error;
            let ended = state.term.take();
            if let Some(t) = &ended {
                t.token.cancel();
            }
            let changed = ended.is_some() || state.leader != leader;
            state.leader = leader;
            changed
        };
        if changed {
            self.bump();
        }
    }
}

/// Campaigns, leads and steps down until `shutdown`; `on_lead` runs (to load the state),
/// with the term's revision, after the election is won and before the gate opens; an
/// error from it ends the term.
/// `on_expired` runs when the lease may have expired without this controller learning
/// so (etcd does not answer), and `on_step_down` when a term ends: both stop what only
/// a leader does (its agents' connections, so that they can find another leader).
pub async fn run<F, Fut>(
    ha: HaSettings,
    gate: Arc<Gate>,
    shutdown: CancellationToken,
    on_lead: F,
    on_expired: impl Fn(),
    on_step_down: impl Fn(),
) where
    F: Fn(i64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let key = ha.leader_key();
    // A follower finds the key gone within a poll: a tenth of the lease, so that a
    // successor serves within about the lease plus a fifth of a second.
    let poll = (ha.lease / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let etcd = ha
        .etcd
        .with_timeout((ha.lease / 3).max(Duration::from_millis(300)));
    let ttl = ha.lease.as_secs().max(1);
    let mut announced: Option<String> = None;
    let mut failing: Option<String> = None;
    while !shutdown.is_cancelled() {
        match campaign(&etcd, &key, &ha.advertise, ttl).await {
            Ok(Campaign::Won { lease, revision }) => {
                failing = None;
                // Loading may take a while (a large configuration): renew once it is
                // done, and count the serving time from that renewal.
                let loaded = on_lead(revision).await;
                let sent = Instant::now();
                let renewed = match &loaded {
                    Ok(()) => etcd.lease_keep_alive(lease).await,
                    Err(_) => Ok(0),
                };
                if let Err(e) = loaded {
                    warn!("won the election but cannot load the state from etcd: {e}");
                    let _ = etcd.lease_revoke(lease).await;
                } else if !matches!(renewed, Ok(ttl) if ttl > 0) {
                    warn!(
                        "won the election but lost the lease while loading the state: {renewed:?}"
                    );
                    let _ = etcd.lease_revoke(lease).await;
                } else {
                    let token = gate.lead(revision, sent);
                    info!(revision, advertise = %ha.advertise, "leading: serving clients and agents");
                    let term = TermKey {
                        key: &key,
                        revision,
                        lease_id: lease,
                    };
                    lead(
                        &etcd,
                        &gate,
                        &term,
                        ha.lease,
                        &token,
                        &shutdown,
                        &on_expired,
                    )
                    .await;
                    gate.step_down();
                    on_step_down();
                    // Free the key at once, so that another controller takes over now
                    // rather than at the lease's end.
                    let _ = etcd.lease_revoke(lease).await;
                    if shutdown.is_cancelled() {
                        break;
                    }
                    warn!("stepped down; following the next leader");
                }
                announced = None;
                // Learn the new leader at once, so that refusals name it.
                continue;
            }
            Ok(Campaign::Lost { leader, revision }) => {
                failing = None;
                if announced.as_ref() != Some(&leader) {
                    info!(%leader, "following");
                    announced = Some(leader.clone());
                }
                gate.follow(Some((leader, revision)));
            }
            Err(e) => {
                // Said once per cause, not once per poll.
                let e = e.to_string();
                if failing.as_ref() != Some(&e) {
                    warn!("cannot campaign for leadership: {e}");
                    failing = Some(e.clone());
                }
                announced = None;
                gate.follow_failing(None, Some(e));
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(poll) => {}
        }
    }
    gate.step_down();
}

enum Campaign {
    Won { lease: i64, revision: i64 },
    Lost { leader: String, revision: i64 },
}

async fn campaign(
    etcd: &Etcd,
    key: &[u8],
    advertise: &str,
    ttl: u64,
) -> Result<Campaign, crate::etcd::EtcdError> {
    if let Some(kv) = etcd.get(key).await? {
        return Ok(Campaign::Lost {
            leader: String::from_utf8_lossy(&kv.value).into_owned(),
            revision: kv.create_revision,
        });
    }
    let (lease, _granted) = etcd.lease_grant(ttl).await?;
    let put = Op::Put {
        key: key.to_vec(),
        value: advertise.as_bytes().to_vec(),
        lease,
    };
    let get = Op::Get { key: key.to_vec() };
    let r = match etcd
        .txn(&[Compare::CreateRevision(key.to_vec(), 0)], &[put], &[get])
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = etcd.lease_revoke(lease).await;
            return Err(e);
        }
    };
    if r.succeeded {
        return Ok(Campaign::Won {
            lease,
            revision: r.revision,
        });
    }
    let _ = etcd.lease_revoke(lease).await;
    let (leader, revision) = r
        .ranges
        .first()
        .and_then(|l| l.first())
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.create_revision,
            )
        })
        .unwrap_or_default();
    Ok(Campaign::Lost { leader, revision })
}

/// What names a term in etcd.
struct TermKey<'a> {
    key: &'a [u8],
    revision: i64,
    lease_id: i64,
}

/// After how many leases without an acknowledged renewal a leader lets its agents go:
/// more than one, so that an etcd leader election (during which etcd renews no lease,
/// and after which it extends them all) does not cost every agent its connection.
const RELEASE: u32 = 2;

/// Keeps the lease alive until it is lost, the leader key is not this term's any more,
/// or `shutdown`. While renewals fail the term goes on, stale: past two thirds of the
/// lease the gate lets no write and no command to agents through (clients are still
/// answered, with a warning); past [`RELEASE`] leases `on_expired` runs once (the
/// agents' connections go), and a renewal that succeeds after that ends the term
/// anyway, so that the next one starts afresh.
async fn lead(
    etcd: &Etcd,
    gate: &Gate,
    term: &TermKey<'_>,
    lease: Duration,
    token: &CancellationToken,
    shutdown: &CancellationToken,
    on_expired: &impl Fn(),
) {
    // A quarter: with one renewal lost (an etcd leader election), the next still comes
    // before two thirds of the lease.
    let every = lease / 4;
    let mut next = gate.renewed_at().unwrap_or_else(Instant::now) + every;
    let mut stale = false;
    let mut expired = false;
    loop {
        let Some(renewed) = gate.renewed_at() else {
            return;
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = token.cancelled() => return,
            () = tokio::time::sleep_until(renewed + gate.serve_for()), if !stale => {
                stale = true;
                warn!(
                    "no leader lease renewal acknowledged by etcd for {:?}: refusing changes and commands to agents, answering clients with a warning that answers may be stale",
                    gate.serve_for()
                );
            }
            () = tokio::time::sleep_until(renewed + lease * RELEASE), if !expired => {
                expired = true;
                on_expired();
                warn!(
                    "no leader lease renewal acknowledged by etcd for {:?}: the lease may have expired; closed the agents' connections so that they can find another leader",
                    lease * RELEASE
                );
            }
            () = tokio::time::sleep_until(next) => {
                let sent = Instant::now();
                next = sent + every;
                match etcd.lease_keep_alive(term.lease_id).await {
                    Ok(ttl) if ttl > 0 => {
                        // The key itself may have been removed (by hand, or by a
                        // compaction of leases after an etcd restore): the term is over
                        // even though the lease lives.
                        match etcd.get(term.key).await {
                            Ok(Some(kv)) if kv.create_revision == term.revision => {
                                if expired {
                                    info!("etcd answers again, after the lease could have expired; stepping down to campaign afresh");
                                    return;
                                }
                                if stale {
                                    stale = false;
                                    info!(
                                        "etcd answers again after {:?} without a renewal: leading normally",
                                        sent - renewed
                                    );
                                }
                                gate.renewed(sent);
                            }
                            Ok(_) => {
                                warn!("the leader key is not this controller's any more; stepping down");
                                return;
                            }
                            Err(e) => warn!("cannot read the leader key: {e}"),
                        }
                    }
                    Ok(_) => {
                        warn!("the leader lease expired in etcd; stepping down");
                        return;
                    }
                    Err(e) => warn!("cannot renew the leader lease: {e}"),
                }
            }
        }
    }
}

/// Compacts etcd's history every `every` while this controller leads, up to the
/// revision etcd had one interval before, so that the last interval's history stays
/// (as Kubernetes' API server does). etcd keeps every version of every key until
/// compacted: each deploy writes the state's keys anew, so without this its database
/// grows until its quota refuses every write. Only the leader compacts; a follower, or a
/// leader cut off, skips its turn.
pub async fn compact(
    etcd: Etcd,
    key: Vec<u8>,
    gate: Arc<Gate>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let etcd = etcd.with_timeout(Duration::from_secs(5));
    let mut previous: Option<i64> = None;
    let mut compacted = 0;
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if gate.serving().is_err() {
            previous = None;
            continue;
        }
        let result = async {
            let now = etcd.revision(&key).await?;
            let done = match previous {
                Some(r) if r > compacted => Some((r, etcd.compact(r).await?)),
                _ => None,
            };
            Ok::<_, crate::etcd::EtcdError>((now, done))
        }
        .await;
        match result {
            Ok((now, done)) => {
                if failing {
                    info!("etcd's history is compacted again");
                    failing = false;
                }
                if let Some((r, done)) = done {
                    tracing::debug!(revision = r, done, "compacted etcd's history");
                    compacted = r;
                }
                previous = Some(now);
            }
            Err(e) => {
                if !failing {
                    warn!("cannot compact etcd's history: {e}; trying again in {every:?}");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_that_lost_the_known_leader_is_held_until_news_of_another() {
        let gate = Gate::new(Duration::from_secs(2), "http://127.0.0.1:2379");
        let mut news = gate.subscribe();
        // No leader known: an election is under way.
        assert!(gate.holds(5));
        gate.follow(Some(("10.0.0.2:2150".into(), 5)));
        assert!(news.has_changed().unwrap());
        news.borrow_and_update();
        // The leader it knows is the one the dialer lost.
        assert!(gate.holds(5));
        // Another term: its refusal names the successor at once.
        assert!(!gate.holds(4));
        // Polling the same leader again is no news.
        gate.follow(Some(("10.0.0.2:2150".into(), 5)));
        assert!(!news.has_changed().unwrap());
        gate.follow(Some(("10.0.0.3:2150".into(), 9)));
        assert!(news.has_changed().unwrap());
        assert!(!gate.holds(5));
        news.borrow_and_update();
        // Leading: nothing is held, the dialer is welcomed.
        let _token = gate.lead(11, Instant::now());
        assert!(news.has_changed().unwrap());
        assert!(!gate.holds(9));
    }

    #[test]
    fn a_stale_leader_leads_on_the_gauge_until_its_lease_runs_out() {
        let lease = Duration::from_secs(60);
        let gate = Gate::new(lease, "http://127.0.0.1:2379");
        assert!(!gate.leads());
        let _t = gate.lead(7, Instant::now() - lease / 2);
        assert!(gate.leads());
        let stale = Gate::new(lease, "http://127.0.0.1:2379");
        let _t = stale.lead(7, Instant::now() - lease * 5 / 6);
        assert!(stale.serving().is_err() && stale.stale().is_some());
        assert!(stale.leads(), "late on its lease, still the leader");
        let gone = Gate::new(lease, "http://127.0.0.1:2379");
        let _t = gone.lead(7, Instant::now() - lease * 7 / 6);
        assert!(!gone.leads(), "its lease ran out: another may lead");
        assert!(
            gone.answering().is_ok(),
            "clients are still answered, warned"
        );
    }

    /// etcd answers, refusing the campaign (its quota full, say): the refusal says so
    /// rather than suggest etcd is unreachable, until a leader is known.
    #[test]
    fn a_campaign_etcd_refuses_is_told_in_refusals() {
        let gate = Gate::new(Duration::from_secs(3), "http://127.0.0.1:2379");
        gate.follow_failing(
            None,
            Some("etcdserver: mvcc: database space exceeded".into()),
        );
        assert_eq!(
            gate.serving().unwrap_err(),
            "not the leader; no leader is elected yet (this controller cannot campaign: \
             etcdserver: mvcc: database space exceeded)"
        );
        gate.follow(Some(("10.0.0.3:2150".into(), 9)));
        assert_eq!(
            gate.serving().unwrap_err(),
            "not the leader; the leader is 10.0.0.3:2150"
        );
        gate.follow(None);
        assert!(
            gate.serving()
                .unwrap_err()
                .ends_with("(or etcd is unreachable)"),
            "the cause is forgotten once the campaign no longer fails"
        );
    }

    #[test]
    fn a_controller_that_stepped_down_holds_dialers_until_it_learns_the_next_leader() {
        let gate = Gate::new(Duration::from_secs(3), "http://127.0.0.1:2379");
        // Never led: no leader known is an election, or etcd away; nothing to wait for.
        assert!(!gate.learning_leader());
        let _token = gate.lead(7, Instant::now());
        assert!(!gate.learning_leader(), "it leads");
        gate.step_down();
        assert!(gate.learning_leader());
        gate.follow(Some(("10.0.0.3:2150".into(), 9)));
        assert!(
            !gate.learning_leader(),
            "the refusal names the successor now"
        );
    }

    #[test]
    fn the_gate_serves_a_term_until_two_thirds_of_the_lease_pass_then_only_answers_with_a_warning()
    {
        let gate = Gate::new(Duration::from_millis(600), "http://127.0.0.1:2379");
        let closed = gate.serving().unwrap_err();
        assert!(closed.contains("no leader is elected yet"), "{closed}");
        gate.follow(Some(("10.0.0.2:2150".into(), 5)));
        assert_eq!(
            gate.serving().unwrap_err(),
            "not the leader; the leader is 10.0.0.2:2150"
        );
        assert_eq!(gate.time_left(), Duration::ZERO);

        let token = gate.lead(7, Instant::now());
        let (t, revision) = gate.serving().unwrap();
        assert_eq!(revision, 7);
        assert!(!t.is_cancelled());
        assert!(gate.time_left() > Duration::from_millis(300));
        // The time passing is what is tested here.
        std::thread::sleep(Duration::from_millis(450));
        let stale = gate.serving().unwrap_err();
        assert!(
            stale.contains("no answer from etcd (http://127.0.0.1:2379)")
                && stale.contains("refuses changes"),
            "{stale}"
        );
        assert_eq!(gate.time_left(), Duration::ZERO);
        // Clients are still answered, with the same words as a warning.
        let (t, warning) = gate.answering().unwrap();
        assert!(!t.is_cancelled());
        assert!(warning.unwrap().contains("may be stale"));
        assert!(gate.stale().is_some());
        // A renewal sent now opens it again; an older one never moves it back.
        let now = Instant::now();
        gate.renewed(now);
        gate.renewed(now - Duration::from_secs(1));
        assert!(gate.serving().is_ok());
        assert_eq!(gate.renewed_at(), Some(now));

        assert_eq!(gate.stale(), None);

        gate.step_down();
        assert!(token.is_cancelled());
        assert!(gate.serving().is_err());
        assert!(gate.answering().is_err());
    }
}
