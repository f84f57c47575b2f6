//! A certificate renewal and a whole CA rollover on a running cluster of three agents:
//! a new CA joins every bundle, every certificate moves over to it, the old CA leaves,
//! and all the while nothing restarts, no agent is lost and no client request fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_proto::msg::PeerRole;
use drover_tests::{
    Cluster, PATIENCE, Proc, bin, eventually, free_tcp, metric_value, run_cli, scrape,
};
use nix::sys::signal::Signal;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Expiry (Unix time) of the certificate in a PEM file.
fn not_after(path: &Path) -> i64 {
    let pem = std::fs::read(path).unwrap();
    let der = CertificateDer::from_pem_slice(&pem).unwrap();
    drover_net::tls::cert_info(&der).unwrap().not_after
}

/// `drover ca ...`, which must succeed.
fn ca(args: &[&str]) {
    let out = Command::new(bin("drover"))
        // An operator's shell set up for the client: its key is not the one renewed.
        .env("DROVER_KEY", "/nonexistent/ops.key")
        .arg("ca")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "drover ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces a file in one step, as an operator's `install` or a config manager does.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// How often `p` logged the outcome of a reload.
fn reloads(p: &Proc) -> usize {
    let t = p.log_text();
    t.matches("reloaded certificates (").count() + t.matches("reload failed (").count()
}

/// node -> pid, from a get-nodes reply, when it lists `count` nodes, all running.
fn running(json: &serde_json::Value, count: usize) -> Option<BTreeMap<String, u64>> {
    let mut map = BTreeMap::new();
    for (_, nodes) in json["results"].as_object()? {
        for (name, n) in nodes.as_object()? {
            if n["mgmt_role"].is_null() {
                if n["state"] != "RUNNING" {
                    return None;
                }
                map.insert(name.clone(), n["pid"].as_u64()?);
            }
        }
    }
    (map.len() == count).then_some(map)
}

/// A client that asks the controller for every node, over and over (every other time
/// asking each agent directly), with whichever certificate it is given, and keeps what
/// went wrong.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    cert: Arc<Mutex<String>>,
    /// The certificate of the last request that completed.
    last: Arc<Mutex<String>>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl ClientLoop {
    fn start(pki: PathBuf, addr: SocketAddr, cert: &str, pids: BTreeMap<String, u64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cert = Arc::new(Mutex::new(cert.to_owned()));
        let last = Arc::new(Mutex::new(String::new()));
        let (s, c, l) = (stop.clone(), cert.clone(), last.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut requests = 0;
            while !s.load(Ordering::Relaxed) {
                let name = c.lock().unwrap().clone();
                let mut cmd = Command::new(bin("drover"));
                cmd.arg("--controller")
                    .arg(addr.to_string())
                    .arg("--ca")
                    .arg(pki.join("ca.crt"))
                    .arg("--cert")
                    .arg(pki.join(format!("{name}.crt")))
                    .arg("--key")
                    .arg(pki.join(format!("{name}.key")))
                    .args(["--timeout", "10s", "get-nodes"]);
                // Every other request asks each agent directly, over whichever
                // connection it has at that moment.
                if requests % 2 == 1 {
                    cmd.arg("--fresh");
                }
                let out = run_cli(cmd, Duration::from_secs(30));
                requests += 1;
                l.lock().unwrap().clone_from(&name);
                if out.code != Some(0) {
                    failures.push(format!("as {name}: exit {:?}: {}", out.code, out.stderr));
                    continue;
                }
                let json: serde_json::Value = match serde_json::from_str(&out.stdout) {
                    Ok(j) => j,
                    Err(e) => {
                        failures.push(format!("as {name}: not json ({e}): {}", out.stdout));
                        continue;
                    }
                };
                if running(&json, pids.len()).as_ref() != Some(&pids) {
                    failures.push(format!("as {name}: nodes not as before: {json}"));
                }
            }
            (requests, failures)
        });
        Self {
            stop,
            cert,
            last,
            thread,
        }
    }

    /// Switches to another certificate, once the requests made with the previous one
    /// are over.
    fn use_cert(&self, name: &str) {
        *self.cert.lock().unwrap() = name.to_owned();
        eventually(&format!("a request made as {name}"), PATIENCE, || {
            (*self.last.lock().unwrap() == name).then_some(())
        });
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn a_renewal_and_a_ca_rollover_restart_nothing_and_fail_no_request() {
    let c = Cluster::new();
    let metrics = free_tcp();
    let (mut ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--metrics-listen", &metrics.to_string()]);
    let names = ["agent-1", "agent-2", "agent-3"];
    let mut agents: Vec<Proc> = names
        .iter()
        .map(|n| {
            c.issue(PeerRole::Agent, n);
            c.start_agent_args(n, n, &["--controller", &addr.to_string(), "--watch-certs"])
        })
        .collect();
    for a in &agents {
        a.wait_log("watching the certificate files for changes");
    }
    eventually("three agents connected", PATIENCE, || {
        (metric_value(&scrape(metrics), "drover_agents_connected") == Some(3.0)).then_some(())
    });
    let mut config =
        String::from("[defaults]\nreadiness = { kind = \"start-period\", period = \"0s\" }\n");
    for (i, n) in names.iter().enumerate() {
        config.push_str(&format!(
            "[instances.{n}]\n[nodes.w{i}]\ninstance = \"{n}\"\ncommand = [\"{}\"]\n",
            bin("drover-testprog").display()
        ));
    }
    let file = c.dir.path().join("cluster.toml");
    std::fs::write(&file, config).unwrap();
    let out = c.drover(addr, &["deploy-config", file.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let pids = eventually("every node running", PATIENCE, || {
        running(&c.drover(addr, &["get-nodes"]).json(), names.len())
    });
    let daemon_pids: Vec<u32> = std::iter::once(ctl.pid())
        .chain(agents.iter().map(Proc::pid))
        .collect();
    c.issue(PeerRole::Client, "loop");
    // A client that is never moved over, to see the old CA go.
    c.issue(PeerRole::Client, "stale");
    let pki = c.pki.clone();
    let next = c.dir.path().join("pki-next");
    let started = Instant::now();
    let client = ClientLoop::start(pki.clone(), addr, "loop", pids.clone());
    let agent_reloads = |agents: &[Proc]| agents.iter().map(reloads).collect::<Vec<_>>();
    let wait_agents = |agents: &[Proc], before: &[usize], what: &str| {
        eventually(what, PATIENCE, || {
            agents
                .iter()
                .zip(before)
                .all(|(a, b)| reloads(a) > *b)
                .then_some(())
        });
    };
    let hup = |p: &Proc| {
        let before = reloads(p);
        p.signal(Signal::SIGHUP);
        eventually(&format!("{} to reload", p.name), PATIENCE, || {
            (reloads(p) > before).then_some(())
        });
    };
    // Waits until the controller sees each agent's connection present the certificate
    // in its file now (the old connections closed), and no other.
    let agents_moved = |what: &str| {
        let want: Vec<(String, f64)> = names
            .iter()
            .map(|n| {
                (
                    format!("drover_peer_cert_expiry_seconds{{peer=\"agent/{n}\"}}"),
                    not_after(&pki.join(format!("{n}.crt"))) as f64,
                )
            })
            .collect();
        eventually(what, PATIENCE, || {
            let page = scrape(metrics);
            want.iter()
                .all(|(series, v)| metric_value(&page, series) == Some(*v))
                .then_some(())
        });
    };

    // 1. A plain renewal with the same CA: an agent (picked up by its watcher) and the
    //    controller (SIGHUP).
    let before = reloads(&agents[0]);
    ca(&[
        "renew",
        "--dir",
        pki.to_str().unwrap(),
        "--cert",
        pki.join("agent-1.crt").to_str().unwrap(),
        "--days",
        "400",
    ]);
    eventually("agent-1 to reload", PATIENCE, || {
        (reloads(&agents[0]) > before).then_some(())
    });
    ca(&[
        "renew",
        "--dir",
        pki.to_str().unwrap(),
        "--cert",
        pki.join("controller.crt").to_str().unwrap(),
        "--days",
        "400",
    ]);
    hup(&ctl);
    agents_moved("agent-1 on its renewed certificate");

    // 2. A new CA, trusted by everyone next to the old one.
    ca(&["init", "--dir", next.to_str().unwrap()]);
    let old_ca = std::fs::read_to_string(pki.join("ca.crt")).unwrap();
    let new_ca = std::fs::read_to_string(next.join("ca.crt")).unwrap();
    let before = agent_reloads(&agents);
    replace(&pki.join("ca.crt"), &format!("{old_ca}{new_ca}"));
    hup(&ctl);
    wait_agents(&agents, &before, "agents to reload the bundle");

    // From here a monitor, with a certificate of the new CA, sees every event.
    ca(&[
        "issue",
        "--dir",
        next.to_str().unwrap(),
        "--role",
        "client",
        "--name",
        "watcher",
    ]);
    let events = c.dir.path().join("events.jsonl");
    let mut monitor = {
        let mut cmd = Command::new(bin("drover"));
        drover_tests::dies_with_its_test(&mut cmd);
        cmd.arg("--controller")
            .arg(addr.to_string())
            .arg("--ca")
            .arg(pki.join("ca.crt"))
            .arg("--cert")
            .arg(next.join("watcher.crt"))
            .arg("--key")
            .arg(next.join("watcher.key"))
            .arg("monitor")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&events).unwrap())
            .stderr(std::process::Stdio::null());
        cmd.spawn().unwrap()
    };
    eventually("the monitor connected", PATIENCE, || {
        scrape(metrics)
            .contains("drover_peer_cert_expiry_seconds{peer=\"client/watcher\"}")
            .then_some(())
    });

    // 3. Every certificate moves over: the controller first, then the agents, then the
    //    clients.
    ca(&[
        "renew",
        "--dir",
        next.to_str().unwrap(),
        "--cert",
        pki.join("controller.crt").to_str().unwrap(),
        "--days",
        "500",
    ]);
    hup(&ctl);
    for (i, n) in names.iter().enumerate() {
        let before = agent_reloads(&agents);
        ca(&[
            "renew",
            "--dir",
            next.to_str().unwrap(),
            "--cert",
            pki.join(format!("{n}.crt")).to_str().unwrap(),
            "--days",
            "500",
        ]);
        wait_agents(&agents[i..=i], &before[i..=i], "the agent to reload");
    }
    agents_moved("every agent on a certificate of the new CA");
    std::fs::copy(pki.join("loop.crt"), pki.join("loop2.crt")).unwrap();
    std::fs::copy(pki.join("loop.key"), pki.join("loop2.key")).unwrap();
    ca(&[
        "renew",
        "--dir",
        next.to_str().unwrap(),
        "--cert",
        pki.join("loop2.crt").to_str().unwrap(),
    ]);
    client.use_cert("loop2");
    ca(&[
        "renew",
        "--dir",
        next.to_str().unwrap(),
        "--cert",
        pki.join("ops.crt").to_str().unwrap(),
    ]);

    // 4. The old CA leaves every bundle.
    let before = agent_reloads(&agents);
    replace(&pki.join("ca.crt"), &new_ca);
    hup(&ctl);
    wait_agents(
        &agents,
        &before,
        "agents to reload the bundle without the old CA",
    );
    agents_moved("every agent still connected");
    // Some more requests with nothing left of the old CA.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(1) {
        assert_eq!(c.drover(addr, &["get-instances"]).code, Some(0));
    }
    let (requests, failures) = client.finish();
    eprintln!(
        "rollover: {requests} client requests in {:?}, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(requests >= 10, "only {requests} requests");

    // Nothing restarted, no agent was lost or had a connection closed under it.
    assert_eq!(
        running(&c.drover(addr, &["get-nodes"]).json(), names.len()),
        Some(pids)
    );
    for (p, pid) in std::iter::once(&mut ctl)
        .chain(agents.iter_mut())
        .zip(&daemon_pids)
    {
        assert_eq!(p.pid(), *pid);
        assert!(
            !p.log_text().contains("closed the connection of"),
            "{}",
            p.log_text()
        );
    }
    let log = ctl.log_text();
    assert!(!log.contains("lost:"), "{log}");
    assert!(!log.contains("reload failed"), "{log}");
    for a in &agents {
        let log = a.log_text();
        assert!(!log.contains("lost the controller"), "{log}");
        assert!(
            log.contains("moved to a new connection to the controller"),
            "{log}"
        );
    }
    // The old CA is gone: a certificate of it is refused, by a controller that is
    // dialled by a client still trusting both CAs (a client with the cluster's bundle
    // says itself that its certificate does not verify).
    let both = c.dir.path().join("both-cas.crt");
    std::fs::write(&both, format!("{old_ca}{new_ca}")).unwrap();
    let out = run_cli(
        {
            let mut cmd = Command::new(bin("drover"));
            cmd.arg("--controller")
                .arg(addr.to_string())
                .arg("--ca")
                .arg(&both)
                .arg("--cert")
                .arg(c.pki_file("stale.crt"))
                .arg("--key")
                .arg(c.pki_file("stale.key"))
                .arg("get-instances");
            cmd
        },
        PATIENCE,
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("rejected our certificate"),
        "{}",
        out.stderr
    );
    let out = c.drover_as("stale", addr, &["get-instances"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("does not verify against its own CA bundle"),
        "{}",
        out.stderr
    );
    let page = scrape(metrics);
    assert_eq!(metric_value(&page, "drover_agents_connected"), Some(3.0));
    // Each agent moved to new connections several times, and never joined again.
    assert_eq!(
        metric_value(&page, "drover_agent_connections_total"),
        Some(3.0)
    );
    assert!(
        page.contains("drover_ca_cert_expiry_seconds{ca=\"drover cluster CA 20"),
        "{page}"
    );
    assert_eq!(
        page.matches("drover_ca_cert_expiry_seconds{").count(),
        1,
        "{page}"
    );
    // The monitor saw no agent come or go and no error, though it sees events: one
    // caused now, after the checks above.
    assert!(
        monitor.try_wait().unwrap().is_none(),
        "the monitor was cut off"
    );
    let seen = std::fs::read_to_string(&events).unwrap();
    for kind in ["agent_joined", "agent_lost", "error"] {
        assert!(!seen.contains(&format!("\"{kind}\"")), "{seen}");
    }
    assert_eq!(c.drover(addr, &["restart", "w0"]).code, Some(0));
    eventually("the monitor to see the restart", PATIENCE, || {
        std::fs::read_to_string(&events)
            .unwrap()
            .contains("w0")
            .then_some(())
    });
    monitor.kill().unwrap();
    monitor.wait().unwrap();
}
