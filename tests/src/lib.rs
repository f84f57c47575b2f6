//! drover-tests: a harness for end-to-end tests with the real binaries.
//!
//! Each test gets a temporary directory with a fresh PKI ([`Cluster::new`]), starts
//! `drover-controller` and `drover-agent` processes with one log file each
//! ([`Proc`]), drives them with the `drover` CLI ([`Cluster::drover`]) or with the
//! transport library directly, and waits for conditions with a deadline
//! ([`eventually`]), never with bare sleeps. When a test fails, the logs of its processes
//! are printed; every process is killed when the test ends. When a test ends without
//! failing, every mutating request it made successfully with [`Cluster::drover_as`], or
//! with another client whose helper reports to [`Cluster::audited`] (zeek-client), must
//! be in an audit trail of its directory ([`Cluster`]'s drop checks it), so that the
//! whole suite proves that changes are audited.
//!
//! The binaries come from `DROVER_BIN_DIR`, or else from the target directory holding
//! the test executable (`cargo xtask test` builds them first).

pub mod chaos;
pub mod disk;
pub mod etcd;
pub mod ha_chaos;
pub mod history;
pub mod lossy;
pub mod netlab;
pub mod nodelogs;

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_pki::{Ca, LeafSpec, Pem, Validity};
use drover_proto::msg::PeerRole;

/// Default patience of [`eventually`]: generous, since CI machines are noisy.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Where the drover binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DROVER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_owned();
    assert!(
        dir.join("drover-controller").exists(),
        "no drover binaries in {}: run `cargo build --workspace --bins` first (cargo xtask test does), or set DROVER_BIN_DIR",
        dir.display()
    );
    dir
}

/// Path of one binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `cond` until it returns `Some`, or panics with `what` after `patience`.
pub fn eventually<T>(what: &str, patience: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for: {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// As [`eventually`], but `None` at the deadline, so that the caller can say what it
/// found instead.
pub fn eventually_or_none<T>(patience: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A running child process with its log file; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Proc {
    /// Name for messages.
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// The log's length when this process started: a process started again on the same
    /// log must not be taken for ready on its predecessor's lines.
    log_start: usize,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log file");
        let log_start = out
            .metadata()
            .ok()
            .and_then(|m| usize::try_from(m.len()).ok())
            .unwrap_or(0);
        let err = out.try_clone().expect("clone log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.env("RUST_LOG", "info,drover=debug")
            .env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            log,
            log_start,
            child: Some(child),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until this process has logged `needle` (lines of earlier processes on the
    /// same log do not count); returns the whole log.
    pub fn wait_log(&self, needle: &str) -> String {
        eventually(
            &format!("{} to log {needle:?}", self.name),
            PATIENCE,
            || {
                let text = fs::read(&self.log).unwrap_or_default();
                let own = text.get(self.log_start..).unwrap_or_default();
                String::from_utf8_lossy(own)
                    .contains(needle)
                    .then(|| String::from_utf8_lossy(&text).into_owned())
            },
        )
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid fits"));
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Kills with SIGKILL and reaps.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its exit status once it has exited by itself; `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().expect("wait")
    }

    /// Waits for the process to exit by itself, up to `patience`.
    pub fn wait_exit(&mut self, patience: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = eventually(&format!("{} to exit", self.name), patience, || {
            child.try_wait().expect("wait")
        });
        self.child = None;
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test's world: a temp dir, a PKI, and the processes started in it.
#[derive(Debug)]
pub struct Cluster {
    /// The temp dir (kept when `DROVER_KEEP_TEST_DIR` is set).
    pub dir: tempfile::TempDir,
    /// Holds the CA and issued certificates.
    pub pki: PathBuf,
    /// Keep-alive passed to the daemons.
    pub keep_alive: Duration,
    /// Idle timeout passed to the daemons.
    pub idle_timeout: Duration,
    logs: std::cell::RefCell<Vec<PathBuf>>,
    /// The audit kinds of the mutating CLI requests that succeeded, checked against the
    /// audit trails in `dir` when the cluster is dropped.
    audited: Audited,
}

/// The audit kinds of requests that succeeded, shared with helpers that drive another
/// client (zeek-client), also from other threads; `None` once a test opts out.
#[derive(Debug, Clone)]
pub struct Audited(std::sync::Arc<std::sync::Mutex<Option<Vec<&'static str>>>>);

impl Audited {
    /// Records requests of these audit kinds that succeeded.
    pub fn expect(&self, kinds: &[&'static str]) {
        let mut list = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = list.as_mut() {
            list.extend(kinds);
        }
    }

    fn recorded(&self) -> Vec<&'static str> {
        let list = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        list.clone().unwrap_or_default()
    }

    fn stop(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// The audit kinds of the requests a `drover` command line sends, if it changes
/// something.
fn audit_kinds(args: &[&str]) -> &'static [&'static str] {
    for arg in args {
        match *arg {
            "stage-config" => return &["stage_config"],
            "deploy" => return &["deploy"],
            "deploy-config" => return &["stage_config", "deploy"],
            "restart" => return &["restart"],
            "stop" => return &["stop"],
            "start" => return &["start"],
            "signal" => return &["signal"],
            "ca" => return &[],
            _ => {}
        }
    }
    &[]
}

/// Records in the audit trails (`audit.jsonl*`) under `dir`, up to three levels down.
fn audit_records(dir: &Path, depth: usize, out: &mut Vec<serde_json::Value>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if depth > 0 {
                audit_records(&path, depth - 1, out);
            }
        } else if e.file_name().to_string_lossy().starts_with("audit.jsonl")
            && fs::symlink_metadata(&path).is_ok_and(|m| m.is_file())
        {
            let text = fs::read_to_string(&path).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
}

impl Cluster {
    /// A fresh directory with a CA and a controller and client certificate.
    pub fn new() -> Self {
        Self::with_controller_sans(&[])
    }

    /// As [`Cluster::new`], with extra names or addresses in the controller's
    /// certificate (for agents that reach it at another address than loopback).
    pub fn with_controller_sans(sans: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("drover-e2e-")
            .tempdir()
            .expect("temp dir");
        let pki = dir.path().join("pki");
        drover_pki::init_dir(&pki).expect("ca init");
        let c = Self {
            dir,
            pki,
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            logs: std::cell::RefCell::default(),
            audited: Audited(std::sync::Arc::new(std::sync::Mutex::new(Some(Vec::new())))),
        };
        let mut spec = LeafSpec::new(PeerRole::Controller, "controller");
        spec.sans = sans.iter().map(|s| (*s).to_owned()).collect();
        drover_pki::issue_in_dir(&c.pki, &spec).expect("issue controller");
        c.issue(PeerRole::Client, "ops");
        c
    }

    /// Issues `NAME.crt`/`NAME.key` for a role.
    pub fn issue(&self, role: PeerRole, name: &str) {
        drover_pki::issue_in_dir(&self.pki, &LeafSpec::new(role, name)).expect("issue");
    }

    /// Issues `NAME.crt`/`NAME.key` for a client with `scope`.
    pub fn issue_scoped(&self, name: &str, scope: drover_proto::access::Scope) {
        let mut spec = LeafSpec::new(PeerRole::Client, name);
        spec.scope = Some(scope);
        drover_pki::issue_in_dir(&self.pki, &spec).expect("issue");
    }

    /// Issues a certificate with custom validity under another name, returning the paths.
    pub fn issue_with(
        &self,
        role: PeerRole,
        name: &str,
        file: &str,
        validity: Validity,
    ) -> (PathBuf, PathBuf) {
        let ca = Ca::load(&self.pki).expect("load ca");
        let spec = LeafSpec {
            role,
            name: name.to_owned(),
            sans: Vec::new(),
            validity,
            scope: None,
        };
        self.write_pem(file, &ca.issue(&spec).expect("issue"))
    }

    /// Writes a cert and key (mode 0600) as `FILE.crt` and `FILE.key` in the PKI dir.
    pub fn write_pem(&self, file: &str, pem: &Pem) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let cert = self.pki.join(format!("{file}.crt"));
        let key = self.pki.join(format!("{file}.key"));
        fs::write(&cert, &pem.cert).expect("write cert");
        fs::write(&key, &pem.key).expect("write key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        (cert, key)
    }

    /// Path in the PKI dir.
    pub fn pki_file(&self, name: &str) -> PathBuf {
        self.pki.join(name)
    }

    /// A log file `NAME.log` in the test dir, printed when the test fails.
    pub fn log_path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.log"));
        self.logs.borrow_mut().push(p.clone());
        p
    }

    fn liveness_args(&self, cmd: &mut Command) {
        cmd.arg("--keep-alive")
            .arg(format!("{}ms", self.keep_alive.as_millis()))
            .arg("--idle-timeout")
            .arg(format!("{}ms", self.idle_timeout.as_millis()));
    }

    /// Starts a controller on `listen` (port 0 picks one); returns it and its address.
    pub fn start_controller(&self, listen: &str) -> (Proc, SocketAddr) {
        self.start_controller_with(listen, &[])
    }

    /// As [`Cluster::start_controller`], with extra flags.
    pub fn start_controller_with(&self, listen: &str, extra: &[&str]) -> (Proc, SocketAddr) {
        let mut cmd = Command::new(bin("drover-controller"));
        cmd.args(extra);
        self.controller_args(&mut cmd, listen);
        let p = Proc::spawn("controller", cmd, self.log_path("controller"));
        let log = p.wait_log("controller listening");
        (p, addr_in_log(&log, "controller listening"))
    }

    /// Adds the flags of this cluster's controller listening on `listen`: its state
    /// dir, certificates and liveness settings.
    pub fn controller_args(&self, cmd: &mut Command, listen: &str) {
        self.controller_args_in(cmd, listen, &self.dir.path().join("controller"));
    }

    /// As [`Cluster::controller_args`], with state dir `state_dir`.
    pub fn controller_args_in(&self, cmd: &mut Command, listen: &str, state_dir: &Path) {
        cmd.arg("--listen")
            .arg(listen)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--ca")
            .arg(self.pki_file("ca.crt"))
            .arg("--cert")
            .arg(self.pki_file("controller.crt"))
            .arg("--key")
            .arg(self.pki_file("controller.key"));
        self.liveness_args(cmd);
    }

    /// Starts an agent named `name` (issuing its certificate if needed).
    pub fn start_agent(&self, name: &str, controller: SocketAddr) -> Proc {
        if !self.pki_file(&format!("{name}.crt")).exists() {
            self.issue(PeerRole::Agent, name);
        }
        self.start_agent_with(name, name, controller)
    }

    /// Starts agent `name` dialling `controller`, with a metrics listener (its address is
    /// returned) and `extra` flags.
    pub fn start_agent_with_metrics(
        &self,
        name: &str,
        controller: SocketAddr,
        extra: &[&str],
    ) -> (Proc, SocketAddr) {
        if !self.pki_file(&format!("{name}.crt")).exists() {
            self.issue(PeerRole::Agent, name);
        }
        let metrics = free_tcp();
        let (controller, listen) = (controller.to_string(), metrics.to_string());
        let mut args = vec!["--controller", &controller, "--metrics-listen", &listen];
        args.extend_from_slice(extra);
        (self.start_agent_args(name, name, &args), metrics)
    }

    /// Starts an agent named `name` with the certificate files `FILE.crt`/`FILE.key`.
    pub fn start_agent_with(&self, name: &str, file: &str, controller: SocketAddr) -> Proc {
        self.start_agent_args(name, file, &["--controller", &controller.to_string()])
    }

    /// Starts an agent that listens on `listen` for the controller to dial it.
    pub fn start_listening_agent(&self, name: &str, listen: SocketAddr) -> Proc {
        if !self.pki_file(&format!("{name}.crt")).exists() {
            self.issue(PeerRole::Agent, name);
        }
        self.start_agent_args(name, name, &["--listen", &listen.to_string()])
    }

    /// Starts an agent with certificate files `FILE.*` and extra flags.
    pub fn start_agent_args(&self, name: &str, file: &str, extra: &[&str]) -> Proc {
        self.start_agent_cmd(Command::new(bin("drover-agent")), name, file, extra)
    }

    /// Starts an agent in host `host` of a [`netlab::NetLab`], dialling `controller`.
    pub fn start_agent_in(
        &self,
        lab: &netlab::NetLab,
        host: usize,
        name: &str,
        controller: SocketAddr,
    ) -> Proc {
        if !self.pki_file(&format!("{name}.crt")).exists() {
            self.issue(PeerRole::Agent, name);
        }
        let cmd = lab.command(host, &bin("drover-agent"));
        self.start_agent_cmd(cmd, name, name, &["--controller", &controller.to_string()])
    }

    /// Starts an agent from `cmd` (another copy of the binary, say), with the arguments
    /// of [`Cluster::start_agent_args`].
    pub fn start_agent_cmd(
        &self,
        mut cmd: Command,
        name: &str,
        file: &str,
        extra: &[&str],
    ) -> Proc {
        self.agent_args(&mut cmd, name, file, extra);
        Proc::spawn(
            &format!("agent {name}"),
            cmd,
            self.log_path(&format!("agent-{name}")),
        )
    }

    /// Adds the flags of this cluster's agent `name` with the certificate files
    /// `FILE.*`, then `extra`: its state dir, certificates and liveness settings.
    pub fn agent_args(&self, cmd: &mut Command, name: &str, file: &str, extra: &[&str]) {
        cmd.arg("--name")
            .arg(name)
            .args(extra)
            .arg("--state-dir")
            .arg(self.dir.path().join(format!("agent-{name}")))
            .arg("--ca")
            .arg(self.pki_file("ca.crt"))
            .arg("--cert")
            .arg(self.pki_file(&format!("{file}.crt")))
            .arg("--key")
            .arg(self.pki_file(&format!("{file}.key")))
            .arg("--reconnect-max")
            .arg("500ms");
        self.liveness_args(cmd);
    }

    /// Runs the `drover` CLI as client `ops` against `controller`.
    pub fn drover(&self, controller: SocketAddr, args: &[&str]) -> CliOutput {
        self.drover_as("ops", controller, args)
    }

    /// Writes cluster file `name` with `text` in the test's directory and deploys it,
    /// again and again until a deploy succeeds (the agents may still be connecting);
    /// the file's path.
    pub fn deploy_text(&self, controller: SocketAddr, name: &str, text: &str) -> PathBuf {
        let file = self.dir.path().join(name);
        fs::write(&file, text).unwrap();
        eventually("the agent connected and took the deploy", PATIENCE, || {
            (self
                .drover(controller, &["deploy-config", file.to_str().unwrap()])
                .code
                == Some(0))
            .then_some(())
        });
        file
    }

    /// Waits until the controller at `addr` lists agent `name` as connected.
    pub fn wait_for_agent(&self, addr: SocketAddr, name: &str) {
        eventually(&format!("agent {name} connected"), PATIENCE, || {
            self.drover(addr, &["get-instances"])
                .json()
                .get(name)
                .map(|_| ())
        });
    }

    /// A connection of the `ops` client to the controller at `addr`, for tests that
    /// speak the protocol themselves. Close the endpoint when done.
    pub async fn client_connection(
        &self,
        addr: SocketAddr,
    ) -> (quinn::Endpoint, quinn::Connection) {
        use drover_net::conn::{self, TransportSettings};
        use drover_net::{Credentials, TlsFiles};
        use drover_proto::msg::{API_VERSION, Hello};
        let creds = Credentials::load(&TlsFiles {
            ca: self.pki_file("ca.crt"),
            cert: self.pki_file("ops.crt"),
            key: self.pki_file("ops.key"),
        })
        .expect("client credentials");
        let endpoint = conn::client_endpoint(&creds, &TransportSettings::default(), addr)
            .expect("client endpoint");
        let hello = Hello {
            api_version: API_VERSION,
            role: PeerRole::Client,
            name: "ops".into(),
            software: "a test client".into(),
            lost_term: None,
        };
        let est = conn::dial(
            &endpoint,
            None,
            addr,
            "127.0.0.1",
            hello,
            PeerRole::Controller,
            None,
            Duration::from_secs(5),
        )
        .await
        .expect("the client connects");
        (endpoint, est.conn)
    }

    /// Runs the `drover` CLI with the certificate files `FILE.crt`/`FILE.key`.
    pub fn drover_as(&self, file: &str, controller: SocketAddr, args: &[&str]) -> CliOutput {
        let mut cmd = self.drover_command_as(file, controller);
        cmd.arg("--timeout").arg("10s").args(args);
        let out = run_cli(cmd, Duration::from_secs(30));
        if out.code == Some(0) {
            self.audited.expect(audit_kinds(args));
        }
        out
    }

    /// The list of successful changes checked at drop, for a helper that drives another
    /// client (zeek-client) to add to.
    pub fn audited(&self) -> Audited {
        self.audited.clone()
    }

    /// Stops checking the audit trail at drop: for a test that bounds the trail so
    /// tightly that rotation drops records on purpose.
    pub fn audit_trail_drops_records(&self) {
        self.audited.stop();
    }

    /// Checks that every mutating request made through [`Cluster::drover_as`] that
    /// succeeded is in an audit trail under the test dir (as many records of each kind,
    /// carried out, as successful requests of that kind at least).
    pub fn check_audited(&self) {
        let audited = self.audited.recorded();
        if audited.is_empty() {
            return;
        }
        let mut records = Vec::new();
        audit_records(self.dir.path(), 3, &mut records);
        let mut want = std::collections::BTreeMap::<&str, usize>::new();
        for kind in &audited {
            *want.entry(kind).or_default() += 1;
        }
        for (kind, n) in want {
            let found = records
                .iter()
                .filter(|r| r["what"] == kind && r["outcome"] != "refused")
                .count();
            assert!(
                found >= n,
                "{n} successful {kind} requests, but {found} carried-out {kind} records in the audit trails under {}",
                self.dir.path().display()
            );
        }
    }

    /// The `drover` CLI as client `ops` against `controller`, for a test to add its
    /// arguments and run as it needs (in the background, with its own timeout).
    pub fn drover_command(&self, controller: SocketAddr) -> Command {
        self.drover_command_as("ops", controller)
    }

    /// As [`Cluster::drover_command`], with the certificate files `FILE.crt`/`FILE.key`.
    pub fn drover_command_as(&self, file: &str, controller: SocketAddr) -> Command {
        let mut cmd = Command::new(bin("drover"));
        dies_with_its_test(&mut cmd);
        cmd.arg("--controller")
            .arg(controller.to_string())
            .arg("--ca")
            .arg(self.pki_file("ca.crt"))
            .arg("--cert")
            .arg(self.pki_file(&format!("{file}.crt")))
            .arg("--key")
            .arg(self.pki_file(&format!("{file}.key")));
        cmd
    }

    /// `drover logs NODE -n 0 -f --stream stdout`, running: the process, and the lines
    /// it prints as they come (a thread of its own reads them).
    pub fn follow_stdout(
        &self,
        controller: SocketAddr,
        node: &str,
    ) -> (Child, std::sync::mpsc::Receiver<String>) {
        let mut cmd = self.drover_command(controller);
        cmd.args(["logs", node, "-n", "0", "-f", "--stream", "stdout"]);
        spawn_reading_lines(cmd, |line| line)
    }

    /// `drover monitor` against `controller` with `extra` flags: the process and its
    /// events, one JSON value each, as they arrive.
    pub fn monitor(
        &self,
        controller: SocketAddr,
        extra: &[&str],
    ) -> (Child, std::sync::mpsc::Receiver<serde_json::Value>) {
        let mut cmd = self.drover_command(controller);
        cmd.arg("monitor").args(extra);
        spawn_reading_lines(cmd, |line| serde_json::from_str(&line).unwrap())
    }
}

/// Starts `cmd` and a thread that sends each line of its stdout, made into a `T` by
/// `parse`, until the output ends or the receiver is dropped.
fn spawn_reading_lines<T: Send + 'static>(
    mut cmd: Command,
    parse: impl Fn(String) -> T + Send + 'static,
) -> (Child, std::sync::mpsc::Receiver<T>) {
    use std::io::BufRead;
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(parse(line)).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

/// Kills every process whose working directory is under `dir`: the nodes of a test's
/// agents, which outlive agents killed with SIGKILL by design.
fn kill_processes_under(dir: &Path) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Kills what runs in the cgroup subtrees the agents of these logs said they use and
/// removes the subtrees (once their agents are gone), so that tests leave none behind.
/// Runs when the cluster is dropped, after the processes the test declared later.
fn remove_agent_cgroups(logs: &[PathBuf]) {
    for root in logged_paths(logs, "nodes are contained in cgroups cgroup=") {
        let nodes = root.join("nodes");
        let dirs = fs::read_dir(&nodes).into_iter().flatten().flatten();
        for d in dirs.filter(|d| d.file_type().is_ok_and(|t| t.is_dir())) {
            let _ = fs::write(d.path().join("cgroup.kill"), "1");
            // Killed processes take a moment to leave; no panic in a drop.
            for _ in 0..500 {
                if fs::remove_dir(d.path()).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // A node spawned just before its agent was killed may not have been moved out
        // of the agent's leaf yet, and the log keeper has a leaf of its own; the agents
        // are gone by now.
        for leaf in [root.join("agent"), root.join("keeper")] {
            let _ = fs::write(leaf.join("cgroup.kill"), "1");
            for _ in 0..500 {
                if fs::remove_dir(&leaf).is_ok() || !leaf.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for dir in [nodes, root] {
            let _ = fs::remove_dir(dir);
        }
    }
    remove_v1_cgroups(logs);
}

/// The paths that follow `mark` on the lines of these logs.
fn logged_paths(logs: &[PathBuf], mark: &str) -> std::collections::BTreeSet<PathBuf> {
    logs.iter()
        .filter_map(|l| fs::read_to_string(l).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| {
                    Some(PathBuf::from(
                        l.split(mark).nth(1)?.split_whitespace().next()?,
                    ))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// As [`remove_agent_cgroups`], for the cgroup v1 directories the agents made for node
/// limits (`<dir>` is `<subtree>/nodes`).
fn remove_v1_cgroups(logs: &[PathBuf]) {
    for nodes in logged_paths(logs, "node limits use cgroup v1 here dir=") {
        let cgroups = fs::read_dir(&nodes).into_iter().flatten().flatten();
        for d in cgroups.filter(|d| d.file_type().is_ok_and(|t| t.is_dir())) {
            // The nodes were killed through their v2 cgroups or process groups; a
            // moment may pass before they leave.
            for _ in 0..500 {
                if fs::remove_dir(d.path()).is_ok() || !d.path().exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = fs::remove_dir(&nodes);
        if let Some(subtree) = nodes.parent() {
            let _ = fs::remove_dir(subtree);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_processes_under(self.dir.path());
        // Every log in the test dir: also those of agents started without the helpers.
        let mut logs: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.extend(self.logs.borrow().iter().cloned());
        remove_agent_cgroups(&logs);
        if !std::thread::panicking() {
            self.check_audited();
        }
        if std::thread::panicking() {
            for log in self.logs.borrow().iter() {
                eprintln!("===== {} =====", log.display());
                eprintln!("{}", fs::read_to_string(log).unwrap_or_default());
            }
        }
        if std::env::var_os("DROVER_KEEP_TEST_DIR").is_some() {
            let path = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tmp")).keep();
            eprintln!("kept test dir {}", path.display());
        }
    }
}

/// A `drover` command running in the background (`logs -f`, `monitor`), its stdout
/// and stderr going to files of the test's directory; killed when dropped.
pub struct Background {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Background {
    /// Starts `drover ARGS` as client `ops` against `controllers` (one address, or a
    /// comma-separated group), writing to `NAME.out` and `NAME.err`.
    pub fn start(c: &Cluster, controllers: &str, args: &[&str], name: &str) -> Self {
        let (out, err) = (
            c.dir.path().join(format!("{name}.out")),
            c.dir.path().join(format!("{name}.err")),
        );
        let mut cmd = Command::new(bin("drover"));
        dies_with_its_test(&mut cmd);
        let child = cmd
            .arg("--controller")
            .arg(controllers)
            .arg("--ca")
            .arg(c.pki_file("ca.crt"))
            .arg("--cert")
            .arg(c.pki_file("ops.crt"))
            .arg("--key")
            .arg(c.pki_file("ops.key"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Self { child, out, err }
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Its exit status, once it has ended.
    pub fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes the process `cmd` starts die (SIGKILL) when the thread that starts it ends:
/// for clients that run until stopped (`monitor`, `logs -f`), which go on through a
/// controller's absence, waiting for one to answer, and so would outlive a test that
/// failed before it stopped them.
pub fn dies_with_its_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl(2) is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// What a CLI run printed.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Stdout parsed as JSON; panics with both streams otherwise.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs a command to completion, killing it after `limit` (a hang is a failure).
pub fn run_cli(mut cmd: Command, limit: Duration) -> CliOutput {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env("NO_COLOR", "1");
    let mut child = cmd.spawn().expect("spawn cli");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} hung for more than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    CliOutput {
        code: status.code(),
        stdout: out_t.join().expect("stdout thread"),
        stderr: err_t.join().expect("stderr thread"),
    }
}

/// The address after `addr=` in the last log line containing `marker`.
pub fn addr_in_log(log: &str, marker: &str) -> SocketAddr {
    log.lines()
        .rev()
        .find(|l| l.contains(marker))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address after '{marker}' in:\n{log}"))
}

/// Replaces what changes from run to run in JSON output: the number after every
/// `"pid": ` becomes `<pid>`, every UUID `<id>`.
pub fn canon_pids_and_ids(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("\"pid\": ") {
        let (head, tail) = rest.split_at(i + 7);
        out.push_str(head);
        let digits = tail.chars().take_while(char::is_ascii_digit).count();
        out.push_str("<pid>");
        rest = &tail[digits..];
    }
    out.push_str(rest);
    let chars: Vec<char> = out.chars().collect();
    let mut result = String::new();
    let mut i = 0;
    while i < chars.len() {
        // 8-4-4-4-12 hex digits
        let candidate: String = chars[i..chars.len().min(i + 36)].iter().collect();
        let is_uuid = candidate.len() == 36
            && candidate.char_indices().all(|(j, ch)| {
                if [8, 13, 18, 23].contains(&j) {
                    ch == '-'
                } else {
                    ch.is_ascii_hexdigit()
                }
            });
        if is_uuid {
            result.push_str("<id>");
            i += 36;
        } else {
            result.push(chars[i]);
            i += 1;
        }
    }
    result
}

/// An agent with a real certificate (`mute`, issued here) and a real connection to the
/// controller at `addr` that accepts every request and answers none. It goes away
/// when dropped.
pub struct MuteAgent {
    /// Held so the connection lives; closed on drop.
    endpoint: quinn::Endpoint,
    /// The type of each request received, in order: what a test waits for before it
    /// changes the scene.
    received: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl MuteAgent {
    /// Connects, on `rt`, once the controller welcomed it.
    pub fn connect(c: &Cluster, addr: SocketAddr, rt: &tokio::runtime::Runtime) -> Self {
        use drover_net::conn::{self, TransportSettings};
        use drover_net::{Credentials, TlsFiles};
        use drover_proto::msg::{API_VERSION, ControllerRequest, Hello, Request, WireError};
        if !c.pki_file("mute.crt").exists() {
            c.issue(PeerRole::Agent, "mute");
        }
        let creds = Credentials::load(&TlsFiles {
            ca: c.pki_file("ca.crt"),
            cert: c.pki_file("mute.crt"),
            key: c.pki_file("mute.key"),
        })
        .expect("mute agent credentials");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        let endpoint = rt.block_on(async {
            let settings = TransportSettings::default();
            let endpoint = conn::client_endpoint(&creds, &settings, addr).expect("endpoint");
            let hello = Hello {
                api_version: API_VERSION,
                role: PeerRole::Agent,
                name: "mute".into(),
                software: "a mute agent".into(),
                lost_term: None,
            };
            let est = conn::dial(
                &endpoint,
                None,
                addr,
                "127.0.0.1",
                hello,
                PeerRole::Controller,
                None,
                Duration::from_secs(5),
            )
            .await
            .expect("the mute agent connects");
            tokio::spawn(conn::serve(
                est.conn,
                settings,
                move |req: Request<ControllerRequest>| {
                    let kind = serde_json::to_value(&req.body)
                        .ok()
                        .and_then(|v| v["type"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    log.lock().expect("request log").push(kind);
                    std::future::pending::<Result<(), WireError>>()
                },
            ));
            endpoint
        });
        Self { endpoint, received }
    }

    /// The type of each request received so far (`apply`, `stop`, ...), in order.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().expect("request log").clone()
    }
}

impl Drop for MuteAgent {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"");
    }
}

/// A TCP address on 127.0.0.1 that was free a moment ago (for metrics listeners).
pub fn free_tcp() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_tcp_ports(1)[0]))
}

/// `count` distinct TCP ports on 127.0.0.1 that were free a moment ago: all are held at
/// once while they are picked, so that the kernel cannot hand out one twice (an etcd
/// cluster given one URL for two members does not start).
pub fn free_tcp_ports(count: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// The page a daemon's metrics listener at `addr` serves (`GET /metrics`), headers
/// included.
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("a metrics request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("a metrics page");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// The value of one series (name and labels exactly as printed) on a metrics page.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A hex mask line (`SigIgn:`, `SigBlk:`, `CapAmb:` …) of `/proc/<pid>/status`; `None`
/// when the process or the line is not there.
pub fn status_mask(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find_map(|l| l.strip_prefix(field))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    free_udp_ports(1)[0]
}

/// `count` distinct UDP ports on 127.0.0.1 that were free a moment ago, all held at once
/// while picked so that none is handed out twice.
pub fn free_udp_ports(count: usize) -> Vec<u16> {
    let held: Vec<std::net::UdpSocket> = (0..count)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    held.iter()
        .map(|s| s.local_addr().expect("a bound address").port())
        .collect()
}

/// Validity that ended yesterday.
pub fn expired() -> Validity {
    let now = time::OffsetDateTime::now_utc();
    Validity {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
    }
}

/// True while process `pid` exists and is not a zombie (an adopted node's process that
/// ended is reaped by whoever inherited it, not by the agent).
pub fn alive(pid: impl std::fmt::Display) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}
