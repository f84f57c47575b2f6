//! One cold run of one system with N programs: start, idle, kill → replacement, stop-all,
//! timed the same way for every system (the method of `peer-bench.md`).
//!
//! 1. **start**: the clock starts right before the start command. The status API is
//!    polled every 50 ms until every program is running. A watcher
//!    ([`super::execevents::ExecWatch`]) records when each `sleep` child of the
//!    supervisor exec'd: the last program's exec is the N-th's; the largest `/proc`
//!    start time of the N (fork time, 10 ms ticks, as in `peer-bench.md`) is reported
//!    too.
//! 2. **idle**: 1 s after that, the supervisor's VmRSS; then a window with no client
//!    traffic: its CPU (utime + stime) and voluntary context switches (all threads).
//!    Then 20 status calls (5 with `--quick`), one after another, each timed.
//! 3. **kill → replacement** (first run only): SIGKILL one program, a different one
//!    each time; `/proc` is polled every 1 ms for the old pid's reaping, and the kernel's
//!    exec events (or `/proc`, every 1 ms, without them) tell when a new `sleep` child
//!    of the supervisor exec'd; then the status API every 10 ms until it shows
//!    the program running with the new pid; a random pause follows.
//! 4. **stop-all**: the stop command, then every 1 ms until all N pids have exited
//!    (zombie or gone), and until the command returns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::execevents::{self, ExecEvents, ExecWatch};
use super::procfs::{self, ProgramScan};
use super::system::{Leftovers, Listing, System};
use crate::cluster::interrupted;

/// The managed program.
pub(crate) const PROGRAM: [&str; 2] = ["/bin/sleep", "100000"];

/// Samples per metric key.
pub(crate) type Samples = BTreeMap<&'static str, Vec<f64>>;

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The program names (`n-001` ...).
    pub(crate) names: Vec<String>,
    /// How many kills (0: none in this run).
    pub(crate) kills: usize,
    /// The idle window.
    pub(crate) idle: Duration,
    /// Status calls timed after the idle window.
    pub(crate) status_calls: usize,
    /// Bounds of the random pause after each kill, seconds.
    pub(crate) pause: (f64, f64),
}

/// A small xorshift generator for the pauses between kills.
#[derive(Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from the clock.
    pub(crate) fn from_clock() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self(u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(1) | 1)
    }

    /// Uniform in [lo, hi).
    pub(crate) fn between(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (hi - lo) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d` in short steps, failing early on Ctrl-C.
fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

/// Sleeps until `at` (not at all if it has passed).
fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// Whether every name is listed as running with a pid.
pub(crate) fn all_running(listing: &Listing, names: &[String]) -> bool {
    names
        .iter()
        .all(|n| listing.get(n).is_some_and(|p| p.running && p.pid.is_some()))
}

fn kill9(pid: u32) -> anyhow::Result<()> {
    let raw = i32::try_from(pid).context("pid out of range")?;
    signal::kill(Pid::from_raw(raw), Signal::SIGKILL).with_context(|| format!("kill -9 {pid}"))
}

/// Runs the scenario on `sys`. Every managed process seen is recorded in `left`
/// (also when the run fails), so the caller's guard can kill what survives.
pub(crate) fn run(
    sys: &mut dyn System,
    plan: &Plan,
    rng: &mut Rng,
    left: &mut Leftovers,
) -> anyhow::Result<Samples> {
    let mut scan = ProgramScan::new("sleep", &PROGRAM[1..]);
    let result = phases(sys, plan, rng, &mut scan, left);
    if let Some(sup) = sys.supervisor_pid() {
        scan.scan(sup);
    }
    left.extend(scan.matched());
    result
}

fn push(s: &mut Samples, key: &'static str, v: f64) {
    s.entry(key).or_default().push(v);
}

fn phases(
    sys: &mut dyn System,
    plan: &Plan,
    rng: &mut Rng,
    scan: &mut ProgramScan,
    left: &mut Leftovers,
) -> anyhow::Result<Samples> {
    let n = plan.names.len();
    let mut s = Samples::new();

    // 1. start
    let tck = procfs::clk_tck() as f64;
    let t0_boot = procfs::boottime()?;
    let t0 = Instant::now();
    let argv: Vec<String> = PROGRAM.iter().map(|a| (*a).to_owned()).collect();
    let watcher = ExecWatch::start(t0, vec![sys.supervisor_source()], &argv, n)?;
    let mut start = sys.start()?.in_background();
    let patience = Duration::from_secs(60) + Duration::from_millis(100) * n as u32;
    let mut returned: Option<Instant> = None;
    let mut running_at: Option<Duration> = None;
    let mut last_err: Option<anyhow::Error> = None;
    let mut tick = 0u32;
    while running_at.is_none() || returned.is_none() {
        check_interrupted()?;
        if returned.is_none()
            && let Some((at, done)) = start.try_done()
        {
            returned = Some(at);
            push(&mut s, "start_cmd_ms", ms(at - t0));
            sys.check(&done?)?;
        }
        if running_at.is_none() {
            match sys.status() {
                Ok(l) => {
                    if all_running(&l, &plan.names) {
                        running_at = Some(t0.elapsed());
                    }
                    last_err = None;
                }
                Err(e) => last_err = Some(e),
            }
        }
        if running_at.is_none() {
            // The daemon may need a moment after its start command returns, not more.
            if let (Some(r), Some(e)) = (returned, &last_err)
                && r.elapsed() > Duration::from_secs(5)
            {
                bail!("status failed after the start command returned: {e:#}");
            }
            if t0.elapsed() > patience {
                bail!("not all {n} programs were reported running within {patience:?}");
            }
        } else if t0.elapsed() > patience {
            bail!("the start command did not return within {patience:?}");
        }
        tick += 1;
        sleep_until(t0 + Duration::from_millis(50) * tick);
    }
    if let Some(at) = running_at {
        push(&mut s, "start_running_ms", ms(at));
    }
    let sup = sys
        .supervisor_pid()
        .context("the supervisor's pid is unknown")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pids = loop {
        let pids = scan.scan(sup);
        left.extend(scan.matched());
        if pids.len() >= n {
            break pids;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} programs are children of the supervisor (pid {sup})",
                pids.len()
            );
        }
        sleep(Duration::from_millis(10))?;
    };
    let last_start = pids
        .iter()
        .filter_map(|p| scan.starttime(*p))
        .max()
        .context("no start times")?;
    push(
        &mut s,
        "start_forked_ms",
        (last_start as f64 / tck - t0_boot.as_secs_f64()) * 1000.0,
    );
    let seen = watcher.finish(n)?;
    push(&mut s, "start_exec_ms", ms(seen[n - 1].1));

    // 2. idle
    sleep(Duration::from_secs(1))?;
    push(&mut s, "rss_mib", procfs::status_mib(sup, "VmRSS")?);
    let mut total = 0.0;
    for pid in sys.daemon_pids() {
        total += procfs::status_mib(pid, "VmRSS")?;
    }
    push(&mut s, "daemons_rss_mib", total);
    let (busy0, all0) = procfs::machine_ticks()?;
    let cpu0 = procfs::cpu_ticks(sup)?;
    let sw0 = procfs::voluntary_switches(sup)?;
    let w0 = Instant::now();
    sleep(plan.idle)?;
    let cpu1 = procfs::cpu_ticks(sup)?;
    let sw1 = procfs::voluntary_switches(sup)?;
    let window = w0.elapsed().as_secs_f64();
    let (busy1, all1) = procfs::machine_ticks()?;
    push(
        &mut s,
        "idle_cpu_pct",
        (cpu1 - cpu0) as f64 / tck / window * 100.0,
    );
    push(
        &mut s,
        "idle_wakeups",
        procfs::switches_between(&sw0, &sw1) as f64,
    );
    if all1 > all0 {
        push(
            &mut s,
            "idle_machine_busy_pct",
            (busy1 - busy0) as f64 / (all1 - all0) as f64 * 100.0,
        );
    }

    // Status calls in a quiet system, one after another.
    for _ in 0..plan.status_calls {
        let c0 = Instant::now();
        let l = sys.status()?;
        push(&mut s, "status_call_ms", ms(c0.elapsed()));
        if l.len() < n {
            bail!("the status call listed {} of {n} programs", l.len());
        }
    }

    // 3. kill -> replacement
    for k in 0..plan.kills {
        check_interrupted()?;
        let name = &plan.names[k * n / plan.kills];
        let listing = sys.status()?;
        let Some(old) = listing.get(name).filter(|p| p.running).and_then(|p| p.pid) else {
            bail!("{name} is not reported running before kill {}", k + 1);
        };
        let before = scan.scan(sup);
        if !before.contains(&old) {
            bail!("{name}'s pid {old} is not a `sleep` child of the supervisor (pid {sup})");
        }
        // Subscribed before the kill; each wait for an event is the loop's pause.
        let events = ExecEvents::open(Duration::from_millis(1)).ok();
        let t = Instant::now();
        let mono_t = execevents::monotonic_now();
        kill9(old)?;
        let mut reaped = None;
        let mut new = None;
        let deadline = t + Duration::from_secs(30);
        while new.is_none() || reaped.is_none() {
            if reaped.is_none() && procfs::gone(old) {
                reaped = Some(t.elapsed());
            }
            match (&events, new.is_none()) {
                (Some(events), true) => {
                    if let Some(exec) = events.next().context("exec events")?
                        && !before.contains(&exec.pid)
                        && procfs::is_program(&procfs::cmdline(exec.pid), "sleep", &PROGRAM[1..])
                        && procfs::stat(exec.pid).is_some_and(|st| st.ppid == sup)
                    {
                        new = Some((exec.pid, exec.at.saturating_sub(mono_t)));
                    }
                }
                (None, true) => {
                    let now: BTreeSet<u32> = scan.scan(sup);
                    if let Some(pid) = now.difference(&before).next() {
                        new = Some((*pid, t.elapsed()));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                (_, false) => std::thread::sleep(Duration::from_millis(1)),
            }
            if Instant::now() > deadline {
                bail!("no replacement for {name} (pid {old}) within 30s of kill -9");
            }
        }
        scan.scan(sup);
        left.extend(scan.matched());
        let (new_pid, exec_at) = new.context("no replacement")?;
        loop {
            check_interrupted()?;
            let c0 = Instant::now();
            let l = sys.status()?;
            if l.get(name)
                .is_some_and(|p| p.running && p.pid == Some(new_pid))
            {
                push(&mut s, "kill_running_ms", ms(t.elapsed()));
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} was not reported running with its new pid {new_pid} within 30s");
            }
            sleep_until(c0 + Duration::from_millis(10));
        }
        if let Some(r) = reaped {
            push(&mut s, "kill_reaped_ms", ms(r));
        }
        push(&mut s, "kill_exec_ms", ms(exec_at));
        if k + 1 < plan.kills {
            sleep(Duration::from_secs_f64(
                rng.between(plan.pause.0, plan.pause.1),
            ))?;
        }
    }

    // 4. stop-all
    let mut remaining: Vec<u32> = scan.scan(sup).into_iter().collect();
    left.extend(scan.matched());
    push(&mut s, "hwm_mib", procfs::status_mib(sup, "VmHWM")?);
    let patience = Duration::from_secs(60) + Duration::from_millis(200) * n as u32;
    let t = Instant::now();
    let mut stop = sys.stop_all()?.in_background();
    let mut exited = None;
    let mut returned = false;
    while exited.is_none() || !returned {
        check_interrupted()?;
        if exited.is_none() {
            remaining.retain(|p| !procfs::exited(*p));
            if remaining.is_empty() {
                exited = Some(t.elapsed());
            }
        }
        if !returned && let Some((at, done)) = stop.try_done() {
            returned = true;
            push(&mut s, "stop_cmd_ms", ms(at - t));
            sys.check(&done?)?;
        }
        if t.elapsed() > patience {
            bail!(
                "stop-all: {} program(s) still running, command {} after {patience:?}",
                remaining.len(),
                if returned {
                    "returned"
                } else {
                    "still running"
                }
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(e) = exited {
        push(&mut s, "stop_exited_ms", ms(e));
    }
    Ok(s)
}
