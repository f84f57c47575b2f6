//! The agent's supervisor with real processes (the test program), in-process: launch
//! environment, readiness, restart policy and backoff, stop escalation, grandchildren,
//! idempotent apply, outputs of failed starts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use drover_agent::converge::Restart;
use drover_agent::logs::LogConfig;
use drover_agent::supervisor::{Op, Supervisor, SupervisorConfig};
use drover_proto::config::parse_toml;
use drover_proto::model::{NodeStatus, ResultData, State};
use drover_tests::{alive, bin};

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
                keeper: None,
                removed_node_retention: None,
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
        self.apply_gen(0, id, nodes_toml)
    }

    /// As [`World::apply_id`] with a deploy generation.
    fn apply_gen(
        &self,
        generation: u64,
        id: Option<&str>,
        nodes_toml: &str,
    ) -> Vec<drover_proto::MgmtResult> {
        let id = id.map(|i| format!("id = \"{i}\"\n")).unwrap_or_default();
        let text = format!("{id}[instances.agent-1]\n{nodes_toml}");
        let config = parse_toml("test.toml", &text).unwrap_or_else(|e| panic!("{e}"));
        self.rt.block_on(self.sup.apply(
            config,
            Restart::default(),
            generation,
            Instant::now() + Duration::from_secs(20),
            None,
        ))
    }

    fn act(&self, op: Op, nodes: &[&str]) -> Vec<drover_proto::MgmtResult> {
        let nodes = nodes.iter().map(|s| (*s).to_owned()).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        self.rt
            .block_on(self.sup.act(op, nodes, deadline, deadline))
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

    /// Leaves the nodes running, as an agent killed at this point would, and starts a
    /// new supervisor on the same state dir.
    fn restart_supervisor(&mut self) {
        self.rt.block_on(self.sup.shutdown(false));
        self.sup = self.rt.block_on(async {
            Supervisor::start(SupervisorConfig {
                instance: "agent-1".into(),
                state_dir: self.dir.path().to_owned(),
                logs: LogConfig::default(),
                cgroup: Default::default(),
                keeper: None,
                removed_node_retention: None,
            })
            .unwrap()
        });
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
    // What a process said of itself goes with it: a stopped node shows none, now or
    // after an agent restart (its record keeps none).
    let r = w.act(Op::Stop, &["n"]);
    assert!(r.iter().all(|r| r.success), "{r:?}");
    let s = w.wait("stopped", |s| s.state == State::Stopped, "n");
    assert_eq!(s.status_text, None, "{s:?}");
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
        "[nodes.k]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nbackoff = {{ initial = \"10ms\" }}\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
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

fn two_nodes(p: &str, a: &str, b: &str) -> String {
    format!(
        "[nodes.a]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"{a}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
         [nodes.b]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"{b}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
    )
}

/// A repeat of a generation whose Apply still waits for its nodes (the controller sent
/// it again on the agent's new connection, say) is answered with that Apply, once the
/// nodes run, with their results; not at once, as if there were nothing to wait for.
#[test]
fn a_repeat_of_a_generation_being_carried_out_is_answered_once_its_nodes_run() {
    let w = World::new();
    let text = format!(
        "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--ready-after\", \"400ms\"]\nreadiness = {{ kind = \"notify\", timeout = \"10s\" }}\n",
        prog()
    );
    let config = parse_toml("test.toml", &text).unwrap();
    let (first, again) = w.rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = w
            .sup
            .apply(config.clone(), Restart::default(), 3, deadline, None);
        let again = async {
            // Once generation 3 is applied, as a repeat.
            tokio::time::timeout(Duration::from_secs(10), async {
                while w.sup.applied_generation() != 3 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("generation 3 applied within 10 s");
            let r = w
                .sup
                .apply(config.clone(), Restart::default(), 3, deadline, None)
                .await;
            let states: Vec<State> = w.sup.status().await.iter().map(|s| s.state).collect();
            (r, states)
        };
        tokio::join!(first, again)
    });
    assert_eq!(first.len(), 1, "{first:?}");
    let (again, states) = again;
    assert_eq!(again.len(), 1, "the node's result: {again:?}");
    assert!(again[0].success, "{again:?}");
    assert_eq!(again[0].node.as_deref(), Some("n"));
    assert_eq!(states, [State::Running], "answered before the node ran");
    // Once that is done, a repeat is answered with the node as it is now: a deploy sent
    // again after a catch-up carried it out still learns of its node.
    let r = w.apply_gen(3, None, &text.replace("[instances.agent-1]\n", ""));
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].success, "{r:?}");
    assert_eq!(r[0].node.as_deref(), Some("n"));
}

/// A repeat of a generation whose Apply was answered is answered with that Apply's
/// nodes as they are now: a node that failed since is reported failed, with its output,
/// not as the success the first answer was; a node it did not change is not named.
#[test]
fn a_repeat_of_a_generation_carried_out_reports_its_nodes_as_they_are_now() {
    let mut w = World::new();
    let p = prog();
    let steady = format!(
        "[nodes.steady]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--sleep-forever\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
    );
    let r = w.apply_gen(1, None, &steady);
    assert_eq!(r.len(), 1, "{r:?}");
    let failing = format!(
        "{steady}[nodes.brief]\ninstance = \"agent-1\"\nrestart = \"never\"\ncommand = [\"{p}\", \"--eprint\", \"brief-was-here\", \"--exit-after\", \"300ms\", \"--exit-code\", \"3\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
    );
    let r = w.apply_gen(2, None, &failing);
    assert_eq!(r.len(), 1, "only the node generation 2 added: {r:?}");
    assert!(r[0].success, "{r:?}");
    w.wait("brief failed", |s| s.state == State::Failed, "brief");
    let r = w.apply_gen(2, None, &failing);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].node.as_deref(), Some("brief"));
    assert!(!r[0].success, "{r:?}");
    let Some(ResultData::NodeOutputs(o)) = &r[0].data else {
        panic!("no outputs: {r:?}");
    };
    assert!(o.stderr.contains("brief-was-here"), "{o:?}");
    // Carried out by an earlier agent process: what that Apply changed is not known,
    // so every node is named, as it is now.
    w.restart_supervisor();
    let r = w.apply_gen(2, None, &failing);
    let named: BTreeMap<_, _> = r
        .iter()
        .map(|r| (r.node.clone().unwrap_or_default(), r.success))
        .collect();
    assert_eq!(
        named,
        BTreeMap::from([("brief".to_owned(), false), ("steady".to_owned(), true)]),
        "{r:?}"
    );
}

/// An Apply that changes nodes whose spawns for the previous Apply are still under
/// way: each ends up running the new spec (the process spawned for the old one is
/// stopped once it exists), and the new Apply's answer waits for that, not for a
/// deadline.
#[test]
fn an_apply_that_changes_nodes_being_spawned_runs_the_new_spec() {
    let w = World::new();
    const N: usize = 40;
    let nodes = |version: &str| -> String {
        (0..N)
            .map(|i| {
                format!(
                    "[nodes.n{i:02}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--print\", \"{version}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
                    prog()
                )
            })
            .collect()
    };
    let config = |generation: u64, version: &str| {
        let text = format!("[instances.agent-1]\n{}", nodes(version));
        let c = parse_toml("test.toml", &text).unwrap();
        (c, generation)
    };
    let (c1, g1) = config(1, "first");
    let (c2, g2) = config(2, "second");
    let started = Instant::now();
    let (r1, r2) = w.rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        // Both handed over at once: the second is carried out while the first's
        // spawns are still under way.
        tokio::join!(
            w.sup.apply(c1, Restart::default(), g1, deadline, None),
            w.sup.apply(c2, Restart::default(), g2, deadline, None)
        )
    });
    assert_eq!(r1.len(), N, "{r1:?}");
    assert!(r2.iter().all(|r| r.success), "{r2:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered when the nodes ran, not at the deadline"
    );
    for (name, s) in w.status() {
        assert_eq!(s.state, State::Running, "{name}");
        let pid = s.pid.unwrap();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmd = String::from_utf8_lossy(&cmd);
        assert!(cmd.contains("second"), "{name} runs {cmd:?}");
    }
}

#[test]
fn apply_by_generation_repeats_nothing_refuses_older_and_diffs_specs() {
    let w = World::new();
    let p = prog();
    let r = w.apply_gen(
        5,
        Some("one"),
        &two_nodes(&p, "--sleep-forever", "--sleep-forever"),
    );
    assert_eq!(r.len(), 2, "{r:?}");
    let pids: BTreeMap<String, u32> = w
        .status()
        .into_iter()
        .map(|(k, v)| (k, v.pid.unwrap()))
        .collect();
    assert!(w.status().values().all(|s| s.generation == Some(5)));
    assert_eq!(w.sup.applied_generation(), 5);
    // A repeat of generation 5, even with an edited spec: nothing changes, and it is
    // answered as generation 5 was, with its nodes as they are.
    let r = w.apply_gen(
        5,
        Some("one"),
        &two_nodes(&p, "--sleep-forever", "--print=x"),
    );
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r.iter().all(|r| r.success), "{r:?}");
    assert_eq!(w.status()["b"].pid, Some(pids["b"]));
    // An older generation is refused as a whole, and changes nothing.
    let r = w.apply_gen(4, Some("old"), &two_nodes(&p, "--print=y", "--print=y"));
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(!r[0].success);
    let err = r[0].error.as_deref().unwrap_or_default();
    assert!(
        err.contains("generation 4 is older than generation 5"),
        "{err}"
    );
    assert!(r[0].node.is_none());
    let now = w.status();
    assert_eq!(now["a"].pid, Some(pids["a"]));
    assert_eq!(now["b"].pid, Some(pids["b"]));
    assert_eq!(w.sup.applied_generation(), 5);
    // Generation 6 with the same configuration id: the specs decide; b changed.
    let r = w.apply_gen(
        6,
        Some("one"),
        &two_nodes(&p, "--sleep-forever", "--print=x"),
    );
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].node.as_deref(), Some("b"));
    let now = w.status();
    assert_eq!(now["a"].pid, Some(pids["a"]), "a is unchanged");
    assert_ne!(now["b"].pid, Some(pids["b"]));
    assert!(now.values().all(|s| s.generation == Some(6)), "{now:?}");
    // Generation 0 (a controller without generations) re-applying what runs: nothing
    // happens, and generation 6 stays applied.
    let r = w.apply_gen(
        0,
        Some("one"),
        &two_nodes(&p, "--sleep-forever", "--print=x"),
    );
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(w.sup.applied_generation(), 6);
    // Generation 0 with a change: the specs decide, even under the same id.
    let r = w.apply_gen(0, Some("one"), &two_nodes(&p, "--print=z", "--print=x"));
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].node.as_deref(), Some("a"));
    assert_ne!(w.status()["a"].pid, Some(pids["a"]));
    assert_eq!(w.sup.applied_generation(), 0);
    // Then any numbered generation is carried out.
    let r = w.apply_gen(2, Some("two"), &two_nodes(&p, "--print=z", "--print=x"));
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(w.sup.applied_generation(), 2);
}

#[test]
fn an_apply_whose_desired_state_cannot_be_written_changes_nothing() {
    let w = World::new();
    let p = prog();
    let r = w.apply_gen(
        3,
        Some("one"),
        &two_nodes(&p, "--sleep-forever", "--sleep-forever"),
    );
    assert_eq!(r.len(), 2, "{r:?}");
    let before: BTreeMap<String, Option<u32>> =
        w.status().into_iter().map(|(k, v)| (k, v.pid)).collect();
    let desired = std::fs::read(w.dir.path().join("desired.json")).unwrap();
    // The temp file it is written through cannot be made: a directory is in the way.
    let tmp = w.dir.path().join("desired.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let r = w.apply_gen(
        4,
        Some("two"),
        &two_nodes(&p, "--print=x", "--sleep-forever"),
    );
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(!r[0].success);
    let err = r[0].error.as_deref().unwrap_or_default();
    assert!(
        err.contains("cannot record the desired state: ")
            && err.contains("desired.json.tmp: Is a directory"),
        "{err}"
    );
    // Nothing changed: the processes, the generation applied, the file on disk.
    let now: BTreeMap<String, Option<u32>> =
        w.status().into_iter().map(|(k, v)| (k, v.pid)).collect();
    assert_eq!(now, before);
    assert_eq!(w.sup.applied_generation(), 3);
    assert_eq!(
        std::fs::read(w.dir.path().join("desired.json")).unwrap(),
        desired
    );
    // Once it can be written, the same generation is carried out (it was no repeat).
    std::fs::remove_dir(&tmp).unwrap();
    let r = w.apply_gen(
        4,
        Some("two"),
        &two_nodes(&p, "--print=x", "--sleep-forever"),
    );
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].node.as_deref(), Some("a"));
    assert_eq!(w.sup.applied_generation(), 4);
    assert_ne!(w.status()["a"].pid, before["a"]);
}

/// Forges the record of a node whose spawn was announced (`token`) but whose pid was
/// never written, as an agent killed between the two leaves it.
fn write_announced_record(dir: &Path, spec: &drover_proto::model::Node, token: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let record = serde_json::json!({ "spec": spec, "spawning": token, "restarts": 0 });
    std::fs::write(dir.join("record.json"), record.to_string()).unwrap();
}

#[test]
fn recovery_converges_on_the_desired_state_and_finds_unrecorded_spawns() {
    let mut w = World::new();
    let p = prog();
    w.apply_gen(
        1,
        None,
        &two_nodes(&p, "--sleep-forever", "--sleep-forever"),
    );
    let pa = w.node("a").pid.unwrap();
    let pb = w.node("b").pid.unwrap();
    w.rt.block_on(w.sup.shutdown(false));
    // What an agent killed during the Apply of generation 2 leaves behind: a desired
    // state of a (unchanged), c (new, spawned but its pid never recorded) and d (new,
    // changed after its unrecorded spawn); b is no longer desired but still runs.
    let text = format!(
        "[instances.agent-1]\n{}\
         [nodes.c]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--sleep-forever\"]\n\
         [nodes.d]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--sleep-forever\", \"--print=new\"]\n",
        two_nodes(&p, "--sleep-forever", "--sleep-forever")
    );
    let config = parse_toml("test.toml", &text).unwrap();
    let spec = |n: &str| config.resolve(config.nodes.iter().find(|x| x.name == n).unwrap());
    let mut nodes: BTreeMap<String, drover_proto::model::Node> = ["a", "c", "d"]
        .into_iter()
        .map(|n| (n.to_owned(), spec(n)))
        .collect();
    let desired = drover_agent::converge::Desired {
        generation: 2,
        restart_epoch: 0,
        nodes: nodes.clone(),
    };
    std::fs::write(
        w.dir.path().join("desired.json"),
        serde_json::to_vec(&desired).unwrap(),
    )
    .unwrap();
    let stray = |token: u64| {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&p)
            .arg("--sleep-forever")
            .env("DROVER_NODE_TOKEN", token.to_string())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let token = |n: u64| (u64::from(std::process::id()) << 32) | 0xdead_0000 | n;
    let mut c_proc = stray(token(1));
    let mut d_proc = stray(token(2));
    write_announced_record(&w.node_dir("c"), &nodes["c"], token(1));
    let mut d_old = nodes.remove("d").unwrap();
    d_old.command.pop();
    write_announced_record(&w.node_dir("d"), &d_old, token(2));

    w.restart_supervisor();
    assert_eq!(w.sup.applied_generation(), 2);
    // a kept its process; c's unrecorded process was found and adopted.
    let c = w.wait("c adopted", |s| s.state == State::Running, "c");
    assert_eq!(c.pid, Some(c_proc.id()), "c's spawned process is tracked");
    assert_eq!(w.node("a").pid, Some(pa));
    // d's process runs an outdated spec: it is replaced.
    let d = w.wait(
        "d restarted",
        |s| s.state == State::Running && s.pid.is_some_and(|p| p != d_proc.id()),
        "d",
    );
    // (The supervisor, in this process, reaps it.)
    drover_tests::eventually("d's old process ended", drover_tests::PATIENCE, || {
        (!alive(d_proc.id())).then_some(())
    });
    assert_eq!(d.generation, Some(2));
    // b is stopped and forgotten.
    drover_tests::eventually("b stopped", drover_tests::PATIENCE, || {
        (!alive(pb) && !w.status().contains_key("b")).then_some(())
    });
    assert!(!w.node_dir("b").join("record.json").exists());
    assert!(w.status().values().all(|s| s.generation == Some(2)));
    // Another restart changes nothing: every process is recorded now.
    w.restart_supervisor();
    let now = w.status();
    assert_eq!(now.keys().collect::<Vec<_>>(), ["a", "c", "d"]);
    assert_eq!(now["a"].pid, Some(pa));
    assert_eq!(now["c"].pid, Some(c_proc.id()));
    assert_eq!(now["d"].pid, d.pid);
    drop(w);
    // Reaped by the supervisor already; waited on for form's sake.
    let _ = c_proc.wait();
    let _ = d_proc.wait();
}

#[test]
fn an_unreadable_desired_state_keeps_the_recorded_nodes() {
    let mut w = World::new();
    let p = prog();
    w.apply_gen(
        3,
        None,
        &two_nodes(&p, "--sleep-forever", "--sleep-forever"),
    );
    let before: BTreeMap<String, Option<u32>> =
        w.status().into_iter().map(|(k, v)| (k, v.pid)).collect();
    std::fs::write(w.dir.path().join("desired.json"), "{\"generation\":").unwrap();
    w.restart_supervisor();
    let after: BTreeMap<String, Option<u32>> =
        w.status().into_iter().map(|(k, v)| (k, v.pid)).collect();
    assert_eq!(after, before, "every recorded node adopted, none restarted");
    // No generation is known, so the next numbered one is carried out.
    assert_eq!(w.sup.applied_generation(), 0);
    let r = w.apply_gen(
        1,
        None,
        &two_nodes(&p, "--sleep-forever", "--sleep-forever"),
    );
    assert!(r.is_empty(), "{r:?}");
    assert_eq!(w.sup.applied_generation(), 1);
    let desired: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.dir.path().join("desired.json")).unwrap()).unwrap();
    assert_eq!(desired["generation"], 1);
}

#[test]
fn an_agent_killed_while_replacing_a_node_finishes_the_replacement() {
    let mut w = World::new();
    let p = prog();
    // The old process ignores SIGTERM and may take 8 s to stop: the agent is killed
    // while it waits for that.
    let node = |version: &str, stop: &str| {
        format!(
            "[nodes.a]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--ignore-sigterm\", \"--print={version}\"]\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\nstop_timeout = \"{stop}\"\n"
        )
    };
    w.apply_gen(1, Some("one"), &node("v1", "8s"));
    let old = w.node("a").pid.unwrap();
    // RUNNING comes with the spawn (start-period 0 s); the stop below is only slow once
    // the program has got as far as ignoring SIGTERM.
    drover_tests::eventually("SIGTERM ignored", drover_tests::PATIENCE, || {
        let ignored = drover_tests::status_mask(old, "SigIgn:")?;
        (ignored & (1 << (nix::libc::SIGTERM - 1)) != 0).then_some(())
    });
    let text = format!("id = \"two\"\n[instances.agent-1]\n{}", node("v2", "1s"));
    let config = parse_toml("test.toml", &text).unwrap();
    let sup = w.sup.clone();
    w.rt.spawn(async move {
        sup.apply(
            config,
            Restart::default(),
            2,
            Instant::now() + Duration::from_secs(60),
            None,
        )
        .await
    });
    // Once the agent has acted on generation 2 (the record names its configuration),
    // the record still names the old process with the spec it runs, not the new one.
    let record = drover_tests::eventually("generation 2 under way", drover_tests::PATIENCE, || {
        let r = std::fs::read(w.node_dir("a").join("record.json")).ok()?;
        let r: serde_json::Value = serde_json::from_slice(&r).ok()?;
        (r["config_id"] == "two").then_some(r)
    });
    assert_eq!(record["process"]["pid"], old);
    assert_eq!(record["spec"]["command"][2], "--print=v1");
    assert!(alive(old));
    let restarted = Instant::now();
    w.restart_supervisor();
    // The new agent does not take the old process for the new spec: it replaces it,
    // stopping it as the spec it runs says (8 s), not as the new one does (1 s).
    let s = w.wait(
        "a replaced",
        |s| s.state == State::Running && s.pid.is_some_and(|p| p != old),
        "a",
    );
    assert!(
        restarted.elapsed() >= Duration::from_secs(5),
        "replaced after {:?}, within the new spec's stop_timeout",
        restarted.elapsed()
    );
    assert_eq!(s.generation, Some(2));
    drover_tests::eventually("the old process gone", drover_tests::PATIENCE, || {
        (!alive(old)).then_some(())
    });
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", s.pid.unwrap())).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("--print=v2"));
}

/// The cgroup v2 directory this process is in, if the unified hierarchy is mounted.
fn own_cgroup_v2() -> Option<std::path::PathBuf> {
    let line = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = line.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4))?
    })?;
    Some(Path::new(mount).join(rel.trim_start_matches('/')))
}

#[test]
fn a_supervisor_started_inside_its_subtree_removes_it_when_it_stops_its_nodes() {
    let Some(base) = own_cgroup_v2() else {
        eprintln!("skipped: no cgroup v2 hierarchy");
        return;
    };
    let mut w = World::new();
    let subtree = base.join(drover_agent::cgroup::subtree_name("agent-1", w.dir.path()));
    if !subtree.join("agent").exists() {
        eprintln!("skipped: nodes are not contained in cgroups here");
        return;
    }
    w.apply(&format!(
        "[nodes.a]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\n",
        prog()
    ));
    w.wait("running", |s| s.state == State::Running, "a");
    // As an agent started by its predecessor's leaf: this process is in it now.
    w.restart_supervisor();
    w.wait("adopted", |s| s.state == State::Running, "a");
    w.rt.block_on(w.sup.shutdown(true));
    assert!(!subtree.exists(), "{} left behind", subtree.display());
    let now = own_cgroup_v2().unwrap();
    assert_eq!(now, base, "back where the subtree was");
}

#[test]
fn a_new_node_whose_files_cannot_be_made_fails_alone_and_starts_once_they_can() {
    let w = World::new();
    // A file where the node's directory goes, as a full or broken disk would refuse it.
    let nodes = w.dir.path().join("nodes");
    std::fs::create_dir_all(&nodes).unwrap();
    std::fs::write(nodes.join("blocked"), "in the way").unwrap();
    let p = prog();
    let node = |name: &str| {
        format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\ncommand = [\"{p}\"]\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             backoff = {{ initial = \"50ms\", max = \"50ms\" }}\nmax_failed_starts = 0\n"
        )
    };
    let r = w.apply(&format!("{}{}", node("ok"), node("blocked")));
    let failed: Vec<_> = r.iter().filter(|r| !r.success).collect();
    assert_eq!(failed.len(), 1, "{r:?}");
    assert_eq!(failed[0].node.as_deref(), Some("blocked"), "{r:?}");
    let error = failed[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("cannot set up node 'blocked'") && error.contains("nodes/blocked"),
        "{error}"
    );
    assert_eq!(w.node("ok").state, State::Running);
    // Its restarts make it once the way is clear.
    std::fs::remove_file(nodes.join("blocked")).unwrap();
    let s = w.wait("blocked running", |s| s.state == State::Running, "blocked");
    let pid = s.pid.unwrap();
    assert!(alive(pid));
    assert!(nodes.join("blocked/notify.sock").exists());
}
