//! `cargo xtask bench supervise`: drover against peer supervisors (supervisord, pm2) on
//! this machine, measured the way `shared/reference/peer-bench.md` measured the peers.
//!
//! For each N and each system, one after another (never in parallel), in cold runs
//! (fresh directory, configuration and daemons): start N programs (`/bin/sleep 100000`),
//! the supervisor's idle cost, kill -9 → replacement (first run only), stop-all. Each
//! figure is printed per N as median (min–max) with the ratio drover/peer, and written
//! as JSON to `target/bench/supervise-<timestamp>.json`.
//!
//! # Layout
//!
//! - [`scenario`]: the phases and their timing, the same for every system.
//! - [`system`]: the interface a system offers the scenario, and shared process helpers.
//! - [`drover`], [`supervisord`], [`pm2`]: one adapter per system.
//! - [`install`]: installs the peers under `target/bench` (a virtualenv, an npm prefix).
//! - [`procfs`]: the `/proc` reads; [`stats`]: medians, number and table formatting.
//!
//! `cargo xtask bench control-plane` ([`control_plane`]) and `cargo xtask bench deploy`
//! ([`deploy`]) live here too and share these helpers.

pub(crate) mod control_plane;
pub(crate) mod deploy;
mod drover;
mod execevents;
pub(crate) mod failover;
mod install;
mod pm2;
mod procfs;
mod scenario;
pub(crate) mod spawn;
mod stats;
pub(crate) mod store;
mod supervisord;
mod system;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Map, Value, json};

use crate::cluster::{self, interrupted};
use crate::project_root;
use scenario::{PROGRAM, Plan, Rng, Samples};
use stats::{Summary, ratio, render_table};
use system::{Leftovers, System, first_line};

/// A peer supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Peer {
    /// supervisord 4.3.0 (PyPI, in a virtualenv).
    Supervisord,
    /// pm2 7.0.4 (npm, in a local prefix).
    Pm2,
}

/// What `bench supervise` runs.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Numbers of programs.
    pub(crate) nodes: Vec<usize>,
    /// The peers, in this order after drover.
    pub(crate) peers: Vec<Peer>,
    /// Kills in the first run of each N.
    pub(crate) kills: usize,
    /// Cold runs per N and system.
    pub(crate) runs: usize,
    /// The idle window.
    pub(crate) idle: Duration,
    /// Bounds of the random pause after a kill, seconds.
    pub(crate) pause: (f64, f64),
    /// Smoke-test sizes.
    pub(crate) quick: bool,
    /// Build the release binaries first.
    pub(crate) build: bool,
}

impl Options {
    /// The defaults (`--quick`: N=20, 3 kills, one run, a 2 s idle window), overridden
    /// by whatever was given.
    pub(crate) fn new(
        nodes: Option<Vec<usize>>,
        peers: Vec<Peer>,
        kills: Option<usize>,
        runs: Option<usize>,
        quick: bool,
    ) -> Self {
        let mut peers_seen = Vec::new();
        for p in peers {
            if !peers_seen.contains(&p) {
                peers_seen.push(p);
            }
        }
        Self {
            nodes: nodes.unwrap_or_else(|| if quick { vec![20] } else { vec![100, 500] }),
            peers: peers_seen,
            kills: kills.unwrap_or(if quick { 3 } else { 10 }),
            runs: runs.unwrap_or(if quick { 1 } else { 3 }).max(1),
            idle: Duration::from_secs(if quick { 2 } else { 10 }),
            pause: if quick { (0.3, 1.3) } else { (0.3, 5.3) },
            quick,
            build: true,
        }
    }
}

/// One figure of the report.
struct Metric {
    key: &'static str,
    label: &'static str,
    /// Whether drover/peer means something.
    ratio: bool,
}

const fn metric(key: &'static str, label: &'static str, ratio: bool) -> Metric {
    Metric { key, label, ratio }
}

impl Metric {
    /// Counts print as whole numbers.
    fn cell(&self, s: &Summary) -> String {
        if self.key == "idle_wakeups" {
            s.cell_with(stats::fmt_count)
        } else {
            s.cell()
        }
    }
}

/// Every figure, in table order. `{idle}` in a label is the idle window.
const METRICS: &[Metric] = &[
    metric("start_cmd_ms", "start: command returns (ms)", true),
    metric(
        "start_running_ms",
        "start: all N reported running, status polled every 50 ms (ms)",
        true,
    ),
    metric("start_exec_ms", "start: last of N exec'd (ms)", true),
    metric(
        "start_forked_ms",
        "start: last of N forked, /proc start time, 10 ms ticks (ms)",
        true,
    ),
    metric(
        "status_call_ms",
        "status: one call listing all N (ms)",
        true,
    ),
    metric("kill_reaped_ms", "kill -9: old pid reaped (ms)", true),
    metric("kill_exec_ms", "kill -9: replacement exec'd (ms)", true),
    metric(
        "kill_running_ms",
        "kill -9: status shows the new pid running (ms)",
        true,
    ),
    metric(
        "rss_mib",
        "idle: supervisor RSS 1 s after start (MiB)",
        true,
    ),
    metric(
        "daemons_rss_mib",
        "idle: RSS of all its daemons (MiB)",
        true,
    ),
    metric(
        "hwm_mib",
        "idle: supervisor peak RSS (VmHWM) before stop (MiB)",
        true,
    ),
    metric(
        "idle_cpu_pct",
        "idle: supervisor CPU over {idle} (% of one core)",
        true,
    ),
    metric(
        "idle_wakeups",
        "idle: supervisor voluntary context switches over {idle}",
        true,
    ),
    metric(
        "idle_machine_busy_pct",
        "idle: whole machine busy in that window (%)",
        false,
    ),
    metric("stop_exited_ms", "stop-all: all N exited (ms)", true),
    metric("stop_cmd_ms", "stop-all: command returns (ms)", true),
];

/// How a system is set up, once installed.
enum Setup {
    Drover { bin_dir: PathBuf },
    Supervisord { venv: PathBuf },
    Pm2 { install: pm2::Install },
}

/// A system of the bench: set up, or unavailable with the reason.
struct Entry {
    name: &'static str,
    version: String,
    settings: &'static str,
    setup: Result<Setup, String>,
}

/// One system's outcome at one N.
type Outcome = Result<Samples, String>;

/// The first line of an error chain, for "unavailable: ...".
fn reason(e: &anyhow::Error) -> String {
    first_line(&format!("{e:#}"))
}

/// Where cargo puts release binaries (honours `CARGO_TARGET_DIR`).
fn release_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            let dir = if dir.is_relative() {
                std::env::current_dir().unwrap_or_default().join(dir)
            } else {
                dir
            };
            dir.join("release")
        }
        None => project_root().join("target/release"),
    }
}

fn drover_entry(bench: &Path, build: bool) -> Entry {
    let setup = if build {
        let log = bench.join("build.log");
        eprintln!(
            "building the release binaries (cargo build --release; log: {})",
            log.display()
        );
        cluster::build_binaries(true, Some(&log))
            .map(|()| release_dir())
            .map_err(|e| reason(&e))
    } else {
        let dir = release_dir();
        if dir.join("drover-agent").exists() {
            Ok(dir)
        } else {
            Err(format!("no release binaries in {}", dir.display()))
        }
    };
    let version = setup
        .as_ref()
        .ok()
        .and_then(|dir| {
            let out = Command::new(dir.join("drover"))
                .arg("--version")
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_default();
    Entry {
        name: "drover",
        version,
        settings: drover::SETTINGS,
        setup: setup.map(|bin_dir| Setup::Drover { bin_dir }),
    }
}

fn peer_entry(peer: Peer, bench: &Path) -> Entry {
    match peer {
        Peer::Supervisord => Entry {
            name: "supervisord",
            version: format!("supervisord {}", install::SUPERVISOR_VERSION),
            settings: supervisord::SETTINGS,
            setup: install::supervisord(bench)
                .map(|venv| Setup::Supervisord { venv })
                .map_err(|e| reason(&e)),
        },
        Peer::Pm2 => {
            let got = install::pm2(bench);
            Entry {
                name: "pm2",
                version: match &got {
                    Ok((_, node)) => format!("pm2 {} on node {node}", install::PM2_VERSION),
                    Err(_) => format!("pm2 {}", install::PM2_VERSION),
                },
                settings: pm2::SETTINGS,
                setup: got
                    .map(|(install, _)| Setup::Pm2 { install })
                    .map_err(|e| reason(&e)),
            }
        }
    }
}

/// The program names for N: `n-001` ... (wider when N needs it).
pub(crate) fn names(n: usize) -> Vec<String> {
    let width = n.to_string().len().max(3);
    (1..=n).map(|i| format!("n-{i:0width$}")).collect()
}

/// One cold run of one system in `dir`.
fn run_system(setup: &Setup, dir: &Path, plan: &Plan, rng: &mut Rng) -> anyhow::Result<Samples> {
    // Declared first, dropped last: kills whatever the system's shutdown left.
    let mut left = Leftovers::default();
    let mut sys: Box<dyn System> = match setup {
        Setup::Drover { bin_dir } => {
            Box::new(drover::Drover::new(dir, bin_dir, &plan.names, &PROGRAM)?)
        }
        Setup::Supervisord { venv } => Box::new(supervisord::Supervisord::new(
            dir,
            venv,
            &plan.names,
            &PROGRAM,
        )?),
        Setup::Pm2 { install } => Box::new(pm2::Pm2::new(dir, install, &plan.names, &PROGRAM)?),
    };
    let result = scenario::run(sys.as_mut(), plan, rng, &mut left);
    if let Err(e) = sys.shutdown() {
        eprintln!("  shutdown: {e:#}");
    }
    drop(sys);
    let killed = left.kill();
    if killed > 0 {
        eprintln!("  {killed} program process(es) outlived the shutdown; killed them");
    }
    result
}

/// Runs the benchmark and prints and writes the report.
pub(crate) fn supervise(opts: &Options) -> anyhow::Result<()> {
    cluster::install_signal_handlers()?;
    let bench = project_root().join("target/bench");
    fs::create_dir_all(&bench).with_context(|| format!("cannot create {}", bench.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let stamp = timestamp(now);
    let run_root = bench.join(format!("run-{stamp}"));

    let mut entries = vec![drover_entry(&bench, opts.build)];
    for p in &opts.peers {
        entries.push(peer_entry(*p, &bench));
    }
    let load_at_start = procfs::loadavg();
    println!(
        "{}",
        header(opts, &entries, load_at_start, &run_root).trim_end()
    );

    let mut rng = Rng::from_clock();
    let mut results: BTreeMap<usize, BTreeMap<&'static str, Outcome>> = BTreeMap::new();
    for &n in &opts.nodes {
        let names = names(n);
        let mut acc: BTreeMap<&'static str, Outcome> = BTreeMap::new();
        for e in &entries {
            acc.insert(
                e.name,
                e.setup
                    .as_ref()
                    .map(|_| Samples::new())
                    .map_err(Clone::clone),
            );
        }
        for r in 0..opts.runs {
            for e in &mut entries {
                let Ok(setup) = &e.setup else { continue };
                if acc.get(e.name).is_some_and(Result::is_err) {
                    continue;
                }
                let plan = Plan {
                    names: names.clone(),
                    kills: if r == 0 { opts.kills.min(n) } else { 0 },
                    idle: opts.idle,
                    status_calls: if opts.quick { 5 } else { 20 },
                    pause: opts.pause,
                };
                eprintln!(
                    "N={n} run {}/{}: {} (load {:.2})",
                    r + 1,
                    opts.runs,
                    e.name,
                    procfs::loadavg().unwrap_or(f64::NAN)
                );
                let dir = run_root.join(format!("{n}-{}-{}", r + 1, e.name));
                match run_system(setup, &dir, &plan, &mut rng) {
                    Ok(samples) => {
                        if let Some(Ok(all)) = acc.get_mut(e.name) {
                            for (k, v) in samples {
                                all.entry(k).or_default().extend(v);
                            }
                        }
                    }
                    Err(err) => {
                        if interrupted() {
                            return Err(err);
                        }
                        let why = format!("N={n} run {}: {}", r + 1, reason(&err));
                        println!("{}: unavailable: {why}", e.name);
                        eprintln!("  (its files: {})", dir.display());
                        acc.insert(e.name, Err(why.clone()));
                        e.setup = Err(why);
                    }
                }
            }
        }
        println!("\n{}", table(n, opts, &entries, &acc).trim_end());
        results.insert(n, acc);
    }
    println!("\n{}", NOTES.trim_end());

    let report = report_json(opts, &entries, &results, &stamp, load_at_start);
    let path = bench.join(format!("supervise-{stamp}.json"));
    fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nwritten: {}", path.display());
    Ok(())
}

const NOTES: &str = "\
notes:
- median (min–max) over the cold runs (start, idle, stop), over the kills, or over the
  status calls (20 per run after the idle window, 5 with --quick); a lone sample alone.
- status: drover is polled with the `drover get-nodes` CLI, a new process per call, like
  `supervisorctl status`; the peers with warm API clients, as in peer-bench.md.
- start: the start commands of supervisord and pm2 also start their daemon; drover's
  controller and agent are up before `drover deploy-config` is issued.
- supervisor = drover-agent, supervisord, pm2's God daemon; all daemons adds the
  drover-controller. CPU has a resolution of one tick (10 ms) over the window; context
  switches are summed over the supervisor's threads (a thread that ends in the window
  loses its count).
- exec'd = when the N-th program child of the supervisor (or the replacement) exec'd,
  from the kernel's exec events (process connector, root only), else when a thread
  polling /proc every 1 ms saw it; last forked = their largest /proc start time, 10 ms
  ticks rounded down, the measure of peer-bench.md.";

fn header(opts: &Options, entries: &[Entry], load: Option<f64>, run_root: &Path) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "bench supervise: `{}` × N = {}; {} cold run(s) per N and system, one system at a \
         time; {} kill(s) in the first run (pause {}–{} s); idle window {} s{}\n",
        PROGRAM.join(" "),
        opts.nodes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        opts.runs,
        opts.kills,
        opts.pause.0,
        opts.pause.1,
        opts.idle.as_secs(),
        if opts.quick { " (--quick)" } else { "" },
    ));
    s.push_str(&format!(
        "machine: {} CPU(s), load {} at start; scratch: {}\n",
        std::thread::available_parallelism().map_or(0, usize::from),
        load.map_or_else(|| "?".to_owned(), |l| format!("{l:.2}")),
        run_root.display()
    ));
    for e in entries {
        match &e.setup {
            Ok(_) => s.push_str(&format!("{} ({}): {}\n", e.name, e.version, e.settings)),
            Err(why) => s.push_str(&format!("{}: unavailable: {why}\n", e.name)),
        }
    }
    s
}

fn label(m: &Metric, opts: &Options) -> String {
    m.label
        .replace("{idle}", &format!("{} s", opts.idle.as_secs()))
}

/// The table for one N: a row per figure, a column per system, and drover/peer.
fn table(
    n: usize,
    opts: &Options,
    entries: &[Entry],
    acc: &BTreeMap<&'static str, Outcome>,
) -> String {
    let summary = |name: &str, key: &str| -> Option<Summary> {
        match acc.get(name) {
            Some(Ok(s)) => Summary::of(s.get(key)?),
            _ => None,
        }
    };
    let mut header = vec![format!("N = {n}")];
    for (i, e) in entries.iter().enumerate() {
        header.push(e.name.to_owned());
        if i > 0 {
            header.push(format!("drover/{}", e.name));
        }
    }
    let mut rows = Vec::new();
    for m in METRICS {
        if entries.iter().all(|e| summary(e.name, m.key).is_none()) {
            continue;
        }
        let mut row = vec![label(m, opts)];
        let drover = summary("drover", m.key);
        for (i, e) in entries.iter().enumerate() {
            let own = summary(e.name, m.key);
            row.push(match (&own, acc.get(e.name)) {
                (Some(s), _) => m.cell(s),
                (None, Some(Err(_))) => "unavailable".to_owned(),
                (None, _) => "–".to_owned(),
            });
            if i > 0 {
                row.push(match (drover, own) {
                    (Some(d), Some(p)) if m.ratio => ratio(d.median, p.median),
                    _ => "–".to_owned(),
                });
            }
        }
        rows.push(row);
    }
    let mut out = render_table(&header, &rows);
    for e in entries {
        if let Some(Err(why)) = acc.get(e.name) {
            out.push_str(&format!("{}: unavailable: {why}\n", e.name));
        }
    }
    out
}

fn report_json(
    opts: &Options,
    entries: &[Entry],
    results: &BTreeMap<usize, BTreeMap<&'static str, Outcome>>,
    stamp: &str,
    load: Option<f64>,
) -> Value {
    let mut systems = Map::new();
    for e in entries {
        systems.insert(
            e.name.to_owned(),
            json!({
                "version": e.version,
                "settings": e.settings,
                "available": e.setup.is_ok(),
            }),
        );
    }
    let mut by_n = Map::new();
    for (n, acc) in results {
        let mut per = Map::new();
        for (name, outcome) in acc {
            let v = match outcome {
                Ok(samples) => {
                    let mut metrics = Map::new();
                    for m in METRICS {
                        if let Some(v) = samples.get(m.key)
                            && let Some(s) = Summary::of(v)
                        {
                            metrics.insert(m.key.to_owned(), s.to_json(v));
                        }
                    }
                    json!({ "status": "ok", "metrics": metrics })
                }
                Err(why) => json!({ "status": "unavailable", "reason": why }),
            };
            per.insert((*name).to_owned(), v);
        }
        let mut ratios = Map::new();
        if let Some(Ok(d)) = acc.get("drover") {
            for (name, outcome) in acc {
                let (true, Ok(p)) = (*name != "drover", outcome) else {
                    continue;
                };
                let mut r = Map::new();
                for m in METRICS.iter().filter(|m| m.ratio) {
                    if let (Some(a), Some(b)) = (
                        d.get(m.key).and_then(|v| Summary::of(v)),
                        p.get(m.key).and_then(|v| Summary::of(v)),
                    ) && b.median != 0.0
                    {
                        r.insert(m.key.to_owned(), json!(a.median / b.median));
                    }
                }
                ratios.insert(format!("drover/{name}"), Value::Object(r));
            }
        }
        per.insert("ratios".to_owned(), Value::Object(ratios));
        by_n.insert(n.to_string(), Value::Object(per));
    }
    let labels: Map<String, Value> = METRICS
        .iter()
        .map(|m| (m.key.to_owned(), json!(label(m, opts))))
        .collect();
    json!({
        "bench": "supervise",
        "timestamp": stamp,
        "program": PROGRAM,
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "loadavg_1m_at_start": load,
        },
        "options": {
            "nodes": opts.nodes,
            "runs": opts.runs,
            "kills": opts.kills,
            "idle_s": opts.idle.as_secs_f64(),
            "pause_s": [opts.pause.0, opts.pause.1],
            "quick": opts.quick,
        },
        "systems": systems,
        "metrics": labels,
        "results": by_n,
        "notes": NOTES,
    })
}

/// UTC `YYYYMMDDTHHMMSSZ` for seconds since the epoch.
pub(crate) fn timestamp(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::procfs::{is_program, parse_cmdline, parse_stat, status_field, switches_between};
    use super::stats::fmt_num;
    use super::system::{Prog, parse_helper_listing};
    use super::*;

    #[test]
    fn summary_is_median_with_min_and_max() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.count), (3.0, 1.0, 5.0, 3));
        let s = Summary::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN, 2.0]).unwrap().median, 2.0);
        assert_eq!(
            Summary::of(&[1371.0, 1332.0, 1420.0]).unwrap().cell(),
            "1,371 (1,332–1,420)"
        );
        assert_eq!(Summary::of(&[6.25]).unwrap().cell(), "6.25");
    }

    #[test]
    fn numbers_have_three_significant_digits() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.944), "0.94");
        assert_eq!(fmt_num(6.254), "6.25");
        assert_eq!(fmt_num(14.04), "14.0");
        assert_eq!(fmt_num(161.4), "161");
        assert_eq!(fmt_num(1370.6), "1,371");
        assert_eq!(fmt_num(30_886.0), "30,886");
        assert_eq!(fmt_num(1_234_567.0), "1,234,567");
        assert_eq!(fmt_num(-2500.0), "-2,500");
    }

    #[test]
    fn ratios_are_drover_over_peer() {
        assert_eq!(ratio(21.0, 100.0), "0.21x");
        assert_eq!(ratio(100.0, 8.0), "12.5x");
        assert_eq!(ratio(30_000.0, 10.0), "3,000x");
        assert_eq!(ratio(1.0, 0.0), "n/a");
        assert_eq!(ratio(2.84, 1007.0), "0.0028x");
        assert_eq!(ratio(5.0, 100.0), "0.050x");
        assert_eq!(ratio(0.0, 3.0), "0x");
    }

    #[test]
    fn tables_are_aligned_markdown() {
        let header = vec!["N = 20".to_owned(), "drover".to_owned(), "pm2".to_owned()];
        let rows = vec![
            vec![
                "start (ms)".to_owned(),
                "12.0".to_owned(),
                "1,371 (1,332–1,420)".to_owned(),
            ],
            vec![
                "a much longer label".to_owned(),
                "–".to_owned(),
                "5".to_owned(),
            ],
        ];
        let t = render_table(&header, &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "| N = 20              | drover |                 pm2 |"
        );
        assert_eq!(
            lines[1],
            "| ------------------- | -----: | ------------------: |"
        );
        assert_eq!(
            lines[2],
            "| start (ms)          |   12.0 | 1,371 (1,332–1,420) |"
        );
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{t}");
    }

    #[test]
    fn cmdlines_match_the_program_only_after_exec() {
        let argv = parse_cmdline(b"/bin/sleep\x00100000\x00");
        assert_eq!(argv, ["/bin/sleep", "100000"]);
        assert!(is_program(&argv, "sleep", &["100000"]));
        assert!(is_program(
            &parse_cmdline(b"/usr/bin/sleep\x00100000\x00"),
            "sleep",
            &["100000"]
        ));
        assert!(is_program(
            &parse_cmdline(b"sleep\x00100000"),
            "sleep",
            &["100000"]
        ));
        // A forked child that has not exec'd yet still shows its parent's argv.
        let parent =
            parse_cmdline(b"/usr/bin/python3\x00/venv/bin/supervisord\x00-c\x00x.conf\x00");
        assert!(!is_program(&parent, "sleep", &["100000"]));
        assert!(!is_program(
            &parse_cmdline(b"/bin/sleep\x0010\x00"),
            "sleep",
            &["100000"]
        ));
        assert!(!is_program(
            &parse_cmdline(b"/bin/sleep\x00100000\x00x\x00"),
            "sleep",
            &["100000"]
        ));
        assert!(!is_program(
            &parse_cmdline(b"/bin/sleepy\x00100000\x00"),
            "sleep",
            &["100000"]
        ));
        assert!(!is_program(&parse_cmdline(b""), "sleep", &["100000"]));
    }

    #[test]
    fn stat_is_parsed_after_the_command_name() {
        let text = "4242 (a (weird) name) S 17 4242 4242 0 -1 4194560 120 0 0 0 \
                    31 7 0 0 20 0 1 0 987654 2453504 200 18446744073709551615";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 17);
        assert_eq!((st.utime, st.stime), (31, 7));
        assert_eq!(st.starttime, 987_654);
        assert_eq!(parse_stat("12 (x) S 1"), None);
        let status = "Name:\tsleep\nVmHWM:\t    1024 kB\nVmRSS:\t     512 kB\n\
                      voluntary_ctxt_switches:\t7\n";
        assert_eq!(status_field(status, "VmRSS"), Some(512));
        assert_eq!(status_field(status, "voluntary_ctxt_switches"), Some(7));
        assert_eq!(status_field(status, "VmSwap"), None);
        let before = [(1, 10), (2, 5), (3, 7)].into_iter().collect();
        let after = [(1, 12), (3, 9), (4, 1)].into_iter().collect();
        // Thread 2 ended (lost), thread 4 is new (counted from zero).
        assert_eq!(switches_between(&before, &after), 2 + 2 + 1);
    }

    #[test]
    fn get_nodes_follows_the_contract() {
        let v: Value = serde_json::from_str(
            r#"{"errors": [], "results": {"agent-1": {
                "n-001": {"state": "RUNNING", "pid": 1234, "cluster_role": null, "mgmt_role": null},
                "n-002": {"state": "PENDING", "cluster_role": null, "mgmt_role": null},
                "agent-1": {"state": "RUNNING", "mgmt_role": "AGENT", "pid": 999, "cluster_role": null}}}}"#,
        )
        .unwrap();
        let l = drover::parse_get_nodes(&v).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(
            l["n-001"],
            Prog {
                running: true,
                pid: Some(1234)
            }
        );
        assert_eq!(
            l["n-002"],
            Prog {
                running: false,
                pid: None
            }
        );
        assert!(scenario::all_running(&l, &["n-001".to_owned()]));
        assert!(!scenario::all_running(&l, &names(2)));
        let err: Value =
            serde_json::from_str(r#"{"errors": ["agent-1 is not connected"], "results": {}}"#)
                .unwrap();
        let e = drover::parse_get_nodes(&err).unwrap_err().to_string();
        assert!(e.contains("agent-1 is not connected"), "{e}");
        let err: Value = serde_json::from_str(
            r#"{"errors": [{"source": "agent-2", "error": "timed out"}], "results": {}}"#,
        )
        .unwrap();
        let e = drover::parse_get_nodes(&err).unwrap_err().to_string();
        assert!(e.ends_with("agent-2: timed out"), "{e}");
    }

    #[test]
    fn deploy_and_stop_replies_are_checked() {
        use std::os::unix::process::ExitStatusExt;
        let done = |code: i32, stdout: &str, stderr: &str| system::Finished {
            label: "drover deploy-config".to_owned(),
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
        };
        let ok = r#"{"errors": [], "results": {"id": "x", "nodes": {"n-001": {"instance": "agent-1", "success": true}}}}"#;
        drover::check_reply(&done(0, ok, "")).unwrap();
        let failed = r#"{"errors": [], "results": {"id": "x", "nodes": {"n-001": {"success": false, "stderr": "no such file\n"}}}}"#;
        let e = drover::check_reply(&done(1, failed, ""))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("failed for node n-001: no such file"), "{e}");
        let stop = r#"{"errors": [], "results": {"n-001": true, "n-002": false}}"#;
        let e = drover::check_reply(&done(1, stop, ""))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("reported n-002: false"), "{e}");
        let missing = "error: unrecognized subcommand 'deploy-config'\n\nUsage: drover\n";
        let e = drover::check_reply(&done(2, "", missing))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(": error: unrecognized subcommand 'deploy-config'"),
            "{e}"
        );
    }

    #[test]
    fn helper_listings_name_the_running_state() {
        let v: Value =
            serde_json::from_str(r#"{"ok": {"n-001": ["online", 77], "n-002": ["stopped", 0]}}"#)
                .unwrap();
        let l = parse_helper_listing(&v, "online").unwrap();
        assert_eq!(
            l["n-001"],
            Prog {
                running: true,
                pid: Some(77)
            }
        );
        assert_eq!(
            l["n-002"],
            Prog {
                running: false,
                pid: None
            }
        );
        let e: Value = serde_json::from_str(r#"{"err": "not connected"}"#).unwrap();
        assert_eq!(
            parse_helper_listing(&e, "online").unwrap_err().to_string(),
            "not connected"
        );
    }

    #[test]
    fn configurations_restart_at_once() {
        let names = names(2);
        assert_eq!(names, ["n-001", "n-002"]);
        assert_eq!(super::names(1000)[999], "n-1000");

        let toml: toml::Table = drover::cluster_file(&names, &PROGRAM).parse().unwrap();
        let node = &toml["nodes"]["n-002"];
        assert_eq!(node["instance"].as_str(), Some("agent-1"));
        assert_eq!(node["command"][0].as_str(), Some("/bin/sleep"));
        assert_eq!(node["restart"].as_str(), Some("always"));
        assert_eq!(node["backoff"]["initial"].as_str(), Some("0s"));
        assert_eq!(node["readiness"]["kind"].as_str(), Some("start-period"));
        assert_eq!(node["readiness"]["period"].as_str(), Some("0s"));
        assert!(toml["instances"].get("agent-1").is_some());

        let conf = supervisord::config_with_env(Path::new("/w"), &names, &PROGRAM, &[]);
        assert!(conf.contains(
            "[program:n-002]\ncommand=/bin/sleep 100000\nautorestart=true\nstartsecs=0\n"
        ));
        assert!(!conf.contains("environment="));
        assert!(conf.contains("file=/w/supervisor.sock"));
        let env = [("A".to_owned(), "x/1".to_owned())];
        let conf = supervisord::config_with_env(Path::new("/w"), &names, &PROGRAM, &env);
        assert!(conf.contains("startsecs=0\nenvironment=A=\"x/1\"\n[program:n-002]"));

        let eco = pm2::ecosystem(&names, &PROGRAM);
        let json = eco
            .strip_prefix("module.exports = ")
            .and_then(|s| s.trim_end().strip_suffix(';'))
            .unwrap();
        let v: Value = serde_json::from_str(json).unwrap();
        let app = &v["apps"][1];
        assert_eq!(app["name"], "n-002");
        assert_eq!(app["script"], "/bin/sleep");
        assert_eq!(app["args"], json!(["100000"]));
        assert_eq!(app["interpreter"], "none");
        assert_eq!(app["restart_delay"], 0);
    }

    #[test]
    fn quick_options_are_a_smoke_test() {
        let q = Options::new(None, vec![Peer::Pm2, Peer::Pm2], None, None, true);
        assert_eq!((q.nodes.clone(), q.kills, q.runs), (vec![20], 3, 1));
        assert_eq!(q.idle, Duration::from_secs(2));
        assert_eq!(q.peers, [Peer::Pm2]);
        let full = Options::new(None, vec![Peer::Supervisord], Some(4), None, false);
        assert_eq!((full.nodes, full.kills, full.runs), (vec![100, 500], 4, 3));
        assert_eq!(full.idle, Duration::from_secs(10));
    }

    #[test]
    fn timestamps_are_utc() {
        assert_eq!(timestamp(0), "19700101T000000Z");
        assert_eq!(timestamp(951_782_400), "20000229T000000Z");
        assert_eq!(timestamp(1_795_000_000), "20261118T110640Z");
    }
}
