//! Containment of nodes with real agents and real processes: a grandchild that
//! double-forked into a session of its own dies with its node, also when the agent was
//! SIGKILLed and restarted in between; the fallback without cgroups; nodes start with
//! default signal dispositions and an empty mask whatever the agent inherited; exec
//! errors reach the deploy reply and get-nodes.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use drover_tests::{Cluster, PATIENCE, Proc, alive, bin, eventually};
use serde_json::Value;

/// Field `n` (1-based, as proc_pid_stat(5)) of `/proc/<pid>/stat`.
fn stat_field(pid: u32, n: usize) -> i64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = s.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(n - 3).unwrap().parse().unwrap()
}

/// The cgroup v2 path of `pid` (the `0::` line).
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

fn sig_mask(pid: u32, field: &str) -> u64 {
    drover_tests::status_mask(pid, field).unwrap_or_else(|| panic!("no {field} in status of {pid}"))
}

/// The cgroup subtree an agent logged it uses, if any.
fn agent_cgroup(agent: &Proc) -> PathBuf {
    let log = agent.wait_log("nodes are contained in cgroups");
    let line = log
        .lines()
        .find(|l| l.contains("nodes are contained in cgroups"))
        .unwrap();
    let path = line
        .split("cgroup=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next();
    PathBuf::from(path.unwrap())
}

fn connect(c: &Cluster, addr: SocketAddr) {
    eventually("agent connected", PATIENCE, || {
        let out = c.drover(addr, &["get-instances"]);
        (out.json().as_object().map(|o| o.len()) == Some(1)).then_some(())
    });
}

fn deploy(c: &Cluster, addr: SocketAddr, body: &str) -> (Option<i32>, Value) {
    let text = format!(
        "[defaults]\nbackoff = {{ initial = \"10ms\" }}\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n[instances.agent-1]\n{body}"
    );
    let path = c.dir.path().join(format!("cluster-{}.toml", text.len()));
    std::fs::write(&path, text).unwrap();
    let out = c.drover(addr, &["deploy-config", path.to_str().unwrap()]);
    (out.code, out.json())
}

fn node_status(c: &Cluster, addr: SocketAddr, node: &str) -> Value {
    c.drover(addr, &["get-nodes", "--fresh"]).json()["results"]["agent-1"][node].clone()
}

/// A node whose subshell starts a testprog in a session of its own that ignores
/// SIGTERM, then exits (a double fork), and whose main process is a testprog. With
/// `hide_token`, the grandchild carries no spawn token, so only a cgroup finds it.
fn double_fork_node(dir: &Path, hide_token: bool) -> (String, PathBuf) {
    let pidfile = dir.join("grandchild.pid");
    let prog = bin("drover-testprog");
    // The node's sockets are the main process's (a second testprog would race it for
    // the query socket).
    let unset = if hide_token {
        "unset DROVER_NODE_TOKEN DROVER_QUERY_SOCKET NOTIFY_SOCKET; "
    } else {
        "unset DROVER_QUERY_SOCKET NOTIFY_SOCKET; "
    };
    let script = format!(
        "({unset}{p} --own-session --ignore-sigterm --sleep-forever >/dev/null 2>&1 & echo $! > {f}.tmp; mv {f}.tmp {f}); exec {p} --sleep-forever",
        p = prog.display(),
        f = pidfile.display()
    );
    let body = format!(
        "[nodes.g]\ninstance = \"agent-1\"\ncommand = [\"/bin/sh\", \"-c\", {}]\nstop_timeout = \"1s\"\n",
        Value::String(script)
    );
    (body, pidfile)
}

/// SIGKILLs a node's main process and waits until it is gone.
fn sigkill_and_wait(main: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(main).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("main gone", PATIENCE, || (!alive(main)).then_some(()));
}

fn read_pid(file: &Path) -> u32 {
    eventually("grandchild pid file", PATIENCE, || {
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    })
}

fn stop_kills_grandchild(restart_agent: bool) {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    let root = agent_cgroup(&agent);
    connect(&c, addr);
    let (body, pidfile) = double_fork_node(c.dir.path(), true);
    let (code, v) = deploy(&c, addr, &body);
    assert_eq!(code, Some(0), "{v}");
    let grandchild = read_pid(&pidfile);
    let main = eventually("g running", PATIENCE, || {
        node_status(&c, addr, "g")["pid"].as_u64()
    });
    let main = u32::try_from(main).unwrap();
    eventually("grandchild in its own session", PATIENCE, || {
        (stat_field(grandchild, 6) == i64::from(grandchild)).then_some(())
    });
    assert_ne!(stat_field(grandchild, 5), i64::from(main), "left the group");
    assert!(
        cgroup_of(grandchild).ends_with("/nodes/g"),
        "{}",
        cgroup_of(grandchild)
    );
    assert_eq!(cgroup_of(main), cgroup_of(grandchild));
    let listed = std::fs::read_to_string(root.join("nodes/g/cgroup.procs")).unwrap();
    assert!(
        listed.lines().any(|l| l == grandchild.to_string()),
        "{listed}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("agent/cgroup.procs")).unwrap(),
        format!("{}\n", agent.pid()),
        "the agent is alone in its leaf"
    );
    if restart_agent {
        agent.kill();
        agent = c.start_agent("agent-1", addr);
        agent.wait_log("adopted running node");
        // The new connection, not the dead agent's, which the controller still holds
        // until it finds it silent (both agents log to the same file).
        eventually("the new agent connected", PATIENCE, || {
            (agent.log_text().matches("connected to controller").count() >= 2).then_some(())
        });
        connect(&c, addr);
        assert!(alive(grandchild), "the agent's death left it alone");
    }
    let out = c.drover(addr, &["stop", "g"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("grandchild killed", PATIENCE, || {
        (!alive(grandchild)).then_some(())
    });
    assert!(!alive(main));
    // The node leaves the configuration: its cgroup goes.
    let (code, v) = deploy(&c, addr, "");
    assert_eq!(code, Some(0), "{v}");
    eventually("node cgroup removed", PATIENCE, || {
        (!root.join("nodes/g").exists()).then_some(())
    });
    drop(agent);
}

#[test]
fn stop_kills_a_double_forked_grandchild_in_a_session_of_its_own() {
    stop_kills_grandchild(false);
}

#[test]
fn stop_kills_the_grandchild_after_the_agent_was_sigkilled_and_restarted() {
    stop_kills_grandchild(true);
}

#[test]
fn without_cgroups_the_spawn_token_still_finds_the_grandchild() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let agent = c.start_agent_args(
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string(), "--cgroup-root", "none"],
    );
    connect(&c, addr);
    let (body, pidfile) = double_fork_node(c.dir.path(), false);
    let (code, v) = deploy(&c, addr, &body);
    assert_eq!(code, Some(0), "{v}");
    let grandchild = read_pid(&pidfile);
    let main = u32::try_from(node_status(&c, addr, "g")["pid"].as_u64().unwrap()).unwrap();
    assert_eq!(
        cgroup_of(main),
        cgroup_of(agent.pid()),
        "no cgroup of its own"
    );
    assert!(!agent.log_text().contains("contained in cgroups"));
    let out = c.drover(addr, &["stop", "g"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("grandchild killed", PATIENCE, || {
        (!alive(grandchild)).then_some(())
    });
    assert!(!alive(main));
}

#[test]
fn a_cgroup_root_outside_cgroup2_is_refused() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let dir = c.dir.path().join("not-a-cgroup");
    let mut agent = c.start_agent_args(
        "agent-1",
        "agent-1",
        &[
            "--controller",
            &addr.to_string(),
            "--cgroup-root",
            dir.to_str().unwrap(),
        ],
    );
    let status = agent.wait_exit(PATIENCE);
    assert!(
        !status.success(),
        "the agent must not run without its cgroup"
    );
    let log = agent.log_text();
    assert!(log.contains("is not in a cgroup v2 hierarchy"), "{log}");
}

#[test]
fn nodes_start_with_default_signals_and_an_empty_mask() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let mut cmd = Command::new(bin("drover-agent"));
    c.agent_args(
        &mut cmd,
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string()],
    );
    // SAFETY: signal and sigprocmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            signal(Signal::SIGHUP, SigHandler::SigIgn)?;
            signal(Signal::SIGINT, SigHandler::SigIgn)?;
            let mut block = SigSet::empty();
            block.add(Signal::SIGUSR1);
            sigprocmask(SigmaskHow::SIG_BLOCK, Some(&block), None)?;
            Ok(())
        });
    }
    let agent = Proc::spawn("agent agent-1", cmd, c.log_path("agent-agent-1"));
    agent_cgroup(&agent);
    connect(&c, addr);
    // The agent itself runs with what it inherited: SIGUSR1 blocked in its main thread.
    assert_ne!(
        sig_mask(agent.pid(), "SigBlk:") & (1 << (libc_sigusr1() - 1)),
        0
    );
    // Not a Rust program, which would ignore SIGPIPE itself.
    let (code, v) = deploy(
        &c,
        addr,
        "[nodes.s]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\nrestart = \"never\"\n",
    );
    assert_eq!(code, Some(0), "{v}");
    let pid = u32::try_from(node_status(&c, addr, "s")["pid"].as_u64().unwrap()).unwrap();
    assert_eq!(sig_mask(pid, "SigIgn:"), 0, "no signal ignored");
    assert_eq!(sig_mask(pid, "SigBlk:"), 0, "no signal blocked");
    // SIGHUP does what it does by default: it ends the node.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    eventually("node ended by SIGHUP", PATIENCE, || {
        (!alive(pid)).then_some(())
    });
}

/// The processes, other than this one, whose descriptor tables hold the file that
/// `/proc/self/fd/FD` links to (`pipe:[N]`).
fn holders_of(link: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_str() == Some(link)))
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// An agent started by a script that waits for the end of a pipe it handed down (a
/// `$(...)`, an ssh session, a CI step): the agent inherits the pipe's write end, but
/// no node and no log keeper does, so once the agent is gone the pipe ends, though the
/// nodes run on.
#[test]
fn nodes_inherit_no_descriptor_the_agent_inherited() {
    use std::os::fd::AsRawFd;
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let (reader, writer) = std::io::pipe().unwrap();
    let link = std::fs::read_link(format!("/proc/self/fd/{}", writer.as_raw_fd()))
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let mut cmd = Command::new(bin("drover-agent"));
    c.agent_args(
        &mut cmd,
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string(), "--on-exit", "keep"],
    );
    let w = writer.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; it leaves the copy without FD_CLOEXEC, as a
    // shell hands a descriptor down.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::dup2(w, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut agent = Proc::spawn("agent agent-1", cmd, c.log_path("agent-agent-1"));
    drop(writer);
    connect(&c, addr);
    let (code, v) = deploy(
        &c,
        addr,
        "[nodes.s]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\n\
         [nodes.t]\ninstance = \"agent-1\"\ncommand = [\"/bin/sh\", \"-c\", \"echo hi; exec sleep 1000\"]\n",
    );
    assert_eq!(code, Some(0), "{v}");
    let s = u32::try_from(node_status(&c, addr, "s")["pid"].as_u64().unwrap()).unwrap();
    let t = u32::try_from(node_status(&c, addr, "t")["pid"].as_u64().unwrap()).unwrap();
    // The keeper has written the node's output by the time logs shows it.
    eventually("t's output logged", PATIENCE, || {
        c.drover(addr, &["logs", "t"])
            .stdout
            .contains("hi")
            .then_some(())
    });
    assert_eq!(
        holders_of(&link),
        vec![agent.pid()],
        "only the agent holds the pipe"
    );

    // The agent goes, leaving its nodes (and its log keeper) running: the pipe ends.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(PATIENCE);
    assert!(alive(s) && alive(t), "the nodes run on");
    // SAFETY: a flag change on a descriptor this test owns.
    assert_eq!(
        unsafe {
            nix::libc::fcntl(
                reader.as_raw_fd(),
                nix::libc::F_SETFL,
                nix::libc::O_NONBLOCK,
            )
        },
        0
    );
    let mut reader = reader;
    eventually(
        "the end of the pipe",
        PATIENCE,
        || match std::io::Read::read(&mut reader, &mut [0u8; 16]) {
            Ok(0) => Some(()),
            Ok(_) => panic!("nothing writes into the pipe"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        },
    );
    // What the agent left running is killed by the test's end: stop the nodes now.
    for pid in [s, t] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn libc_sigusr1() -> i32 {
    nix::sys::signal::Signal::SIGUSR1 as i32
}

#[test]
fn exec_errors_reach_the_deploy_reply_and_get_nodes() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = c.start_agent("agent-1", addr);
    agent_cgroup(&agent);
    connect(&c, addr);
    let plain = c.dir.path().join("plain-file");
    std::fs::write(&plain, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let garbage = c.dir.path().join("garbage");
    std::fs::write(&garbage, [0x7f, b'E', b'L', b'F', 0, 1, 2, 3, 0xff, 0xfe]).unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
    let prog = bin("drover-testprog");
    let cases = [
        (
            "missing",
            "/nonexistent/prog".to_owned(),
            "",
            "no such file or directory",
        ),
        (
            "noexec",
            plain.display().to_string(),
            "",
            "permission denied",
        ),
        (
            "garbage",
            garbage.display().to_string(),
            "",
            "exec format error",
        ),
    ];
    let mut body = String::new();
    for (name, program, extra, _) in &cases {
        body.push_str(&format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\ncommand = [\"{program}\"]\nmax_failed_starts = 1\n{extra}"
        ));
    }
    let (code, v) = deploy(&c, addr, &body);
    assert_eq!(code, Some(1), "{v}");
    for (name, program, _, cause) in &cases {
        let n = &v["results"]["nodes"][name];
        assert_eq!(n["success"], false, "{name}: {v}");
        let stderr = n["stderr"].as_str().unwrap_or_default();
        let want = format!("node '{name}': cannot execute {program}");
        assert!(
            stderr.contains(&want) && stderr.contains(cause),
            "{name}: {stderr:?}"
        );
        let s = node_status(&c, addr, name);
        assert_eq!(s["state"], "FAILED", "{name}: {s}");
        let last = s["last_error"].as_str().unwrap_or_default();
        assert!(last.contains(&want) && last.contains(cause), "{name}: {s}");
    }
    let table = c.drover(addr, &["status"]);
    assert!(
        table
            .stdout
            .contains("error: node 'missing': cannot execute"),
        "{}",
        table.stdout
    );
    // A CPU the host lacks is refused before anything runs: the agent reports its CPUs.
    let (code, v) = deploy(
        &c,
        addr,
        &format!(
            "[nodes.badcpu]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\ncpu_affinity = 1000\n",
            prog.display()
        ),
    );
    assert_eq!(code, Some(1), "{v}");
    assert!(
        v.to_string().contains("pinned to CPU 1000"),
        "the refusal names the CPU: {v}"
    );
    assert_eq!(
        node_status(&c, addr, "missing")["state"],
        "FAILED",
        "nothing changed"
    );
}

/// In-process: a restart whose exec fails answers with the cause, as the last line of
/// its stderr, and none of the earlier process's output (the README: never an earlier
/// process's); `last_error` shows until the node next runs.
#[test]
fn a_failed_restart_returns_the_cause_and_no_earlier_output() {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    use drover_agent::supervisor::{Op, Supervisor, SupervisorConfig};
    use drover_proto::model::{ResultData, State};

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sup = rt.block_on(async {
        Supervisor::start(SupervisorConfig {
            instance: "agent-1".into(),
            state_dir: dir.path().join("state"),
            logs: drover_agent::logs::LogConfig::default(),
            cgroup: drover_agent::cgroup::CgroupSetting::None,
            keeper: None,
            removed_node_retention: None,
        })
        .unwrap()
    });
    let script = dir.path().join("node.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho before-the-restart\nexec sleep 1000\n",
    )
    .unwrap();
    let mode = |m| std::fs::set_permissions(&script, std::fs::Permissions::from_mode(m)).unwrap();
    mode(0o755);
    let text = format!(
        "[instances.agent-1]\n[nodes.x]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nmax_failed_starts = 1\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        script.display()
    );
    let config = drover_proto::config::parse_toml("c.toml", &text).unwrap();
    let deadline = || Instant::now() + Duration::from_secs(20);
    let r = rt.block_on(sup.apply(
        config,
        drover_agent::converge::Restart::default(),
        0,
        deadline(),
        None,
    ));
    assert!(r.iter().all(|r| r.success), "{r:?}");
    let log = dir.path().join("state/nodes/x/stdout.log");
    eventually("output written", PATIENCE, || {
        std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("before-the-restart"))
            .then_some(())
    });
    mode(0o644);
    let r = rt.block_on(sup.act(Op::Restart, vec!["x".into()], deadline(), deadline()));
    assert_eq!(r.len(), 1);
    assert!(!r[0].success);
    let want = format!(
        "node 'x': cannot execute {}: permission denied",
        script.display()
    );
    assert_eq!(r[0].error.as_deref(), Some(want.as_str()), "{r:?}");
    let Some(ResultData::NodeOutputs(o)) = &r[0].data else {
        panic!("no outputs: {r:?}");
    };
    // Nothing ran: no output of its own, and the earlier process's is not its; the
    // cause is the last (here the only) line of its stderr.
    assert_eq!(o.stdout, "", "{o:?}");
    assert_eq!(o.stderr, format!("drover-agent: {want}"), "{o:?}");
    let status = |rt: &tokio::runtime::Runtime| {
        rt.block_on(sup.status())
            .into_iter()
            .find(|s| s.node == "x")
            .unwrap()
    };
    let s = status(&rt);
    assert_eq!(s.state, State::Failed);
    assert_eq!(s.last_error.as_deref(), Some(want.as_str()));
    // Fixed: the next start runs it and clears the error.
    mode(0o755);
    let r = rt.block_on(sup.act(Op::Start, vec!["x".into()], deadline(), deadline()));
    assert!(r.iter().all(|r| r.success), "{r:?}");
    let s = status(&rt);
    assert_eq!(s.state, State::Running);
    assert_eq!(s.last_error, None);
    rt.block_on(sup.shutdown(true));
}

#[test]
fn what_a_node_left_while_no_agent_ran_is_killed_when_it_starts_again() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    let root = agent_cgroup(&agent);
    connect(&c, addr);
    let (body, pidfile) = double_fork_node(c.dir.path(), true);
    let (code, v) = deploy(&c, addr, &body);
    assert_eq!(code, Some(0), "{v}");
    let grandchild = read_pid(&pidfile);
    let main = u32::try_from(node_status(&c, addr, "g")["pid"].as_u64().unwrap()).unwrap();
    agent.kill();
    // The node's main process dies while no agent runs; its grandchild stays.
    sigkill_and_wait(main);
    assert!(alive(grandchild));
    std::fs::remove_file(&pidfile).unwrap();
    let agent = c.start_agent("agent-1", addr);
    agent.wait_log("starting it again");
    eventually("old grandchild killed", PATIENCE, || {
        (!alive(grandchild)).then_some(())
    });
    // The new process and its new grandchild are what the cgroup holds.
    let new_grandchild = read_pid(&pidfile);
    assert!(alive(new_grandchild));
    let listed = std::fs::read_to_string(root.join("nodes/g/cgroup.procs")).unwrap();
    assert!(
        !listed.lines().any(|l| l == grandchild.to_string()),
        "{listed}"
    );
    drop(agent);
}

/// Without cgroups, a node's descendant in a session of its own outlives both the
/// agent and the node's main process; the next agent finds it by the spawn token's
/// prefix (its state dir's), also when the node's record is gone.
fn without_cgroups_leftovers_of_a_dead_node_are_killed(remove_record: bool) {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let args = ["--controller", &addr.to_string(), "--cgroup-root", "none"];
    let mut agent = c.start_agent_args("agent-1", "agent-1", &args);
    connect(&c, addr);
    let (body, pidfile) = double_fork_node(c.dir.path(), false);
    let (code, v) = deploy(&c, addr, &body);
    assert_eq!(code, Some(0), "{v}");
    let grandchild = read_pid(&pidfile);
    let main = u32::try_from(node_status(&c, addr, "g")["pid"].as_u64().unwrap()).unwrap();
    agent.kill();
    sigkill_and_wait(main);
    assert!(
        alive(grandchild),
        "in a session of its own, not killed with main"
    );
    std::fs::remove_file(&pidfile).unwrap();
    if remove_record {
        let record = c.dir.path().join("agent-agent-1/nodes/g/record.json");
        std::fs::remove_file(&record).unwrap();
    }
    let agent = c.start_agent_args("agent-1", "agent-1", &args);
    eventually("old grandchild killed", PATIENCE, || {
        (!alive(grandchild)).then_some(())
    });
    // The node itself runs again, with a new grandchild that is left alone.
    let new_grandchild = read_pid(&pidfile);
    assert_ne!(new_grandchild, grandchild);
    assert!(alive(new_grandchild));
    drop(agent);
}

#[test]
fn without_cgroups_leftovers_of_a_node_that_died_with_the_agent_are_killed() {
    without_cgroups_leftovers_of_a_dead_node_are_killed(false);
}

#[test]
fn without_cgroups_leftovers_are_killed_even_without_the_nodes_record() {
    without_cgroups_leftovers_of_a_dead_node_are_killed(true);
}

/// A node whose process ended for good under its policy (failed under `never`, or
/// exited 0 under `on-failure`) stays so when the agent is SIGKILLed and restarted, and
/// when it is stopped and started again (`--on-exit stop`, which stops the nodes that
/// run): FAILED stays FAILED, not STOPPED.
#[test]
fn a_node_that_ended_for_good_is_not_started_again_by_a_new_agent() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    connect(&c, addr);
    let runs = |name: &str| c.dir.path().join(format!("{name}.runs"));
    let node = |name: &str, policy: &str, code: i32| {
        let script = format!("echo run >> {}; exit {code}", runs(name).display());
        format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\nrestart = \"{policy}\"\ncommand = [\"/bin/sh\", \"-c\", {}]\n",
            Value::String(script)
        )
    };
    let body = format!(
        "{}{}",
        node("failed", "never", 3),
        node("done", "on-failure", 0)
    );
    let _ = deploy(&c, addr, &body);
    let settled = |c: &Cluster| {
        let failed = node_status(c, addr, "failed");
        let done = node_status(c, addr, "done");
        (failed["state"] == "FAILED" && done["state"] == "STOPPED").then_some((failed, done))
    };
    eventually("both ended", PATIENCE, || settled(&c));
    agent.kill();
    let agent = c.start_agent("agent-1", addr);
    eventually("the new agent connected", PATIENCE, || {
        (agent.log_text().matches("connected to controller").count() >= 2).then_some(())
    });
    // The new agent decided before it connected: a start would show as a second run.
    eventually("both still ended", PATIENCE, || settled(&c));
    for name in ["failed", "done"] {
        let text = std::fs::read_to_string(runs(name)).unwrap();
        assert_eq!(text.lines().count(), 1, "{name} ran again: {text}");
    }
    let mut agent = agent;
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(PATIENCE);
    let agent = c.start_agent("agent-1", addr);
    eventually("the third agent connected", PATIENCE, || {
        (agent.log_text().matches("connected to controller").count() >= 3).then_some(())
    });
    let (failed, done) = eventually("both still ended", PATIENCE, || settled(&c));
    assert_eq!(failed["state"], "FAILED", "{failed}");
    assert_eq!(done["state"], "STOPPED", "{done}");
    for name in ["failed", "done"] {
        let text = std::fs::read_to_string(runs(name)).unwrap();
        assert_eq!(text.lines().count(), 1, "{name} ran again: {text}");
    }
    // An operator's restart still starts it.
    let out = c.drover(addr, &["restart", "failed"]);
    assert!(
        out.stdout.contains("\"failed\""),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    eventually("ran again", PATIENCE, || {
        (std::fs::read_to_string(runs("failed"))
            .ok()?
            .lines()
            .count()
            == 2)
            .then_some(())
    });
    drop(agent);
}
