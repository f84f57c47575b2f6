//! `cargo xtask cluster up`: a controller and N agents on this machine, and the reusable
//! [`Cluster`] starter behind it (also used by `cargo xtask bench`).
//!
//! Certificates are generated with the `drover ca` CLI under `<dir>/pki` (once; reused
//! afterwards), each process logs to `<dir>/logs/<name>.log` and keeps its state under
//! `<dir>/state`. The daemons run in their own process group, so Ctrl-C reaches only
//! this task, which then stops them with SIGTERM (SIGKILL after a grace period) and
//! leaves no process behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

use crate::project_root;
use drover_tests::netlab::NetLab;

/// What to start.
#[derive(Debug)]
pub(crate) struct Options {
    /// Number of agents.
    pub(crate) agents: u32,
    /// Stop right after showing the cluster.
    pub(crate) once: bool,
    /// Where PKI, state and logs go.
    pub(crate) dir: PathBuf,
    /// Where the built binaries are.
    pub(crate) bin_dir: PathBuf,
    /// Build the binaries first.
    pub(crate) build: bool,
    /// Controller port on 127.0.0.1 (0 picks a free one).
    pub(crate) port: u16,
    /// Cluster file to deploy; the example of `deploy/examples/` (two agents) or one
    /// sleeper per agent when absent.
    pub(crate) config: Option<PathBuf>,
    /// Leave the cluster running in the background (`cluster status`, `cluster down`).
    pub(crate) detach: bool,
    /// Run each agent in a network namespace of its own, as separate hosts.
    pub(crate) netns: bool,
    /// Three controllers on a three-member etcd cluster instead of one controller.
    pub(crate) ha: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set a flag (see [`interrupted`]) instead of killing
/// this process, so every guard gets to clean up.
pub(crate) fn install_signal_handlers() -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal::signal(Signal::SIGINT, SigHandler::Handler(on_signal))?;
        signal::signal(Signal::SIGTERM, SigHandler::Handler(on_signal))?;
        // A closed terminal or a dropped SSH session: the daemons run in process groups
        // of their own, which the hangup does not reach, so it stops them as Ctrl-C does.
        signal::signal(Signal::SIGHUP, SigHandler::Handler(on_signal))?;
    }
    Ok(())
}

/// Whether SIGINT, SIGTERM or SIGHUP arrived since [`install_signal_handlers`].
pub(crate) fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Builds the daemons, the CLI and the test program (`release` adds `--release`). With
/// `log`, cargo's output goes to that file and an error names its first `error` line.
pub(crate) fn build_binaries(release: bool, log: Option<&Path>) -> anyhow::Result<()> {
    let mut cmd = crate::cargo_command();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    cmd.args([
        "--bins",
        "-p",
        "drover-controller",
        "-p",
        "drover-agent",
        "-p",
        "drover-client",
        "-p",
        "drover-testprog",
        "-p",
        "drover-swarm",
    ])
    .current_dir(project_root());
    if let Some(log) = log {
        let file =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdout(file.try_clone()?).stderr(file);
    }
    let status = cmd.status().context("cannot run cargo build")?;
    if !status.success() {
        let Some(log) = log else {
            bail!("cargo build failed ({status})");
        };
        let text = fs::read_to_string(log).unwrap_or_default();
        let first = text
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("no error line");
        bail!(
            "cargo build failed ({status}): {first} (full log: {})",
            log.display()
        );
    }
    Ok(())
}

/// A daemon started by the cluster.
pub(crate) struct Daemon {
    pub(crate) name: String,
    pub(crate) log: PathBuf,
    pub(crate) child: Child,
}

/// Stops every daemon when dropped: SIGTERM, a grace period, then SIGKILL.
pub(crate) struct Daemons {
    pub(crate) list: Vec<Daemon>,
    /// Say so on stderr once they are stopped.
    pub(crate) announce: bool,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for d in &self.list {
            if let Ok(pid) = i32::try_from(d.child.id()) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for d in &mut self.list {
            loop {
                match d.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("{} did not stop in time; killing it", d.name);
                        let _ = d.child.kill();
                        let _ = d.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if self.announce && !self.list.is_empty() {
            eprintln!("cluster stopped");
        }
    }
}

pub(crate) fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_cert_sans(
    drover: &Path,
    pki: &Path,
    role: &str,
    name: &str,
    sans: &[String],
) -> anyhow::Result<()> {
    // The lab's bridge address differs between runs: a certificate issued for another
    // one is issued again (the SANs it was issued for are kept beside it).
    let issued_for = pki.join(format!("{name}.sans"));
    let want = sans.join(",");
    if pki.join(format!("{name}.crt")).exists()
        && fs::read_to_string(&issued_for).is_ok_and(|s| s == want)
    {
        return Ok(());
    }
    for ext in ["crt", "key"] {
        let _ = fs::remove_file(pki.join(format!("{name}.{ext}")));
    }
    let mut cmd = Command::new(drover);
    cmd.args(["ca", "issue", "--dir"])
        .arg(pki)
        .args(["--role", role, "--name", name]);
    for s in sans {
        cmd.args(["--san", s]);
    }
    run_ok(&mut cmd)?;
    fs::write(&issued_for, want)
        .with_context(|| format!("cannot write {}", issued_for.display()))?;
    Ok(())
}

pub(crate) fn ensure_cert(drover: &Path, pki: &Path, role: &str, name: &str) -> anyhow::Result<()> {
    if pki.join(format!("{name}.crt")).exists() {
        return Ok(());
    }
    run_ok(
        Command::new(drover)
            .args(["ca", "issue", "--dir"])
            .arg(pki)
            .args(["--role", role, "--name", name]),
    )?;
    Ok(())
}

/// Fails when a daemon of a cluster holds a state dir in `state` (a cluster started in
/// another terminal, or left running): starting another would truncate its logs.
fn refuse_if_running(state: &Path) -> anyhow::Result<()> {
    let Ok(dirs) = fs::read_dir(state) else {
        return Ok(());
    };
    for dir in dirs.filter_map(Result::ok).map(|e| e.path()) {
        for role in ["controller", "agent"] {
            let lock = dir.join(format!("{role}.lock"));
            let Ok(file) = fs::File::open(&lock) else {
                continue;
            };
            if let Err(fs::TryLockError::WouldBlock) = file.try_lock_shared() {
                let pid = fs::read_to_string(&lock).unwrap_or_default();
                anyhow::bail!(
                    "a cluster already runs in {} (its {role} in {} is pid {}): stop it with \
                     Ctrl-C in its terminal, `cargo xtask cluster down` if it was detached, \
                     or give another --dir",
                    state.parent().unwrap_or(state).display(),
                    dir.display(),
                    pid.trim()
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> anyhow::Result<Daemon> {
    let log = logs.join(format!("{name}.log"));
    let out = fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("NO_COLOR", "1")
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Daemon {
        name: name.to_owned(),
        log,
        child,
    })
}

pub(crate) fn wait_for<T>(
    what: &str,
    patience: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() > deadline {
            bail!("timed out after {patience:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_alive(daemons: &mut Daemons) -> anyhow::Result<()> {
    for d in &mut daemons.list {
        if let Some(status) = d.child.try_wait()? {
            let log = fs::read_to_string(&d.log).unwrap_or_default();
            bail!("{} exited ({status}); its log:\n{log}", d.name);
        }
    }
    Ok(())
}

/// A running local cluster: a controller and agents `agent-1` .. `agent-N`, with the
/// client certificate `ops`. Dropping it stops every daemon (SIGTERM, then SIGKILL).
pub(crate) struct Cluster {
    daemons: Daemons,
    /// The controller's address, `127.0.0.1:PORT`.
    pub(crate) controller: String,
    /// The `drover` CLI.
    pub(crate) drover: PathBuf,
    /// The PKI directory.
    pub(crate) pki: PathBuf,
    /// One log per daemon.
    pub(crate) logs: PathBuf,
    /// The agents' names.
    pub(crate) agents: Vec<String>,
    /// The output of `drover get-instances` once every agent was connected.
    pub(crate) instances: String,
}

impl Cluster {
    /// Creates the PKI (unless `dir/pki` has one), starts the controller on
    /// `127.0.0.1:port` and `agents` agents, and returns once `drover get-instances`
    /// lists every agent. `bin_dir` holds the built binaries.
    pub(crate) fn start(
        dir: &Path,
        bin_dir: &Path,
        agents: u32,
        port: u16,
    ) -> anyhow::Result<Self> {
        Self::start_in(dir, bin_dir, agents, port, None, false)
    }

    /// As [`Cluster::start`]; with a network lab, the controller listens on the lab's
    /// bridge and each agent runs in a host (namespace) of its own (with `ha` too: the
    /// controllers and etcd stay in this namespace). With `ha`, three
    /// controllers (ports `port`, `port + 1`, `port + 2`) share a three-member etcd
    /// cluster, and agents and the CLI are given all three.
    pub(crate) fn start_in(
        dir: &Path,
        bin_dir: &Path,
        agents: u32,
        port: u16,
        lab: Option<&NetLab>,
        ha: bool,
    ) -> anyhow::Result<Self> {
        let drover = bin_dir.join("drover");
        let pki = dir.join("pki");
        let logs = dir.join("logs");
        let state = dir.join("state");
        // Before a log is made anew: those of a cluster running there are its own.
        refuse_if_running(&state)?;
        fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
        if !pki.join("ca.crt").exists() {
            run_ok(
                Command::new(&drover)
                    .args(["ca", "init", "--dir"])
                    .arg(&pki),
            )?;
        }
        match lab {
            Some(lab) => ensure_cert_sans(
                &drover,
                &pki,
                "controller",
                "controller",
                &[lab.host_gateway().to_string()],
            )?,
            None => ensure_cert(&drover, &pki, "controller", "controller")?,
        }
        let listen_host =
            lab.map_or_else(|| "127.0.0.1".to_owned(), |l| l.host_gateway().to_string());
        ensure_cert(&drover, &pki, "client", "ops")?;
        let names: Vec<String> = (1..=agents).map(|i| format!("agent-{i}")).collect();
        for n in &names {
            ensure_cert(&drover, &pki, "agent", n)?;
        }
        let tls = |name: &str| tls_args(&pki, name);

        let mut daemons = Daemons {
            list: Vec::new(),
            announce: false,
        };
        let etcd = if ha {
            Some(start_etcd(&state, &logs, &mut daemons)?)
        } else {
            None
        };
        let mut addrs = Vec::new();
        for i in 0..if ha { 3 } else { 1 } {
            let name = if ha {
                format!("controller-{}", i + 1)
            } else {
                "controller".to_owned()
            };
            let mut cmd = Command::new(bin_dir.join("drover-controller"));
            let port = if port == 0 { 0 } else { port + i };
            cmd.arg("--listen")
                .arg(format!("{listen_host}:{port}"))
                .arg("--state-dir")
                .arg(state.join(&name))
                .args(tls("controller"));
            if let Some(endpoints) = &etcd {
                cmd.args(["--store", "etcd", "--etcd-endpoints", endpoints]);
            }
            daemons.list.push(spawn(&name, &mut cmd, &logs)?);
            let ctl_log = daemons.list.last().expect("just pushed").log.clone();
            let addr = wait_for("the controller to listen", Duration::from_secs(20), || {
                fs::read_to_string(&ctl_log).ok().and_then(|text| {
                    text.lines()
                        .find(|l| l.contains("controller listening"))
                        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
                        .map(str::to_owned)
                })
            })
            .or_else(|e| {
                check_alive(&mut daemons)?;
                Err(e)
            })?;
            addrs.push(addr);
        }
        let controller = addrs.join(",");
        for (i, n) in names.iter().enumerate() {
            let mut cmd = match lab {
                Some(lab) => lab.command(i, &bin_dir.join("drover-agent")),
                None => Command::new(bin_dir.join("drover-agent")),
            };
            daemons.list.push(spawn(
                n,
                cmd.args(["--name", n, "--controller", &controller, "--state-dir"])
                    .arg(state.join(n))
                    .args(tls(n)),
                &logs,
            )?);
        }

        let mut cluster = Self {
            daemons,
            controller,
            drover,
            pki,
            logs,
            agents: names,
            instances: String::new(),
        };
        let mut shown = String::new();
        wait_for("every agent to connect", Duration::from_secs(30), || {
            let out = cluster.client().arg("get-instances").output().ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let all = cluster.agents.iter().all(|n| v.get(n).is_some());
            all.then(|| shown = String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .or_else(|e| {
            cluster.check_alive()?;
            Err(e)
        })?;
        cluster.instances = shown;
        Ok(cluster)
    }

    /// A `drover` command pointed at this cluster with the `ops` client certificate.
    pub(crate) fn client(&self) -> Command {
        let mut cmd = Command::new(&self.drover);
        cmd.args(["--controller", &self.controller])
            .args(tls_args(&self.pki, "ops"));
        cmd
    }

    /// The pid of a daemon (`controller`, `agent-1`, ...).
    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.daemons
            .list
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.child.id())
    }

    /// Fails, with the daemon's log, if any daemon has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        check_alive(&mut self.daemons)
    }
}

/// Starts a three-member etcd cluster on free ports of 127.0.0.1, its data under
/// `state/etcd-mN`; returns its client URLs once every member serves.
pub(crate) fn start_etcd(
    state: &Path,
    logs: &Path,
    daemons: &mut Daemons,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        Command::new("etcd")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "--ha needs etcd on PATH (Debian: apt-get install etcd-server)"
    );
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push((free()?, free()?));
    }
    let cluster: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect();
    let mut urls = Vec::new();
    let mut names = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let url = format!("http://127.0.0.1:{client}");
        let name = format!("etcd-m{i}");
        // A fresh cluster each time: a member's data names its peers' old ports.
        let data = state.join(&name);
        let _ = fs::remove_dir_all(&data);
        daemons.list.push(spawn(
            &name,
            Command::new("etcd")
                .arg(format!("--name=m{i}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls={url}"))
                .arg(format!("--advertise-client-urls={url}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster={}", cluster.join(",")))
                .arg("--initial-cluster-state=new"),
            logs,
        )?);
        urls.push(url);
        names.push(logs.join(format!("{name}.log")));
    }
    wait_for("etcd to serve", Duration::from_secs(30), || {
        names
            .iter()
            .all(|log| {
                fs::read_to_string(log).is_ok_and(|t| t.contains("ready to serve client requests"))
            })
            .then_some(())
    })
    .or_else(|e| {
        check_alive(daemons)?;
        Err(e)
    })?;
    Ok(urls.join(","))
}

/// Which controller of a high-availability cluster leads, from their logs: the one whose
/// last word on leadership is that it leads.
fn leader_from_logs(logs: &Path) -> Option<String> {
    (1..=3).find_map(|i| {
        let name = format!("controller-{i}");
        let text = fs::read_to_string(logs.join(format!("{name}.log"))).ok()?;
        let last = text.lines().rev().find(|l| {
            l.contains("leading: serving")
                || l.contains("stepped down")
                || l.contains("stepping down")
                || l.contains("following")
        })?;
        let addr = last
            .split_whitespace()
            .find_map(|w| w.strip_prefix("advertise="))?;
        last.contains("leading: serving")
            .then(|| format!("{name} ({addr})"))
    })
}

/// `--ca`, `--cert` and `--key` for the certificate `name` in `pki`.
pub(crate) fn tls_args(pki: &Path, name: &str) -> Vec<String> {
    vec![
        "--ca".into(),
        pki.join("ca.crt").display().to_string(),
        "--cert".into(),
        pki.join(format!("{name}.crt")).display().to_string(),
        "--key".into(),
        pki.join(format!("{name}.key")).display().to_string(),
    ]
}

/// The cluster file `up` deploys.
fn cluster_file(opts: &Options, agents: &[String]) -> anyhow::Result<PathBuf> {
    if let Some(c) = &opts.config {
        return Ok(c.clone());
    }
    if agents.len() == 2 {
        return Ok(project_root().join("deploy/examples/local.toml"));
    }
    let mut text = String::from("# One sleeper per agent, written by `cargo xtask cluster up`.\n");
    for a in agents {
        text.push_str(&format!("[instances.{a}]\n"));
    }
    for a in agents {
        text.push_str(&format!(
            "[nodes.{a}-sleeper]\ninstance = \"{a}\"\ncommand = [\"/bin/sleep\", \"infinity\"]\n"
        ));
    }
    let path = opts.dir.join("cluster.toml");
    fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Where a detached cluster records its daemons.
fn pid_file(dir: &Path) -> PathBuf {
    dir.join("daemons")
}

/// Starts the cluster, deploys a configuration, shows it, and streams events until
/// Ctrl-C (or stops at once with `once`, or leaves it running with `detach`).
pub(crate) fn up(opts: &Options) -> anyhow::Result<()> {
    if pid_file(&opts.dir).exists() {
        bail!(
            "a detached cluster runs from {}; stop it with `cargo xtask cluster down` first",
            opts.dir.display()
        );
    }
    if opts.build {
        build_binaries(false, None)?;
    }
    install_signal_handlers()?;
    let started = Instant::now();
    let lab = if opts.netns {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "--netns creates network namespaces, a bridge and veth pairs: it needs root (try sudo)"
        );
        anyhow::ensure!(
            !opts.detach,
            "--netns cannot be combined with --detach (the namespaces live as long as this command)"
        );
        let mut lab = NetLab::new();
        for _ in 0..opts.agents {
            lab.add_host();
        }
        Some(lab)
    } else {
        None
    };
    let mut cluster = Cluster::start_in(
        &opts.dir,
        &opts.bin_dir,
        opts.agents,
        opts.port,
        lab.as_ref(),
        opts.ha,
    )?;
    if let Some(lab) = &lab {
        for i in 0..cluster.agents.len() {
            println!(
                "{} runs in its own network namespace at {}",
                cluster.agents[i],
                lab.host_addr(i)
            );
        }
    }
    cluster.daemons.announce = true;

    println!(
        "drover cluster up in {:.1}s: controller {}, {} agent(s)\n",
        started.elapsed().as_secs_f64(),
        cluster.controller,
        cluster.agents.len()
    );
    if opts.ha
        && let Ok(leader) = wait_for("a leader", Duration::from_secs(10), || {
            leader_from_logs(&cluster.logs)
        })
    {
        println!("leader: {leader}; etcd: 3 members (logs etcd-m0..2)\n");
    }
    println!("$ drover get-instances\n{}", cluster.instances);
    println!("Talk to it from another shell:");
    println!("  export DROVER_CONTROLLER={}", cluster.controller);
    for (var, file) in [
        ("DROVER_CA", "ca.crt"),
        ("DROVER_CERT", "ops.crt"),
        ("DROVER_KEY", "ops.key"),
    ] {
        println!("  export {var}={}", cluster.pki.join(file).display());
    }
    println!("  {} status", cluster.drover.display());
    println!("Logs: {}\n", cluster.logs.display());

    let file = cluster_file(opts, &cluster.agents)?;
    println!("$ drover deploy-config {}", file.display());
    let out = cluster
        .client()
        .arg("deploy-config")
        .arg(&file)
        .output()
        .context("cannot run drover deploy-config")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("the deploy failed (see above)");
    }
    let status = cluster
        .client()
        .arg("status")
        .output()
        .context("cannot run drover status")?;
    println!(
        "\n$ drover status\n{}",
        String::from_utf8_lossy(&status.stdout)
    );

    if opts.detach {
        let mut lines = format!("controller-addr {}\n", cluster.controller);
        for d in &cluster.daemons.list {
            lines.push_str(&format!("{} {}\n", d.name, d.child.id()));
        }
        fs::write(pid_file(&opts.dir), lines)?;
        println!(
            "Detached. `cargo xtask cluster status` shows it, `cargo xtask cluster down` stops it."
        );
        // The daemons keep running: forget them rather than stopping them on drop.
        cluster.daemons.list.clear();
        return Ok(());
    }
    if opts.once {
        return Ok(());
    }
    println!("Events follow; press Ctrl-C to stop the cluster.\n");
    let monitor = cluster
        .client()
        .arg("monitor")
        .process_group(0)
        .spawn()
        .context("cannot run drover monitor")?;
    // Killed however this ends: a monitor outlives its controller, waiting for another.
    let _monitor = Killed(monitor);
    while !interrupted() {
        cluster.check_alive()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("\nstopping the cluster");
    Ok(())
}

/// A child process killed and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a detached cluster's record.
fn detached(dir: &Path) -> anyhow::Result<(String, Vec<(String, i32)>)> {
    let path = pid_file(dir);
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "no detached cluster in {} (no {})",
            dir.display(),
            path.display()
        )
    })?;
    let mut addr = String::new();
    let mut daemons = Vec::new();
    for line in text.lines() {
        if let Some(a) = line.strip_prefix("controller-addr ") {
            addr = a.to_owned();
        } else if let Some((name, pid)) = line.split_once(' ') {
            daemons.push((
                name.to_owned(),
                pid.parse().context("bad pid in the daemons file")?,
            ));
        }
    }
    Ok((addr, daemons))
}

/// `cluster status`: the detached cluster's nodes.
pub(crate) fn status(dir: &Path, bin_dir: &Path) -> anyhow::Result<()> {
    let (addr, _) = detached(dir)?;
    let pki = dir.join("pki");
    if let Some(leader) = leader_from_logs(&dir.join("logs")) {
        println!("leader: {leader}");
    }
    let st = Command::new(bin_dir.join("drover"))
        .args(["--controller", &addr])
        .args(tls_args(&pki, "ops"))
        .arg("status")
        .status()
        .context("cannot run drover status")?;
    if !st.success() {
        bail!("drover status failed");
    }
    Ok(())
}

/// `cluster down`: stops a detached cluster, agents first (they stop their nodes).
pub(crate) fn down(dir: &Path) -> anyhow::Result<()> {
    let (_, daemons) = detached(dir)?;
    let alive = |pid: i32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    // Agents first (they stop their nodes), then controllers, then etcd.
    let (agents, rest): (Vec<_>, Vec<_>) = daemons
        .into_iter()
        .partition(|(n, _)| n.starts_with("agent-"));
    let (etcd, controllers): (Vec<_>, Vec<_>) =
        rest.into_iter().partition(|(n, _)| n.starts_with("etcd-"));
    for group in [agents, controllers, etcd] {
        for (_, pid) in &group {
            let _ = signal::kill(Pid::from_raw(*pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for (name, pid) in &group {
            while alive(*pid) {
                if Instant::now() > deadline {
                    eprintln!("{name} did not stop in time; killing it");
                    let _ = signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    fs::remove_file(pid_file(dir))?;
    println!("cluster stopped");
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_once_starts_shows_and_stops_everything() {
        // target/<profile>/deps/<test binary> -> target/<profile>
        let exe = std::env::current_exe().unwrap();
        let bin_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
        assert!(
            bin_dir.join("drover-controller").exists(),
            "build the binaries first (cargo xtask test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            agents: 2,
            once: true,
            dir: dir.path().to_owned(),
            bin_dir,
            build: false,
            port: 0,
            config: None,
            detach: false,
            netns: false,
            ha: false,
        };
        up(&opts).unwrap();
        for name in ["controller", "agent-1", "agent-2"] {
            let log = fs::read_to_string(dir.path().join(format!("logs/{name}.log"))).unwrap();
            assert!(
                log.contains("stopped"),
                "{name} did not stop cleanly:\n{log}"
            );
        }
        // A second run reuses the PKI; detached, it keeps running until `down`.
        let detached = Options {
            detach: true,
            ..opts
        };
        up(&detached).unwrap();
        let (addr, daemons) = super::detached(dir.path()).unwrap();
        assert!(addr.starts_with("127.0.0.1:"));
        assert_eq!(daemons.len(), 3);
        status(dir.path(), &detached.bin_dir).unwrap();
        down(dir.path()).unwrap();
        for (name, pid) in daemons {
            assert!(
                !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                    || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s
                        .rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))),
                "{name} still runs"
            );
        }
    }

    #[test]
    fn up_ha_runs_three_controllers_on_etcd_and_names_the_leader() {
        if !drover_tests::etcd::available() {
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let bin_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            agents: 2,
            once: false,
            dir: dir.path().to_owned(),
            bin_dir,
            build: false,
            port: 0,
            config: None,
            detach: true,
            netns: false,
            ha: true,
        };
        up(&opts).unwrap();
        let (addr, daemons) = detached(dir.path()).unwrap();
        assert_eq!(addr.split(',').count(), 3, "{addr}");
        let names: Vec<&str> = daemons.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "etcd-m0",
            "etcd-m2",
            "controller-1",
            "controller-3",
            "agent-2",
        ] {
            assert!(names.contains(&want), "{names:?}");
        }
        let leader = leader_from_logs(&dir.path().join("logs")).expect("a leader");
        assert!(leader.starts_with("controller-"), "{leader}");
        status(dir.path(), &opts.bin_dir).unwrap();
        down(dir.path()).unwrap();
    }

    #[test]
    fn up_ha_with_agents_in_network_namespaces_deploys_and_stops() {
        if !drover_tests::etcd::available() {
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let bin_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            agents: 2,
            once: true,
            dir: dir.path().to_owned(),
            bin_dir,
            build: false,
            port: 0,
            config: None,
            detach: false,
            netns: true,
            ha: true,
        };
        // Twice: the second run's bridge has another address, which the controller
        // certificate issued by the first does not name.
        for _ in 0..2 {
            up(&opts).unwrap();
        }
        let logs = dir.path().join("logs");
        let agent = fs::read_to_string(logs.join("agent-1.log")).unwrap();
        assert!(agent.contains("connected to controller"), "{agent}");
        assert!(leader_from_logs(&logs).is_some());
    }
}
