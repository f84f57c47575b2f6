//! High availability on etcd with real etcd processes and real controllers: failover
//! after a leader is killed, fencing of a paused or deposed leader, etcd going away, and
//! a configuration larger than etcd's request limit (and parts of unfinished writes).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_proto::msg::{ClientRequest, ClientResponse, PeerRole};
use drover_tests::etcd::{self, Etcd};
use drover_tests::{Cluster, PATIENCE, Proc, eventually};
use nix::sys::signal::Signal;

const PREFIX: &str = "/drover-test/";
/// Short, for quick failovers (the default, said explicitly).
const LEASE: &str = "2s";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The address the leader key names, and the term (its create revision), if any.
fn leader_term(rt: &tokio::runtime::Runtime, etcd: &Etcd) -> Option<(SocketAddr, i64)> {
    let kv = rt
        .block_on(etcd.client().get(format!("{PREFIX}leader").as_bytes()))
        .ok()??;
    Some((
        String::from_utf8(kv.value).ok()?.parse().ok()?,
        kv.create_revision,
    ))
}

/// The mod revision of every state key.
fn state_revisions(rt: &tokio::runtime::Runtime, etcd: &Etcd) -> BTreeMap<String, i64> {
    let kvs = rt
        .block_on(
            etcd.client()
                .get_prefix(format!("{PREFIX}state/").as_bytes()),
        )
        .unwrap();
    kvs.into_iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
            )
        })
        .collect()
}

fn config_file(c: &Cluster, name: &str, nodes: &[(&str, &str)]) -> PathBuf {
    config_in(c.dir.path(), name, nodes)
}

/// [`config_file`] in `dir`.
fn config_in(dir: &std::path::Path, name: &str, nodes: &[(&str, &str)]) -> PathBuf {
    let mut text =
        String::from("[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n");
    let instances: std::collections::BTreeSet<&str> = nodes.iter().map(|(_, i)| *i).collect();
    for i in instances {
        text.push_str(&format!("[instances.{i}]\n"));
    }
    for (node, instance) in nodes {
        text.push_str(&format!(
            "[nodes.{node}]\ninstance = \"{instance}\"\ncommand = [\"/usr/bin/sleep\", \"infinity\"]\n"
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Running nodes and their pids, from get-nodes through any controller of the group.
fn node_pids(c: &Cluster, controllers: &str) -> Option<BTreeMap<String, u64>> {
    let out = etcd::drover(c, controllers, &["get-nodes"]);
    if out.code != Some(0) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    let mut pids = BTreeMap::new();
    for (_, nodes) in v["results"].as_object()? {
        for (name, n) in nodes.as_object()? {
            if n["mgmt_role"].is_null() && n["state"] == "RUNNING" {
                pids.insert(name.clone(), n["pid"].as_u64()?);
            }
        }
    }
    Some(pids)
}

/// Agent `a1` dialling the controllers of `list`, with node `w1` deployed and running;
/// the node's pid by name.
fn agent_running_one_node(c: &Cluster, list: &str) -> (Proc, BTreeMap<String, u64>) {
    c.issue(PeerRole::Agent, "a1");
    let agent = c.start_agent_args("a1", "a1", &["--controller", list]);
    let v1 = config_file(c, "v1", &[("w1", "a1")]);
    eventually("the agent connected and took the deploy", PATIENCE, || {
        (etcd::drover(c, list, &["deploy-config", v1.to_str().unwrap()]).code == Some(0))
            .then_some(())
    });
    let pids = eventually("the node runs", PATIENCE, || {
        node_pids(c, list).filter(|p| p.len() == 1)
    });
    (agent, pids)
}

/// `controller-0`, which knows only etcd member 0, leading: losing that member cuts it
/// off while etcd keeps its quorum.
fn leader_on_member_0_only(c: &Cluster, etcd: &Etcd) -> (Proc, SocketAddr) {
    let only_first = etcd.members[0].client_url.clone();
    let (p0, a0) = etcd::start_controller(
        c,
        "controller-0",
        etcd,
        PREFIX,
        &["--etcd-endpoints", &only_first],
    );
    p0.wait_log("leading: serving");
    (p0, a0)
}

struct Group {
    procs: Vec<Proc>,
    addrs: Vec<SocketAddr>,
}

impl Group {
    fn start(c: &Cluster, etcd: &Etcd, n: usize) -> Self {
        Self::start_with(c, etcd, n, Some(LEASE))
    }

    /// `n` controllers with `lease` (the default when `None`).
    fn start_with(c: &Cluster, etcd: &Etcd, n: usize, lease: Option<&str>) -> Self {
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        let args: Vec<&str> = lease.map_or(vec![], |l| vec!["--leader-lease", l]);
        for i in 0..n {
            let (p, a) = etcd::start_controller(c, &format!("controller-{i}"), etcd, PREFIX, &args);
            procs.push(p);
            addrs.push(a);
        }
        Self { procs, addrs }
    }

    fn list(&self) -> String {
        etcd::addrs(&self.addrs)
    }

    /// Waits until the leader key names one of the group (other than `not`) and that
    /// controller serves the term, and returns its index.
    fn leader(&self, rt: &tokio::runtime::Runtime, etcd: &Etcd, not: Option<usize>) -> usize {
        eventually("a controller of the group leads", PATIENCE, || {
            let (addr, term) = leader_term(rt, etcd)?;
            let i = self.addrs.iter().position(|a| *a == addr)?;
            let serving = format!("leading: serving clients and agents revision={term} ");
            (Some(i) != not && self.procs[i].log_text().contains(&serving)).then_some(i)
        })
    }
}

#[test]
fn a_killed_leader_is_replaced_agents_follow_and_no_node_restarts() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let mut group = Group::start(&c, &etcd, 3);
    let first = group.leader(&rt, &etcd, None);
    let list = group.list();
    for a in ["a1", "a2"] {
        c.issue(PeerRole::Agent, a);
    }
    let _agents: Vec<Proc> = ["a1", "a2"]
        .iter()
        .map(|a| c.start_agent_args(a, a, &["--controller", &list]))
        .collect();
    let v1 = config_file(&c, "v1", &[("w1", "a1"), ("w2", "a2")]);
    eventually(
        "both agents connected and took the deploy",
        PATIENCE,
        || {
            (etcd::drover(&c, &list, &["deploy-config", v1.to_str().unwrap()]).code == Some(0))
                .then_some(())
        },
    );
    let before = eventually("both nodes run", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 2)
    });

    let killed = Instant::now();
    group.procs[first].kill();
    // A command issued as the leader dies is not failed by the dead one's timeout
    // ending before the election: it goes on asking the followers, and reaches the
    // successor.
    let out = etcd::drover(&c, &list, &["get-instances"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let second = group.leader(&rt, &etcd, Some(first));
    let answered = eventually("the new leader answers", PATIENCE, || {
        (etcd::drover(&c, &list, &["get-instances"]).code == Some(0)).then(Instant::now)
    });
    let after = eventually("both agents are back, same nodes", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 2)
    });
    let complete = Instant::now();
    eprintln!(
        "failover: new leader answering after {:?}, get-nodes complete after {:?}",
        answered - killed,
        complete - killed
    );
    assert_eq!(before, after, "a node was restarted by the failover");
    assert!(
        group.procs[second]
            .log_text()
            .contains("state loaded from etcd generation=1"),
        "the new leader did not load the deploy:\n{}",
        group.procs[second].log_text()
    );

    // A deploy through every address works with the new leader, and leaves the nodes
    // it does not change alone.
    let v2 = config_file(&c, "v2", &[("w1", "a1"), ("w2", "a2"), ("w3", "a1")]);
    let out = etcd::drover(&c, &list, &["deploy-config", v2.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let now = eventually("three nodes run", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 3)
    });
    assert_eq!(now["w1"], before["w1"]);
    assert_eq!(now["w2"], before["w2"]);

    // One audit trail, in etcd: the deploy through the first leader and the one through
    // the second, whichever answers.
    let out = etcd::drover(&c, &list, &["audit"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let deploys: Vec<u64> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["what"] == "deploy" && r["outcome"] == "ok")
        .filter_map(|r| r["generation"].as_u64())
        .collect();
    assert_eq!(deploys, [1, 2], "{}", out.stdout);
}

#[test]
fn a_leader_paused_past_its_lease_never_writes_again() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let group = Group::start(&c, &etcd, 2);
    let old = group.leader(&rt, &etcd, None);
    let list = group.list();
    let v1 = config_file(&c, "v1", &[]);
    let out = etcd::drover(
        &c,
        &list,
        &["stage-config", "--allow-empty", v1.to_str().unwrap()],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    // A client of the old leader, connected while it leads.
    let (endpoint, conn) = rt.block_on(c.client_connection(group.addrs[old]));

    group.procs[old].signal(Signal::SIGSTOP);
    let new = group.leader(&rt, &etcd, Some(old));
    let v2 = config_file(&c, "v2", &[("only-in-v2", "a1")]);
    let out = etcd::drover(&c, &list, &["stage-config", v2.to_str().unwrap()]);
    assert_eq!(
        out.code,
        Some(0),
        "the new leader {new} takes writes: {}",
        out.stderr
    );
    let written = state_revisions(&rt, &etcd);

    // The paused leader wakes with a deploy waiting on its old connection.
    let request = rt.spawn(async move {
        let deploy = ClientRequest::Deploy {
            restart_all: false,
            expect_id: None,
            expect_stage: None,
            progress: false,
        };
        drover_net::conn::call::<_, ClientResponse>(&conn, &deploy, Duration::from_secs(15)).await
    });
    std::thread::sleep(Duration::from_millis(200));
    group.procs[old].signal(Signal::SIGCONT);
    match rt.block_on(request).unwrap() {
        Err(_) => {}
        Ok(ClientResponse::Results(rs)) => {
            assert!(
                rs.iter().all(|r| !r.success),
                "the deposed leader deployed: {rs:?}"
            );
        }
        Ok(other) => panic!("unexpected answer {other:?}"),
    }
    group.procs[old].wait_log("stepped down");
    assert_eq!(
        state_revisions(&rt, &etcd),
        written,
        "the deposed leader wrote to etcd"
    );
    // It follows now, and points clients at the leader.
    let only_old = group.addrs[old].to_string();
    let out = eventually("the old leader points at the new one", PATIENCE, || {
        let out = etcd::drover(&c, &only_old, &["get-config", "--as-toml"]);
        (out.code == Some(0)).then_some(out)
    });
    assert!(out.stdout.contains("only-in-v2"), "{}", out.stdout);
    rt.block_on(endpoint.wait_idle());
}

#[test]
fn a_leader_whose_key_is_taken_cannot_write_and_steps_down() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let group = Group::start(&c, &etcd, 1);
    group.leader(&rt, &etcd, None);
    let list = group.list();
    let v1 = config_file(&c, "v1", &[]);
    assert_eq!(
        etcd::drover(
            &c,
            &list,
            &["stage-config", "--allow-empty", v1.to_str().unwrap()]
        )
        .code,
        Some(0)
    );
    let written = state_revisions(&rt, &etcd);
    // Another leader's key, as if this one's lease had ended unseen.
    let key = format!("{PREFIX}leader").into_bytes();
    for op in [
        drover_controller::etcd::Op::Delete {
            key: key.clone(),
            prefix: false,
        },
        drover_controller::etcd::Op::Put {
            key,
            value: b"127.0.0.1:9".to_vec(),
            lease: 0,
        },
    ] {
        rt.block_on(etcd.client().txn(&[], &[op], &[])).unwrap();
    }
    let v2 = config_file(&c, "v2", &[]);
    let out = etcd::drover(
        &c,
        &list,
        &["stage-config", "--allow-empty", v2.to_str().unwrap()],
    );
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("not the leader; the leader is 127.0.0.1:9")
            || text.contains("etcd refused the write"),
        "{text}"
    );
    assert_eq!(state_revisions(&rt, &etcd), written);
    group.procs[0].wait_log("stepped down");
    let out = etcd::drover(&c, &list, &["get-instances"]);
    assert!(
        out.stderr
            .contains("not the leader; the leader is 127.0.0.1:9"),
        "{}",
        out.stderr
    );
}

/// The running nodes' pids from get-nodes, and what the CLI said on stderr.
fn node_pids_and_stderr(c: &Cluster, controllers: &str) -> (BTreeMap<String, u64>, String) {
    let out = etcd::drover(c, controllers, &["get-nodes"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mut pids = BTreeMap::new();
    for (_, nodes) in v["results"].as_object().unwrap() {
        for (name, n) in nodes.as_object().unwrap() {
            if n["mgmt_role"].is_null() && n["state"] == "RUNNING" {
                pids.insert(name.clone(), n["pid"].as_u64().unwrap());
            }
        }
    }
    (pids, format!("{}\n{}", out.stderr, out.stdout))
}

#[test]
fn without_etcd_the_leader_answers_reads_marked_stale_refuses_changes_and_restarts_no_node() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let mut etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let metrics = drover_tests::free_tcp();
    let (p, a) = etcd::start_controller(
        &c,
        "controller-0",
        &etcd,
        PREFIX,
        &[
            "--leader-lease",
            LEASE,
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );
    let group = Group {
        procs: vec![p],
        addrs: vec![a],
    };
    group.leader(&rt, &etcd, None);
    let list = group.list();
    let (_agent, before) = agent_running_one_node(&c, &list);
    let gauges = || {
        let page = drover_tests::scrape(metrics);
        (
            drover_tests::metric_value(&page, "drover_controller_leader"),
            drover_tests::metric_value(&page, "drover_controller_leader_stale"),
        )
    };
    assert_eq!(gauges(), (Some(1.0), Some(0.0)), "leading on a fresh lease");

    etcd.kill(0);
    group.procs[0].wait_log("refusing changes and commands to agents");
    eventually("the stale gauge up while etcd is away", PATIENCE, || {
        (gauges().1 == Some(1.0)).then_some(())
    });
    let v2 = config_file(&c, "v2", &[("w1", "a1"), ("w2", "a1")]);
    let out = etcd::drover(&c, &list, &["deploy-config", v2.to_str().unwrap()]);
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(
        out.stderr
            .contains(&format!("no answer from etcd ({})", etcd.endpoints()))
            && out.stderr.contains("refuses changes"),
        "the refusal does not name etcd: {}",
        out.stderr
    );
    let out = etcd::drover(&c, &list, &["restart", "w1"]);
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(out.stderr.contains("etcd"), "{}", out.stderr);

    // Reads answer, with a warning: while the agent is connected, and once the lease
    // may have expired and the controller let it go.
    let (pids, stderr) = node_pids_and_stderr(&c, &list);
    assert_eq!(pids, before, "{stderr}");
    assert!(
        stderr.contains("warning: ") && stderr.contains("may be stale"),
        "{stderr}"
    );
    group.procs[0].wait_log("closed the agents' connections");
    let (pids, stderr) = node_pids_and_stderr(&c, &list);
    assert_eq!(pids, before, "{stderr}");
    assert!(stderr.contains("may be stale"), "{stderr}");
    let out = etcd::drover(&c, &list, &["get-config", "--as-toml"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("[nodes.w1]") && out.stderr.contains("may be stale"));

    // etcd back: the controller leads afresh, takes changes, and restarted nothing.
    etcd.restart(0);
    eventually("a deploy goes through once etcd is back", PATIENCE, || {
        (etcd::drover(&c, &list, &["deploy-config", v2.to_str().unwrap()]).code == Some(0))
            .then_some(())
    });
    let after = eventually("both nodes run", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 2)
    });
    assert_eq!(after["w1"], before["w1"], "the node was restarted");
    let out = etcd::drover(&c, &list, &["get-nodes"]);
    assert!(!out.stderr.contains("may be stale"), "{}", out.stderr);
    assert_eq!(gauges(), (Some(1.0), Some(0.0)), "leading afresh");
}

#[test]
fn a_leader_cut_off_from_etcd_alone_hands_clients_and_agents_to_the_next() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let mut etcd = Etcd::start(&c, 3);
    let rt = runtime();
    // controller-0 knows only member 0; controller-1 knows them all.
    let (p0, a0) = leader_on_member_0_only(&c, &etcd);
    let (p1, a1) = etcd::start_controller(&c, "controller-1", &etcd, PREFIX, &[]);
    let group = Group {
        procs: vec![p0, p1],
        addrs: vec![a0, a1],
    };
    assert_eq!(group.leader(&rt, &etcd, None), 0);
    let list = group.list();
    let (_agent, before) = agent_running_one_node(&c, &list);
    let monitor = drover_tests::Background::start(&c, &list, &["monitor"], "monitor");
    eventually("the monitor subscribed to controller-0", PATIENCE, || {
        group.procs[0]
            .log_text()
            .contains("client connected client=ops")
            .then_some(())
    });

    // Member 0 goes: controller-0 is cut off from etcd, which keeps its quorum and lets
    // controller-1 lead once controller-0's lease expired.
    etcd.kill(0);
    assert_eq!(group.leader(&rt, &etcd, Some(0)), 1);
    // The cut-off leader lets its clients go with its agents: the monitor follows the
    // new leader instead of waiting on the old one for agents that left it.
    let moved = format!("following again through controller {a1}");
    eventually("the monitor moved to the new leader", PATIENCE, || {
        monitor.stderr().contains(&moved).then_some(())
    });
    assert!(
        monitor
            .stderr()
            .contains("went away (controller cut off from etcd: it may not lead any more)"),
        "{}",
        monitor.stderr()
    );
    // Clients given both addresses get the new leader, unwarned; the agent, let go by
    // the cut-off leader, moves over, and the node it runs is not restarted.
    let v2 = config_file(&c, "v2", &[("w1", "a1"), ("w2", "a1")]);
    let out = eventually("a deploy goes through the new leader", PATIENCE, || {
        let out = etcd::drover(&c, &list, &["deploy-config", v2.to_str().unwrap()]);
        (out.code == Some(0)).then_some(out)
    });
    assert!(!out.stderr.contains("may be stale"), "{}", out.stderr);
    let after = eventually("both nodes run", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 2)
    });
    assert_eq!(after["w1"], before["w1"], "the node was restarted");
    assert!(
        group.procs[0]
            .log_text()
            .contains("closed the agents' connections")
    );
    // Both welcome a client; it takes the one without a warning, every time.
    for _ in 0..5 {
        let out = etcd::drover(&c, &list, &["get-instances"]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(!out.stderr.contains("may be stale"), "{}", out.stderr);
    }
    // Asked alone, the cut-off controller still answers what it knew, marked stale.
    let (pids, stderr) = node_pids_and_stderr(&c, &a0.to_string());
    assert_eq!(pids, before, "{stderr}");
    assert!(stderr.contains("may be stale"), "{stderr}");
}

#[test]
fn a_configuration_of_20000_nodes_survives_a_failover() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let mut group = Group::start(&c, &etcd, 2);
    let first = group.leader(&rt, &etcd, None);
    let list = group.list();
    // Random environment values, so that compression leaves more than one part.
    let mut text = String::from("[instances.a1]\n[instances.a2]\n");
    for i in 0..20_000 {
        let noise: String = (0..8)
            .map(|_| format!("{:016x}", rand::random::<u64>()))
            .collect();
        text.push_str(&format!(
            "[nodes.n{i}]\ninstance = \"a{}\"\ncommand = [\"/usr/bin/sleep\", \"infinity\"]\nenv = {{ NOISE = \"{noise}\" }}\n",
            1 + i % 2
        ));
    }
    let big = c.dir.path().join("big.toml");
    std::fs::write(&big, text).unwrap();
    let out = etcd::drover(&c, &list, &["stage-config", big.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let parts = rt
        .block_on(
            etcd.client()
                .get_prefix(format!("{PREFIX}state/staged/parts/").as_bytes()),
        )
        .unwrap();
    assert!(
        parts.len() >= 2,
        "the value was not split: {} parts",
        parts.len()
    );
    // Staged again: the new parts replace the old ones, which are deleted.
    let out = etcd::drover(&c, &list, &["stage-config", big.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let again = rt
        .block_on(
            etcd.client()
                .get_prefix(format!("{PREFIX}state/staged/parts/").as_bytes()),
        )
        .unwrap();
    assert_eq!(again.len(), parts.len(), "old parts were left behind");
    assert!(again.iter().all(|p| !parts.iter().any(|q| q.key == p.key)));

    // Parts of writes a leader did not finish (it died between the parts and the value
    // naming them): the next leader deletes them, and only them.
    let orphans = [
        format!("{PREFIX}state/staged/parts/0123abcd/000000"),
        format!("{PREFIX}state/staged/parts/0123abcd/000001"),
        format!("{PREFIX}state/desired/parts/4567cdef/000000"),
    ];
    let puts: Vec<_> = orphans
        .iter()
        .map(|k| drover_controller::etcd::Op::Put {
            key: k.clone().into_bytes(),
            value: b"half a write".to_vec(),
            lease: 0,
        })
        .collect();
    rt.block_on(etcd.client().txn(&[], &puts, &[])).unwrap();

    group.procs[first].kill();
    let second = group.leader(&rt, &etcd, Some(first));
    let out = eventually("the new leader answers", PATIENCE, || {
        let out = etcd::drover(&c, &list, &["get-config", "--as-toml"]);
        (out.code == Some(0)).then_some(out)
    });
    let left: Vec<Vec<u8>> = rt
        .block_on(
            etcd.client()
                .get_prefix_keys(format!("{PREFIX}state/").as_bytes()),
        )
        .unwrap();
    for orphan in &orphans {
        assert!(
            !left.contains(&orphan.clone().into_bytes()),
            "{orphan} was not swept"
        );
    }
    assert!(
        again.iter().all(|p| left.contains(&p.key)),
        "a live part was swept"
    );
    assert!(
        group.procs[second]
            .log_text()
            .contains("deleted the parts of 2 unfinished or replaced values"),
        "{}",
        group.procs[second].log_text()
    );
    let nodes = out.stdout.matches("[nodes.").count();
    assert_eq!(
        nodes,
        20_000,
        "{}",
        &out.stdout[..out.stdout.len().min(400)]
    );
}

#[test]
fn a_range_delete_in_etcd_stops_before_its_end() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let client = etcd.client();
    use drover_controller::etcd::Op;
    let puts: Vec<Op> = ["1", "2", "3", "4"]
        .iter()
        .map(|k| Op::Put {
            key: format!("{PREFIX}audit/{k}").into_bytes(),
            value: b"{}".to_vec(),
            lease: 0,
        })
        .collect();
    rt.block_on(client.txn(&[], &puts, &[])).unwrap();
    let del = Op::DeleteRange {
        key: format!("{PREFIX}audit/").into_bytes(),
        end: format!("{PREFIX}audit/3").into_bytes(),
    };
    rt.block_on(client.txn(&[], &[del], &[])).unwrap();
    let left = rt
        .block_on(client.get_prefix_keys(format!("{PREFIX}audit/").as_bytes()))
        .unwrap();
    let want: Vec<Vec<u8>> = ["3", "4"]
        .iter()
        .map(|k| format!("{PREFIX}audit/{k}").into_bytes())
        .collect();
    assert_eq!(left, want);
}

#[test]
fn a_bad_address_in_a_list_of_controllers_is_named() {
    let c = Cluster::new();
    let out = etcd::drover(&c, "127.0.0.1:2150,ctl:notaport", &["get-instances"]);
    assert_ne!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("'ctl:notaport'") && out.stderr.contains("not a port"),
        "{}",
        out.stderr
    );
    c.issue(PeerRole::Agent, "a1");
    let mut agent = c.start_agent_args("a1", "a1", &["--controller", "127.0.0.1:2150,:2150"]);
    assert!(!agent.wait_exit(PATIENCE).success());
    assert!(
        agent
            .log_text()
            .contains("invalid controller address ':2150'"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn etcd_over_tls_with_a_client_certificate() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start_tls(&c, 1);
    let rt = runtime();
    // A client certificate about to end, renewed while the controller runs: new
    // connections to etcd use the renewed one, with no restart.
    let ends = time::OffsetDateTime::now_utc() + time::Duration::seconds(20);
    c.issue_with(
        PeerRole::Client,
        "etcd-client",
        "etcd-client",
        drover_pki::Validity {
            not_before: time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
            not_after: ends,
        },
    );
    let group = Group::start(&c, &etcd, 1);
    group.leader(&rt, &etcd, None);
    let v1 = config_file(&c, "v1", &[("w1", "a1")]);
    let out = etcd::drover(&c, &group.list(), &["stage-config", v1.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(state_revisions(&rt, &etcd).len(), 1);
    group.procs[0].wait_log("the etcd client certificate");
    let renew = std::process::Command::new(drover_tests::bin("drover"))
        .args(["ca", "renew", "--dir"])
        .arg(&c.pki)
        .arg("--cert")
        .arg(c.pki_file("etcd-client.crt"))
        .output()
        .unwrap();
    assert!(
        renew.status.success(),
        "{}",
        String::from_utf8_lossy(&renew.stderr)
    );
    eventually(
        "the first certificate's end",
        Duration::from_secs(40),
        || (time::OffsetDateTime::now_utc() > ends + time::Duration::seconds(1)).then_some(()),
    );
    let v2 = config_file(&c, "v2", &[("w1", "a1"), ("w2", "a1")]);
    let out = etcd::drover(&c, &group.list(), &["stage-config", v2.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    group.procs[0].wait_log("the etcd tls files changed; new connections to etcd use them");

    // A key others may read is refused before anything is sent.
    let loose = c.pki_file("loose.key");
    std::fs::copy(c.pki_file("etcd-client.key"), &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut cmd = std::process::Command::new(drover_tests::bin("drover-controller"));
    c.controller_args(&mut cmd, "127.0.0.1:0");
    cmd.args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoints()])
        .arg("--etcd-ca")
        .arg(c.pki_file("ca.crt"))
        .arg("--etcd-cert")
        .arg(c.pki_file("etcd-client.crt"))
        .arg("--etcd-key")
        .arg(&loose);
    let mut p = Proc::spawn("loose-key", cmd, c.log_path("loose-key"));
    assert!(!p.wait_exit(PATIENCE).success());
    assert!(
        p.log_text().contains("etcd tls: private key") && p.log_text().contains("chmod 600"),
        "{}",
        p.log_text()
    );

    // A controller that does not trust etcd's certificate never leads, and says why.
    let wrong_ca = c.pki_file("ops.crt");
    let (p, _) = etcd::start_controller(
        &c,
        "distrustful",
        &etcd,
        PREFIX,
        &["--etcd-ca", wrong_ca.to_str().unwrap()],
    );
    let log = p.wait_log("cannot campaign for leadership");
    assert!(
        log.contains("etcd is unreachable") && log.contains("certificate"),
        "{log}"
    );
}

#[test]
fn a_lost_etcd_member_changes_nothing_and_a_lost_quorum_restarts_no_node() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let mut etcd = Etcd::start(&c, 3);
    let rt = runtime();
    // The default lease.
    let group = Group::start_with(&c, &etcd, 2, None);
    let first = group.leader(&rt, &etcd, None);
    let list = group.list();
    let (_agent, before) = agent_running_one_node(&c, &list);

    // One member of three, etcd's leader: the controllers use the others once they
    // elected a new one; the leader stays, and keeps its agent.
    let gone = eventually("etcd has a leader", PATIENCE, || etcd.raft_leader());
    etcd.kill(gone);
    let v2 = config_file(&c, "v2", &[("w1", "a1"), ("w2", "a1")]);
    eventually("a deploy goes through", PATIENCE, || {
        let out = etcd::drover(&c, &list, &["deploy-config", v2.to_str().unwrap()]);
        (out.code == Some(0)).then_some(())
    });
    assert_eq!(group.leader(&rt, &etcd, None), first);
    let log = group.procs[first].log_text();
    assert!(
        !log.contains("stepping down") && !log.contains("closed the agents' connections"),
        "{log}"
    );
    for line in log.lines().filter(|l| l.contains("etcd answers again")) {
        eprintln!("etcd leader killed: {line}");
    }
    let two = eventually("both nodes run", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 2)
    });
    assert_eq!(two["w1"], before["w1"]);

    // Two of three: no quorum. Writes fail naming etcd, reads say they may be stale.
    let other = (gone + 1) % 3;
    etcd.kill(other);
    group.procs[first].wait_log("refusing changes and commands to agents");
    let v3 = config_file(&c, "v3", &[("w1", "a1")]);
    let out = etcd::drover(&c, &list, &["stage-config", v3.to_str().unwrap()]);
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(out.stderr.contains("no answer from etcd"), "{}", out.stderr);
    let (pids, stderr) = node_pids_and_stderr(&c, &list);
    assert_eq!(pids, two, "{stderr}");
    assert!(stderr.contains("may be stale"), "{stderr}");

    // Quorum back: a leader again, the same nodes, nothing restarted.
    etcd.restart(gone);
    etcd.restart(other);
    eventually("a write goes through once quorum is back", PATIENCE, || {
        (etcd::drover(&c, &list, &["stage-config", v3.to_str().unwrap()]).code == Some(0))
            .then_some(())
    });
    let after = eventually("get-nodes answers again, complete", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 2)
    });
    assert_eq!(after, two, "a node was restarted");
}

/// A zeek-client request to the WebSocket front at `ws`; returns the answer's text.
fn zeek_get_instances(rt: &tokio::runtime::Runtime, ws: SocketAddr) -> String {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(ws).await.unwrap();
        let req = format!("ws://{ws}/v1/messages/json")
            .into_client_request()
            .unwrap();
        let mut c = tokio_tungstenite::client_async(req, stream).await.unwrap().0;
        c.send(Message::text(r#"["zeek/management/controller"]"#))
            .await
            .unwrap();
        let request = r#"{"type":"data-message","topic":"zeek/management/controller","@data-type":"vector","data":[{"@data-type":"count","data":1},{"@data-type":"count","data":1},{"@data-type":"vector","data":[{"@data-type":"string","data":"Management::Controller::API::get_instances_request"},{"@data-type":"vector","data":[{"@data-type":"string","data":"req-1"}]}]}]}"#;
        c.send(Message::text(request)).await.unwrap();
        let mut seen = String::new();
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), c.next()).await {
            if let Message::Text(t) = m {
                if t.contains("get_instances_response") {
                    return t.to_string();
                }
                seen.push_str(&t);
            }
        }
        panic!("no get_instances_response; got {seen}");
    })
}

#[test]
fn the_zeek_client_front_of_a_follower_names_the_leader() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    let mut fronts = Vec::new();
    for i in 0..2 {
        let (p, a) = etcd::start_controller(
            &c,
            &format!("controller-{i}"),
            &etcd,
            PREFIX,
            &[
                "--leader-lease",
                LEASE,
                "--zeek-websocket",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
        );
        fronts.push(drover_tests::addr_in_log(
            &p.wait_log("serving zeek-client"),
            "serving zeek-client",
        ));
        procs.push(p);
        addrs.push(a);
    }
    let group = Group { procs, addrs };
    let leader = group.leader(&rt, &etcd, None);
    let follower = 1 - leader;
    // Followers serve metrics too, and say they do not lead.
    let leading = |i: usize| {
        use std::io::{Read, Write};
        let log = group.procs[i].log_text();
        let addr = drover_tests::addr_in_log(&log, "serving metrics");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).unwrap();
        page.lines()
            .find_map(|l| l.strip_prefix("drover_controller_leader "))
            .map(str::to_owned)
    };
    assert_eq!(leading(leader).as_deref(), Some("1"));
    assert_eq!(leading(follower).as_deref(), Some("0"));
    let answer = zeek_get_instances(&rt, fronts[follower]);
    let want = format!("not the leader; the leader is {}", group.addrs[leader]);
    assert!(answer.contains(&want), "{answer}");
    let answer = zeek_get_instances(&rt, fronts[leader]);
    assert!(!answer.contains("not the leader"), "{answer}");
}

#[test]
fn only_the_leader_dials_agents_that_listen() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let mut group = Group::start(&c, &etcd, 2);
    let first = group.leader(&rt, &etcd, None);
    let list = group.list();
    let port = drover_tests::free_udp_port();
    let agent = c.start_listening_agent("a1", format!("127.0.0.1:{port}").parse().unwrap());
    agent.wait_log("listening for the controller");
    let file = c.dir.path().join("listen.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.a1]\nhost = \"127.0.0.1\"\nport = {port}\n[nodes.w1]\ninstance = \"a1\"\ncommand = [\"/usr/bin/sleep\", \"infinity\"]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n"
        ),
    )
    .unwrap();
    let out = etcd::drover(&c, &list, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let before = eventually("the node runs", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 1)
    });
    let second = 1 - first;
    assert!(!group.procs[second].log_text().contains("dialling agent"));

    // The new leader dials the agent, from the state it loaded; the node stays.
    group.procs[first].kill();
    assert_eq!(group.leader(&rt, &etcd, Some(first)), second);
    group.procs[second].wait_log("dialling agent 'a1'");
    let after = eventually("the node is listed again", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 1)
    });
    assert_eq!(before, after);

    // Deposed (its key taken), it stops dialling: the agent loses it for good.
    let lost = |a: &Proc| a.log_text().matches("lost the controller").count();
    let lost_before = lost(&agent);
    let key = format!("{PREFIX}leader").into_bytes();
    for op in [
        drover_controller::etcd::Op::Delete {
            key: key.clone(),
            prefix: false,
        },
        drover_controller::etcd::Op::Put {
            key,
            value: b"127.0.0.1:9".to_vec(),
            lease: 0,
        },
    ] {
        rt.block_on(etcd.client().txn(&[], &[op], &[])).unwrap();
    }
    group.procs[second].wait_log("stepping down");
    let n = eventually("the agent loses the deposed leader", PATIENCE, || {
        Some(lost(&agent)).filter(|n| *n > lost_before)
    });
    let connected = agent.log_text().matches("controller connected").count();
    // Nothing to wait for: no new connection may come within longer than the
    // dialler's backoff.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lost(&agent), n, "{}", agent.log_text());
    assert_eq!(
        agent.log_text().matches("controller connected").count(),
        connected,
        "{}",
        agent.log_text()
    );
}

#[test]
fn bad_high_availability_settings_are_named() {
    let c = Cluster::new();
    let cases: &[(&[&str], &str)] = &[
        (&["--store", "etcd"], "--store etcd needs --etcd-endpoints"),
        (
            &["--etcd-endpoints", "http://127.0.0.1:2379"],
            "add --store etcd",
        ),
        (
            &["--store", "etcd", "--etcd-endpoints", "127.0.0.1:2379"],
            "invalid etcd endpoint '127.0.0.1:2379': expected http://HOST:PORT",
        ),
        (
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "--leader-lease",
                "1500ms",
            ],
            "leader_lease: 1s 500ms is not a whole number of seconds of at least 2s",
        ),
        (
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                "https://127.0.0.1:2379",
            ],
            "an https:// endpoint needs --etcd-ca",
        ),
        (&["--store", "raft"], "invalid value 'raft'"),
        (
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "--advertise",
                "0.0.0.0:2150",
            ],
            "--advertise '0.0.0.0:2150' is a wildcard address, which agents and clients cannot dial",
        ),
        (
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
                "--advertise",
                "[::]:2150",
            ],
            "--advertise '[::]:2150' is a wildcard address",
        ),
    ];
    for (i, (args, want)) in cases.iter().enumerate() {
        let mut cmd = std::process::Command::new(drover_tests::bin("drover-controller"));
        c.controller_args(&mut cmd, "127.0.0.1:0");
        cmd.args(*args);
        let mut p = Proc::spawn(&format!("bad-{i}"), cmd, c.log_path(&format!("bad-{i}")));
        assert!(!p.wait_exit(PATIENCE).success(), "{args:?} started");
        assert!(p.log_text().contains(want), "{args:?}: {}", p.log_text());
    }
    let mut cmd = std::process::Command::new(drover_tests::bin("drover-controller"));
    c.controller_args(&mut cmd, "0.0.0.0:0");
    cmd.args([
        "--store",
        "etcd",
        "--etcd-endpoints",
        "http://127.0.0.1:2379",
    ]);
    let mut p = Proc::spawn("wildcard", cmd, c.log_path("wildcard"));
    assert!(!p.wait_exit(PATIENCE).success());
    assert!(
        p.log_text().contains("needs --advertise HOST:PORT"),
        "{}",
        p.log_text()
    );
}

#[test]
fn the_settings_file_takes_the_high_availability_keys() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let file = c.dir.path().join("controller.toml");
    std::fs::write(
        &file,
        format!(
            "store = \"etcd\"\netcd_endpoints = [\"{}\"]\netcd_prefix = \"/from-file\"\nleader_lease = \"2s\"\nadvertise = \"ctl.example.net:2150\"\n",
            etcd.members[0].client_url
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(drover_tests::bin("drover-controller"));
    c.controller_args(&mut cmd, "127.0.0.1:0");
    cmd.arg("--config").arg(&file);
    let p = Proc::spawn("from-file", cmd, c.log_path("from-file"));
    p.wait_log("leading: serving clients and agents");
    let kv = rt
        .block_on(etcd.client().get(b"/from-file/leader"))
        .unwrap()
        .expect("the leader key, under the prefix given (a slash added)");
    assert_eq!(kv.value, b"ctl.example.net:2150");
}

/// The desired and deployed generations in etcd, read in one transaction.
fn generations(
    rt: &tokio::runtime::Runtime,
    client: &drover_controller::etcd::Etcd,
) -> Option<(u64, u64)> {
    use drover_controller::etcd::Op;
    let get = |name: &str| Op::Get {
        key: format!("{PREFIX}state/{name}").into_bytes(),
    };
    let r = rt
        .block_on(client.txn(&[], &[get("desired"), get("deployed")], &[]))
        .ok()?;
    let generation = |i: usize| -> u64 {
        r.ranges[i].first().map_or(0, |kv| {
            let json = drover_controller::etcd_store::decode_inline(&kv.value)
                .expect("small values are stored whole");
            serde_json::from_slice::<serde_json::Value>(&json).unwrap()["generation"]
                .as_u64()
                .unwrap()
        })
    };
    Some((generation(0), generation(1)))
}

#[test]
fn concurrent_deploys_across_leader_kills_lose_no_acknowledged_deploy() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let mut group = Group::start(&c, &etcd, 3);
    let list = group.list();
    c.issue(PeerRole::Agent, "a1");
    let _agent = c.start_agent_args("a1", "a1", &["--controller", &list]);
    let v0 = config_file(&c, "v0", &[("w", "a1")]);
    eventually("the agent connected and took the deploy", PATIENCE, || {
        (etcd::drover(&c, &list, &["deploy-config", v0.to_str().unwrap()]).code == Some(0))
            .then_some(())
    });

    // Two clients deploy configurations marked by a node of their own until told to
    // stop, while the leader is killed twice; etcd's generations are watched throughout.
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    /// Stops the clients and the sampler however the scope ends (a failed wait too).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let stop = AtomicBool::new(false);
    let acked = AtomicUsize::new(0);
    let start = Instant::now();
    let client = etcd.client();
    let pki = c.pki.clone();
    let (records, samples) = std::thread::scope(|s| {
        // Each client goes on until told to stop (a deploy refused while the agent is
        // away takes milliseconds, so a fixed number of them could run out first).
        let clients: Vec<_> = (0..2)
            .map(|t| {
                let dir = c.dir.path();
                let (pki, list, acked, stop) = (&pki, &list, &acked, &stop);
                s.spawn(move || {
                    let mut records = Vec::new();
                    for i in 0.. {
                        if stop.load(SeqCst) {
                            break;
                        }
                        let marker = format!("m{t}x{i}");
                        let file = config_in(dir, &marker, &[(&marker, "a1")]);
                        let began = start.elapsed();
                        let out =
                            etcd::drover_in(pki, list, &["deploy-config", file.to_str().unwrap()]);
                        let ok = out.code == Some(0);
                        if ok {
                            acked.fetch_add(1, SeqCst);
                        }
                        records.push((marker, began, start.elapsed(), ok));
                    }
                    records
                })
            })
            .collect();
        let sampler = s.spawn(|| {
            let rt = runtime();
            let mut samples = Vec::new();
            while !stop.load(SeqCst) {
                if let Some(g) = generations(&rt, &client) {
                    samples.push(g);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        let guard = Stop(&stop);
        let mut killed = None;
        let mut acks_then = 0;
        for _ in 0..2 {
            acks_then = eventually(
                "a deploy acknowledged since the last kill",
                Duration::from_secs(60),
                || Some(acked.load(SeqCst)).filter(|n| *n > acks_then),
            );
            let leader = group.leader(&rt, &etcd, killed);
            group.procs[leader].kill();
            killed = Some(leader);
        }
        eventually(
            "a deploy acknowledged after the last kill",
            Duration::from_secs(60),
            || Some(acked.load(SeqCst)).filter(|n| *n > acks_then),
        );
        drop(guard);
        let records: Vec<_> = clients
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        (records, sampler.join().unwrap())
    });

    // Generations never go back, and the deployed one is never ahead of the desired.
    assert!(samples.len() > 10, "{samples:?}");
    for w in samples.windows(2) {
        assert!(w[1].0 >= w[0].0 && w[1].1 >= w[0].1, "went back: {w:?}");
    }
    assert!(samples.iter().all(|(d, p)| p <= d), "{samples:?}");

    // The deployed configuration is the last acknowledged deploy, or one that was
    // still going when that one was acknowledged.
    let last = records
        .iter()
        .filter(|r| r.3)
        .max_by_key(|r| r.2)
        .expect("some deploy was acknowledged");
    let out = eventually("the deployed configuration", PATIENCE, || {
        let out = etcd::drover(&c, &list, &["get-config", "--deployed", "--as-toml"]);
        (out.code == Some(0)).then_some(out)
    });
    let deployed = records
        .iter()
        .find(|r| out.stdout.contains(&format!("[nodes.{}]", r.0)))
        .unwrap_or_else(|| panic!("no client's configuration is deployed:\n{}", out.stdout));
    let acks = records.iter().filter(|r| r.3).count();
    eprintln!(
        "{} deploys, {acks} acknowledged, {} generation samples; deployed {}",
        records.len(),
        samples.len(),
        deployed.0
    );
    assert!(
        deployed.0 == last.0 || (!deployed.3 && deployed.2 > last.2),
        "deployed {deployed:?}, but {last:?} was acknowledged last; all: {records:?}"
    );

    // The audit trail says who deployed the deployed generation, also when its
    // request's leader was killed before answering and a successor completed it.
    let (_, generation) = generations(&rt, &client).expect("etcd answers");
    let audit = etcd::drover(&c, &list, &["audit"]);
    assert!(
        audit.stdout.lines().any(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            r["what"] == "deploy" && r["outcome"] == "ok" && r["generation"] == generation
        }),
        "no ok deploy record of generation {generation}:\n{}",
        audit.stdout
    );
}

#[test]
fn a_leader_cut_off_from_etcd_and_agents_is_replaced_without_restarting_nodes() {
    if !etcd::available() {
        return;
    }
    let mut lab = drover_tests::netlab::NetLab::new();
    let gw = lab.host_gateway().to_string();
    let hosts = [lab.add_host(), lab.add_host()];
    let ips: Vec<String> = hosts
        .iter()
        .map(|h| lab.host_addr(*h).to_string())
        .collect();
    let c = Cluster::with_controller_sans(&[&ips[0], &ips[1]]);
    let etcd = Etcd::start_on(&c, 1, &gw);
    let rt = runtime();
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let (p, a) = etcd::start_controller_cmd(
            &c,
            lab.command(*h, &drover_tests::bin("drover-controller")),
            &format!("controller-{i}"),
            &etcd,
            PREFIX,
            &format!("{}:0", ips[i]),
            &["--leader-lease", LEASE],
        );
        if i == 0 {
            // The first one leads, so that it is the one cut off.
            p.wait_log("leading: serving");
        }
        procs.push(p);
        addrs.push(a);
    }
    let group = Group { procs, addrs };
    assert_eq!(group.leader(&rt, &etcd, None), 0);
    let list = group.list();
    let (_agent, before) = agent_running_one_node(&c, &list);

    // Cut off from etcd and from the agent at once.
    lab.set_link(hosts[0], false);
    group.procs[0].wait_log("closed the agents' connections");
    assert_eq!(group.leader(&rt, &etcd, Some(0)), 1);
    let after = eventually("the agent is with the new leader", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 1)
    });
    assert_eq!(before, after, "the node was restarted");
    let v2 = config_file(&c, "v2", &[("w1", "a1"), ("w2", "a1")]);
    let out = etcd::drover(&c, &list, &["deploy-config", v2.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);

    // Back on the network, it follows and points at the new leader.
    lab.set_link(hosts[0], true);
    let only_old = group.addrs[0].to_string();
    // Until it reaches etcd again it answers from what it knew, marked stale.
    let out = eventually("the old leader points at the new one", PATIENCE, || {
        let out = etcd::drover(&c, &only_old, &["get-config", "--as-toml"]);
        (out.code == Some(0) && !out.stderr.contains("may be stale")).then_some(out)
    });
    assert!(out.stdout.contains("[nodes.w2]"), "{}", out.stdout);
    assert!(
        group.procs[0]
            .log_text()
            .contains(&format!("following leader={}", group.addrs[1])),
        "{}",
        group.procs[0].log_text()
    );
}

#[test]
fn hollow_agents_follow_a_follower_to_the_leader() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let group = Group::start(&c, &etcd, 2);
    let leader = group.leader(&rt, &etcd, None);
    let follower = 1 - leader;
    // The follower first: every hollow agent and client is sent on to the leader.
    let list = etcd::addrs(&[group.addrs[follower], group.addrs[leader]]);
    let mut cmd = std::process::Command::new(drover_tests::bin("drover-swarm"));
    cmd.args(["--controller", &list, "--agents", "20", "--samples", "3"])
        .args(["--monitors", "1", "--nodes-per-agent", "2"])
        .arg("--pki")
        .arg(&c.pki);
    let out = drover_tests::run_cli(cmd, Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let instances = etcd::drover(&c, &group.addrs[follower].to_string(), &["get-instances"]);
    assert_eq!(instances.code, Some(0), "{}", instances.stderr);
    assert!(
        group.procs[follower]
            .log_text()
            .contains("refused connection: not the leader"),
        "the follower was not asked first"
    );
}

#[test]
fn the_example_high_availability_config_runs_against_etcd_over_tls() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start_tls(&c, 1);
    let rt = runtime();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/config/controller-ha.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let pki = format!("{}/", c.pki.display());
    let mut live = String::new();
    for line in text.lines() {
        let line = match line.split_once(" = ") {
            Some(("etcd_endpoints", _)) => {
                format!("etcd_endpoints = [\"{}\"]", etcd.members[0].client_url)
            }
            Some(("listen", _)) => "listen = \"127.0.0.1:0\"".into(),
            Some(("etcd_prefix", _)) => format!("etcd_prefix = \"{PREFIX}\""),
            Some(("etcd_ca", _)) => format!("etcd_ca = \"{pki}ca.crt\""),
            _ => line.replace("/etc/drover/pki/", &pki),
        };
        live.push_str(&line);
        live.push('\n');
    }
    assert!(live.contains("store = \"etcd\""), "{live}");
    let file = c.dir.path().join("controller-ha.toml");
    std::fs::write(&file, live).unwrap();
    let mut cmd = std::process::Command::new(drover_tests::bin("drover-controller"));
    cmd.arg("--config").arg(&file);
    let p = Proc::spawn("example", cmd, c.log_path("example"));
    p.wait_log("leading: serving clients and agents");
    let kv = rt
        .block_on(etcd.client().get(format!("{PREFIX}leader").as_bytes()))
        .unwrap()
        .expect("the leader key");
    assert_eq!(kv.value, b"ctl-1.example.net:2150");
}

/// `logs -f` and `monitor`, given the group's addresses, move to the new leader when
/// theirs is SIGKILLed, then when the next one stops (SIGTERM, as in a rolling
/// upgrade): the follow takes up where it stood, each line once and none missing.
#[test]
fn follows_move_to_the_new_leader() {
    use drover_tests::Background;

    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let mut group = Group::start(&c, &etcd, 3);
    let mut leader = group.leader(&rt, &etcd, None);
    let list = group.list();
    c.issue(PeerRole::Agent, "a1");
    let _agent = c.start_agent_args("a1", "a1", &["--controller", &list]);
    let file = c.dir.path().join("talk.toml");
    std::fs::write(
        &file,
        "[instances.a1]\n[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n\
         [nodes.talk]\ninstance = \"a1\"\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while :; do i=$((i+1)); echo out-$i; sleep 0.05; done\"]\n",
    )
    .unwrap();
    eventually("the agent connected and took the deploy", PATIENCE, || {
        (etcd::drover(&c, &list, &["deploy-config", file.to_str().unwrap()]).code == Some(0))
            .then_some(())
    });
    let numbers = |text: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.strip_prefix("out-")?.parse().ok())
            .collect()
    };
    let logs = Background::start(&c, &list, &["logs", "-f", "talk", "-n", "0"], "logs");
    let monitor = Background::start(&c, &list, &["monitor"], "monitor");
    eventually("the follow shows lines", PATIENCE, || {
        (numbers(&logs.stdout()).len() >= 5).then_some(())
    });
    for (round, how) in [(1, Signal::SIGKILL), (2, Signal::SIGTERM)] {
        let before = *numbers(&logs.stdout()).last().unwrap();
        let old = group.addrs[leader];
        if how == Signal::SIGKILL {
            group.procs[leader].kill();
        } else {
            group.procs[leader].signal(how);
        }
        let next = group.leader(&rt, &etcd, Some(leader));
        let new = group.addrs[next];
        eventually(
            &format!("round {round}: the follow goes on through {new}"),
            PATIENCE,
            || {
                let err = logs.stderr();
                let last = *numbers(&logs.stdout()).last().unwrap();
                (err.contains(&format!("following again through controller {new}"))
                    && last > before + 20)
                    .then_some(())
            },
        );
        let said = logs.stderr();
        assert!(
            said.contains(&format!("controller {old} went away")),
            "{said}"
        );
        eventually(
            &format!("round {round}: the monitor moved to {new}"),
            PATIENCE,
            || {
                monitor
                    .stderr()
                    .contains(&format!("following again through controller {new}"))
                    .then_some(())
            },
        );
        leader = next;
    }
    let nums = numbers(&logs.stdout());
    let broken: Vec<(u64, u64)> = nums
        .windows(2)
        .map(|w| (w[0], w[1]))
        .filter(|(a, b)| *b != a + 1)
        .collect();
    assert!(broken.is_empty(), "lines skipped or repeated at {broken:?}");
    for (what, mut bg) in [("logs -f", logs), ("monitor", monitor)] {
        assert!(bg.ended().is_none(), "{what} ended: {}", bg.stderr());
    }
}

/// A follow welcomed by a controller that warns it may not lead any more (cut off from
/// etcd) moves, without a break in its connection, to a controller of its list that
/// leads and welcomes it without a warning, once there is one.
#[test]
fn a_follow_on_a_cut_off_controller_moves_once_a_leader_answers() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let mut etcd = Etcd::start(&c, 3);
    let (p0, a0) = leader_on_member_0_only(&c, &etcd);
    // The second controller's address is in the list from the start; it starts later.
    let a1: SocketAddr = format!("127.0.0.1:{}", drover_tests::free_udp_port())
        .parse()
        .unwrap();
    let list = etcd::addrs(&[a0, a1]);
    let (_agent, _) = agent_running_one_node(&c, &list);
    etcd.kill(0);
    p0.wait_log("closed the agents' connections");
    // Only the cut-off controller answers: it welcomes the monitor, warning.
    let monitor = drover_tests::Background::start(&c, &list, &["monitor"], "monitor");
    eventually("the monitor warned", PATIENCE, || {
        monitor.stderr().contains("may be stale").then_some(())
    });
    let (_p1, _) = etcd::start_controller_cmd(
        &c,
        std::process::Command::new(drover_tests::bin("drover-controller")),
        "controller-1",
        &etcd,
        PREFIX,
        &a1.to_string(),
        &[],
    );
    eventually("the monitor moved to the leader", PATIENCE, || {
        monitor
            .stderr()
            .contains(&format!(
                "[drover: controller {a0} may not lead any more; following again through controller {a1}; events meanwhile are not shown]"
            ))
            .then_some(())
    });
    // Its event follows the line on stderr: written one after the other, not at once.
    eventually("the monitor wrote its resubscribed event", PATIENCE, || {
        let events = monitor.stdout();
        (events.contains("\"type\":\"resubscribed\"") && events.contains(&a1.to_string()))
            .then_some(())
    });
}

/// The leader compacts etcd's history (`--etcd-compact-every`), keeping one interval of
/// it; the state survives it whole: a new leader loads the last deploy, and nodes keep
/// running.
#[test]
fn the_leader_compacts_etcds_history_and_the_state_survives_it() {
    if !etcd::available() {
        return;
    }
    let c = Cluster::new();
    let etcd = Etcd::start(&c, 1);
    let rt = runtime();
    let compact = ["--leader-lease", LEASE, "--etcd-compact-every", "1s"];
    let (mut first, a0) = etcd::start_controller(&c, "controller-0", &etcd, PREFIX, &compact);
    first.wait_log("leading: serving");
    let list = etcd::addrs(&[a0]);
    let (_agent, pids) = agent_running_one_node(&c, &list);
    let revision = |rt: &tokio::runtime::Runtime| {
        rt.block_on(etcd.client().revision(PREFIX.as_bytes()))
            .unwrap()
    };
    let early = revision(&rt);
    assert!(!etcd.compacted_past(early));
    // More history: deploys that each write the state's keys anew.
    for i in 0..5 {
        let v = config_file(&c, &format!("more{i}"), &[("w1", "a1")]);
        let out = etcd::drover(&c, &list, &["deploy-config", v.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    }
    let deployed = etcd::drover(&c, &list, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(deployed.code, Some(0), "{}", deployed.stderr);
    assert!(revision(&rt) > early + 5, "the deploys wrote");
    eventually(
        "the leader compacted past the early revision",
        PATIENCE,
        || etcd.compacted_past(early).then_some(()),
    );

    // A new leader loads the state from what is left: the same deploy, no restart.
    first.kill();
    let (second, _) = etcd::start_controller_cmd(
        &c,
        std::process::Command::new(drover_tests::bin("drover-controller")),
        "controller-1",
        &etcd,
        PREFIX,
        &a0.to_string(),
        &compact,
    );
    second.wait_log("leading: serving");
    let again = etcd::drover(&c, &list, &["get-config", "--deployed", "--as-json"]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    assert_eq!(again.stdout, deployed.stdout);
    let now = eventually("the node is reported again", PATIENCE, || {
        node_pids(&c, &list).filter(|p| p.len() == 1)
    });
    assert_eq!(now, pids, "no node restarted");
    // It compacts on: the history up to its own first revision goes too.
    let later = revision(&rt);
    let v = config_file(&c, "last", &[("w1", "a1")]);
    assert_eq!(
        etcd::drover(&c, &list, &["deploy-config", v.to_str().unwrap()]).code,
        Some(0)
    );
    eventually("the new leader compacts too", PATIENCE, || {
        etcd.compacted_past(later).then_some(())
    });
}
