//! The agent's supervisor with real processes (the test program), in-process: launch
//! environment, readiness, restart policy and backoff, stop escalation, grandchildren,
//! idempotent apply, outputs of failed starts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use drover_agent::logs::LogConfig;
use drover_agent::supervisor::{Op, Supervisor, SupervisorConfig};
use drover_proto::config::parse_toml;
use drover_proto::model::{NodeStatus, ResultData, State};
use drover_tests::bin;

struct World {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    sup: Supervisor,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sup = rt.block_on(async {
            Supervisor::start(SupervisorConfig {
                instance: "agent-1".into(),
                state_dir: dir.path().to_owned(),
                logs: LogConfig::default(),
                cgroup: Default::default(),
            })
            .unwrap()
        });
        Self { dir, rt, sup }
    }

    /// Applies a cluster file body (instances declared for you) and returns the results.
    fn apply(&self, nodes_toml: &str) -> Vec<drover_proto::MgmtResult> {
        self.apply_id(None, nodes_toml)
    }

    /// As [`World::apply`] with a configuration id.
    fn apply_id(&self, id: Option<&str>, nodes_toml: &str) -> Vec<drover_proto::MgmtResult> {
        let id = id.map(|i| format!("id = \"{i}\"\n")).unwrap_or_default();
        let text = format!("{id}[instances.agent-1]\n{nodes_toml}");
        let config = parse_toml("test.toml", &text).unwrap_or_else(|e| panic!("{e}"));
        self.rt.block_on(
            self.sup
                .apply(config, false, Instant::now() + Duration::from_secs(20)),
        )
    }

    fn act(&self, op: Op, nodes: &[&str]) -> Vec<drover_proto::MgmtResult> {
        let nodes = nodes.iter().map(|s| (*s).to_owned()).collect();
        self.rt.block_on(
            self.sup
                .act(op, nodes, Instant::now() + Duration::from_secs(20)),
        )
    }

    fn status(&self) -> BTreeMap<String, NodeStatus> {
        self.rt
            .block_on(self.sup.status())
            .into_iter()
            .map(|s| (s.node.clone(), s))
            .collect()
    }

    fn node(&self, name: &str) -> NodeStatus {
        self.status()
            .remove(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn wait(&self, what: &str, mut f: impl FnMut(&NodeStatus) -> bool, name: &str) -> NodeStatus {
        drover_tests::eventually(what, drover_tests::PATIENCE, || {
            let s = self.node(name);
            f(&s).then_some(s)
        })
    }

    fn node_dir(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("nodes").join(name)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.rt.block_on(self.sup.shutdown(true));
    }
}

fn prog() -> String {
    bin("drover-testprog").display().to_string()
}

fn query(sock: &Path, id: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    writeln!(s, "{{\"id\":\"{id}\"}}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[test]
fn launch_gives_a_clean_env_workdir_process_group_and_affinity() {
    let w = World::new();
    let r = w.apply(&format!(
        "[nodes.w1]\ninstance = \"agent-1\"\nrole = \"worker\"\ncommand = [\"{}\"]\nenv = {{ FOO = \"bar\" }}\ncpu_affinity = 0\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        prog()
    ));
    assert!(r.iter().all(|r| r.success), "{r:?}");
    let s = w.wait("running", |s| s.state == State::Running, "w1");
    let pid = s.pid.unwrap();
    let sock = w.node_dir("w1").join("query.sock");
    drover_tests::eventually("query socket listening", drover_tests::PATIENCE, || {
        // The file exists from the bind; connections succeed from the listen.
        UnixStream::connect(&sock).ok().map(drop)
    });
    assert_eq!(query(&sock, "env.FOO")["value"], "bar");
    assert_eq!(query(&sock, "env.DROVER_NODE")["value"], "w1");
    assert_eq!(query(&sock, "env.DROVER_INSTANCE")["value"], "agent-1");
    assert_eq!(query(&sock, "env.DROVER_ROLE")["value"], "worker");
    assert!(
        query(&sock, "env.HOME")["value"].is_null(),
        "clean environment"
    );
    assert_eq!(query(&sock, "pid")["value"], pid);
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, w.node_dir("w1").join("work"));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let pgrp: u32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgrp, pid, "own process group");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cpus = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))
        .unwrap();
    assert_eq!(cpus.split_whitespace().nth(1), Some("0"), "{cpus}");
}

#[test]
fn notify_readiness_and_status_text() {
    let w = World::new();
    let r = w.apply(&format!(
        "[nodes.n]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--status\", \"warming up\", \"--ready-after\", \"300ms\"]\nreadiness = {{ kind = \"notify\", timeout = \"10s\" }}\n",
        prog()
    ));
    // apply answers once the node is ready.
    assert!(r.iter().all(|r| r.success), "{r:?}");
    let s = w.node("n");
    assert_eq!(s.state, State::Running);
    assert!(s.ready);
    assert_eq!(s.status_text.as_deref(), Some("ready"));
}

#[test]
fn notify_timeout_is_a_failed_start() {
    let w = World::new();
    let r = w.apply(&format!(
        "[nodes.n]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--print\", \"never ready\"]\nreadiness = {{ kind = \"notify\", timeout = \"300ms\" }}\nmax_failed_starts = 1\n",
        prog()
    ));
    assert_eq!(r.len(), 1);
    assert!(!r[0].success, "{r:?}");
    let Some(ResultData::NodeOutputs(o)) = &r[0].data else {
        panic!("outputs expected: {r:?}")
    };
    assert!(o.stdout.contains("never ready"), "{o:?}");
    w.wait("failed", |s| s.state == State::Failed, "n");
}

#[test]
fn tcp_readiness() {
    let w = World::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = w.apply(&format!(
        "[nodes.n]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--listen\", \"127.0.0.1:{port}\", \"--listen-after\", \"300ms\"]\nreadiness = {{ kind = \"tcp\", port = {port}, timeout = \"10s\" }}\n",
        prog()
    ));
    assert!(r.iter().all(|r| r.success), "{r:?}");
    assert_eq!(w.node("n").state, State::Running);
}

#[test]
fn crash_loop_backs_off_then_fails_with_outputs() {
    let w = World::new();
    let started = Instant::now();
    let r = w.apply(&format!(
        "[nodes.c]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--crash-at-start\"]\nbackoff = {{ initial = \"100ms\", multiplier = 2.0 }}\nmax_failed_starts = 4\n",
        prog()
    ));
    assert!(!r[0].success);
    let Some(ResultData::NodeOutputs(o)) = &r[0].data else {
        panic!("outputs expected: {r:?}")
    };
    assert!(o.stderr.contains("crashing at start as asked"), "{o:?}");
    let s = w.wait("failed", |s| s.state == State::Failed, "c");
    // Four attempts: three automatic restarts after 100, 200 and 400 ms of backoff.
    assert_eq!(s.restarts, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "backoff was honoured"
    );
    assert_eq!(s.last_exit, Some(drover_proto::model::ExitStatus::Code(3)));
    // An operator start begins a fresh streak.
    w.act(Op::Start, &["c"]);
    w.wait(
        "failed again",
        |s| s.state == State::Failed && s.restarts >= 6,
        "c",
    );
}

#[test]
fn killed_node_is_restarted_and_counted() {
    let w = World::new();
    w.apply(&format!(
        "[nodes.k]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nbackoff = {{ initial = \"0s\" }}\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        prog()
    ));
    let s = w.wait("running", |s| s.state == State::Running, "k");
    let pid = s.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = w.wait(
        "replaced",
        |s| s.state == State::Running && s.pid != Some(pid),
        "k",
    );
    assert_eq!(s.restarts, 1);
    assert_eq!(
        s.last_exit,
        Some(drover_proto::model::ExitStatus::Signal(9))
    );
}

#[test]
fn policies_never_and_on_failure_respect_exit_codes() {
    let w = World::new();
    let p = prog();
    w.apply(&format!(
        "[nodes.ok]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--exit-after\", \"200ms\"]\nreadiness = {{ kind = \"start-period\", period = \"50ms\" }}\n\
         [nodes.bad]\ninstance = \"agent-1\"\nrestart = \"never\"\ncommand = [\"{p}\", \"--exit-after\", \"200ms\", \"--exit-code\", \"4\"]\nreadiness = {{ kind = \"start-period\", period = \"50ms\" }}\n\
         [nodes.custom]\ninstance = \"agent-1\"\nsuccess_exit_codes = [0, 4]\ncommand = [\"{p}\", \"--exit-after\", \"200ms\", \"--exit-code\", \"4\"]\nreadiness = {{ kind = \"start-period\", period = \"50ms\" }}\n"
    ));
    let ok = w.wait("ok stopped", |s| s.state == State::Stopped, "ok");
    assert_eq!(
        ok.restarts, 0,
        "a clean exit under on-failure is not restarted"
    );
    let bad = w.wait("bad failed", |s| s.state == State::Failed, "bad");
    assert_eq!(bad.restarts, 0);
    assert_eq!(
        bad.last_exit,
        Some(drover_proto::model::ExitStatus::Code(4))
    );
    let custom = w.wait("custom stopped", |s| s.state == State::Stopped, "custom");
    assert_eq!(custom.restarts, 0, "4 counts as success");
}

#[test]
fn stop_escalates_to_sigkill_and_takes_grandchildren_along() {
    let w = World::new();
    let children = w.dir.path().join("children.txt");
    w.apply(&format!(
        "[nodes.stubborn]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--ignore-sigterm\", \"--spawn-children\", \"2\", \"--setsid\", \"--children-file\", \"{}\"]\nstop_timeout = \"500ms\"\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        prog(),
        children.display()
    ));
    let s = w.wait("running", |s| s.state == State::Running, "stubborn");
    let pid = s.pid.unwrap();
    let kids: Vec<u32> = drover_tests::eventually("children file", drover_tests::PATIENCE, || {
        let text = std::fs::read_to_string(&children).ok()?;
        let v: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (v.len() == 2).then_some(v)
    });
    assert!(kids.iter().all(|k| alive(*k)));
    let started = Instant::now();
    let r = w.act(Op::Stop, &["stubborn"]);
    assert!(r.iter().all(|r| r.success), "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "waited for the stop timeout"
    );
    assert!(!alive(pid));
    drover_tests::eventually(
        "grandchildren in their own session are gone",
        drover_tests::PATIENCE,
        || kids.iter().all(|k| !alive(*k)).then_some(()),
    );
    let s = w.node("stubborn");
    assert_eq!(s.state, State::Stopped);
    assert_eq!(s.pid, None);
}

#[test]
fn apply_is_idempotent_and_restarts_only_changed_nodes() {
    let w = World::new();
    let p = prog();
    let body = |x: &str| {
        format!(
            "[nodes.a]\ninstance = \"agent-1\"\ncommand = [\"{p}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             [nodes.b]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"{x}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
        )
    };
    let r = w.apply_id(Some("one"), &body("--sleep-forever"));
    assert_eq!(r.len(), 2);
    let pids: BTreeMap<String, u32> = w
        .status()
        .into_iter()
        .map(|(k, v)| (k, v.pid.unwrap()))
        .collect();
    // Same id again: nothing at all happens.
    assert!(w.apply_id(Some("one"), &body("--sleep-forever")).is_empty());
    // Another id, same specs: nothing restarts.
    assert!(w.apply_id(Some("two"), &body("--sleep-forever")).is_empty());
    // b changes.
    let r = w.apply_id(Some("three"), &body("--print=x"));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].node.as_deref(), Some("b"));
    let now = w.status();
    assert_eq!(now["a"].pid, Some(pids["a"]));
    assert_ne!(now["b"].pid, Some(pids["b"]));
    assert!(!alive(pids["b"]));
    // b leaves the configuration: it is stopped and removed.
    w.apply_id(Some("four"), &format!(
        "[nodes.a]\ninstance = \"agent-1\"\ncommand = [\"{p}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
    ));
    drover_tests::eventually("b removed", drover_tests::PATIENCE, || {
        (!w.status().contains_key("b")).then_some(())
    });
    assert_eq!(w.status()["a"].pid, Some(pids["a"]));
}

#[test]
fn unknown_program_fails_with_a_clear_error() {
    let w = World::new();
    let r = w.apply("[nodes.x]\ninstance = \"agent-1\"\ncommand = [\"/nonexistent/prog\"]\nmax_failed_starts = 1\n");
    assert!(!r[0].success);
    assert!(
        r[0].error
            .as_deref()
            .unwrap()
            .contains("node 'x': cannot execute /nonexistent/prog: no such file or directory"),
        "{r:?}"
    );
}
