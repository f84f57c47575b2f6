//! An agent whose supervisor stops getting anything done exits with an error after
//! `--stall-timeout`, and leaves its nodes running for the next agent process, which
//! adopts them; `--stall-timeout 0` never gives up. The stall is real: the spawner
//! blocks opening a FIFO that sits where a Zeek node's `cluster-layout.zeek` goes (a
//! working directory on a hung mount would do the same).

use std::net::SocketAddr;
use std::time::Duration;

use drover_proto::msg::PeerRole;
use drover_tests::{Cluster, PATIENCE, Proc, bin, eventually, eventually_or_none};

/// `steady`, and with `manager` also `mgr`, a Zeek manager (so it gets a layout file)
/// working in `workdir`.
fn cluster_file(c: &Cluster, workdir: &std::path::Path, manager: bool) -> std::path::PathBuf {
    let prog = bin("drover-testprog");
    let node = |name: &str, extra: &str| {
        format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n{extra}",
            prog.display()
        )
    };
    let mut text = String::from("[instances.agent-1]\n");
    text.push_str(&node("steady", ""));
    if manager {
        text.push_str(&node(
            "mgr",
            &format!("role = \"manager\"\nworkdir = \"{}\"\n", workdir.display()),
        ));
    }
    let path = c.dir.path().join(format!("cluster-{manager}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `node`'s state and pid on agent-1, as the controller last heard.
fn node(c: &Cluster, addr: SocketAddr, node: &str) -> (String, Option<u64>) {
    let v = c.drover(addr, &["get-nodes"]).json();
    let n = &v["results"]["agent-1"][node];
    (
        n["state"].as_str().unwrap_or("").to_owned(),
        n["pid"].as_u64(),
    )
}

fn agent(c: &Cluster, addr: SocketAddr, stall_timeout: &str) -> Proc {
    c.start_agent_args(
        "agent-1",
        "agent-1",
        &[
            "--controller",
            &addr.to_string(),
            "--stall-timeout",
            stall_timeout,
            "--on-exit",
            "keep",
        ],
    )
}

#[test]
fn a_stalled_agent_exits_and_leaves_its_nodes_to_the_next_and_zero_never_gives_up() {
    let c = Cluster::new();
    c.issue(PeerRole::Agent, "agent-1");
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut first = agent(&c, addr, "1s");
    first.wait_log("connected to controller");
    let workdir = c.dir.path().join("mgr-work");
    std::fs::create_dir(&workdir).unwrap();
    let steady_file = cluster_file(&c, &workdir, false);
    let out = c.drover(addr, &["deploy-config", steady_file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let steady = eventually("steady running", PATIENCE, || {
        match node(&c, addr, "steady") {
            (state, Some(pid)) if state == "RUNNING" => Some(pid),
            _ => None,
        }
    });

    // Nobody writes the FIFO: the spawner blocks opening it to compare the layout.
    let fifo = workdir.join("cluster-layout.zeek");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let both = cluster_file(&c, &workdir, true);
    let out = c.drover(addr, &["deploy-config", both.to_str().unwrap()]);
    assert_ne!(
        out.code,
        Some(0),
        "a deploy its agent gave up on cannot succeed"
    );
    let status = first.wait_exit(PATIENCE);
    assert!(
        !status.success(),
        "a stalled agent exits with an error: {status}"
    );
    let log = first.log_text();
    assert!(
        log.contains("the supervisor has not answered for 1s"),
        "the reason is in its log: {log}"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{steady}")).exists(),
        "its nodes keep running"
    );

    // The next agent adopts `steady` and blocks on the FIFO too, but with 0 it waits for
    // as long as it takes: well past the second its predecessor gave up at.
    let mut second = agent(&c, addr, "0");
    second.wait_log("connected to controller");
    eventually("steady adopted, same process", PATIENCE, || {
        (node(&c, addr, "steady") == ("RUNNING".to_owned(), Some(steady))).then_some(())
    });
    let ended = eventually_or_none(Duration::from_secs(4), || second.exited());
    assert!(ended.is_none(), "--stall-timeout 0 gave up: {ended:?}");

    // A writer comes and goes: the spawner reads nothing, writes the layout over the FIFO
    // and starts `mgr`.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    eventually("mgr running", PATIENCE, || {
        (node(&c, addr, "mgr").0 == "RUNNING").then_some(())
    });
    assert!(
        std::fs::read_to_string(&fifo)
            .unwrap()
            .contains("Cluster::nodes"),
        "the layout replaced the FIFO"
    );
    assert_eq!(node(&c, addr, "steady").1, Some(steady), "steady untouched");
}
