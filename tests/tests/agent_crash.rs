//! An agent SIGKILLed at random moments while it deploys a large configuration: once it
//! is back, the host runs exactly the deployed nodes, each once, with the deployed
//! spec, none untracked, and get-nodes agrees with the process table.
//!
//! In every other round the controller goes away too, so the agent has only what it
//! wrote before it acted: it must converge on that alone, and then on what the
//! controller, once back, considers deployed.
//!
//! The kill moment and the configurations come from a seed, printed at the start (set
//! `DROVER_CRASH_SEED` to replay one).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use drover_tests::{Cluster, PATIENCE, alive, bin, eventually};

/// Node names drawn from; each round deploys about three quarters of them.
const NAMES: usize = 200;
const ROUNDS: usize = 6;

/// xorshift64*: enough randomness for kill moments and configurations, replayable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A configuration: node name to spec version.
type Wanted = BTreeMap<String, u64>;

fn write_cluster(c: &Cluster, id: &str, marker: &str, wanted: &Wanted) -> std::path::PathBuf {
    let mut text = format!(
        "id = \"{id}\"\n[defaults]\nbackoff = {{ initial = \"10ms\" }}\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n[instances.agent-1]\n"
    );
    let prog = bin("drover-testprog");
    for (name, version) in wanted {
        text.push_str(&format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--print\", \"{marker}\", \"--print\", \"v{version}\"]\n",
            prog.display()
        ));
    }
    let path = c.dir.path().join(format!("{id}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The live (non-zombie) processes whose command line carries `marker`: pid, the
/// `DROVER_NODE` in their environment, and their command line.
fn node_processes(marker: &str) -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains(marker) {
            continue;
        }
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        });
        if zombie {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let node = env
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(b"DROVER_NODE="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        out.push((pid, node, cmd));
    }
    out
}

/// agent-1's nodes as get-nodes lists them: name to (state, pid).
fn get_nodes(c: &Cluster, addr: SocketAddr) -> BTreeMap<String, (String, Option<u64>)> {
    let v = c.drover(addr, &["get-nodes", "--fresh"]).json();
    let mut out = BTreeMap::new();
    if let Some(nodes) = v["results"]["agent-1"].as_object() {
        for (name, n) in nodes {
            if n["mgmt_role"].is_null() {
                out.insert(
                    name.clone(),
                    (
                        n["state"].as_str().unwrap_or("").to_owned(),
                        n["pid"].as_u64(),
                    ),
                );
            }
        }
    }
    out
}

/// What the agent's desired state (`desired.json` in its state dir) asks for.
fn desired_on_disk(c: &Cluster) -> Wanted {
    let path = c.dir.path().join("agent-agent-1/desired.json");
    let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    d["nodes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, spec)| {
            let last = spec["command"].as_array().unwrap().last().unwrap();
            let version = last
                .as_str()
                .unwrap()
                .trim_start_matches('v')
                .parse()
                .unwrap();
            (name.clone(), version)
        })
        .collect()
}

/// Why the process table does not (yet) hold exactly `wanted`, each once with its
/// spec, or None when it does; the pids by node.
fn process_mismatch(marker: &str, wanted: &Wanted) -> Result<BTreeMap<String, u32>, String> {
    let mut by_node: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
    for (pid, node, cmd) in node_processes(marker) {
        by_node.entry(node).or_default().push((pid, cmd));
    }
    let mut pids = BTreeMap::new();
    for (node, procs) in &by_node {
        let Some(version) = wanted.get(node) else {
            return Err(format!(
                "node {node:?} is not deployed but runs as {procs:?}"
            ));
        };
        if procs.len() != 1 {
            return Err(format!("node {node} runs {} times: {procs:?}", procs.len()));
        }
        let (pid, cmd) = &procs[0];
        if !cmd.ends_with(&format!(" v{version} ")) {
            return Err(format!("node {node} runs an outdated spec: {cmd}"));
        }
        pids.insert(node.clone(), *pid);
    }
    if let Some(n) = wanted.keys().find(|n| !by_node.contains_key(*n)) {
        return Err(format!("node {n} has no process"));
    }
    Ok(pids)
}

/// Waits until `check` finds nothing amiss, failing with its last complaint.
fn converge(what: &str, mut check: impl FnMut() -> Option<String>) -> Duration {
    let t = Instant::now();
    // As `eventually`, keeping the last reason for the message.
    let mut pause = Duration::from_millis(5);
    while let Some(why) = check() {
        assert!(t.elapsed() < PATIENCE, "{what}: {why}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    t.elapsed()
}

/// Why the host does not (yet) run exactly `wanted`, or None when it does.
fn mismatch(c: &Cluster, addr: SocketAddr, marker: &str, wanted: &Wanted) -> Option<String> {
    let listed = get_nodes(c, addr);
    if listed.keys().ne(wanted.keys()) {
        let extra: Vec<_> = listed.keys().filter(|n| !wanted.contains_key(*n)).collect();
        let missing: Vec<_> = wanted.keys().filter(|n| !listed.contains_key(*n)).collect();
        return Some(format!(
            "get-nodes lists {} nodes; extra {extra:?}, missing {missing:?}",
            listed.len()
        ));
    }
    if let Some((n, s)) = listed.iter().find(|(_, (s, _))| s != "RUNNING") {
        return Some(format!("{n} is {}", s.0));
    }
    let pids = match process_mismatch(marker, wanted) {
        Ok(p) => p,
        Err(why) => return Some(why),
    };
    pids.iter()
        .find(|(n, pid)| listed[*n].1 != Some(u64::from(**pid)))
        .map(|(n, pid)| {
            format!(
                "node {n} runs as pid {pid}, get-nodes says {:?} (untracked)",
                listed[n].1
            )
        })
}

fn random_wanted(rng: &mut Rng) -> Wanted {
    let mut out = Wanted::new();
    for i in 0..NAMES {
        if rng.below(4) != 0 {
            out.insert(format!("n{i:03}"), rng.below(3));
        }
    }
    out
}

#[test]
fn agent_sigkilled_during_large_deploys_converges_on_the_deployed_nodes() {
    let seed = std::env::var("DROVER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("DROVER_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let c = Cluster::new();
    let (mut ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let marker = format!("crash-{}", std::process::id());

    let mut configs: BTreeMap<String, Wanted> = BTreeMap::new();
    let first = random_wanted(&mut rng);
    let file = write_cluster(&c, "c0", &marker, &first);
    configs.insert("c0".into(), first);
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    eventually("the first deploy runs", PATIENCE, || {
        mismatch(&c, addr, &marker, &configs["c0"])
            .is_none()
            .then_some(())
    });

    let mut interrupted = 0;
    for round in 1..=ROUNDS {
        let id = format!("c{round}");
        let wanted = random_wanted(&mut rng);
        let file = write_cluster(&c, &id, &marker, &wanted);
        configs.insert(id.clone(), wanted);
        let mut cmd = c.drover_command(addr);
        cmd.args(["deploy-config", file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let away = round % 2 == 0;
        let mut deploying = cmd.spawn().unwrap();
        if away {
            // Into the agent's work: once it has written what it is about to run.
            eventually("the agent wrote the new desired state", PATIENCE, || {
                (desired_on_disk(&c) == configs[&id]).then_some(())
            });
        }
        // The fault itself, not a wait for a condition: the moment of the kill.
        let delay = Duration::from_millis(rng.below(if away { 200 } else { 400 }));
        std::thread::sleep(delay);
        agent.kill();
        let status = deploying.wait().unwrap();
        interrupted += usize::from(!status.success());
        if away {
            ctl.kill();
        }
        agent = c.start_agent("agent-1", addr);
        let how = format!(
            "round {round} (seed {seed}, kill after {delay:?}, deploy {}{})",
            if status.success() { "answered" } else { "cut" },
            if away { ", controller away" } else { "" }
        );
        if away {
            // Alone, the agent converges on what it wrote before it acted.
            let alone = desired_on_disk(&c);
            assert_eq!(alone, configs[&id], "{how}: the desired state on disk");
            let took = converge(&how, || process_mismatch(&marker, &alone).err());
            eprintln!(
                "{how}: alone, converged on its desired state ({} nodes) in {took:?}",
                alone.len()
            );
            ctl = c.start_controller(&addr.to_string()).0;
        }
        // The controller brings the returning agent to its desired deploy, which it
        // recorded before any agent heard of it: the new configuration, whether or not
        // the cut deploy was answered.
        let desired = c.dir.path().join("controller/desired.json");
        let desired: serde_json::Value =
            serde_json::from_slice(&std::fs::read(desired).unwrap()).unwrap();
        let deployed_id = desired["config"]["id"].as_str().unwrap().to_owned();
        assert_eq!(deployed_id, id, "{how}: the controller's desired deploy");
        let wanted = &configs[&deployed_id];
        let took = converge(&format!("{how}, deployed {deployed_id}"), || {
            mismatch(&c, addr, &marker, wanted)
        });
        eprintln!(
            "{how}: converged on {deployed_id} ({} nodes) in {took:?}",
            wanted.len()
        );
    }
    eprintln!("{interrupted} of {ROUNDS} deploys were cut by the kill");
    // Leave nothing behind: the agent stops its nodes on SIGTERM.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(PATIENCE);
    eventually("no node processes left", PATIENCE, || {
        node_processes(&marker).is_empty().then_some(())
    });
}

/// Nodes that talk to their agent after it was SIGKILLed: one pinging a 1 s watchdog,
/// one adopted before it sent READY=1, one adopted before its port opened.
#[test]
fn nodes_adopted_by_the_next_agent_are_heard_watchdog_readiness_and_port() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let prog = bin("drover-testprog").display().to_string();
    let port = drover_tests::free_tcp().port();
    let dog = format!(
        "[instances.agent-1]\n[nodes.dog]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \"--watchdog\", \
         \"--ready-after\", \"0ms\"]\nreadiness = {{ kind = \"notify\" }}\nwatchdog = \"1s\"\n"
    );
    c.deploy_text(addr, "dog.toml", &dog);
    let both = format!(
        "{dog}[nodes.late]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \"--ready-after\", \
         \"6s\"]\nreadiness = {{ kind = \"notify\", timeout = \"60s\" }}\n\
         [nodes.port]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \"--listen\", \
         \"127.0.0.1:{port}\", \"--listen-after\", \"6s\"]\n\
         readiness = {{ kind = \"tcp\", port = {port}, timeout = \"60s\" }}\n"
    );
    let file = c.dir.path().join("both.toml");
    std::fs::write(&file, both).unwrap();
    let deploy = drover_tests::Background::start(
        &c,
        &addr.to_string(),
        &["deploy-config", file.to_str().unwrap()],
        "deploy",
    );
    // Both started, neither ready: the agent goes now.
    let pids = eventually("late and port started", PATIENCE, || {
        let nodes = get_nodes(&c, addr);
        let pid = |n: &str| match nodes.get(n) {
            Some((state, Some(pid))) if state == "PENDING" => Some(*pid),
            _ => None,
        };
        Some((
            pid("dog").or(nodes.get("dog")?.1)?,
            pid("late")?,
            pid("port")?,
        ))
    });
    agent.kill();
    drop(deploy);
    let agent = c.start_agent("agent-1", addr);
    agent.wait_log("adopted running node");
    let ready = eventually(
        "late and port ready in the adopting agent",
        PATIENCE,
        || {
            let nodes = get_nodes(&c, addr);
            let running = |n: &str| {
                nodes
                    .get(n)
                    .filter(|(s, _)| s == "RUNNING")
                    .and_then(|n| n.1)
            };
            Some((running("dog")?, running("late")?, running("port")?))
        },
    );
    assert_eq!(ready, pids, "each node kept its process");
    // Four watchdog periods of the adopted dog: it pings the new agent, which keeps it.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let nodes = get_nodes(&c, addr);
        assert_eq!(
            nodes.get("dog"),
            Some(&("RUNNING".to_owned(), Some(pids.0))),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !agent.log_text().contains("watchdog timeout"),
        "{}",
        agent.log_text()
    );
}

/// The threads of process `pid`: name and voluntary context switches.
fn threads(pid: u64) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|t| {
        let t = t.ok()?.path();
        let name = std::fs::read_to_string(t.join("comm")).ok()?;
        let status = std::fs::read_to_string(t.join("status")).ok()?;
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
            .trim()
            .parse()
            .ok()?;
        Some((name.trim().to_owned(), switches))
    })
    .collect()
}

/// A node that says it is ready while no agent runs (an upgrade, a crash) is RUNNING
/// under the next agent with the same process: the log keeper held its notify socket
/// and read it meanwhile. A node pinging its watchdog ten times a second with a
/// blocking send goes on pinging while no agent runs: the keeper reads what it sends
/// (a socket held unread fills after ten datagrams, and the send then blocks).
#[test]
fn what_nodes_say_while_no_agent_runs_reaches_the_next_agent_and_never_blocks_them() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let prog = bin("drover-testprog").display().to_string();
    let text = format!(
        "[instances.agent-1]\n[nodes.late]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \
         \"--ready-after\", \"2s\"]\nreadiness = {{ kind = \"notify\", timeout = \"90s\" }}\n\
         [nodes.chatty]\ninstance = \"agent-1\"\ncommand = [\"{prog}\", \"--watchdog\"]\n\
         watchdog = \"400ms\"\n"
    );
    let file = c.dir.path().join("late.toml");
    std::fs::write(&file, text).unwrap();
    let deploy = drover_tests::Background::start(
        &c,
        &addr.to_string(),
        &["deploy-config", file.to_str().unwrap()],
        "deploy",
    );
    let (late, chatty) = eventually("late started, chatty running", PATIENCE, || {
        let nodes = get_nodes(&c, addr);
        match (nodes.get("late")?, nodes.get("chatty")?) {
            ((l, Some(late)), (r, Some(chatty))) if l == "PENDING" && r == "RUNNING" => {
                Some((*late, *chatty))
            }
            _ => None,
        }
    });
    agent.kill();
    drop(deploy);
    let pings = |pid| {
        threads(pid)
            .into_iter()
            .find(|(name, _)| name == "watchdog")
            .map(|(_, n)| n)
    };
    let before = pings(chatty).expect("chatty has a watchdog thread");
    // Its thread that sends READY=1 has done so, to no agent.
    eventually("late said it is ready", PATIENCE, || {
        let names = threads(late);
        (!names.is_empty() && !names.iter().any(|(n, _)| n == "ready")).then_some(())
    });
    // Thirty more pings (a sleep between two): none blocked.
    eventually("chatty pinging on while no agent runs", PATIENCE, || {
        (pings(chatty)? >= before + 30).then_some(())
    });
    let agent = c.start_agent("agent-1", addr);
    let running = eventually("both RUNNING under the next agent", PATIENCE, || {
        let nodes = get_nodes(&c, addr);
        match (nodes.get("late")?, nodes.get("chatty")?) {
            ((l, Some(late)), (r, Some(chatty))) if l == "RUNNING" && r == "RUNNING" => {
                Some((*late, *chatty))
            }
            _ => None,
        }
    });
    assert_eq!(running, (late, chatty), "{}", agent.log_text());
    // The adopted chatty is watched and fed by the new agent: still its process after
    // ten of its watchdog periods.
    let since = pings(chatty).expect("chatty runs");
    eventually("chatty pinging the next agent", PATIENCE, || {
        (pings(chatty)? >= since + 40).then_some(())
    });
    assert_eq!(
        get_nodes(&c, addr).get("chatty"),
        Some(&("RUNNING".to_owned(), Some(chatty))),
        "{}",
        agent.log_text()
    );
}

/// A node `stubborn` on instance `agent-1` that ignores SIGTERM: only its
/// `stop_timeout`'s SIGKILL ends it.
fn stubborn_node(stop_timeout: &str) -> String {
    let prog = bin("drover-testprog").display().to_string();
    format!(
        "[nodes.stubborn]\ninstance = \"agent-1\"\n\
         command = [\"{prog}\", \"--ignore-sigterm\"]\nstop_timeout = \"{stop_timeout}\"\n"
    )
}

/// The pid of node `stubborn` once it is RUNNING a process other than `not`.
fn stubborn_running(c: &Cluster, addr: SocketAddr, not: Option<u64>) -> u64 {
    eventually(
        "stubborn running a process",
        PATIENCE,
        || match get_nodes(c, addr).get("stubborn") {
            Some((state, Some(pid))) if state == "RUNNING" && Some(*pid) != not => Some(*pid),
            _ => None,
        },
    )
}

/// A restart cut short by the agent's SIGKILL (its stop signal sent, the process still
/// running: it ignores SIGTERM) is finished by the next agent: the node runs a new
/// process and the old one is gone, rather than being adopted as RUNNING.
#[test]
fn a_restart_cut_short_by_the_agents_death_is_finished_by_the_next_agent() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    c.deploy_text(
        addr,
        "stubborn.toml",
        &format!("[instances.agent-1]\n{}", stubborn_node("3s")),
    );
    let old = stubborn_running(&c, addr, None);
    let restart =
        drover_tests::Background::start(&c, &addr.to_string(), &["restart", "stubborn"], "restart");
    let record = c
        .dir
        .path()
        .join("agent-agent-1/nodes/stubborn/record.json");
    eventually("the restart recorded", PATIENCE, || {
        std::fs::read_to_string(&record)
            .ok()?
            .contains("\"restarting\":true")
            .then_some(())
    });
    agent.kill();
    drop(restart);
    assert!(alive(old), "the old process ignores SIGTERM");
    let agent = c.start_agent("agent-1", addr);
    let new = stubborn_running(&c, addr, Some(old));
    assert!(
        !alive(old),
        "the old process {old} is gone (new {new}): {}",
        agent.log_text()
    );
}

/// A redeploy that changes a running node's spec stops the old process under the old
/// spec's stop settings, also when the agent dies while that stop is under way: the
/// next agent gives the old process its own `stop_timeout` (3 s here), not the new
/// spec's (100 ms).
#[test]
fn a_redeploy_cut_short_by_the_agents_death_stops_under_the_old_spec() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let file = |timeout: &str| format!("[instances.agent-1]\n{}", stubborn_node(timeout));
    c.deploy_text(addr, "old.toml", &file("3s"));
    let old = stubborn_running(&c, addr, None);
    let new_file = c.dir.path().join("new.toml");
    std::fs::write(&new_file, file("100ms")).unwrap();
    let deploy = drover_tests::Background::start(
        &c,
        &addr.to_string(),
        &["deploy-config", new_file.to_str().unwrap()],
        "deploy",
    );
    agent.wait_log("node spec changed; restarting it");
    agent.kill();
    drop(deploy);
    assert!(alive(old), "the old process ignores SIGTERM");
    let started = Instant::now();
    let agent = c.start_agent("agent-1", addr);
    let new = stubborn_running(&c, addr, Some(old));
    let took = started.elapsed();
    assert!(!alive(old), "the old process {old} is gone (new {new})");
    assert!(
        took >= Duration::from_secs(2),
        "the old process was killed {took:?} after the next agent started, within the new \
         spec's stop_timeout rather than its own: {}",
        agent.log_text()
    );
}

/// A deploy that removes a node answers once that node's process is gone, also when
/// the agent died while the removal was under way: the deploy, sent again to the next
/// agent process, waits for the stop that agent finishes.
#[test]
fn a_removal_cut_short_by_the_agents_death_is_waited_for_by_the_deploy() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let prog = bin("drover-testprog").display().to_string();
    let keep = format!(
        "[instances.agent-1]\n[nodes.keep]\ninstance = \"agent-1\"\ncommand = [\"{prog}\"]\n"
    );
    c.deploy_text(addr, "both.toml", &format!("{keep}{}", stubborn_node("3s")));
    let stubborn = stubborn_running(&c, addr, None);
    let file = c.dir.path().join("keep.toml");
    std::fs::write(&file, &keep).unwrap();
    let mut deploy = drover_tests::Background::start(
        &c,
        &addr.to_string(),
        &["deploy-config", file.to_str().unwrap()],
        "deploy",
    );
    agent.wait_log("node removed from the configuration; stopping it");
    agent.kill();
    assert!(alive(stubborn), "stubborn ignores SIGTERM");
    let _agent = c.start_agent("agent-1", addr);
    let status = eventually("the deploy answered", PATIENCE, || deploy.ended());
    assert!(
        !alive(stubborn),
        "the deploy answered ({status}) while the node it removed still runs: {}",
        deploy.stdout()
    );
    assert!(status.success(), "{}\n{}", deploy.stdout(), deploy.stderr());
}

/// A node waiting out its restart backoff when its agent goes waits out the rest of it
/// under the next agent process (restarting the agent neither hurries a crash loop nor
/// resets it), and one whose restart came due meanwhile is started by the next agent:
/// that start is its restart, and is counted as one.
#[test]
fn a_restart_due_when_the_agent_went_is_counted_by_the_next_agent() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let prog = bin("drover-testprog").display().to_string();
    let crasher = |name: &str, initial: &str| {
        format!(
            "[nodes.{name}]\ninstance = \"agent-1\"\n\
             command = [\"{prog}\", \"--exit-after\", \"300ms\", \"--exit-code\", \"3\"]\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n\
             backoff = {{ initial = \"{initial}\", multiplier = 3.0 }}\nmax_failed_starts = 0\n"
        )
    };
    c.deploy_text(
        addr,
        "crasher.toml",
        &format!(
            "[instances.agent-1]\n{}{}",
            crasher("slow", "10m"),
            crasher("soon", "2s")
        ),
    );
    let node = |c: &Cluster, name: &str| {
        c.drover(addr, &["get-nodes", "--full"]).json()["results"]["agent-1"][name].clone()
    };
    let crashed = |c: &Cluster, name: &str| {
        let n = node(c, name);
        (n["state"] == "CRASHED" && n["restart_at_ms"].is_u64()).then_some(n)
    };
    let slow = eventually(
        "slow crashed, its restart due in 10 minutes",
        PATIENCE,
        || crashed(&c, "slow"),
    );
    let soon = eventually("soon crashed", PATIENCE, || crashed(&c, "soon"));
    assert_eq!(
        (&slow["restarts"], &soon["restarts"]),
        (&0.into(), &0.into())
    );
    agent.kill();
    // soon's restart comes due while no agent runs.
    let due = soon["restart_at_ms"].as_u64().unwrap();
    eventually("soon's restart due", PATIENCE, || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        (now > u128::from(due)).then_some(())
    });
    let mut agent = c.start_agent("agent-1", addr);
    let again = eventually("soon started by the next agent", PATIENCE, || {
        let n = node(&c, "soon");
        (n["restarts"].as_u64()? >= 1).then_some(n)
    });
    assert_eq!(again["restarts"], 1, "{again}");
    // slow still waits, for the time the last agent gave it, as its first failure.
    let still = node(&c, "slow");
    assert_eq!(still["state"], "CRASHED", "{still}");
    assert_eq!(still["restarts"], 0, "{still}");
    let (was, now) = (
        slow["restart_at_ms"].as_u64().unwrap(),
        still["restart_at_ms"].as_u64().unwrap(),
    );
    assert!(was.abs_diff(now) < 2_000, "restart at {now}, was {was}");
    // An agent stopped with SIGTERM (`--on-exit stop`) stops its nodes: the next one
    // starts slow afresh (it crashes again, later), rather than waiting out the rest.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(PATIENCE);
    let _agent = c.start_agent("agent-1", addr);
    eventually("slow started afresh and crashed again", PATIENCE, || {
        let n = crashed(&c, "slow")?;
        (n["restart_at_ms"].as_u64()? > was + 1_000).then_some(())
    });
}

/// An agent stopped with SIGTERM (its nodes stopped with it, as `systemctl restart`
/// does) and started again on its state dir starts every node again and leaves them
/// running: its sweep of the cgroups no live node owns must not take one whose spawn
/// is under way (its new process is in its cgroup before the spawn's outcome is in).
#[test]
fn nodes_started_again_by_the_next_agent_are_left_running() {
    use nix::sys::signal::Signal;

    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let prog = bin("drover-testprog").display().to_string();
    let names: Vec<String> = (1..=12).map(|i| format!("s{i}")).collect();
    let mut text = "[instances.agent-1]\n[defaults]\nrestart = \"never\"\n\
                    readiness = { kind = \"start-period\", period = \"0s\" }\n"
        .to_owned();
    for n in &names {
        text.push_str(&format!(
            "[nodes.{n}]\ninstance = \"agent-1\"\ncommand = [\"{prog}\"]\n"
        ));
    }
    c.deploy_text(addr, "sleepers.toml", &text);
    let all_running = |c: &Cluster| {
        let nodes = get_nodes(c, addr);
        names
            .iter()
            .all(|n| {
                nodes
                    .get(n)
                    .is_some_and(|(state, pid)| state == "RUNNING" && pid.is_some())
            })
            .then_some(())
    };
    eventually("every node running", PATIENCE, || all_running(&c));
    for round in 0..3 {
        agent.signal(Signal::SIGTERM);
        agent.wait_exit(PATIENCE);
        agent = c.start_agent("agent-1", addr);
        eventually(
            &format!("round {round}: every node running again"),
            PATIENCE,
            || all_running(&c),
        );
        let log = agent.log_text();
        assert!(
            !log.contains("killing what is left in"),
            "round {round}: the next agent killed a node it had just started:\n{log}"
        );
    }
}
