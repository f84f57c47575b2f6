//! `cargo xtask bench deploy`: a real deploy on loopback, against the bare cost of
//! spawning the same processes and against supervisord.
//!
//! In each cold run (fresh directory, PKI and daemons), one system after another:
//!
//! - **drover**: a release controller and 4 agents (from [`crate::cluster::Cluster`]),
//!   then `drover deploy-config` of 4 × 50 nodes running `drover-testprog`. Timed from
//!   just before the CLI starts: when it returns (its reply waits until every node is
//!   RUNNING, i.e. ready), and when a `drover monitor` stream subscribed beforehand has
//!   seen every node RUNNING (no polling). Then the same file is deployed again: a new
//!   generation with nothing to start, so its time is what a deploy costs before its
//!   first spawn, whatever the number of nodes (it must restart none).
//! - **bare**: the same 200 programs spawned with `std::process::Command` (posix_spawn)
//!   from one thread of this process: the physical floor. Each gets the variables of
//!   an agent's environment that the program acts on (its node name, instance and query
//!   socket: it binds the socket), so both runs start programs doing the same work.
//! - **supervisord** 4.3.0 (the venv of `bench supervise`): `supervisord -c FILE` with
//!   200 programs, its XML-RPC status polled every 50 ms until all are RUNNING.
//!
//! For all three, a thread records when each child of the supervising processes that
//! runs the program (its argv is the program's) was exec'd: from the kernel's exec
//! events where the bench may listen to them (root), else by polling `/proc` every
//! 1 ms ([`ExecWatch`]). Polling costs CPU in proportion to the supervisor's threads,
//! which on a busy machine is taken from the system measured; the events cost none.
//! Every program carries an environment marker; after each run the bench looks through
//! `/proc` for processes with it, counts and kills them (the "left after teardown"
//! row), and a guard does the same however the bench ends.
//!
//! Readiness is `start-period` 0 s by default (RUNNING once spawned, like supervisord's
//! `startsecs=0`), or with `--readiness notify` `READY=1` from the program
//! (`drover-testprog --ready-after 0ms`); the bare spawner then waits for the 200
//! datagrams too. Results: medians (min–max) over the runs, ratios drover/bare and
//! drover/supervisord, JSON in `target/bench/deploy-<timestamp>.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::{Map, Value, json};

use super::execevents::{self, ExecWatch};
use super::stats::{Summary, fmt_count, fmt_num, ratio, render_table};
use super::system::{Pending, PidSource, System};
use super::{drover, install, names, procfs, reason, release_dir, supervisord, timestamp};
use crate::cluster::{self, Cluster, interrupted};
use crate::project_root;

/// When a node counts as running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Readiness {
    /// Running once spawned: drover `start-period` 0 s, supervisord `startsecs=0`.
    StartPeriod,
    /// Running once the program sent `READY=1` on `$NOTIFY_SOCKET`.
    Notify,
}

impl Readiness {
    const fn label(self) -> &'static str {
        match self {
            Self::StartPeriod => "start-period 0s",
            Self::Notify => "notify (READY=1)",
        }
    }
}

/// What `bench deploy` runs.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Agents (each a real `drover-agent` process).
    pub(crate) agents: usize,
    /// Nodes per agent.
    pub(crate) nodes_per_agent: usize,
    /// Cold runs per system.
    pub(crate) runs: usize,
    /// When a node counts as running.
    pub(crate) readiness: Readiness,
    /// Measure supervisord too.
    pub(crate) supervisord: bool,
    /// Build the release binaries first.
    pub(crate) build: bool,
    /// Where the runs' directories go, if not under `target/bench`.
    pub(crate) scratch: Option<PathBuf>,
}

/// The environment variable that marks every program of this bench.
const MARKER: &str = "DROVER_BENCH_DEPLOY";

/// Samples per metric key.
type Samples = BTreeMap<&'static str, Vec<f64>>;

/// One figure: key, label, whether it is a count.
const METRICS: &[(&str, &str, bool)] = &[
    ("returned_ms", "request → command returns (ms)", false),
    ("running_ms", "request → all reported running (ms)", false),
    (
        "first_exec_ms",
        "request → first program exec'd (ms)",
        false,
    ),
    ("last_exec_ms", "request → last program exec'd (ms)", false),
    (
        "again_ms",
        "the same deploy again → command returns: the per-request cost, nothing to start (ms)",
        false,
    ),
    (
        "cpu_ms",
        "CPU of the supervising processes meanwhile (ms, 10 ms ticks)",
        false,
    ),
    (
        "cpu_controller_ms",
        "… of which drover's controller (ms)",
        false,
    ),
    (
        "machine_busy_ms",
        "machine CPU busy meanwhile, all cores, programs included (ms, 10 ms ticks)",
        false,
    ),
    ("leftovers", "program processes left after teardown", true),
];

/// The systems, in column order.
const SYSTEMS: [&str; 3] = ["drover", "bare", "supervisord"];

/// What every run of every system shares.
struct Ctx {
    bin_dir: PathBuf,
    /// The program's argv (absolute path first).
    argv: Vec<String>,
    names: Vec<String>,
    agents: usize,
    per_agent: usize,
    readiness: Readiness,
}

impl Ctx {
    fn n(&self) -> usize {
        self.names.len()
    }

    /// Generous: a stuck run fails instead of hanging.
    fn patience(&self) -> Duration {
        Duration::from_secs(60) + Duration::from_millis(100) * u32::try_from(self.n()).unwrap_or(0)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn push(s: &mut Samples, key: &'static str, v: f64) {
    s.entry(key).or_default().push(v);
}

fn ticks_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / procfs::clk_tck() as f64
}

/// Sleeps `d`, failing early on Ctrl-C.
fn pause(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
    Ok(())
}

// === the exec watcher ===

/// Waits for the watcher (see [`ExecWatch::finish`]); fails unless it saw `n`. Pushes
/// the first and last exec times.
fn finish_watch(watch: ExecWatch, n: usize, s: &mut Samples) -> anyhow::Result<BTreeSet<u32>> {
    let seen = watch.finish(n)?;
    push(s, "first_exec_ms", ms(seen[0].1));
    push(s, "last_exec_ms", ms(seen[n - 1].1));
    Ok(seen.into_iter().map(|(p, _)| p).collect())
}

// === leftovers ===

/// The value of [`MARKER`] in the environment of `pid`, if it has one.
fn marker_of(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{MARKER}=");
    raw.split(|b| *b == 0).find_map(|kv| {
        kv.strip_prefix(key.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Live processes (not zombies) whose marker starts with `prefix`.
fn marked(prefix: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && !procfs::exited(*pid))
        .filter(|pid| marker_of(*pid).is_some_and(|m| m.starts_with(prefix)))
        .collect()
}

/// Counts the processes still carrying a marker that starts with `prefix` (giving
/// those about to exit `grace`), and SIGKILLs them.
fn sweep(prefix: &str, grace: Duration) -> usize {
    let deadline = Instant::now() + grace;
    let mut left = marked(prefix);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = marked(prefix);
    }
    for pid in &left {
        if let Ok(raw) = i32::try_from(*pid) {
            let _ = signal::kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
    }
    left.len()
}

/// Kills every marked program of this invocation when dropped, however the bench ends.
struct SweepGuard(String);

impl Drop for SweepGuard {
    fn drop(&mut self) {
        let n = sweep(&self.0, Duration::ZERO);
        if n > 0 {
            eprintln!("killed {n} leftover program process(es)");
        }
    }
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// === drover ===

/// The cluster file: `agents` instances, `per_agent` nodes each running `argv`.
fn cluster_file(ctx: &Ctx, marker: &str) -> String {
    let command = format!(
        "[{}]",
        ctx.argv
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let readiness = match ctx.readiness {
        Readiness::StartPeriod => r#"{ kind = "start-period", period = "0s" }"#,
        Readiness::Notify => r#"{ kind = "notify", timeout = "30s" }"#,
    };
    let mut text = String::new();
    for a in 1..=ctx.agents {
        text.push_str(&format!("[instances.agent-{a}]\n"));
    }
    for (i, n) in ctx.names.iter().enumerate() {
        text.push_str(&format!(
            "\n[nodes.{n}]\ninstance = \"agent-{}\"\ncommand = {command}\nrestart = \"always\"\n\
             backoff = {{ initial = \"0s\" }}\nreadiness = {readiness}\n\
             env = {{ {MARKER} = \"{marker}\" }}\n",
            i / ctx.per_agent + 1
        ));
    }
    text
}

fn run_drover(ctx: &Ctx, dir: &Path, marker: &str) -> anyhow::Result<Samples> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file = dir.join("cluster.toml");
    fs::write(&file, cluster_file(ctx, marker))?;
    let mut cluster = Cluster::start(
        &dir.join("cluster"),
        &ctx.bin_dir,
        u32::try_from(ctx.agents)?,
        0,
    )?;
    let result = measure_drover(ctx, dir, &file, &mut cluster);
    // SIGTERM: each agent stops its nodes, then exits; then the controller.
    drop(cluster);
    result
}

fn measure_drover(
    ctx: &Ctx,
    dir: &Path,
    file: &Path,
    cluster: &mut Cluster,
) -> anyhow::Result<Samples> {
    let n = ctx.n();
    let mut s = Samples::new();
    // A monitor subscribed before the request: node_state events with arrival times.
    let mut child = cluster
        .client()
        .arg("monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(dir.join("monitor.err"))?)
        .spawn()
        .context("cannot run `drover monitor`")?;
    let stdout = child.stdout.take().context("monitor stdout")?;
    let _monitor = KillOnDrop(child);
    let (tx, rx) = mpsc::channel::<(Instant, Value)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send((at, v)).is_err()
            {
                break;
            }
        }
    });
    // The subscription is checked afterwards: the monitor must have seen this deploy
    // start, or it could have missed node events.
    pause(Duration::from_millis(500))?;

    let agents: Vec<u32> = cluster
        .agents
        .iter()
        .filter_map(|a| cluster.pid(a))
        .collect();
    let ctl = cluster.pid("controller").context("the controller's pid")?;
    // CPU ticks of the agents and of the controller.
    let cpu = || -> anyhow::Result<(u64, u64)> {
        let agents: u64 = agents
            .iter()
            .map(|p| procfs::cpu_ticks(*p))
            .sum::<anyhow::Result<u64>>()?;
        Ok((agents, procfs::cpu_ticks(ctl)?))
    };
    let (agents0, ctl0) = cpu()?;
    let (busy0, _) = procfs::machine_ticks()?;
    let t0 = Instant::now();
    let watch = ExecWatch::start(
        t0,
        agents.iter().map(|p| PidSource::Pid(*p)).collect(),
        &ctx.argv,
        n,
    )?;
    let mut cmd = cluster.client();
    cmd.arg("deploy-config").arg(file);
    let mut deploy =
        Pending::spawn(&mut cmd, dir, "deploy", "drover deploy-config")?.in_background();

    let mut states: BTreeMap<String, bool> = BTreeMap::new();
    let mut started_seen = false;
    let mut returned: Option<Duration> = None;
    let mut running: Option<Duration> = None;
    let patience = ctx.patience();
    while returned.is_none() || running.is_none() {
        if interrupted() {
            bail!("interrupted");
        }
        if returned.is_none()
            && let Some((at, done)) = deploy.try_done()
        {
            returned = Some(at - t0);
            drover::check_reply(&done?)?;
        }
        while let Ok((at, v)) = rx.try_recv() {
            let ev = &v["event"];
            match ev["type"].as_str() {
                Some("deploy_started") => started_seen = true,
                Some("node_state") => {
                    if let Some(node) = ev["node"].as_str() {
                        states.insert(node.to_owned(), ev["state"] == "RUNNING");
                    }
                    if running.is_none()
                        && ctx
                            .names
                            .iter()
                            .all(|nm| states.get(nm).copied().unwrap_or(false))
                    {
                        running = Some(at - t0);
                    }
                }
                _ => {}
            }
        }
        if let Some(r) = returned
            && running.is_none()
            && t0.elapsed() > r + Duration::from_secs(10)
        {
            bail!(
                "the deploy returned but the monitor saw {} of {n} nodes RUNNING 10 s later \
                 (deploy_started seen: {started_seen})",
                states.values().filter(|r| **r).count()
            );
        }
        if t0.elapsed() > patience {
            bail!("the deploy did not finish within {patience:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (agents1, ctl1) = cpu()?;
    let (busy1, _) = procfs::machine_ticks()?;
    if !started_seen {
        bail!("the monitor was not subscribed before the deploy (no deploy_started event)");
    }
    push(&mut s, "returned_ms", ms(returned.unwrap_or_default()));
    push(&mut s, "running_ms", ms(running.unwrap_or_default()));
    push(&mut s, "cpu_ms", ticks_ms(agents1 + ctl1 - agents0 - ctl0));
    push(&mut s, "cpu_controller_ms", ticks_ms(ctl1 - ctl0));
    push(&mut s, "machine_busy_ms", ticks_ms(busy1 - busy0));
    let pids = finish_watch(watch, n, &mut s)?;

    // What get-nodes says: every node RUNNING, with a pid the watcher saw exec.
    let listing = get_nodes(cluster)?;
    for name in &ctx.names {
        match listing.get(name) {
            Some(p) if p.running && p.pid.is_some_and(|pid| pids.contains(&pid)) => {}
            other => bail!("get-nodes after the deploy: {name} is {other:?}"),
        }
    }

    // The same file again: a new generation whose nodes all run already. What it takes
    // is what every deploy costs before its first spawn (a CLI process, the handshake,
    // staging and deploying, each recorded durably, the agents' answers).
    let t1 = Instant::now();
    let mut cmd = cluster.client();
    cmd.arg("deploy-config").arg(file);
    let mut again =
        Pending::spawn(&mut cmd, dir, "again", "drover deploy-config (again)")?.in_background();
    let (at, done) = loop {
        if let Some(done) = again.try_done() {
            break done;
        }
        if interrupted() {
            bail!("interrupted");
        }
        if t1.elapsed() > patience {
            bail!("the same deploy again did not finish within {patience:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    drover::check_reply(&done?)?;
    push(&mut s, "again_ms", ms(at - t1));
    let after = get_nodes(cluster)?;
    for name in &ctx.names {
        let (before, now) = (listing.get(name), after.get(name));
        if before.map(|p| p.pid) != now.map(|p| p.pid) {
            bail!("the same deploy again restarted {name}: {before:?}, then {now:?}");
        }
    }
    Ok(s)
}

/// What `drover get-nodes` says of every node.
fn get_nodes(cluster: &Cluster) -> anyhow::Result<super::system::Listing> {
    let out = cluster
        .client()
        .arg("get-nodes")
        .output()
        .context("cannot run `drover get-nodes`")?;
    drover::parse_get_nodes(&serde_json::from_slice(&out.stdout)?)
}

/// The filesystem `path` is (or would be) on, from `/proc/self/mounts`: its type and
/// device, since how fast it allocates inodes shows in every figure.
fn filesystem_of(path: &Path) -> String {
    let mut at = path.to_path_buf();
    while !at.exists() && at.pop() {}
    let at = fs::canonicalize(&at).unwrap_or(at);
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return "filesystem unknown".to_owned();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && at.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} on {}", f[2], f[0])))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(
            || "filesystem unknown".to_owned(),
            |(_, found)| {
                let journals: Vec<String> = fs::read_dir("/proc/fs/jbd2")
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                let note = journal_note(&found, &journals);
                found + &note
            },
        )
}

/// What to add to "ext4 on DEVICE" (from [`filesystem_of`]) when that ext4 has no
/// journal (no `/proc/fs/jbd2/<device>-*` among `journals`): there, allocating an inode
/// skips every one deleted in the last seconds to minutes, one by one, so the figures
/// depend on how much was deleted lately (earlier runs, other tests), not only on drover.
fn journal_note(fs: &str, journals: &[String]) -> String {
    let Some(device) = fs.strip_prefix("ext4 on ") else {
        return String::new();
    };
    let name = device.rsplit('/').next().unwrap_or(device);
    if journals.iter().any(|j| j.starts_with(&format!("{name}-"))) {
        String::new()
    } else {
        ", no journal: new inodes skip recently deleted ones, so figures vary with \
         what was deleted lately; --scratch on tmpfs takes the filesystem out"
            .to_owned()
    }
}

// === bare ===

fn thread_cpu_ticks() -> u64 {
    fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|t| procfs::parse_stat(&t))
        .map_or(0, |st| st.utime + st.stime)
}

/// What the spawning thread did.
struct Spawned {
    kids: Vec<KillOnDrop>,
    error: Option<std::io::Error>,
    done: Instant,
    cpu_ticks: u64,
}

fn run_bare(ctx: &Ctx, dir: &Path, marker: &str) -> anyhow::Result<Samples> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let n = ctx.n();
    let mut s = Samples::new();
    let notify = match ctx.readiness {
        Readiness::Notify => {
            let path = dir.join("notify.sock");
            let _ = fs::remove_file(&path);
            let sock = UnixDatagram::bind(&path)
                .with_context(|| format!("cannot bind {}", path.display()))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            Some((sock, path))
        }
        Readiness::StartPeriod => None,
    };
    let notify_path = notify.as_ref().map(|(_, p)| p.clone());
    // What an agent tells each node that the program acts on: its query socket, which
    // it binds (the programs do the same work as under drover).
    let sockets = dir.join("q");
    fs::create_dir_all(&sockets)?;
    let nodes: Vec<(String, String, PathBuf)> = ctx
        .names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (
                name.clone(),
                format!("agent-{}", i / ctx.per_agent + 1),
                sockets.join(format!("{name}.sock")),
            )
        })
        .collect();
    let argv = ctx.argv.clone();
    let marker = marker.to_owned();
    let (busy0, _) = procfs::machine_ticks()?;
    let t0 = Instant::now();
    let watch = ExecWatch::start(t0, vec![PidSource::Pid(std::process::id())], &ctx.argv, n)?;
    let spawner = std::thread::spawn(move || {
        let cpu0 = thread_cpu_ticks();
        let mut kids = Vec::with_capacity(n);
        let mut error = None;
        for (node, instance, query) in &nodes {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .env_clear()
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .env("DROVER_NODE", node)
                .env("DROVER_INSTANCE", instance)
                .env("DROVER_QUERY_SOCKET", query)
                .env(MARKER, &marker)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0);
            if let Some(p) = &notify_path {
                cmd.env("NOTIFY_SOCKET", p);
            }
            match cmd.spawn() {
                Ok(c) => kids.push(KillOnDrop(c)),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let done = Instant::now();
        Spawned {
            kids,
            error,
            done,
            cpu_ticks: thread_cpu_ticks() - cpu0,
        }
    });
    let mut ready_at = None;
    if let Some((sock, _)) = &notify {
        let mut ready = 0;
        let mut buf = [0u8; 512];
        while ready < n {
            if interrupted() || t0.elapsed() > ctx.patience() {
                break;
            }
            if let Ok(len) = sock.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..len])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                ready += 1;
                if ready == n {
                    ready_at = Some(t0.elapsed());
                }
            }
        }
    }
    let spawned = spawner
        .join()
        .map_err(|_| anyhow::anyhow!("the spawning thread panicked"))?;
    let (busy1, _) = procfs::machine_ticks()?;
    if let Some(e) = spawned.error {
        bail!("spawn {} of {n} failed: {e}", spawned.kids.len() + 1);
    }
    let returned = spawned.done - t0;
    push(&mut s, "returned_ms", ms(returned));
    match ctx.readiness {
        Readiness::StartPeriod => push(&mut s, "running_ms", ms(returned)),
        Readiness::Notify => match ready_at {
            Some(at) => push(&mut s, "running_ms", ms(at)),
            None => bail!("not all {n} programs sent READY=1"),
        },
    }
    push(&mut s, "cpu_ms", ticks_ms(spawned.cpu_ticks));
    push(&mut s, "machine_busy_ms", ticks_ms(busy1 - busy0));
    finish_watch(watch, n, &mut s)?;
    // Dropping the children kills and reaps them.
    drop(spawned.kids);
    Ok(s)
}

// === supervisord ===

fn run_supervisord(ctx: &Ctx, venv: &Path, dir: &Path, marker: &str) -> anyhow::Result<Samples> {
    let n = ctx.n();
    let mut s = Samples::new();
    let argv: Vec<&str> = ctx.argv.iter().map(String::as_str).collect();
    let env = [(MARKER.to_owned(), marker.to_owned())];
    let mut sv = supervisord::Supervisord::with_env(dir, venv, &ctx.names, &argv, &env)?;
    let result = (|| {
        let (busy0, _) = procfs::machine_ticks()?;
        let t0 = Instant::now();
        let watch = ExecWatch::start(t0, vec![sv.supervisor_source()], &ctx.argv, n)?;
        let mut start = sv.start()?.in_background();
        let mut returned = None;
        let mut running = None;
        let mut tick = 0u32;
        let patience = ctx.patience();
        while returned.is_none() || running.is_none() {
            if interrupted() {
                bail!("interrupted");
            }
            if returned.is_none()
                && let Some((at, done)) = start.try_done()
            {
                returned = Some(at - t0);
                sv.check(&done?)?;
            }
            if running.is_none()
                && let Ok(l) = sv.status()
                && super::scenario::all_running(&l, &ctx.names)
            {
                running = Some(t0.elapsed());
            }
            if t0.elapsed() > patience {
                bail!("supervisord did not report all {n} programs RUNNING within {patience:?}");
            }
            tick += 1;
            let next = t0 + Duration::from_millis(50) * tick;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        let (busy1, _) = procfs::machine_ticks()?;
        let sup = sv
            .supervisor_pid()
            .context("supervisord's pid is unknown")?;
        push(&mut s, "cpu_ms", ticks_ms(procfs::cpu_ticks(sup)?));
        push(&mut s, "machine_busy_ms", ticks_ms(busy1 - busy0));
        push(&mut s, "returned_ms", ms(returned.unwrap_or_default()));
        push(&mut s, "running_ms", ms(running.unwrap_or_default()));
        finish_watch(watch, n, &mut s)?;
        Ok(s)
    })();
    if let Err(e) = sv.shutdown() {
        eprintln!("  supervisord shutdown: {e:#}");
    }
    result
}

// === the bench ===

/// What each system's figures mean, printed under the table and kept in the JSON.
fn settings(readiness: Readiness) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "exec times",
        format!("for all three, from {}", execevents::source()),
    );
    m.insert(
        "drover",
        format!(
            "a controller and 4 agents (release, loopback, mutual TLS); nodes: restart = \
             \"always\", backoff 0s, readiness {}; request = `drover deploy-config FILE` (a new \
             CLI process: QUIC/mTLS handshake, stage, deploy); it returns once every agent \
             answered, and an agent answers once its nodes are RUNNING; running = the last \
             node_state RUNNING event on a `drover monitor` stream subscribed beforehand \
             (no polling); CPU = controller + agents (not the CLI)",
            readiness.label()
        ),
    );
    m.insert(
        "bare",
        format!(
            "std::process::Command::spawn (posix_spawn) in a loop on one thread of the \
             bench, output to /dev/null, own process group, with DROVER_NODE, \
             DROVER_INSTANCE and DROVER_QUERY_SOCKET as an agent sets them (each program \
             binds its query socket, as under drover); returns = the last spawn() \
             returned (glibc's posix_spawn returns once the child has exec'd); running = {}; \
             CPU = the spawning thread",
            match readiness {
                Readiness::StartPeriod => "the same moment",
                Readiness::Notify => "the last READY=1 datagram received",
            }
        ),
    );
    m.insert(
        "supervisord",
        format!(
            "supervisord {} (PyPI, the venv of `bench supervise`): autorestart=true, \
             startsecs=0{}; request = `supervisord -c FILE`, which daemonizes and returns \
             before its programs start; running = XML-RPC getAllProcessInfo from a warm \
             client every 50 ms (polling wakes its loop, peer-bench.md's observer effect); \
             CPU = the daemon since its start",
            install::SUPERVISOR_VERSION,
            match readiness {
                Readiness::StartPeriod => "",
                Readiness::Notify => " (it has no READY=1 readiness: RUNNING once forked)",
            }
        ),
    );
    m
}

/// Runs the benchmark and prints and writes the report.
pub(crate) fn run(opts: &Options) -> anyhow::Result<()> {
    cluster::install_signal_handlers()?;
    anyhow::ensure!(
        opts.agents > 0 && opts.nodes_per_agent > 0,
        "--agents and --nodes-per-agent must be positive"
    );
    let bench = project_root().join("target/bench");
    fs::create_dir_all(&bench).with_context(|| format!("cannot create {}", bench.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let stamp = timestamp(now);
    let run_root = opts
        .scratch
        .as_ref()
        .unwrap_or(&bench)
        .join(format!("deploy-run-{stamp}"));
    let _guard = SweepGuard(format!("{stamp}/"));

    if opts.build {
        let log = bench.join("build.log");
        eprintln!(
            "building the release binaries (cargo build --release; log: {})",
            log.display()
        );
        cluster::build_binaries(true, Some(&log))?;
    }
    let bin_dir = release_dir();
    let testprog = bin_dir.join("drover-testprog");
    anyhow::ensure!(
        testprog.exists(),
        "no {} (build the release binaries)",
        testprog.display()
    );
    let mut argv = vec![testprog.display().to_string()];
    if opts.readiness == Readiness::Notify {
        argv.extend(["--ready-after".to_owned(), "0ms".to_owned()]);
    }
    let n = opts.agents * opts.nodes_per_agent;
    let ctx = Ctx {
        bin_dir: bin_dir.clone(),
        argv,
        names: names(n),
        agents: opts.agents,
        per_agent: opts.nodes_per_agent,
        readiness: opts.readiness,
    };
    let mut venv: Result<PathBuf, String> = if opts.supervisord {
        install::supervisord(&bench).map_err(|e| reason(&e))
    } else {
        Err("not asked for".to_owned())
    };
    let version = Command::new(bin_dir.join("drover"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let load_at_start = procfs::loadavg();
    let notes = settings(opts.readiness);
    println!(
        "bench deploy: {n} × `{}` ({} agents × {} nodes for drover), readiness {}; {} cold \
         run(s) per system, one system at a time",
        ctx.argv.join(" "),
        opts.agents,
        opts.nodes_per_agent,
        opts.readiness.label(),
        opts.runs
    );
    println!(
        "machine: {} CPU(s), load {} at start; {version}; scratch: {} ({})",
        std::thread::available_parallelism().map_or(0, usize::from),
        load_at_start.map_or_else(|| "?".to_owned(), |l| format!("{l:.2}")),
        run_root.display(),
        filesystem_of(&run_root)
    );

    let mut acc: BTreeMap<&'static str, Result<Samples, String>> = BTreeMap::new();
    acc.insert("drover", Ok(Samples::new()));
    acc.insert("bare", Ok(Samples::new()));
    acc.insert(
        "supervisord",
        venv.as_ref().map(|_| Samples::new()).map_err(Clone::clone),
    );
    let mut loads = Vec::new();
    for r in 1..=opts.runs {
        for sys in SYSTEMS {
            if acc.get(sys).is_some_and(Result::is_err) {
                continue;
            }
            let load = procfs::loadavg().unwrap_or(f64::NAN);
            loads.push(load);
            eprintln!("run {r}/{}: {sys} (load {load:.2})", opts.runs);
            let dir = run_root.join(format!("{r}-{sys}"));
            let marker = format!("{stamp}/{r}/{sys}");
            let got = match sys {
                "drover" => run_drover(&ctx, &dir, &marker),
                "bare" => run_bare(&ctx, &dir, &marker),
                _ => match &venv {
                    Ok(v) => run_supervisord(&ctx, v, &dir, &marker),
                    Err(e) => Err(anyhow::anyhow!("{e}")),
                },
            };
            let left = sweep(&marker, Duration::from_secs(3));
            if left > 0 {
                eprintln!("  {left} program process(es) outlived the teardown; killed them");
            }
            match got {
                Ok(samples) => {
                    if let Some(Ok(all)) = acc.get_mut(sys) {
                        for (k, v) in samples {
                            all.entry(k).or_default().extend(v);
                        }
                        all.entry("leftovers").or_default().push(left as f64);
                    }
                }
                Err(err) => {
                    if interrupted() {
                        return Err(err);
                    }
                    let why = format!("run {r}: {}", reason(&err));
                    println!("{sys}: unavailable: {why}");
                    eprintln!("  (its files: {})", dir.display());
                    if sys == "supervisord" {
                        venv = Err(why.clone());
                    }
                    acc.insert(sys, Err(why));
                }
            }
        }
    }

    println!("\n{}", table(n, &acc).trim_end());
    let targets = targets(&acc);
    println!();
    for t in &targets {
        println!("{}", t["text"].as_str().unwrap_or_default());
    }
    println!("\nnotes (median (min–max) over the runs):");
    for (sys, text) in &notes {
        println!("- {sys}: {text}");
    }

    let mut results = Map::new();
    for (sys, outcome) in &acc {
        results.insert(
            (*sys).to_owned(),
            match outcome {
                Ok(samples) => {
                    let mut m = Map::new();
                    for (key, _, _) in METRICS {
                        if let Some(v) = samples.get(key)
                            && let Some(sum) = Summary::of(v)
                        {
                            m.insert((*key).to_owned(), sum.to_json(v));
                        }
                    }
                    json!({"status": "ok", "metrics": m})
                }
                Err(why) => json!({"status": "unavailable", "reason": why}),
            },
        );
    }
    let report = json!({
        "bench": "deploy",
        "timestamp": stamp,
        "program": ctx.argv,
        "drover_version": version,
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "loadavg_1m_at_start": load_at_start,
            "loadavg_1m_before_each_run": loads,
        },
        "options": {
            "agents": opts.agents,
            "nodes_per_agent": opts.nodes_per_agent,
            "nodes": n,
            "runs": opts.runs,
            "readiness": opts.readiness.label(),
        },
        "metrics": METRICS.iter().map(|(k, l, _)| ((*k).to_owned(), json!(l))).collect::<Map<_, _>>(),
        "settings": notes,
        "results": results,
        "ratios": ratios_json(&acc),
        "targets": targets,
    });
    let path = bench.join(format!("deploy-{stamp}.json"));
    fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nwritten: {}", path.display());
    Ok(())
}

fn median(
    acc: &BTreeMap<&'static str, Result<Samples, String>>,
    sys: &str,
    key: &str,
) -> Option<f64> {
    match acc.get(sys) {
        Some(Ok(s)) => Summary::of(s.get(key)?).map(|s| s.median),
        _ => None,
    }
}

/// The table: a row per figure; drover, bare, drover/bare, supervisord,
/// drover/supervisord.
fn table(n: usize, acc: &BTreeMap<&'static str, Result<Samples, String>>) -> String {
    let header: Vec<String> = [
        &format!("{n} programs"),
        "drover",
        "bare spawn",
        "drover/bare",
        "supervisord",
        "drover/supervisord",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let cell = |sys: &str, key: &str, count: bool| -> String {
        match acc.get(sys) {
            Some(Ok(s)) => s.get(key).and_then(|v| Summary::of(v)).map_or_else(
                || "–".to_owned(),
                |sum| {
                    if count {
                        sum.cell_with(fmt_count)
                    } else {
                        sum.cell()
                    }
                },
            ),
            _ => "unavailable".to_owned(),
        }
    };
    let rat = |key: &str, peer: &str, count: bool| -> String {
        match (median(acc, "drover", key), median(acc, peer, key)) {
            (Some(d), Some(p)) if !count => ratio(d, p),
            _ => "–".to_owned(),
        }
    };
    let rows: Vec<Vec<String>> = METRICS
        .iter()
        .map(|(key, label, count)| {
            vec![
                (*label).to_owned(),
                cell("drover", key, *count),
                cell("bare", key, *count),
                rat(key, "bare", *count),
                cell("supervisord", key, *count),
                rat(key, "supervisord", *count),
            ]
        })
        .collect();
    let mut out = render_table(&header, &rows);
    for (sys, outcome) in acc {
        if let Err(why) = outcome {
            out.push_str(&format!("{sys}: unavailable: {why}\n"));
        }
    }
    out
}

fn ratios_json(acc: &BTreeMap<&'static str, Result<Samples, String>>) -> Value {
    let mut out = Map::new();
    for peer in ["bare", "supervisord"] {
        let mut m = Map::new();
        for (key, _, count) in METRICS {
            if let (false, Some(d), Some(p)) =
                (*count, median(acc, "drover", key), median(acc, peer, key))
                && p != 0.0
            {
                m.insert((*key).to_owned(), json!(d / p));
            }
        }
        out.insert(format!("drover/{peer}"), Value::Object(m));
    }
    Value::Object(out)
}

/// The targets: a deploy within 1.25x the bare spawn (and, an earlier one, within 2x),
/// and faster than supervisord.
fn targets(acc: &BTreeMap<&'static str, Result<Samples, String>>) -> Vec<Value> {
    let mut out = Vec::new();
    // drover's deploy is done when its command returns: the reply comes once every
    // agent has all its nodes RUNNING (the monitor's view lags by the agents' 50 ms
    // report coalescing; both are in the table).
    let drover = median(acc, "drover", "returned_ms");
    let bare = median(acc, "bare", "running_ms");
    let sup = median(acc, "supervisord", "running_ms");
    for (name, peer, limit, what) in [
        (
            "deploy within 1.25x bare spawn",
            bare,
            1.25,
            "bare spawn (all running)",
        ),
        (
            "deploy within 2x bare spawn",
            bare,
            2.0,
            "bare spawn (all running)",
        ),
        (
            "faster than supervisord",
            sup,
            1.0,
            "supervisord all RUNNING",
        ),
    ] {
        let v = match (drover, peer) {
            (Some(d), Some(p)) if p > 0.0 => {
                let r = d / p;
                let met = r <= limit;
                json!({
                    "target": name,
                    "drover_ms": d,
                    "reference_ms": p,
                    "ratio": r,
                    "limit": limit,
                    "met": met,
                    "text": format!(
                        "target: {name}: drover deploy returned (all RUNNING) {} ms vs {what} \
                         {} ms = {} (limit {limit}x): {}",
                        fmt_num(d), fmt_num(p), ratio(d, p),
                        if met { "met" } else { "NOT met" }
                    ),
                })
            }
            _ => json!({
                "target": name,
                "met": null,
                "text": format!("target: {name}: not measured"),
            }),
        };
        out.push(v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(readiness: Readiness) -> Ctx {
        Ctx {
            bin_dir: PathBuf::from("/b"),
            argv: vec!["/b/drover-testprog".to_owned()],
            names: names(6),
            agents: 3,
            per_agent: 2,
            readiness,
        }
    }

    #[test]
    fn an_ext4_without_a_journal_is_named_as_such() {
        let journals = vec!["vdb-8".to_owned()];
        assert!(journal_note("ext4 on /dev/vda", &journals).contains("no journal"));
        assert_eq!(journal_note("ext4 on /dev/vdb", &journals), "");
        assert_eq!(journal_note("tmpfs on tmpfs", &[]), "");
        assert_eq!(journal_note("xfs on /dev/vda", &[]), "");
    }

    #[test]
    fn cluster_files_spread_nodes_in_blocks_and_mark_them() {
        let toml: toml::Table = cluster_file(&ctx(Readiness::StartPeriod), "s/1/drover")
            .parse()
            .unwrap();
        assert_eq!(toml["instances"].as_table().unwrap().len(), 3);
        let nodes = toml["nodes"].as_table().unwrap();
        assert_eq!(nodes.len(), 6);
        assert_eq!(nodes["n-002"]["instance"].as_str(), Some("agent-1"));
        assert_eq!(nodes["n-003"]["instance"].as_str(), Some("agent-2"));
        assert_eq!(nodes["n-006"]["instance"].as_str(), Some("agent-3"));
        let n = &nodes["n-001"];
        assert_eq!(n["command"][0].as_str(), Some("/b/drover-testprog"));
        assert_eq!(n["readiness"]["kind"].as_str(), Some("start-period"));
        assert_eq!(n["readiness"]["period"].as_str(), Some("0s"));
        assert_eq!(n["env"][MARKER].as_str(), Some("s/1/drover"));
        let toml: toml::Table = cluster_file(&ctx(Readiness::Notify), "m").parse().unwrap();
        assert_eq!(
            toml["nodes"]["n-004"]["readiness"]["kind"].as_str(),
            Some("notify")
        );
    }

    #[test]
    fn this_process_carries_no_marker() {
        assert_eq!(marker_of(std::process::id()), None);
        assert!(marked("no-such-stamp/").is_empty());
    }
}
