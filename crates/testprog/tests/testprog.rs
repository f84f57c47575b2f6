//! End-to-end tests of `drover-testprog`, run as a real process.
//!
//! Nothing here sleeps to synchronise: tests poll for a condition with a
//! deadline. Every process a test starts, grandchildren included, is killed
//! when its [`Proc`] guard drops.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_drover-testprog");
const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms until it holds, failing the test after 10 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every 10 ms until it returns `Some`, failing after 10 s.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut found = None;
    wait_until(what, || {
        found = f();
        found.is_some()
    });
    found.expect("set when the wait ended")
}

fn testprog(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("DROVER_QUERY_SOCKET");
    command
}

/// Runs a program expected to exit on its own, with a deadline.
fn run_to_exit(command: &mut Command) -> Output {
    let mut proc = Proc::spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let mut stdout = proc.child.stdout.take().expect("piped");
    let mut stderr = proc.child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).map(|_| buf)
    });
    let status = proc.wait_exit();
    Output {
        status,
        stdout: out.join().unwrap().unwrap(),
        stderr: err.join().unwrap().unwrap(),
    }
}

/// A started `drover-testprog`, killed with its whole process group and any
/// listed grandchildren when dropped.
struct Proc {
    child: Child,
    children_file: Option<PathBuf>,
}

impl Proc {
    /// Spawns `command` as the leader of a new process group.
    fn spawn(command: &mut Command) -> Self {
        let child = command
            .process_group(0)
            .spawn()
            .expect("spawn drover-testprog");
        Self {
            child,
            children_file: None,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("send signal");
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("the process to exit", || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.expect("set when the wait ended")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Grandchildren in their own session are out of our process group.
        if let Some(file) = &self.children_file {
            for pid in read_pids(file).unwrap_or_default() {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_pids(file: &Path) -> io::Result<Vec<Pid>> {
    Ok(fs::read_to_string(file)?
        .lines()
        .map(|line| Pid::from_raw(line.parse().expect("a pid per line")))
        .collect())
}

/// Fields of `/proc/PID/stat` after the command name: state, ppid, pgrp, session.
fn proc_stat(pid: Pid) -> Option<(char, i32, i32, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let mut number = || fields.next()?.parse().ok();
    Some((state, number()?, number()?, number()?))
}

fn session(pid: Pid) -> i32 {
    proc_stat(pid).expect("process exists").3
}

fn is_gone_or_zombie(pid: Pid) -> bool {
    proc_stat(pid).is_none_or(|(state, ..)| matches!(state, 'Z' | 'X'))
}

/// Sends one request line and returns the raw response.
fn query_raw(socket: &Path, request: &[u8]) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.write_all(request)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn query(socket: &Path, id: &str) -> io::Result<Value> {
    let request = format!("{}\n", json!({ "id": id }));
    let response = query_raw(socket, request.as_bytes())?;
    assert!(
        response.ends_with('\n'),
        "response {response:?} is one line"
    );
    Ok(serde_json::from_str(&response).expect("response is JSON"))
}

/// Waits until the query server answers, then returns the answer for `id`.
fn wait_query(socket: &Path, id: &str) -> Value {
    wait_for("the query server to answer", || query(socket, id).ok())
}

fn query_env(dir: &TempDir) -> (PathBuf, impl FnOnce(&mut Command) -> &mut Command) {
    let socket = dir.path().join("query.sock");
    let for_command = socket.clone();
    (socket, move |command: &mut Command| {
        command.env("DROVER_QUERY_SOCKET", for_command)
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn crash_at_start_exits_3_with_message() {
    let output = run_to_exit(&mut testprog(&["--crash-at-start"]));
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("testprog: crashing at start as asked"),
        "stderr: {stderr}"
    );
}

#[test]
fn crash_at_start_honours_exit_code() {
    let output = run_to_exit(&mut testprog(&["--crash-at-start", "--exit-code", "42"]));
    assert_eq!(output.status.code(), Some(42));
}

#[test]
fn exit_after_with_exit_code() {
    let output = run_to_exit(&mut testprog(&[
        "--exit-after",
        "100ms",
        "--exit-code",
        "7",
    ]));
    assert_eq!(output.status.code(), Some(7));
    let output = run_to_exit(&mut testprog(&["--exit-after", "0"]));
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn print_and_eprint() {
    let output = run_to_exit(&mut testprog(&[
        "--print",
        "hello out",
        "--eprint",
        "hello err",
        "--exit-after",
        "0",
    ]));
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello out\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "hello err\n");
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (args, named) in [
        (&["--bogus"][..], "--bogus"),
        (&["--exit-after", "5x"][..], "--exit-after"),
        (&["--ready-after"][..], "--ready-after"),
        (&["--value", "x={"][..], "--value"),
        (&["--spawn-children", "-1"][..], "--spawn-children"),
    ] {
        let output = run_to_exit(&mut testprog(args));
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(named),
            "{args:?}: stderr {stderr:?} names {named}"
        );
    }
}

fn recv_datagram(socket: &UnixDatagram) -> String {
    let mut buf = [0; 1024];
    let len = socket
        .recv(&mut buf)
        .expect("a notification within the deadline");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[test]
fn ready_after_sends_ready_to_notify_socket() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let _proc = Proc::spawn(
        testprog(&["--status", "starting", "--ready-after", "100ms"]).env("NOTIFY_SOCKET", &path),
    );
    assert_eq!(recv_datagram(&socket), "STATUS=starting\n");
    assert_eq!(recv_datagram(&socket), "READY=1\nSTATUS=ready\n");
}

#[test]
fn ready_after_supports_abstract_notify_socket() {
    let name = format!(
        "drover-testprog-test-{}-{:?}",
        std::process::id(),
        Instant::now()
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let _proc =
        Proc::spawn(testprog(&["--ready-after", "0"]).env("NOTIFY_SOCKET", format!("@{name}")));
    assert_eq!(recv_datagram(&socket), "READY=1\nSTATUS=ready\n");
}

#[test]
fn listen_accepts_tcp_connections() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut proc = Proc::spawn(&mut testprog(&[
        "--listen",
        &addr,
        "--listen-after",
        "50ms",
    ]));
    let mut stream = wait_for("the listener", || TcpStream::connect(&addr).ok());
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut greeting = String::new();
    stream.read_to_string(&mut greeting).unwrap();
    assert_eq!(greeting, "drover-testprog\n");
    // A second connection is served too.
    let mut greeting = String::new();
    TcpStream::connect(&addr)
        .unwrap()
        .read_to_string(&mut greeting)
        .unwrap();
    assert_eq!(greeting, "drover-testprog\n");
    assert!(proc.is_running());
}

#[test]
fn value_queries() {
    let dir = TempDir::new().unwrap();
    let (socket, with_socket) = query_env(&dir);
    // A stale socket file is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut command = testprog(&[
        "--value",
        "answer=42",
        "--value",
        r#"config={"name": "web", "ports": [80, 443]}"#,
        "--value",
        r#"env.OVERRIDDEN="from --value""#,
    ]);
    with_socket(&mut command)
        .env("DROVER_NODE", "node-1")
        .env("TESTPROG_VAR", "some value")
        .env_remove("TESTPROG_UNSET");
    let proc = Proc::spawn(&mut command);

    assert_eq!(wait_query(&socket, "answer"), json!({"value": 42}));
    assert_eq!(
        query(&socket, "config").unwrap(),
        json!({"value": {"name": "web", "ports": [80, 443]}})
    );
    assert_eq!(
        query(&socket, "pid").unwrap(),
        json!({"value": proc.child.id()})
    );
    assert_eq!(query(&socket, "node").unwrap(), json!({"value": "node-1"}));
    assert_eq!(
        query(&socket, "env.TESTPROG_VAR").unwrap(),
        json!({"value": "some value"})
    );
    assert_eq!(
        query(&socket, "env.TESTPROG_UNSET").unwrap(),
        json!({"value": null})
    );
    assert_eq!(
        query(&socket, "env.OVERRIDDEN").unwrap(),
        json!({"value": "from --value"})
    );
    let args = query(&socket, "args").unwrap();
    assert_eq!(args["value"][1], json!("--value"));
    assert_eq!(args["value"][2], json!("answer=42"));
    assert_eq!(
        query(&socket, "nope").unwrap(),
        json!({"error": "unknown identifier 'nope'"})
    );
    for bad in [&b"not json\n"[..], b"{\"name\": \"pid\"}\n", b"\n", b""] {
        let response = query_raw(&socket, bad).unwrap();
        let response: Value = serde_json::from_str(&response).unwrap();
        let message = response["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("bad request: "),
            "{bad:?} got {response}"
        );
    }
}

#[test]
fn silent_query_client_does_not_block_others() {
    let dir = TempDir::new().unwrap();
    let (socket, with_socket) = query_env(&dir);
    let _proc = Proc::spawn(with_socket(&mut testprog(&[])));
    wait_query(&socket, "pid");
    let silent = UnixStream::connect(&socket).unwrap();
    let started = Instant::now();
    assert!(query(&socket, "pid").unwrap()["value"].is_number());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a silent client held up a query"
    );
    drop(silent);
}

#[test]
fn sigterm_kills_by_default() {
    let dir = TempDir::new().unwrap();
    let (socket, with_socket) = query_env(&dir);
    let mut proc = Proc::spawn(with_socket(&mut testprog(&[])));
    wait_query(&socket, "pid");
    proc.signal(Signal::SIGTERM);
    assert_eq!(proc.wait_exit().signal(), Some(Signal::SIGTERM as i32));
}

/// Whether `/proc/PID/status` says the process ignores `signal`.
fn ignores(pid: Pid, signal: Signal) -> Option<bool> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))?;
    let mask = u64::from_str_radix(mask.trim(), 16).ok()?;
    Some(mask & (1 << (signal as u32 - 1)) != 0)
}

#[test]
fn ignore_sigterm_survives_sigterm_then_dies_on_sigkill() {
    let dir = TempDir::new().unwrap();
    let (socket, with_socket) = query_env(&dir);
    let mut proc = Proc::spawn(with_socket(&mut testprog(&["--ignore-sigterm"])));
    let pid = wait_query(&socket, "pid");
    proc.signal(Signal::SIGTERM);
    proc.signal(Signal::SIGTERM);
    assert_eq!(ignores(proc.pid(), Signal::SIGTERM), Some(true));
    // Answering after SIGTERM was sent proves it was ignored.
    assert_eq!(query(&socket, "pid").unwrap(), pid);
    assert!(proc.is_running());
    proc.signal(Signal::SIGKILL);
    assert_eq!(proc.wait_exit().signal(), Some(Signal::SIGKILL as i32));
}

#[test]
fn term_exit_code_exits_cleanly_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let (socket, with_socket) = query_env(&dir);
    let mut proc = Proc::spawn(with_socket(&mut testprog(&["--term-exit-code", "9"])));
    wait_query(&socket, "pid");
    proc.signal(Signal::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(9));
}

#[test]
fn spawn_children_with_setsid_leave_the_session() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("children");
    let mut proc = Proc::spawn(&mut testprog(&[
        "--spawn-children",
        "2",
        "--setsid",
        "--children-file",
        file.to_str().unwrap(),
    ]));
    proc.children_file = Some(file.clone());
    wait_until("the children file", || file.exists());
    let pids = read_pids(&file).unwrap();
    assert_eq!(pids.len(), 2);
    let parent_session = session(proc.pid());
    for pid in pids {
        // Each child calls setsid() at startup, so it leads a new session.
        wait_until("the child to start its own session", || {
            session(pid) == pid.as_raw()
        });
        assert_ne!(session(pid), parent_session);
        let (_, ppid, pgrp, _) = proc_stat(pid).unwrap();
        assert_eq!(ppid, proc.pid().as_raw());
        assert_eq!(pgrp, pid.as_raw());
    }
    assert!(proc.is_running());
}

#[test]
fn spawn_children_without_setsid_share_the_group_and_die_on_sigterm() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("children");
    // The parent ignores SIGTERM; its children must not inherit that.
    let mut proc = Proc::spawn(&mut testprog(&[
        "--ignore-sigterm",
        "--spawn-children",
        "3",
        "--children-file",
        file.to_str().unwrap(),
    ]));
    proc.children_file = Some(file.clone());
    wait_until("the children file", || file.exists());
    let pids = read_pids(&file).unwrap();
    assert_eq!(pids.len(), 3);
    let (_, _, parent_group, parent_session) = proc_stat(proc.pid()).unwrap();
    for &pid in &pids {
        let (_, ppid, pgrp, session) = proc_stat(pid).unwrap();
        assert_eq!(
            (ppid, pgrp, session),
            (proc.pid().as_raw(), parent_group, parent_session)
        );
    }
    // A child inherits the ignored SIGTERM through fork and exec, and
    // restores the default action at startup; then SIGTERM must kill it.
    for &pid in &pids {
        wait_until("the child to restore SIGTERM", || {
            ignores(pid, Signal::SIGTERM) == Some(false)
        });
    }
    killpg(proc.pid(), Signal::SIGTERM).unwrap();
    for &pid in &pids {
        wait_until("the child to die of SIGTERM", || is_gone_or_zombie(pid));
    }
    assert!(proc.is_running());
}

/// Starts a reader thread on `stream` that sends each line down a channel.
fn line_reader(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

#[test]
fn output_rates_with_a_line_cap() {
    let mut proc = Proc::spawn(
        testprog(&[
            "--stdout-rate",
            "100",
            "--stderr-rate",
            "50",
            "--lines",
            "5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped()),
    );
    let pid = proc.child.id();
    let stdout = line_reader(proc.child.stdout.take().unwrap());
    let stderr = line_reader(proc.child.stderr.take().unwrap());
    for (lines, name) in [(&stdout, "stdout"), (&stderr, "stderr")] {
        for seq in 1..=5 {
            let line = lines.recv_timeout(DEADLINE).expect("a line");
            assert_eq!(line, format!("testprog {pid} {name} line {seq}"));
        }
    }
    // At 100 lines/s, 30 more would have come in this time without the cap.
    assert!(stdout.recv_timeout(Duration::from_millis(300)).is_err());
    assert!(stderr.try_recv().is_err());
    assert!(proc.is_running());
}

fn has_thread(pid: u32, name: &str) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name)
    })
}

#[test]
fn broken_stdout_pipe_stops_writing_but_not_the_program() {
    let dir = TempDir::new().unwrap();
    let (socket, with_socket) = query_env(&dir);
    let mut proc =
        Proc::spawn(with_socket(&mut testprog(&["--stdout-rate", "200"])).stdout(Stdio::piped()));
    let pid = proc.child.id();
    let mut stdout = BufReader::new(proc.child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, format!("testprog {pid} stdout line 1\n"));
    assert!(has_thread(pid, "stdout-writer"));
    drop(stdout);
    wait_until("the writer to stop on EPIPE", || {
        !has_thread(pid, "stdout-writer")
    });
    assert!(proc.is_running());
    assert_eq!(query(&socket, "pid").unwrap(), json!({"value": pid}));
}
