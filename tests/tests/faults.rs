//! Process faults: agents and controllers killed at bad moments, corrupt state, crash
//! loops. Nothing is lost, nothing is started twice, and recovery is prompt.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use drover_tests::{Cluster, PATIENCE, bin, eventually};
use serde_json::Value;

fn node_table(c: &Cluster, addr: SocketAddr) -> BTreeMap<String, Value> {
    let v = c.drover(addr, &["get-nodes"]).json();
    let mut out = BTreeMap::new();
    if let Some(results) = v["results"].as_object() {
        for nodes in results.values() {
            for (name, n) in nodes.as_object().unwrap() {
                if n["mgmt_role"].is_null() {
                    out.insert(name.clone(), n.clone());
                }
            }
        }
    }
    out
}

fn running_pids(c: &Cluster, addr: SocketAddr, count: usize) -> Option<BTreeMap<String, u64>> {
    let t = node_table(c, addr);
    (t.len() == count && t.values().all(|n| n["state"] == "RUNNING")).then(|| {
        t.into_iter()
            .map(|(k, n)| (k, n["pid"].as_u64().unwrap()))
            .collect()
    })
}

/// A cluster file with node `stub` on `agent-1`, which outlives SIGTERM (it prints
/// `got-term` and runs on) for its minute of `stop_timeout`.
const SLOW_TO_STOP: &str = "[instances.agent-1]\n[nodes.stub]\ninstance = \"agent-1\"\ncommand = [\"/bin/sh\", \"-c\", \"trap 'echo got-term' TERM; while :; do sleep 0.1; done\"]\nstop_timeout = \"60s\"\nreadiness = { kind = \"start-period\", period = \"0s\" }\n";

/// Waits until `stub` of [`SLOW_TO_STOP`] has said it got its SIGTERM: a stop or
/// restart of it is then waiting for it.
fn wait_for_got_term(c: &Cluster, addr: SocketAddr) {
    eventually("the node's SIGTERM", PATIENCE, || {
        let out = c.drover(addr, &["logs", "stub"]);
        out.stdout.contains("got-term").then_some(())
    });
}

/// Deploys `file` and checks the result: exit 0, every one of `nodes` reported started,
/// no error.
fn deploy_ok(c: &Cluster, addr: SocketAddr, file: &std::path::Path, nodes: &[&str]) {
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let reported: Vec<&String> = v["results"]["nodes"]
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(reported, nodes, "{v}");
    for n in nodes {
        assert_eq!(v["results"]["nodes"][n]["success"], true, "{n}: {v}");
    }
}

/// `n01`, `n02`, ... `nNN`.
fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i:02}")).collect()
}

/// Live (non-zombie) processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        });
        if !zombie && String::from_utf8_lossy(&cmd).contains(marker) {
            out.push(pid);
        }
    }
    out
}

fn write_cluster(
    c: &Cluster,
    name: &str,
    id: &str,
    nodes: usize,
    marker: &str,
    extra: &str,
) -> std::path::PathBuf {
    let mut text = format!(
        "id = \"{id}\"\n[defaults]\nbackoff = {{ initial = \"10ms\" }}\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n{extra}[instances.agent-1]\n"
    );
    for i in 1..=nodes {
        text.push_str(&format!(
            "[nodes.n{i:02}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--print\", \"{marker}\"]\n",
            bin("drover-testprog").display()
        ));
    }
    let path = c.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn agent_sigkilled_twenty_times_restarts_no_node() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    let marker = format!("kill20-{}", std::process::id());
    let file = write_cluster(&c, "c.toml", "kill20", 5, &marker, "");
    c.wait_for_agent(addr, "agent-1");
    let five = names(5);
    deploy_ok(
        &c,
        addr,
        &file,
        &five.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let pids = eventually("5 running", PATIENCE, || running_pids(&c, addr, 5));
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for round in 0..20 {
        agent.kill();
        let t = Instant::now();
        agent = c.start_agent("agent-1", addr);
        let now = eventually(&format!("round {round}: nodes adopted"), PATIENCE, || {
            let t = node_table(&c, addr);
            (t.len() == 5 && t.values().all(|n| n["state"] == "RUNNING")).then_some(t)
        });
        worst = worst.max(t.elapsed());
        for (name, n) in &now {
            assert_eq!(
                n["pid"].as_u64(),
                Some(pids[name]),
                "round {round}: {name} restarted"
            );
        }
        // Exactly the five node processes exist: nothing was double-started.
        assert_eq!(processes_with(&marker).len(), 5, "round {round}");
    }
    eprintln!(
        "20 agent SIGKILLs: every node kept its pid; worst recovery {worst:?}, total {:?}",
        started.elapsed()
    );
}

#[test]
fn controller_sigkilled_during_a_deploy_brings_agents_to_the_recorded_deploy() {
    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let marker = format!("ctlkill-{}", std::process::id());
    let old = write_cluster(&c, "old.toml", "old", 3, &marker, "");
    deploy_ok(&c, addr, &old, &["n01", "n02", "n03"]);
    eventually("3 running", PATIENCE, || running_pids(&c, addr, 3));

    // The new deploy takes a while: every node needs 3 s of uptime to be ready.
    let new = write_cluster(&c, "new.toml", "new", 6, &marker, "");
    let text = std::fs::read_to_string(&new)
        .unwrap()
        .replace("period = \"0s\"", "period = \"3s\"");
    std::fs::write(&new, text).unwrap();
    let mut cmd = c.drover_command(addr);
    cmd.args(["deploy-config", new.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let deploying = cmd.spawn().unwrap();
    // The new deploy is recorded as desired before any agent hears of it.
    ctl.wait_log("deploying config=new");
    ctl.kill();
    // The client whose deploy was cut off is told it failed, not that it worked.
    let out = deploying.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("\"success\": true"),
        "no node of the cut-off deploy is reported started: {stdout}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    // ...and that whether it was recorded is not known, and where to look.
    assert!(
        stderr.contains("whether the deploy was recorded is not known: `drover status` shows the generation in effect"),
        "{stderr}"
    );

    let (_ctl2, addr2) = c.start_controller(&addr.to_string());
    let desired = c.dir.path().join("controller/desired.json");
    let desired: Value = serde_json::from_slice(&std::fs::read(desired).unwrap()).unwrap();
    assert_eq!(desired["config"]["id"], "new", "recorded whole");
    // The returning agent is brought to the desired configuration, each node once.
    let pids = eventually("the new configuration running", PATIENCE, || {
        let t = node_table(&c, addr2);
        (t.len() == 6 && t.values().all(|n| n["state"] == "RUNNING")).then_some(t)
    });
    assert_eq!(
        pids.keys().collect::<Vec<_>>(),
        ["n01", "n02", "n03", "n04", "n05", "n06"]
    );
    eventually("no leftover node processes", PATIENCE, || {
        (processes_with(&marker).len() == 6).then_some(())
    });
    // Once the agent reports having applied it, it is the deployed configuration.
    eventually("the new configuration deployed", PATIENCE, || {
        let deployed = c
            .drover(addr2, &["get-config", "--deployed", "--as-json"])
            .json();
        (deployed["id"] == "new").then_some(())
    });
}

#[test]
fn corrupt_state_file_is_reported_and_the_last_good_copy_used() {
    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    let marker = format!("corrupt-{}", std::process::id());
    let first = write_cluster(&c, "a.toml", "first", 1, &marker, "");
    let second = write_cluster(&c, "b.toml", "second", 2, &marker, "");
    c.wait_for_agent(addr, "agent-1");
    deploy_ok(&c, addr, &first, &["n01"]);
    // n01 runs this configuration already: only n02 starts.
    deploy_ok(&c, addr, &second, &["n02"]);
    ctl.kill();
    let state = c.dir.path().join("controller/deployed.json");
    let text = std::fs::read(&state).unwrap();
    std::fs::write(&state, &text[..text.len() / 3]).unwrap();
    let (ctl2, addr2) = c.start_controller(&addr.to_string());
    let log = ctl2.wait_log("using the last good copy");
    assert!(
        log.contains("deployed.json: not a valid configuration"),
        "{log}"
    );
    let deployed = c
        .drover(addr2, &["get-config", "--deployed", "--as-json"])
        .json();
    assert_eq!(deployed["id"], "first");
    assert!(
        c.dir
            .path()
            .join("controller/deployed.json.corrupt")
            .exists()
    );
}

#[test]
fn a_crash_loop_keeps_to_its_backoff_and_its_events_stay_bounded() {
    use std::io::BufRead;
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut mon = std::process::Command::new(bin("drover"));
    mon.args(["--controller", &addr.to_string()])
        .arg("--ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--cert")
        .arg(c.pki_file("ops.crt"))
        .arg("--key")
        .arg(c.pki_file("ops.key"))
        .arg("monitor")
        .stdout(std::process::Stdio::piped());
    let mut mon = mon.spawn().unwrap();
    let out = mon.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    // The subscription is live for sure once the agent's arrival is seen.
    let _agent = eventually("monitor subscribed and agent joined", PATIENCE, || {
        let agent = c.start_agent("agent-1", addr);
        loop {
            match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(ev) if ev["event"]["type"] == "agent_joined" => return Some(agent),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    });
    let file = c.dir.path().join("loop.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[nodes.looper]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--crash-at-start\"]\nmax_failed_starts = 0\nbackoff = {{ initial = \"100ms\", multiplier = 2.0, max = \"800ms\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    let window = Duration::from_secs(6);
    let started = Instant::now();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    // The deploy reports the node's failed start with what it wrote, and fails.
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    let looper = &v["results"]["nodes"]["looper"];
    assert_eq!(looper["success"], false, "{v}");
    assert_eq!(looper["instance"], "agent-1", "{v}");
    assert!(
        looper["stderr"]
            .as_str()
            .is_some_and(|e| e.contains("crashing at start as asked")),
        "{v}"
    );
    let mut state_events = 0;
    while started.elapsed() < window {
        if let Ok(ev) = rx.recv_timeout(Duration::from_millis(100))
            && ev["event"]["type"] == "node_state"
        {
            state_events += 1;
        }
    }
    let _ = mon.kill();
    let _ = mon.wait();
    let restarts = c.drover(addr, &["status"]).stdout;
    let line = restarts
        .lines()
        .find(|l| l.contains("looper"))
        .unwrap()
        .to_owned();
    let count: u32 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
    eprintln!("crash loop over {window:?}: {count} restarts, {state_events} state events");
    // 100+200+400+800+800+... ms of backoff: about 9 restarts in 6 s; without backoff it
    // would be hundreds.
    assert!((4..=20).contains(&count), "restarts: {count}\n{line}");
    assert!(
        state_events >= 2,
        "state changes are reported: {state_events}"
    );
    assert!(
        state_events <= 4 * (count as usize + 2),
        "state events: {state_events}"
    );
}

/// A restart cut off by its agent's return (SIGKILLed while it waited for the node to
/// stop, started again at once) is not sent again, since the agent may have carried it
/// out; the error says what happened rather than how the old connection ended.
#[test]
fn a_restart_cut_off_by_the_agents_return_says_so() {
    let mut c = Cluster::new();
    // The agent's return, not the old connection's silence, must end the request.
    c.idle_timeout = Duration::from_secs(30);
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let file = c.dir.path().join("stub.toml");
    std::fs::write(&file, SLOW_TO_STOP).unwrap();
    deploy_ok(&c, addr, &file, &["stub"]);
    let mut restart = c.drover_command(addr);
    restart
        .args(["restart", "stub"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = restart.spawn().unwrap();
    // It outlives SIGTERM, saying so: the restart waits for it to stop.
    wait_for_got_term(&c, addr);
    agent.kill();
    let _agent = c.start_agent("agent-1", addr);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let error = v["errors"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("agent 'agent-1' connected anew while the request was under way"),
        "{v}"
    );
}

/// A stop that waits for a node slow to go shows in `status` and `get-nodes` while it
/// waits (the state stays RUNNING until the process has ended), and no longer once the
/// node is gone.
/// A `drover monitor` and its events, known to be subscribed: a deploy of `file`
/// (which must change nothing running) is repeated until its `deploy_started` event
/// reaches the monitor.
fn subscribed_monitor(
    c: &Cluster,
    addr: SocketAddr,
    file: &std::path::Path,
) -> (std::process::Child, std::sync::mpsc::Receiver<Value>) {
    let (monitor, events) = c.monitor(addr, &[]);
    eventually("the monitor subscribed", PATIENCE, || {
        let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let started = std::iter::from_fn(|| events.recv_timeout(Duration::from_millis(500)).ok())
            .any(|e| e["event"]["type"] == "deploy_started");
        started.then_some(())
    });
    (monitor, events)
}

/// Milliseconds since the Unix epoch.
fn epoch_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[test]
fn a_crashed_node_shows_when_it_restarts() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let file = c.dir.path().join("crash.toml");
    // Fails five seconds after it started (its deploy has succeeded by then) until its
    // working directory has `go`; a long backoff after each failure.
    std::fs::write(
        &file,
        "[instances.agent-1]\n[nodes.crash]\ninstance = \"agent-1\"\n\
         command = [\"/bin/sh\", \"-c\", \"test -e go || { sleep 5; exit 3; }; exec sleep 1000\"]\n\
         backoff = { initial = \"25s\" }\nreadiness = { kind = \"start-period\", period = \"0s\" }\n",
    )
    .unwrap();
    // A monitor (subscribed through a deploy of the instance alone).
    let empty = c.dir.path().join("empty.toml");
    std::fs::write(&empty, "[instances.agent-1]\n").unwrap();
    let (mut monitor, events) = subscribed_monitor(&c, addr, &empty);
    let sent = epoch_ms();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let n = eventually("the node crashed, its restart scheduled", PATIENCE, || {
        let n = node_table(&c, addr).remove("crash")?;
        (n["state"] == "CRASHED" && n["restart_at_ms"].is_u64()).then_some(n)
    });
    let at = n["restart_at_ms"].as_u64().unwrap();
    assert!(
        at >= sent + 20_000 && at <= epoch_ms() + 26_000,
        "restart at {at}, deploy sent at {sent}: {n}"
    );
    // The crash's event says the same.
    let crashed = loop {
        let e = events.recv_timeout(PATIENCE).expect("a CRASHED event");
        if e["event"]["type"] == "node_state" && e["event"]["state"] == "CRASHED" {
            break e;
        }
    };
    assert_eq!(
        crashed["event"]["restart_at_ms"].as_u64(),
        Some(at),
        "{crashed}"
    );
    let _ = monitor.kill();
    let _ = monitor.wait();
    let status = c.drover(addr, &["status", "crash"]).stdout;
    let row = status.lines().nth(1).unwrap_or_default();
    assert!(row.contains("exited with code 3; restart in "), "{status}");
    // Started by hand, it runs at once: no restart is pending any more.
    std::fs::write(c.dir.path().join("agent-agent-1/nodes/crash/work/go"), "").unwrap();
    let out = c.drover(addr, &["start", "crash"]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    let n = eventually("the node running", PATIENCE, || {
        let n = node_table(&c, addr).remove("crash")?;
        (n["state"] == "RUNNING").then_some(n)
    });
    assert!(n.get("restart_at_ms").is_none(), "{n}");
    assert!(!c.drover(addr, &["status"]).stdout.contains("restart in"));
}

#[test]
fn a_stop_under_way_shows_while_it_waits() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let file = c.dir.path().join("stub.toml");
    std::fs::write(
        &file,
        format!("{SLOW_TO_STOP}[nodes.other]\ninstance = \"agent-1\"\ncommand = [\"/bin/sleep\", \"1000\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n"),
    )
    .unwrap();
    deploy_ok(&c, addr, &file, &["other", "stub"]);
    let row = |name: &str| {
        let status = c.drover(addr, &["status"]).stdout;
        status
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no row for {name} in\n{status}"))
    };
    assert!(!row("stub").contains("stopping"), "{}", row("stub"));
    let pid = node_table(&c, addr)["stub"]["pid"].as_u64().unwrap();
    // A monitor (the same file again restarts nothing).
    let (mut monitor, events) = subscribed_monitor(&c, addr, &file);
    let next_event = |what: &str, pred: &dyn Fn(&Value) -> bool| loop {
        let e = events
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no event: {what}"));
        if pred(&e["event"]) {
            return e["event"].clone();
        }
    };

    let mut stop = c.drover_command(addr);
    stop.args(["stop", "stub"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = stop.spawn().unwrap();
    // get-nodes answers from the agent's reports: the stop's start is one.
    let since = eventually("get-nodes to show the stop under way", PATIENCE, || {
        let n = node_table(&c, addr).remove("stub")?;
        n["stopping_since_ms"].as_u64().map(|since| (since, n))
    });
    let (since, n) = since;
    assert_eq!(n["state"], "RUNNING", "{n}");
    assert_eq!(n["pid"].as_u64(), Some(pid), "{n}");
    let now_ms = epoch_ms();
    assert!(
        since <= now_ms && now_ms - since < PATIENCE.as_millis() as u64,
        "{since} against {now_ms}"
    );
    let line = row("stub");
    assert!(
        line.contains("RUNNING") && line.contains("stopping for"),
        "{line}"
    );
    assert!(!row("other").contains("stopping"), "{}", row("other"));
    let e = next_event("the stop's start", &|e| e["type"] == "node_stopping");
    assert_eq!(e["node"], "stub", "{e}");
    assert_eq!(e["instance"], "agent-1", "{e}");
    assert_eq!(e["pid"].as_u64(), Some(pid), "{e}");
    assert_eq!(e["since_ms"].as_u64(), Some(since), "{e}");
    wait_for_got_term(&c, addr);

    // The node goes: the stop is done, and says so.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let n = node_table(&c, addr).remove("stub").unwrap();
    assert_eq!(n["state"], "STOPPED", "{n}");
    assert!(n.get("stopping_since_ms").is_none(), "{n}");
    let line = row("stub");
    assert!(
        line.contains("STOPPED") && !line.contains("stopping"),
        "{line}"
    );
    let e = next_event("the stop's end", &|e| {
        e["type"] == "node_state" && e["node"] == "stub"
    });
    assert_eq!(e["state"], "STOPPED", "{e}");
    assert_eq!(e["previous"], "RUNNING", "{e}");
    let _ = monitor.kill();
    let _ = monitor.wait();
}

/// A `stop` whose controller is SIGKILLed before it answers fails, saying that whether
/// it was carried out is not known and where to look; a `stage-config` that never
/// reached a controller says no such thing.
#[test]
fn requests_cut_off_by_the_controller_say_their_outcome_is_not_known() {
    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let _agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    // A node that says when it is asked to stop, and does not: its stop takes the whole
    // stop_timeout.
    let file = c.deploy_text(
        addr,
        "slow.toml",
        "[instances.agent-1]\n[nodes.slow]\ninstance = \"agent-1\"\n\
         command = [\"/bin/sh\", \"-c\", \"trap 'echo got-term' TERM; while :; do sleep 0.05; done\"]\n\
         stop_timeout = \"1h\"\nreadiness = { kind = \"start-period\", period = \"0s\" }\n",
    );
    eventually("slow runs", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        (v["results"]["agent-1"]["slow"]["state"] == "RUNNING").then_some(())
    });
    let mut cmd = c.drover_command(addr);
    cmd.args(["stop", "slow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let stopping = cmd.spawn().unwrap();
    let log = c.dir.path().join("agent-agent-1/nodes/slow/stdout.log");
    eventually("slow asked to stop", PATIENCE, || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("got-term")
            .then_some(())
    });
    ctl.kill();
    let out = stopping.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(
            "whether the request was carried out is not known: `drover status` shows the nodes"
        ),
        "{stderr}"
    );

    // Nothing answers at all: the request was never sent, so its outcome is known.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cmd = c.drover_command(silent.local_addr().unwrap());
    cmd.args(["--timeout", "2s", "stage-config", file.to_str().unwrap()]);
    let out = drover_tests::run_cli(cmd, PATIENCE);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        !out.stderr.contains("whether the configuration was staged"),
        "nothing was sent: the outcome is known: {}",
        out.stderr
    );
}

/// A node's kill while the agent is out of file descriptors (the cgroup's
/// `cgroup.kill` cannot be opened, nor pidfds of its processes) still reaches it,
/// through its process group and the pidfd the agent holds for it, rather than the
/// node staying "stopping" until descriptors are free again.
#[test]
fn a_kill_reaches_the_node_while_the_agent_is_out_of_descriptors() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    if !agent.log_text().contains("nodes are contained in cgroups") {
        eprintln!("skipped: without cgroups a kill goes through the pidfd the agent holds");
        return;
    }
    let file = c.dir.path().join("slow.toml");
    std::fs::write(&file, SLOW_TO_STOP.replace("\"60s\"", "\"1s\"")).unwrap();
    deploy_ok(&c, addr, &file, &["stub"]);
    let pid = eventually("stub running", PATIENCE, || running_pids(&c, addr, 1))["stub"];
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    let prlimit = |soft: &str| {
        let status = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(agent.pid().to_string())
            .arg(format!("--nofile={soft}:"))
            .status()
            .unwrap();
        assert!(status.success(), "prlimit {soft}");
    };
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_owned();
    // No descriptor free below 3: every file the agent opens from now on fails.
    prlimit("3");
    let mut stop = c.drover_command(addr);
    stop.args(["--timeout", "30s", "stop", "stub"]);
    let stopping = std::thread::spawn(move || drover_tests::run_cli(stop, PATIENCE));
    agent.wait_log("killing the node: it did not end within its stop_timeout");
    eventually(
        "the node killed, the agent still out of descriptors",
        PATIENCE,
        || nix::sys::signal::kill(pid, None).is_err().then_some(()),
    );
    assert!(
        agent
            .log_text()
            .contains("out of file descriptors: signalling the node's process group"),
        "{}",
        agent.log_text()
    );
    prlimit(&soft);
    let _ = stopping.join();
    eventually("stub stopped", PATIENCE, || {
        (node_table(&c, addr)["stub"]["state"] == "STOPPED").then_some(())
    });
}
