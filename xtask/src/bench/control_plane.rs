//! `cargo xtask bench control-plane`: one real controller against N hollow agents
//! (`drover-swarm`: simulated agents, each with its own certificate and QUIC connection,
//! speaking the real protocol), for N = 100, 1,000 and 5,000 with 10 nodes each.
//!
//! For each N: time until all N are connected (hollow agents dial again, with backoff,
//! when the controller is too busy, as real agents do: the table counts those that had
//! to), get-nodes latency (p50, p99) as clients ask by default (from the statuses
//! agents reported) and with `--fresh` (asking every agent), deploy of
//! N x 10 nodes to an answer, event fan-out to 10 monitor subscribers, controller RSS
//! per connected agent, and controller CPU over 10 s of idle (keep-alives only). The
//! table shows how each figure grows with N, so a super-linear path shows.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::bench::procfs;
use crate::cluster::{Cluster, build_binaries};
use crate::project_root;

/// What to run.
#[derive(Debug)]
pub(crate) struct Options {
    /// Agent counts.
    pub(crate) agents: Vec<usize>,
    /// Nodes per agent.
    pub(crate) nodes_per_agent: usize,
    /// Idle window for the CPU figure.
    pub(crate) idle: Duration,
    /// Build the release binaries first.
    pub(crate) build: bool,
    /// Hollow agents per UDP socket in the swarm; its default when `None`.
    pub(crate) agents_per_socket: Option<usize>,
}

fn one(bin: &Path, dir: &Path, n: usize, opts: &Options) -> anyhow::Result<Value> {
    let _ = std::fs::remove_dir_all(dir);
    let cluster = Cluster::start(dir, bin, 0, 0)?;
    let ctl = cluster.pid("controller").context("controller pid")?;
    // Let the controller settle before the baseline.
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = procfs::status_mib(ctl, "VmRSS")?;
    let mut swarm = Command::new(bin.join("drover-swarm"));
    if let Some(k) = opts.agents_per_socket {
        swarm.args(["--agents-per-socket", &k.to_string()]);
    }
    let mut swarm = swarm
        .args(["--controller", &cluster.controller, "--pki"])
        .arg(dir.join("pki"))
        .args([
            "--agents",
            &n.to_string(),
            "--nodes-per-agent",
            &opts.nodes_per_agent.to_string(),
        ])
        .args(["--idle-secs", &(opts.idle.as_secs() + 5).to_string()])
        .args(["--settle-ms", "2000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start drover-swarm")?;
    let stdout = swarm.stdout.take().context("stdout")?;
    let stderr = swarm.stderr.take().context("stderr")?;
    let report = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        line
    });
    // "connected" on stderr: every agent is connected and idle for a moment; "idle": the
    // measurements are done, connections stay open.
    let mut err_lines = BufReader::new(stderr).lines();
    let started = Instant::now();
    let mut wait_for = |word: &str| -> anyhow::Result<()> {
        loop {
            match err_lines.next() {
                Some(Ok(l)) if l.trim() == word => return Ok(()),
                Some(Ok(l)) => eprintln!("  swarm: {l}"),
                _ => {
                    let _ = swarm.kill();
                    bail!(
                        "drover-swarm ended before its measurements (after {:?})",
                        started.elapsed()
                    );
                }
            }
        }
    };
    wait_for("connected")?;
    // Halfway through the swarm's pause: every agent connected, nothing asked yet.
    std::thread::sleep(Duration::from_millis(1000));
    let rss_connected = procfs::status_mib(ctl, "VmRSS")?;
    let drops_before = udp_receive_buffer_errors();
    let busy0 = procfs::cpu_ticks(ctl)?;
    wait_for("idle")?;
    let busy = (procfs::cpu_ticks(ctl)? - busy0) as f64 / procfs::clk_tck() as f64;
    let drops = udp_receive_buffer_errors().saturating_sub(drops_before);
    let line = report
        .join()
        .map_err(|_| anyhow::anyhow!("report thread"))?;
    let mut v: Value =
        serde_json::from_str(line.trim()).with_context(|| format!("bad swarm report: {line}"))?;
    let rss = procfs::status_mib(ctl, "VmRSS")?;
    let cpu0 = procfs::cpu_ticks(ctl)?;
    let t0 = Instant::now();
    std::thread::sleep(opts.idle);
    let cpu = (procfs::cpu_ticks(ctl)? - cpu0) as f64 / procfs::clk_tck() as f64;
    let idle_pct = 100.0 * cpu / t0.elapsed().as_secs_f64();
    let _ = swarm.kill();
    let _ = swarm.wait();
    v["controller_rss_mib"] = serde_json::json!(rss);
    v["controller_rss_kib_per_idle_agent"] =
        serde_json::json!((rss_connected - rss_before) * 1024.0 / n as f64);
    v["controller_cpu_s"] = serde_json::json!(busy);
    v["udp_receive_buffer_drops"] = serde_json::json!(drops);
    v["controller_rss_kib_per_agent"] = serde_json::json!((rss - rss_before) * 1024.0 / n as f64);
    v["controller_idle_cpu_pct"] = serde_json::json!(idle_pct);
    drop(cluster);
    Ok(v)
}

/// UDP datagrams the kernel dropped for want of socket receive buffer, machine-wide
/// (`RcvbufErrors` in `/proc/net/snmp`); 0 if unreadable.
fn udp_receive_buffer_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Runs the benchmark and prints the table.
pub(crate) fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.build {
        build_binaries(true, Some(&project_root().join("target/bench/build.log")))?;
    }
    let bin = project_root().join("target/release");
    let mut rows = Vec::new();
    for &n in &opts.agents {
        eprintln!(
            "control plane: {n} hollow agents x {} nodes",
            opts.nodes_per_agent
        );
        let dir = project_root().join(format!("target/bench/control-plane-{n}"));
        let v = one(&bin, &dir, n, opts)?;
        eprintln!("  {v}");
        rows.push(v);
    }
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n{:>6} {:>7} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>12} {:>8} {:>10} {:>10} {:>9} {:>8} {:>8} {:>6} {:>6}",
        "agents",
        "nodes",
        "connect ms",
        "retried",
        "get p50",
        "get p99",
        "fresh p50",
        "fresh p99",
        "deploy ms",
        "fan-out10 ms",
        "RSS MiB",
        "KiB/idle",
        "KiB/agent",
        "idle CPU%",
        "ctl CPUs",
        "swarm s",
        "lost",
        "drops"
    );
    for v in &rows {
        println!(
            "{:>6} {:>7} {:>10.0} {:>7} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.0} {:>12.1} {:>8.1} {:>10.1} {:>10.1} {:>9.2} {:>8.2} {:>8.2} {:>6} {:>6}",
            f(v, "agents"),
            f(v, "agents") * f(v, "nodes_per_agent"),
            f(v, "connect_all_ms"),
            f(v, "agents_that_retried"),
            f(v, "get_nodes_p50_ms"),
            f(v, "get_nodes_p99_ms"),
            f(v, "get_nodes_fresh_p50_ms"),
            f(v, "get_nodes_fresh_p99_ms"),
            f(v, "deploy_ms"),
            f(v, "event_fanout_max_ms"),
            f(v, "controller_rss_mib"),
            f(v, "controller_rss_kib_per_idle_agent"),
            f(v, "controller_rss_kib_per_agent"),
            f(v, "controller_idle_cpu_pct"),
            f(v, "controller_cpu_s"),
            f(v, "swarm_cpu_s"),
            f(v, "lost_packets"),
            f(v, "udp_receive_buffer_drops"),
        );
    }
    let path = project_root().join("target/bench/control-plane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    println!("\n(written to {})", path.display());
    Ok(())
}
