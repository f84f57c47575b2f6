//! Deploying configurations through the controller to real agents running real node
//! processes, and acting on them: get-nodes, restart, stop, start; agent and controller
//! restarts that leave the nodes alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use drover_tests::{Cluster, PATIENCE, bin, eventually};
use serde_json::Value;

/// A cluster file with `per_agent` testprog nodes on each of `agents`.
fn cluster_file(c: &Cluster, agents: &[&str], per_agent: usize, extra: &str) -> std::path::PathBuf {
    let prog = bin("drover-testprog");
    let mut text = String::from(
        "[defaults]\nbackoff = { initial = \"10ms\" }\nreadiness = { kind = \"start-period\", period = \"0s\" }\n",
    );
    text.push_str(extra);
    for a in agents {
        text.push_str(&format!("[instances.{a}]\n"));
    }
    for a in agents {
        for i in 1..=per_agent {
            text.push_str(&format!(
                "[nodes.{a}-n{i}]\ninstance = \"{a}\"\ncommand = [\"{}\", \"--sleep-forever\"]\n",
                prog.display()
            ));
        }
    }
    let path = c.dir.path().join(format!("cluster-{}.toml", text.len()));
    std::fs::write(&path, text).unwrap();
    path
}

/// node name -> (state, pid) from get-nodes, nodes only (no agents or controller).
fn nodes(c: &Cluster, addr: SocketAddr) -> BTreeMap<String, (String, Option<u64>)> {
    let out = c.drover(addr, &["get-nodes"]);
    let v = out.json();
    let mut map = BTreeMap::new();
    for (_, nodes) in v["results"].as_object().expect("results").iter() {
        for (name, n) in nodes.as_object().expect("nodes") {
            if n["mgmt_role"].is_null() {
                map.insert(
                    name.clone(),
                    (n["state"].as_str().unwrap().to_owned(), n["pid"].as_u64()),
                );
            }
        }
    }
    map
}

fn all_running(c: &Cluster, addr: SocketAddr, count: usize) -> Option<BTreeMap<String, u64>> {
    let n = nodes(c, addr);
    (n.len() == count && n.values().all(|(s, p)| s == "RUNNING" && p.is_some()))
        .then(|| n.into_iter().map(|(k, (_, p))| (k, p.unwrap())).collect())
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn start(
    c: &Cluster,
    agents: &[&str],
) -> (drover_tests::Proc, SocketAddr, Vec<drover_tests::Proc>) {
    let (controller, addr) = c.start_controller("127.0.0.1:0");
    let procs: Vec<_> = agents.iter().map(|a| c.start_agent(a, addr)).collect();
    eventually("agents connected", PATIENCE, || {
        let out = c.drover(addr, &["get-instances"]);
        (out.json().as_object().map(|o| o.len()) == Some(agents.len())).then_some(())
    });
    (controller, addr, procs)
}

#[test]
fn deploy_get_nodes_and_minimal_redeploy() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1", "agent-2"]);
    let file = cluster_file(&c, &["agent-1", "agent-2"], 5, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["errors"], Value::Array(vec![]));
    assert_eq!(v["results"]["nodes"].as_object().unwrap().len(), 10);
    assert_eq!(v["results"]["nodes"]["agent-2-n3"]["instance"], "agent-2");
    assert_eq!(v["results"]["nodes"]["agent-2-n3"]["success"], true);
    let before = eventually("10 nodes running", PATIENCE, || all_running(&c, addr, 10));

    // get-nodes shape: agents and the controller appear with their management role.
    let g = c.drover(addr, &["get-nodes"]).json();
    assert_eq!(g["results"]["agent-1"]["agent-1"]["mgmt_role"], "AGENT");
    assert_eq!(
        g["results"]["controller"]["controller"]["mgmt_role"],
        "CONTROLLER"
    );
    assert_eq!(g["results"]["agent-1"]["agent-1-n1"]["state"], "RUNNING");

    // Deploying the same file again restarts nothing.
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(all_running(&c, addr, 10).as_ref(), Some(&before));

    // A change to one node of ten restarts exactly that node.
    let text = std::fs::read_to_string(&file).unwrap().replacen(
        "[nodes.agent-1-n2]\n",
        "[nodes.agent-1-n2]\nenv = { CHANGED = \"1\" }\n",
        1,
    );
    std::fs::write(&file, text).unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let v = out.json();
    let restarted: Vec<&String> = v["results"]["nodes"].as_object().unwrap().keys().collect();
    assert_eq!(restarted, vec!["agent-1-n2"]);
    let after = eventually("10 nodes running", PATIENCE, || all_running(&c, addr, 10));
    for (name, pid) in &before {
        if name == "agent-1-n2" {
            assert_ne!(after[name], *pid, "the changed node restarts");
            assert!(!pid_alive(*pid));
        } else {
            assert_eq!(after[name], *pid, "{name} must keep its process");
        }
    }
}

/// A redeploy that changes a node stops its process as the spec it was started under
/// says: with that spec's stop signal, not the new spec's.
#[test]
fn a_changed_node_is_stopped_with_its_old_stop_signal() {
    let c = Cluster::new();
    let (ctl, addr, agents) = start(&c, &["agent-1"]);
    let prog = bin("drover-testprog");
    let file = |extra: &str, stop: &str| {
        format!(
            "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\n\
             command = [\"{}\", \"--ignore-sigterm\"{extra}]\n{stop}\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
            prog.display()
        )
    };
    // It ignores SIGTERM; SIGINT ends it.
    let old = file("", "stop_signal = \"SIGINT\"\nstop_timeout = \"120s\"\n");
    c.deploy_text(addr, "old.toml", &old);
    let before = eventually("n running", PATIENCE, || all_running(&c, addr, 1));
    // The new spec stops with SIGTERM, which the old process ignores: sent that, it
    // would be killed only at the old spec's 120 s.
    let new = file(", \"--print\", \"v2\"", "stop_timeout = \"1s\"\n");
    let path = c.dir.path().join("new.toml");
    std::fs::write(&path, new).unwrap();
    let out = c.drover(addr, &["deploy-config", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let after = all_running(&c, addr, 1).expect("the new process runs");
    assert_ne!(after["n"], before["n"]);
    assert!(!pid_alive(before["n"]));
    let log = agents[0].log_text();
    assert!(
        !log.contains("did not end within its stop_timeout"),
        "{log}"
    );
    drop(ctl);
}

/// A crashed node started again is reported as soon as its new process runs, PENDING
/// with its new pid, not only once it is ready.
#[test]
fn a_restarted_node_is_reported_pending_before_it_is_ready() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1"]);
    let marker = c.dir.path().join("started-once");
    // Ready at once the first time; the second process takes a minute to be ready.
    let script = format!(
        "if [ -e {m} ]; then exec {p} --ready-after 60s; else touch {m}; exec {p} --ready-after 0ms; fi",
        m = marker.display(),
        p = bin("drover-testprog").display()
    );
    let text = format!(
        "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\n\
         command = [\"/bin/sh\", \"-c\", {script:?}]\nrestart = \"always\"\n\
         backoff = {{ initial = \"100ms\" }}\n\
         readiness = {{ kind = \"notify\", timeout = \"120s\" }}\n"
    );
    c.deploy_text(addr, "n.toml", &text);
    let first = eventually("n running", PATIENCE, || all_running(&c, addr, 1))["n"];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(first).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the new process reported, not ready yet", PATIENCE, || {
        let n = nodes(&c, addr);
        let (state, pid) = n.get("n")?;
        (state == "PENDING" && pid.is_some_and(|p| p != first)).then_some(())
    });
}

/// A start sent while a stop of the node is under way waits for that stop to end (up
/// to its stop_timeout) and then starts it: it succeeds, also past the request timeout.
#[test]
fn a_start_during_a_stop_waits_for_the_stop() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1"]);
    let text = format!(
        "[instances.agent-1]\n[nodes.n]\ninstance = \"agent-1\"\n\
         command = [\"{}\", \"--ignore-sigterm\"]\nstop_timeout = \"4s\"\n\
         readiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        bin("drover-testprog").display()
    );
    c.deploy_text(addr, "n.toml", &text);
    let first = eventually("n running", PATIENCE, || all_running(&c, addr, 1))["n"];
    let mut stop = drover_tests::Background::start(&c, &addr.to_string(), &["stop", "n"], "stop");
    eventually("the stop under way", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes", "--fresh"]).json();
        v["results"]["agent-1"]["n"]["stopping_since_ms"]
            .is_u64()
            .then_some(())
    });
    let mut cmd = c.drover_command(addr);
    cmd.args(["--timeout", "1s", "start", "n"]);
    let out = drover_tests::run_cli(cmd, PATIENCE);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.json()["results"]["n"], true, "{}", out.stdout);
    let after = all_running(&c, addr, 1).expect("n runs again");
    assert_ne!(after["n"], first);
    assert!(!pid_alive(first));
    eventually("the stop ended", PATIENCE, || stop.ended());
}

#[test]
fn restart_stop_start_subsets_and_unknown_names() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1", "agent-2"]);
    let file = cluster_file(&c, &["agent-1", "agent-2"], 2, "");
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let before = eventually("4 running", PATIENCE, || all_running(&c, addr, 4));

    let out = c.drover(addr, &["restart", "agent-1-n1", "agent-2-n2", "nope"]);
    let v = out.json();
    assert_eq!(out.code, Some(1), "an unknown node is an error entry");
    assert_eq!(
        v,
        serde_json::json!({
            "errors": [{"source": "nope", "error": "unknown cluster node"}],
            "results": {"agent-1-n1": true, "agent-2-n2": true}
        })
    );
    let after = eventually("4 running", PATIENCE, || all_running(&c, addr, 4));
    assert_ne!(after["agent-1-n1"], before["agent-1-n1"]);
    assert_ne!(after["agent-2-n2"], before["agent-2-n2"]);
    assert_eq!(after["agent-1-n2"], before["agent-1-n2"]);

    let out = c.drover(addr, &["stop", "agent-2-n1"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert!(
        !pid_alive(after["agent-2-n1"]),
        "stop returns once the process is gone"
    );
    let n = nodes(&c, addr);
    assert_eq!(n["agent-2-n1"], ("STOPPED".to_owned(), None));

    let out = c.drover(addr, &["start", "agent-2-n1"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    eventually("4 running", PATIENCE, || all_running(&c, addr, 4));

    // Stop with no names stops everything.
    let out = c.drover(addr, &["stop"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(out.json()["results"].as_object().unwrap().len(), 4);
    assert!(nodes(&c, addr).values().all(|(s, _)| s == "STOPPED"));
}

/// A deploy that leaves out an instance whose agent is away cannot stop that agent's
/// nodes: it does not say success. Once the agent is back it is told, and its node stops.
#[test]
fn a_deploy_leaving_out_an_absent_agent_says_its_nodes_may_run_on() {
    let c = Cluster::new();
    let (_ctl, addr, mut agents) = start(&c, &["agent-1", "agent-2"]);
    let both = cluster_file(&c, &["agent-1", "agent-2"], 1, "");
    let out = c.drover(addr, &["deploy-config", both.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let pids = eventually("both running", PATIENCE, || all_running(&c, addr, 2));
    let stranded = pids["agent-2-n1"];
    agents[1].kill();
    eventually("agent-2 dropped", PATIENCE, || {
        let out = c.drover(addr, &["get-instances"]);
        out.json().get("agent-2").is_none().then_some(())
    });
    let one = cluster_file(&c, &["agent-1"], 1, "");
    let out = c.drover(addr, &["deploy-config", one.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains("instance 'agent-2'") && errors.contains("agent-2-n1"),
        "{errors}"
    );
    assert!(
        pid_alive(stranded),
        "the away agent's node runs on, as said"
    );
    // Said by the deploy that left it out; the next one has nothing to add.
    let out = c.drover(addr, &["deploy-config", one.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let _back = c.start_agent("agent-2", addr);
    eventually(
        "the away agent's node stopped once it is back",
        PATIENCE,
        || (!pid_alive(stranded)).then_some(()),
    );
    assert!(pid_alive(pids["agent-1-n1"]));
}

#[test]
fn deploy_needs_every_instance_and_reports_failed_nodes_with_outputs() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1"]);
    let file = cluster_file(&c, &["agent-1", "agent-2"], 1, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert_eq!(out.json()["errors"][0], "instances not connected: agent-2");

    let prog = bin("drover-testprog");
    let text = format!(
        "[instances.agent-1]\n[nodes.bad]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--print\", \"hello\", \"--eprint\", \"boom\", \"--exit-after\", \"0\", \"--exit-code\", \"3\"]\nmax_failed_starts = 2\nbackoff = {{ initial = \"10ms\" }}\n[nodes.good]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        prog.display(),
        prog.display()
    );
    let file = c.dir.path().join("bad.toml");
    std::fs::write(&file, text).unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    let v = out.json();
    assert_eq!(v["results"]["nodes"]["good"]["success"], true);
    let bad = &v["results"]["nodes"]["bad"];
    assert_eq!(bad["success"], false);
    assert!(bad["stdout"].as_str().unwrap().contains("hello"), "{bad}");
    assert!(bad["stderr"].as_str().unwrap().contains("boom"), "{bad}");
    assert!(
        v["results"]["id"].is_string(),
        "the deploy is recorded: {v}"
    );
    eventually("bad node FAILED after its attempts", PATIENCE, || {
        (nodes(&c, addr)["bad"].0 == "FAILED").then_some(())
    });
}

#[test]
fn staging_reports_every_error_and_get_config_round_trips() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1"]);
    let out = c.drover(addr, &["get-config"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("no staged configuration available"),
        "{}",
        out.stderr
    );

    let bad = c.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[instances.a]\n[nodes.x]\ninstance = \"b\"\ncommand = [\"x\"]\n",
    )
    .unwrap();
    let out = c.drover(addr, &["stage-config", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("nodes.x.instance: node 'x' has undeclared instance name 'b'"),
        "{}",
        out.stderr
    );

    let file = cluster_file(&c, &["agent-1"], 1, "");
    let out = c.drover(addr, &["stage-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let id = out.json()["results"]["id"].as_str().unwrap().to_owned();
    let got = c.drover(addr, &["get-config", "--as-json"]).json();
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["nodes"][0]["name"], "agent-1-n1");
    let out = c.drover(addr, &["get-config", "--deployed"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("no deployed configuration available"));
}

#[test]
fn agent_sigkill_and_restart_keeps_every_node_pid() {
    let c = Cluster::new();
    let (ctl, addr, mut agents) = start(&c, &["agent-1"]);
    let file = cluster_file(&c, &["agent-1"], 4, "");
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let before = eventually("4 running", PATIENCE, || all_running(&c, addr, 4));

    agents[0].kill();
    ctl.wait_log("agent 'agent-1' lost");
    assert!(
        before.values().all(|p| pid_alive(*p)),
        "nodes outlive their agent"
    );

    let _again = c.start_agent("agent-1", addr);
    let after = eventually("nodes back", PATIENCE, || all_running(&c, addr, 4));
    assert_eq!(
        after, before,
        "the new agent adopts every node with its pid"
    );

    // Adopted nodes are still supervised: a killed one is restarted.
    let victim = after["agent-1-n3"];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = eventually("adopted node restarted", PATIENCE, || {
        let n = all_running(&c, addr, 4)?;
        (n["agent-1-n3"] != victim).then_some(n)
    });
    assert_eq!(replaced["agent-1-n1"], before["agent-1-n1"]);
}

#[test]
fn controller_sigkill_and_restart_loses_nothing() {
    let c = Cluster::new();
    let (mut ctl, addr, _agents) = start(&c, &["agent-1", "agent-2"]);
    let file = cluster_file(&c, &["agent-1", "agent-2"], 2, "");
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let before = eventually("4 running", PATIENCE, || all_running(&c, addr, 4));
    let deployed = c
        .drover(addr, &["get-config", "--deployed", "--as-json"])
        .stdout;

    ctl.kill();
    let (_ctl2, addr2) = c.start_controller(&addr.to_string());
    let after = eventually("get-nodes complete again", PATIENCE, || {
        all_running(&c, addr2, 4)
    });
    assert_eq!(after, before);
    assert_eq!(
        c.drover(addr2, &["get-config", "--deployed", "--as-json"])
            .stdout,
        deployed
    );
}

#[test]
fn sigterm_to_the_agent_stops_its_nodes() {
    let c = Cluster::new();
    let (_ctl, addr, mut agents) = start(&c, &["agent-1"]);
    let file = cluster_file(&c, &["agent-1"], 3, "");
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let pids = eventually("3 running", PATIENCE, || all_running(&c, addr, 3));
    agents[0].signal(nix::sys::signal::Signal::SIGTERM);
    let status = agents[0].wait_exit(std::time::Duration::from_secs(20));
    assert!(status.success());
    assert!(
        pids.values().all(|p| !pid_alive(*p)),
        "every node stopped with the agent"
    );
}

#[test]
fn logs_tail_and_follow() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1"]);
    let prog = bin("drover-testprog");
    let text = format!(
        "[instances.agent-1]\n\
         [nodes.talker]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--print\", \"hello out\", \"--eprint\", \"hello err\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
         [nodes.chatty]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--stdout-rate\", \"50\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        p = prog.display()
    );
    let file = c.dir.path().join("logs.toml");
    std::fs::write(&file, text).unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );

    let out = eventually("talker output", PATIENCE, || {
        let out = c.drover(addr, &["logs", "talker", "-n", "5"]);
        (out.code == Some(0) && out.stdout.contains("hello out")).then_some(out)
    });
    assert_eq!(out.stdout, "hello out\n");
    assert_eq!(out.stderr, "hello err\n");

    let out = c.drover(addr, &["logs", "nope"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("nope: unknown cluster node"),
        "{}",
        out.stderr
    );

    // Follow: new lines keep arriving until we hang up.
    let (mut child, rx) = c.follow_stdout(addr, "chatty");
    let mut seqs = Vec::new();
    while seqs.len() < 20 {
        let line = rx
            .recv_timeout(PATIENCE)
            .expect("followed lines keep coming");
        let seq: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        seqs.push(seq);
    }
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none lost: {seqs:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // The cluster is unaffected by the follower's departure. (That a departed follower's
    // follow is released even when the node writes nothing more is shown in follow.rs.)
    assert_eq!(c.drover(addr, &["get-nodes"]).code, Some(0));
}

/// `logs -f` of a node that a deploy removes, or moves to another instance, ends with
/// the reason; a deploy that restarts it where it is keeps the follow going.
#[test]
fn a_follow_ends_when_a_deploy_takes_its_node_away() {
    use std::io::BufRead;
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1", "agent-2"]);
    let prog = bin("drover-testprog");
    let deploy = |talk: Option<(&str, u32)>| {
        let mut text = String::from(
            "[instances.agent-1]\n[instances.agent-2]\n\
             [nodes.stay]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\n",
        );
        if let Some((instance, rate)) = talk {
            text.push_str(&format!(
                "[nodes.talk]\ninstance = \"{instance}\"\ncommand = [\"{}\", \"--stdout-rate\", \"{rate}\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
                prog.display()
            ));
        }
        let file = c.dir.path().join(format!("talk-{}.toml", text.len()));
        std::fs::write(&file, text).unwrap();
        let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    };
    for (then, why) in [
        (None, "node 'talk' was removed by deploy generation"),
        (
            Some(("agent-2", 50)),
            "node 'talk' moved to instance 'agent-2' with deploy generation",
        ),
    ] {
        deploy(Some(("agent-1", 50)));
        let mut cmd = c.drover_command(addr);
        cmd.args(["logs", "talk", "-f", "-n", "0", "--stream", "stdout"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<u64>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let seq = line.rsplit(' ').next().and_then(|n| n.parse().ok());
                if tx.send(seq.unwrap_or(u64::MAX)).is_err() {
                    break;
                }
            }
        });
        let first = lines.recv_timeout(PATIENCE).expect("followed lines come");
        // A changed spec restarts the node where it is: the follow goes on into the new
        // process's output, whose line numbers start again.
        deploy(Some(("agent-1", 40)));
        let mut last = first;
        loop {
            let seq = lines
                .recv_timeout(PATIENCE)
                .expect("the follow goes on across the restart");
            if seq < last {
                break;
            }
            last = seq;
        }
        deploy(then);
        let status = eventually("the follow ends", PATIENCE, || child.try_wait().unwrap());
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.starts_with(&format!("error: talk on agent-1: {why} ")),
            "{stderr}"
        );
    }
}

/// The lines `from` gives, as they come (a thread of its own reads them).
fn read_lines(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `logs -f` goes on when the node's agent goes away and comes back (the node runs
/// on, adopted), saying so on stderr; a deploy that removes the node while its agent
/// is away still ends it.
/// `drover logs NODE -f -n 0 --stream stdout`: the client, its stdout lines and its
/// stderr lines (only stdout is followed: the notes about the agent come on stderr).
fn follow_stdout(
    c: &Cluster,
    addr: SocketAddr,
    node: &str,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut cmd = c.drover_command(addr);
    cmd.args(["logs", node, "-f", "-n", "0", "--stream", "stdout"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let out = read_lines(child.stdout.take().unwrap());
    let err = read_lines(child.stderr.take().unwrap());
    (child, out, err)
}

/// The number ending one of `drover-testprog --stdout-rate`'s lines.
fn seq(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a numbered line: {line}"))
}

#[test]
fn a_follow_goes_on_when_its_agent_comes_back() {
    let c = Cluster::new();
    let (_ctl, addr, mut agents) = start(&c, &["agent-1", "agent-2"]);
    let file = c.dir.path().join("talk.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[instances.agent-2]\n[nodes.talk]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--stdout-rate\", \"50\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let pid = || {
        let out = c.drover(addr, &["get-nodes"]);
        out.json()["results"]["agent-1"]["talk"]["pid"].as_u64()
    };
    let before = eventually("talk runs", PATIENCE, pid);

    let (mut child, out_lines, err_lines) = follow_stdout(&c, addr, "talk");
    let mut seqs = vec![seq(&out_lines
        .recv_timeout(PATIENCE)
        .expect("followed lines come"))];

    // SIGKILLed and started again: the follow waits for it, then goes on from where
    // the old agent left off, with what the node wrote meanwhile.
    agents[0].kill();
    // The node writes on (into the log keeper, which outlives the agent).
    let written = seqs[0] + 30;
    eventually(
        "the node's output while its agent is away",
        PATIENCE,
        || {
            let log =
                std::fs::read_to_string(c.dir.path().join("agent-agent-1/nodes/talk/stdout.log"))
                    .ok()?;
            log.lines()
                .any(|l| l.ends_with(&format!(" {written}")))
                .then_some(())
        },
    );
    agents[0] = c.start_agent("agent-1", addr);
    let away = err_lines
        .recv_timeout(PATIENCE)
        .expect("a line on the agent's absence");
    assert!(
        away.starts_with("[drover: instance 'agent-1' went away (")
            && away.ends_with("); following again once it is back]"),
        "{away}"
    );
    let back = err_lines
        .recv_timeout(PATIENCE)
        .expect("a line on the agent's return");
    assert_eq!(
        back,
        "[drover: instance 'agent-1' is back; what the node wrote while it was away follows]"
    );
    // Every line once, in order, across the absence: nothing lost, nothing twice.
    while seqs.last().is_some_and(|&s| s < written + 10) {
        let line = out_lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("lines stopped after {seqs:?}"));
        seqs.push(seq(&line));
    }
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "lines lost or repeated: {seqs:?}"
    );
    assert_eq!(pid(), Some(before), "the node was adopted, not restarted");
    assert_eq!(child.try_wait().unwrap(), None, "the follow goes on");

    // Stopped (its node with it), the agent is away while a deploy removes the node
    // (and the instance, which a deploy needs connected): the follow ends, saying why.
    agents[0].signal(nix::sys::signal::Signal::SIGTERM);
    agents[0].wait_exit(PATIENCE);
    let away = err_lines
        .recv_timeout(PATIENCE)
        .expect("a line on the agent's absence");
    assert!(away.contains("went away"), "{away}");
    let other = c.dir.path().join("other.toml");
    std::fs::write(&other, "[instances.agent-2]\n").unwrap();
    let out = c.drover(addr, &["deploy-config", other.to_str().unwrap()]);
    // Recorded and applied, but not a success: the absent agent may still run the node
    // (this one stopped it, as its on_exit says; the controller cannot know that).
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("instance 'agent-1' is not in configuration"),
        "{}",
        out.stderr
    );
    let status = eventually("the follow ends", PATIENCE, || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(1));
    let end = err_lines.recv_timeout(PATIENCE).expect("why it ended");
    assert!(
        end.starts_with("error: talk on agent-1: node 'talk' was removed by deploy generation 2;"),
        "{end}"
    );
}

/// A follow taken up after its agent's absence, during which the node's output was
/// rotated several times (4 KiB files): what the node wrote meanwhile comes from the
/// rotated files, every line once and in order (before: from the start of the current
/// file, the rotated lines silently skipped).
#[test]
fn a_follow_goes_on_through_rotations_while_its_agent_was_away() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let args = ["--log-max-bytes", "4K", "--log-keep", "20"];
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let mut agent = c.start_agent_args(
        "agent-1",
        "agent-1",
        &[&["--controller", &addr.to_string()][..], &args[..]].concat(),
    );
    c.wait_for_agent(addr, "agent-1");
    c.deploy_text(
        addr,
        "talk.toml",
        &format!(
            "[instances.agent-1]\n[nodes.talk]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--stdout-rate\", \"300\"]\n",
            bin("drover-testprog").display()
        ),
    );
    let (mut child, out_lines, _err_lines) = follow_stdout(&c, addr, "talk");
    let mut seqs = vec![seq(&out_lines
        .recv_timeout(PATIENCE)
        .expect("followed lines come"))];
    agent.kill();
    // Over 16 KiB meanwhile: at least three rotations of 4 KiB files.
    let written = seqs[0] + 700;
    let dir = c.dir.path().join("agent-agent-1/nodes/talk");
    eventually(
        "the node's output while its agent is away",
        PATIENCE,
        || {
            std::fs::read_dir(&dir)
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("stdout.log"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .any(|text| text.lines().any(|l| l.ends_with(&format!(" {written}"))))
                .then_some(())
        },
    );
    let _agent = c.start_agent_args(
        "agent-1",
        "agent-1",
        &[&["--controller", &addr.to_string()][..], &args[..]].concat(),
    );
    while seqs.last().is_some_and(|&s| s < written + 10) {
        let line = out_lines.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            panic!(
                "lines stopped after {:?}",
                &seqs[seqs.len().saturating_sub(5)..]
            )
        });
        seqs.push(seq(&line));
    }
    let gaps: Vec<_> = seqs.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(gaps.is_empty(), "lines lost or repeated: {gaps:?}");
    assert_eq!(child.try_wait().unwrap(), None, "the follow goes on");
    let _ = child.kill();
}

#[test]
fn get_id_value_asks_running_nodes() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1", "agent-2"]);
    let out = c.drover(addr, &["get-id-value", "x"]);
    assert_eq!(out.json()["errors"][0]["error"], "no cluster deployed");
    let prog = bin("drover-testprog");
    let text = format!(
        "[instances.agent-1]\n[instances.agent-2]\n[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
         [nodes.w1]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--value\", \"bits_per_uid=96\"]\n\
         [nodes.w2]\ninstance = \"agent-2\"\ncommand = [\"{p}\", \"--value\", \"bits_per_uid=96\"]\n\
         [nodes.mute]\ninstance = \"agent-2\"\ncommand = [\"/bin/sleep\", \"100000\"]\n",
        p = prog.display()
    );
    let file = c.dir.path().join("q.toml");
    std::fs::write(&file, text).unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );

    let v = eventually("both testprogs answer", PATIENCE, || {
        let out = c.drover(
            addr,
            &["get-id-value", "bits_per_uid", "w1", "w2", "worker-03"],
        );
        let v = out.json();
        (v["results"].as_object().map(|o| o.len()) == Some(2)).then_some((out.code, v))
    });
    assert_eq!(v.0, Some(1), "the unknown node makes it fail");
    assert_eq!(
        v.1,
        serde_json::json!({
            "errors": [{"error": "unknown cluster node", "source": "worker-03"}],
            "results": {"w1": 96, "w2": 96}
        })
    );
    // All nodes: the one that does not implement queries is a per-node error.
    let out = c.drover(addr, &["get-id-value", "bits_per_uid"]);
    let v = out.json();
    assert_eq!(v["results"]["w1"], 96);
    assert_eq!(v["errors"][0]["source"], "mute");
    assert!(
        v["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("does not answer value queries"),
        "{v}"
    );
    let out = c.drover(addr, &["get-id-value", "nope", "w1"]);
    assert_eq!(
        out.json()["errors"][0]["error"],
        "unknown identifier 'nope'"
    );
}

#[test]
fn monitor_sees_deploys_node_states_and_agent_loss_with_unknown_nodes() {
    let c = Cluster::new();
    let (_ctl, addr, mut agents) = start(&c, &["agent-1"]);
    let (mut child, rx) = c.monitor(addr, &[]);
    // Events are kept once received, so each wait looks at everything seen so far:
    // the order of events from different sources (deploy replies, status reports) is
    // not fixed.
    let seen = std::cell::RefCell::new(Vec::<Value>::new());
    let wait_for = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let mut from = 0;
        loop {
            if let Some(e) = seen.borrow()[from..].iter().find(|e| pred(&e["event"])) {
                return e.clone();
            }
            from = seen.borrow().len();
            let ev = rx
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("no event: {what}; seen: {:?}", seen.borrow()));
            seen.borrow_mut().push(ev);
        }
    };
    // The subscription is live once the controller saw the client; a deploy proves it.
    let file = cluster_file(&c, &["agent-1"], 2, "");
    eventually("monitor subscribed", PATIENCE, || {
        let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let ev = rx
            .recv_timeout(std::time::Duration::from_millis(500))
            .ok()?;
        let started = ev["event"]["type"] == "deploy_started";
        seen.borrow_mut().push(ev);
        started.then_some(())
    });
    wait_for("a node RUNNING", &|e| {
        e["type"] == "node_state" && e["state"] == "RUNNING" && e["instance"] == "agent-1"
    });
    wait_for("deploy finished", &|e| {
        e["type"] == "deploy_finished" && e["failed"] == 0
    });
    let pids = eventually("2 running", PATIENCE, || all_running(&c, addr, 2));

    agents[0].kill();
    seen.borrow_mut().clear();
    wait_for("agent lost", &|e| {
        e["type"] == "agent_lost" && e["instance"] == "agent-1"
    });
    wait_for("node UNKNOWN", &|e| {
        e["type"] == "node_state" && e["state"] == "UNKNOWN"
    });
    let out = c.drover(addr, &["get-nodes"]);
    assert_eq!(
        out.code,
        Some(1),
        "an unreachable instance is an error entry"
    );
    let v = out.json();
    assert_eq!(v["errors"][0]["source"], "agent-1");
    for (name, pid) in &pids {
        assert_eq!(v["results"]["agent-1"][name]["state"], "UNKNOWN", "{v}");
        assert_eq!(v["results"]["agent-1"][name]["pid"], *pid);
        assert!(pid_alive(*pid), "the processes are untouched");
    }

    let _back = c.start_agent("agent-1", addr);
    seen.borrow_mut().clear();
    wait_for("agent joined", &|e| e["type"] == "agent_joined");
    wait_for("node RUNNING again", &|e| {
        e["type"] == "node_state" && e["state"] == "RUNNING"
    });
    assert_eq!(
        eventually("running again", PATIENCE, || all_running(&c, addr, 2)),
        pids
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn rolling_restart_goes_batch_by_batch_and_stops_at_a_failure() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1"]);
    let prog = bin("drover-testprog");
    let marker = c.dir.path().join("n3-started-once");
    let mut text = String::from(
        "[instances.agent-1]\n[defaults]\nreadiness = { kind = \"start-period\", period = \"100ms\" }\nmax_failed_starts = 1\n",
    );
    for i in [1, 2, 4, 5] {
        text.push_str(&format!(
            "[nodes.n{i}]\ninstance = \"agent-1\"\ncommand = [\"{}\"]\n",
            prog.display()
        ));
    }
    // n3 starts the first time only: its restart fails.
    text.push_str(&format!(
        "[nodes.n3]\ninstance = \"agent-1\"\ncommand = [\"/bin/sh\", \"-c\", \"if [ -e {m} ]; then exit 3; fi; touch {m}; exec sleep 100000\"]\n",
        m = marker.display()
    ));
    let file = c.dir.path().join("rolling.toml");
    std::fs::write(&file, text).unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let before = eventually("5 running", PATIENCE, || all_running(&c, addr, 5));

    let out = c.drover(addr, &["restart", "--batch", "2", "--wait-ready"]);
    assert_eq!(out.code, Some(1));
    let v = out.json();
    assert_eq!(v["results"]["n1"], true);
    assert_eq!(v["results"]["n2"], true);
    assert_eq!(v["results"]["n3"], false);
    assert_eq!(v["results"]["n4"], true, "n4 shares n3's batch");
    assert_eq!(
        v["errors"],
        serde_json::json!([{"source": "n5", "error": "not restarted: an earlier batch failed"}])
    );
    let now = nodes(&c, addr);
    assert_eq!(now["n5"].1, Some(before["n5"]), "n5 kept its process");
    assert_ne!(now["n1"].1, Some(before["n1"]));
}

#[test]
fn targets_by_role_and_instance_and_signals() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1", "agent-2"]);
    let prog = bin("drover-testprog");
    let mut text = String::from(
        "[instances.agent-1]\n[instances.agent-2]\n[defaults]\nbackoff = { initial = \"10ms\" }\nreadiness = { kind = \"start-period\", period = \"0s\" }\n",
    );
    for (name, inst, role) in [
        ("m", "agent-1", "manager"),
        ("w1", "agent-1", "worker"),
        ("w2", "agent-2", "worker"),
    ] {
        text.push_str(&format!(
            "[nodes.{name}]\ninstance = \"{inst}\"\nrole = \"{role}\"\ncommand = [\"{}\"]\n",
            prog.display()
        ));
    }
    let file = c.dir.path().join("targets.toml");
    std::fs::write(&file, text).unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let before = eventually("3 running", PATIENCE, || all_running(&c, addr, 3));

    // HUP kills the test program; the workers are restarted under their policy.
    let out = c.drover(addr, &["signal", "HUP", "role:worker"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(
        out.json()["results"],
        serde_json::json!({"w1": true, "w2": true})
    );
    let after = eventually("workers replaced", PATIENCE, || {
        let n = all_running(&c, addr, 3)?;
        (n["w1"] != before["w1"] && n["w2"] != before["w2"]).then_some(n)
    });
    assert_eq!(after["m"], before["m"]);

    let out = c.drover(addr, &["signal", "NOPE", "m"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(out.json()["errors"][0]["error"], "unknown signal 'NOPE'");

    let out = c.drover(addr, &["stop", "instance:agent-2"]);
    assert_eq!(out.json()["results"], serde_json::json!({"w2": true}));
    let out = c.drover(addr, &["restart", "role:proxy"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.json()["errors"],
        serde_json::json!([{"source": "role:proxy", "error": "no node matches 'role:proxy'"}])
    );
    let n = nodes(&c, addr);
    assert_eq!(n["w2"].0, "STOPPED");
    assert_eq!(n["w1"].0, "RUNNING");

    // Names with wildcards pick every node they match.
    let out = c.drover(addr, &["start", "w?"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(
        out.json()["results"],
        serde_json::json!({"w1": true, "w2": true})
    );
    let out = c.drover(addr, &["restart", "x*"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.json()["errors"],
        serde_json::json!([{"source": "x*", "error": "no node matches 'x*'"}])
    );
    assert_eq!(nodes(&c, addr)["w2"].0, "RUNNING");
}

#[test]
fn monitor_with_logs_streams_node_output() {
    let c = Cluster::new();
    let (_ctl, addr, _agents) = start(&c, &["agent-1"]);
    let text = format!(
        "[instances.agent-1]\n[nodes.chatty]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--stderr-rate\", \"20\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
        bin("drover-testprog").display()
    );
    let file = c.dir.path().join("chatty.toml");
    std::fs::write(&file, text).unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let (mut child, rx) = c.monitor(addr, &["--logs"]);
    let ev = loop {
        let ev = rx.recv_timeout(PATIENCE).expect("log events");
        if ev["event"]["type"] == "log_lines" {
            break ev;
        }
    };
    assert_eq!(ev["event"]["node"], "chatty");
    assert_eq!(ev["event"]["stream"], "stderr");
    assert!(
        ev["event"]["lines"][0]
            .as_str()
            .unwrap()
            .contains("stderr line"),
        "{ev}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `monitor --logs` follows what is deployed now, not what was deployed when it
/// subscribed: nodes deployed later, and a node's output again once its agent is back,
/// from where it stood (what the node wrote meanwhile included, each line once).
#[test]
fn monitor_with_logs_follows_later_deploys_and_returning_agents() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let deploy = |name: &str, node: Option<&str>| {
        let mut text = String::from("[instances.agent-1]\n");
        if let Some(node) = node {
            text.push_str(&format!(
                "[nodes.{node}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--stdout-rate\", \"20\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
                bin("drover-testprog").display()
            ));
        }
        let file = c.dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    };
    let (mut child, rx) = c.monitor(addr, &["--logs"]);
    // The numbers of node a's stdout lines, as the monitor showed them.
    let a_seqs = std::cell::RefCell::new(Vec::<u64>::new());
    let wait_for = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ev = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"));
            let e = &ev["event"];
            if e["type"] == "log_lines" && e["node"] == "a" && e["stream"] == "stdout" {
                for l in e["lines"].as_array().unwrap() {
                    let n = l.as_str().unwrap().rsplit(' ').next().unwrap();
                    a_seqs.borrow_mut().push(n.parse().unwrap());
                }
            }
            if pred(e) {
                return;
            }
        }
    };
    let lines_of =
        |node: &'static str| move |e: &Value| e["type"] == "log_lines" && e["node"] == node;
    // Subscribed, with nothing deployed: an empty deploy shows the monitor is there.
    eventually("the monitor sees a deploy", PATIENCE, || {
        deploy("empty.toml", None);
        rx.recv_timeout(std::time::Duration::from_secs(1))
            .ok()
            .filter(|ev| ev["event"]["type"] == "deploy_started")
    });
    deploy("a.toml", Some("a"));
    wait_for(
        "output of a node deployed after subscribing",
        &lines_of("a"),
    );

    // The agent dies and comes back; its node runs on, and its output is followed
    // again on the new connection, from where the follow stood: what the node wrote
    // meanwhile too, each line once.
    agent.kill();
    wait_for("the agent's loss", &|e| e["type"] == "agent_lost");
    let written = a_seqs.borrow().last().copied().unwrap() + 20;
    let log = c.dir.path().join("agent-agent-1/nodes/a/stdout.log");
    eventually(
        "the node's output while its agent is away",
        PATIENCE,
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines()
                .any(|l| l.ends_with(&format!(" {written}")))
                .then_some(())
        },
    );
    agent = c.start_agent("agent-1", addr);
    wait_for("the agent's return", &|e| e["type"] == "agent_joined");
    while a_seqs.borrow().last().is_none_or(|&n| n < written + 5) {
        wait_for("output after the agent's return", &lines_of("a"));
    }
    let seqs = a_seqs.borrow().clone();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "lines lost or repeated: {seqs:?}"
    );

    // A node that replaces another is followed too.
    deploy("b.toml", Some("b"));
    wait_for("output of the replacing node", &lines_of("b"));
    drop(agent);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `monitor --logs` shows the first lines of a node a deploy adds: they were written
/// before the deploy finished and its follow could begin. Those of a node that fails at
/// once too, and none of what an earlier node of that name left in its directory.
#[test]
fn monitor_with_logs_shows_the_first_lines_of_added_nodes() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let prog = bin("drover-testprog");
    let node = |name: &str, args: &str, extra: &str| {
        format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\ncommand = [\"{}\", {args}]\n{extra}\n",
            prog.display()
        )
    };
    let deploy = |file: &str, nodes: &[String]| {
        let path = c.dir.path().join(file);
        std::fs::write(&path, format!("[instances.agent-1]\n{}", nodes.concat())).unwrap();
        c.drover(addr, &["deploy-config", path.to_str().unwrap()])
    };
    // An earlier node named `w` leaves output in the directory the next one reuses.
    let out = deploy(
        "earlier.toml",
        &[node(
            "w",
            r#""--print", "earlier-out", "--eprint", "earlier-err""#,
            "",
        )],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    eventually("the earlier node's output on disk", PATIENCE, || {
        let out = c.drover(addr, &["logs", "w"]);
        let both = format!("{}{}", out.stdout, out.stderr);
        (both.contains("earlier-out") && both.contains("earlier-err")).then_some(())
    });
    let out = deploy("none.toml", &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let (mut child, rx) = c.monitor(addr, &["--logs"]);
    eventually("the monitor sees a deploy", PATIENCE, || {
        assert_eq!(deploy("none.toml", &[]).code, Some(0));
        rx.recv_timeout(std::time::Duration::from_secs(1))
            .ok()
            .filter(|ev| ev["event"]["type"] == "deploy_started")
    });
    // Both print at once; `w` is ready a second later, `crash` exits and fails.
    let slow_ready = r#"readiness = { kind = "start-period", period = "1s" }"#;
    let out = deploy(
        "added.toml",
        &[
            node(
                "w",
                r#""--print", "w-out", "--eprint", "w-err""#,
                slow_ready,
            ),
            node(
                "crash",
                r#""--print", "crash-out", "--eprint", "crash-err", "--exit-after", "0", "--exit-code", "3""#,
                &format!("{slow_ready}\nmax_failed_starts = 1"),
            ),
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("crash"), "{}", out.stderr);

    let mut want: BTreeSet<(&str, &str, &str)> = [
        ("w", "stdout", "w-out"),
        ("w", "stderr", "w-err"),
        ("crash", "stdout", "crash-out"),
        ("crash", "stderr", "crash-err"),
    ]
    .into();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while !want.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ev = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("still missing {want:?}; log lines seen: {seen:?}"));
        let e = &ev["event"];
        if e["type"] != "log_lines" {
            continue;
        }
        let (node, stream) = (e["node"].as_str().unwrap(), e["stream"].as_str().unwrap());
        for line in e["lines"].as_array().unwrap() {
            let line = line.as_str().unwrap().to_owned();
            want.retain(|w| (w.0, w.1, w.2) != (node, stream, line.as_str()));
            seen.push(format!("{node} {stream}: {line}"));
        }
    }
    assert!(
        !seen.iter().any(|l| l.contains("earlier")),
        "an earlier node's output shown as the new one's: {seen:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// get-nodes answers from the statuses agents report as they change; `--fresh` asks
/// the agents. A paused agent shows the difference: its last report is still there,
/// while asking it times out.
#[test]
fn get_nodes_answers_from_reports_and_fresh_asks_the_agents() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller_with("127.0.0.1:0", &["--request-timeout", "1s"]);
    let agent = c.start_agent("agent-1", addr);
    eventually("agent connected", PATIENCE, || {
        let out = c.drover(addr, &["get-instances"]);
        (out.json().as_object().map(serde_json::Map::len) == Some(1)).then_some(())
    });
    let file = cluster_file(&c, &["agent-1"], 2, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let before = eventually("2 running", PATIENCE, || all_running(&c, addr, 2));

    // A crash no operation caused reaches get-nodes through the agent's report.
    let old = before["agent-1-n1"];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(old).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let after = eventually("the replacement reported", PATIENCE, || {
        all_running(&c, addr, 2).filter(|n| n["agent-1-n1"] != old)
    });
    assert_eq!(after["agent-1-n2"], before["agent-1-n2"]);

    // Paused, the agent answers nothing: get-nodes still has its last report...
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    let out = c.drover(addr, &["get-nodes"]);
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(
        v["results"]["agent-1"]["agent-1-n1"]["pid"],
        after["agent-1-n1"]
    );
    assert_eq!(v["results"]["agent-1"]["agent-1"]["mgmt_role"], "AGENT");
    // ...while --fresh asks it, and says that it did not answer.
    agent.signal(nix::sys::signal::Signal::SIGSTOP);
    let out = c.drover(addr, &["get-nodes", "--fresh"]);
    agent.signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    assert!(
        v["errors"].to_string().contains("timed out"),
        "{}",
        out.stdout
    );
    // Back, the agent answers again.
    eventually("fresh answers again", PATIENCE, || {
        (c.drover(addr, &["get-nodes", "--fresh"]).code == Some(0)).then_some(())
    });
}

/// An agent allowed one status report every ten minutes still reports the nodes a deploy
/// started as soon as it has answered the deploy: the controller's view, and the events
/// of `monitor`, are not a report interval behind the answer.
#[test]
fn an_answered_deploy_is_reported_at_once_whatever_the_report_interval() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let _agent = c.start_agent_args(
        "agent-1",
        "agent-1",
        &[
            "--controller",
            &addr.to_string(),
            "--report-interval",
            "10min",
        ],
    );
    c.wait_for_agent(addr, "agent-1");
    let (mut child, rx) = c.monitor(addr, &[]);
    // The subscription is live once a deploy (of no nodes) is seen.
    let empty = cluster_file(&c, &["agent-1"], 0, "");
    eventually("monitor subscribed", PATIENCE, || {
        let out = c.drover(addr, &["deploy-config", empty.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let ev = rx
            .recv_timeout(std::time::Duration::from_millis(500))
            .ok()?;
        (ev["event"]["type"] == "deploy_started").then_some(())
    });
    let file = cluster_file(&c, &["agent-1"], 3, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut running = BTreeSet::new();
    let mut seen = Vec::new();
    while running.len() < 3 {
        let ev = rx
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("not every node reported RUNNING; events: {seen:?}"));
        let e = &ev["event"];
        if e["type"] == "node_state" && e["state"] == "RUNNING" {
            running.insert(e["node"].as_str().unwrap_or_default().to_owned());
        }
        seen.push(ev);
    }
    assert_eq!(
        running.into_iter().collect::<Vec<_>>(),
        ["agent-1-n1", "agent-1-n2", "agent-1-n3"]
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
