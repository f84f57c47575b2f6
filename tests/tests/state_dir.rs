//! The daemons' state dirs: one agent or controller process per dir (a second one refuses
//! to start and names the holder, without touching its nodes or records; a SIGKILLed
//! holder frees it), and node sockets that work however long the dir's path is.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use drover_proto::msg::PeerRole;
use drover_tests::disk::{Mounted, fill};
use drover_tests::{Cluster, PATIENCE, Proc, bin, eventually};

/// Starts agent `name` (its certificate issued if needed) on `state_dir`, dialling
/// `controller`, logging to `<log>.log`.
fn agent(c: &Cluster, name: &str, log: &str, state_dir: &Path, controller: SocketAddr) -> Proc {
    agent_exiting(c, name, log, state_dir, controller, "keep")
}

/// [`agent`] with `--on-exit on_exit`.
fn agent_exiting(
    c: &Cluster,
    name: &str,
    log: &str,
    state_dir: &Path,
    controller: SocketAddr,
    on_exit: &str,
) -> Proc {
    agent_with(c, name, log, state_dir, controller, &["--on-exit", on_exit])
}

/// [`agent`] with `extra` flags.
fn agent_with(
    c: &Cluster,
    name: &str,
    log: &str,
    state_dir: &Path,
    controller: SocketAddr,
    extra: &[&str],
) -> Proc {
    if !c.pki_file(&format!("{name}.crt")).exists() {
        c.issue(PeerRole::Agent, name);
    }
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.arg("--name")
        .arg(name)
        .arg("--controller")
        .arg(controller.to_string())
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--cert")
        .arg(c.pki_file(&format!("{name}.crt")))
        .arg("--key")
        .arg(c.pki_file(&format!("{name}.key")))
        .args(["--reconnect-max", "500ms", "--keep-alive", "500ms"])
        .args(["--idle-timeout", "2s"])
        .args(extra);
    Proc::spawn(name, cmd, c.dir.path().join(format!("{log}.log")))
}

/// Agent-1 on `<test dir>/agent-state`, logging to `agent-first.log`, once connected.
fn first_agent(c: &Cluster, controller: SocketAddr) -> (PathBuf, Proc) {
    let state = c.dir.path().join("agent-state");
    let first = agent(c, "agent-1", "agent-first", &state, controller);
    first.wait_log("connected to controller");
    (state, first)
}

/// Node `name` of agent-1 running `drover-testprog`, RUNNING once spawned.
fn testprog_node(name: &str) -> String {
    format!(
        "[nodes.{name}]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        bin("drover-testprog").display()
    )
}

/// Two nodes on agent-1, `keep` and `gone`, or `keep` alone.
fn keep_and_gone(both: bool) -> String {
    if both {
        testprog_node("keep") + &testprog_node("gone")
    } else {
        testprog_node("keep")
    }
}

#[test]
fn a_removed_nodes_directory_stays_by_default_and_goes_after_the_retention_set() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let state = c.dir.path().join("agent-state");
    let nodes = state.join("nodes");
    let mut first = agent(&c, "agent-1", "agent-keeping", &state, addr);
    first.wait_log("connected to controller");
    deploy(&c, addr, &keep_and_gone(true));
    let gone_pid = ready_pid(&c, addr, "gone");
    assert!(nodes.join("gone/work").is_dir());
    deploy(&c, addr, &keep_and_gone(false));
    eventually("gone's process to end", PATIENCE, || {
        (!Path::new(&format!("/proc/{gone_pid}")).exists()).then_some(())
    });
    // The agent learns of the exit a moment after the process is gone.
    eventually("gone's record to go", PATIENCE, || {
        (!nodes.join("gone/record.json").exists()).then_some(())
    });
    // By default a removed node's directory stays, however long ago it was removed
    // (here: a day, by its mtime).
    first.kill();
    std::fs::File::open(nodes.join("gone"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(86_400))
        .unwrap();
    let mut second = agent(&c, "agent-1", "agent-default", &state, addr);
    second.wait_log("connected to controller");
    let keep_pid = ready_pid(&c, addr, "keep");
    deploy(&c, addr, &keep_and_gone(false));
    assert!(nodes.join("gone/work").is_dir());
    assert!(!second.log_text().contains("deleting the directory"));
    second.kill();

    // What an agent killed while deleting left behind.
    std::fs::create_dir_all(nodes.join(".pruned-old-0000abcd/work")).unwrap();
    std::fs::write(nodes.join(".pruned-old-0000abcd/stdout.log"), "x\n").unwrap();

    // With a retention, it goes once removed that long, and so do the leftovers; the
    // live node's stays.
    let third = agent_with(
        &c,
        "agent-1",
        "agent-pruning",
        &state,
        addr,
        &["--removed-node-retention", "1s"],
    );
    third.wait_log("connected to controller");
    third.wait_log("deleting the directory of a node removed more than 1s ago");
    eventually("gone's directory to be deleted", PATIENCE, || {
        let left: Vec<_> = std::fs::read_dir(&nodes)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        (left == ["keep"]).then_some(())
    });
    assert_eq!(
        ready_pid(&c, addr, "keep"),
        keep_pid,
        "the live node was touched"
    );
    assert!(nodes.join("keep/record.json").exists());
    // Deployed again under its name, the node gets a new directory and runs.
    deploy(&c, addr, &keep_and_gone(true));
    ready_pid(&c, addr, "gone");
    assert!(nodes.join("gone/record.json").exists());
}

fn deploy(c: &Cluster, addr: SocketAddr, nodes: &str) {
    let file = c.dir.path().join("cluster.toml");
    std::fs::write(&file, format!("[instances.agent-1]\n{nodes}")).unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
}

/// The pid of `node` on agent-1, once it runs.
fn ready_pid(c: &Cluster, addr: SocketAddr, node: &str) -> u64 {
    eventually(&format!("{node} running"), PATIENCE, || {
        let v = c.drover(addr, &["get-nodes", "--fresh"]).json();
        let n = &v["results"]["agent-1"][node];
        (n["state"] == "RUNNING")
            .then(|| n["pid"].as_u64())
            .flatten()
    })
}

#[test]
fn a_second_agent_on_the_same_state_dir_refuses_to_start_and_names_the_holder() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let (state, mut first) = first_agent(&c, addr);
    deploy(&c, addr, &testprog_node("n1"));
    let pid = ready_pid(&c, addr, "n1");
    let record_before = std::fs::read(state.join("nodes/n1/record.json")).unwrap();

    let mut second = agent(&c, "agent-1", "agent-second", &state, addr);
    let status = second.wait_exit(PATIENCE);
    assert!(!status.success(), "the second agent must fail: {status}");
    let log = second.log_text();
    assert!(
        log.contains(&format!("is in use by another agent (pid {}", first.pid())),
        "{log}"
    );
    assert!(
        !log.contains("adopt") && !log.contains("connected to controller"),
        "the second agent went further than its lock: {log}"
    );
    // The first agent and its node are untouched.
    assert_eq!(ready_pid(&c, addr, "n1"), pid);
    assert_eq!(
        std::fs::read(state.join("nodes/n1/record.json")).unwrap(),
        record_before,
        "the node's record was rewritten"
    );
    assert!(!first.log_text().contains("lost the controller"));

    // SIGKILL leaves no chance to unlock: the kernel releases the lock, and a new agent
    // starts and adopts the node with its pid.
    first.kill();
    let third = agent(&c, "agent-1", "agent-third", &state, addr);
    third.wait_log("connected to controller");
    assert_eq!(ready_pid(&c, addr, "n1"), pid, "adopted, not restarted");
    let lock = std::fs::read_to_string(state.join("agent.lock")).unwrap();
    assert_eq!(lock.trim(), third.pid().to_string());
}

/// Every file in the controller's state dir, with its contents.
fn controller_files(c: &Cluster) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(c.dir.path().join("controller"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "controller.lock")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_second_controller_on_the_same_state_dir_refuses_to_start_and_names_the_holder() {
    let c = Cluster::new();
    let (mut first, addr) = c.start_controller("127.0.0.1:0");
    let state = c.dir.path().join("agent-state");
    let agent1 = agent(&c, "agent-1", "agent", &state, addr);
    agent1.wait_log("connected to controller");
    deploy(&c, addr, &testprog_node("n1"));
    let pid = ready_pid(&c, addr, "n1");
    let deployed = c.drover(addr, &["get-config", "--deployed"]).stdout;
    let files = controller_files(&c);
    assert!(
        files.iter().any(|(name, _)| name == "deployed.json"),
        "{files:?}"
    );

    // Another port, so that only the state dir is shared.
    let mut cmd = Command::new(bin("drover-controller"));
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let mut second = Proc::spawn("controller-2", cmd, c.log_path("controller-2"));
    let status = second.wait_exit(PATIENCE);
    assert!(
        !status.success(),
        "the second controller must fail: {status}"
    );
    let log = second.log_text();
    assert!(
        log.contains(&format!(
            "is in use by another controller (pid {}",
            first.pid()
        )),
        "{log}"
    );
    assert!(!log.contains("controller listening"), "{log}");
    // Nothing in the dir was touched, and the first controller serves as before.
    assert_eq!(controller_files(&c), files);
    assert_eq!(
        c.drover(addr, &["get-config", "--deployed"]).stdout,
        deployed
    );
    assert_eq!(ready_pid(&c, addr, "n1"), pid);

    // SIGKILL leaves no chance to unlock: the kernel releases the lock, and a new
    // controller starts on the dir with the deploy it holds.
    first.kill();
    let (third, addr) = c.start_controller("127.0.0.1:0");
    let lock = std::fs::read_to_string(c.dir.path().join("controller/controller.lock")).unwrap();
    assert_eq!(lock.trim(), third.pid().to_string());
    assert_eq!(
        c.drover(addr, &["get-config", "--deployed"]).stdout,
        deployed
    );
}

/// A directory under the test's dir whose path is about 150 bytes long.
fn long_dir(base: &Path) -> PathBuf {
    let mut dir = base.to_owned();
    while dir.as_os_str().len() < 140 {
        dir.push("a-long-state-directory");
    }
    dir.push("agent");
    assert!(dir.as_os_str().len() >= 145, "{}", dir.display());
    dir
}

#[test]
fn a_long_state_dir_gets_short_socket_paths_and_nodes_start() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let state = long_dir(c.dir.path());
    let first = agent(&c, "agent-1", "agent-long", &state, addr);
    first.wait_log("connected to controller");
    // Its log keeper listens in the state dir, through a short name of the directory:
    // nodes write through it (a node's pipe left to an agent that reads none dies of
    // SIGPIPE when that agent goes).
    first.wait_log("log keeper connected");
    assert!(state.join("log-keeper.sock").exists());
    // A node name of the longest length a name may have, with notify readiness (the
    // agent's socket) and a value to query (the node's socket).
    let node = "n".repeat(drover_proto::name::MAX_LEN);
    deploy(
        &c,
        addr,
        &format!(
            "[nodes.{node}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--ready-after\", \"100ms\", \"--value\", \"answer=42\"]\nreadiness = {{ kind = \"notify\", timeout = \"20s\" }}\n",
            bin("drover-testprog").display()
        ),
    );
    let pid = ready_pid(&c, addr, &node);
    let out = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    assert!(
        out.to_string_lossy().starts_with("pipe:"),
        "stdout {}",
        out.display()
    );
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let var = |name: &str| {
        env.split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {name} in the node's environment"))
    };
    for name in ["NOTIFY_SOCKET", "DROVER_QUERY_SOCKET"] {
        let path = var(name);
        assert!(path.len() <= 107, "{name}={path} is {} bytes", path.len());
        // Through the short name, the socket is the one in the node's own directory.
        let file = Path::new(&path).file_name().unwrap();
        assert!(
            state.join("nodes").join(&node).join(file).exists(),
            "{name}={path} is not in the node's directory"
        );
    }
    let v = eventually("the node answers a query", PATIENCE, || {
        let out = c.drover(addr, &["get-id-value", "answer"]);
        (out.code == Some(0)).then(|| out.json())
    });
    assert_eq!(v["results"][&node], 42, "{v}");
    // The next agent process on the dir gets the same paths and adopts the node.
    let mut first = first;
    first.kill();
    let second = agent(&c, "agent-1", "agent-long-2", &state, addr);
    second.wait_log("connected to controller");
    assert_eq!(ready_pid(&c, addr, &node), pid);
    let v = c.drover(addr, &["get-id-value", "answer"]).json();
    assert_eq!(v["results"][&node], 42, "{v}");
    // The short link stays while a node uses it: after a SIGKILL, and after a SIGTERM
    // that leaves the nodes running. An agent that stops its nodes on SIGTERM removes
    // it, so that it does not outlive the state dir.
    let link = Path::new(&var("NOTIFY_SOCKET"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned();
    assert!(link.starts_with("/tmp"), "{}", link.display());
    let mut second = second;
    second.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(second.wait_exit(PATIENCE).success());
    let kept = std::fs::symlink_metadata(&link).is_ok();
    let mut third = agent_exiting(&c, "agent-1", "agent-long-3", &state, addr, "stop");
    third.wait_log("connected to controller");
    assert_eq!(ready_pid(&c, addr, &node), pid);
    third.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(third.wait_exit(PATIENCE).success());
    let left = std::fs::symlink_metadata(&link).is_ok();
    let _ = std::fs::remove_file(&link);
    assert!(kept, "{} went while its node ran", link.display());
    assert!(!left, "{} is left behind", link.display());
}

/// `systemctl restart drover-agent`, or a reboot, under the default `--on-exit stop`:
/// SIGTERM makes the agent stop its nodes, and the next agent process starts again every
/// node that was running or about to run, since the deploy still wants it; a node that
/// had ended for good under its policy, or that an operator stopped, stays stopped.
#[test]
fn nodes_stopped_with_their_agent_run_again_with_the_next_one() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let state = c.dir.path().join("agent-state");
    let mut first = agent_exiting(&c, "agent-1", "agent-first", &state, addr, "stop");
    first.wait_log("connected to controller");
    let done = "[nodes.done]\ninstance = \"agent-1\"\ncommand = [\"true\"]\n\
                readiness = { kind = \"start-period\", period = \"0s\" }\n";
    deploy(
        &c,
        addr,
        &(testprog_node("run") + &testprog_node("held") + done),
    );
    let run = ready_pid(&c, addr, "run");
    ready_pid(&c, addr, "held");
    let out = c.drover(addr, &["stop", "held"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let state_of = |node: &str| {
        let v = c.drover(addr, &["get-nodes", "--fresh"]).json();
        v["results"]["agent-1"][node]["state"]
            .as_str()
            .map(str::to_owned)
    };
    eventually("done and held STOPPED", PATIENCE, || {
        (state_of("done").as_deref() == Some("STOPPED")
            && state_of("held").as_deref() == Some("STOPPED"))
        .then_some(())
    });

    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.wait_exit(PATIENCE).success());
    assert!(
        !Path::new(&format!("/proc/{run}")).exists(),
        "the agent stopped its node on exit"
    );
    let second = agent_exiting(&c, "agent-1", "agent-second", &state, addr, "stop");
    second.wait_log("connected to controller");
    let again = ready_pid(&c, addr, "run");
    assert_ne!(again, run, "started anew");
    assert_eq!(
        state_of("held").as_deref(),
        Some("STOPPED"),
        "the operator's stop holds"
    );
    assert_eq!(
        state_of("done").as_deref(),
        Some("STOPPED"),
        "it ended for good"
    );
    let v = c.drover(addr, &["get-nodes"]).json();
    assert!(v["results"]["agent-1"]["held"]["pid"].is_null(), "{v}");
    assert!(v["results"]["agent-1"]["done"]["pid"].is_null(), "{v}");
}

/// A host rebooted: its nodes died with it, and a record's pid and start time (ticks
/// since boot) may now name another program's process, as a boot much like the last one
/// hands out the same pids at the same moments. The agent must not take that process
/// for its node: it starts the node anew and never signals the other process.
#[test]
fn after_a_reboot_a_recorded_pid_naming_another_process_is_not_adopted() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let (state, mut first) = first_agent(&c, addr);
    deploy(&c, addr, &testprog_node("n1"));
    let old = ready_pid(&c, addr, "n1");
    let record_path = state.join("nodes/n1/record.json");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(
        record["process"]["boot"],
        boot.trim(),
        "the record names its boot"
    );

    // The "reboot": the agent and the node die; another program runs under a pid the
    // record will name, with that program's own start time.
    first.kill();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(old).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut other = Reaped(Command::new("sleep").arg("1000").spawn().unwrap());
    let other_pid = other.0.id();
    let stat = std::fs::read_to_string(format!("/proc/{other_pid}/stat")).unwrap();
    let ticks: u64 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let mut record = record;
    record["process"]["pid"] = other_pid.into();
    record["process"]["start_ticks"] = ticks.into();
    record["process"]["boot"] = "00000000-0000-4000-8000-000000000000".into();
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();

    let second = agent(&c, "agent-1", "agent-second", &state, addr);
    second.wait_log("connected to controller");
    let new = ready_pid(&c, addr, "n1");
    assert_ne!(new, u64::from(other_pid), "another boot's pid was adopted");
    assert_ne!(new, old);
    let out = c.drover(addr, &["stop", "n1"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        other.0.try_wait().unwrap().is_none(),
        "the other program was signalled"
    );
    assert!(
        !second.log_text().contains("adopted running node"),
        "{}",
        second.log_text()
    );
}

/// A child killed and reaped when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node's `STATUS=` text belongs to its process: an agent started again shows what the
/// adopted process last said (a program that says it once, at start, would otherwise
/// show nothing for the rest of its life).
#[test]
fn a_nodes_status_text_outlives_its_agents_restart() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let (state, mut first) = first_agent(&c, addr);
    let prog = bin("drover-testprog").display().to_string();
    deploy(
        &c,
        addr,
        &format!(
            "[nodes.talker]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \"--status\", \"serving 3 interfaces\"]\n"
        ),
    );
    // Its pid and status text, once it has a pid.
    let shown = || {
        let v = c.drover(addr, &["get-nodes", "--fresh", "--full"]).json();
        let n = &v["results"]["agent-1"]["talker"];
        Some((
            n["pid"].as_u64()?,
            n["status_text"].as_str().map(str::to_owned),
        ))
    };
    let (pid, _) = eventually("talker's status", PATIENCE, || {
        shown().filter(|(_, text)| text.is_some())
    });

    first.kill();
    let second = agent(&c, "agent-1", "agent-second", &state, addr);
    second.wait_log("connected to controller");
    let (_, text) = eventually("talker adopted", PATIENCE, || {
        shown().filter(|(p, _)| *p == pid)
    });
    assert_eq!(
        text.as_deref(),
        Some("serving 3 interfaces"),
        "{}",
        second.log_text()
    );
}

/// A full disk keeps no agent from running: one started again on it adopts its nodes
/// (the pid in its lock file is written over the last one's, needing no new block), and
/// one on a disk without room even for its pid runs, warns, and refuses a deploy it
/// cannot record, saying why. A controller on a fresh state dir there starts too.
#[test]
fn agents_start_on_a_full_disk() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let disk = c.dir.path().join("disk");
    let _mount = Mounted::tmpfs(&disk, "1m");
    let state = disk.join("agent-1");
    let mut first = agent(&c, "agent-1", "agent-first", &state, addr);
    first.wait_log("connected to controller");
    deploy(&c, addr, &testprog_node("steady"));
    let pid = ready_pid(&c, addr, "steady");

    first.kill();
    let _filler = fill(&disk);
    let second = agent(&c, "agent-1", "agent-second", &state, addr);
    second.wait_log("connected to controller");
    assert_eq!(ready_pid(&c, addr, "steady"), pid, "adopted");
    let lock = std::fs::read_to_string(state.join("agent.lock")).unwrap();
    assert_eq!(lock.trim(), second.pid().to_string());

    let fresh = disk.join("agent-2");
    std::fs::create_dir(&fresh).unwrap();
    let other = agent(&c, "agent-2", "agent-2", &fresh, addr);
    other.wait_log("connected to controller");
    assert!(
        other.log_text().contains("cannot write this process's pid"),
        "{}",
        other.log_text()
    );
    let file = c.dir.path().join("two.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[instances.agent-2]\n{}[nodes.new]\ninstance = \"agent-2\"\ncommand = [\"sleep\", \"100\"]\n",
            testprog_node("steady")
        ),
    )
    .unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stdout.contains("No space left on device"),
        "{}",
        out.stdout
    );
    assert_eq!(ready_pid(&c, addr, "steady"), pid, "untouched");

    // A controller on a fresh state dir there starts too, its stateless reset key kept
    // for the run only.
    let mut cmd = Command::new(bin("drover-controller"));
    c.controller_args_in(&mut cmd, "127.0.0.1:0", &disk.join("controller"));
    let ctl = Proc::spawn("controller-full", cmd, c.dir.path().join("ctl-full.log"));
    ctl.wait_log("controller listening");
    assert!(
        ctl.log_text().contains("using one for this run only"),
        "{}",
        ctl.log_text()
    );
}

/// Log keeper processes serving `state`.
fn keepers_of(state: &Path) -> usize {
    let needle = format!("log-keeper\0{}", state.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| String::from_utf8_lossy(cmd).contains(&needle))
        .count()
}

/// The state dir removed under a running agent (a cleanup script): within seconds the
/// agent makes it again (its lock, the node directories, notify sockets and records) and
/// its log keeper takes back its socket (the log files come back with the next line).
/// A second agent still cannot start on it, a node pinging its watchdog is not killed
/// for the pings it could not send meanwhile, a node's output reaches its file again,
/// and an agent started again adopts every node with its pid, through the same keeper.
#[test]
fn a_state_dir_removed_under_its_agent_is_made_again() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let (state, mut first) = first_agent(&c, addr);
    let prog = bin("drover-testprog").display().to_string();
    deploy(
        &c,
        addr,
        &format!(
            "[nodes.chatty]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \"--stdout-rate\", \"20\"]\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             [nodes.dog]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \"--ready-after\", \"0ms\", \"--watchdog\"]\n\
             readiness = {{ kind = \"notify\" }}\nwatchdog = \"4s\"\n"
        ),
    );
    let chatty = ready_pid(&c, addr, "chatty");
    let dog = ready_pid(&c, addr, "dog");
    assert_eq!(keepers_of(&state), 1);

    // Removed while the keeper writes there: taken again until it is gone once.
    eventually(
        "the state dir removed",
        PATIENCE,
        || match std::fs::remove_dir_all(&state) {
            Ok(()) => Some(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(()),
            Err(_) => None,
        },
    );
    eventually("the state dir made again", PATIENCE, || {
        [
            "agent.lock",
            "log-keeper.sock",
            "nodes/chatty/record.json",
            "nodes/dog/record.json",
            "nodes/dog/notify.sock",
        ]
        .iter()
        .all(|f| state.join(f).exists())
        .then_some(())
    });
    assert!(
        first
            .log_text()
            .contains("was removed or replaced under this agent"),
        "{}",
        first.log_text()
    );

    let mut second = agent(&c, "agent-1", "agent-second", &state, addr);
    assert!(!second.wait_exit(PATIENCE).success());
    assert!(
        second.log_text().contains("is in use by another agent"),
        "{}",
        second.log_text()
    );
    let log = state.join("nodes/chatty/stdout.log");
    eventually("chatty's lines in its new file", PATIENCE, || {
        (std::fs::read_to_string(&log).ok()?.lines().count() >= 5).then_some(())
    });

    first.kill();
    let third = agent(&c, "agent-1", "agent-third", &state, addr);
    third.wait_log("connected to controller");
    assert_eq!(ready_pid(&c, addr, "chatty"), chatty, "chatty adopted");
    assert_eq!(ready_pid(&c, addr, "dog"), dog, "dog adopted, never killed");
    assert!(
        third.log_text().contains("log keeper connected pipes=4"),
        "{}",
        third.log_text()
    );
    assert_eq!(keepers_of(&state), 1, "the same keeper");
    let v = c.drover(addr, &["get-nodes", "--full"]).json();
    assert!(
        v["results"]["agent-1"]["dog"]["last_failure"].is_null(),
        "{v}"
    );
}

/// The controller's state dir removed under it (a cleanup script): within seconds it is
/// made again, private, with the lock, the deploy records and the reset key. A second
/// controller still cannot start on it, a deploy is recorded and audited in a new trail,
/// and a controller started again on it has the deployed configuration.
#[test]
fn a_state_dir_removed_under_its_controller_is_made_again() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let (_state, _agent) = first_agent(&c, addr);
    deploy(&c, addr, &testprog_node("n1"));
    let pid = ready_pid(&c, addr, "n1");
    let dir = c.dir.path().join("controller");
    let key = std::fs::read(dir.join("quic-reset.key")).unwrap();

    // The trail goes with the directory, the first deploy's records with it.
    c.audit_trail_drops_records();
    std::fs::remove_dir_all(&dir).unwrap();
    let files = [
        "controller.lock",
        "staged.json",
        "desired.json",
        "deployed.json",
        "quic-reset.key",
    ];
    eventually("the controller's state dir made again", PATIENCE, || {
        files.iter().all(|f| dir.join(f).exists()).then_some(())
    });
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for f in files.iter().filter(|f| **f != "controller.lock") {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(std::fs::read(dir.join("quic-reset.key")).unwrap(), key);
    assert!(
        ctl.log_text()
            .contains("was removed or replaced under this controller"),
        "{}",
        ctl.log_text()
    );
    let lock = std::fs::read_to_string(dir.join("controller.lock")).unwrap();
    assert_eq!(lock.trim(), ctl.pid().to_string());

    let mut cmd = Command::new(bin("drover-controller"));
    c.controller_args(&mut cmd, "127.0.0.1:0");
    let mut second = Proc::spawn("controller-2", cmd, c.log_path("controller-2"));
    assert!(!second.wait_exit(PATIENCE).success());
    assert!(
        second.log_text().contains(&format!(
            "is in use by another controller (pid {}",
            ctl.pid()
        )),
        "{}",
        second.log_text()
    );

    // A deploy after the removal is recorded and audited.
    deploy(
        &c,
        addr,
        &format!("{}{}", testprog_node("n1"), testprog_node("n2")),
    );
    ready_pid(&c, addr, "n2");
    let out = c.drover(addr, &["audit"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let records: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let what: Vec<(&str, u64)> = records
        .iter()
        .map(|r| {
            (
                r["what"].as_str().unwrap(),
                r["generation"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        what,
        [("stage_config", 1), ("deploy", 2)],
        "only what came after the removal: {records:?}"
    );
    let deployed = c.drover(addr, &["get-config", "--deployed"]).stdout;

    ctl.kill();
    let (_again, addr) = c.start_controller(&addr.to_string());
    assert_eq!(
        c.drover(addr, &["get-config", "--deployed"]).stdout,
        deployed
    );
    assert_eq!(ready_pid(&c, addr, "n1"), pid, "n1 never restarted");
}
