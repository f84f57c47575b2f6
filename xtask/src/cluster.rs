//! `cargo xtask cluster up`: a controller and N agents on this machine.
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
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

/// A daemon started by the cluster.
struct Daemon {
    name: String,
    log: PathBuf,
    child: Child,
}

/// Stops every daemon when dropped: SIGTERM, a grace period, then SIGKILL.
struct Daemons(Vec<Daemon>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for d in &self.0 {
            if let Ok(pid) = i32::try_from(d.child.id()) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for d in &mut self.0 {
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
        if !self.0.is_empty() {
            eprintln!("cluster stopped");
        }
    }
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
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

fn ensure_cert(drover: &Path, pki: &Path, role: &str, name: &str) -> anyhow::Result<()> {
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

fn spawn(name: &str, cmd: &mut Command, logs: &Path) -> anyhow::Result<Daemon> {
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

fn wait_for<T>(
    what: &str,
    patience: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() > deadline {
            bail!("timed out after {patience:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_alive(daemons: &mut Daemons) -> anyhow::Result<()> {
    for d in &mut daemons.0 {
        if let Some(status) = d.child.try_wait()? {
            let log = fs::read_to_string(&d.log).unwrap_or_default();
            bail!("{} exited ({status}); its log:\n{log}", d.name);
        }
    }
    Ok(())
}

/// Starts the cluster, shows it, and stops it on Ctrl-C (or at once with `once`).
pub(crate) fn up(opts: &Options) -> anyhow::Result<()> {
    if opts.build {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--bins",
                "-p",
                "drover-controller",
                "-p",
                "drover-agent",
                "-p",
                "drover-client",
                "-p",
                "drover-testprog",
            ])
            .current_dir(project_root())
            .status()
            .context("cannot run cargo build")?;
        if !status.success() {
            bail!("cargo build failed");
        }
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        signal::signal(Signal::SIGINT, SigHandler::Handler(on_signal))?;
        signal::signal(Signal::SIGTERM, SigHandler::Handler(on_signal))?;
    }
    let drover = opts.bin_dir.join("drover");
    let pki = opts.dir.join("pki");
    let logs = opts.dir.join("logs");
    let state = opts.dir.join("state");
    fs::create_dir_all(&logs)?;
    if !pki.join("ca.crt").exists() {
        run_ok(
            Command::new(&drover)
                .args(["ca", "init", "--dir"])
                .arg(&pki),
        )?;
    }
    ensure_cert(&drover, &pki, "controller", "controller")?;
    ensure_cert(&drover, &pki, "client", "ops")?;
    let names: Vec<String> = (1..=opts.agents).map(|i| format!("agent-{i}")).collect();
    for n in &names {
        ensure_cert(&drover, &pki, "agent", n)?;
    }
    let tls = |name: &str| -> Vec<String> {
        vec![
            "--ca".into(),
            pki.join("ca.crt").display().to_string(),
            "--cert".into(),
            pki.join(format!("{name}.crt")).display().to_string(),
            "--key".into(),
            pki.join(format!("{name}.key")).display().to_string(),
        ]
    };

    let mut daemons = Daemons(Vec::new());
    let started = Instant::now();
    daemons.0.push(spawn(
        "controller",
        Command::new(opts.bin_dir.join("drover-controller"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", opts.port))
            .arg("--state-dir")
            .arg(state.join("controller"))
            .args(tls("controller")),
        &logs,
    )?);
    let ctl_log = daemons.0[0].log.clone();
    let controller = wait_for("the controller to listen", Duration::from_secs(20), || {
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
    for n in &names {
        daemons.0.push(spawn(
            n,
            Command::new(opts.bin_dir.join("drover-agent"))
                .args(["--name", n, "--controller", &controller, "--state-dir"])
                .arg(state.join(n))
                .args(tls(n)),
            &logs,
        )?);
    }

    let mut client = Command::new(&drover);
    client.args(["--controller", &controller]).args(tls("ops"));
    let mut shown = String::new();
    wait_for("every agent to connect", Duration::from_secs(30), || {
        let out = client.arg("get-instances").output().ok()?;
        client = Command::new(&drover);
        client.args(["--controller", &controller]).args(tls("ops"));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let all = names.iter().all(|n| v.get(n).is_some());
        all.then(|| shown = String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .or_else(|e| {
        check_alive(&mut daemons)?;
        Err(e)
    })?;

    println!(
        "drover cluster up in {:.1}s: controller {controller}, {} agent(s)\n",
        started.elapsed().as_secs_f64(),
        names.len()
    );
    println!("$ drover get-instances\n{shown}");
    println!("Talk to it from another shell:");
    println!("  export DROVER_CONTROLLER={controller}");
    for (var, file) in [
        ("DROVER_CA", "ca.crt"),
        ("DROVER_CERT", "ops.crt"),
        ("DROVER_KEY", "ops.key"),
    ] {
        println!("  export {var}={}", pki.join(file).display());
    }
    println!("  {} get-instances", drover.display());
    println!("Logs: {}", logs.display());
    if opts.once {
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop the cluster.");
    while !STOP.load(Ordering::SeqCst) {
        check_alive(&mut daemons)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("\nstopping the cluster");
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
        };
        up(&opts).unwrap();
        for name in ["controller", "agent-1", "agent-2"] {
            let log = fs::read_to_string(dir.path().join(format!("logs/{name}.log"))).unwrap();
            assert!(
                log.contains("stopped"),
                "{name} did not stop cleanly:\n{log}"
            );
        }
        // A second run reuses the PKI.
        up(&opts).unwrap();
    }
}
