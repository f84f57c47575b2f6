//! One live connection per agent identity: a second process with an agent's certificate
//! is refused while the first answers (and wins once the first stops answering); the
//! refused one stops its nodes until it is accepted, so none runs twice; a reconnect of
//! the same agent is not refused, and an agent that both dials and listens keeps one
//! connection.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_tests::lossy::{Impairment, LossyLink};
use drover_tests::{
    Cluster, PATIENCE, Proc, bin, eventually, free_tcp, free_udp_port, metric_value, scrape,
};
use nix::sys::signal::Signal;

/// Starts agent-1 (certificate `agent-1.*`) on `state_dir`, logging to `<log>.log`, with
/// `extra` flags (its controller, its listener).
fn agent_1(c: &Cluster, log: &str, state_dir: &Path, extra: &[&str]) -> Proc {
    if !c.pki_file("agent-1.crt").exists() {
        c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    }
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.args(["--name", "agent-1"])
        .args(extra)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--cert")
        .arg(c.pki_file("agent-1.crt"))
        .arg("--key")
        .arg(c.pki_file("agent-1.key"))
        .args(["--reconnect-max", "500ms", "--keep-alive", "500ms"])
        .args(["--idle-timeout", "2s", "--on-exit", "keep"]);
    Proc::spawn(log, cmd, c.dir.path().join(format!("{log}.log")))
}

fn cluster_file(c: &Cluster, instance_extra: &str) -> std::path::PathBuf {
    let file = c.dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n{instance_extra}\n[nodes.n1]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    file
}

/// Pids of the processes running node `node` of any agent of this test.
fn node_processes(c: &Cluster, node: &str) -> Vec<u32> {
    let needle = format!("DROVER_NODE={node}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|d| d.starts_with(c.dir.path()))
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

fn n1_pid(c: &Cluster, addr: SocketAddr) -> u64 {
    eventually("n1 running", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes", "--fresh"]).json();
        let n = &v["results"]["agent-1"]["n1"];
        (n["state"] == "RUNNING")
            .then(|| n["pid"].as_u64())
            .flatten()
    })
}

#[test]
fn a_second_agent_with_the_same_certificate_is_refused_while_the_first_answers() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let ctl_addr = addr.to_string();
    let first = agent_1(
        &c,
        "agent-first",
        &c.dir.path().join("first"),
        &["--controller", &ctl_addr],
    );
    first.wait_log("connected to controller");
    let (mut mon, events) = c.monitor(addr, &[]);
    // The subscription is live once a deploy's start is seen.
    let file = cluster_file(&c, "");
    eventually("monitor subscribed", PATIENCE, || {
        let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let ev = events.recv_timeout(Duration::from_millis(500)).ok()?;
        (ev["event"]["type"] == "deploy_started").then_some(())
    });
    let pid = n1_pid(&c, addr);

    let second_dir = c.dir.path().join("second");
    let mut second = agent_1(
        &c,
        "agent-second",
        &second_dir,
        &["--controller", &ctl_addr],
    );
    let started = Instant::now();
    let refusal = "agent agent-1 is already connected from";
    second.wait_log(refusal);
    let event = eventually("a warning event", PATIENCE, || {
        let ev = events.recv_timeout(PATIENCE).ok()?;
        (ev["event"]["type"] == "error").then_some(ev)
    });
    let message = event["event"]["message"].as_str().unwrap();
    assert!(message.contains(refusal), "{event}");
    // Refused again after a back-off, not in a tight loop.
    eventually("a third refusal", PATIENCE, || {
        (second.log_text().matches(refusal).count() >= 3).then_some(())
    });
    let refusals = second.log_text().matches(refusal).count();
    let elapsed = started.elapsed();
    assert!(
        refusals as f64 <= elapsed.as_secs_f64() * 10.0 + 1.0,
        "{refusals} refusals in {elapsed:?}"
    );
    assert!(
        controller_log(&c).contains(&format!("refused connection: {refusal}")),
        "the controller logs the refusal"
    );
    // Exactly one copy of the node runs, the first agent's, and it never lost its
    // connection.
    assert_eq!(node_processes(&c, "n1"), vec![u32::try_from(pid).unwrap()]);
    assert!(!second_dir.join("nodes/n1").exists());
    assert_eq!(n1_pid(&c, addr), pid);
    assert!(
        !first.log_text().contains("lost the controller"),
        "{}",
        first.log_text()
    );

    // The first stops answering: the second's next attempt wins within a second or so.
    first.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    second.wait_log("connected to controller");
    let took = stopped.elapsed();
    eprintln!("the second agent took over {took:?} after the first stopped answering");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The deployed configuration follows the connection; the second starts the node
    // once its grace has passed without the first coming back (its copy, paused with
    // it, runs meanwhile: nothing can stop it).
    second.wait_log("starting the nodes stopped while another process held");
    assert!(second_dir.join("nodes/n1/record.json").exists());
    // The first, resumed, finds its connection closed and is refused in its turn; it
    // stops its copy of the node, which the second runs now.
    first.signal(Signal::SIGCONT);
    first.wait_log(refusal);
    first.wait_log(STANDING_BY);
    assert_ne!(one_copy_of_n1(&c, addr), u32::try_from(pid).unwrap());
    assert!(
        !second.log_text().contains("lost the controller"),
        "{}",
        second.log_text()
    );
    mon.kill().unwrap();
    mon.wait().unwrap();
    second.kill();
}

/// What a refused agent logs as it stops its nodes.
const STANDING_BY: &str = "this agent's nodes are stopped until the controller accepts it";

/// Waits until exactly one process runs n1, the one the controller reports.
fn one_copy_of_n1(c: &Cluster, addr: SocketAddr) -> u32 {
    eventually("exactly one copy of n1", PATIENCE, || {
        let pid = u32::try_from(n1_pid(c, addr)).unwrap();
        (node_processes(c, "n1") == vec![pid]).then_some(pid)
    })
}

#[test]
fn a_refused_agent_stops_the_nodes_it_recovered_until_it_is_accepted() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let ctl_addr = addr.to_string();
    let stale_dir = c.dir.path().join("stale");
    let metrics = free_tcp().to_string();
    let stale_args = ["--controller", &ctl_addr, "--metrics-listen", &metrics];
    let mut stale = agent_1(&c, "agent-stale", &stale_dir, &stale_args);
    stale.wait_log("connected to controller");
    let file = cluster_file(&c, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let old = u32::try_from(n1_pid(&c, addr)).unwrap();
    // Its host dies: the agent and its node are gone, its state dir stays.
    stale.kill();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(old).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    eventually("n1's process gone", PATIENCE, || {
        node_processes(&c, "n1").is_empty().then_some(())
    });

    // Another process with the same certificate takes over and runs the node.
    let mut first = agent_1(
        &c,
        "agent-first",
        &c.dir.path().join("first"),
        &["--controller", &ctl_addr],
    );
    first.wait_log("connected to controller");
    let pid = one_copy_of_n1(&c, addr);
    assert_ne!(pid, old);

    // The old one comes back: it starts the node its state dir names, as any agent
    // recovering does, then is refused and stops it again.
    let stale = agent_1(&c, "agent-stale-again", &stale_dir, &stale_args);
    stale.wait_log("already connected from");
    stale.wait_log(STANDING_BY);
    assert_eq!(one_copy_of_n1(&c, addr), pid);
    let metrics: SocketAddr = metrics.parse().unwrap();
    assert_eq!(
        metric_value(&scrape(metrics), "drover_agent_standby"),
        Some(1.0)
    );
    // It stays stopped through further refusals.
    eventually("two more refusals", PATIENCE, || {
        (stale.log_text().matches("already connected from").count() >= 3).then_some(())
    });
    assert_eq!(node_processes(&c, "n1"), vec![pid]);

    // The host of the one the controller kept dies in its turn: the waiting one is
    // accepted and starts the node again, once.
    first.kill();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    stale.wait_log("the controller accepted this agent");
    let again = one_copy_of_n1(&c, addr);
    assert!(again != pid && again != old, "{again}");
    assert_eq!(
        metric_value(&scrape(metrics), "drover_agent_standby"),
        Some(0.0)
    );
    assert_eq!(
        stale.log_text().matches(STANDING_BY).count(),
        1,
        "{}",
        stale.log_text()
    );
}

/// A paused agent that comes back before the process that replaced it has started the
/// nodes is let in again: its nodes never stopped, and never ran twice.
#[test]
fn a_paused_agent_back_within_the_grace_keeps_its_nodes() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let ctl_addr = addr.to_string();
    let args = ["--controller", ctl_addr.as_str()];
    let running = agent_1(&c, "agent-running", &c.dir.path().join("running"), &args);
    running.wait_log("connected to controller");
    let file = cluster_file(&c, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let pid = one_copy_of_n1(&c, addr);
    let standing = agent_1(&c, "agent-standing", &c.dir.path().join("standing"), &args);
    standing.wait_log(STANDING_BY);
    running.signal(Signal::SIGSTOP);
    standing.wait_log("it starts its nodes in");
    running.signal(Signal::SIGCONT);
    running.wait_log("lost the controller");
    standing.wait_log("replaced: it stands by");
    eventually("the running agent connected again", PATIENCE, || {
        (running
            .log_text()
            .matches("connected to controller")
            .count()
            >= 2)
            .then_some(())
    });
    // Past the grace the one standing by would have waited (6 s with these flags).
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(node_processes(&c, "n1"), vec![pid]);
    assert_eq!(one_copy_of_n1(&c, addr), pid);
    assert!(!standing.log_text().contains("starting the nodes stopped"));
    assert!(!running.log_text().contains(STANDING_BY));
}

/// After a controller restart, whichever process dials first is admitted. One that
/// stands by waits before it starts its nodes, and gives way to the process that runs
/// them when that one comes back, so the nodes neither run twice nor move.
#[test]
fn a_controller_restart_does_not_move_the_nodes_to_the_process_standing_by() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let ctl_addr = addr.to_string();
    let args = ["--controller", ctl_addr.as_str()];
    let running = agent_1(&c, "agent-running", &c.dir.path().join("running"), &args);
    running.wait_log("connected to controller");
    let file = cluster_file(&c, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let pid = one_copy_of_n1(&c, addr);
    let standing = agent_1(&c, "agent-standing", &c.dir.path().join("standing"), &args);
    standing.wait_log(STANDING_BY);

    // The controller restarts while the process that runs the nodes cannot dial it: the
    // one standing by is admitted first.
    running.signal(Signal::SIGSTOP);
    let mut ctl = ctl;
    ctl.kill();
    let (_ctl2, addr2) = c.start_controller(&ctl_addr);
    assert_eq!(addr2, addr);
    standing.wait_log("it starts its nodes in");
    assert_eq!(node_processes(&c, "n1"), vec![pid]);
    // The running one comes back and is let in; the other gives way and is refused.
    running.signal(Signal::SIGCONT);
    eventually("the running agent connected again", PATIENCE, || {
        (running
            .log_text()
            .matches("connected to controller")
            .count()
            >= 2)
            .then_some(())
    });
    standing.wait_log("replaced: it stands by");
    // Past the grace the one standing by would have waited (6 s with these flags).
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(node_processes(&c, "n1"), vec![pid]);
    assert_eq!(one_copy_of_n1(&c, addr), pid);
    let log = standing.log_text();
    assert!(!log.contains("starting the nodes stopped"), "{log}");
    let log = running.log_text();
    assert!(!log.contains(STANDING_BY), "{log}");
}

fn controller_log(c: &Cluster) -> String {
    std::fs::read_to_string(c.dir.path().join("controller.log")).unwrap_or_default()
}

#[test]
fn a_reconnect_of_the_same_agent_process_is_not_refused() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let link = LossyLink::start(
        addr,
        Impairment {
            loss: 0.0,
            delay: Duration::ZERO,
        },
    );
    let agent = agent_1(
        &c,
        "agent",
        &c.dir.path().join("agent"),
        &["--controller", &link.addr.to_string()],
    );
    agent.wait_log("connected to controller");
    let file = cluster_file(&c, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let pid = n1_pid(&c, addr);

    // Cut what the controller sends until the agent gives its connection up (its idle
    // timeout), then mend it: the agent dials again while the controller, which kept
    // hearing the agent, still holds the old connection.
    link.cut_replies(true);
    agent.wait_log("lost the controller");
    link.cut_replies(false);
    let mended = Instant::now();
    eventually("the agent connected again", PATIENCE, || {
        (agent.log_text().matches("connected to controller").count() >= 2).then_some(())
    });
    eprintln!(
        "reconnected {:?} after the link came back",
        mended.elapsed()
    );
    let log = agent.log_text();
    assert!(!log.contains("already connected"), "{log}");
    // The old connection ended (the agent's endpoint answered the controller's next
    // packet on it with a reset, or it did not answer the controller's probe), and
    // the new one is registered.
    let ctl_log = ctl.log_text();
    assert_eq!(
        ctl_log.matches("agent 'agent-1' connected from").count(),
        2,
        "{ctl_log}"
    );
    assert!(!ctl_log.contains("refused connection"), "{ctl_log}");
    assert_eq!(n1_pid(&c, addr), pid);
}

#[test]
fn an_agent_that_dials_and_listens_keeps_one_connection() {
    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let ctl_addr = addr.to_string();
    let agent = agent_1(
        &c,
        "agent",
        &c.dir.path().join("agent"),
        &["--controller", &ctl_addr, "--listen", &listen],
    );
    agent.wait_log("connected to controller");
    // The configuration tells the controller to dial the agent too; it does not, since
    // the agent is connected.
    let file = cluster_file(&c, &format!("host = \"127.0.0.1\"\nport = {port}\n"));
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let pid = n1_pid(&c, addr);
    // The dialler checks the registry every second: a few of its rounds.
    std::thread::sleep(Duration::from_secs(3));
    let ctl_log = ctl.log_text();
    assert_eq!(
        ctl_log.matches("agent 'agent-1' connected from").count(),
        1,
        "{ctl_log}"
    );
    assert!(
        !agent.log_text().contains("controller connected"),
        "{}",
        agent.log_text()
    );

    // A restarted controller: the agent dials it and it dials the agent, at once. One
    // connection wins and stays.
    ctl.kill();
    let (ctl2, addr2) = c.start_controller(&ctl_addr);
    assert_eq!(addr2, addr);
    assert_eq!(n1_pid(&c, addr), pid);
    std::thread::sleep(Duration::from_secs(3));
    let log2 = ctl2.log_text();
    let log2 = &log2[log2.rfind("controller listening").unwrap()..];
    let connects = log2.matches("agent 'agent-1' connected from").count();
    assert_eq!(connects, 1, "one connection, never replaced: {log2}");
    assert!(
        !log2.contains("replacing the previous connection"),
        "{log2}"
    );
    assert!(!log2.contains("agent 'agent-1' lost"), "{log2}");
    // Whichever lost the race gave up: the agent does not keep dialling while the
    // controller's connection to it lives (at most the one refusal of the race).
    assert!(log2.matches("refused connection").count() <= 1, "{log2}");
    let n = c.drover(addr, &["get-instances"]).json();
    assert!(n.get("agent-1").is_some(), "{n}");
    // Refused while its own listener's connection lived, it did not take itself for a
    // second process and stop its node.
    let log = agent.log_text();
    assert!(!log.contains(STANDING_BY), "{log}");
}
