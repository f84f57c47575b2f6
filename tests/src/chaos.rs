//! The chaos run: random faults against a real cluster whose agents sit on separate hosts
//! (network namespaces), with the central invariant checked after every heal.
//!
//! Faults: agents and the controller SIGKILLed (alone, or in the middle of a deploy),
//! node processes SIGKILLed, and agents' links cut for less or more than the idle
//! timeout (with a deploy attempted while cut). Between faults everything is healed:
//! dead daemons started again, links brought up. Then the processes on every host must
//! settle, within a deadline, to exactly that host's share of one deploy that may be in
//! effect:
//!
//! - every node process of the host belongs to a node of that deploy, with its spec
//!   (each spec carries a revision in its environment), each node's processes counted
//!   once (a node that forks a child in a new session counts two), nothing else: no
//!   duplicate, no process left from a removed node or an older spec;
//! - the deploy is the last acknowledged one or a later attempt (an attempt that failed
//!   may still have been recorded and applied), and never older than the deploy matched
//!   by the previous check: what runs never goes back;
//! - some deploys restart every node (`--restart-all`): every node process started after
//!   the latest such deploy that is acknowledged or is the one matched was asked for, on
//!   agents that missed it too.
//!
//! Processes are found through `/proc`: a node's environment carries `DROVER_INSTANCE`,
//! `DROVER_NODE` and the run's revision variable, and its working directory lies under
//! the run's temp dir, which tells them from other tests' processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::netlab::NetLab;
use crate::{Cluster, Proc, bin, run_cli};

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long to keep injecting faults (the last heal and check come after).
    pub duration: Duration,
    /// Seed of every random choice; printed, so that a failing run can be repeated.
    pub seed: u64,
    /// Agents, each on a host of its own.
    pub agents: usize,
    /// The most nodes a deploy puts on one agent.
    pub max_nodes_per_agent: usize,
    /// How long the processes may take to settle after a heal.
    pub settle: Duration,
}

/// A chaos test's length and seed from `DROVER_CHAOS_SECS` (else `default_secs`) and
/// `DROVER_CHAOS_SEED` (else the time), so that a failing run can be repeated.
pub fn secs_and_seed_from_env(default_secs: u64) -> (u64, u64) {
    let secs = std::env::var("DROVER_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    let seed = std::env::var("DROVER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    (secs, seed)
}

impl Options {
    /// The defaults, with a duration.
    pub fn new(duration: Duration, seed: u64) -> Self {
        Self {
            duration,
            seed,
            agents: 3,
            max_nodes_per_agent: 8,
            settle: Duration::from_secs(40),
        }
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Deploys the controller acknowledged as successful.
    pub acked: usize,
    /// Deploys that failed or were cut short.
    pub unacked: usize,
    /// Deploys that asked to restart every node, acknowledged or not.
    pub restart_all: usize,
    /// Invariant checks made (one after every heal).
    pub checks: usize,
    /// Every violation, described.
    pub violations: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total: usize = self.faults.values().sum();
        writeln!(f, "faults injected: {total}")?;
        for (k, n) in &self.faults {
            writeln!(f, "  {k}: {n}")?;
        }
        writeln!(
            f,
            "deploys: {} acknowledged, {} failed or cut short; {} of them restarting every node",
            self.acked, self.unacked, self.restart_all
        )?;
        writeln!(f, "invariant checks: {}", self.checks)?;
        writeln!(f, "invariant violations: {}", self.violations.len())?;
        for v in &self.violations {
            writeln!(f, "  - {v}")?;
        }
        Ok(())
    }
}

/// One node of a deploy: its revision and how many processes it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeSpec {
    rev: u64,
    procs: usize,
}

/// A deploy: per instance, per node.
type Share = BTreeMap<String, BTreeMap<String, NodeSpec>>;

#[derive(Debug)]
struct Attempt {
    share: Share,
    acked: bool,
    /// Asked to restart every node.
    restart_all: bool,
    /// The clock-tick count since boot just before it was asked for.
    asked_at: u64,
}

/// The run's world.
/// Fields drop in order: the daemons before their network and the cluster, whose drop
/// kills what is left in the agents' cgroups.
struct World {
    addr: SocketAddr,
    controller: Option<Proc>,
    agents: Vec<Option<Proc>>,
    rng: StdRng,
    opts: Options,
    /// Every deploy attempted, in order.
    attempts: Vec<Attempt>,
    /// Index of the deploy the last check matched.
    floor: Option<usize>,
    next_rev: u64,
    report: Report,
    lab: NetLab,
    c: Cluster,
}

const REQUEST_TIMEOUT: &str = "3s";
const CLI_TIMEOUT: &str = "8s";
const REV_VAR: &str = "DROVER_CHAOS_REV";

/// Runs the chaos loop and returns what it found.
pub fn run(opts: Options) -> Report {
    eprintln!(
        "chaos: seed {} for {:?} with {} agents",
        opts.seed, opts.duration, opts.agents
    );
    let mut w = World::new(opts);
    let start = Instant::now();
    // A first deploy, so that every later fault meets running nodes.
    w.deploy(None);
    w.check("first deploy");
    while start.elapsed() < w.opts.duration {
        let fault = w.fault();
        eprintln!(
            "chaos: {:>6.1}s {fault} (deploy #{})",
            start.elapsed().as_secs_f64(),
            w.attempts.len().saturating_sub(1)
        );
        w.heal();
        w.check(fault);
    }
    w.report
}

impl World {
    fn new(opts: Options) -> Self {
        let mut lab = NetLab::new();
        let gw = lab.host_gateway().to_string();
        let c = Cluster::with_controller_sans(&[&gw]);
        let (ctl, addr) =
            c.start_controller_with(&format!("{gw}:0"), &["--request-timeout", REQUEST_TIMEOUT]);
        let mut agents = Vec::new();
        for _ in 0..opts.agents {
            let host = lab.add_host();
            agents.push(Some(start_agent(&c, &lab, host, addr)));
        }
        let w = Self {
            c,
            lab,
            addr,
            controller: Some(ctl),
            agents,
            rng: StdRng::seed_from_u64(opts.seed),
            opts,
            attempts: Vec::new(),
            floor: None,
            next_rev: 1,
            report: Report::default(),
        };
        w.wait_agents();
        w
    }

    fn count(&mut self, fault: &'static str) -> &'static str {
        *self.report.faults.entry(fault).or_default() += 1;
        fault
    }

    /// Injects one random fault; returns its name.
    fn fault(&mut self) -> &'static str {
        match self.rng.random_range(0..10) {
            0..=1 => {
                self.deploy(None);
                "deploy"
            }
            2..=3 => {
                let a = self.rng.random_range(0..self.opts.agents);
                let delay = self.rng.random_range(0..400);
                self.deploy(Some((Victim::Agent(a), delay)));
                self.count("agent SIGKILL during a deploy")
            }
            4 => {
                let delay = self.rng.random_range(0..400);
                self.deploy(Some((Victim::Controller, delay)));
                self.count("controller SIGKILL during a deploy")
            }
            5 => {
                let a = self.rng.random_range(0..self.opts.agents);
                self.kill_agent(a);
                self.count("agent SIGKILL")
            }
            6 => {
                self.kill_controller();
                self.count("controller SIGKILL")
            }
            7..=8 => {
                self.kill_node();
                self.count("node SIGKILL")
            }
            _ => {
                let a = self.rng.random_range(0..self.opts.agents);
                self.partition(a);
                self.count("partition")
            }
        }
    }

    fn kill_agent(&mut self, a: usize) {
        eprintln!("chaos: SIGKILL {}", agent_name(a));
        if let Some(mut p) = self.agents[a].take() {
            p.kill();
        }
    }

    fn kill_controller(&mut self) {
        if let Some(mut p) = self.controller.take() {
            p.kill();
        }
    }

    /// SIGKILLs one random node process of the run.
    fn kill_node(&mut self) {
        // Only a node's main process: a child lost on its own is nobody's to restart.
        let procs: Vec<NodeProc> = node_processes(self.c.dir.path())
            .into_iter()
            .filter(|p| !p.child)
            .collect();
        if procs.is_empty() {
            return;
        }
        let pick = &procs[self.rng.random_range(0..procs.len())];
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pick.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Cuts agent `a`'s link for a random while, shorter or longer than the idle
    /// timeout, and tries a deploy while it is cut.
    fn partition(&mut self, a: usize) {
        self.lab.set_link(a, false);
        let cut = Duration::from_millis(self.rng.random_range(300..3500));
        let started = Instant::now();
        if self.rng.random_bool(0.5) {
            self.deploy(None);
        }
        // The length of the cut is the fault itself, not a wait for a condition.
        std::thread::sleep(cut.saturating_sub(started.elapsed()));
        self.lab.set_link(a, true);
    }

    /// A new random deploy, possibly with a daemon SIGKILLed `delay` ms into it.
    fn deploy(&mut self, victim: Option<(Victim, u64)>) {
        let share = self.random_share();
        let restart_all = self.rng.random_bool(0.25);
        let file = self
            .c
            .dir
            .path()
            .join(format!("chaos-{}.toml", self.attempts.len()));
        std::fs::write(&file, self.config_text(&share)).expect("write cluster file");
        let mut cmd = self.c.drover_command(self.addr);
        cmd.arg("--timeout")
            .arg(CLI_TIMEOUT)
            .arg("deploy-config")
            .arg(&file);
        if restart_all {
            cmd.arg("--restart-all");
            self.report.restart_all += 1;
        }
        let asked_at = ticks_since_boot();
        let cli = std::thread::spawn(move || run_cli(cmd, Duration::from_secs(30)));
        if let Some((victim, delay)) = victim {
            // The moment of the kill is the fault being injected.
            std::thread::sleep(Duration::from_millis(delay));
            match victim {
                Victim::Agent(a) => self.kill_agent(a),
                Victim::Controller => self.kill_controller(),
            }
        }
        let out = cli.join().expect("deploy thread");
        let acked = out.code == Some(0);
        eprintln!(
            "chaos: deploy #{}{} {}",
            self.attempts.len(),
            if restart_all { " (restart all)" } else { "" },
            if acked { "acknowledged" } else { "failed" }
        );
        if !acked {
            for line in out.stderr.lines().take(4) {
                eprintln!("chaos:   {line}");
            }
        }
        if acked {
            self.report.acked += 1;
        } else {
            self.report.unacked += 1;
        }
        self.attempts.push(Attempt {
            share,
            acked,
            restart_all,
            asked_at,
        });
    }

    /// Some nodes on each agent: some kept with their spec, some with a new revision,
    /// some added, some removed. Nodes whose index is 0 fork a child in a new session.
    fn random_share(&mut self) -> Share {
        let last = self
            .attempts
            .last()
            .map(|a| a.share.clone())
            .unwrap_or_default();
        let mut share = Share::new();
        for a in 0..self.opts.agents {
            let inst = agent_name(a);
            let mut nodes = BTreeMap::new();
            for i in 0..self.opts.max_nodes_per_agent {
                if !self.rng.random_bool(0.6) {
                    continue;
                }
                let name = format!("a{a}-n{i}");
                let before = last.get(&inst).and_then(|n| n.get(&name));
                let rev = match before {
                    Some(s) if self.rng.random_bool(0.7) => s.rev,
                    _ => {
                        self.next_rev += 1;
                        self.next_rev
                    }
                };
                let procs = if i == 0 { 2 } else { 1 };
                nodes.insert(name, NodeSpec { rev, procs });
            }
            share.insert(inst, nodes);
        }
        share
    }

    fn config_text(&self, share: &Share) -> String {
        let prog = bin("drover-testprog");
        let mut text = String::from(
            "[defaults]\nrestart = \"always\"\nbackoff = { initial = \"100ms\", max = \"1s\" }\n\
             readiness = { kind = \"start-period\", period = \"0s\" }\nstop_timeout = \"2s\"\n",
        );
        for (inst, nodes) in share {
            text.push_str(&format!("[instances.{inst}]\n"));
            for (name, spec) in nodes {
                let extra = if spec.procs == 2 {
                    ", \"--spawn-children\", \"1\", \"--setsid\""
                } else {
                    ""
                };
                text.push_str(&format!(
                    "[nodes.{name}]\ninstance = \"{inst}\"\ncommand = [\"{}\"{extra}]\nenv = {{ {REV_VAR} = \"{}\" }}\n",
                    prog.display(),
                    spec.rev
                ));
            }
        }
        text
    }

    /// Starts whatever is down and brings every link up.
    fn heal(&mut self) {
        for a in 0..self.opts.agents {
            self.lab.set_link(a, true);
        }
        if self.controller.is_none() {
            let (p, _) = self.c.start_controller_with(
                &self.addr.to_string(),
                &["--request-timeout", REQUEST_TIMEOUT],
            );
            self.controller = Some(p);
        }
        for a in 0..self.opts.agents {
            if self.agents[a].is_none() {
                self.agents[a] = Some(start_agent(&self.c, &self.lab, a, self.addr));
            }
        }
        self.wait_agents();
    }

    fn wait_agents(&self) {
        let want = self.opts.agents;
        crate::eventually("every agent connected", self.opts.settle, || {
            let v = self.c.drover(self.addr, &["get-instances"]);
            (v.code == Some(0) && v.json().as_object().is_some_and(|o| o.len() == want))
                .then_some(())
        });
    }

    /// Waits for the processes to settle to one deploy that may be in effect; records a
    /// violation when they do not.
    fn check(&mut self, after: &str) {
        self.report.checks += 1;
        let last_acked = self.attempts.iter().rposition(|a| a.acked);
        let lowest = last_acked.max(self.floor).unwrap_or(0);
        let deadline = Instant::now() + self.opts.settle;
        let mut seen;
        let mut oldest;
        loop {
            let procs = node_processes(self.c.dir.path());
            oldest = procs.iter().map(|p| p.started).min().unwrap_or(u64::MAX);
            seen = observed(procs);
            // Every process must have started since the deploy that restarted every node
            // last; the one matched counts, as does any acknowledged one before it.
            let matched = (lowest..self.attempts.len()).rev().find(|&i| {
                matches(&self.attempts[i].share, &seen) && oldest >= self.restarted_since(i)
            });
            if let Some(i) = matched {
                self.floor = Some(i);
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let restart_lag = (lowest..self.attempts.len())
            .rev()
            .find(|&i| matches(&self.attempts[i].share, &seen))
            .map(|i| {
                format!(
                    "; the processes match #{i} but one started at tick {oldest}, before tick {} of the deploy that restarted every node",
                    self.restarted_since(i)
                )
            })
            .unwrap_or_default();
        let last = &self.attempts[self.attempts.len() - 1].share;
        let acked = last_acked.map_or_else(
            || "none acknowledged".to_owned(),
            |i| describe_diff(&self.attempts[i].share, &seen),
        );
        let v = format!(
            "after {after} (check {}): processes match no deploy in effect since #{lowest} \
             of {}; against the last attempt: {}; against the last acknowledged: {acked}{restart_lag}",
            self.report.checks,
            self.attempts.len(),
            describe_diff(last, &seen)
        );
        eprintln!("chaos: VIOLATION {v}");
        for p in node_processes(self.c.dir.path()) {
            let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid))
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("0::"))
                .unwrap_or("")
                .to_owned();
            eprintln!(
                "chaos:   {}/{} pid {} rev {:?} child {} cgroup {cgroup}",
                p.instance, p.node, p.pid, p.rev, p.child
            );
        }
        self.report.violations.push(v);
    }

    /// The tick since which every process must run if deploy `i` is in effect: when the
    /// latest deploy up to `i` that restarted every node was asked for, counting only
    /// `i` itself and acknowledged ones (a failed one may never have been recorded).
    fn restarted_since(&self, i: usize) -> u64 {
        self.attempts[..=i]
            .iter()
            .enumerate()
            .rev()
            .find(|(j, a)| a.restart_all && (*j == i || a.acked))
            .map_or(0, |(_, a)| a.asked_at)
    }
}

/// Clock ticks since boot, as process start times in `/proc/PID/stat` count them.
fn ticks_since_boot() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").expect("read /proc/uptime");
    let secs: f64 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("uptime in /proc/uptime");
    // Truncated, as the kernel's start times are: a process started after this moment
    // has a start time at least this.
    (secs * clock_ticks_per_sec() as f64) as u64
}

fn clock_ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(100)
}

#[derive(Debug, Clone, Copy)]
enum Victim {
    Agent(usize),
    Controller,
}

/// Starts agent `i` on host `i`. Every second agent runs without cgroups, so that both
/// ways of finding a node's processes (its cgroup; its process group and spawn token)
/// meet the faults.
fn start_agent(c: &Cluster, lab: &NetLab, i: usize, addr: SocketAddr) -> Proc {
    let name = agent_name(i);
    if !c.pki_file(&format!("{name}.crt")).exists() {
        c.issue(drover_proto::msg::PeerRole::Agent, &name);
    }
    let mut cmd = lab.command(i, &bin("drover-agent"));
    let addr = addr.to_string();
    let mut extra = vec!["--controller", addr.as_str()];
    if i % 2 == 1 {
        extra.extend(["--cgroup-root", "none"]);
    }
    c.agent_args(&mut cmd, &name, &name, &extra);
    Proc::spawn(
        &format!("agent {name}"),
        cmd,
        c.log_path(&format!("agent-{name}")),
    )
}

fn agent_name(i: usize) -> String {
    format!("agent-{}", i + 1)
}

/// A live node process of the run.
#[derive(Debug)]
struct NodeProc {
    pid: i32,
    instance: String,
    node: String,
    rev: Option<u64>,
    /// A child the node forked (`--spawn-children`), not its main process.
    child: bool,
    /// Its start time, in clock ticks since boot.
    started: u64,
}

/// What runs: per instance, per node, the revisions of its processes.
type Seen = BTreeMap<String, BTreeMap<String, Vec<Option<u64>>>>;

fn observed(procs: Vec<NodeProc>) -> Seen {
    let mut seen = Seen::new();
    for p in procs {
        seen.entry(p.instance)
            .or_default()
            .entry(p.node)
            .or_default()
            .push(p.rev);
    }
    seen
}

fn matches(share: &Share, seen: &Seen) -> bool {
    let empty = BTreeMap::new();
    let instances: std::collections::BTreeSet<&String> = share.keys().chain(seen.keys()).collect();
    instances.into_iter().all(|inst| {
        let want = share.get(inst).unwrap_or(&empty);
        let have = seen.get(inst);
        let have_len = have.map_or(0, BTreeMap::len);
        have_len == want.len()
            && want.iter().all(|(node, spec)| {
                have.and_then(|h| h.get(node)).is_some_and(|revs| {
                    revs.len() == spec.procs && revs.iter().all(|r| *r == Some(spec.rev))
                })
            })
    })
}

fn describe_diff(share: &Share, seen: &Seen) -> String {
    let mut out = Vec::new();
    let empty_s = BTreeMap::new();
    let empty_w = BTreeMap::new();
    let instances: std::collections::BTreeSet<&String> = share.keys().chain(seen.keys()).collect();
    for inst in instances {
        let want = share.get(inst).unwrap_or(&empty_w);
        let have = seen.get(inst).unwrap_or(&empty_s);
        let nodes: std::collections::BTreeSet<&String> = want.keys().chain(have.keys()).collect();
        for node in nodes {
            let w = want.get(node);
            let h = have.get(node);
            let ok = match (w, h) {
                (Some(spec), Some(revs)) => {
                    revs.len() == spec.procs && revs.iter().all(|r| *r == Some(spec.rev))
                }
                _ => false,
            };
            if !ok {
                out.push(format!(
                    "{inst}/{node}: want {:?}, running {:?}",
                    w.map(|s| (s.rev, s.procs)),
                    h
                ));
            }
        }
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join("; ")
    }
}

/// Live (not zombie) processes whose working directory is under `dir` and whose
/// environment names a drover node.
fn node_processes(dir: &Path) -> Vec<NodeProc> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command's closing parenthesis: the state (field 3), then on to the
        // start time (field 22).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        if fields.first().is_none_or(|state| *state == "Z") {
            continue;
        }
        let Some(started) = fields.get(19).and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let mut instance = None;
        let mut node = None;
        let mut rev = None;
        for var in env.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            if let Some(v) = var.strip_prefix("DROVER_INSTANCE=") {
                instance = Some(v.to_owned());
            } else if let Some(v) = var.strip_prefix("DROVER_NODE=") {
                node = Some(v.to_owned());
            } else if let Some(v) = var.strip_prefix(&format!("{REV_VAR}=")) {
                rev = v.parse().ok();
            }
        }
        let child = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--sleep-forever"));
        if let (Some(instance), Some(node)) = (instance, node) {
            out.push(NodeProc {
                pid,
                instance,
                node,
                rev,
                child,
                started,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(nodes: &[(&str, &str, u64, usize)]) -> Share {
        let mut s = Share::new();
        for (inst, node, rev, procs) in nodes {
            s.entry((*inst).to_owned()).or_default().insert(
                (*node).to_owned(),
                NodeSpec {
                    rev: *rev,
                    procs: *procs,
                },
            );
        }
        s
    }

    fn seen(procs: &[(&str, &str, Option<u64>)]) -> Seen {
        let mut s = Seen::new();
        for (inst, node, rev) in procs {
            s.entry((*inst).to_owned())
                .or_default()
                .entry((*node).to_owned())
                .or_default()
                .push(*rev);
        }
        s
    }

    #[test]
    fn the_invariant_rejects_duplicates_leftovers_old_specs_and_missing_nodes() {
        let want = share(&[("a", "x", 1, 1), ("a", "y", 2, 2), ("b", "z", 3, 1)]);
        let exact = seen(&[
            ("a", "x", Some(1)),
            ("a", "y", Some(2)),
            ("a", "y", Some(2)),
            ("b", "z", Some(3)),
        ]);
        assert!(matches(&want, &exact));
        let dup = seen(&[
            ("a", "x", Some(1)),
            ("a", "x", Some(1)),
            ("a", "y", Some(2)),
            ("a", "y", Some(2)),
            ("b", "z", Some(3)),
        ]);
        assert!(!matches(&want, &dup), "a node running twice");
        let old = seen(&[
            ("a", "x", Some(0)),
            ("a", "y", Some(2)),
            ("a", "y", Some(2)),
            ("b", "z", Some(3)),
        ]);
        assert!(!matches(&want, &old), "an old spec still running");
        let leftover = seen(&[
            ("a", "x", Some(1)),
            ("a", "y", Some(2)),
            ("a", "y", Some(2)),
            ("b", "z", Some(3)),
            ("c", "gone", Some(1)),
        ]);
        assert!(!matches(&want, &leftover), "a removed node left running");
        let orphan_child = seen(&[
            ("a", "x", Some(1)),
            ("a", "y", Some(2)),
            ("b", "z", Some(3)),
        ]);
        assert!(!matches(&want, &orphan_child), "a child missing");
        assert!(describe_diff(&want, &leftover).contains("c/gone"));
    }
}
