//! Deploys across leader failovers, checked as a history (see [`crate::history`]).
//!
//! Three real etcd members, three real controllers on them (fixed addresses, so that a
//! killed one comes back where clients and agents look for it), two real agents with a
//! node each that no deploy changes and one node per deploy that marks it. Clients
//! deploy distinct configurations concurrently while faults are injected at random
//! times, one at a time:
//!
//! - `kill`: the leader is SIGKILLed while clients deploy, and started again as a
//!   follower once another leads;
//! - `quiet-kill`: clients hold off, every agent runs the deploy in effect, the leader
//!   is SIGKILLed; once the new leader has every agent back, every node must have the
//!   pid it had: no node restarted by a failover;
//! - `pause`: the leader is SIGSTOPped past its lease while clients deploy through its
//!   successor; then clients hold off, a deploy is sent on a connection opened to the
//!   paused leader before it stopped, and it is resumed: it must acknowledge nothing and
//!   no state key in etcd may change (a deposed leader never writes).
//!
//! At the end the history of the desired and deployed keys is read back from etcd,
//! the deploy in effect from the leader, and [`crate::history::check`] judges it; the
//! agents must run that deploy (applied generation equal to the leader's, its nodes
//! running), and the nodes no deploy changed must have kept their pids throughout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use drover_proto::model::{MgmtRole, NodeStatus, State};
use drover_proto::msg::{ClientRequest, ClientResponse, PeerRole};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::etcd::{self, Etcd};
use crate::history::{self, Deploy, History, Outcome, Write};
use crate::{Cluster, PATIENCE, Proc, bin, eventually};

const PREFIX: &str = "/drover-chaos/";
const AGENTS: [&str; 2] = ["a1", "a2"];
const STABLE: [&str; 2] = ["stable-1", "stable-2"];

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long to keep injecting faults (the final check comes after).
    pub duration: Duration,
    /// Seed of every random choice; printed, so that a run can be repeated.
    pub seed: u64,
    /// `--leader-lease` of the controllers.
    pub lease: String,
    /// Clients deploying concurrently.
    pub clients: usize,
}

impl Options {
    /// The defaults (a 2 s lease, three clients), with a duration.
    pub fn new(duration: Duration, seed: u64) -> Self {
        Self {
            duration,
            seed,
            lease: "2s".into(),
            clients: 3,
        }
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Failovers caused, by fault.
    pub failovers: BTreeMap<&'static str, usize>,
    /// From a fault to a new leader serving, each time.
    pub takeovers: Vec<Duration>,
    /// Deploys acknowledged, failed for certain, of unknown outcome.
    pub acked: usize,
    /// See `acked`.
    pub failed: usize,
    /// See `acked`.
    pub unknown: usize,
    /// Versions of the desired deploy written to etcd.
    pub writes: usize,
    /// Nodes whose pids were compared across a quiet failover.
    pub nodes_compared: usize,
    /// Faults after which no deploy was acknowledged within the patience.
    pub stalls: usize,
    /// What the clients were told when a deploy was not acknowledged (digits as `#`),
    /// with how often.
    pub reasons: BTreeMap<String, usize>,
    /// Every violation, described.
    pub violations: Vec<String>,
}

impl Report {
    /// Failovers of every kind.
    pub fn total_failovers(&self) -> usize {
        self.failovers.values().sum()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failovers: {}", self.total_failovers())?;
        for (k, n) in &self.failovers {
            write!(f, " {k}={n}")?;
        }
        let mut t = self.takeovers.clone();
        t.sort();
        if let (Some(first), Some(last)) = (t.first(), t.last()) {
            write!(
                f,
                "\nnew leader serving after: min {first:.1?}, median {:.1?}, max {last:.1?}",
                t[t.len() / 2]
            )?;
        }
        writeln!(
            f,
            "\ndeploys: {} acknowledged, {} failed, {} unknown outcome; {} desired writes in etcd",
            self.acked, self.failed, self.unknown, self.writes
        )?;
        writeln!(
            f,
            "node pids compared across quiet failovers: {}; stalls (no deploy acknowledged {PATIENCE:?} after a fault): {}",
            self.nodes_compared, self.stalls
        )?;
        let mut reasons: Vec<(&String, &usize)> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1));
        writeln!(f, "why deploys were not acknowledged (most frequent):")?;
        for (reason, n) in reasons.iter().take(6) {
            writeln!(f, "  {n:>5}  {reason}")?;
        }
        writeln!(f, "violations: {}", self.violations.len())?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

/// The controllers, on fixed loopback ports.
struct Controllers {
    procs: Vec<Option<Proc>>,
    addrs: Vec<SocketAddr>,
    lease: String,
}

impl Controllers {
    fn start(&mut self, c: &Cluster, etcd: &Etcd, i: usize) {
        let cmd = Command::new(bin("drover-controller"));
        let (p, _) = etcd::start_controller_cmd(
            c,
            cmd,
            &format!("controller-{i}"),
            etcd,
            PREFIX,
            &self.addrs[i].to_string(),
            // The history is what the checks read: nothing may compact it.
            &["--leader-lease", &self.lease, "--etcd-compact-every", "0s"],
        );
        self.procs[i] = Some(p);
    }

    fn list(&self) -> String {
        etcd::addrs(&self.addrs)
    }

    /// Waits until a controller other than `not` leads and serves its term.
    fn leader(&self, rt: &tokio::runtime::Runtime, etcd: &Etcd, not: Option<usize>) -> usize {
        let key = format!("{PREFIX}leader");
        eventually("a controller leads", PATIENCE * 2, || {
            let kv = rt.block_on(etcd.client().get(key.as_bytes())).ok()??;
            let addr: SocketAddr = String::from_utf8(kv.value).ok()?.parse().ok()?;
            let i = self.addrs.iter().position(|a| *a == addr)?;
            let serving = format!(
                "leading: serving clients and agents revision={} ",
                kv.create_revision
            );
            let p = self.procs[i].as_ref()?;
            (Some(i) != not && p.log_text().contains(&serving)).then_some(i)
        })
    }
}

fn config_text(label: &str, on: &str) -> String {
    let mut text =
        String::from("[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n");
    for a in AGENTS {
        text.push_str(&format!("[instances.{a}]\n"));
    }
    let mut nodes: Vec<(&str, &str)> = STABLE.iter().copied().zip(AGENTS).collect();
    if !label.is_empty() {
        nodes.push((label, on));
    }
    for (node, instance) in nodes {
        text.push_str(&format!(
            "[nodes.{node}]\ninstance = \"{instance}\"\ncommand = [\"/usr/bin/sleep\", \"infinity\"]\n"
        ));
    }
    text
}

/// What the CLI's answer to a deploy says about it.
fn outcome(out: &crate::CliOutput) -> Outcome {
    if out.code == Some(0) {
        return Outcome::Acked;
    }
    let text = format!("{}{}", out.stdout, out.stderr);
    // A connection closed under the request, whatever the reason says (a leader that
    // stepped down: "not the leader any more"), leaves the outcome unknown.
    if text.contains("closed the connection") || text.contains("is not known") {
        return Outcome::Unknown;
    }
    // Refusals before anything is written; anything else (a timeout, a lost connection,
    // "cannot record": etcd may have applied a write whose answer was lost) is unknown.
    let refused = [
        "not the leader",
        "still pending",
        "instances not connected",
        "as expected; nothing was deployed",
        "cannot stage while",
    ];
    if refused.iter().any(|r| text.contains(r)) {
        Outcome::Failed
    } else {
        Outcome::Unknown
    }
}

/// The gist of a failed CLI run: its first error, outcome-tagged, ids and digits
/// masked (so that the same reason from other addresses or ids counts once), at most
/// 100 characters.
fn reason(out: &crate::CliOutput) -> String {
    // A refusal in results is in the JSON's `errors`; a failure to talk is on stderr.
    let from_json = serde_json::from_str::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            v["errors"].as_array()?.iter().find_map(|e| {
                e.as_str()
                    .or_else(|| e["error"].as_str())
                    .map(str::to_owned)
            })
        });
    let line = from_json.unwrap_or_else(|| {
        let last = out.stderr.lines().rev().find(|l| !l.trim().is_empty());
        last.map_or_else(
            || out.stdout.split_whitespace().collect::<Vec<_>>().join(" "),
            str::to_owned,
        )
    });
    // Ids and addresses differ from one deploy to the next: words with eight or more
    // hex digits are `<id>`, other digits `#`.
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| {
            if w.chars().filter(char::is_ascii_hexdigit).count() >= 8 {
                "<id>".to_owned()
            } else {
                w.chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect()
            }
        })
        .collect();
    let gist: String = words.join(" ").chars().take(100).collect();
    format!("{:?}: {gist}", outcome(out))
}

/// Every node status the leader reports (get-nodes over the native protocol, following
/// a follower's answer), or `None` when no leader answers in time.
async fn leader_nodes(pki: &Path, addrs: &[SocketAddr]) -> Option<Vec<NodeStatus>> {
    use drover_net::conn::{self, TransportSettings};
    use drover_net::{Credentials, TlsFiles};
    use drover_proto::msg::{API_VERSION, Hello};
    let creds = Credentials::load(&TlsFiles {
        ca: pki.join("ca.crt"),
        cert: pki.join("ops.crt"),
        key: pki.join("ops.key"),
    })
    .ok()?;
    let endpoint = conn::client_endpoint(&creds, &TransportSettings::default(), addrs[0]).ok()?;
    let hello = Hello {
        api_version: API_VERSION,
        role: PeerRole::Client,
        name: "ops".into(),
        software: "the failover history check".into(),
        lost_term: None,
    };
    let targets: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let dialled = conn::dial_leader(&targets, |target| {
        let (endpoint, hello) = (&endpoint, hello.clone());
        async move {
            let addr: SocketAddr = target.parse().map_err(|_| {
                drover_net::NetError::Connection(format!("bad controller address {target}"))
            })?;
            conn::dial(
                endpoint,
                None,
                addr,
                "127.0.0.1",
                hello,
                PeerRole::Controller,
                None,
                Duration::from_secs(3),
            )
            .await
        }
    });
    let est = tokio::time::timeout(Duration::from_secs(5), dialled)
        .await
        .ok()?
        .ok()?;
    let reply: ClientResponse = conn::call(
        &est.conn,
        &ClientRequest::GetNodes { fresh: false },
        Duration::from_secs(5),
    )
    .await
    .ok()?;
    est.conn.close(0u32.into(), b"done");
    let ClientResponse::Results(rs) = reply else {
        return None;
    };
    Some(
        rs.into_iter()
            .filter_map(|r| match r.data {
                Some(drover_proto::ResultData::NodeStatuses(v)) => Some(v),
                _ => None,
            })
            .flatten()
            .collect(),
    )
}

/// The leader's desired generation, from its own entry.
fn desired_generation(nodes: &[NodeStatus]) -> Option<u64> {
    nodes
        .iter()
        .find(|s| s.mgmt_role == MgmtRole::Controller)
        .and_then(|s| s.generation)
}

/// One version of a deploy key: generation and the label of the deploy (its `mark-`
/// node; empty for none), with the node names.
fn decode(value: &[u8]) -> Option<(u64, String, Vec<String>)> {
    let json = drover_controller::etcd_store::decode_inline(value)?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let nodes: Vec<String> = v["config"]["nodes"]
        .as_array()?
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect();
    let label = nodes
        .iter()
        .find(|n| n.starts_with("mark-"))
        .cloned()
        .unwrap_or_default();
    Some((v["generation"].as_u64()?, label, nodes))
}

fn writes(etcd: &Etcd, name: &str) -> Vec<Write> {
    etcd.versions(format!("{PREFIX}state/{name}").as_bytes())
        .into_iter()
        .filter_map(|(revision, value)| {
            let (generation, label, _) = decode(&value)?;
            Some(Write {
                revision,
                generation,
                label,
            })
        })
        .collect()
}

/// Waits until every agent runs the deploy in effect (applied generation equal to the
/// leader's desired one, exactly its nodes running); returns the generation, its nodes'
/// pids, or a violation.
fn settled(
    rt: &tokio::runtime::Runtime,
    pki: &Path,
    addrs: &[SocketAddr],
    etcd: &Etcd,
) -> Result<(u64, BTreeMap<String, u64>), String> {
    let deadline = Instant::now() + PATIENCE * 2;
    let mut last = String::new();
    while Instant::now() < deadline {
        let key = format!("{PREFIX}state/desired");
        let want = etcd
            .versions(key.as_bytes())
            .last()
            .and_then(|(_, v)| decode(v));
        if let (Some(nodes), Some((generation, _, names))) =
            (rt.block_on(leader_nodes(pki, addrs)), want)
        {
            let applied: BTreeMap<&str, Option<u64>> = nodes
                .iter()
                .filter(|s| s.mgmt_role == MgmtRole::Agent)
                .map(|s| (s.node.as_str(), s.generation))
                .collect();
            let running: BTreeMap<String, u64> = nodes
                .iter()
                .filter(|s| s.mgmt_role == MgmtRole::None && s.state == State::Running)
                .filter_map(|s| Some((s.node.clone(), u64::from(s.pid?))))
                .collect();
            let mut want_names = names.clone();
            want_names.sort();
            let have: Vec<String> = running.keys().cloned().collect();
            let all_applied = AGENTS
                .iter()
                .all(|a| applied.get(a).copied().flatten() == Some(generation));
            if desired_generation(&nodes) == Some(generation) && all_applied && have == want_names {
                return Ok((generation, running));
            }
            last = format!(
                "leader's generation {:?}, etcd's {generation}, agents applied {applied:?}, running {have:?}, want {want_names:?}",
                desired_generation(&nodes)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the agents do not run the deploy in effect after {:?}: {last}",
        PATIENCE * 2
    ))
}

/// Shared with the client threads.
struct Clients<'a> {
    pki: PathBuf,
    list: String,
    dir: PathBuf,
    start: Instant,
    stop: &'a AtomicBool,
    /// Clients hold it shared while deploying; the fault loop takes it to hold them off.
    gate: &'a RwLock<()>,
    acked: &'a AtomicUsize,
    records: &'a Mutex<Vec<Deploy>>,
    reasons: &'a Mutex<BTreeMap<String, usize>>,
}

impl Clients<'_> {
    fn run(&self, client: usize) {
        for i in 0.. {
            let _permit = self.gate.read().unwrap_or_else(|p| p.into_inner());
            if self.stop.load(SeqCst) {
                break;
            }
            let label = format!("mark-{client}-{i}");
            let on = AGENTS[(client + i) % AGENTS.len()];
            let file = self.dir.join(format!("{label}.toml"));
            std::fs::write(&file, config_text(&label, on)).expect("write a cluster file");
            let start = self.start.elapsed();
            let out = etcd::drover_in(
                &self.pki,
                &self.list,
                &["deploy-config", file.to_str().expect("utf-8 path")],
            );
            let outcome = outcome(&out);
            if outcome == Outcome::Acked {
                self.acked.fetch_add(1, SeqCst);
            } else {
                *self
                    .reasons
                    .lock()
                    .expect("lock")
                    .entry(reason(&out))
                    .or_default() += 1;
            }
            self.records.lock().expect("lock").push(Deploy {
                client,
                label,
                start,
                end: self.start.elapsed(),
                outcome,
            });
        }
    }
}

/// The mod revision of every state key.
fn state_revisions(rt: &tokio::runtime::Runtime, etcd: &Etcd) -> BTreeMap<Vec<u8>, i64> {
    rt.block_on(
        etcd.client()
            .get_prefix(format!("{PREFIX}state/").as_bytes()),
    )
    .map(|kvs| {
        kvs.into_iter()
            .map(|kv| (kv.key, kv.mod_revision))
            .collect()
    })
    .unwrap_or_default()
}

/// Runs the scenario; panics only when the cluster cannot be brought up or no leader
/// is elected in time.
pub fn run(opts: &Options) -> Report {
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut ctl = Controllers {
        procs: vec![None, None, None],
        addrs: crate::free_udp_ports(3)
            .into_iter()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect(),
        lease: opts.lease.clone(),
    };
    for i in 0..3 {
        ctl.start(&c, &etcd, i);
    }
    let list = ctl.list();
    let _agents: Vec<Proc> = AGENTS
        .iter()
        .map(|a| {
            c.issue(PeerRole::Agent, a);
            c.start_agent_args(a, a, &["--controller", &list])
        })
        .collect();
    let first = c.dir.path().join("first.toml");
    std::fs::write(&first, config_text("", "")).expect("write a cluster file");
    eventually("the agents connected and took a deploy", PATIENCE, || {
        (etcd::drover(
            &c,
            &list,
            &["deploy-config", first.to_str().expect("utf-8")],
        )
        .code
            == Some(0))
        .then_some(())
    });
    let mut report = Report::default();
    let (_, pids) = settled(&rt, &c.pki, &ctl.addrs, &etcd).unwrap_or_else(|e| panic!("{e}"));
    let stable_before: BTreeMap<String, u64> = pids
        .into_iter()
        .filter(|(n, _)| STABLE.contains(&n.as_str()))
        .collect();

    let stop = AtomicBool::new(false);
    let gate = RwLock::new(());
    let acked = AtomicUsize::new(0);
    let records = Mutex::new(Vec::new());
    let reasons = Mutex::new(BTreeMap::new());
    let reads = Mutex::new(Vec::new());
    let clients = Clients {
        pki: c.pki.clone(),
        list: list.clone(),
        dir: c.dir.path().to_owned(),
        start: Instant::now(),
        stop: &stop,
        gate: &gate,
        acked: &acked,
        records: &records,
        reasons: &reasons,
    };
    /// Stops the clients and the reader however the scope ends (a panic too).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let began = Instant::now();
    let addrs = ctl.addrs.clone();
    std::thread::scope(|s| {
        for i in 0..opts.clients {
            let clients = &clients;
            s.spawn(move || clients.run(i));
        }
        let (pki, addrs, stop, reads) = (&c.pki, &addrs, &stop, &reads);
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            while !stop.load(SeqCst) {
                if let Some(g) = rt
                    .block_on(leader_nodes(pki, addrs))
                    .as_deref()
                    .and_then(desired_generation)
                {
                    reads.lock().expect("lock").push(g);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let _stop = Stop(stop);
        let mut round = 0;
        while began.elapsed() < opts.duration {
            // Some deploys between faults, then one fault; the first three are one of
            // each kind, so that even a short run tries them all.
            let acks = acked.load(SeqCst);
            std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
            let waited = Instant::now();
            while acked.load(SeqCst) == acks && waited.elapsed() < PATIENCE {
                std::thread::sleep(Duration::from_millis(50));
            }
            if acked.load(SeqCst) == acks {
                report.stalls += 1;
            }
            let kind = match round {
                0 => "kill",
                1 => "quiet-kill",
                2 => "pause",
                _ => ["kill", "kill", "quiet-kill", "pause"][rng.random_range(0..4)],
            };
            round += 1;
            let leader = ctl.leader(&rt, &etcd, None);
            let at = Instant::now();
            match kind {
                "kill" => {
                    ctl.procs[leader].take().expect("running").kill();
                    ctl.leader(&rt, &etcd, Some(leader));
                    report.takeovers.push(at.elapsed());
                    ctl.start(&c, &etcd, leader);
                }
                "quiet-kill" => {
                    let _quiet = gate.write().unwrap_or_else(|p| p.into_inner());
                    match settled(&rt, &c.pki, &ctl.addrs, &etcd) {
                        Err(e) => report.violations.push(e),
                        Ok((generation, before)) => {
                            let at = Instant::now();
                            ctl.procs[leader].take().expect("running").kill();
                            ctl.leader(&rt, &etcd, Some(leader));
                            report.takeovers.push(at.elapsed());
                            match settled(&rt, &c.pki, &ctl.addrs, &etcd) {
                                Err(e) => report.violations.push(e),
                                Ok((g, after)) => {
                                    report.nodes_compared += before.len();
                                    if g != generation || before != after {
                                        report.violations.push(format!(
                                            "a failover restarted nodes: generation {generation}, pids {before:?}; after it generation {g}, pids {after:?}"
                                        ));
                                    }
                                }
                            }
                            ctl.start(&c, &etcd, leader);
                        }
                    }
                }
                _ => {
                    if let Some(v) = pause(&rt, &c, &etcd, &ctl, leader, &gate, &acked, &mut report)
                    {
                        report.violations.push(v);
                    }
                }
            }
            *report.failovers.entry(kind).or_default() += 1;
        }
        stop.store(true, SeqCst);
    });

    let deploys = records.into_inner().expect("lock");
    report.reasons = reasons.into_inner().expect("lock");
    (report.acked, report.failed, report.unknown) = history::outcomes(&deploys);
    let in_effect = match settled(&rt, &c.pki, &ctl.addrs, &etcd) {
        Ok((generation, running)) => {
            for (node, pid) in &stable_before {
                if running.get(node) != Some(pid) {
                    report.violations.push(format!(
                        "node {node} was restarted during the run: pid {pid} at the start, {:?} at the end",
                        running.get(node)
                    ));
                }
            }
            let label = running
                .keys()
                .find(|n| n.starts_with("mark-"))
                .cloned()
                .unwrap_or_default();
            Some((generation, label))
        }
        Err(e) => {
            report.violations.push(e);
            None
        }
    };
    let h = History {
        deploys,
        desired: writes(&etcd, "desired"),
        deployed: writes(&etcd, "deployed"),
        in_effect,
        reads: reads.into_inner().expect("lock"),
    };
    report.writes = h.desired.len();
    report.violations.extend(history::check(&h));
    if !report.violations.is_empty() || std::env::var_os("DROVER_KEEP_TEST_DIR").is_some() {
        eprintln!("history: {h:#?}");
    }
    report
}

/// The `pause` fault; a violation, if any.
#[expect(clippy::too_many_arguments, reason = "the scenario's parts, borrowed")]
fn pause(
    rt: &tokio::runtime::Runtime,
    c: &Cluster,
    etcd: &Etcd,
    ctl: &Controllers,
    leader: usize,
    gate: &RwLock<()>,
    acked: &AtomicUsize,
    report: &mut Report,
) -> Option<String> {
    let old = ctl.procs[leader].as_ref().expect("running");
    // A client of the leader, connected while it leads.
    let (endpoint, conn) = rt.block_on(c.client_connection(ctl.addrs[leader]));
    let stepped_down = old.log_text().matches("stepped down").count();
    let at = Instant::now();
    old.signal(Signal::SIGSTOP);
    ctl.leader(rt, etcd, Some(leader));
    report.takeovers.push(at.elapsed());
    // Deploys through the successor while the old leader sleeps.
    let acks = acked.load(SeqCst);
    let waited = Instant::now();
    while acked.load(SeqCst) == acks && waited.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _quiet = gate.write().unwrap_or_else(|p| p.into_inner());
    let written = state_revisions(rt, etcd);
    let request = rt.spawn(async move {
        let deploy = ClientRequest::Deploy {
            restart_all: false,
            expect_id: None,
            expect_stage: None,
            progress: false,
        };
        drover_net::conn::call::<_, ClientResponse>(&conn, &deploy, Duration::from_secs(15)).await
    });
    // Let the request leave before the old leader wakes.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    old.signal(Signal::SIGCONT);
    let mut violation = None;
    if let Ok(Ok(ClientResponse::Results(rs))) = rt.block_on(request)
        && rs.iter().any(|r| r.success)
    {
        violation = Some(format!("the deposed leader acknowledged a deploy: {rs:?}"));
    }
    eventually("the deposed leader steps down", PATIENCE, || {
        (old.log_text().matches("stepped down").count() > stepped_down).then_some(())
    });
    let now = state_revisions(rt, etcd);
    if now != written {
        violation = Some(format!(
            "the deposed leader wrote to etcd: revisions {written:?} before it woke, {now:?} after"
        ));
    }
    drop(endpoint);
    violation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: i32, stderr: &str) -> crate::CliOutput {
        crate::CliOutput {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.to_owned(),
        }
    }

    #[test]
    fn a_deploy_cut_off_by_a_stepping_down_leader_has_an_unknown_outcome() {
        assert_eq!(
            outcome(&out(
                1,
                "error: not the leader; the leader is 127.0.0.1:9\n"
            )),
            Outcome::Failed
        );
        assert_eq!(
            outcome(&out(
                1,
                "error: peer 127.0.0.1:9 closed the connection: controller stepped down: not \
                 the leader any more; it went away before it answered, so whether the deploy \
                 was recorded is not known: ...\n"
            )),
            Outcome::Unknown
        );
        assert_eq!(outcome(&out(0, "")), Outcome::Acked);
    }
}
