//! What the bench reads from `/proc`: a supervisor's children and their command lines,
//! start times, CPU time, memory and context switches, and the machine's CPU counters.
//!
//! Everything here is a plain read of files the kernel keeps; no `ps`, no sampling
//! thread. Times from `/proc/PID/stat` are in clock ticks (`CLK_TCK`, 100 on Linux).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;

/// Clock ticks per second of `/proc/PID/stat` times.
pub(crate) fn clk_tck() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(100)
}

/// `CLOCK_BOOTTIME` now: the base of `/proc/PID/stat` start times.
pub(crate) fn boottime() -> anyhow::Result<Duration> {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).context("cannot read CLOCK_BOOTTIME")?;
    Ok(Duration::new(
        u64::try_from(ts.tv_sec()).unwrap_or(0),
        u32::try_from(ts.tv_nsec()).unwrap_or(0),
    ))
}

/// The fields of `/proc/PID/stat` the bench uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Process state (`R`, `S`, `Z`, ...).
    pub(crate) state: char,
    /// Parent pid.
    pub(crate) ppid: u32,
    /// User CPU time, ticks.
    pub(crate) utime: u64,
    /// System CPU time, ticks.
    pub(crate) stime: u64,
    /// Start time after boot, ticks.
    pub(crate) starttime: u64,
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from its last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field k is f[k - 3].
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        starttime: f.get(19)?.parse().ok()?,
    })
}

/// `/proc/PID/stat`, or `None` once the process is gone.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether the process has exited: gone, or a zombie not yet reaped.
pub(crate) fn exited(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.state == 'Z' || s.state == 'X')
}

/// Whether `/proc/PID` is gone (the process was reaped).
pub(crate) fn gone(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_err()
}

/// The argv of a process, split at NULs.
pub(crate) fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Whether an argv is the managed program: `sleep` (any path, e.g. `/bin/sleep` or
/// `/usr/bin/sleep`) with exactly the expected arguments. A freshly forked child still
/// carries its parent's argv until it execs, so it does not match yet.
pub(crate) fn is_program(argv: &[String], program: &str, args: &[&str]) -> bool {
    let Some((argv0, rest)) = argv.split_first() else {
        return false;
    };
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    base == program && rest.len() == args.len() && rest.iter().zip(args).all(|(a, b)| a == b)
}

/// The argv of a live process (empty when gone or a zombie).
pub(crate) fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| parse_cmdline(&raw))
        .unwrap_or_default()
}

/// The children of `pid`, from `/proc/PID/task/*/children` (each thread lists the
/// children it forked).
pub(crate) fn children(pid: u32) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Tracks which children of a supervisor run the managed program. Only matches are
/// remembered: a child that has not exec'd yet is checked again on the next scan.
#[derive(Debug)]
pub(crate) struct ProgramScan {
    program: String,
    args: Vec<String>,
    matched: HashMap<u32, u64>,
}

impl ProgramScan {
    /// Matches `program` (a base name) with exactly `args`.
    pub(crate) fn new(program: &str, args: &[&str]) -> Self {
        Self {
            program: program.to_owned(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            matched: HashMap::new(),
        }
    }

    /// The live (not exited) children of `supervisor` running the program.
    pub(crate) fn scan(&mut self, supervisor: u32) -> BTreeSet<u32> {
        let kids = children(supervisor);
        self.matched.retain(|pid, _| kids.contains(pid));
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut out = BTreeSet::new();
        for pid in kids {
            if self.matched.contains_key(&pid) {
                out.insert(pid);
                continue;
            }
            if is_program(&cmdline(pid), &self.program, &args)
                && let Some(st) = stat(pid)
                && st.state != 'Z'
            {
                self.matched.insert(pid, st.starttime);
                out.insert(pid);
            }
        }
        out
    }

    /// Every matched process still a child at the last scan, as (pid, start time).
    pub(crate) fn matched(&self) -> Vec<(u32, u64)> {
        self.matched.iter().map(|(p, t)| (*p, *t)).collect()
    }

    /// Start time (ticks after boot) of a matched pid.
    pub(crate) fn starttime(&self, pid: u32) -> Option<u64> {
        self.matched.get(&pid).copied()
    }
}

/// A field of `/proc/PID/status` in kB (e.g. `VmRSS`), as MiB.
pub(crate) fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let kb = status_field(&text, field).with_context(|| format!("no {field} in {path}"))?;
    Ok(kb as f64 / 1024.0)
}

/// The number in a `/proc/PID/status` line `Field:   123 kB`.
pub(crate) fn status_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

/// User plus system CPU time of a process (all its threads), in ticks.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let st = stat(pid).with_context(|| format!("process {pid} is gone"))?;
    Ok(st.utime + st.stime)
}

/// Voluntary context switches of each thread of a process: how often it went to sleep
/// waiting for something (its wake-ups), by thread id.
pub(crate) fn voluntary_switches(pid: u32) -> anyhow::Result<HashMap<u32, u64>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = HashMap::new();
    for t in fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
        let t = t?;
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Ok(text) = fs::read_to_string(t.path().join("status")) {
            out.insert(
                tid,
                status_field(&text, "voluntary_ctxt_switches").unwrap_or(0),
            );
        }
    }
    Ok(out)
}

/// Switches between two readings of [`voluntary_switches`]: a thread started in between
/// counts from zero, a thread that ended in between is lost (never negative).
pub(crate) fn switches_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// The machine's CPU counters from the first line of `/proc/stat`: (busy, total) ticks.
pub(crate) fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let Some(line) = text.lines().next().filter(|l| l.starts_with("cpu ")) else {
        bail!("unexpected first line in /proc/stat");
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is counted in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// SIGKILLs every process in `procs` (pid, start time) that still runs with the same
/// start time, so a recycled pid is never hit. Returns how many were killed.
pub(crate) fn kill_matching(procs: &HashMap<u32, u64>) -> usize {
    let mut killed = 0;
    for (&pid, &start) in procs {
        let Some(st) = stat(pid) else { continue };
        if st.starttime != start || st.state == 'Z' {
            continue;
        }
        if let Ok(raw) = i32::try_from(pid)
            && signal::kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}
