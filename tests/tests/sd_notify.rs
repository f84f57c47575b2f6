//! systemd's notification protocol with the real daemons: each is started with
//! `NOTIFY_SOCKET` pointing at a datagram socket the test binds (a path, or an abstract
//! name), as systemd does for `Type=notify` units, and the test reads what arrives:
//! `READY=1` once the daemon serves (the agent: after adopting the nodes it found),
//! `WATCHDOG=1` every half of `WATCHDOG_USEC` (and none when `WATCHDOG_PID` names another
//! process), `STOPPING=1` on SIGTERM. Nodes never see the agent's socket, only their own.
//!
//! The example daemon configurations of `deploy/config` are loaded by the real daemons
//! here too, every commented key included.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drover_proto::msg::PeerRole;
use drover_tests::{Cluster, PATIENCE, Proc, addr_in_log, bin, eventually};
use nix::sys::signal::Signal;

/// A socket in systemd's place, and every datagram it received, with arrival times.
struct NotifySocket {
    sock: UnixDatagram,
    /// The value of `NOTIFY_SOCKET` that reaches it.
    value: String,
    seen: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind_path(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        Self {
            sock,
            value: path.to_str().expect("utf-8 path").to_owned(),
            seen: Vec::new(),
        }
    }

    fn bind_abstract(name: &str) -> Self {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
        Self {
            sock,
            value: format!("@{name}"),
            seen: Vec::new(),
        }
    }

    /// Receives one datagram, waiting until `deadline` at most.
    fn recv_until(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.sock.set_read_timeout(Some(left)).expect("timeout");
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push((Instant::now(), msg));
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Reads what is already queued, without waiting.
    fn drain(&mut self) {
        self.sock.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push((Instant::now(), msg));
        }
        self.sock.set_nonblocking(false).expect("blocking");
    }

    /// Arrival times of the datagrams holding the line `line`.
    fn arrivals(&self, line: &str) -> Vec<Instant> {
        self.seen
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Waits until `count` datagrams held `line`; returns their arrival times. Fails at
    /// once when `sender` has exited.
    fn expect_n(&mut self, line: &str, count: usize, sender: &Proc) -> Vec<Instant> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let arrivals = self.arrivals(line);
            if arrivals.len() >= count {
                return arrivals;
            }
            let slice = deadline.min(Instant::now() + Duration::from_millis(200));
            if !self.recv_until(slice) {
                if exited(sender.pid()) {
                    // What it sent before it ended is queued already.
                    self.drain();
                    let arrivals = self.arrivals(line);
                    assert!(
                        arrivals.len() >= count,
                        "{} exited before sending {count} x {line:?}; received: {:?}",
                        sender.name,
                        self.lines()
                    );
                    return arrivals;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out after {PATIENCE:?} waiting for {count} x {line:?} on {}; received: {:?}",
                    self.value,
                    self.lines()
                );
            }
        }
    }

    /// Waits for `line` from `sender`; returns when it first arrived.
    fn expect(&mut self, line: &str, sender: &Proc) -> Instant {
        self.expect_n(line, 1, sender)[0]
    }

    /// Every line received so far, in order.
    fn lines(&self) -> Vec<&str> {
        self.seen.iter().flat_map(|(_, m)| m.lines()).collect()
    }
}

/// Whether the process `pid` (our child, not yet reaped) has ended.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Prints the logs of processes the harness did not start when a test fails.
struct ShowLogs(Vec<PathBuf>);

impl Drop for ShowLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.0 {
                eprintln!("===== {} =====", log.display());
                eprintln!("{}", std::fs::read_to_string(log).unwrap_or_default());
            }
        }
    }
}

/// A command for a daemon with systemd's variables: `NOTIFY_SOCKET` from `sock`, the
/// watchdog ones as given, none inherited from whoever runs the tests.
fn daemon(name: &str, sock: &NotifySocket, watchdog: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin(name));
    cmd.env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("NOTIFY_SOCKET", &sock.value)
        .envs(watchdog.iter().copied());
    cmd
}

fn controller_cmd(c: &Cluster, mut cmd: Command) -> Command {
    c.controller_args(&mut cmd, "127.0.0.1:0");
    cmd
}

fn agent_cmd(c: &Cluster, mut cmd: Command, name: &str, controller: SocketAddr) -> Command {
    c.agent_args(
        &mut cmd,
        name,
        name,
        &["--controller", &controller.to_string()],
    );
    cmd
}

/// The address in the controller's "controller listening" log line.
fn listening_addr(log: &str) -> SocketAddr {
    addr_in_log(log, "controller listening")
}

#[test]
fn controller_notifies_ready_pings_the_watchdog_and_notifies_stopping() {
    let c = Cluster::new();
    let mut sock = NotifySocket::bind_path(&c.dir.path().join("notify-controller.sock"));
    let log = c.dir.path().join("controller.log");
    let _show = ShowLogs(vec![log.clone()]);
    let cmd = daemon("drover-controller", &sock, &[("WATCHDOG_USEC", "1000000")]);
    let mut controller = Proc::spawn("controller", controller_cmd(&c, cmd), log);

    sock.expect("READY=1", &controller);
    // READY comes once the endpoint serves: the line saying so is already logged, and a
    // client is answered.
    let addr = listening_addr(&controller.log_text());
    assert!(
        sock.lines()
            .contains(&format!("STATUS=listening on {addr}").as_str()),
        "{:?}",
        sock.lines()
    );
    let out = c.drover(addr, &["get-instances"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    controller.wait_log("systemd watchdog: 1s timeout, pinging every 500ms");

    // WATCHDOG_USEC=1000000: a ping every 500 ms. Four pings span three intervals,
    // 1.5 s; within 3 s means at least one ping per watchdog timeout on average.
    let pings = sock.expect_n("WATCHDOG=1", 4, &controller);
    let span = pings[3] - pings[0];
    assert!(
        span < Duration::from_secs(3),
        "4 watchdog pings took {span:?} with WATCHDOG_USEC=1000000"
    );

    controller.signal(Signal::SIGTERM);
    let stopping = sock.expect("STOPPING=1", &controller);
    let status = controller.wait_exit(PATIENCE);
    assert!(status.success(), "controller exit: {status:?}");
    sock.drain();
    let ready = sock.arrivals("READY=1");
    assert_eq!(ready.len(), 1, "READY=1 exactly once: {:?}", sock.lines());
    assert!(ready[0] < stopping, "{:?}", sock.lines());
    for line in sock.lines() {
        assert!(
            ["READY=1", "STOPPING=1", "WATCHDOG=1"].contains(&line) || line.starts_with("STATUS="),
            "unexpected notification {line:?}"
        );
    }
}

#[test]
fn agent_notifies_ready_after_adoption_and_keeps_its_socket_from_nodes() {
    let c = Cluster::new();
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    let connections = || {
        controller
            .log_text()
            .matches("agent 'agent-1' connected")
            .count()
    };
    // A node started by a first agent, which then dies and leaves it running.
    let mut first = c.start_agent("agent-1", addr);
    eventually("agent-1 connected", PATIENCE, || {
        (connections() == 1).then_some(())
    });
    let prog = bin("drover-testprog");
    let file = c.dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n\
             [nodes.w1]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--ready-after\", \"0s\"]\n\
             readiness = {{ kind = \"notify\", timeout = \"20s\" }}\n",
            p = prog.display()
        ),
    )
    .unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let pid = |c: &Cluster| {
        let v = c.drover(addr, &["get-nodes"]).json();
        let n = &v["results"]["agent-1"]["w1"];
        (n["state"] == "RUNNING")
            .then(|| n["pid"].as_u64())
            .flatten()
    };
    let old_pid = eventually("w1 running", PATIENCE, || pid(&c));
    first.kill();

    // The agent under "systemd", on an abstract socket; its watchdog is for another
    // process (WATCHDOG_PID=1), so it must not ping.
    let mut sock = NotifySocket::bind_abstract(&format!(
        "drover-test-notify-{}-{}",
        std::process::id(),
        old_pid
    ));
    let log = c.dir.path().join("agent-systemd.log");
    let _show = ShowLogs(vec![log.clone()]);
    let cmd = daemon(
        "drover-agent",
        &sock,
        &[("WATCHDOG_USEC", "1000000"), ("WATCHDOG_PID", "1")],
    );
    let mut agent = Proc::spawn("agent-1", agent_cmd(&c, cmd, "agent-1", addr), log);
    sock.expect("READY=1", &agent);
    let text = agent.log_text();
    assert!(
        text.contains("adopted running node"),
        "READY=1 before the node was adopted:\n{text}"
    );
    assert!(
        !text.contains("systemd watchdog"),
        "a watchdog for WATCHDOG_PID=1:\n{text}"
    );
    assert!(
        sock.lines()
            .contains(&format!("STATUS=dialling the controller at {addr}").as_str()),
        "{:?}",
        sock.lines()
    );
    eventually("the new agent connected", PATIENCE, || {
        (connections() == 2).then_some(())
    });
    assert_eq!(
        eventually("w1 reported by the new agent", PATIENCE, || pid(&c)),
        old_pid,
        "the node was adopted, not restarted"
    );

    // A node this agent starts gets its own NOTIFY_SOCKET (it becomes RUNNING through
    // it), and its READY=1 and STATUS=ready never reach the agent's socket.
    let out = c.drover(addr, &["restart", "w1"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let new_pid = eventually("w1 running again", PATIENCE, || {
        pid(&c).filter(|&p| p != old_pid)
    });
    let node_env = |var: &str| {
        let v = c
            .drover(addr, &["get-id-value", &format!("env.{var}"), "w1"])
            .json();
        v["results"]["w1"].clone()
    };
    let node_socket = node_env("NOTIFY_SOCKET");
    let expected = c
        .dir
        .path()
        .join("agent-agent-1/nodes/w1/notify.sock")
        .canonicalize()
        .expect("the node's notify socket exists");
    assert_eq!(
        node_socket.as_str().map(PathBuf::from),
        Some(expected),
        "node {new_pid} sees NOTIFY_SOCKET={node_socket}"
    );
    assert_eq!(node_env("WATCHDOG_USEC"), serde_json::Value::Null);

    agent.signal(Signal::SIGTERM);
    sock.expect("STOPPING=1", &agent);
    let status = agent.wait_exit(PATIENCE);
    assert!(status.success(), "agent exit: {status:?}");
    sock.drain();
    let lines = sock.lines();
    assert_eq!(sock.arrivals("READY=1").len(), 1, "{lines:?}");
    assert!(
        !lines.contains(&"WATCHDOG=1") && !lines.contains(&"STATUS=ready"),
        "{lines:?}"
    );
}

/// `deploy/config/NAME.toml` with every commented `key = value` line made live, paths
/// moved into the test's directory, addresses made local, and `edit` applied per key.
fn live_example(name: &str, mut edit: impl FnMut(&str, &str) -> Option<String>) -> (String, usize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/config/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut out = String::new();
    let mut keys = 0;
    for line in text.lines() {
        let live = line.strip_prefix("# ").unwrap_or(line);
        let Some((key, value)) = live.split_once(" = ") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        if !key.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        keys += 1;
        let value = edit(key, value).unwrap_or_else(|| value.to_owned());
        out.push_str(&format!("{key} = {value}\n"));
    }
    (out, keys)
}

#[test]
fn example_daemon_configs_load_with_every_key() {
    let c = Cluster::new();
    let etc = c.dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("deny.list"), "").unwrap();
    std::fs::write(etc.join("zeek-roles.toml"), "").unwrap();
    let relocate = |value: &str| {
        let v = value
            .replace("/etc/drover/pki/", &format!("{}/", c.pki.display()))
            .replace("/etc/drover/", &format!("{}/", etc.display()))
            .replace("/var/lib/drover/", &format!("{}/", c.dir.path().display()));
        (v != value).then_some(v)
    };
    let mut logs = ShowLogs(Vec::new());

    let (text, keys) = live_example("controller.toml", |key, value| match key {
        "listen" | "metrics_listen" | "zeek_websocket" => Some("\"127.0.0.1:0\"".into()),
        _ => relocate(value),
    });
    assert!(keys >= 12, "controller.toml shows {keys} keys:\n{text}");
    let file = c.dir.path().join("controller.toml");
    std::fs::write(&file, &text).unwrap();
    let mut sock = NotifySocket::bind_path(&c.dir.path().join("notify-controller.sock"));
    let log = c.dir.path().join("controller.log");
    logs.0.push(log.clone());
    let mut cmd = daemon("drover-controller", &sock, &[]);
    cmd.arg("--config").arg(&file);
    let controller = Proc::spawn("controller", cmd, log);
    sock.expect("READY=1", &controller);
    let addr = listening_addr(&controller.log_text());
    assert!(
        c.dir.path().join("controller").is_dir(),
        "state_dir from the file"
    );

    let mut agent_name = String::new();
    let (text, keys) = live_example("agent.toml", |key, value| match key {
        "name" => {
            agent_name = value.trim_matches('"').to_owned();
            None
        }
        "controller" => Some(format!("\"{addr}\"")),
        "listen" | "metrics_listen" => Some("\"127.0.0.1:0\"".into()),
        _ => relocate(value),
    });
    assert!(keys >= 15, "agent.toml shows {keys} keys:\n{text}");
    assert!(!agent_name.is_empty(), "agent.toml names no agent");
    c.issue(PeerRole::Agent, &agent_name);
    let file = c.dir.path().join("agent.toml");
    std::fs::write(&file, &text).unwrap();
    let mut sock = NotifySocket::bind_path(&c.dir.path().join("notify-agent.sock"));
    let log = c.dir.path().join("agent.log");
    logs.0.push(log.clone());
    let mut cmd = daemon("drover-agent", &sock, &[]);
    cmd.arg("--config").arg(&file);
    let agent = Proc::spawn("agent", cmd, log);
    sock.expect("READY=1", &agent);
    controller.wait_log(&format!("agent '{agent_name}' connected"));
    assert!(
        agent.log_text().contains("listening for the controller"),
        "listen from the file"
    );
    assert!(
        c.dir.path().join("agent").is_dir(),
        "state_dir from the file"
    );
}
