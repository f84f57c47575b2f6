//! Agents on separate hosts: each in its own network namespace, reaching the controller
//! over a bridge. Deploys across hosts, and links cut for less and for more than the idle
//! timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use drover_tests::netlab::NetLab;
use drover_tests::{Cluster, PATIENCE, bin, eventually};
use serde_json::Value;

/// Fields drop in order: the daemons, then their network, then the cluster, whose drop
/// kills what is left in the agents' cgroups (an agent still running would start its
/// nodes again).
struct Setup {
    addr: SocketAddr,
    _procs: Vec<drover_tests::Proc>,
    lab: NetLab,
    c: Cluster,
}

fn setup(agents: usize) -> Setup {
    let mut lab = NetLab::new();
    let gw = lab.host_gateway().to_string();
    let c = Cluster::with_controller_sans(&[&gw]);
    let (ctl, addr) = c.start_controller(&format!("{gw}:0"));
    let mut procs = vec![ctl];
    for i in 0..agents {
        let host = lab.add_host();
        procs.push(c.start_agent_in(&lab, host, &format!("agent-{}", i + 1), addr));
    }
    eventually("agents connected across hosts", PATIENCE, || {
        let v = c.drover(addr, &["get-instances"]).json();
        (v.as_object().unwrap().len() == agents).then_some(())
    });
    Setup {
        c,
        lab,
        addr,
        _procs: procs,
    }
}

fn nodes(c: &Cluster, addr: SocketAddr) -> (Value, BTreeMap<String, (String, Option<u64>)>) {
    let v = c.drover(addr, &["get-nodes"]).json();
    let mut map = BTreeMap::new();
    for nodes in v["results"].as_object().unwrap().values() {
        for (name, n) in nodes.as_object().unwrap() {
            if n["mgmt_role"].is_null() {
                map.insert(
                    name.clone(),
                    (n["state"].as_str().unwrap().to_owned(), n["pid"].as_u64()),
                );
            }
        }
    }
    (v, map)
}

fn deploy(s: &Setup, per_agent: usize, agents: usize) -> BTreeMap<String, u64> {
    let mut text =
        String::from("[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n");
    for a in 1..=agents {
        text.push_str(&format!("[instances.agent-{a}]\n"));
        for n in 1..=per_agent {
            text.push_str(&format!(
                "[nodes.a{a}-n{n}]\ninstance = \"agent-{a}\"\ncommand = [\"{}\"]\n",
                bin("drover-testprog").display()
            ));
        }
    }
    let file = s.c.dir.path().join("netns.toml");
    std::fs::write(&file, text).unwrap();
    let out =
        s.c.drover(s.addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    eventually("all running", PATIENCE, || {
        let (_, m) = nodes(&s.c, s.addr);
        (m.len() == per_agent * agents && m.values().all(|(st, _)| st == "RUNNING"))
            .then(|| m.into_iter().map(|(k, (_, p))| (k, p.unwrap())).collect())
    })
}

#[test]
fn deploy_across_hosts_reports_each_host_address() {
    let s = setup(2);
    let v = s.c.drover(s.addr, &["get-instances"]).json();
    assert_eq!(v["agent-1"]["host"], s.lab.host_addr(0).to_string());
    assert_eq!(v["agent-2"]["host"], s.lab.host_addr(1).to_string());
    let pids = deploy(&s, 2, 2);
    assert_eq!(pids.len(), 4);
    let deployed =
        s.c.drover(s.addr, &["get-config", "--deployed", "--as-json"])
            .json();
    assert_eq!(
        deployed["instances"][1]["host"],
        s.lab.host_addr(1).to_string()
    );
}

#[test]
fn a_partition_longer_than_the_idle_timeout_loses_the_agent_and_heals_without_restarts() {
    let s = setup(2);
    let pids = deploy(&s, 2, 2);
    let cut = Instant::now();
    s.lab.set_link(0, false);
    let (v, m) = eventually("agent-1 lost, its nodes UNKNOWN", PATIENCE, || {
        let (v, m) = nodes(&s.c, s.addr);
        (m["a1-n1"].0 == "UNKNOWN").then_some((v, m))
    });
    eprintln!(
        "partition detected after {:?} (idle timeout {:?})",
        cut.elapsed(),
        s.c.idle_timeout
    );
    assert_eq!(v["errors"][0]["source"], "agent-1");
    assert_eq!(m["a1-n1"].1, Some(pids["a1-n1"]), "last known pid kept");
    assert_eq!(m["a2-n1"].0, "RUNNING", "the other host is unaffected");

    let healed = Instant::now();
    s.lab.set_link(0, true);
    let after = eventually("agent-1 back, every node running", PATIENCE, || {
        let (_, m) = nodes(&s.c, s.addr);
        m.values().all(|(st, _)| st == "RUNNING").then(|| {
            m.into_iter()
                .map(|(k, (_, p))| (k, p.unwrap()))
                .collect::<BTreeMap<_, _>>()
        })
    });
    eprintln!("recovered {:?} after the link healed", healed.elapsed());
    assert_eq!(after, pids, "nothing restarted");
}

#[test]
fn a_partition_shorter_than_the_idle_timeout_goes_unnoticed() {
    let s = setup(1);
    let pids = deploy(&s, 1, 1);
    // The fault itself lasts 700 ms: well under the 2 s idle timeout, even on a slow
    // machine.
    s.lab.set_link(0, false);
    std::thread::sleep(Duration::from_millis(700));
    s.lab.set_link(0, true);
    let (_, m) = nodes(&s.c, s.addr);
    assert_eq!(m["a1-n1"], ("RUNNING".to_owned(), Some(pids["a1-n1"])));
    let log = std::fs::read_to_string(s.c.dir.path().join("controller.log")).unwrap();
    assert!(!log.contains("agent 'agent-1' lost"), "no flapping:\n{log}");
}
