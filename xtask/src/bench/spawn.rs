//! `cargo xtask bench spawn`: what one spawn of a node costs the agent, by how it is
//! spawned. The agent spawns with std's `posix_spawn` path (no copy of its page tables)
//! and pins a node's CPUs by pinning the spawning thread, because a `pre_exec` hook
//! forces a `fork`, whose cost grows with the parent's memory. This prints the figures
//! behind that choice: plain `posix_spawn`, `fork` (a no-op `pre_exec` hook) and
//! `posix_spawn` with the thread pinned, at this process's size and again with
//! `--ballast-mib` of memory touched. Then the agent's own spawn (`sys::spawn_clean`)
//! as it starts a node: plain (`posix_spawn`), and, when run as root, with a user
//! switch (`nobody`), with a user switch plus a capability, a limit and
//! `no_new_privileges` (the vfork-style clone of `drover_agent::exec`), and with a user
//! switch and the cgroups of a node with memory, CPU and pids limits (its own v2
//! cgroup, and v1 cgroups where v2 lacks the controller), taken the agent's steps.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// What to measure.
#[derive(Debug)]
pub(crate) struct Options {
    /// Spawns per figure.
    pub(crate) spawns: u32,
    /// Memory to add for the second round, in MiB.
    pub(crate) ballast_mib: usize,
}

/// Runs both rounds and prints a table per round.
pub(crate) fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.spawns == 0 {
        bail!("--spawns must be at least 1");
    }
    // Affinity is per thread: measure on a thread of our own, as the agent spawns from
    // its supervisor's thread.
    let n = opts.spawns;
    let ballast_mib = opts.ballast_mib;
    std::thread::spawn(move || -> anyhow::Result<()> {
        round(n)?;
        // fork copies the page tables, so its cost grows with the parent's memory.
        let ballast = vec![1u8; ballast_mib << 20];
        round(n)?;
        drop(std::hint::black_box(ballast));
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))?
}

fn round(n: u32) -> anyhow::Result<()> {
    println!(
        "{n} spawns of /bin/true, this process's rss {} MiB:",
        rss_mib()?
    );
    let plain = || Command::new("/bin/true").spawn();
    let forked = || {
        let mut cmd = Command::new("/bin/true");
        // SAFETY: the hook does nothing, which is async-signal-safe.
        unsafe { cmd.pre_exec(|| Ok(())) };
        cmd.spawn()
    };
    let pinned = || {
        let previous = sched_getaffinity(Pid::from_raw(0)).map_err(io::Error::from)?;
        let mut one = CpuSet::new();
        let first = (0..CpuSet::count())
            .find(|c| previous.is_set(*c).unwrap_or(false))
            .unwrap_or(0);
        one.set(first).map_err(io::Error::from)?;
        sched_setaffinity(Pid::from_raw(0), &one).map_err(io::Error::from)?;
        let child = Command::new("/bin/true").spawn();
        sched_setaffinity(Pid::from_raw(0), &previous).map_err(io::Error::from)?;
        child
    };
    for (name, spawn) in [
        (
            "posix_spawn (plain)",
            &plain as &dyn Fn() -> io::Result<Child>,
        ),
        ("fork (no-op pre_exec)", &forked),
        ("posix_spawn + affinity", &pinned),
    ] {
        let (spawn_us, total_us) = measure(n, spawn).with_context(|| name.to_owned())?;
        println!("  {name:<24} spawn() {spawn_us:8.1} us   spawn+wait {total_us:8.1} us");
    }
    agent_spawns(n)
}

/// The agent's spawn of a node, plain and with the settings of `drover_agent::exec`.
fn agent_spawns(n: u32) -> anyhow::Result<()> {
    use drover_agent::exec::{self, Creds, Plan};
    let creds = Creds::current().context("reading this process's credentials")?;
    let plan = |f: &dyn Fn(&mut drover_proto::Node)| -> anyhow::Result<Plan> {
        let mut node = drover_proto::Node::new("bench", "bench");
        f(&mut node);
        exec::resolve("bench", &node, &creds).map_err(anyhow::Error::msg)
    };
    let mut rows = vec![("drover: plain", Plan::default())];
    if nix::unistd::Uid::effective().is_root() {
        rows.push((
            "drover: as nobody",
            plan(&|n| n.user = Some("nobody".into()))?,
        ));
        let nofile = drover_proto::exec::Limit::parse("4096", false).map_err(anyhow::Error::msg)?;
        rows.push((
            "drover: nobody+cap+limit",
            plan(&|n| {
                n.user = Some("nobody".into());
                n.capabilities = Some(vec!["CAP_NET_RAW".into()]);
                n.no_new_privileges = Some(true);
                n.limits.insert("nofile".into(), nofile);
            })?,
        ));
    } else {
        println!("  (not root: the user-switch and cgroup rows are left out)");
    }
    let contained = Contained::setup()?;
    if contained.is_some() {
        rows.push((
            "drover: nobody+cgroups",
            plan(&|n| n.user = Some("nobody".into()))?,
        ));
    }
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let cwd = std::env::temp_dir();
    let spawn_only = |plan: &Plan,
                      cgroup: Option<drover_agent::sys::IntoCgroup<'_>>,
                      join: &[std::os::fd::BorrowedFd<'_>]|
     -> io::Result<i32> {
        use std::os::fd::AsFd;
        drover_agent::sys::spawn_clean(&drover_agent::sys::SpawnSpec {
            program: "/bin/true",
            argv0: None,
            args: &[],
            env: vec!["PATH=/usr/bin:/bin".to_owned()],
            path: "/usr/bin:/bin",
            cwd: &cwd,
            stdout: null.as_fd(),
            stderr: null.as_fd(),
            exec: Some(plan),
            cgroup,
            join,
        })
    };
    // The last row, when there is one, goes through the agent's cgroup steps around
    // the spawn, as the supervisor takes them for a node with limits.
    let last = rows.len() - 1;
    let spawn = |i: usize, plan: &Plan| -> io::Result<i32> {
        match contained.as_ref().filter(|_| i == last) {
            Some(c) => c.spawn(|into, join| spawn_only(plan, Some(into), join)),
            None => spawn_only(plan, None, &[]),
        }
    };
    let reap = |pid: i32| -> anyhow::Result<()> {
        match nix::sys::wait::waitpid(Pid::from_raw(pid), None)? {
            nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
            other => bail!("/bin/true ended with {other:?}"),
        }
    };
    // The rows take turns, spawn by spawn, so that a busy moment of the machine falls
    // on all of them alike.
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); rows.len()];
    for round in 0..n + 10 {
        for (i, ((name, plan), (in_spawn, total))) in rows.iter().zip(&mut samples).enumerate() {
            let t0 = Instant::now();
            let pid = spawn(i, plan).with_context(|| (*name).to_owned())?;
            let spawned = t0.elapsed();
            reap(pid)?;
            if round >= 10 {
                in_spawn.push(spawned);
                total.push(t0.elapsed());
            }
        }
    }
    if let Some(c) = contained {
        println!("  (cgroups: {})", c.describe());
        c.release();
    }
    let (plain_spawn, plain_total) = (median(&samples[0].0), median(&samples[0].1));
    for ((name, _), (in_spawn, total)) in rows.iter().zip(&samples) {
        let (s, t) = (median(in_spawn), median(total));
        println!(
            "  {name:<24} spawn() {s:8.1} us   spawn+wait {t:8.1} us   (medians; x{:.2} and x{:.2} of plain)",
            s / plain_spawn,
            t / plain_total
        );
    }
    Ok(())
}

/// A node's cgroups as the agent makes them: a v2 cgroup of its own (the containment)
/// and, for its limits, the v1 memory, cpu and pids cgroups where v2 has no such
/// controller. Set up in a subtree of this process's own, moved there as the agent
/// moves itself.
struct Contained {
    cgroups: drover_agent::cgroup::Cgroups,
    host: drover_agent::limits::Host,
    limits: drover_agent::limits::Limits,
    node: std::path::PathBuf,
}

impl Contained {
    const NODE: &'static str = "bench";

    /// `None` (and a line saying why) where this process cannot make cgroups.
    fn setup() -> anyhow::Result<Option<Self>> {
        use drover_agent::cgroup::{self, CgroupSetting, Cgroups};
        use drover_agent::limits::{Host, Limits};
        if !nix::unistd::Uid::effective().is_root() {
            return Ok(None);
        }
        let state = std::env::temp_dir().join(format!("drover-bench-spawn-{}", std::process::id()));
        let cgroups = match Cgroups::setup(&CgroupSetting::Auto, "bench", &state) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(None),
            Err(e) => {
                println!("  (no cgroup row: {e})");
                return Ok(None);
            }
        };
        let host = Host::discover(Some(&cgroups), &cgroup::subtree_name("bench", &state));
        let mut node = drover_proto::Node::new(Self::NODE, "bench");
        node.memory = Some(drover_proto::resources::Memory {
            max: Some(drover_proto::resources::ByteSize(256 << 20)),
            high: None,
        });
        node.cpus = Some(1.0);
        node.pids_max = Some(64);
        let limits = Limits::of(&node);
        if let Err(e) = host.check(Self::NODE, &limits) {
            println!("  (no cgroup row: {e})");
            cgroups.release();
            return Ok(None);
        }
        let node = cgroups.create_node(Self::NODE)?;
        Ok(Some(Self {
            cgroups,
            host,
            limits,
            node,
        }))
    }

    /// The supervisor's steps: the v2 cgroup made ready, limits written, the spawn
    /// (which creates the child in its v2 cgroup, and in which it moves itself into
    /// its v1 cgroups before it execs), the late limits.
    fn spawn(
        &self,
        spawn: impl FnOnce(
            drover_agent::sys::IntoCgroup<'_>,
            &[std::os::fd::BorrowedFd<'_>],
        ) -> io::Result<i32>,
    ) -> io::Result<i32> {
        use std::os::fd::AsFd;
        let ready = self.cgroups.prepare(&self.node)?;
        let placement = self.host.prepare(Self::NODE, &self.limits, ready.fresh)?;
        let v1 = placement.open_procs()?;
        let join: Vec<_> = v1.iter().map(AsFd::as_fd).collect();
        let pid = spawn(
            drover_agent::sys::IntoCgroup {
                dir: ready.dir.as_fd(),
                create: ready.fresh,
            },
            &join,
        )?;
        placement.finish()?;
        Ok(pid)
    }

    fn describe(&self) -> String {
        self.host.describe()
    }

    fn release(self) {
        self.host.remove(Self::NODE);
        self.host.release();
        self.cgroups.release();
    }
}

/// The median, in µs.
fn median(samples: &[Duration]) -> f64 {
    let mut v: Vec<Duration> = samples.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Mean µs per `spawn()` call and per spawn + wait, over `n` spawns after a warm-up.
fn measure(n: u32, spawn: &dyn Fn() -> io::Result<Child>) -> anyhow::Result<(f64, f64)> {
    for _ in 0..10 {
        spawn()?.wait()?;
    }
    let (mut in_spawn, mut total) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut c = spawn()?;
        in_spawn += t0.elapsed();
        let status = c.wait()?;
        total += t0.elapsed();
        if !status.success() {
            bail!("/bin/true exited with {status}");
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    Ok((us(in_spawn), us(total)))
}

fn rss_mib() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("malformed /proc/self/statm")?;
    // Pages are 4 KiB on the machines this runs on.
    Ok((pages * 4096) >> 20)
}
