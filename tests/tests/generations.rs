//! Deploy generations with a real controller and real agents: a deploy is desired state,
//! recorded before any agent hears of it; a config id is only a label; a deploy that
//! cannot be recorded changes nothing, now or after a controller restart; compare and
//! swap on the staged id; stages refused while a deploy runs; the applied generation
//! shown per agent; impossible CPU pinning refused before anything changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use drover_tests::{Cluster, MuteAgent, PATIENCE, bin, eventually, free_tcp, metric_value, scrape};

/// A cluster file with id `id` and testprog nodes `n1`..`nN` on `agent-1`, each with
/// `extra` in its table.
fn cluster_file(c: &Cluster, name: &str, id: &str, nodes: usize, extra: &str) -> PathBuf {
    let prog = bin("drover-testprog");
    let mut text = format!(
        "id = \"{id}\"\n[defaults]\nbackoff = {{ initial = \"10ms\" }}\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n[instances.agent-1]\n"
    );
    for i in 1..=nodes {
        text.push_str(&format!(
            "[nodes.n{i}]\ninstance = \"agent-1\"\ncommand = [\"{}\", \"--sleep-forever\"]\n{extra}",
            prog.display()
        ));
    }
    let path = c.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// node name -> pid of every RUNNING node, if there are `count` nodes and all run.
fn running(c: &Cluster, addr: SocketAddr, count: usize) -> Option<BTreeMap<String, u64>> {
    let v = c.drover(addr, &["get-nodes"]).json();
    let mut out = BTreeMap::new();
    for (_, nodes) in v["results"].as_object()? {
        for (name, n) in nodes.as_object()? {
            if n["mgmt_role"].is_null() {
                if n["state"] != "RUNNING" {
                    return None;
                }
                out.insert(name.clone(), n["pid"].as_u64()?);
            }
        }
    }
    (out.len() == count).then_some(out)
}

fn environ(pid: u64) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default())
        .replace('\0', "\n")
}

fn start(c: &Cluster, extra: &[&str]) -> (drover_tests::Proc, SocketAddr, drover_tests::Proc) {
    let (ctl, addr) = c.start_controller_with("127.0.0.1:0", extra);
    let agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    (ctl, addr, agent)
}

/// `drover_agents_lagging` on the metrics page at `addr`.
fn lagging(addr: SocketAddr) -> Option<f64> {
    metric_value(&scrape(addr), "drover_agents_lagging")
}

/// The GEN column of the `status` row of `node`.
fn status_generation(c: &Cluster, addr: SocketAddr, node: &str) -> Option<String> {
    let out = c.drover(addr, &["status"]);
    let header = out.stdout.lines().next()?.to_owned();
    let col = header.find("GEN")?;
    let row = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(node))?
        .to_owned();
    Some(row.get(col..)?.split_whitespace().next()?.to_owned())
}

#[test]
fn a_deploy_that_cannot_be_recorded_changes_nothing_even_after_a_controller_restart() {
    let c = Cluster::new();
    let (mut ctl, addr, _agent) = start(&c, &[]);
    let old = cluster_file(&c, "old.toml", "old", 2, "env = { WHICH = \"old\" }\n");
    let out = c.drover(addr, &["deploy-config", old.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("2 running", PATIENCE, || running(&c, addr, 2));
    assert_eq!(status_generation(&c, addr, "agent-1").as_deref(), Some("1"));
    let table = c.drover(addr, &["-o", "table", "get-instances"]).stdout;
    let header = table.lines().next().unwrap();
    assert!(header.trim_end().ends_with("GENERATION"), "{table}");
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with("agent-1"))
        .unwrap();
    assert_eq!(row.split_whitespace().last(), Some("1"), "{table}");
    // zeek-client's get-instances shape is unchanged.
    let out = c.drover(
        addr,
        &["--set", "client.pretty_json=false", "get-instances"],
    );
    assert_eq!(out.stdout, "{\"agent-1\": {\"host\": \"127.0.0.1\"}}\n");

    // The desired deploy cannot be written: a directory where its temp file goes (a
    // file system failure root cannot override, as a full disk).
    let state = c.dir.path().join("controller");
    std::fs::create_dir(state.join("desired.json.tmp")).unwrap();
    let new = cluster_file(&c, "new.toml", "new", 2, "env = { WHICH = \"new\" }\n");
    let out = c.drover(addr, &["deploy-config", new.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains("cannot record the deploy, nothing was deployed")
            && errors.contains("desired.json"),
        "{errors}"
    );
    assert!(
        out.json()["results"]["nodes"].is_null(),
        "no agent was told: {}",
        out.stdout
    );
    // Nothing changed: same processes with the old environment, the old deployed
    // configuration, the old desired generation.
    assert_eq!(running(&c, addr, 2), Some(before.clone()));
    for pid in before.values() {
        assert!(environ(*pid).contains("WHICH=old"), "{}", environ(*pid));
    }
    let deployed = c.drover(addr, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(deployed.json()["id"], "old");
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("1")
    );

    // A controller restart brings the agent to the desired deploy, which is still the
    // old one: nothing restarts.
    ctl.kill();
    let (ctl2, addr2) = c.start_controller(&addr.to_string());
    ctl2.wait_log("agent 'agent-1' brought to the desired generation 1");
    assert_eq!(running(&c, addr2, 2), Some(before.clone()));
    for pid in before.values() {
        assert!(environ(*pid).contains("WHICH=old"));
    }

    // Once the state dir is writable again, the same deploy goes through as the next
    // generation.
    std::fs::remove_dir(state.join("desired.json.tmp")).unwrap();
    let out = c.drover(addr2, &["deploy-config", new.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let after = eventually("2 new running", PATIENCE, || {
        running(&c, addr2, 2).filter(|m| m.values().all(|p| environ(*p).contains("WHICH=new")))
    });
    assert!(after.values().all(|p| !before.values().any(|b| b == p)));
    assert_eq!(
        status_generation(&c, addr2, "controller").as_deref(),
        Some("2")
    );
    assert_eq!(
        status_generation(&c, addr2, "agent-1").as_deref(),
        Some("2")
    );
}

/// An agent that answers an Apply without applying it (its desired state cannot be
/// written) has not acknowledged the generation: the deploy says so, the deployed
/// configuration stays the old one, the agent shows as lagging, and once it can write
/// again the controller brings it to the desired deploy by itself, without a reconnect
/// or another deploy.
/// A deploy every agent applied whose record as the deployed one failed (a full disk):
/// once the record can be written, it is, without a restart or another deploy.
#[test]
fn a_deployed_record_that_could_not_be_written_is_written_once_it_can() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let old = cluster_file(&c, "old.toml", "old", 1, "");
    let out = c.drover(addr, &["deploy-config", old.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    // A directory where the deployed record's temp file goes.
    let blocker = c.dir.path().join("controller/deployed.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let new = cluster_file(&c, "new.toml", "new", 1, "env = { WHICH = \"new\" }\n");
    let out = c.drover(addr, &["deploy-config", new.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(
            "generation 2 was applied, but cannot be recorded as the deployed configuration"
        ),
        "{}",
        out.stdout
    );
    let deployed = || {
        c.drover(addr, &["get-config", "--deployed", "--as-json"])
            .json()["id"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(deployed().as_deref(), Some("old"));
    std::fs::remove_dir(&blocker).unwrap();
    eventually("the deployed record written", PATIENCE, || {
        (deployed().as_deref() == Some("new")).then_some(())
    });
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("2")
    );
}

#[test]
fn an_agent_that_cannot_record_a_deploy_lags_and_is_brought_to_it_once_it_can() {
    let c = Cluster::new();
    let metrics = free_tcp();
    let (ctl, addr, agent) = start(&c, &["--metrics-listen", &metrics.to_string()]);
    let old = cluster_file(&c, "old.toml", "old", 1, "env = { WHICH = \"old\" }\n");
    let out = c.drover(addr, &["deploy-config", old.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("1 running", PATIENCE, || running(&c, addr, 1));

    // The agent cannot write its desired state: a directory where its temp file goes.
    let blocker = c.dir.path().join("agent-agent-1").join("desired.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let new = cluster_file(&c, "new.toml", "new", 2, "env = { WHICH = \"new\" }\n");
    let out = c.drover(addr, &["deploy-config", new.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains("cannot record the desired state")
            && errors.contains("generation 2")
            && errors.contains("no acknowledgement from agent-1"),
        "{errors}"
    );
    let deployed = c.drover(addr, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(deployed.json()["id"], "old");
    assert_eq!(
        status_generation(&c, addr, "agent-1").as_deref(),
        Some("1"),
        "the applied generation"
    );
    let row = c
        .drover(addr, &["status"])
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("agent-1"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(row.contains("1 (lags 2)"), "{row}");
    assert_eq!(lagging(metrics), Some(1.0));
    assert_eq!(
        running(&c, addr, 1),
        Some(before.clone()),
        "nothing changed"
    );
    // It is sent the deploy again while it lags, and says why it cannot apply it; the
    // same refusal again is not warned about again.
    ctl.wait_log("agent 'agent-1' did not apply the desired generation 2");
    agent.wait_log("cannot record the desired state");
    let log = ctl.wait_log("agent 'agent-1' still does not apply the desired generation 2");
    assert_eq!(
        log.matches("did not apply the desired generation 2")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(running(&c, addr, 1), Some(before));

    // Writable again: the agent is brought to generation 2, which becomes the deployed
    // configuration.
    std::fs::remove_dir(&blocker).unwrap();
    eventually("2 new running", PATIENCE, || {
        running(&c, addr, 2).filter(|m| m.values().all(|p| environ(*p).contains("WHICH=new")))
    });
    eventually("agent-1 at generation 2", PATIENCE, || {
        (status_generation(&c, addr, "agent-1").as_deref() == Some("2")).then_some(())
    });
    eventually("the new configuration deployed", PATIENCE, || {
        let deployed = c.drover(addr, &["get-config", "--deployed", "--as-json"]);
        (deployed.json()["id"] == "new").then_some(())
    });
    assert_eq!(lagging(metrics), Some(0.0));
}

/// How often the controller logged bringing `agent-1` to generation `generation`.
fn brought_to(ctl: &drover_tests::Proc, generation: u64) -> usize {
    ctl.log_text()
        .matches(&format!(
            "agent 'agent-1' brought to the desired generation {generation}"
        ))
        .count()
}

/// A deploy that restarts every node (zeek-client's deploys do, to load new scripts)
/// and that an agent misses is carried out when the agent is brought to it later, not
/// turned into a deploy of the changed nodes alone; and once only, however often it is
/// sent again.
#[test]
fn an_agent_that_missed_a_restart_of_every_node_restarts_them_when_brought_to_it_and_once() {
    let c = Cluster::new();
    let (ctl, addr, mut agent) = start(&c, &[]);
    let file = cluster_file(&c, "a.toml", "same", 2, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("2 running", PATIENCE, || running(&c, addr, 2));

    // The agent cannot record generation 2, which restarts every node of an unchanged
    // configuration.
    let blocker = c.dir.path().join("agent-agent-1").join("desired.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let out = c.drover(addr, &["deploy", "--restart-all"]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.json()["errors"]
            .to_string()
            .contains("no acknowledgement from agent-1"),
        "{}",
        out.stdout
    );
    assert_eq!(
        running(&c, addr, 2),
        Some(before.clone()),
        "nothing restarted"
    );

    // Brought to it by the controller's retry: every node restarts, although no spec
    // changed.
    std::fs::remove_dir(&blocker).unwrap();
    let after = eventually("both nodes restarted", PATIENCE, || {
        running(&c, addr, 2).filter(|m| m.iter().all(|(n, pid)| before.get(n) != Some(pid)))
    });
    eventually("agent-1 at generation 2", PATIENCE, || {
        (status_generation(&c, addr, "agent-1").as_deref() == Some("2")).then_some(())
    });
    let brought = eventually("the retry answered", PATIENCE, || {
        let n = brought_to(&ctl, 2);
        (n > 0).then_some(n)
    });

    // A new agent process adopts the nodes and is sent generation 2 again on connecting:
    // it has carried it out, so nothing restarts.
    agent.kill();
    let _agent = c.start_agent("agent-1", addr);
    eventually(
        "the reconnected agent brought to generation 2",
        PATIENCE,
        || (brought_to(&ctl, 2) > brought).then_some(()),
    );
    assert_eq!(
        running(&c, addr, 2),
        Some(after),
        "a repeat restarted nodes"
    );
}

/// A cluster file with one node, `n1`, on instance `mute`, that runs until stopped.
fn mute_file(c: &Cluster) -> PathBuf {
    let file = c.dir.path().join("mute.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.mute]\n[nodes.n1]\ninstance = \"mute\"\ncommand = [\"{}\", \"--sleep-forever\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n",
            bin("drover-testprog").display()
        ),
    )
    .unwrap();
    file
}

/// An agent restarts while the controller still holds its old connection, and a deploy
/// goes out on that one: once the new connection replaces it, the deploy reaches the
/// agent there and succeeds, rather than failing with the old connection's end.
#[test]
fn a_deploy_sent_on_an_agents_stale_connection_reaches_it_on_its_new_one() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller_with("127.0.0.1:0", &["--request-timeout", "20s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The old connection: it takes requests and never answers, as one whose agent died
    // a moment ago.
    let _stale = MuteAgent::connect(&c, addr, &rt);
    c.wait_for_agent(addr, "mute");
    let file = mute_file(&c);
    let mut cmd = c.drover_command(addr);
    cmd.args(["--timeout", "30s", "deploy-config"]).arg(&file);
    let (out, _agent) = std::thread::scope(|s| {
        let deploy = s.spawn(|| drover_tests::run_cli(cmd, std::time::Duration::from_secs(60)));
        ctl.wait_log("deploying");
        // The agent comes back: its new connection replaces the old, which does not
        // answer the controller's probe.
        let agent = c.start_agent("mute", addr);
        let out = deploy.join().unwrap();
        ctl.wait_log("a new connection from");
        (out, agent)
    });
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.json()["results"].to_string().contains("n1"),
        "{}",
        out.stdout
    );
    assert_eq!(running(&c, addr, 1).map(|m| m.len()), Some(1));
    let deployed = c.drover(addr, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(
        deployed.json()["nodes"][0]["name"],
        "n1",
        "{}",
        deployed.stdout
    );
}

/// An operator's stop that goes out on the connection of an agent that has just died is
/// sent again on the connection of the agent process that takes its place, which adopted
/// the node: the stop succeeds and the node stops, rather than the command failing with
/// the old connection's end while the node runs on. A restart sent alongside is not sent
/// again, since the agent may have carried out its first copy: it fails, naming the
/// instance.
#[test]
fn a_stop_sent_on_an_agents_stale_connection_reaches_it_on_its_new_one() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller_with("127.0.0.1:0", &["--request-timeout", "20s"]);
    let mut agent = c.start_agent("mute", addr);
    c.wait_for_agent(addr, "mute");
    let file = mute_file(&c);
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let pid = eventually("n1 running", PATIENCE, || running(&c, addr, 1))["n1"];
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());

    // The agent dies (its node runs on); a connection that takes requests and answers
    // none holds its name, as the dead agent's own would until its idle timeout.
    agent.kill();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mute = MuteAgent::connect(&c, addr, &rt);
    let mut restart = c.drover_command(addr);
    restart.args(["--timeout", "30s", "restart", "n1"]);
    let mut stop = c.drover_command(addr);
    stop.args(["--timeout", "30s", "stop", "n1"]);
    let patience = std::time::Duration::from_secs(60);
    let (restarted, out, _agent) = std::thread::scope(|s| {
        let restart = s.spawn(|| drover_tests::run_cli(restart, patience));
        eventually("the restart on the old connection", PATIENCE, || {
            mute.received().iter().any(|r| r == "restart").then_some(())
        });
        let stop = s.spawn(|| drover_tests::run_cli(stop, patience));
        eventually("the stop on the old connection", PATIENCE, || {
            mute.received().iter().any(|r| r == "stop").then_some(())
        });
        assert!(
            nix::sys::signal::kill(pid, None).is_ok(),
            "the node runs while the stop waits"
        );
        // A new agent process adopts the node; its connection replaces the old one,
        // which does not answer the controller's probe.
        let agent = c.start_agent("mute", addr);
        (restart.join().unwrap(), stop.join().unwrap(), agent)
    });
    assert_ne!(restarted.code, Some(0), "{}", restarted.stdout);
    assert!(
        restarted.stdout.contains("mute") && restarted.stdout.contains("connection closed"),
        "{}",
        restarted.stdout
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.json()["results"]["n1"], true, "{}", out.stdout);
    eventually("n1 gone", PATIENCE, || {
        nix::sys::signal::kill(pid, None).is_err().then_some(())
    });
    let nodes = c.drover(addr, &["get-nodes"]).json();
    assert_eq!(
        nodes["results"]["mute"]["n1"]["state"], "STOPPED",
        "{nodes}"
    );
}

/// Needs agents that apply by generation: with agents that skip an Apply whose config
/// id they already have, the edited node keeps running its old command.
#[test]
fn a_same_id_redeploy_of_an_edited_config_restarts_the_changed_node() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let file = cluster_file(&c, "a.toml", "label", 2, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("2 running", PATIENCE, || running(&c, addr, 2));

    // The exported deployed configuration carries the id; edit one node's command.
    let exported = c.dir.path().join("exported.toml");
    let out = c.drover(
        addr,
        &[
            "get-config",
            "--deployed",
            "--as-toml",
            "-f",
            exported.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let text = std::fs::read_to_string(&exported).unwrap();
    assert!(text.contains("label"), "{text}");
    let edited = text.replacen(
        "\"--sleep-forever\"",
        "\"--sleep-forever\", \"--status\", \"edited\"",
        1,
    );
    assert_ne!(edited, text, "the export names the command: {text}");
    std::fs::write(&exported, edited).unwrap();
    let out = c.drover(addr, &["deploy-config", exported.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let after = eventually("the edited node restarted", PATIENCE, || {
        running(&c, addr, 2).filter(|m| m != &before)
    });
    let changed: Vec<&String> = after.keys().filter(|n| after[*n] != before[*n]).collect();
    assert_eq!(
        changed.len(),
        1,
        "exactly one node restarted: {before:?} -> {after:?}"
    );
    // The agent reports the generation it applied; it does not lag.
    eventually("agent at generation 2", PATIENCE, || {
        (status_generation(&c, addr, "agent-1").as_deref() == Some("2")).then_some(())
    });
    // A repeat of the same file is a new generation that restarts nothing.
    let out = c.drover(addr, &["deploy-config", exported.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(running(&c, addr, 2), Some(after));
    eventually("agent at generation 3", PATIENCE, || {
        (status_generation(&c, addr, "agent-1").as_deref() == Some("3")).then_some(())
    });
}

#[test]
fn deploy_with_a_stale_expect_id_is_refused_and_changes_nothing() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let a = cluster_file(&c, "a.toml", "cfg-a", 1, "");
    let b = cluster_file(&c, "b.toml", "cfg-b", 2, "");
    let out = c.drover(addr, &["stage-config", a.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // Another client stages b meanwhile.
    let out = c.drover(addr, &["stage-config", b.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let out = c.drover(addr, &["deploy", "--expect-id", "cfg-a"]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains("'cfg-b'") && errors.contains("'cfg-a'"),
        "names both ids: {errors}"
    );
    let out = c.drover(addr, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(out.code, Some(1), "nothing deployed: {}", out.stdout);
    assert!(running(&c, addr, 0).is_some());

    let out = c.drover(addr, &["deploy", "--expect-id", "cfg-b"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("2 running", PATIENCE, || running(&c, addr, 2));
    assert_eq!(
        c.drover(addr, &["get-config", "--deployed", "--as-json"])
            .json()["id"],
        "cfg-b"
    );
}

#[test]
fn a_deploy_an_agent_does_not_acknowledge_is_desired_not_deployed_and_blocks_stages() {
    let c = Cluster::new();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_ctl, addr, _agent) = start(
        &c,
        &[
            "--request-timeout",
            "4s",
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );
    let first = cluster_file(&c, "first.toml", "first", 1, "");
    let out = c.drover(addr, &["deploy-config", first.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("1 running", PATIENCE, || running(&c, addr, 1));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let _mute = MuteAgent::connect(&c, addr, &rt);
    eventually("both agents listed", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        (v.as_object().unwrap().len() == 2).then_some(())
    });
    // The mute agent is one of the configuration's instances (without nodes), so its
    // acknowledgement is needed.
    let second = cluster_file(&c, "second.toml", "second", 2, "");
    let text = std::fs::read_to_string(&second).unwrap() + "[instances.mute]\n";
    std::fs::write(&second, text).unwrap();
    let out = c.drover(addr, &["stage-config", second.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut cmd = std::process::Command::new(bin("drover"));
    cmd.args(["--controller", &addr.to_string(), "--timeout", "10s"])
        .arg("--ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--cert")
        .arg(c.pki_file("ops.crt"))
        .arg("--key")
        .arg(c.pki_file("ops.key"))
        .arg("deploy");
    let deploying = std::thread::scope(|s| {
        let deploy = s.spawn(|| drover_tests::run_cli(cmd, std::time::Duration::from_secs(30)));
        // While the deploy waits for the mute agent, stages are refused. (The same
        // file as staged, so that a stage that comes before the deploy changes
        // nothing.)
        let refusal = eventually("a stage refused", PATIENCE, || {
            let out = c.drover(addr, &["stage-config", second.to_str().unwrap()]);
            (out.code == Some(1)).then_some(out)
        });
        (deploy.join().unwrap(), refusal)
    });
    let (out, refusal) = deploying;
    assert!(
        refusal.json()["errors"]
            .to_string()
            .contains("cannot stage while deployment"),
        "{}",
        refusal.stdout
    );
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains("generation 2") && errors.contains("no acknowledgement from mute"),
        "{errors}"
    );
    // The real agent runs the desired deploy; the deployed one is still the first.
    eventually("2 running", PATIENCE, || running(&c, addr, 2));
    let deployed = c.drover(addr, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(deployed.json()["id"], "first");
    assert_eq!(
        running(&c, addr, 2).unwrap()["n1"],
        before["n1"],
        "an unchanged node keeps running"
    );
    let staged = c.drover(addr, &["get-config", "--as-json"]);
    assert_eq!(staged.json()["id"], "second");
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("2")
    );
    assert_eq!(status_generation(&c, addr, "agent-1").as_deref(), Some("2"));
    // The metrics say who lags: the mute agent never applied anything.
    let page = scrape(metrics);
    for (series, want) in [
        ("drover_desired_generation", 2.0),
        ("drover_deployed_generation", 1.0),
        ("drover_agent_applied_generation{instance=\"agent-1\"}", 2.0),
        ("drover_agents_lagging", 1.0),
    ] {
        let got = page.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        });
        assert_eq!(got, Some(want), "{series} in\n{page}");
    }
    assert!(!page.contains("instance=\"mute\""), "{page}");
}

/// Needs agents that report their CPU count in their own status entry.
#[test]
fn a_node_pinned_to_a_cpu_the_instance_lacks_is_refused_before_anything_changes() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let ok = cluster_file(&c, "ok.toml", "ok", 1, "cpu_affinity = 0\n");
    let out = c.drover(addr, &["deploy-config", ok.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("1 running", PATIENCE, || running(&c, addr, 1));
    let bad = cluster_file(&c, "bad.toml", "bad", 2, "cpu_affinity = [0, 1023]\n");
    let out = c.drover(addr, &["deploy-config", bad.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains("node 'n1' is pinned to CPU 1023")
            && errors.contains("node 'n2' is pinned to CPU 1023")
            && errors.contains("instance 'agent-1' has"),
        "{errors}"
    );
    // A person reads why on stderr too.
    assert!(
        out.stderr
            .contains("error: node 'n1' is pinned to CPU 1023")
            && out
                .stderr
                .contains("error: node 'n2' is pinned to CPU 1023"),
        "{}",
        out.stderr
    );
    assert_eq!(running(&c, addr, 1), Some(before));
    assert_eq!(
        c.drover(addr, &["get-config", "--deployed", "--as-json"])
            .json()["id"],
        "ok"
    );
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("1")
    );
}

#[test]
fn state_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::new();
    let state = c.dir.path().join("controller");
    // A state dir and file from an older version, readable by everyone.
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut legacy = drover_proto::Configuration::empty();
    legacy.id = "legacy".into();
    std::fs::write(
        state.join("deployed.json"),
        serde_json::to_vec(&legacy).unwrap(),
    )
    .unwrap();
    std::fs::set_permissions(
        state.join("deployed.json"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ctl, addr, _agent) = start(&c, &[]);
    assert!(ctl.log_text().contains("tightened the modes of"));
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(state.clone()), 0o700);
    assert_eq!(mode(state.join("deployed.json")), 0o600);
    // The old deployed configuration loads, as generation 1.
    assert_eq!(
        c.drover(addr, &["get-config", "--deployed", "--as-json"])
            .json()["id"],
        "legacy"
    );
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("1")
    );
    let file = cluster_file(&c, "a.toml", "a", 1, "env = { SECRET = \"x\" }\n");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    for f in [
        "staged.json",
        "desired.json",
        "deployed.json",
        "deployed.json.prev",
    ] {
        assert_eq!(mode(state.join(f)), 0o600, "{f}");
    }
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("2")
    );
    // An export made by the client is private too.
    let export = c.dir.path().join("export.toml");
    let out = c.drover(
        addr,
        &[
            "get-config",
            "--deployed",
            "--as-toml",
            "-f",
            export.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(std::fs::read_to_string(&export).unwrap().contains("SECRET"));
    assert_eq!(mode(export), 0o600);
}

/// On a terminal, the deploy's spinner says how many of its nodes have settled so far.
#[test]
fn a_deploy_on_a_terminal_shows_its_progress() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let file = cluster_file(&c, "slow.toml", "slow", 2, "");
    // n2 takes a while to be ready, so the deploy is still waiting when n1 runs.
    let text = std::fs::read_to_string(&file).unwrap().replacen(
        "[nodes.n2]\n",
        "[nodes.n2]\nreadiness = { kind = \"start-period\", period = \"2s\" }\n",
        1,
    );
    std::fs::write(&file, text).unwrap();
    let drover = format!(
        "{} --controller {addr} --ca {} --cert {} --key {} deploy-config {}",
        bin("drover").display(),
        c.pki_file("ca.crt").display(),
        c.pki_file("ops.crt").display(),
        c.pki_file("ops.key").display(),
        file.display()
    );
    // script(1) gives the CLI a terminal.
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &drover, "/dev/null"])
        .env("TERM", "xterm");
    let out = drover_tests::run_cli(cmd, std::time::Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("deploying: 1 of 2 nodes settled"),
        "{:?}",
        out.stdout
    );
    assert!(out.stdout.contains("\"id\": \"slow\""), "{}", out.stdout);
    eventually("2 running", PATIENCE, || running(&c, addr, 2));
}

/// An operator restores the controller's state dir from an older copy (a backup): its
/// desired generation is older than what the agents applied. No agent takes an older
/// generation, so nothing changes; `status` shows each such agent ahead and warns, the
/// controller says what happened, the metrics count them, and the next deploy (of the
/// restored configuration, here) is a newer generation every agent takes.
#[test]
fn a_controller_state_restored_from_an_older_copy_changes_nothing_until_a_deploy() {
    let c = Cluster::new();
    let metrics = free_tcp();
    let metrics_arg = metrics.to_string();
    let (mut ctl, addr, _agent) = start(&c, &["--metrics-listen", &metrics_arg]);
    let old = cluster_file(&c, "old.toml", "old", 1, "env = { WHICH = \"old\" }\n");
    let out = c.drover(addr, &["deploy-config", old.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    eventually("n1 running", PATIENCE, || running(&c, addr, 1));
    let state = c.dir.path().join("controller");
    let backup = c.dir.path().join("backup");
    std::fs::create_dir(&backup).unwrap();
    for name in ["staged.json", "desired.json", "deployed.json"] {
        std::fs::copy(state.join(name), backup.join(name)).unwrap();
    }
    let new = cluster_file(&c, "new.toml", "new", 2, "env = { WHICH = \"new\" }\n");
    let out = c.drover(addr, &["deploy-config", new.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("n1, n2 running", PATIENCE, || {
        running(&c, addr, 2).filter(|m| m.values().all(|p| environ(*p).contains("WHICH=new")))
    });

    ctl.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(ctl.wait_exit(PATIENCE).success());
    for name in ["staged.json", "desired.json", "deployed.json"] {
        std::fs::copy(backup.join(name), state.join(name)).unwrap();
    }
    let (ctl2, addr2) =
        c.start_controller_with(&addr.to_string(), &["--metrics-listen", &metrics_arg]);
    ctl2.wait_log("agent 'agent-1' has applied generation 2, newer than the desired generation 1");
    assert_eq!(
        running(&c, addr2, 2),
        Some(before.clone()),
        "nothing changed"
    );
    assert_eq!(
        status_generation(&c, addr2, "agent-1").as_deref(),
        Some("2")
    );
    let out = c.drover(addr2, &["status"]);
    assert!(out.stdout.contains("2 (ahead of 1)"), "{}", out.stdout);
    assert!(
        out.stderr.contains(
            "warning: agent 'agent-1' has applied generation 2, newer than the controller's desired generation 1"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(
        metric_value(&scrape(metrics), "drover_agents_ahead"),
        Some(1.0)
    );
    assert_eq!(lagging(metrics), Some(0.0));

    // The restored configuration, deployed: generation 3, which the agent takes.
    let out = c.drover(addr2, &["deploy"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let after = eventually("the restored n1 alone", PATIENCE, || {
        running(&c, addr2, 1).filter(|m| m.values().all(|p| environ(*p).contains("WHICH=old")))
    });
    assert!(!before.values().any(|p| after.values().any(|a| a == p)));
    assert_eq!(
        status_generation(&c, addr2, "agent-1").as_deref(),
        Some("3")
    );
    let out = c.drover(addr2, &["status"]);
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
    assert_eq!(
        metric_value(&scrape(metrics), "drover_agents_ahead"),
        Some(0.0)
    );
}

/// An agent whose open-file limit leaves room for fewer nodes than a deploy gives it
/// (each running node holds descriptors in it): the deploy is refused before anything
/// changes, naming the instance, the count and the room, instead of nodes failing to
/// start one by one with "too many open files"; the agent warns of its limit at start.
#[test]
fn more_nodes_than_an_agents_open_file_limit_allows_are_refused_before_anything_changes() {
    let c = Cluster::new();
    let (_ctl, addr) = c.start_controller("127.0.0.1:0");
    c.issue(drover_proto::msg::PeerRole::Agent, "agent-1");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 600 && exec \"$0\" \"$@\"")
        .arg(bin("drover-agent"));
    let agent = c.start_agent_cmd(
        cmd,
        "agent-1",
        "agent-1",
        &["--controller", &addr.to_string()],
    );
    c.wait_for_agent(addr, "agent-1");
    // (600 - 64 - 2 x 192 follows) / 6
    let room = 25;
    assert!(
        agent.log_text().contains(&format!(
            "the open-file limit (600) leaves room for {room} nodes on this agent"
        )),
        "{}",
        agent.log_text()
    );
    let fits = cluster_file(&c, "fits.toml", "fits", 20, "");
    let out = c.drover(addr, &["deploy-config", fits.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("20 running", PATIENCE, || running(&c, addr, 20));

    let over = cluster_file(&c, "over.toml", "over", 40, "env = { WHICH = \"over\" }\n");
    let out = c.drover(addr, &["deploy-config", over.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains(&format!(
            "instance 'agent-1' is given 40 nodes, but its agent's open-file limit leaves room for {room}"
        )),
        "{errors}"
    );
    assert_eq!(running(&c, addr, 20), Some(before), "nothing changed");
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("1")
    );
}

/// Two files exported from one configuration carry one id: what `deploy-config`
/// deploys is checked by the stage request that staged it, so a client never deploys
/// (and reports as its own) what another client staged meanwhile under the same id.
#[test]
fn a_deploy_expecting_its_own_stage_is_refused_when_another_client_staged_the_same_id() {
    use drover_proto::msg::{ClientRequest, ClientResponse};
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let read = |path: &PathBuf| {
        drover_proto::config::parse_toml("f.toml", &std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let mine = read(&cluster_file(&c, "mine.toml", "shared", 1, ""));
    let theirs = read(&cluster_file(&c, "theirs.toml", "shared", 2, ""));
    assert_eq!(mine.id, theirs.id);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let call = |req: ClientRequest| {
        rt.block_on(async {
            let (endpoint, conn) = c.client_connection(addr).await;
            let reply: ClientResponse =
                drover_net::conn::call(&conn, &req, PATIENCE).await.unwrap();
            endpoint.close(0u32.into(), b"");
            reply
        })
    };
    let stage = |config: &drover_proto::Configuration| {
        let reply = call(ClientRequest::StageConfig {
            config: Box::new(config.clone()),
        });
        let ClientResponse::Results(results) = reply else {
            panic!("{reply:?}")
        };
        assert!(results[0].success, "{results:?}");
        results[0].reqid.clone()
    };
    let deploy = |stage: String| ClientRequest::Deploy {
        restart_all: false,
        expect_id: Some("shared".to_owned()),
        expect_stage: Some(stage),
        progress: false,
    };
    let my_stage = stage(&mine);
    // Another client stages its own file with the same id meanwhile.
    let their_stage = stage(&theirs);
    assert_ne!(my_stage, their_stage);
    let reply = format!("{:?}", call(deploy(my_stage)));
    assert!(
        reply.contains("is not the one this client staged")
            && reply.contains("nothing was deployed"),
        "{reply}"
    );
    let out = c.drover(addr, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(out.code, Some(1), "nothing deployed: {}", out.stdout);
    // Theirs, as they staged it, deploys.
    let reply = format!("{:?}", call(deploy(their_stage)));
    assert!(!reply.contains("error: Some"), "{reply}");
    eventually("2 running", PATIENCE, || running(&c, addr, 2));
}

/// An agent that comes back with the desired generation applied is answered at once by
/// the controller's catch-up: no wait for its nodes, and no warning about a node that
/// failed long before (the catch-up is not a deploy; `status` tells of that node).
#[test]
fn the_catch_up_of_an_agent_that_has_the_generation_waits_for_no_node() {
    let c = Cluster::new();
    let (ctl, addr) = c.start_controller("127.0.0.1:0");
    let mut agent = c.start_agent("agent-1", addr);
    c.wait_for_agent(addr, "agent-1");
    let prog = bin("drover-testprog").display().to_string();
    let file = c.dir.path().join("failing.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[nodes.broken]\ninstance = \"agent-1\"\nrestart = \"never\"\n\
             command = [\"{prog}\", \"--exit-after\", \"100ms\", \"--exit-code\", \"3\"]\n\
             readiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
        ),
    )
    .unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    eventually("broken failed", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        (v["results"]["agent-1"]["broken"]["state"] == "FAILED").then_some(())
    });
    agent.kill();
    let _agent = c.start_agent("agent-1", addr);
    ctl.wait_log("agent 'agent-1' brought to the desired generation");
    // A round trip, for what the catch-up would log right after.
    assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));
    assert!(
        !ctl.log_text()
            .contains("re-applying the desired configuration"),
        "{}",
        ctl.log_text()
    );
}

/// The `deploy` records of the audit trail.
fn deploy_records(c: &Cluster, addr: SocketAddr) -> Vec<serde_json::Value> {
    c.drover(addr, &["audit"])
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["what"] == "deploy")
        .collect()
}

/// A deploy whose controller was SIGKILLed before it answered (recorded, told to the
/// agent, the node still in its start period) becomes the deployed one under the next
/// controller process, and the audit trail says so: one record, under its requester,
/// with its generation. Before, the trail had no record of it at all.
#[test]
fn a_deploy_whose_controller_died_before_answering_is_in_the_audit_trail_once_deployed() {
    let c = Cluster::new();
    let (mut ctl, addr, _agent) = start(&c, &[]);
    let file = cluster_file(
        &c,
        "slow.toml",
        "slow",
        1,
        "readiness = { kind = \"start-period\", period = \"4s\" }\n",
    );
    let deploy = drover_tests::Background::start(
        &c,
        &addr.to_string(),
        &["deploy-config", file.to_str().unwrap()],
        "deploy",
    );
    eventually("n1 started, not yet ready", PATIENCE, || {
        let v = c.drover(addr, &["get-nodes"]).json();
        (v["results"]["agent-1"]["n1"]["state"] == "PENDING").then_some(())
    });
    ctl.kill();
    drop(deploy);
    let (_ctl, addr) = c.start_controller(&addr.to_string());
    let records = eventually("the deploy's record", PATIENCE, || {
        let records = deploy_records(&c, addr);
        (!records.is_empty()).then_some(records)
    });
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["name"], "ops", "{r}");
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["generation"], 1, "{r}");
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.contains("after its request had ended")),
        "{r}"
    );
    eventually("n1 running", PATIENCE, || running(&c, addr, 1));
    // A later deploy is recorded once, by its own answer.
    c.drover(addr, &["deploy"]);
    assert_eq!(deploy_records(&c, addr).len(), 2);
}

/// A deploy that removes a node answers once that node's process is gone: a node that
/// ignores SIGTERM is killed at its stop_timeout, and only then does the deploy return.
/// Before, the deploy returned at once and the old process ran on for its stop_timeout.
#[test]
fn a_deploy_that_removes_a_node_returns_once_it_is_gone() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let prog = bin("drover-testprog").display().to_string();
    let keep = format!(
        "[instances.agent-1]\n[nodes.keep]\ninstance = \"agent-1\"\n\
         command = [\"{prog}\", \"--sleep-forever\"]\n"
    );
    c.deploy_text(
        addr,
        "both.toml",
        &format!(
            "{keep}[nodes.stubborn]\ninstance = \"agent-1\"\n\
             command = [\"{prog}\", \"--ignore-sigterm\"]\nstop_timeout = \"3s\"\n"
        ),
    );
    let pids = eventually("both running", PATIENCE, || running(&c, addr, 2));
    let file = c.dir.path().join("keep.toml");
    std::fs::write(&file, keep).unwrap();
    let began = std::time::Instant::now();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    let took = began.elapsed();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        !drover_tests::alive(pids["stubborn"]),
        "the removed node's process is gone when the deploy returns ({took:?})"
    );
    assert!(drover_tests::alive(pids["keep"]));
    assert!(
        took >= std::time::Duration::from_secs(2),
        "it waited for the stop_timeout: {took:?}"
    );
}

/// A controller that ended between recording a deploy as deployed and appending its
/// request's audit record (here: the record taken out of the trail by hand) writes the
/// record when it starts again, under the requester; one whose trail has it writes none.
#[test]
fn a_deployed_deploy_missing_from_the_audit_trail_is_recorded_at_start() {
    let c = Cluster::new();
    let (mut ctl, addr, _agent) = start(&c, &[]);
    let file = cluster_file(&c, "one.toml", "one", 1, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(deploy_records(&c, addr).len(), 1);
    ctl.kill();
    // A restart with the record in place adds none.
    let (mut ctl, addr) = c.start_controller(&addr.to_string());
    c.wait_for_agent(addr, "agent-1");
    assert_eq!(deploy_records(&c, addr).len(), 1);
    ctl.kill();
    let trail = c.dir.path().join("controller/audit.jsonl");
    let text = std::fs::read_to_string(&trail).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.contains("\"what\":\"deploy\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&trail, kept).unwrap();
    let (_ctl, addr) = c.start_controller(&addr.to_string());
    let records = eventually("the deploy recorded again", PATIENCE, || {
        let r = deploy_records(&c, addr);
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["name"], "ops");
    assert_eq!(records[0]["generation"], 1);
    assert!(
        records[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("was not written")),
        "{}",
        records[0]
    );
}

/// A trail moved away since the deploy (logrotate, a cleanup script) lacks its record
/// because it was moved, not because the controller ended first: a restart then writes
/// no record claiming so.
#[test]
fn a_trail_moved_away_since_the_deploy_gets_no_claim_of_an_unwritten_record() {
    let c = Cluster::new();
    let (mut ctl, addr, _agent) = start(&c, &[]);
    let file = cluster_file(&c, "one.toml", "one", 1, "");
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    ctl.kill();
    let trail = c.dir.path().join("controller/audit.jsonl");
    std::fs::rename(&trail, c.dir.path().join("controller/audit.jsonl-moved")).unwrap();
    let (ctl, addr) = c.start_controller(&addr.to_string());
    ctl.wait_log("its record is not looked for");
    c.wait_for_agent(addr, "agent-1");
    assert_eq!(deploy_records(&c, addr), Vec::<serde_json::Value>::new());
}

/// The settings an agent's host cannot enforce, as its own `get-nodes --full` entry
/// lists them.
fn unenforceable(c: &Cluster, addr: SocketAddr) -> Option<serde_json::Value> {
    let v = c.drover(addr, &["get-nodes", "--full"]).json();
    v["results"]["agent-1"]
        .as_object()?
        .values()
        .find(|n| n["mgmt_role"] == "AGENT")
        .map(|n| n["unenforceable"].clone())
}

/// What an agent says its host cannot enforce is known from its start, before any
/// deploy made its cgroup directories (on a v1 hierarchy with no cgroup below its root,
/// it was learnt only from the first deploy that asked for it, which the agent then
/// refused after the controller had recorded it).
#[test]
fn what_the_host_cannot_enforce_is_known_before_the_first_deploy() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let before = eventually("the agent's own entry", PATIENCE, || {
        unenforceable(&c, addr)
    });
    let limited = cluster_file(
        &c,
        "limited.toml",
        "limited",
        1,
        "memory = { max = \"64M\", high = \"48M\" }\ncpus = 0.5\ncpu_weight = 50\n\
         pids_max = 64\nio_weight = 200\n",
    );
    let out = c.drover(addr, &["deploy-config", limited.to_str().unwrap()]);
    let after = eventually("the agent's own entry", PATIENCE, || {
        unenforceable(&c, addr)
    });
    assert_eq!(before, after, "learnt from the deploy: {out:?}");
    if before.as_object().is_some_and(|m| !m.is_empty()) {
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(
            out.json()["errors"]
                .to_string()
                .contains("nothing was deployed"),
            "refused by the controller: {out:?}"
        );
    } else {
        assert_eq!(out.code, Some(0), "{out:?}");
    }
}

/// A resource setting the agent's host cannot enforce (as the agent says in its own
/// status) is refused by the controller before the generation is recorded: the agent
/// does not lag behind a deploy it can never carry out.
#[test]
fn a_limit_the_host_cannot_enforce_is_refused_before_anything_changes() {
    let c = Cluster::new();
    let (_ctl, addr, _agent) = start(&c, &[]);
    let first = cluster_file(&c, "first.toml", "first", 1, "");
    let out = c.drover(addr, &["deploy-config", first.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let v = c.drover(addr, &["get-nodes", "--full"]).json();
    let Some((setting, why)) = v["results"]["agent-1"]
        .as_object()
        .into_iter()
        .flat_map(|nodes| nodes.values())
        .filter_map(|n| n["unenforceable"].as_object())
        .flat_map(|m| m.iter())
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .next()
    else {
        eprintln!("skipped: this host enforces every resource setting");
        return;
    };
    let line = match setting.as_str() {
        "memory.max" => "memory = { max = \"64M\" }",
        "memory.high" => "memory = { high = \"64M\" }",
        "cpus" => "cpus = 0.5",
        "cpu_weight" => "cpu_weight = 50",
        "pids_max" => "pids_max = 64",
        "io_weight" => "io_weight = 200",
        other => panic!("a setting this test does not know: {other}"),
    };
    let file = cluster_file(&c, "limited.toml", "limited", 1, &format!("{line}\n"));
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let errors = out.json()["errors"].to_string();
    assert!(
        errors.contains(&format!(
            "node 'n1': {setting} cannot be enforced on this host"
        )) && errors.contains("nothing was deployed"),
        "{errors} ({why})"
    );
    assert_eq!(
        status_generation(&c, addr, "controller").as_deref(),
        Some("1"),
        "no generation was recorded"
    );
    assert_eq!(status_generation(&c, addr, "agent-1").as_deref(), Some("1"));
}
