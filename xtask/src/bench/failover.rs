//! `cargo xtask bench failover --agents N`: how long a high-availability group takes to
//! be whole again after its leader is SIGKILLed.
//!
//! Three etcd members, three controllers (release builds) on them, and `drover-swarm`'s
//! N hollow agents (real QUIC, each with its certificate, following a follower's answer
//! to the leader and dialling again when their connection is lost), each with simulated
//! nodes deployed. Then, `--kills` times: SIGKILL the leader and measure, polling with
//! the `drover` CLI (a real client connection each time): (a) until a new leader answers
//! `get-instances` (a new client every 100 ms), (b) until it lists all N agents, (c) until `get-nodes` has every
//! agent's nodes running; and the new leader's CPU time from the kill to (c) and its
//! peak RSS. The killed controller is started again as a follower before the next kill.
//! No peer runs in the same benchmark: the reference point is Kubernetes' default
//! leader lease, 15 s. `DROVER_BENCH_TRACE=1` prints when each kill happens (Unix time,
//! to line up with the controllers' logs) and the count of reconnected agents at every
//! poll.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench::procfs;
use crate::cluster::{self, Daemon, Daemons, build_binaries};
use crate::project_root;

/// What to run.
#[derive(Debug)]
pub(crate) struct Options {
    /// Hollow agents.
    pub(crate) agents: usize,
    /// Simulated nodes per agent.
    pub(crate) nodes_per_agent: usize,
    /// Leader kills.
    pub(crate) kills: usize,
    /// `--leader-lease` of the controllers (their default when `None`).
    pub(crate) lease: Option<String>,
    /// The hollow agents' idle timeout: how soon they notice a leader that died without
    /// a word (real agents' `--idle-timeout`).
    pub(crate) agent_idle_timeout: Duration,
    /// How long the group runs undisturbed before each kill.
    pub(crate) settle: Duration,
    /// Build the release binaries first.
    pub(crate) build: bool,
}

/// One kill's figures.
#[derive(Debug, Clone, Copy)]
struct Kill {
    answering: Duration,
    agents: Duration,
    nodes: Duration,
    cpu_s: f64,
    hwm_mib: f64,
}

struct Group<'a> {
    bin: &'a Path,
    dir: &'a Path,
    endpoints: String,
    ports: Vec<u16>,
    lease: Option<String>,
    procs: Vec<Option<Daemon>>,
    starts: usize,
}

impl Group<'_> {
    fn list(&self) -> String {
        let a: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        a.join(",")
    }

    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let name = format!("controller-{i}");
        let mut cmd = Command::new(self.bin.join("drover-controller"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.ports[i]))
            .arg("--state-dir")
            .arg(self.dir.join("state").join(&name))
            .args(cluster::tls_args(&self.dir.join("pki"), "controller"))
            .args(["--store", "etcd", "--etcd-endpoints", &self.endpoints]);
        if let Some(lease) = &self.lease {
            cmd.args(["--leader-lease", lease]);
        }
        self.starts += 1;
        // A log per start, so that the last leadership line is this start's.
        let d = cluster::spawn(
            &format!("{name}.{}", self.starts),
            &mut cmd,
            &self.dir.join("logs"),
        )?;
        self.procs[i] = Some(d);
        Ok(())
    }

    /// The controller whose log says last that it leads.
    fn leader(&self) -> Option<usize> {
        self.procs.iter().position(|d| {
            d.as_ref().is_some_and(|d| {
                let text = std::fs::read_to_string(&d.log).unwrap_or_default();
                text.lines()
                    .rev()
                    .find(|l| {
                        l.contains("leading: serving")
                            || l.contains("stepp")
                            || l.contains("following")
                    })
                    .is_some_and(|l| l.contains("leading: serving"))
            })
        })
    }
}

fn cli(bin: &Path, pki: &Path, list: &str, args: &[&str]) -> Option<serde_json::Value> {
    cli_within(bin, pki, list, "5s", args)
}

fn cli_within(
    bin: &Path,
    pki: &Path,
    list: &str,
    timeout: &str,
    args: &[&str],
) -> Option<serde_json::Value> {
    let out = Command::new(bin.join("drover"))
        .args(["--controller", list])
        .args(cluster::tls_args(pki, "ops"))
        .args(["--timeout", timeout])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Running simulated nodes in a get-nodes answer.
fn running_nodes(v: &serde_json::Value) -> usize {
    v["results"].as_object().map_or(0, |agents| {
        agents
            .values()
            .filter_map(|nodes| nodes.as_object())
            .flat_map(|nodes| nodes.values())
            .filter(|n| n["mgmt_role"].is_null() && n["state"] == "RUNNING")
            .count()
    })
}

/// From `killed` to the first `get-instances` answered. A client that asks while no
/// leader is elected may be sent to the dead one and wait out its timeout, so a new
/// client asks every 100 ms (each with a 1 s timeout), and the first answer counts.
fn first_answer(
    bin: &Path,
    pki: &Path,
    list: &str,
    killed: Instant,
    patience: Duration,
) -> anyhow::Result<Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    loop {
        if let Ok(at) = rx.try_recv() {
            let at: Instant = at;
            return Ok(at - killed);
        }
        if killed.elapsed() > patience {
            bail!("no new leader answered within {patience:?}");
        }
        let (bin, pki, list, tx) = (bin.to_owned(), pki.to_owned(), list.to_owned(), tx.clone());
        std::thread::spawn(move || {
            if cli_within(&bin, &pki, &list, "1s", &["get-instances"]).is_some() {
                let _ = tx.send(Instant::now());
            }
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn one_kill(g: &mut Group<'_>, pki: &Path, n: usize, nodes: usize) -> anyhow::Result<Kill> {
    let leader = cluster::wait_for("a leader", Duration::from_secs(60), || g.leader())?;
    let list = g.list();
    let ticks_before: Vec<u64> = g
        .procs
        .iter()
        .map(|d| {
            d.as_ref()
                .and_then(|d| procfs::cpu_ticks(d.child.id()).ok())
                .unwrap_or(0)
        })
        .collect();
    let mut old = g.procs[leader].take().context("leader running")?;
    let killed = Instant::now();
    if std::env::var_os("DROVER_BENCH_TRACE").is_some() {
        // Wall-clock, to line up with the controllers' logs and a profiler's samples.
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!(
            "    killing controller-{leader} at {:.3} (unix)",
            unix.as_secs_f64()
        );
    }
    old.child.kill()?;
    old.child.wait()?;
    let patience = Duration::from_secs(120);
    let answering = first_answer(g.bin, pki, &list, killed, patience)?;
    cluster::wait_for("every agent with the new leader", patience, || {
        let v = cli(g.bin, pki, &list, &["get-instances"])?;
        if std::env::var_os("DROVER_BENCH_TRACE").is_some() {
            eprintln!(
                "    {:?}: {} agents",
                killed.elapsed(),
                v.as_object()?.len()
            );
        }
        (v.as_object()?.len() >= n).then_some(())
    })?;
    let agents = killed.elapsed();
    cluster::wait_for("a complete get-nodes", patience, || {
        let v = cli(g.bin, pki, &list, &["get-nodes"])?;
        (running_nodes(&v) >= n * nodes).then_some(())
    })?;
    let complete = killed.elapsed();
    let new = g.leader().context("no controller leads")?;
    let pid = g.procs[new].as_ref().context("new leader")?.child.id();
    let cpu_s = (procfs::cpu_ticks(pid)? - ticks_before[new]) as f64 / procfs::clk_tck() as f64;
    let hwm_mib = procfs::status_mib(pid, "VmHWM")?;
    g.start(leader)?;
    let log = g.procs[leader].as_ref().context("restarted")?.log.clone();
    cluster::wait_for("the restarted controller to follow", patience, || {
        std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("following"))
            .then_some(())
    })?;
    Ok(Kill {
        answering,
        agents,
        nodes: complete,
        cpu_s,
        hwm_mib,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark and prints the table.
pub(crate) fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.build {
        build_binaries(true, Some(&project_root().join("target/bench/build.log")))?;
    }
    let bin: PathBuf = project_root().join("target/release");
    let dir = project_root().join(format!("target/bench/failover-{}", opts.agents));
    let _ = std::fs::remove_dir_all(&dir);
    let (pki, logs, state) = (dir.join("pki"), dir.join("logs"), dir.join("state"));
    std::fs::create_dir_all(&logs)?;
    let drover = bin.join("drover");
    cluster::run_ok(
        Command::new(&drover)
            .args(["ca", "init", "--dir"])
            .arg(&pki),
    )?;
    cluster::ensure_cert(&drover, &pki, "controller", "controller")?;
    cluster::ensure_cert(&drover, &pki, "client", "ops")?;
    let mut daemons = Daemons {
        list: Vec::new(),
        announce: false,
    };
    let endpoints = cluster::start_etcd(&state, &logs, &mut daemons)?;
    let ports: Vec<u16> = (0..3)
        .map(|_| -> anyhow::Result<u16> {
            Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        })
        .collect::<anyhow::Result<_>>()?;
    let mut g = Group {
        bin: &bin,
        dir: &dir,
        endpoints,
        ports,
        lease: opts.lease.clone(),
        procs: vec![None, None, None],
        starts: 0,
    };
    for i in 0..3 {
        g.start(i)?;
    }
    cluster::wait_for("a leader", Duration::from_secs(60), || g.leader())?;
    let idle_ms = opts.agent_idle_timeout.as_millis();
    let mut swarm = Command::new(bin.join("drover-swarm"))
        .args(["--controller", &g.list(), "--pki"])
        .arg(&pki)
        .args(["--agents", &opts.agents.to_string()])
        .args(["--nodes-per-agent", &opts.nodes_per_agent.to_string()])
        .args(["--samples", "1", "--monitors", "0", "--idle-secs", "100000"])
        .args(["--idle-timeout-ms", &idle_ms.to_string()])
        .args(["--keep-alive-ms", &(idle_ms / 4).max(100).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start drover-swarm")?;
    let stderr = swarm.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.trim() == "idle" {
                let _ = tx.send(());
            } else {
                eprintln!("  swarm: {line}");
            }
        }
    });
    eprintln!(
        "failover: {} hollow agents x {} nodes, lease {}, agents' idle timeout {:?}, {:?} undisturbed before each kill",
        opts.agents,
        opts.nodes_per_agent,
        opts.lease.as_deref().unwrap_or("default (2s)"),
        opts.agent_idle_timeout,
        opts.settle
    );
    if rx.recv_timeout(Duration::from_secs(600)).is_err() {
        let _ = swarm.kill();
        bail!("drover-swarm did not connect and deploy its agents");
    }
    let mut kills = Vec::new();
    for k in 0..opts.kills {
        // A steady state to fail from (see the option's help).
        std::thread::sleep(opts.settle);
        let r = one_kill(&mut g, &pki, opts.agents, opts.nodes_per_agent);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                let _ = swarm.kill();
                return Err(e.context(format!("kill {}", k + 1)));
            }
        };
        eprintln!(
            "  kill {:>2}: answering {:>6.0} ms, all agents {:>6.0} ms, get-nodes complete {:>6.0} ms, new leader CPU {:.2} s, peak RSS {:.1} MiB",
            k + 1,
            r.answering.as_secs_f64() * 1000.0,
            r.agents.as_secs_f64() * 1000.0,
            r.nodes.as_secs_f64() * 1000.0,
            r.cpu_s,
            r.hwm_mib
        );
        kills.push(r);
        if swarm.try_wait()?.is_some() {
            bail!("drover-swarm exited");
        }
    }
    let _ = swarm.kill();
    let _ = swarm.wait();
    for d in g.procs.iter_mut().flatten() {
        let _ = d.child.kill();
        let _ = d.child.wait();
    }
    drop(daemons);

    let sorted = |f: fn(&Kill) -> f64| {
        let mut v: Vec<f64> = kills.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    println!(
        "\nfailover: {} hollow agents x {} nodes, {} leader SIGKILLs, lease {}, agents' idle timeout {} ms, {} s undisturbed before each kill",
        opts.agents,
        opts.nodes_per_agent,
        kills.len(),
        opts.lease.as_deref().unwrap_or("2s (default)"),
        idle_ms,
        opts.settle.as_secs()
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9}",
        "from the SIGKILL to", "p50", "p99", "max"
    );
    type Figure = fn(&Kill) -> f64;
    let rows: [(&str, Figure); 5] = [
        ("a new leader answering (s)", |k| k.answering.as_secs_f64()),
        ("every agent reconnected (s)", |k| k.agents.as_secs_f64()),
        ("get-nodes complete (s)", |k| k.nodes.as_secs_f64()),
        ("new leader CPU until complete (s)", |k| k.cpu_s),
        ("new leader peak RSS (MiB)", |k| k.hwm_mib),
    ];
    for (what, f) in rows {
        let v = sorted(f);
        println!(
            "{what:<40} {:>9.2} {:>9.2} {:>9.2}",
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!("(reference: Kubernetes' default leader lease is 15 s)");
    Ok(())
}
